"""One batch of a model stage's shards on one GPU worker: the `gpu-batch` deployment (prefect.yaml).

    run_deployment("sao-gpu-batch/gpu-batch", parameters={"stage": "responses", "shards": [0, 1, 2], ...})

A work pool's worker starts a new process (or container) per flow run, so this run's one engine is
loaded once, by its first shard, and serves every shard of the batch; it is freed at the end. With
`stages` (e.g. ["prompts", "responses", "judgements"], the same model writing all three) each shard goes
through the stages in turn on that one engine: shard i of a stage reads only shard i of the one before.
Prompts are the exception: the next stage reads them only after the round-wide duplicate pass, so the
batch finishes the whole prompts stage first, running the shards no batch has claimed yet and waiting for
those another batch holds (sao_core.stages.runner.batch_steps).
Shards already finished are skipped (their manifests say so). The run records what it did under
{round}/_batches/{stage}/, which is how a stage (and a test) sees how many times the model was loaded.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from sao_core.stages.runner import batch_steps
from tasks.batches import record_batch
from tasks.shards import shard_task, whole_stage


@flow(name="sao-gpu-batch", flow_run_name="{stage}-batch-{batch:02d}-try-{attempt}")
def gpu_batch(
    config_url: str,
    round_dir: str,
    stage: str,
    shards: list[int],
    settings_hash: str,
    result_storage: str | None = None,
    shard_timeout_s: float = 6 * 3600.0,
    batch: int = 0,
    attempt: int = 1,
    stages: list[str] | None = None,
    settings_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every listed shard of `stage` (or of each of `stages` in turn, with its hash from
    `settings_hashes`) on one engine, then a record of the batch."""
    shard = shard_task(result_storage, shard_timeout_s)
    chain = stages or [stage]
    hashes = {stage: settings_hash, **(settings_hashes or {})}
    missing = [s for s in chain if s not in hashes]
    if missing:
        raise ValueError(f"gpu-batch: no settings_hashes entry for stage(s) {missing} of stages {chain}")
    # Shard by shard through the chain: a run that dies leaves whole shards (every stage) behind it, and
    # its retry is sent only the shards some stage still lacks.
    done = []
    for s, index in batch_steps(chain, shards):
        if index is None:
            whole_stage(s, config_url, round_dir)
        else:
            done.append(shard(s, config_url, round_dir, index, hashes[s]))
    return record_batch(round_dir, stage, shards, batch, attempt, done, stages=chain)
