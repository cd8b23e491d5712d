"""The round report: stage counts, judge diagnostics, training curves, evaluation; report.md and an artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sao_core.campaign.campaign_report import data_url
from sao_core.campaign.round_report import format_chains, format_round_report, markdown_table, sample_chains
from sao_core.evaluation.compare import headline
from sao_core.stages.synth import write_round_manifest
from sao_core.store import storage
from tasks.artifacts import artifact_key, link_for
from tasks.cache import load_round_config, retry_unless_permanent


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
    promotion: dict[str, Any] | None = None,
) -> str:
    """Write {round}/report.md and publish it (the training curves inlined, so the UI shows them); return its URL."""
    summary = {name: result["summary"] for name, result in stages.items()}
    plot = storage.join(model["url"], "train_curves.png") if model else None
    has_plot = bool(plot and storage.exists(plot))
    training = {**(model or {}).get("manifest", {}), "output": model["url"]} if model else None
    round_dir = round_ref["round_dir"]
    text = format_round_report(
        round_dir, summary, training, evaluation, link_for(plot) if has_plot and plot else None, promotion
    )
    write_round_manifest(load_round_config(round_ref["config_url"]), round_dir, summary)
    url = storage.join(round_dir, "report.md")
    storage.write_text(url, text)
    if has_plot and plot:
        text = format_round_report(
            round_dir, summary, training, evaluation, data_url(storage.read_bytes(plot)), promotion
        )
    create_markdown_artifact(
        text,
        key=artifact_key(round_ref["campaign"], "round-report"),
        description=f"round {round_ref['round']}",
    )
    return url


def approval_description(
    round_ref: dict[str, Any], evaluation: dict[str, Any] | None, decision: dict[str, Any]
) -> str:
    """What the person asked to approve a promotion sees in the UI: the evaluation and sample pairs."""
    lines = [
        f"## Promote round {round_ref['round']}?\n",
        f"Round folder: `{round_ref['round_dir']}`. The promotion rule holds:\n",
        *(f"- {c['rule']}: {c['detail']}" for c in decision["checks"]),
    ]
    if evaluation:
        lines += ["\n### Evaluation\n", markdown_table(headline(evaluation))]
    pairs = sample_chains(round_ref["round_dir"], "pairs", round_ref["format"], n=3, seed=0)
    lines += ["\n### Sample training pairs\n", format_chains(pairs, "pairs")]
    lines.append(
        "\nApprove to make this round's model the campaign's current one; no answer in time rejects it."
    )
    return "\n".join(lines)
