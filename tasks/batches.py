"""The last step of a gpu-batch run: free the engine and record what the batch did."""

from __future__ import annotations

import os
import socket
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from sao_core.store import storage
from tasks.artifacts import artifact_key
from tasks.cache import retry_unless_permanent
from tasks.engines import close_engines


@task(
    name="record-batch",
    task_run_name="record-{stage}-batch-{batch:02d}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def record_batch(
    round_dir: str, stage: str, shards: list[int], batch: int, attempt: int, done: list[dict[str, Any]]
) -> dict[str, Any]:
    """Close this process's engines and write {round}/_batches/{stage}/batch-BB-try-T-{run id}.json."""
    run_id = str(flow_run.get_id() or "local")
    builds, ready_at = close_engines()
    record = {
        "stage": stage,
        "batch": batch,
        "attempt": attempt,
        "shards": shards,
        "rows_out": {str(d["shard"]): d["rows_out"] for d in done},
        "engine_builds": builds,
        "engine_ready_at": ready_at,  # epoch seconds: submission to model ready is what bench/fanout reports
        "flow_run_id": run_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    url = storage.join(round_dir, "_batches", stage, f"batch-{batch:02d}-try-{attempt}-{run_id}.json")
    storage.write_json(url, record)
    create_table_artifact(
        [{"shard": d["shard"], "rows in": d["rows_in"], "rows out": d["rows_out"]} for d in done],
        key=artifact_key(stage, f"batch-{batch:02d}"),
        description=f"{stage} batch {batch} (try {attempt}): shards written by this run, "
        f"{record['engine_builds']} model load(s)",
    )
    return {**record, "url": url}
