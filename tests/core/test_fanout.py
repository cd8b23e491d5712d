"""Fan-out to GPU workers without a server: batches, what counts as missing, the fanout section.

The whole path on a real Prefect server and S3 endpoint is tests/cluster/test_fanout_cluster.py.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from sao_core.config import build_config
from sao_core.engines.provider import EngineProvider
from sao_core.errors import ConfigError, FanoutError, StorageError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import (
    hash_config,
    load_config,
    output_url,
    prepare_round,
    round_url,
    stage_settings_hash,
)
from tasks.fanout import missing_shards, split_batches

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    ("indices", "workers", "expected"),
    [
        ([0, 1, 2, 3, 4, 5], 3, [[0, 1], [2, 3], [4, 5]]),  # even
        ([0, 1, 2, 3, 4, 5, 6], 3, [[0, 1, 2], [3, 4], [5, 6]]),  # uneven: the first batches take one more
        ([4, 9], 5, [[4], [9]]),  # fewer shards than workers: one batch per shard
        ([], 4, []),  # nothing left to run
        ([1, 3, 5, 8], 2, [[1, 3], [5, 8]]),  # the still-missing shards of a retry, in order
        ([0, 1, 2], 1, [[0, 1, 2]]),
    ],
    ids=["even", "uneven", "fewer-shards-than-workers", "none", "gaps", "one-worker"],
)
def test_split_batches(indices, workers, expected):
    batches = split_batches(indices, workers)
    assert batches == expected
    assert [i for b in batches for i in b] == indices
    assert all(batches) and len(batches) <= workers


@pytest.fixture
def half_done_round(tmp_path):
    """A real round on disk: 4 persona shards, prompts shards 0 and 2 written by the fake engine."""
    cfg = load_config(TINY, [f"run.root={tmp_path}", "personas.n=16", "run.shard_size=4"])
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    engines = EngineProvider(cfg)
    for index in (0, 2):
        run_shard("prompts", cfg, round_dir, index, engines)
    assert engines.builds == 1  # one engine served both shards
    return cfg, round_dir


def test_missing_shards_are_those_without_a_finished_manifest(half_done_round):
    cfg, round_dir = half_done_round
    assert missing_shards("prompts", cfg, round_dir, [0, 1, 2, 3]) == [1, 3]
    assert missing_shards("prompts", cfg, round_dir, [0, 2]) == []
    assert missing_shards("prompts", cfg, round_dir, []) == []


def test_a_shard_that_does_not_verify_counts_as_missing(half_done_round):
    cfg, round_dir = half_done_round
    out = output_url(round_dir, "prompts")
    entry = shards.read_shard_manifest(out, 2)
    storage.write_text(storage.join(out, entry.file), "{}\n")  # the data no longer matches its sha256
    assert missing_shards("prompts", cfg, round_dir, [0, 1, 2, 3]) == [1, 2, 3]


def test_shards_made_with_other_stage_settings_count_as_missing(half_done_round):
    cfg, round_dir = half_done_round
    other = build_config(cfg.model_dump(mode="json"), ["prompts.max_tokens=32"])
    assert stage_settings_hash(other, "prompts") != stage_settings_hash(cfg, "prompts")
    assert missing_shards("prompts", other, round_dir, [0, 1, 2, 3]) == [0, 1, 2, 3]


def test_missing_shards_needs_a_finished_input_shard(half_done_round):
    cfg, round_dir = half_done_round
    with pytest.raises(StorageError, match="is not finished"):
        missing_shards("responses", cfg, round_dir, [0])  # prompts has no stage manifest yet


def test_fanout_section_defaults_and_limits():
    fan = build_config({}).fanout
    assert (fan.mode, fan.deployment, fan.workers, fan.max_attempts) == (
        "local",
        "sao-gpu-batch/gpu-batch",
        1,
        3,
    )
    with pytest.raises(ConfigError, match=r"'fanout\.workers'"):
        build_config({}, ["fanout.workers=0"])
    with pytest.raises(ConfigError, match=r"'fanout\.max_attempts'"):
        build_config({}, ["fanout.max_attempts=0"])
    with pytest.raises(ConfigError, match=r"'fanout\.mode'"):
        build_config({}, ["fanout.mode=ray"])
    with pytest.raises(ConfigError, match=r"'fanout\.deployment'"):
        build_config({}, ["fanout.deployment=gpu-batch"])  # needs flow/deployment
    with pytest.raises(ConfigError, match=r"did you mean 'fanout\.workers'"):
        build_config({}, ["fanout.worker=2"])


def test_replicas_needs_the_openai_engine():
    with pytest.raises(ConfigError, match=r"needs engine\.name 'openai', got 'fake'"):
        build_config({"engine": {"name": "fake"}}, ["fanout.mode=replicas"])
    cfg = build_config(
        {"engine": {"name": "openai", "base_urls": ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]}},
        ["fanout.mode=replicas", "evaluation.engine={name: vllm}"],
    )
    assert cfg.fanout.mode == "replicas"


def test_deployment_refuses_a_root_other_processes_cannot_see():
    with pytest.raises(ConfigError, match=r"cannot see run\.root 'memory://rounds'"):
        build_config({}, ["fanout.mode=deployment", "run.root=memory://rounds"])
    for root in ("s3://bucket/rounds", "/shared/rounds"):
        assert build_config({}, ["fanout.mode=deployment", f"run.root={root}"]).run.root == root


def test_hash_config_ignores_the_fanout_section():
    """Where the shards run is not what the round is: the same data, folder and cache keys."""
    local = load_config(TINY)
    fanned = load_config(
        TINY,
        [
            "fanout.mode=deployment",
            "fanout.workers=8",
            "fanout.max_attempts=5",
            "fanout.poll_interval_s=1",
            "fanout.batch_timeout_s=60",
        ],
    )
    assert fanned.fanout != local.fanout
    assert hash_config(fanned) == hash_config(local)
    assert round_url(fanned) == round_url(local)
    for stage in ("personas", "prompts", "responses", "judgements"):
        assert stage_settings_hash(fanned, stage) == stage_settings_hash(local, stage)
    # ...while a section the data depends on does change it.
    assert hash_config(load_config(TINY, ["prompts.max_tokens=32"])) != hash_config(local)


class FakeDeployment:
    """run_deployment and the wait for its runs, without a server: each submitted batch either runs
    its shards here (as a gpu-batch run would) or ends Crashed having written nothing."""

    def __init__(self, cfg, round_dir, crash_attempts=()):
        self.cfg, self.round_dir, self.crash_attempts = cfg, round_dir, set(crash_attempts)
        self.submitted: list[dict] = []
        self.engines = EngineProvider(cfg)

    def run_deployment(self, name, parameters, timeout, idempotency_key, flow_run_name, tags):
        assert timeout == 0 and name == self.cfg.fanout.deployment
        run_id = uuid.uuid4()
        self.submitted.append({**parameters, "id": run_id, "key": idempotency_key, "name": flow_run_name})
        return SimpleNamespace(id=run_id)

    def wait_for_runs(self, run_ids, timeout_s, poll_s, on_poll):
        states = {}
        for sub in (s for s in self.submitted if s["id"] in run_ids):
            if sub["attempt"] in self.crash_attempts:
                states[sub["id"]] = "CRASHED"
                continue
            for index in sub["shards"]:
                run_shard(sub["stage"], self.cfg, self.round_dir, index, self.engines)
            states[sub["id"]] = "COMPLETED"
        on_poll()
        return states


def _fan_out(monkeypatch, half_done_round, crash_attempts, *overrides):
    import tasks.fanout as fanout

    cfg, round_dir = half_done_round
    cfg = build_config(cfg.model_dump(mode="json"), ["fanout.workers=2", *overrides])
    fake = FakeDeployment(cfg, round_dir, crash_attempts)
    monkeypatch.setattr(fanout, "run_deployment", fake.run_deployment)
    monkeypatch.setattr(fanout, "_wait_for_runs", fake.wait_for_runs)
    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test-fanout"))
    ref = {
        "round_dir": round_dir,
        "config_url": storage.join(round_dir, "resolved_config.yaml"),
        "shard_timeout_s": 60.0,
        "round": 1,
    }
    progress: list[int] = []

    def call() -> list[dict]:
        return fanout.run_on_deployment(
            "prompts", cfg, ref, stage_settings_hash(cfg, "prompts"), 4, progress.append
        )

    return fake, progress, call


def test_run_on_deployment_sends_only_missing_shards_and_resubmits_a_crashed_batch(
    monkeypatch, half_done_round
):
    fake, progress, call = _fan_out(monkeypatch, half_done_round, crash_attempts={1})
    tries = call()
    assert [(s["attempt"], s["batch"], s["shards"]) for s in fake.submitted] == [
        (1, 0, [1]),  # shards 0 and 2 were finished: never sent
        (1, 1, [3]),
        (2, 0, [1]),
        (2, 1, [3]),
    ]
    assert len({s["key"] for s in fake.submitted}) == 4  # a fresh idempotency key per batch and try
    assert [s["name"] for s in fake.submitted][:2] == ["prompts-batch-00-try-1", "prompts-batch-01-try-1"]
    assert [[r["state"] for r in t["runs"]] for t in tries] == [["CRASHED", "CRASHED"], ["COMPLETED"] * 2]
    assert [r["missing"] for r in tries[0]["runs"]] == [[1], [3]]
    assert progress[0] == 2 and progress[-1] == 4
    assert missing_shards("prompts", fake.cfg, fake.submitted[0]["round_dir"], [0, 1, 2, 3]) == []
    assert fake.engines.builds == 1


def test_run_on_deployment_names_the_missing_shards_after_the_last_attempt(monkeypatch, half_done_round):
    fake, _, call = _fan_out(monkeypatch, half_done_round, {1, 2}, "fanout.max_attempts=2")
    with pytest.raises(FanoutError, match=r"prompts: shards \[1, 3\] are still missing after 2 attempt") as e:
        call()
    assert "try 2: batch 0 CRASHED, batch 1 CRASHED" in str(e.value)
    assert len(fake.submitted) == 4


def test_run_on_deployment_submits_nothing_when_every_shard_is_done(monkeypatch, half_done_round):
    cfg, round_dir = half_done_round
    for index in (1, 3):
        run_shard("prompts", cfg, round_dir, index, EngineProvider(cfg))
    fake, progress, call = _fan_out(monkeypatch, half_done_round, set())
    assert call() == [] and fake.submitted == [] and progress == [4]
