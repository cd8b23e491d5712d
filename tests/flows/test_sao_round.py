"""The Prefect round: task bodies with .fn(), and a few whole rounds against the test harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sao_core.errors import (
    ConfigError,
    EngineError,
    ManifestError,
    ModelNotFoundError,
    PersonaSourceError,
    RoundQualityError,
    TrainingError,
)
from tests.flows.conftest import task_run_tries, task_runs

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
pytestmark = pytest.mark.tier1


def _round(tmp_path, *overrides):
    from flows.sao_round import sao_round

    state = sao_round(TINY, [f"run.root={tmp_path}", *overrides], return_state=True)
    return state, state.state_details.flow_run_id


def test_task_bodies_run_with_fn(tmp_path, prefect_api):
    from tasks.config import resolve_config
    from tasks.gate import quality_gate
    from tasks.personas import sample_personas

    ref = resolve_config.fn(TINY, [f"run.root={tmp_path}", "personas.n=6"])
    assert ref["round_dir"].startswith(str(tmp_path))
    assert ref["config_url"].startswith(f"{ref['round_dir']}/configs/")  # the run's own full config
    personas = sample_personas.fn(ref, ref["settings"]["personas"])
    assert personas["summary"]["rows_out"] == 6
    judged = {"summary": {"diagnostics": {"parse_rate": 0.9}}}
    assert quality_gate.fn(ref, {"summary": {"rows_out": 3}}, judged)["pairs"] == 3
    with pytest.raises(RoundQualityError, match=r"parse rate 10\.0% is under judging\.min_valid_rate"):
        quality_gate.fn(ref, {"summary": {"rows_out": 3}}, {"summary": {"diagnostics": {"parse_rate": 0.1}}})


def test_round_end_to_end_artifacts_and_cache(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, run_id = _round(tmp_path)
    assert state.is_completed(), state
    result = state.result()
    assert Path(result["report"]).is_file() and "Judge diagnostics" in Path(result["report"]).read_text()
    assert (Path(result["model"]) / "adapter").is_dir()
    runs = task_runs(run_id)
    for name in (
        "personas-round-1",
        "prompts-round-1",
        "responses-round-1",
        "judgements-round-1",
        "pairs-round-1",
        "quality-gate-round-1",
        "train-round-1",
        "evaluate-round-1",
        "report-round-1",
    ):
        assert runs.get(name) == ["Completed"], (name, runs.get(name))
    assert runs["prompts-shard-00000"] == ["Completed"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    kinds = {(a.key, a.type) for a in artifacts}
    for stage in ("personas", "prompts", "responses", "judgements", "pairs"):
        assert (f"tiny-{stage}-counts", "table") in kinds
        assert (f"tiny-{stage}-sample", "markdown") in kinds
        link = next(a for a in artifacts if a.key == f"tiny-{stage}-files")  # links are stored as markdown
        assert f"file://{result['round_dir']}/{stage}" in str(link.data)
    assert ("tiny-prompts-progress", "progress") in kinds
    assert ("tiny-round-report", "markdown") in kinds and ("tiny-evaluation", "table") in kinds
    sample = next(a for a in artifacts if a.key == "tiny-judgements-sample")
    assert "**Persona:**" in str(sample.data) and "**Verdict" in str(sample.data)

    # The same round again: served from the cache, no model stage runs.
    state2, run2 = _round(tmp_path)
    assert state2.is_completed()
    runs2 = task_runs(run2)
    for name in ("prompts-round-1", "responses-round-1", "judgements-round-1", "train-round-1"):
        assert runs2[name] == ["Cached"], (name, runs2[name])
    assert not any("-shard-" in name for name in runs2)

    # Only the training section changed: only training (and what reads the new model) runs.
    state3, run3 = _round(tmp_path, "training.learning_rate=0.0005")
    assert state3.is_completed()
    runs3 = task_runs(run3)
    for name in (
        "personas-round-1",
        "prompts-round-1",
        "responses-round-1",
        "judgements-round-1",
        "pairs-round-1",
    ):
        assert runs3[name] == ["Cached"], (name, runs3[name])
    assert runs3["train-round-1"] == ["Completed"]
    assert runs3["evaluate-round-1"] == ["Completed"]  # the new model is evaluated, not served from cache
    assert state3.result()["model"] != result["model"]  # each training setting has its own folder


def test_a_stage_that_fails_once_is_retried_and_the_round_completes(tmp_path, prefect_api):
    state, run_id = _round(tmp_path, "engine.fake.fail_calls=1")
    assert state.is_completed(), state
    assert task_runs(run_id)["prompts-shard-00000"] == ["Completed"]
    # The first generate call failed in the first prompts shard; its retry succeeded.
    run_count, history = task_run_tries(run_id, "prompts-shard-00000")
    assert "AwaitingRetry" in history and run_count == 2


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConfigError("unknown config key 'engine.batchsize'"), False),
        (PersonaSourceError("persona source 'file' gave zero personas"), False),
        (ModelNotFoundError("model org/typo not found"), False),
        (FileNotFoundError("pairs.jsonl"), False),
        (ManifestError("shard part-00001.jsonl does not match its manifest"), False),
        (RoundQualityError("fewer than pairing.min_pairs"), False),
        (EngineError("worker lost"), True),
        (TimeoutError("shard ran past engine.shard_timeout_s"), True),
        (ConnectionResetError("server went away"), True),
        (TrainingError("rank 1 exited with code -9"), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_errors_a_retry_may_fix_are_retried(error, retried):
    from prefect.states import Failed

    from tasks.cache import retry_unless_permanent

    assert retry_unless_permanent(None, None, Failed(data=error)) is retried  # type: ignore[arg-type]


def test_an_error_raised_from_a_permanent_one_is_not_retried():
    from prefect.states import Failed

    from tasks.cache import retry_unless_permanent

    error = TrainingError("training cannot start")
    error.__cause__ = ConfigError("training.deepspeed: no such file")  # raise ... from e
    assert retry_unless_permanent(None, None, Failed(data=error)) is False  # type: ignore[arg-type]


def test_a_config_typo_fails_at_once_without_retries(tmp_path, prefect_api):
    state, run_id = _round(tmp_path, "engine.batchsize=4")
    assert state.is_failed()
    with pytest.raises(
        ConfigError, match=r"unknown config key 'engine\.batchsize' \(did you mean 'engine\.batch_size'"
    ):
        state.result()
    run_count, history = task_run_tries(run_id, "resolve-config")
    assert run_count == 1, history
    assert history[-1] == "Failed" and not {"AwaitingRetry", "Retrying"} & set(history), history


def test_a_failed_gate_then_a_lower_gate_reuses_the_data(tmp_path, prefect_api):
    """The gate stops the round before training; lowering it (with a longer shard timeout and other
    settings that do not change the data) reuses every stage, and launch-only training keys reuse the model."""
    state, run_id = _round(tmp_path, "pairing.min_pairs=1000")
    assert state.is_failed()
    with pytest.raises(RoundQualityError, match=r"fewer than pairing\.min_pairs=1000"):
        state.result()
    runs = task_runs(run_id)
    assert runs["quality-gate-round-1"] == ["Failed"] and "train-round-1" not in runs
    [round_dir] = (tmp_path / "tiny").iterdir()

    state2, run2 = _round(
        tmp_path,
        "pairing.min_pairs=1",
        "judging.min_valid_rate=0.01",
        "engine.shard_timeout_s=36000",
        "engine.max_retries=9",
        "engine.batch_size=2",
    )
    assert state2.is_completed(), state2
    assert state2.result()["round_dir"] == str(round_dir)  # the same round folder
    runs2 = task_runs(run2)
    for name in ("personas", "prompts", "responses", "judgements", "pairs"):
        assert runs2[f"{name}-round-1"] == ["Cached"], (name, runs2[f"{name}-round-1"])
    assert runs2["quality-gate-round-1"] == ["Completed"] and runs2["train-round-1"] == ["Completed"]

    # How training is launched and kept does not name the model folder: the trained model is reused.
    state3, run3 = _round(
        tmp_path,
        "training.launcher=torchrun",
        "training.num_processes=2",
        "training.checkpoint_steps=1",
        "training.gradient_checkpointing=true",
    )
    assert state3.is_completed(), state3
    assert state3.result()["model"] == state2.result()["model"]
    runs3 = task_runs(run3)
    assert runs3["train-round-1"] == ["Cached"] and runs3["evaluate-round-1"] == ["Cached"]


def test_readme_main_command_on_the_tiny_recipe(tmp_path):
    """`sao run` as the README has it (the tiny recipe here), on Prefect's temporary local server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    sao = Path(sys.executable).parent / "sao"
    out = subprocess.run(
        [str(sao), "run", "--config", TINY, "--set", f"run.root={tmp_path / 'art'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "temporary local Prefect server" in out.stdout
    report = next(line for line in out.stdout.splitlines() if line.startswith("report: ")).removeprefix(
        "report: "
    )
    assert Path(report).is_file()


def test_round_on_s3_keeps_artifacts_and_task_results_in_the_bucket(s3_env, prefect_api):
    """A whole round with run.root on a real S3 endpoint (moto): data, model, report and Prefect's
    task results all in the bucket; the second run is served from those results."""
    import s3fs

    from flows.sao_round import sao_round

    # A short evaluation: at shard_size 2 the whole built-in set is some 300 shard tasks, each a few
    # requests to the store and Prefect's result storage, which is what this test times out on, not S3.
    overrides = [
        f"run.root={s3_env}/rounds",
        "personas.n=4",
        "run.shard_size=2",
        "evaluation.n=8",
        "evaluation.trust_n=8",
    ]
    state = sao_round(TINY, overrides, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["round_dir"].startswith(f"{s3_env}/rounds/tiny/round_001-")
    fs = s3fs.S3FileSystem()
    assert fs.exists(result["report"]) and fs.exists(f"{result['model']}/adapter/adapter_config.json")
    assert fs.ls(f"{s3_env}/rounds/_prefect_results")  # persisted task results, not on local disk
    again = sao_round(TINY, overrides, return_state=True)
    runs = task_runs(again.state_details.flow_run_id)
    assert runs["prompts-round-1"] == ["Cached"] and runs["train-round-1"] == ["Cached"]
