"""Campaign steps: plan the next round from the promoted model, decide a round, record it, report them all.

    plan = plan_round(config, overrides)         # run.round, model.path/adapter from CURRENT, the original
    decision = promotion_gate(ref, evaluation, downstream)
    outcome = record_outcome(ref, model, pairs, judgements, evaluation, downstream, decision, campaign)
    record_round_failure(config, overrides, stage, error, message, campaign)
    campaign_paused(config, overrides, why)
    campaign_report_task(config, overrides)

The pause for a person's approval lives in the flow (flows/sao_round.py): Prefect pauses flow runs only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from sao_core.campaign import planning
from sao_core.campaign.campaign_report import campaign_markdown, campaign_rows, data_url, plot_campaign
from sao_core.campaign.outcomes import conclude_round, record_failure
from sao_core.campaign.promotion import decide
from sao_core.errors import ConfigError, LeaseLost
from sao_core.evaluation.downstream import compare_downstream
from sao_core.store import locks, storage
from sao_core.store.layout import load_config, round_url
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, retry_unless_permanent


@task(name="plan-round", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)
def plan_round(config: str, overrides: list[str]) -> dict[str, Any]:
    """The overrides that make the config the campaign's next round (SAO.md step 7: round t+1 from M_t).

    The next round is one past the last decided one; a round that crashed before its outcome was
    recorded is planned again with the same settings, so it resumes from its finished work, while one that
    failed for good is passed, and the next draws new personas and a new seed (sao_core.campaign.planning).
    It starts from CURRENT's model (while nothing is promoted: the config's), is evaluated against it and
    against the config's model (the original), and with LoRA writes its merged full model, so the model a
    later round starts from is always one loadable folder. `start_seq` is the record it starts from: the
    round promotes only while that is still the latest. `paused` says why no round is planned.
    """
    cfg = load_config(config, overrides)
    plan = planning.plan_next(
        cfg.run.root, cfg.run.campaign, cfg.run.seed, cfg.campaign.max_consecutive_failures
    )
    number = plan.round
    if plan.start is not None:
        start = plan.start
        path, adapter, revision = start.model_path, start.model_adapter, start.model_revision
    else:
        path, adapter, revision = cfg.model.path, cfg.model.adapter, cfg.model.revision
    extra = [f"run.round={number}"]
    if plan.failed_rounds:
        extra.append(f"run.seed={plan.seed}")  # a failed round is not run again as it was
    if path != cfg.model.path or adapter != cfg.model.adapter:
        extra += [
            f"model.path={json.dumps(path)}",
            f"model.adapter={json.dumps(adapter)}",
            # the promoted model's own: its base's pinned revision under an adapter, none for a full folder
            f"model.revision={json.dumps(revision)}",
        ]
        extra.append(f"evaluation.original={json.dumps(cfg.model.path)}")
    if cfg.training.lora.enabled:
        extra.append("training.merge=true")
    return {
        "round": number,
        "overrides": extra,
        "start_model": path,
        "start_adapter": adapter,
        "start_seq": plan.start_seq,
        "paused": plan.paused,
    }


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


# What a user can attach an automation to in the Prefect UI: one event per round outcome.
EVENTS = {
    "promoted": "sao.round.promoted",
    "rejected": "sao.round.rejected",
    "not evaluated": "sao.round.rejected",
    "would be promoted": "sao.round.would-be-promoted",
    "superseded": "sao.round.superseded",
    "failed": "sao.round.failed",
}


def round_resources(campaign: str, round_number: int) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The round as an event's resource, its campaign as a related resource."""
    resource = {
        "prefect.resource.id": f"sao.round.{campaign}.{round_number}",
        "prefect.resource.name": f"{campaign} round {round_number}",
        "sao.campaign": campaign,
        "sao.round": str(round_number),
    }
    related = [
        {
            "prefect.resource.id": f"sao.campaign.{campaign}",
            "prefect.resource.role": "campaign",
            "prefect.resource.name": campaign,
        }
    ]
    return resource, related


def emit_outcome_event(outcome: dict[str, Any]) -> None:
    """sao.round.<status> with the round and its campaign as resources, and the outcome's gist."""
    resource, related = round_resources(outcome["campaign"], int(outcome["round"]))
    payload = {
        k: outcome.get(k)
        for k in ("status", "reason", "why", "round_dir", "model", "promotion_seq", "planned_seq", "failure")
    }
    emit_event(event=EVENTS[outcome["status"]], resource=resource, related=related, payload=payload)


def _lock_guard(lock: dict[str, Any] | None) -> Callable[[], None] | None:
    """A check that the campaign lock this round took is still its own and live (ledger.promote's guard)."""
    if not lock:
        return None

    def check() -> None:
        data = locks.read_lease(lock["url"])
        if not data or data.get("token") != lock["token"]:
            raise LeaseLost(
                f"the campaign lock {lock['url']} is no longer this round's ({locks.describe(data)})"
            )
        stale = locks.stale_reason(data)
        if stale:
            raise LeaseLost(f"the campaign lock {lock['url']} has lapsed ({stale})")

    return check


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
    campaign: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write {round}/outcome.json and emit its event. `campaign` (planned_seq, lock) is given for a campaign
    round only: it promotes when the decision says so and the campaign is still where it was planned from;
    a standalone round says what the rule would decide."""
    cfg = load_round_config(round_ref["config_url"])
    outcome = conclude_round(
        cfg,
        round_ref["round_dir"],
        model["url"],
        pairs.get("summary"),
        judgements.get("summary"),
        evaluation,
        downstream,
        decision,
        campaign_round=campaign is not None,
        planned_seq=(campaign or {}).get("planned_seq"),
        guard=_lock_guard((campaign or {}).get("lock")),
    )
    emit_outcome_event(outcome)
    return outcome


@task(
    name="record-failure", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent
)
def record_round_failure(
    config: str, overrides: list[str], stage: str, error: str, message: str, campaign: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The outcome of a round that failed for good (the flow passes the error's type name and message);
    None when the config itself does not resolve (there is no round folder to write to)."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError:
        return None
    outcome = record_failure(
        cfg,
        round_url(cfg),
        stage,
        error,
        message,
        campaign_round=campaign is not None,
        planned_seq=(campaign or {}).get("planned_seq"),
    )
    emit_outcome_event(outcome)
    return outcome


@task(name="campaign-paused")
def campaign_paused(config: str, overrides: list[str], why: str) -> None:
    """Say in the UI that the campaign is paused (an event, then the failed run's message), plan nothing."""
    cfg = load_config(config, overrides)
    campaign = cfg.run.campaign
    emit_event(
        event="sao.campaign.paused",
        resource={"prefect.resource.id": f"sao.campaign.{campaign}", "prefect.resource.name": campaign},
        payload={"why": why},
    )
    raise planning.CampaignPaused(f"campaign {campaign} is {why}")


@task(
    name="campaign-report", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent
)
def campaign_report_task(config: str, overrides: list[str]) -> str:
    """{root}/{campaign}/campaign_report.md and .png, and the same as a markdown artifact with the plot inlined."""
    cfg = load_config(config, overrides)
    rows = campaign_rows(cfg.run.root, cfg.run.campaign)
    paused = planning.plan_next(
        cfg.run.root, cfg.run.campaign, cfg.run.seed, cfg.campaign.max_consecutive_failures
    ).paused
    base = storage.join(cfg.run.root, cfg.run.campaign)
    png = plot_campaign(rows, cfg.run.campaign)
    storage.write_bytes(storage.join(base, "campaign_report.png"), png)
    url = storage.join(base, "campaign_report.md")
    storage.write_text(url, campaign_markdown(rows, cfg.run.campaign, "campaign_report.png", paused))
    create_markdown_artifact(
        campaign_markdown(rows, cfg.run.campaign, data_url(png), paused),
        key=artifact_key(cfg.run.campaign, "campaign-report"),
        description=f"campaign {cfg.run.campaign}: every decided round",
    )
    return url
