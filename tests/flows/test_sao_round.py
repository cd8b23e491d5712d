"""The Prefect round: task bodies with .fn(), and a few whole rounds against the test harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sao_core.errors import RoundQualityError
from tests.flows.conftest import task_runs

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
    assert ref["round_dir"].startswith(str(tmp_path)) and ref["config_url"].endswith("resolved_config.yaml")
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
    assert "**Persona:**" in sample.data and "**Verdict" in sample.data

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
    runs = task_runs(run_id)
    # The first generate call failed in the first prompts shard; its retry succeeded.
    assert runs["prompts-shard-00000"] == ["Completed"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        [shard] = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["prompts-shard-00000"])),
        )
        history = [s.name for s in client.read_task_run_states(shard.id)]
    assert "AwaitingRetry" in history and shard.run_count == 2


def test_quality_gate_stops_the_round_before_training(tmp_path, prefect_api):
    state, run_id = _round(tmp_path, "pairing.min_pairs=1000")
    assert state.is_failed()
    with pytest.raises(RoundQualityError, match=r"fewer than pairing\.min_pairs=1000"):
        state.result()
    runs = task_runs(run_id)
    assert runs["quality-gate-round-1"] == ["Failed"] and "train-round-1" not in runs


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

    overrides = [f"run.root={s3_env}/rounds", "personas.n=4", "run.shard_size=2"]
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
