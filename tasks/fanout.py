"""A model stage's shards on GPU workers: one flow run of the gpu-batch deployment per worker.

    run_on_deployment("responses", cfg, round_ref, settings_hash, total, on_progress)

Each flow run (flows/gpu_batch.py) is given a list of shard indices and holds one engine for all of
them, so a model loads once per GPU per stage. The stage waits for every run; a batch whose run ended
Crashed, Failed or Cancelled, or ran past `fanout.batch_timeout_s` (it is then cancelled), is
resubmitted with its still-missing shards under a fresh idempotency key, at most `fanout.max_attempts`
times in all. What counts as done is the shard manifests in the artifact store, never a run's state: a
shard that verifies is never sent again, whichever run wrote it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling

from sao_core.config import RoundConfig
from sao_core.errors import FanoutError
from sao_core.store import shards
from sao_core.store.layout import shard_target


def split_batches(indices: list[int], workers: int) -> list[list[int]]:
    """Contiguous, near-equal batches, one per worker (fewer when there are fewer shards)."""
    count = min(workers, len(indices))
    if count == 0:
        return []
    size, extra = divmod(len(indices), count)
    out, begin = [], 0
    for b in range(count):
        end = begin + size + (1 if b < extra else 0)
        out.append(indices[begin:end])
        begin = end
    return out


def missing_shards(stage: str, cfg: RoundConfig, round_dir: str, indices: list[int]) -> list[int]:
    """The shards among `indices` with no manifest that verifies against their input and settings."""
    missing = []
    for index in indices:
        target = shard_target(stage, cfg, round_dir, index)
        if shards.shard_is_done(target.out_url, index, target.input_sha256, target.settings_hash) is None:
            missing.append(index)
    return missing


def _submission_key() -> str:
    """The stage task run and its try: a retried stage task submits anew, a repeated call does not."""
    ctx = TaskRunContext.get()
    if ctx is None:
        return f"local-{time.time_ns()}"
    return f"{ctx.task_run.id}-t{ctx.task_run.run_count}"


def _wait_for_runs(
    run_ids: list[UUID], timeout_s: float, poll_s: float, on_poll: Callable[[], None]
) -> dict[UUID, str]:
    """Final state type of each run; runs still going at the deadline are cancelled and reported TIMEOUT."""
    deadline = time.monotonic() + timeout_s
    states: dict[UUID, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            for run_id in run_ids:
                if run_id in states:
                    continue
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    states[run_id] = state.type.value
            on_poll()
            if len(states) == len(run_ids):
                return states
            if time.monotonic() >= deadline:
                for run_id in run_ids:
                    if run_id not in states:
                        # A run no worker has picked up has no process to stop: cancel it outright.
                        current = client.read_flow_run(run_id).state
                        waiting = current is not None and current.type in (
                            StateType.SCHEDULED,
                            StateType.PENDING,
                        )
                        stop = Cancelled if waiting else Cancelling
                        client.set_flow_run_state(run_id, stop(message="batch timed out"), force=True)
                        states[run_id] = "TIMEOUT"
                return states
            time.sleep(poll_s)


def run_on_deployment(
    stage: str,
    cfg: RoundConfig,
    round_ref: dict[str, Any],
    settings_hash: str,
    total: int,
    on_progress: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Run every missing shard of `stage` on the gpu-batch deployment; return what each try did."""
    logger = get_run_logger()
    fan = cfg.fanout
    round_dir = round_ref["round_dir"]
    pending = missing_shards(stage, cfg, round_dir, list(range(total)))
    on_progress(total - len(pending))
    key = _submission_key()
    tries: list[dict[str, Any]] = []
    for attempt in range(1, fan.max_attempts + 1):
        if not pending:
            break
        batches = split_batches(pending, fan.workers)
        runs = []
        for b, batch_shards in enumerate(batches):
            run = run_deployment(
                fan.deployment,
                parameters={
                    "config_url": round_ref["config_url"],
                    "round_dir": round_dir,
                    "stage": stage,
                    "shards": batch_shards,
                    "settings_hash": settings_hash,
                    "result_storage": round_ref.get("result_storage"),
                    "shard_timeout_s": round_ref["shard_timeout_s"],
                    "batch": b,
                    "attempt": attempt,
                },
                timeout=0,
                idempotency_key=f"{key}-{stage}-b{b}-a{attempt}",
                flow_run_name=f"{stage}-batch-{b:02d}-try-{attempt}",
                # A round number repeats across campaigns and configs; its folder name does not.
                tags=[
                    f"sao-stage:{stage}",
                    f"sao-round:{round_ref['round']}",
                    f"sao-round-dir:{round_dir.rstrip('/').rsplit('/', 1)[-1]}",
                ],
            )
            runs.append({"batch": b, "shards": batch_shards, "flow_run_id": run.id})
            logger.info("%s: batch %d (shards %s) submitted as flow run %s", stage, b, shards, run.id)

        def poll(sent: list[int] = pending) -> None:
            on_progress(total - len(missing_shards(stage, cfg, round_dir, sent)))

        states = _wait_for_runs(
            [r["flow_run_id"] for r in runs], fan.batch_timeout_s, fan.poll_interval_s, poll
        )
        pending = missing_shards(stage, cfg, round_dir, pending)
        for r in runs:
            r["state"] = states[r["flow_run_id"]]
            r["missing"] = [i for i in r["shards"] if i in pending]
            r["flow_run_id"] = str(r["flow_run_id"])
            if r["missing"]:
                logger.warning(
                    "%s: batch %d ended %s with shards %s missing",
                    stage,
                    r["batch"],
                    r["state"],
                    r["missing"],
                )
        tries.append({"attempt": attempt, "runs": runs})
        on_progress(total - len(pending))
    if pending:
        ends = "; ".join(
            f"try {t['attempt']}: " + ", ".join(f"batch {r['batch']} {r['state']}" for r in t["runs"])
            for t in tries
        )
        raise FanoutError(
            f"{stage}: shards {pending} are still missing after {fan.max_attempts} attempt(s) on deployment "
            f"{fan.deployment} ({ends})"
        )
    return tries
