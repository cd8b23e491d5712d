"""Fan-out to GPU workers without a server: batches, what counts as missing, the fanout section.

The whole path on a real Prefect server and S3 endpoint is tests/cluster/test_fanout_cluster.py.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from sao_core.config import build_config
from sao_core.engines.provider import EngineProvider
from sao_core.errors import ConfigError, FanoutError, StorageError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import batch_steps, run_model_stage, run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import (
    hash_config,
    load_config,
    output_url,
    prepare_round,
    round_url,
    shard_target,
    stage_settings_hash,
)
from tasks.fanout import missing_shards, split_batches

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
# (try, batch, shards) of a fan-out over two workers whose first try crashes: every shard sent twice.
EVERY_SHARD_TWICE = [(1, 0, [0, 1]), (1, 1, [2, 3]), (2, 0, [0, 1]), (2, 1, [2, 3])]


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
    """The gpu-batch runs without a server (tasks.fanout.DeploymentRuns' interface): each submitted batch
    runs its shards here (through its chain in batch_steps' order, as a gpu-batch run does) when its state is
    first read, or ends Crashed having written nothing. A batch in `slow` stays running for `slow_polls`
    reads of its state. `reads_while_running` counts the shard bytes the fan-out itself read between the
    first submission and the last run's end (what polling costs)."""

    def __init__(self, cfg, round_dir, crash_attempts=(), slow=(), slow_polls=0):
        self.cfg, self.round_dir, self.crash_attempts = cfg, round_dir, set(crash_attempts)
        self.slow, self.slow_polls = set(slow), slow_polls
        self.submitted: list[dict] = []
        self.engines = EngineProvider(cfg)
        self.reads = 0  # state reads so far: the fan-out's clock
        self.states: dict[uuid.UUID, str] = {}
        self.ended_at: dict[uuid.UUID, int] = {}
        self.busy = False
        self.reads_while_running = 0
        self.steps: list[tuple[int, str, int | None]] = []  # (batch, stage, shard or None: whole stage)

    def submit(self, deployment, parameters, key, name, tags):
        assert deployment == self.cfg.fanout.deployment
        run_id = uuid.uuid4()
        self.submitted.append(
            {**parameters, "id": run_id, "key": key, "name": name, "at": self.reads, "tags": tags}
        )
        return run_id

    def final_state(self, run_id):
        self.reads += 1
        if run_id in self.states:
            return self.states[run_id]
        sub = next(s for s in self.submitted if s["id"] == run_id)
        if sub["batch"] in self.slow and self.reads < self.slow_polls:
            return None
        self.busy = True
        try:
            if sub["attempt"] in self.crash_attempts:
                state = "CRASHED"
            else:
                hashes = sub.get("settings_hashes") or {sub["stage"]: sub["settings_hash"]}
                chain = sub.get("stages") or [sub["stage"]]
                cfg = build_config(self.cfg.model_dump(mode="json"))
                assert all(stage_settings_hash(cfg, stage) == hashes[stage] for stage in chain)
                for stage, index in batch_steps(chain, sub["shards"]):  # flows/gpu_batch.py's order
                    self.steps.append((sub["batch"], stage, index))
                    if index is None:
                        run_model_stage(stage, self.cfg, self.round_dir, self.engines)
                    else:
                        run_shard(stage, self.cfg, self.round_dir, index, self.engines)
                state = "COMPLETED"
        finally:
            self.busy = False
        self.states[run_id] = state
        self.ended_at[run_id] = self.reads
        return state

    def stop(self, run_id):
        self.states[run_id] = "CANCELLED"

    def running(self) -> bool:
        return bool(self.submitted) and len(self.states) < len(self.submitted)


def _fan_out(monkeypatch, half_done_round, crash_attempts, *overrides, stage="prompts", then=(), **fake_kw):
    import contextlib

    import tasks.fanout as fanout

    cfg, round_dir = half_done_round
    cfg = build_config(
        cfg.model_dump(mode="json"), ["fanout.workers=2", "fanout.poll_interval_s=0.001", *overrides]
    )
    fake = FakeDeployment(cfg, round_dir, crash_attempts, **fake_kw)
    monkeypatch.setattr(fanout, "open_runs", lambda: contextlib.nullcontext(fake))
    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test-fanout"))
    read_bytes = shards.read_bytes

    def counted(url):
        data = read_bytes(url)
        if fake.running() and not fake.busy:
            fake.reads_while_running += len(data)
        return data

    monkeypatch.setattr(shards, "read_bytes", counted)
    ref = {
        "round_dir": round_dir,
        "config_url": storage.join(round_dir, "resolved_config.yaml"),
        "shard_timeout_s": 60.0,
        "round": 1,
    }
    progress: list[int] = []

    def call(on_progress=None) -> list[dict]:
        return fanout.run_on_deployment(
            stage, cfg, ref, stage_settings_hash(cfg, stage), 4, on_progress or progress.append, then=then
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
    assert all("stages" not in s for s in fake.submitted)  # one stage: the parameters of before
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


def test_a_crashed_batch_is_resubmitted_while_the_slowest_still_runs(monkeypatch, half_done_round):
    # Batch 1 runs for many polls; batch 0 crashes at once: its retry must not wait for batch 1.
    fake, _, call = _fan_out(monkeypatch, half_done_round, {1}, slow={1}, slow_polls=40)
    fake.crash_attempts = set()
    crash_first = {"done": False}
    final_state = fake.final_state

    def crash_batch_zero_once(run_id):
        sub = next(s for s in fake.submitted if s["id"] == run_id)
        if sub["batch"] == 0 and not crash_first["done"]:
            crash_first["done"] = True
            fake.reads += 1
            fake.states[run_id], fake.ended_at[run_id] = "CRASHED", fake.reads
            return "CRASHED"
        return final_state(run_id)

    fake.final_state = crash_batch_zero_once
    call()
    (first0, first1, retry0) = fake.submitted
    assert (retry0["batch"], retry0["attempt"], retry0["shards"]) == (0, 2, [1])
    # Resubmitted within the poll that saw the crash (each poll reads both runs' states) ...
    assert retry0["at"] - fake.ended_at[first0["id"]] <= 2
    # ... long before the slow batch ended.
    assert retry0["at"] < fake.ended_at[first1["id"]] - 20
    assert missing_shards("prompts", fake.cfg, first0["round_dir"], [0, 1, 2, 3]) == []


def test_polling_reads_listings_not_shards(monkeypatch, half_done_round):
    fake, progress, call = _fan_out(monkeypatch, half_done_round, set(), slow={0, 1}, slow_polls=30)
    call()
    assert fake.reads >= 30  # many polls ...
    assert fake.reads_while_running == 0  # ... and not one shard byte read by them
    assert progress[-1] == 4


def test_a_store_or_api_error_inside_a_poll_is_retried_not_fatal(monkeypatch, half_done_round):
    import tasks.fanout as fanout
    from sao_core.errors import TransientStorageError

    fake, _, call = _fan_out(monkeypatch, half_done_round, set(), slow={0}, slow_polls=6)
    list_files = storage.list_files
    failures = {"list": 2, "state": 2}

    def flaky_list(url, pattern="*"):
        if failures["list"] and "_shards" in url:
            failures["list"] -= 1
            raise TransientStorageError(f"{url}: the store did not answer")
        return list_files(url, pattern)

    final_state = fake.final_state

    def flaky_state(run_id):
        if failures["state"]:
            failures["state"] -= 1
            raise ConnectionError("the API did not answer")
        return final_state(run_id)

    monkeypatch.setattr(fanout.storage, "list_files", flaky_list)
    fake.final_state = flaky_state
    tries = call()
    assert failures == {"list": 0, "state": 0}
    assert [[r["state"] for r in t["runs"]] for t in tries] == [["COMPLETED", "COMPLETED"]]
    assert len(fake.submitted) == 2  # nothing resubmitted for an unanswered poll


def test_an_api_outage_fails_the_stage_though_the_store_answers(monkeypatch, half_done_round):

    fake, _, call = _fan_out(monkeypatch, half_done_round, set(), "fanout.outage_s=0.05")

    def down(run_id):
        raise ConnectionError("the API did not answer")

    fake.final_state = down
    with pytest.raises(FanoutError, match=r"prompts: reading flow run .* the api has not answered for"):
        call()


def test_a_failing_progress_bar_does_not_fail_the_stage(monkeypatch, half_done_round):
    """The progress artifact is best effort: it failing every time leaves the stage to finish."""
    _, _, call = _fan_out(monkeypatch, half_done_round, set())
    updates: list[int] = []

    def broken_progress(done: int) -> None:
        updates.append(done)
        raise ConnectionError("the artifact endpoint did not answer")

    tries = call(broken_progress)
    assert [[r["state"] for r in t["runs"]] for t in tries] == [["COMPLETED", "COMPLETED"]]
    assert updates[0] == 2 and updates[-1] == 4  # tried at the start and after the stage


def test_the_progress_artifact_is_written_only_when_the_count_moves(monkeypatch):
    """A fan-out reports the count on every poll (every second in the benchmark); the artifact is
    written when the count moves, and a write that failed is made again on the next report."""
    from tasks import shards as shard_tasks

    writes: list[tuple[str, float]] = []
    refuse = [False]

    def create(value: float, key: str, description: str) -> uuid.UUID:
        writes.append(("create", value))
        return uuid.uuid4()

    def update(artifact: uuid.UUID, value: float) -> None:
        if refuse[0]:
            raise ConnectionError("the artifact endpoint did not answer")
        writes.append(("update", value))

    monkeypatch.setattr(shard_tasks, "create_progress_artifact", create)
    monkeypatch.setattr(shard_tasks, "update_progress_artifact", update)
    progress = shard_tasks.Progress("tiny", "responses", 4)
    for done in (0, 0, 1, 1, 1, 2):
        progress.update(done)
    refuse[0] = True
    with pytest.raises(ConnectionError):
        progress.update(3)
    refuse[0] = False
    for done in (3, 3, 4):
        progress.update(done)
    assert writes == [
        ("create", 0.0),
        ("update", 25.0),
        ("update", 50.0),
        ("update", 75.0),
        ("update", 100.0),
    ]


def test_a_progress_bar_that_answers_does_not_hide_an_outage_of_the_run_reads(monkeypatch, half_done_round):
    """A progress update answering between two failed flow-run reads does not reset the outage clock
    (it once did: on CI the stage then polled an API that never answered until the test timed out)."""
    import types

    import tasks.fanout as fanout

    fake, progress, call = _fan_out(monkeypatch, half_done_round, set(), "fanout.outage_s=5")
    clock = [0.0]  # each failed read takes one second of this clock
    clock_time = types.ModuleType("clock_time")
    clock_time.__dict__.update(vars(time), monotonic=lambda: clock[0])
    monkeypatch.setattr(fanout, "time", clock_time)
    reads: list[float] = []

    def down(run_id):
        reads.append(clock[0])
        if len(reads) > 40:
            pytest.fail("40 failed reads over 40 s of outage and the stage still polls")
        clock[0] += 1.0
        raise ConnectionError("the API did not answer")

    fake.final_state = down
    with pytest.raises(FanoutError, match=r"the api has not answered for 5 s"):
        call()
    assert len(reads) == 6 and len(progress) >= 3  # progress answered on every poll in between


def test_a_resubmission_the_api_refuses_is_tried_again_next_poll(monkeypatch, half_done_round):
    fake, _, call = _fan_out(monkeypatch, half_done_round, {1})
    submit, refused = fake.submit, []

    def flaky_submit(deployment, parameters, key, name, tags):
        if parameters["attempt"] == 2 and not refused:
            refused.append(name)
            raise ConnectionError("the API did not answer")
        return submit(deployment, parameters, key, name, tags)

    fake.submit = flaky_submit
    tries = call()
    assert refused == ["prompts-batch-00-try-2"]
    assert [(s["attempt"], s["batch"]) for s in fake.submitted] == [(1, 0), (1, 1), (2, 1), (2, 0)]
    assert [sorted(r["state"] for r in t["runs"]) for t in tries] == [["CRASHED"] * 2, ["COMPLETED"] * 2]


def test_responses_and_judgements_run_on_one_load_per_batch(monkeypatch, half_done_round):
    cfg, round_dir = half_done_round
    engines = EngineProvider(cfg)
    for index in (1, 3):
        run_shard("prompts", cfg, round_dir, index, engines)
    from sao_core.stages.runner import finalize_stage

    finalize_stage("prompts", cfg, round_dir)
    judge_hash = stage_settings_hash(cfg, "judgements")
    fake, _, call = _fan_out(
        monkeypatch, half_done_round, {1}, stage="responses", then=[("judgements", judge_hash)]
    )
    tries = call()
    assert [(s["attempt"], s["batch"], s["shards"]) for s in fake.submitted] == EVERY_SHARD_TWICE
    assert all(s["stages"] == ["responses", "judgements"] for s in fake.submitted)
    assert all(s["settings_hashes"]["judgements"] == judge_hash for s in fake.submitted)
    assert [r["state"] for r in tries[-1]["runs"]] == ["COMPLETED"] * 2
    assert missing_shards("judgements", fake.cfg, round_dir, [0, 1, 2, 3]) == []
    assert fake.engines.builds == 1  # one engine wrote responses and judgements
    # The judgements stage then finds every shard done and submits nothing.
    fake2, _, judge = _fan_out(monkeypatch, half_done_round, set(), stage="judgements")
    assert judge() == [] and fake2.submitted == []


@pytest.mark.parametrize(
    ("chain", "indices", "expected"),
    [
        (["prompts"], [2, 3], [("prompts", 2), ("prompts", 3)]),
        (
            ["responses", "judgements"],
            [0, 1],
            [("responses", 0), ("judgements", 0), ("responses", 1), ("judgements", 1)],
        ),
        (  # the duplicate pass needs every batch's prompts: the whole stage before the responses
            ["prompts", "responses", "judgements"],
            [2, 3],
            [
                ("prompts", 2),
                ("prompts", 3),
                ("prompts", None),
                ("responses", 2),
                ("judgements", 2),
                ("responses", 3),
                ("judgements", 3),
            ],
        ),
        (["prompts", "responses"], [], [("prompts", None)]),
    ],
)
def test_batch_steps(chain, indices, expected):
    assert batch_steps(chain, indices) == expected


def test_a_shard_whose_input_is_not_finished_is_missing(half_done_round):
    """The responses of prompts not yet through the duplicate pass cannot have been made: missing, not
    an error (a chain from the prompts is checked before the pass has run). Where a shard must go still
    needs its input."""
    cfg, round_dir = half_done_round
    assert missing_shards("responses", cfg, round_dir, [0, 1, 2, 3]) == [0, 1, 2, 3]
    with pytest.raises(StorageError, match="is not finished"):
        shard_target("responses", cfg, round_dir, 0)  # prompts has no stage manifest yet


def test_a_prompts_batch_goes_on_to_the_responses_and_judgements_on_its_engine(monkeypatch, half_done_round):
    """The round's prompts stage sends its batches through the whole data path: each batch's prompts, the
    whole prompts stage (a shard no batch holds is run by whichever batch reaches it, then the duplicate
    pass), then its responses and judgements; the later stages then submit nothing."""
    from tasks.shards import _then

    cfg, round_dir = half_done_round
    hashes = {s: stage_settings_hash(cfg, s) for s in ("prompts", "responses", "judgements")}
    then = _then("prompts", {"settings": hashes})
    assert then == [("responses", hashes["responses"]), ("judgements", hashes["judgements"])]
    assert _then("prompts", {"settings": {"prompts": hashes["prompts"]}}) == []  # no responses: no chain
    fake, progress, call = _fan_out(monkeypatch, half_done_round, {1}, then=then)
    tries = call()
    # Prompts 0 and 2 were done, but no shard had its responses: every shard is sent; the first try
    # crashes, the second completes.
    assert [(s["attempt"], s["batch"], s["shards"]) for s in fake.submitted] == EVERY_SHARD_TWICE
    assert all(s["stages"] == ["prompts", "responses", "judgements"] for s in fake.submitted)
    assert all(s["settings_hashes"] == hashes for s in fake.submitted)
    assert [r["state"] for r in tries[-1]["runs"]] == ["COMPLETED"] * 2
    # Batch 0 reached prompts shard 3 first (nobody held it) and ran it in its whole-stage step; batch 1
    # then found its prompts done and the pass written.
    assert fake.steps[:3] == [(0, "prompts", 0), (0, "prompts", 1), (0, "prompts", None)]
    assert storage.exists(storage.join(round_dir, "prompts", "manifest.json"))
    assert missing_shards("judgements", fake.cfg, round_dir, [0, 1, 2, 3]) == []
    assert progress[-1] == 4
    assert fake.engines.builds == 1
    for stage, after in (("responses", [("judgements", hashes["judgements"])]), ("judgements", [])):
        fake2, _, later = _fan_out(monkeypatch, half_done_round, set(), stage=stage, then=after)
        assert later() == [] and fake2.submitted == [], stage


def test_sao_deploy_leaves_the_project_folder_to_the_workers(monkeypatch, tmp_path):
    """prefect.yaml's pull step names {{ $SAO_PROJECT_DIR }}; `prefect deploy` would substitute this
    shell's value, so `sao deploy` runs it without one and each worker resolves its own."""
    import subprocess

    import flows.deploy as deploy

    seen = {}

    def fake_run(cmd, cwd, capture_output, text, env, timeout):
        seen["env"] = env
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setenv("SAO_PROJECT_DIR", str(tmp_path / "deployer"))
    monkeypatch.setattr(deploy.subprocess, "run", fake_run)
    deploy.deploy_all(tmp_path)
    assert "SAO_PROJECT_DIR" not in seen["env"]
    assert seen["env"]["PATH"] == os.environ["PATH"]  # the rest of the shell is passed on
    pull = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())["pull"]
    assert pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SAO_PROJECT_DIR }}"}}
    ]
