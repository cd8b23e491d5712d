"""A model stage's shards on GPU workers: one flow run of the gpu-batch deployment per worker.

    run_on_deployment("prompts", cfg, round_ref, settings_hash, total, on_progress,
                      then=[("responses", responses_hash), ("judgements", judgements_hash)])

Each flow run (flows/gpu_batch.py) is given a list of shard indices and holds one engine for all of
them, so a model loads once per GPU per stage; with `then`, the same run goes on to the next stages for
the same shards on that engine (judgements shard i reads only responses shard i; the responses read the
prompts once the whole prompts stage has had its duplicate pass), so the model loads once for all. What
counts as done is the shard manifests in the artifact store, never a run's state: a shard that verifies
is never sent again, whichever run wrote it.

Polling scales with the round: each poll lists the stages' `_shards/` folders (a listing, no download)
and reads each running batch's state. A batch whose run ended Crashed, Failed or Cancelled, or ran past
`fanout.batch_timeout_s` (it is then cancelled), is resubmitted at once with its shards that have no
manifest, under a fresh idempotency key, while the other batches run on; a shard is sent at most
`fanout.max_attempts` times in all. A store or API error inside a poll is logged and the next poll tries
again. When every batch has ended, the shards are verified once (sha256 against their manifests); one
that does not verify is sent again, within the same limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
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
from sao_core.store import shards, storage
from sao_core.store.layout import output_url, shard_target_if_ready


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
    """The shards among `indices` with no manifest that verifies against their input and settings
    (downloads and hashes every finished shard: for the start and the end of a stage, not for polling).
    A shard whose input is not finished is missing: it cannot have been made."""
    missing = []
    for index in indices:
        target = shard_target_if_ready(stage, cfg, round_dir, index)
        if (
            target is None
            or shards.shard_is_done(target.out_url, index, target.input_sha256, target.settings_hash) is None
        ):
            missing.append(index)
    return missing


def missing_in_chain(
    stages: Sequence[str], cfg: RoundConfig, round_dir: str, indices: list[int]
) -> list[int]:
    """The shards among `indices` that some stage of the chain (each reading the one before) still lacks,
    verified; a shard the first stage lacks is not checked further (its later stages have no input yet)."""
    missing: set[int] = set()
    for stage in stages:
        missing |= set(missing_shards(stage, cfg, round_dir, [i for i in indices if i not in missing]))
    return sorted(missing)


def listed_shards(stages: Sequence[str], round_dir: str) -> set[int]:
    """Shards with a manifest in every stage of the chain, from listings of their `_shards/` folders:
    what a poll reads, a few hundred bytes per shard, however big the shards are."""
    done: set[int] | None = None
    for stage in stages:
        folder = storage.join(output_url(round_dir, stage), "_shards")
        storage.forget_listing(folder)  # s3fs caches listings: see what the workers wrote since
        found = {
            int(url.rsplit("part-", 1)[1].split(".", 1)[0])
            for url in storage.list_files(folder, "part-*.json")
        }
        done = found if done is None else done & found
    return done or set()


def _submission_key() -> str:
    """The stage task run and its try: a retried stage task submits anew, a repeated call does not."""
    ctx = TaskRunContext.get()
    if ctx is None:
        return f"local-{time.time_ns()}"
    return f"{ctx.task_run.id}-t{ctx.task_run.run_count}"


class DeploymentRuns:
    """The flow runs of the gpu-batch deployment, through the Prefect API: submit, read state, stop."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def submit(
        self, deployment: str, parameters: dict[str, Any], key: str, name: str, tags: list[str]
    ) -> UUID:
        run = run_deployment(
            deployment,
            parameters=parameters,
            timeout=0,
            idempotency_key=key,
            flow_run_name=name,
            tags=tags,
        )
        return run.id  # type: ignore[union-attr]  # with timeout=0 a sync call returns the FlowRun

    def final_state(self, run_id: UUID) -> str | None:
        """The run's final state type ("CRASHED", ...), or None while it is not final."""
        state = self.client.read_flow_run(run_id).state
        return state.type.value if state is not None and state.is_final() else None

    def stop(self, run_id: UUID) -> None:
        # A run no worker has picked up has no process to stop: cancel it outright.
        current = self.client.read_flow_run(run_id).state
        waiting = current is not None and current.type in (StateType.SCHEDULED, StateType.PENDING)
        stop = Cancelled if waiting else Cancelling
        self.client.set_flow_run_state(run_id, stop(message="batch timed out"), force=True)


@contextmanager
def open_runs() -> Iterator[DeploymentRuns]:
    with get_client(sync_client=True) as client:
        yield DeploymentRuns(client)


@dataclass
class _Batch:
    batch: int
    shards: list[int]
    attempt: int
    flow_run_id: UUID
    submitted: float = field(default_factory=time.monotonic)
    state: str = ""
    missing: list[int] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "shards": self.shards,
            "flow_run_id": str(self.flow_run_id),
            "state": self.state,
            "missing": self.missing,
        }


class _Poller:
    """Calls to the store or the API inside a poll: an error is logged and answered None (try again next
    poll), until calls to that one service ("store", "api") have failed for `outage_s` (fanout.outage_s)
    with none of them answering in between (the store answering says nothing of the API)."""

    def __init__(self, stage: str, logger: Any, outage_s: float) -> None:
        self.stage, self.logger, self.outage_s = stage, logger, outage_s
        self.failing_since: dict[str, float] = {}

    def __call__(self, service: str, what: str, fn: Callable[[], Any]) -> Any:
        try:
            out = fn()
        except Exception as e:  # a store or server hiccup must not fail a stage that is running fine
            now = time.monotonic()
            since = self.failing_since.setdefault(service, now)
            self.logger.warning(
                "%s: %s failed (%s: %s); trying again next poll", self.stage, what, type(e).__name__, e
            )
            if now - since >= self.outage_s:
                raise FanoutError(
                    f"{self.stage}: {what} failed; the {service} has not answered for {now - since:.0f} s: {e}"
                ) from e
            return None
        self.failing_since.pop(service, None)
        return out

    def best_effort(self, what: str, fn: Callable[[], Any]) -> None:
        """A call the stage does not depend on (the progress bar): a failure is logged, and neither
        starts nor ends an outage; a success says nothing of whether the runs can be read."""
        try:
            fn()
        except Exception as e:
            self.logger.warning("%s: %s failed (%s: %s)", self.stage, what, type(e).__name__, e)


def run_on_deployment(
    stage: str,
    cfg: RoundConfig,
    round_ref: dict[str, Any],
    settings_hash: str,
    total: int,
    on_progress: Callable[[int], None],
    then: Sequence[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """Run every missing shard of `stage` (and of the stages in `then`, (stage, settings hash) pairs, on
    the same batch runs) on the gpu-batch deployment; return what each try did."""
    logger = get_run_logger()
    fan = cfg.fanout
    round_dir = round_ref["round_dir"]
    chain = [stage, *(s for s, _ in then)]
    hashes = {stage: settings_hash, **dict(then)}
    pending = missing_in_chain(chain, cfg, round_dir, list(range(total)))
    call = _Poller(stage, logger, fan.outage_s)

    def report(done: int) -> None:
        call.best_effort("updating the progress", partial(on_progress, done))

    report(total - len(pending))
    key = _submission_key()
    sent: dict[int, int] = {}  # shard -> times sent
    batches: list[_Batch] = []
    next_batch = 0

    with open_runs() as runs:

        def submit(batch: int, batch_shards: list[int]) -> _Batch:
            attempt = 1 + max(sent.get(i, 0) for i in batch_shards)
            parameters = {
                "config_url": round_ref["config_url"],
                "round_dir": round_dir,
                "stage": stage,
                "shards": batch_shards,
                "settings_hash": settings_hash,
                "result_storage": round_ref.get("result_storage"),
                "shard_timeout_s": round_ref["shard_timeout_s"],
                "batch": batch,
                "attempt": attempt,
            }
            if then:  # only then: a gpu-batch deployment made before `stages` existed still takes the rest
                parameters["stages"] = chain
                parameters["settings_hashes"] = hashes
            run_id = runs.submit(
                fan.deployment,
                parameters,
                key=f"{key}-{stage}-b{batch}-a{attempt}",
                name=f"{stage}-batch-{batch:02d}-try-{attempt}",
                # A round number repeats across campaigns and configs; its folder name does not.
                tags=[
                    f"sao-stage:{stage}",
                    f"sao-round:{round_ref['round']}",
                    f"sao-round-dir:{round_dir.rstrip('/').rsplit('/', 1)[-1]}",
                ],
            )
            logger.info(
                "%s: batch %d (shards %s, stages %s) submitted as flow run %s (try %d)",
                stage, batch, batch_shards, "+".join(chain), run_id, attempt,
            )  # fmt: skip
            for i in batch_shards:
                sent[i] = sent.get(i, 0) + 1
            b = _Batch(batch, batch_shards, attempt, run_id)
            batches.append(b)
            return b

        while pending:
            active: list[_Batch] = []
            for batch_shards in split_batches(pending, fan.workers):
                active.append(submit(next_batch, batch_shards))
                next_batch += 1
            resend: list[tuple[int, list[int]]] = []  # batches whose resubmission the API did not take yet
            while active or resend:
                time.sleep(fan.poll_interval_s)
                for batch, batch_shards in list(resend):
                    again_b = call("api", f"resubmitting batch {batch}", partial(submit, batch, batch_shards))
                    if again_b is not None:
                        resend.remove((batch, batch_shards))
                        active.append(again_b)
                ended = []
                for b in active:
                    state = call(
                        "api", f"reading flow run {b.flow_run_id}", partial(runs.final_state, b.flow_run_id)
                    )
                    if state is None and time.monotonic() - b.submitted >= fan.batch_timeout_s:
                        call("api", f"cancelling flow run {b.flow_run_id}", partial(runs.stop, b.flow_run_id))
                        state = "TIMEOUT"
                    if state is not None:
                        b.state = state
                        ended.append(b)
                # Listed after the states were read: a run that has ended wrote its manifests before.
                listed = call("store", "listing the finished shards", lambda: listed_shards(chain, round_dir))
                if listed is None:
                    continue  # nothing known this poll: the ended batches are looked at next time
                report(len(listed & set(range(total))))
                for b in ended:
                    active.remove(b)
                    b.missing = [i for i in b.shards if i not in listed]
                    if not b.missing:
                        continue
                    logger.warning(
                        "%s: batch %d ended %s with shards %s missing", stage, b.batch, b.state, b.missing
                    )
                    again = [i for i in b.missing if sent[i] < fan.max_attempts]
                    if again:  # at once: the other batches run on
                        resent = call("api", f"resubmitting batch {b.batch}", partial(submit, b.batch, again))
                        if resent is None:
                            resend.append((b.batch, again))
                        else:
                            active.append(resent)
            # Once per stage: every shard against its manifest's sha256 (a torn write that listed fine).
            pending = missing_in_chain(chain, cfg, round_dir, list(range(total)))
            report(total - len(pending))
            if any(sent.get(i, 0) >= fan.max_attempts for i in pending):
                break

    tries: list[dict[str, Any]] = [
        {"attempt": a, "runs": [b.record() for b in batches if b.attempt == a]}
        for a in sorted({b.attempt for b in batches})
    ]
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
