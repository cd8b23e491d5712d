"""How a round ends: the promotion (compare-and-set, campaign rounds only) and its outcome record, or the
record of the failure that stopped it.

    outcome = conclude_round(cfg, round_dir, model_url, pairs, judgements, evaluation, downstream, decision,
                             campaign_round=True, planned_seq=3, guard=lock_check)
    outcome = record_failure(cfg, round_dir, "train_policy", "TrainingError", "rank 0 died",
                             campaign_round=True, planned_seq=3)
    permanent_failure(error)    # False: a crash-like error (the store, a lease, the orchestrator): it resumes

Only a campaign round moves CURRENT, and only if the campaign's latest record is still the one the round
was planned from and evaluated against and its campaign lock is still held (ledger.promote's expect_seq
and guard); otherwise the outcome is "superseded" and says why. A standalone round (`sao run`) records what
the rule would decide and promotes nothing: it was compared with the recipe's model, not with CURRENT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sao_core.campaign import ledger
from sao_core.campaign.campaign_report import failure_record, round_record, write_round_record
from sao_core.config import RoundConfig
from sao_core.errors import LeaseLost, LeaseTimeout, SAOError, TransientStorageError

# Errors after which the round is left without an outcome, like a crash: the next plan resumes it. A store
# that did not answer, or a lease another holder took, says nothing about the round itself.
RESUMABLE_ERRORS: tuple[type[BaseException], ...] = (
    TransientStorageError,
    ConnectionError,
    TimeoutError,
    LeaseLost,
    LeaseTimeout,
)


def permanent_failure(error: BaseException) -> bool:
    """True when the round failed for good: an error this project raises on purpose (SAOError: the quality
    gate, a fan-out out of attempts, training, a model, the config), which running the round again from the
    same cache repeats. False for RESUMABLE_ERRORS, raised or chained, and for anything else (an outage of
    the orchestrator, a crashed task, an interrupt): the round resumes, as after a crash."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RESUMABLE_ERRORS):
            return False
        seen = seen.__cause__
    return isinstance(error, SAOError)


def conclude_round(
    cfg: RoundConfig,
    round_dir: str,
    model_url: str | None,
    pairs: Mapping[str, Any] | None,
    judgements: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    downstream: Mapping[str, Any] | None,
    decision: Mapping[str, Any] | None,
    *,
    campaign_round: bool,
    planned_seq: int | None = None,
    guard: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Promote the round's model when it is a campaign round and the decision says so (compare-and-set
    against `planned_seq`), then write {round}/outcome.json and return it."""
    seq = superseded = None
    if decision and decision.get("promote") and campaign_round:
        if model_url is None:
            raise ValueError("a round the rule passed has no model to promote")
        why = f"round {cfg.run.round}: " + "; ".join(
            c["detail"] for c in decision.get("checks") or [] if c.get("passed")
        )
        try:
            record = ledger.promote(
                cfg.run.root,
                cfg.run.campaign,
                round_dir,
                model_url,
                why=why,
                expect_seq=planned_seq,
                guard=guard,
            )
            seq = record.seq
        except ledger.PromotionSuperseded as e:
            superseded = str(e)
    outcome = round_record(
        cfg,
        round_dir,
        model_url,
        pairs,
        judgements,
        evaluation,
        downstream,
        decision,
        seq,
        campaign_round=campaign_round,
        superseded=superseded,
        planned_seq=planned_seq,
    )
    write_round_record(round_dir, outcome)
    return outcome


def record_failure(
    cfg: RoundConfig,
    round_dir: str,
    stage: str,
    error: str,
    message: str,
    *,
    campaign_round: bool,
    planned_seq: int | None = None,
) -> dict[str, Any]:
    """Write the outcome of a round that failed for good ({round}/outcome.json, status failed) and return
    it; `error` is the exception's type name."""
    outcome = failure_record(
        cfg, round_dir, stage, error, message, campaign_round=campaign_round, planned_seq=planned_seq
    )
    write_round_record(round_dir, outcome)
    return outcome
