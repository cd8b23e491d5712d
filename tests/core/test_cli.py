"""The `sao` command (flows/cli.py): in process for its outputs and exit codes, and as the installed console
script in a subprocess, the way people run it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


def _sao() -> str:
    """The console script installed next to this interpreter (pyproject's [project.scripts])."""
    path = Path(sys.executable).parent / "sao"
    assert path.is_file(), f"{path} is missing: install the project (`make setup` or pip install -e .)"
    return str(path)


def _run_sao(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run([_sao(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_synth_prints_the_round_folder_and_stage_summary(tmp_path, capsys):
    code = main(["synth", "--config", TINY, "--set", "engine.name=fake", "--set", f"run.root={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"round folder: {tmp_path}/tiny/round_001-" in out
    for stage in ("personas", "prompts", "responses", "judgements", "pairs"):
        assert stage in out
    assert "judge: parse rate" in out and "repetition rate" in out


def test_bad_key_exits_2_with_the_key_named(tmp_path, capsys):
    code = main(["synth", "--config", TINY, "--set", "judging.swapp=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'judging.swapp'" in err and "did you mean 'judging.swap'" in err


def test_missing_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no" / "such-model"
    code = main(
        [
            "synth",
            "--config",
            TINY,
            "--set",
            f"model.path={missing}",
            "--set",
            "engine.name=transformers",
            "--set",
            f"run.root={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"model path '{missing}' does not exist" in err


def test_train_parses_its_arguments_and_names_missing_pairs(tmp_path, capsys):
    missing = tmp_path / "no-pairs"
    code = main(["train", "--config", TINY, "--pairs", str(missing), "--set", "training.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"sao train: error: pairs {missing} not found" in err


def test_every_subcommand_needs_a_config(capsys):
    for command in ("synth", "run", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command])
        assert exit_info.value.code == 2
        assert "--config" in capsys.readouterr().err


def test_installed_console_script_runs_synth_end_to_end(tmp_path):
    """The `sao` entry point itself, in a new process from another directory: help, a round, an error."""
    help_out = _run_sao("--help", cwd=tmp_path)
    assert help_out.returncode == 0
    for command in ("synth", "run", "train"):
        assert command in help_out.stdout

    done = _run_sao(
        "synth", "--config", TINY, "--set", "engine.name=fake", "--set", f"run.root={tmp_path}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    round_line = next(line for line in done.stdout.splitlines() if line.startswith("round folder: "))
    round_dir = Path(round_line.removeprefix("round folder: "))
    manifest = json.loads((round_dir / "pairs" / "manifest.json").read_text())
    assert manifest["stage"] == "pairs" and manifest["rows_out"] > 0
    assert "shard" not in done.stderr  # quiet without -v

    bad = _run_sao("synth", "--config", TINY, "--set", "personas.nn=3", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'personas.nn'" in bad.stderr


def test_verbose_logs_every_shard(tmp_path):
    root = tmp_path / "verbose"
    args = ["synth", "--config", TINY, "--set", "engine.name=fake", "--set", f"run.root={root}"]
    loud = _run_sao("-v", *args, cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-2000:]
    for stage in ("prompts", "responses", "judgements"):
        assert f"INFO sao_core.stages.runner: {stage} shard 0:" in loud.stderr
    shutil.rmtree(root)
    quiet = _run_sao(*args, cwd=tmp_path)
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr


def test_sao_synth_and_train_start_without_prefect_or_torch():
    code = (
        "import sys, sao_core, sao_core.config, sao_core.stages.runner, sao_core.stages.synth, sao_core.method.personas,"
        " flows.cli;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'prefect', 'vllm', 'trl') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_module_in_sao_core_imports_prefect():
    """A plain reading of the source, beside the import contracts of `make lint` (tests/core/test_layers.py)."""
    statement = re.compile(r"^\s*(import prefect\b|from prefect(\.\S+)? import )", re.MULTILINE)
    for path in (ROOT / "sao_core").rglob("*.py"):
        match = statement.search(path.read_text())
        assert match is None, f"{path}: {match.group(0).strip() if match else ''}"


# --- campaign state and lineage: promote, rollback, campaign-status, lineage ------------------------------


def _fake_training_run(overrides: list[str], round_dir: str) -> str:
    """A finished LoRA run as sao_core.training leaves it (adapter/, then manifest.json); bytes for weights."""
    from sao_core.store import storage
    from sao_core.store.layout import load_config
    from sao_core.training.data import find_pair_files, pairs_sha256
    from sao_core.training.launch import default_output_url
    from sao_core.training.outputs import training_hash

    cfg = load_config(TINY, overrides)
    out, pairs = default_output_url(cfg), f"{round_dir}/pairs"
    storage.write_json(f"{out}/adapter/adapter_config.json", {"r": 16})
    storage.write_bytes(f"{out}/adapter/adapter_model.safetensors", out.encode())
    manifest = {
        "stage": "train",
        "complete": True,
        "training_hash": training_hash(cfg),
        "model": cfg.model.path,
    }
    manifest |= {
        "pairs_sha256": pairs_sha256(pairs),
        "pairs_files": find_pair_files(pairs),
        "adapter": "adapter",
    }
    storage.write_json(
        f"{out}/manifest.json", {**manifest, "full_model": None, "objective": "simpo", "steps": 2}
    )
    return out


def _synth_and_train(tmp_path: Path, k: int) -> tuple[str, str]:
    overrides = ["run.root=" + str(tmp_path), f"run.round={k}"]
    done = _run_sao("synth", "--config", TINY, *(a for o in overrides for a in ("--set", o)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    round_dir = next(line for line in done.stdout.splitlines() if line.startswith("round folder: "))[14:]
    return round_dir, _fake_training_run(overrides, round_dir)


def test_promote_status_rollback_and_lineage_through_the_installed_script(tmp_path):
    round1, model1 = _synth_and_train(tmp_path, 1)
    round2, model2 = _synth_and_train(tmp_path, 2)
    env_who = {"SAO_USER": "ana"}

    first = _run_sao("promote", round1, "--why", "round 1 won the gate", cwd=tmp_path)  # model from the round
    assert first.returncode == 0, first.stderr
    assert f"promoted: record 1 (promote), round 1: {model1}" in first.stdout
    assert f"model.adapter {model1}/adapter" in first.stdout
    second = _run_sao(
        "promote", round2, "--why", "round 2 won", "--model", model2, "--who", "bo", cwd=tmp_path
    )
    assert second.returncode == 0 and "promoted: record 2" in second.stdout
    again = _run_sao("promote", round2, "--why", "a retry", cwd=tmp_path)
    assert again.returncode == 0 and "already current: record 2" in again.stdout

    status = _run_sao(
        "campaign-status", "--config", TINY, "--set", f"run.root={tmp_path}", "--json", cwd=tmp_path
    )
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["current"]["seq"] == 2 and state["current"]["who"] == "bo"
    assert [r["model"] for r in state["history"]] == [model1, model2]

    back = subprocess.run(
        [
            _sao(),
            "rollback",
            "--campaign-root",
            str(tmp_path),
            "--campaign",
            "tiny",
            "--why",
            "round 2 regressed",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env_who},
        timeout=300,
    )
    assert back.returncode == 0, back.stderr
    assert f"rolled back to record 1: record 3 (rollback), round 1: {model1}" in back.stdout
    assert "by ana at" in back.stdout
    table = _run_sao("campaign-status", "--campaign-root", str(tmp_path), "--campaign", "tiny", cwd=tmp_path)
    assert "| 3 | rollback to 1 | 1 |" in table.stdout and "round 2 regressed" in table.stdout

    lin = _run_sao("lineage", model2, "--json", cwd=tmp_path)
    assert lin.returncode == 0, lin.stderr
    found = json.loads(lin.stdout)
    assert found["round_dir"] == round2 and found["parent_model"]["path"] == "bundled:tiny-random-llama"
    assert [s["stage"] for s in found["stages"]] == [
        "personas",
        "prompts",
        "responses",
        "judgements",
        "pairs",
    ]
    assert found["models"][0]["pairs_match"] is True
    assert [r["seq"] for r in found["models"][0]["promotions"]] == [2]

    pair = json.loads(Path(round2, "pairs", "part-00000.jsonl").read_text().splitlines()[0])
    trace = _run_sao("lineage", round2, "--pair", pair["prompt_id"], cwd=tmp_path)
    assert trace.returncode == 0, trace.stderr
    persona = next(
        json.loads(line)
        for f in sorted(Path(round2, "personas").glob("part-*.jsonl"))
        for line in f.read_text().splitlines()
        if json.loads(line)["persona_id"] == pair["persona_id"]
    )
    assert f"persona_id: {pair['persona_id']}" in trace.stdout and persona["persona"][:50] in trace.stdout
    assert "every link holds" in trace.stdout


def test_campaign_commands_name_their_errors(tmp_path, capsys):
    assert main(["promote", str(tmp_path / "no-round"), "--why", "x", "--model", str(tmp_path)]) == 2
    assert "no-round is not a round folder: it has no resolved_config.yaml" in capsys.readouterr().err
    assert main(["rollback", "--why", "x"]) == 2
    assert "--campaign-root ROOT and --campaign NAME" in capsys.readouterr().err
    assert main(["rollback", "--campaign-root", str(tmp_path), "--campaign", "c", "--why", "x"]) == 2
    assert "has no promotion to roll back" in capsys.readouterr().err
    assert main(["campaign-status", "--campaign-root", str(tmp_path), "--campaign", "c"]) == 0
    assert "Nothing promoted yet" in capsys.readouterr().out
    assert main(["lineage", str(tmp_path)]) == 2
    assert "neither a round folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["promote", str(tmp_path)])  # --why is required
    assert "--why" in capsys.readouterr().err


def test_campaign_commands_start_without_prefect_or_torch(tmp_path):
    """What promote, campaign-status and lineage import while they run, not only at start-up."""
    round_dir, _ = _synth_and_train(tmp_path, 1)
    code = (
        "import sys; from flows.cli import main;"
        f"codes = [main(['promote', {round_dir!r}, '--why', 'light']),"
        f" main(['campaign-status', '--campaign-root', {str(tmp_path)!r}, '--campaign', 'tiny']),"
        f" main(['lineage', {round_dir!r}])];"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'prefect', 'vllm', 'trl') if m in sys.modules];"
        "print('codes', codes, 'heavy', heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "codes [0, 0, 0] heavy []"


def test_campaign_resume_lets_a_paused_campaign_plan_again(tmp_path, capsys):
    from sao_core.campaign import outcomes, planning
    from sao_core.config import build_config
    from sao_core.store.layout import prepare_round

    root = str(tmp_path)
    for k in (1, 2, 3):
        cfg = build_config({"run": {"root": root, "campaign": "c", "round": k}, "engine": {"name": "fake"}})
        outcomes.record_failure(
            cfg, prepare_round(cfg), "train_policy", "TrainingError", "oom", campaign_round=True
        )
    assert planning.plan_next(root, "c", 0, 3).paused is not None
    assert main(["campaign-resume", "--campaign-root", root, "--campaign", "c", "--why", "more memory"]) == 0
    assert "resumed" in capsys.readouterr().out
    plan = planning.plan_next(root, "c", 0, 3)
    assert plan.paused is None and plan.round == 4
