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
        "import sys, sao_core, sao_core.config, sao_core.stages.runner, sao_core.pipeline, sao_core.personas,"
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
