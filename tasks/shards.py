"""Model stages as Prefect tasks: one task per shard (the unit of retry and placement), one per stage.

Where the shards run follows `fanout.mode`:
- local: the stage task runs its shard tasks in turn in this process, on one loaded engine;
- replicas: the shard tasks run concurrently (bounded), so every `vllm serve` replica stays busy;
- deployment: batches of shards go to GPU workers as flow runs of the gpu-batch deployment
  (tasks/fanout.py), each holding one engine for its whole batch.
A progress artifact follows the shards as they finish; then the stage manifest and its artifacts are
written here. A shard task that fails is retried by itself; finished shards are served from the cache
or skipped by sao_core (their manifests say so), so nothing finished is redone.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.tasks import exponential_backoff

from sao_core.campaign.round_report import format_chains, sample_chains
from sao_core.evaluation.eval_stages import run_stage_shard, stage_config
from sao_core.stages import runner
from sao_core.stages.runner import finalize_stage
from sao_core.stages.synth import stage_summary
from sao_core.store.layout import num_shards, stage_url
from tasks.artifacts import artifact_key, publish_stage, with_result_storage
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent, shard_cache_key
from tasks.engines import engine_for

# A shard's retries (and a whole stage's in a batch run): backoff with jitter, none for a permanent error.
SHARD_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_unless_permanent,
}


@task(
    name="stage-shard",
    task_run_name="{stage}-shard-{index:05d}",
    **SHARD_RETRIES,
    cache_key_fn=shard_cache_key,
    persist_result=True,
)
def stage_shard(
    stage: str, config_url: str, round_dir: str, index: int, settings_hash: str
) -> dict[str, Any]:
    """Generate, parse and write one shard; returns its manifest entry (counts, hash, seconds, tokens)."""
    cfg = load_round_config(config_url)
    # An evaluation stage's shards run on its contender's (or the judge's) model; round_dir is then the
    # evaluation's folder (sao_core.evaluation.eval_stages).
    entry = run_stage_shard(stage, cfg, round_dir, index, engine_for(stage_config(cfg, stage, round_dir)))
    return {
        "stage": stage,
        "shard": entry.shard,
        "sha256": entry.sha256,
        "rows_in": entry.rows_in,
        "rows_out": entry.rows_out,
    }


@task(name="whole-stage", task_run_name="{stage}-whole-stage", **SHARD_RETRIES)
def whole_stage(stage: str, config_url: str, round_dir: str) -> dict[str, Any]:
    """In a batch run whose chain goes past a stage with a whole-stage pass (prompts' duplicate pass):
    every shard of the stage, those no runner has claimed run here on this process's engine and those
    another batch holds waited for, then the pass and the stage manifest, which the next stage reads."""
    cfg = load_round_config(config_url)
    manifest = runner.run_model_stage(stage, cfg, round_dir, engine_for(stage_config(cfg, stage, round_dir)))
    return {"stage": stage, "rows_out": manifest.get("rows_out")}


def shard_task(result_storage: str | None, timeout_s: float) -> Any:
    """The shard task with the round's result storage and the engine's shard time limit."""
    return with_result_storage(stage_shard, result_storage).with_options(timeout_seconds=timeout_s)


class Progress:
    """The stage's progress artifact: shards finished of the stage's total. A fan-out reports on every
    poll; the artifact is written only when the count has moved, so an idle poll costs the server nothing."""

    def __init__(self, campaign: str, stage: str, total: int) -> None:
        self.total = max(total, 1)
        self.artifact: UUID = create_progress_artifact(
            0.0, key=artifact_key(campaign, stage, "progress"), description=f"{stage}: shards done of {total}"
        )
        self.shown = 0  # the count the artifact shows

    def update(self, done: int) -> None:
        if done == self.shown:
            return
        update_progress_artifact(self.artifact, 100.0 * done / self.total)
        self.shown = done  # only once written: a failed write is tried again on the next report


def _run_concurrently(shard: Any, args: list[tuple], limit: int, progress: Progress) -> None:
    """Submit shard tasks, at most `limit` running at once; the first failure fails the stage."""
    waiting = list(reversed(args))
    running: set[PrefectFuture] = set()
    finished = 0
    while waiting or running:
        while waiting and len(running) < limit:
            running.add(shard.submit(*waiting.pop()))
        future = next(as_completed(running))
        running.discard(future)
        future.result()  # raises the shard's error after its retries
        finished += 1
        progress.update(finished)


# One model writes the prompts, answers them and judges the answers: under fan-out a batch run that wrote
# prompts shards goes on, on the engine it holds, to the responses and judgements of its shards (shard i
# reads only shard i of the stage before; the prompts' duplicate pass runs between, once every batch's
# prompts are in: sao_core.stages.runner.batch_steps), so the model loads once per batch for the whole
# data path, and the later stages find their shards done. A round resumed after its prompts sends the
# responses batches on to the judgements the same way.
SAME_ENGINE_NEXT = {"prompts": ("responses", "judgements"), "responses": ("judgements",)}


def _then(stage: str, round_ref: dict[str, Any]) -> list[tuple[str, str]]:
    """The stages a batch run of `stage` also runs, with their settings hashes (the round's)."""
    settings = round_ref.get("settings") or {}
    out = []
    for after in SAME_ENGINE_NEXT.get(stage, ()):
        if after not in settings:
            break  # a chain goes on only as far as the round has the stages
        out.append((after, settings[after]))
    return out


def run_model_stage(
    stage: str, round_ref: dict[str, Any], settings_hash: str, input_url: str
) -> dict[str, Any]:
    """Body of the stage tasks in tasks/prompts.py, tasks/responses.py and tasks/judging.py."""
    config_url, round_dir = round_ref["config_url"], round_ref["round_dir"]
    cfg = load_round_config(config_url)
    total = num_shards(round_dir, stage)
    progress = Progress(cfg.run.campaign, stage, total)
    shard = shard_task(round_ref.get("result_storage"), round_ref["shard_timeout_s"])
    if cfg.fanout.mode == "deployment":
        from tasks.fanout import run_on_deployment

        then = _then(stage, round_ref)
        run_on_deployment(stage, cfg, round_ref, settings_hash, total, progress.update, then=then)
    elif cfg.fanout.mode == "replicas":
        limit = cfg.fanout.concurrency or len(cfg.engine.base_urls) or 1
        args = [(stage, config_url, round_dir, index, settings_hash) for index in range(total)]
        _run_concurrently(shard, args, limit, progress)
    else:
        for index in range(total):
            shard(stage, config_url, round_dir, index, settings_hash)
            progress.update(index + 1)
    manifest = finalize_stage(stage, cfg, round_dir)
    summary = stage_summary(manifest)
    chains = sample_chains(round_dir, stage, cfg.run.format, n=3, seed=cfg.run.seed)
    publish_stage(stage, round_dir, summary, cfg.run.campaign, format_chains(chains, f"{stage}: sample rows"))
    return {"stage": stage, "url": stage_url(round_dir, stage), "summary": summary}


def stage_task(stage: str, input_param: str = "input_url") -> Any:
    """Task options shared by the model-stage tasks: retries with backoff, content-hash cache keys."""
    return task(
        name=stage,
        task_run_name=f"{stage}-round-{{round_ref[round]}}",
        retries=1,
        retry_delay_seconds=exponential_backoff(backoff_factor=5),
        retry_condition_fn=retry_unless_permanent,
        cache_key_fn=make_cache_key(stage, input_param),
        persist_result=True,
    )
