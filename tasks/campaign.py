"""Campaign steps: plan the next round from the promoted model, decide a round, record it, report them all.

    plan = plan_round(config, overrides)         # run.round, model.path/adapter from CURRENT, the original
    decision = promotion_gate(ref, evaluation, downstream)
    outcome = record_outcome(ref, model, pairs, judgements, evaluation, downstream, decision)
    campaign_report_task(config, overrides)

The pause for a person's approval lives in the flow (flows/sao_round.py): Prefect pauses flow runs only.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sao_core.campaign import ledger, planning
from sao_core.campaign.campaign_report import (
    campaign_markdown,
    campaign_rows,
    data_url,
    decided_rounds,
    plot_campaign,
    round_record,
    write_round_record,
)
from sao_core.campaign.promotion import decide
from sao_core.evaluation.downstream import compare_downstream
from sao_core.store import storage
from sao_core.store.layout import load_config
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, retry_unless_permanent


@task(name="plan-round", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)
def plan_round(config: str, overrides: list[str]) -> dict[str, Any]:
    """The overrides that make the config the campaign's next round (SAO.md step 7: round t+1 from M_t).

    The next round is one past the last decided one; a round that crashed before its outcome was
    recorded is planned again with the same settings, so it resumes from its finished work. It starts
    from CURRENT's model (round 1, or while nothing is promoted: the config's), is evaluated against it
    and against the config's model (the original), and with LoRA writes its merged full model, so the
    model a later round starts from is always one loadable folder.
    """
    cfg = load_config(config, overrides)
    done = decided_rounds(cfg.run.root, cfg.run.campaign)
    number = max(done, default=0) + 1
    planned = cfg.model_copy(update={"run": cfg.run.model_copy(update={"round": number})})
    path, adapter = planning.start_model(planned)
    extra = [f"run.round={number}"]
    if path != cfg.model.path or adapter != cfg.model.adapter:
        extra += [
            f"model.path={json.dumps(path)}",
            f"model.adapter={json.dumps(adapter)}",
            "model.revision=null",
        ]
        extra.append(f"evaluation.original={json.dumps(cfg.model.path)}")
    if cfg.training.lora.enabled:
        extra.append("training.merge=true")
    return {"round": number, "overrides": extra, "start_model": path, "start_adapter": adapter}


@task(name="promotion-gate", retries=1, retry_condition_fn=retry_unless_permanent)
def promotion_gate(
    round_ref: dict[str, Any], evaluation: dict[str, Any] | None, downstream: dict[str, Any] | None
) -> dict[str, Any]:
    """The config's promotion rule on the evaluation and the downstream comparison."""
    cfg = load_round_config(round_ref["config_url"])
    failures = []
    if downstream:
        failures = compare_downstream(
            downstream["candidate"], downstream["baseline"], cfg.promotion.max_downstream_drop
        )
    return decide(cfg.promotion, evaluation, failures).to_dict()


@task(
    name="record-outcome",
    task_run_name="outcome-round-{round_ref[round]}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def record_outcome(
    round_ref: dict[str, Any],
    model: dict[str, Any],
    pairs: dict[str, Any],
    judgements: dict[str, Any],
    evaluation: dict[str, Any] | None,
    downstream: dict[str, Any] | None,
    decision: dict[str, Any] | None,
) -> dict[str, Any]:
    """Promote the round's model when the decision says so, then write {round}/outcome.json."""
    cfg = load_round_config(round_ref["config_url"])
    seq = None
    if decision and decision["promote"]:
        why = f"round {cfg.run.round}: " + "; ".join(c["detail"] for c in decision["checks"] if c["passed"])
        record = ledger.promote(cfg.run.root, cfg.run.campaign, round_ref["round_dir"], model["url"], why=why)
        seq = record.seq
    outcome = round_record(
        cfg,
        round_ref["round_dir"],
        model["url"],
        pairs.get("summary"),
        judgements.get("summary"),
        evaluation,
        downstream,
        decision,
        seq,
    )
    write_round_record(round_ref["round_dir"], outcome)
    return outcome


@task(
    name="campaign-report", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent
)
def campaign_report_task(config: str, overrides: list[str]) -> str:
    """{root}/{campaign}/campaign_report.md and .png, and the same as a markdown artifact with the plot inlined."""
    cfg = load_config(config, overrides)
    rows = campaign_rows(cfg.run.root, cfg.run.campaign)
    base = storage.join(cfg.run.root, cfg.run.campaign)
    png = plot_campaign(rows, cfg.run.campaign)
    storage.write_bytes(storage.join(base, "campaign_report.png"), png)
    url = storage.join(base, "campaign_report.md")
    storage.write_text(url, campaign_markdown(rows, cfg.run.campaign, "campaign_report.png"))
    create_markdown_artifact(
        campaign_markdown(rows, cfg.run.campaign, data_url(png)),
        key=artifact_key(cfg.run.campaign, "campaign-report"),
        description=f"campaign {cfg.run.campaign}: every decided round",
    )
    return url
