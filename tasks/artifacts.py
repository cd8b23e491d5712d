"""What a person opens in the Prefect UI for a stage (counts, sample rows, links), and where task results
persist (a RemoteFileSystem block beside an s3:// root, so every worker shares one cache).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from sao_core.store import storage
from tasks.cache import retry_unless_permanent


@task(
    name="result-storage",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def result_storage(root: str) -> str | None:
    """Where task results persist: Prefect's local result folder for local roots; for an s3:// root a
    saved RemoteFileSystem block under {root}/_prefect_results (its slug), so any worker sharing the
    bucket is served from the same cache. Credentials stay in the environment, not in the block."""
    if not root.startswith("s3://"):
        return None
    from prefect.filesystems import RemoteFileSystem

    settings: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        settings["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    name = "sao-results-" + hashlib.sha256(root.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=storage.join(root, "_prefect_results"), settings=settings).save(
        name, overwrite=True
    )
    return f"remote-file-system/{name}"


def with_result_storage(task_: Any, slug: str | None) -> Any:
    """The task with the round's result storage, when it has one of its own."""
    return task_.with_options(result_storage=slug) if slug else task_


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def link_for(url: str) -> str:
    return url if "://" in url else f"file://{url}"


def publish_stage(stage: str, round_dir: str, summary: dict[str, Any], campaign: str, sample_md: str) -> None:
    """The three artifacts a person opens for a stage: counts table, sample rows, links to its files."""
    tokens = int(summary.get("completion_tokens", 0))
    seconds = float(summary.get("seconds", 0.0))
    drops = summary.get("drops", {})
    table = [
        {"metric": "rows in", "value": summary.get("rows_in", 0)},
        {"metric": "rows out", "value": summary.get("rows_out", 0)},
        *({"metric": f"dropped: {k}", "value": v} for k, v in drops.items()),
        {"metric": "prompt tokens", "value": summary.get("prompt_tokens", 0)},
        {"metric": "completion tokens", "value": tokens},
        {"metric": "seconds", "value": round(seconds, 2)},
        {"metric": "tokens/s", "value": round(tokens / seconds, 1) if seconds and tokens else 0},
    ]
    if "repetition_rate" in summary:
        table.append({"metric": "repetition rate", "value": summary["repetition_rate"]})
    for k, v in (summary.get("diagnostics") or {}).items():
        if isinstance(v, (int, float)) or v is None:
            table.append({"metric": f"judge {k.replace('_', ' ')}", "value": v})
    key = artifact_key(campaign, stage)
    create_table_artifact(
        table, key=f"{key}-counts", description=f"{stage}: rows, drops by reason, tokens, time"
    )
    create_markdown_artifact(sample_md, key=f"{key}-sample", description=f"{stage}: sample rows")
    url = storage.join(round_dir, stage)
    create_link_artifact(link_for(url), link_text=f"{stage} files", key=f"{key}-files", description=url)
