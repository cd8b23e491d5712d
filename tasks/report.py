"""The round report: stage counts, judge diagnostics, training curves, evaluation; report.md and an artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sao_core import storage
from sao_core.pipeline import write_round_manifest
from sao_core.report import format_round_report
from tasks.common import artifact_key, link_for, load_round_config, retry_unless_permanent


@task(
    name="report",
    task_run_name="report-round-{round_ref[round]}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def write_report(
    round_ref: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    model: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
) -> str:
    """Write {round}/report.md and publish it; return its URL."""
    summary = {name: result["summary"] for name, result in stages.items()}
    plot = storage.join(model["url"], "train_curves.png") if model else None
    plot_link = link_for(plot) if plot and storage.exists(plot) else None
    training = {**(model or {}).get("manifest", {}), "output": model["url"]} if model else None
    text = format_round_report(round_ref["round_dir"], summary, training, evaluation, plot_link)
    write_round_manifest(load_round_config(round_ref["config_url"]), round_ref["round_dir"], summary)
    url = storage.join(round_ref["round_dir"], "report.md")
    storage.write_text(url, text)
    create_markdown_artifact(
        text,
        key=artifact_key(round_ref["campaign"], "round-report"),
        description=f"round {round_ref['round']}",
    )
    return url
