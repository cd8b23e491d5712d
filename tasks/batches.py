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
    round_dir: str,
    stage: str,
    shards: list[int],
    batch: int,
    attempt: int,
    done: list[dict[str, Any]],
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Close this process's engines and write {round}/_batches/{stage}/batch-BB-try-T-{run id}.json
    (`stage` the first of `stages` when the run went through several on its one engine)."""
    run_id = str(flow_run.get_id() or "local")
    builds, ready_at = close_engines()
    chain = stages or [stage]
    rows_out = {
        s: {str(d["shard"]): d["rows_out"] for d in done if d.get("stage", stage) == s} for s in chain
    }
    record = {
        "stage": stage,
        "stages": chain,
        "batch": batch,
        "attempt": attempt,
        "shards": shards,
        "rows_out": rows_out[stage],
        "rows_out_by_stage": rows_out,
        "engine_builds": builds,
        "engine_ready_at": ready_at,  # epoch seconds: submission to model ready is what bench/fanout reports
        "flow_run_id": run_id,
        "pid": os.getpid(),
        "project_dir": os.getcwd(),  # where the pull step put the run: the worker's SAO_PROJECT_DIR
        "host": socket.gethostname(),
    }
    url = storage.join(round_dir, "_batches", stage, f"batch-{batch:02d}-try-{attempt}-{run_id}.json")
    storage.write_json(url, record)
    create_table_artifact(
        [
            {
                "stage": d.get("stage", stage),
                "shard": d["shard"],
                "rows in": d["rows_in"],
                "rows out": d["rows_out"],
            }
            for d in done
        ],
        key=artifact_key(stage, f"batch-{batch:02d}"),
        description=f"{'+'.join(chain)} batch {batch} (try {attempt}): shards written by this run, "
        f"{record['engine_builds']} model load(s)",
    )
    return {**record, "url": url}
