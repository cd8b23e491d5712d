"""A cached task counts only while what it wrote is there and verifies: delete the artifacts or corrupt a
shard, and the next run makes them again instead of failing on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.flows.conftest import task_runs

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
pytestmark = pytest.mark.tier1

STAGE_TASKS = ("personas", "prompts", "responses", "judgements", "pairs", "train", "evaluate")


def _round(root: Path, *overrides: str):
    from flows.sao_round import sao_round

    state = sao_round(TINY, [f"run.root={root}", *overrides], return_state=True)
    # Every stage task of the round, run or served from the cache, is in the returned map.
    expect = [f"{name}-round-1" for name in STAGE_TASKS]
    return state, task_runs(state.state_details.flow_run_id, expect=expect)


def test_stage_problem_names_a_missing_or_corrupted_stage(tmp_path):
    from sao_core.stages.no_model import run_personas
    from sao_core.store import storage
    from sao_core.store.layout import load_config, prepare_round, stage_url
    from sao_core.store.shards import stage_problem

    cfg = load_config(TINY, [f"run.root={tmp_path}"])
    round_dir = prepare_round(cfg)
    url = stage_url(round_dir, "personas")
    assert "has no manifest.json" in str(stage_problem(url))
    run_personas(cfg, round_dir)
    assert stage_problem(url) is None
    shard = storage.join(url, "part-00001.jsonl")
    storage.write_text(shard, storage.read_text(shard) + '{"persona": "slipped in"}\n')
    assert "does not match its manifest" in str(stage_problem(url))
    storage.remove(shard)
    assert "missing" in str(stage_problem(url))


def test_a_deleted_artifacts_folder_is_made_again(tmp_path, prefect_api):
    """`sao run`, delete the artifacts, `sao run` again: the cached tasks see their outputs gone and run."""
    art = tmp_path / "art"
    state, _ = _round(art)
    assert state.is_completed(), state
    shutil.rmtree(art)  # make clean

    state2, runs2 = _round(art)
    assert state2.is_completed(), state2
    for name in STAGE_TASKS:
        assert runs2[f"{name}-round-1"] == ["Completed"], (name, runs2[f"{name}-round-1"])
    assert runs2["responses-shard-00000"] == ["Completed"]  # shards are made again too
    result = state2.result()
    assert Path(result["report"]).is_file() and (Path(result["model"]) / "adapter").is_dir()

    # What the second run wrote is cached in its turn.
    state3, runs3 = _round(art)
    assert state3.is_completed(), state3
    for name in STAGE_TASKS:
        assert runs3[f"{name}-round-1"] == ["Cached"], (name, runs3[f"{name}-round-1"])


def test_a_corrupted_shard_redoes_that_shard_and_no_more(tmp_path, prefect_api):
    state, _ = _round(tmp_path)
    assert state.is_completed(), state
    round_dir = Path(state.result()["round_dir"])
    shard = round_dir / "responses" / "part-00001.jsonl"
    before = shard.read_bytes()
    shard.write_bytes(before[: len(before) // 2])  # torn by hand

    state2, runs2 = _round(tmp_path)
    assert state2.is_completed(), state2
    assert shard.read_bytes() == before  # the scripted engine writes the same shard again
    assert runs2["responses-round-1"] == ["Completed"]
    assert runs2["responses-shard-00001"] == ["Completed"]
    assert runs2["responses-shard-00000"] == ["Cached"]
    # Its content is what it was, so what reads it is served from the cache.
    for name in ("personas", "prompts", "judgements", "pairs", "train", "evaluate"):
        assert runs2[f"{name}-round-1"] == ["Cached"], (name, runs2[f"{name}-round-1"])


def test_a_deleted_model_folder_is_trained_again(tmp_path, prefect_api):
    state, _ = _round(tmp_path)
    assert state.is_completed(), state
    shutil.rmtree(state.result()["model"])

    state2, runs2 = _round(tmp_path)
    assert state2.is_completed(), state2
    assert runs2["pairs-round-1"] == ["Cached"]
    assert runs2["train-round-1"] == ["Completed"] and runs2["evaluate-round-1"] == ["Completed"]
    assert (Path(state2.result()["model"]) / "adapter" / "adapter_config.json").is_file()
