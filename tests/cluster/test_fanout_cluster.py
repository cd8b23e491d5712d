"""Shards fanned out to GPU workers on a real cluster: PostgreSQL, `prefect server`, `sao deploy`,
process workers and an S3 endpoint, all on 127.0.0.1 (tests/cluster/conftest.py).

    .venv/bin/python -m pytest -q tests/cluster -x -s

Rounds are triggered through the REST API, as the UI's run form does, with `fanout.mode=deployment`
and two gpu-batch workers; the fake engine of configs/tiny.yaml writes the data, the tiny model trains.
What is checked:
- a round completes with each model stage split over both workers, one engine build per batch run,
  every shard exactly once, manifests, report and artifacts in the bucket and the API;
- a batch run killed mid-shard ends Crashed (its worker reports it), its missing shards are
  resubmitted (try 2) and the round completes, with the shards finished before the kill left as
  they were;
- a batch run whose process stops without exiting (a lost node) is marked Crashed by the heartbeat
  automation of `sao deploy`, and the same follows;
- a round with `training.deployment` trains as a flow run of sao-train/train on the sao-train
  worker, waits for it, and reports the model that run wrote to the bucket;
- a round with fan-out and `training.deployment` runs its evaluation's answers and verdicts and its
  downstream lm-eval as gpu-batch runs too, and its own process imports no model library and opens no
  weight file (an audit hook in its job's environment says so);
- two rounds triggered at once run one after the other (the deployment's ENQUEUE limit);
- the nightly schedule is the one `sao deploy` set in its variables, and a second `sao deploy`
  changes nothing that was there.

About 5 minutes on 2 idle cores (7 under load): one cluster for the module, small rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psutil
import pytest

from sao_core.store import shards, storage
from sao_core.store.layout import (
    MODEL_STAGES,
    downstream_url,
    evaluation_url,
    load_config,
    output_url,
    round_url,
    stage_url,
)
from sao_core.training import default_output_url
from tests.cluster.harness import (
    CRON,
    FINAL,
    GPU_WORKERS,
    HEARTBEAT_GRACE_S,
    REPO,
    ROUND_DEPLOYMENT,
    TIMEZONE,
    TRAIN_WORKER,
    Cluster,
    kill_process,
    run_sao_deploy,
    state_type,
    worker_children,
)
from tests.round_checks import check_round_by_ids

pytestmark = pytest.mark.tier1

TINY = str(REPO / "configs" / "tiny.yaml")
TRAIN_DEPLOYMENT = "sao-train/train"  # prefect.yaml: flow sao-train, deployment train
ROUND_TIMEOUT_S = 600.0
AUTOMATION = "sao-crash-runs-without-heartbeats"


# --- the API --------------------------------------------------------------------------------------


def when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def state_names(cluster: Cluster, run_id: str) -> list[str]:
    return [s["name"] for s in cluster.get(f"/flow_run_states/?flow_run_id={run_id}")]


def batch_runs(cluster: Cluster, round_dir: str, stage: str) -> list[dict[str, Any]]:
    """The gpu-batch flow runs a round submitted for one stage (all tries)."""
    runs = cluster.post(
        "/flow_runs/filter", {"flow_runs": {"name": {"like_": f"{stage}-batch-"}}, "limit": 200}
    )
    return [r for r in runs if (r.get("parameters") or {}).get("round_dir") == round_dir]


def task_run_names(cluster: Cluster, flow_run_ids: list[str]) -> list[str]:
    runs = cluster.post("/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200})
    return [r["name"] for r in runs]


def artifacts_of(cluster: Cluster, flow_run_ids: list[str]) -> list[dict[str, Any]]:
    return cluster.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200}
    )


# --- the bucket -----------------------------------------------------------------------------------


def fresh_fs() -> Any:
    """s3fs with no cached listings: other processes write the bucket while this one reads it."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


def round_dir_of(overrides: list[str]) -> str:
    return round_url(load_config(TINY, overrides))


def overrides_for(cluster: Cluster, name: str, *extra: str) -> list[str]:
    return [
        f"run.root={cluster.bucket}/{name}",
        "fanout.mode=deployment",
        "fanout.workers=2",
        "fanout.poll_interval_s=1",
        "personas.n=16",
        "run.shard_size=4",
        "evaluation.enabled=false",
        *extra,
    ]


def batch_records(round_dir: str, stage: str) -> list[dict[str, Any]]:
    fresh_fs()
    return [
        storage.read_json(url)
        for url in storage.list_files(storage.join(round_dir, "_batches", stage), "*.json")
    ]


def check_shards_exactly_once(round_dir: str) -> dict[str, int]:
    """The round in the bucket, id by id (tests/round_checks.py), its report and manifest written.
    Returns the rows kept per stage."""
    fresh_fs()
    kept_rows = check_round_by_ids(round_dir)
    assert storage.exists(storage.join(round_dir, "report.md"))
    assert storage.exists(storage.join(round_dir, "manifest.json"))
    return kept_rows


def check_workers_ran(cluster: Cluster, runs: list[dict[str, Any]]) -> set[str]:
    """Which gpu-batch workers (by their logs) submitted these flow runs."""
    names = set()
    for name in GPU_WORKERS:
        log = cluster.worker_log(name)
        if any(f"submitting flow run '{r['id']}'" in log for r in runs):
            names.add(name)
    return names


# --- the scenarios --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_runs_left_behind(cluster: Cluster) -> Iterator[None]:
    """A scenario that failed half-way leaves no round holding the deployment's slot for the next."""
    yield
    cluster.cancel_unfinished_runs()


def test_nightly_schedule_is_the_one_sao_deploy_set(cluster: Cluster):
    started = time.monotonic()
    assert "pool sao-gpu-batch (process) created" in cluster.deploy_output, cluster.deploy_output
    cron = cluster.get("/variables/name/sao_nightly_cron")["value"]
    timezone = cluster.get("/variables/name/sao_nightly_timezone")["value"]
    assert (cron, timezone) == (CRON, TIMEZONE)
    deployment = cluster.get(f"/deployments/name/{ROUND_DEPLOYMENT}")
    [schedule] = deployment["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == cron and schedule["schedule"]["timezone"] == timezone
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    pools = {
        ROUND_DEPLOYMENT: "sao-cpu",
        "sao-gpu-batch/gpu-batch": "sao-gpu-batch",
        TRAIN_DEPLOYMENT: "sao-train",
    }
    for name, pool in pools.items():
        found = cluster.get(f"/deployments/name/{name}")
        assert found["work_pool_name"] == pool
        line = f"Deployment '{name}' successfully created with id '{found['id']}'."
        assert line in cluster.deploy_output.splitlines(), cluster.deploy_output
    [automation] = cluster.post("/automations/filter")
    assert automation["name"] == AUTOMATION and automation["enabled"] is True
    assert automation["trigger"]["posture"] == "Proactive"
    assert automation["trigger"]["within"] == HEARTBEAT_GRACE_S
    assert [a["type"] for a in automation["actions"]] == ["change-flow-run-state"]

    # `sao deploy` again, without --cron: the variables are kept, the pools updated, the automation
    # replaced (not doubled), the schedule unchanged.
    again = run_sao_deploy(cluster.env, "--heartbeat-grace-s", str(HEARTBEAT_GRACE_S))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for line in (
        f"variable sao_nightly_cron kept ({CRON!r})",
        f"variable sao_nightly_timezone kept ({TIMEZONE!r})",
        "pool sao-cpu (process) updated",
        "pool sao-gpu-batch (process) updated",
        "pool sao-train (process) updated",
    ):
        assert line in again.stdout.splitlines(), again.stdout
    assert [a["name"] for a in cluster.post("/automations/filter")] == [AUTOMATION]
    redeployed = cluster.get(f"/deployments/name/{ROUND_DEPLOYMENT}")
    assert redeployed["id"] == deployment["id"]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in redeployed["schedules"]] == [
        (CRON, TIMEZONE)
    ]
    print(f"\nschedule and redeploy: {time.monotonic() - started:.1f} s", flush=True)


def test_deployments_leave_the_project_folder_to_each_worker(cluster: Cluster):
    """`sao deploy` ran without SAO_PROJECT_DIR, so every deployment keeps prefect.yaml's pull step as a
    template that each worker resolves to its own folder (the runs' project_dir is checked below)."""
    assert cluster.project_dir != REPO
    for name in (ROUND_DEPLOYMENT, "sao-gpu-batch/gpu-batch", TRAIN_DEPLOYMENT):
        deployment = cluster.get(f"/deployments/name/{name}")
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SAO_PROJECT_DIR }}"}}
        ], (name, deployment["pull_steps"])
        assert str(REPO) not in json.dumps(deployment), name


def test_round_fans_model_stages_out_to_both_gpu_workers(cluster: Cluster):
    started = time.monotonic()
    overrides = overrides_for(cluster, "rounds-fanout")
    round_dir = round_dir_of(overrides)
    run_id = cluster.trigger_round(TINY, overrides)
    run = cluster.wait_final(run_id, ROUND_TIMEOUT_S)
    assert state_type(run) == "COMPLETED", f"{run['state']}\n{cluster.log_tails()}"

    all_batch_ids = []
    # tasks/fanout.py tags each batch run with its round folder (a round number repeats across campaigns).
    round_tag = f"sao-round-dir:{round_dir.rstrip('/').rsplit('/', 1)[-1]}"
    # The responses and judgements ran on the prompts' batch runs, on the engine that wrote the prompts
    # (tasks/shards.SAME_ENGINE_NEXT): no batch run of their own, one model load for the data path.
    for later in ("responses", "judgements"):
        assert batch_runs(cluster, round_dir, later) == []
        assert batch_records(round_dir, later) == []
    chains = {"prompts": ["prompts", "responses", "judgements"]}
    for stage, chain in chains.items():
        runs = batch_runs(cluster, round_dir, stage)
        assert sorted(r["name"] for r in runs) == [f"{stage}-batch-00-try-1", f"{stage}-batch-01-try-1"]
        tags = [set(r["tags"]) for r in runs]
        assert all({round_tag, f"sao-stage:{stage}"} <= t for t in tags), tags
        assert all(state_type(r) == "COMPLETED" for r in runs), [(r["name"], r["state"]) for r in runs]
        all_batch_ids += [r["id"] for r in runs]
        assert check_workers_ran(cluster, runs) == set(GPU_WORKERS), f"{stage}: not on both workers"
        records = batch_records(round_dir, stage)
        assert sorted(r["flow_run_id"] for r in records) == sorted(r["id"] for r in runs)
        assert len({r["pid"] for r in records}) == 2, records
        assert all(r["engine_builds"] == 1 for r in records if r["shards"]), records
        assert all(r["stages"] == chain for r in records), records
        assert all(sorted(r["rows_out_by_stage"]) == sorted(chain) for r in records), records
        # Each run worked in the workers' project folder (their SAO_PROJECT_DIR), not the deployer's.
        assert {r["project_dir"] for r in records} == {str(cluster.project_dir.resolve())}, records
        shards = sorted(i for r in records for i in r["shards"])
        assert shards == [0, 1, 2, 3], f"{stage}: each of the 4 shards in exactly one batch: {shards}"

    kept = check_shards_exactly_once(round_dir)
    assert kept["judgements"] == 16, kept

    keys = {(a["key"], a["type"]) for a in artifacts_of(cluster, [run_id])}
    for stage in ("personas", *MODEL_STAGES, "pairs"):
        assert (f"tiny-{stage}-counts", "table") in keys, (stage, keys)
    assert ("tiny-round-report", "markdown") in keys
    batch_keys = {a["key"] for a in artifacts_of(cluster, all_batch_ids)}
    assert {f"{s}-batch-{b:02d}" for s in chains for b in (0, 1)} <= batch_keys, batch_keys
    print(f"\nfan-out round: {time.monotonic() - started:.1f} s", flush=True)


def test_a_round_trains_on_the_train_deployment(cluster: Cluster):
    """training.deployment: the round's train task runs flows/train.py as a flow run of sao-train/train,
    which the sao-train worker picks up; the round waits for it and reports the model it wrote."""
    started = time.monotonic()
    overrides = [
        f"run.root={cluster.bucket}/rounds-train",
        f"training.deployment={TRAIN_DEPLOYMENT}",
        # The round deployment continues the campaign, whose rounds merge LoRA (tasks/campaign.py):
        # said here too, so the model folder computed below is the one the round writes.
        "training.merge=true",
        "personas.n=4",
        "run.shard_size=2",
        "evaluation.enabled=false",
    ]
    cfg = load_config(TINY, overrides)
    round_dir, model_url = round_url(cfg), default_output_url(cfg)
    run_id = cluster.trigger_round(TINY, overrides)
    run = cluster.wait_final(run_id, ROUND_TIMEOUT_S)
    assert state_type(run) == "COMPLETED", f"{run['state']}\n{cluster.log_tails()}"

    # One flow run of the train deployment, for this round's model folder, completed, on sao-train.
    deployment = cluster.get(f"/deployments/name/{TRAIN_DEPLOYMENT}")
    runs = cluster.post(
        "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 50}
    )
    [train] = [r for r in runs if (r.get("parameters") or {}).get("output_url") == model_url]
    assert state_type(train) == "COMPLETED", train["state"]
    params = train["parameters"]
    assert (params["pairs_url"], params["output_url"]) == (stage_url(round_dir, "pairs"), model_url), params
    # The run's own config file under the round (store.layout.run_config_url), not the shared record.
    assert params["config_url"].startswith(storage.join(round_dir, "configs") + "/"), params
    assert load_config(params["config_url"]).training.deployment == TRAIN_DEPLOYMENT
    assert (train["name"], train["work_pool_name"]) == ("train", "sao-train")
    assert f"submitting flow run '{train['id']}'" in cluster.worker_log(TRAIN_WORKER)
    assert train["id"] not in cluster.worker_log("cpu")
    # A child of the round's train task, which waited for it; the training itself ran in the child.
    parent = cluster.get(f"/task_runs/{train['parent_task_run_id']}")
    assert parent["flow_run_id"] == run_id, parent
    assert task_run_names(cluster, [train["id"]]) == ["train-model"]
    round_tasks = task_run_names(cluster, [run_id])
    assert "train-round-1" in round_tasks and "train-model" not in round_tasks, round_tasks
    assert when(train["end_time"]) <= when(run["end_time"])

    # The model folder and its manifest are in the bucket.
    fresh_fs()
    manifest = storage.read_json(storage.join(model_url, "manifest.json"))
    assert manifest["complete"] is True and manifest["steps"] == cfg.training.max_steps, manifest
    adapter = storage.join(model_url, manifest["adapter"])
    assert storage.exists(storage.join(adapter, "adapter_config.json"))
    assert storage.list_files(adapter, "*.safetensors"), adapter

    # The round's training result points at it: the train task's link and figures, and the report.
    artifacts = {a["key"]: a for a in artifacts_of(cluster, [run_id])}
    assert model_url in str(artifacts["tiny-model"]["data"]), artifacts["tiny-model"]
    figures = {row["metric"]: row["value"] for row in json.loads(artifacts["tiny-train"]["data"])}
    assert (figures["steps"], figures["rows"]) == (manifest["steps"], manifest["rows"]), figures
    assert model_url in storage.read_text(storage.join(round_dir, "report.md"))
    print(f"\nround trained on {TRAIN_DEPLOYMENT}: {time.monotonic() - started:.1f} s", flush=True)


@dataclass
class Frozen:
    """A batch run's process stopped (SIGSTOP) between two of its shards."""

    stage: str  # the batch runs' stage
    watched: str  # the stage whose manifests showed the run mid-batch: the last of its chain
    run_id: str
    pid: int
    shards: list[int]
    done_before: dict[int, tuple[bytes, Any]]  # shard -> its manifest's bytes and LastModified

    process: Any  # psutil.Process: a kill never reaches another process given the same PID

    def kill(self) -> None:
        kill_process(self.process)


def freeze_batch_mid_stage(
    cluster: Cluster, round_dir: str, stage: str, watched: str, timeout_s: float = 300.0
) -> Frozen | None:
    """Stop the process of `stage`'s first batch once some of its shards are written and not all.

    SIGSTOP as soon as one manifest of the batch shows up, then what it finished is read while it
    cannot write more. None when it finished them all first (it is then let go on).
    """
    deadline = time.monotonic() + timeout_s
    name = f"{stage}-batch-00-try-1"
    run = None
    while time.monotonic() < deadline:
        found = [r for r in batch_runs(cluster, round_dir, stage) if r["name"] == name]
        if found and state_type(found[0]) == "RUNNING" and found[0].get("infrastructure_pid"):
            run = found[0]
            break
        if found and state_type(found[0]) in FINAL:
            return None
        time.sleep(0.2)
    assert run is not None, f"no running {name} after {timeout_s} s\n{cluster.log_tails()}"
    pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])
    process = next((p for n in GPU_WORKERS for p in worker_children(cluster, n) if p.pid == pid), None)
    if process is None:
        # Gone already (the batch finished), or not the process a worker started.
        assert state_type(cluster.read_run(run["id"])) in FINAL, f"pid {pid} of {name} is no worker's child"
        return None
    batch_shards = list(run["parameters"]["shards"])
    manifests = {i: shards.shard_manifest_url(output_url(round_dir, watched), i) for i in batch_shards}

    def written() -> list[int]:
        fs = fresh_fs()
        return [i for i, url in manifests.items() if fs.exists(url)]

    while time.monotonic() < deadline:
        if written():
            try:
                process.suspend()  # SIGSTOP
            except psutil.NoSuchProcess:
                return None  # the whole batch was done before it could be stopped
            break
        if state_type(cluster.read_run(run["id"])) in FINAL:
            return None
        time.sleep(0.05)
    done = written()
    if len(done) == len(batch_shards):
        process.resume()
        return None
    fs = fresh_fs()
    before = {i: (fs.cat_file(manifests[i]), fs.info(manifests[i])["LastModified"]) for i in done}
    return Frozen(stage, watched, run["id"], pid, batch_shards, before, process)


def freeze_a_batch(cluster: Cluster, round_dir: str) -> Frozen:
    # A prompts batch writes its prompts, waits for the duplicate pass, then writes each shard's responses
    # and its judgements: a shard is whole once its judgement is written (tasks/shards.SAME_ENGINE_NEXT).
    frozen = freeze_batch_mid_stage(cluster, round_dir, "prompts", "judgements")
    if frozen is None:
        raise AssertionError("no batch run could be caught between two shards")
    print(
        f"\nstopped prompts batch 0 (pid {frozen.pid}) with shards {sorted(frozen.done_before)} "
        f"of {frozen.shards} done",
        flush=True,
    )
    return frozen


def check_resubmitted(cluster: Cluster, round_dir: str, frozen: Frozen, total: int) -> list[int]:
    """Only the shards missing when the batch stopped went out again (try 2), each once; the shards
    it had finished were not redone. Returns the resubmitted shards."""
    missing = sorted(set(frozen.shards) - set(frozen.done_before))
    runs = batch_runs(cluster, round_dir, frozen.stage)
    retries = [r for r in runs if r["name"].endswith("-try-2")]
    assert retries, [r["name"] for r in runs]
    assert all(state_type(r) == "COMPLETED" for r in retries), [(r["name"], r["state"]) for r in retries]
    assert not [r for r in runs if r["name"].endswith("-try-3")]
    resent = sorted(i for r in retries for i in r["parameters"]["shards"])
    assert resent == missing, f"resubmitted {resent}, missing when it stopped {missing}"

    # What the batches wrote: nothing recorded by the stopped run; every shard in exactly one record.
    records = batch_records(round_dir, frozen.stage)
    assert frozen.run_id not in {r["flow_run_id"] for r in records}
    written = sorted(i for r in records for i in r["shards"])
    assert written == sorted(set(range(total)) - set(frozen.done_before)), written
    assert all(r["engine_builds"] == 1 for r in records if r["shards"]), records

    # Shards finished before the stop: same manifest, same write time, no task run in try 2.
    fs = fresh_fs()
    out_url = output_url(round_dir, frozen.watched)
    for index, (content, modified) in frozen.done_before.items():
        url = shards.shard_manifest_url(out_url, index)
        assert fs.cat_file(url) == content and fs.info(url)["LastModified"] == modified, index
    retried_tasks = set(task_run_names(cluster, [r["id"] for r in retries]))
    assert not {f"{frozen.watched}-shard-{i:05d}" for i in frozen.done_before} & retried_tasks, retried_tasks
    assert {f"{frozen.watched}-shard-{i:05d}" for i in missing} <= retried_tasks, retried_tasks
    return resent


def test_a_killed_batch_run_crashes_and_only_its_missing_shards_are_resubmitted(cluster: Cluster):
    started = time.monotonic()
    # 12 shards, 6 per batch: a batch runs long enough to be caught between two shards.
    overrides = overrides_for(cluster, "rounds-crash", "personas.n=24", "run.shard_size=2")
    round_dir = round_dir_of(overrides)
    run_id = cluster.trigger_round(TINY, overrides)
    frozen = freeze_a_batch(cluster, round_dir)
    try:
        frozen.kill()
        killed_at = time.monotonic()
        # The process worker sees its child die and reports the run: Crashed, no heartbeat timeout.
        crashed = cluster.wait_final(frozen.run_id, 60, every_s=0.5)
        assert state_type(crashed) == "CRASHED", crashed["state"]
        crash_s = time.monotonic() - killed_at
        message = crashed["state"]["message"] or ""
        assert "SIGKILL" in message or "-9" in message, message
    finally:
        frozen.kill()

    run = cluster.wait_final(run_id, ROUND_TIMEOUT_S)
    assert state_type(run) == "COMPLETED", f"{run['state']}\n{cluster.log_tails()}"
    resent = check_resubmitted(cluster, round_dir, frozen, total=12)
    kept = check_shards_exactly_once(round_dir)
    assert kept["judgements"] == 24, kept
    print(
        f"crash round: {time.monotonic() - started:.1f} s (Crashed {crash_s:.1f} s after the kill; "
        f"resubmitted {resent})",
        flush=True,
    )


def test_a_silent_batch_run_is_marked_crashed_by_the_heartbeat_automation(cluster: Cluster):
    """A lost node: the batch's process stops (SIGSTOP), its worker sees nothing. The automation of
    `sao deploy` marks the run Crashed once its heartbeats stop, and the round resubmits its shards."""
    started = time.monotonic()
    overrides = overrides_for(cluster, "rounds-silent", "personas.n=24", "run.shard_size=2")
    round_dir = round_dir_of(overrides)
    run_id = cluster.trigger_round(TINY, overrides)
    frozen = freeze_a_batch(cluster, round_dir)
    try:
        stopped_at = time.monotonic()
        # The last heartbeat came at most one period before the stop.
        crashed = cluster.wait_final(frozen.run_id, HEARTBEAT_GRACE_S + 90, every_s=0.5)
        silent_s = time.monotonic() - stopped_at
        assert state_type(crashed) == "CRASHED", crashed["state"]
        assert f"no heartbeat for {HEARTBEAT_GRACE_S} s" in crashed["state"]["message"], crashed["state"]
    finally:
        frozen.kill()  # the lost node's process, for good (its worker then reports it again)

    run = cluster.wait_final(run_id, ROUND_TIMEOUT_S)
    assert state_type(run) == "COMPLETED", f"{run['state']}\n{cluster.log_tails()}"
    resent = check_resubmitted(cluster, round_dir, frozen, total=12)
    check_shards_exactly_once(round_dir)
    print(
        f"silent batch round: {time.monotonic() - started:.1f} s (Crashed by the automation "
        f"{silent_s:.0f} s after the stop; resubmitted {resent})",
        flush=True,
    )


def test_two_rounds_triggered_at_once_run_one_after_the_other(cluster: Cluster):
    started = time.monotonic()
    # Small rounds with the shards in the round's own process: the limit, not the fan-out, is tested.
    common = ["personas.n=4", "run.shard_size=2", "evaluation.enabled=false"]
    ids = [
        cluster.trigger_round(TINY, [f"run.root={cluster.bucket}/rounds-queue-{k}", *common]) for k in (1, 2)
    ]
    # While one runs, the other waits for the deployment's slot.
    overlap_seen = []
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        runs = [cluster.read_run(i) for i in ids]
        types = [state_type(r) for r in runs]
        overlap_seen.append(types.count("RUNNING") > 1)
        if all(t in FINAL for t in types):
            break
        assert time.monotonic() < deadline, types
        time.sleep(1)
    assert [state_type(r) for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    assert not any(overlap_seen), "both rounds were Running at once"
    first, second = sorted(runs, key=lambda r: when(r["start_time"]))
    assert when(second["start_time"]) >= when(first["end_time"]), (first["end_time"], second["start_time"])
    assert "AwaitingConcurrencySlot" in state_names(cluster, second["id"])
    assert "AwaitingConcurrencySlot" not in state_names(cluster, first["id"])
    print(f"\nqueued rounds: {time.monotonic() - started:.1f} s", flush=True)


# Put on PYTHONPATH in the round's own process only (its job variables): a line per process start, per
# import of a model library and per weight file opened, so the test sees any model the round loads there.
LOAD_AUDIT = """
import os, sys

_log = os.environ.get("SAO_TEST_LOAD_LOG")


def _record(line):
    with open(_log, "a") as f:
        f.write(f"{os.getpid()} {line}\\n")


def _audit(event, args):
    if event == "import" and args[0] in ("torch", "vllm", "lm_eval", "transformers"):
        _record(f"import {args[0]}")
    elif event == "open" and isinstance(args[0], str) and args[0].endswith((".safetensors", ".bin", ".gguf")):
        _record(f"open {args[0]}")


if _log:
    _record("start")
    sys.addaudithook(_audit)
"""


def test_with_deployments_the_round_process_loads_no_model(cluster: Cluster, tmp_path: Any):
    """fanout.mode deployment and training.deployment: the evaluation's answers and verdicts and the
    downstream lm-eval runs go to the gpu-batch pool like the data stages, training to sao-train; the
    round's own process (the orchestrator image: no GPU, no vLLM) imports no model library and opens no
    weight file, while the batch runs record their engine builds."""
    started = time.monotonic()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LOAD_AUDIT)
    audit = {"PYTHONPATH": str(hooks), "SAO_TEST_LOAD_LOG": str(tmp_path / "loads.log")}
    # The audit sees a load: a process that imports torch and opens a weight file is recorded.
    probe = tmp_path / "probe.safetensors"
    probe.write_bytes(b"0")
    subprocess.run(
        [sys.executable, "-c", f"import torch; open({str(probe)!r}, 'rb').close()"],
        env={**os.environ, **audit, "SAO_TEST_LOAD_LOG": str(tmp_path / "probe.log")},
        check=True,
        timeout=120,
    )
    seen = (tmp_path / "probe.log").read_text().split("\n")
    assert any(line.endswith(" import torch") for line in seen) and any(str(probe) in line for line in seen)

    overrides = overrides_for(
        cluster,
        "rounds-evaluate",
        "personas.n=4",
        "run.shard_size=2",
        f"training.deployment={TRAIN_DEPLOYMENT}",
        "training.merge=true",  # as the round deployment's campaign does (see the train test above)
        "evaluation.enabled=true",
        # The contenders' answers on a real model loader, so the batch runs do load one.
        "evaluation.engine={name: transformers, device: cpu, dtype: float32, batch_size: 8}",
        "evaluation.n=4",
        "evaluation.trust_n=4",
        "evaluation.shard_size=2",  # two shards per evaluation stage: one per gpu-batch worker
        "evaluation.max_tokens=8",
        "evaluation.bootstrap=100",
        "evaluation.downstream.limit=2",
    )
    cfg = load_config(TINY, overrides)
    model_url = default_output_url(cfg)
    eval_dir, ds_dir = evaluation_url(model_url, cfg), downstream_url(model_url, cfg)
    run_id = cluster.trigger_round(TINY, overrides, job_variables={"env": audit})
    run = cluster.wait_final(run_id, ROUND_TIMEOUT_S)
    assert state_type(run) == "COMPLETED", f"{run['state']}\n{cluster.log_tails()}"

    # The round's process started with the audit and recorded nothing else: no model library, no weights.
    lines = (tmp_path / "loads.log").read_text().splitlines()
    assert lines and all(line.endswith(" start") for line in lines), lines

    # Each evaluation stage ran on both gpu-batch workers, one engine build per batch that answered.
    for stage, loads in (("answers-candidate", 1), ("answers-current", 1), ("verdicts", 1)):
        runs = batch_runs(cluster, eval_dir, stage)
        assert sorted(r["name"] for r in runs) == [f"{stage}-batch-00-try-1", f"{stage}-batch-01-try-1"]
        assert all(state_type(r) == "COMPLETED" for r in runs), [(r["name"], r["state"]) for r in runs]
        assert check_workers_ran(cluster, runs) == set(GPU_WORKERS), stage
        records = batch_records(eval_dir, stage)
        assert sorted(r["flow_run_id"] for r in records) == sorted(r["id"] for r in runs)
        assert all(r["engine_builds"] == loads for r in records), records
    fresh_fs()
    answers = shards.read_stage_manifest(storage.join(eval_dir, "answers-candidate"))
    assert answers["engine"] == "transformers" and answers["rows_out"] == 4, answers
    evaluation = storage.read_json(storage.join(eval_dir, "manifest.json"))
    assert evaluation["prompts"] == 4 and evaluation["trust"]["items"] == 4, evaluation
    assert evaluation["settings_hash"] == eval_dir.rsplit("/", 1)[-1]

    # Downstream: one lm-eval shard per model, each on a gpu-batch run.
    runs = batch_runs(cluster, ds_dir, "downstream")
    assert len(runs) == 2 and all(state_type(r) == "COMPLETED" for r in runs), runs
    assert sorted(i for r in batch_records(ds_dir, "downstream") for i in r["shards"]) == [0, 1]
    scores = storage.read_json(storage.join(ds_dir, "downstream.json"))
    assert set(scores["candidate"]["tasks"]) == set(cfg.evaluation.downstream.tasks), scores

    # Training ran as its own deployment's run.
    deployment = cluster.get(f"/deployments/name/{TRAIN_DEPLOYMENT}")
    trains = cluster.post(
        "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 50}
    )
    assert [state_type(r) for r in trains if r["parameters"].get("output_url") == model_url] == ["COMPLETED"]
    print(f"\nround with its evaluation on the pools: {time.monotonic() - started:.1f} s", flush=True)
