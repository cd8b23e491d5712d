"""The promotion gate: a round's model replaces the campaign's current one only if the config's rule holds.

    decision = decide(cfg.promotion, evaluation_manifest, downstream_failures)
    decision.promote, decision.reason, decision.failed   # ["win rate: the interval's lower bound ...", ...]

Evidence comes first (`promotion.min_judged`, `promotion.min_valid_share`): a judge that parsed on too few
prompts, or whose verdicts mostly did not parse, has not said anything a rate could rest on, so the round
is "not enough evidence" whatever the rates. Then the rule: the lower bound of the win rate's 95% interval
against the current model above `min_win_rate_lower` (0.5: better than a coin, with the uncertainty of the
sample), the judge's agreement with the labelled trust set at least `min_judge_agreement`, and no
downstream task down more than `max_downstream_drop` points. Every check is reported, passed or not, with
its figure, its counts and its threshold, so the report can say which rule failed and on how much data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sao_core.config import PromotionConfig
from sao_core.evaluation.winrate import describe_win_rate
from sao_core.fmt import pct

Reason = Literal["rule held", "rule failed", "not enough evidence", "no evaluation"]
NOT_ENOUGH_EVIDENCE: Reason = "not enough evidence"


@dataclass(frozen=True)
class Check:
    rule: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)
    reason: Reason = "rule held"

    @property
    def failed(self) -> list[str]:
        return [f"{c.rule}: {c.detail}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "failed": self.failed,
            "checks": [asdict(c) for c in self.checks],
        }


def _evidence(rule: PromotionConfig, primary: Mapping[str, Any], trust: Mapping[str, Any]) -> Check:
    """Enough judged prompts, and enough of the evaluation's and the trust set's verdicts parsed."""
    prompts = int(primary.get("prompts") or 0)
    judged = int(primary.get("complete") or 0)
    valid = primary.get("valid_verdicts")
    if valid is None:  # a manifest written before verdicts were counted: what `complete` implies at least
        valid = 2 * judged
    share = valid / (2 * prompts) if prompts else 0.0
    items = int(trust.get("items") or 0)
    trust_valid = int(trust.get("valid_verdicts") or 0)
    trust_share = trust_valid / (2 * items) if items else 0.0
    problems = []
    if judged < rule.min_judged:
        problems.append(
            f"{judged} of {prompts} prompts judged in both orders, under promotion.min_judged={rule.min_judged}"
        )
    if share < rule.min_valid_share:
        problems.append(
            f"{valid} of {2 * prompts} evaluation verdicts parsed ({pct(share)}), under "
            f"promotion.min_valid_share={pct(rule.min_valid_share)}"
        )
    if trust_share < rule.min_valid_share:
        problems.append(
            f"{trust_valid} of {2 * items} trust-set verdicts parsed ({pct(trust_share)}), under "
            f"promotion.min_valid_share={pct(rule.min_valid_share)}"
        )
    if problems:
        return Check("evidence", False, f"{NOT_ENOUGH_EVIDENCE}: " + "; ".join(problems))
    return Check(
        "evidence",
        True,
        f"{judged} of {prompts} prompts judged in both orders (promotion.min_judged={rule.min_judged}); "
        f"{valid} of {2 * prompts} evaluation and {trust_valid} of {2 * items} trust-set verdicts parsed "
        f"(promotion.min_valid_share={pct(rule.min_valid_share)})",
    )


def decide(
    rule: PromotionConfig,
    evaluation: Mapping[str, Any] | None,
    downstream_failures: Sequence[str] = (),
) -> Decision:
    """Apply the rule to an evaluation manifest (sao_core.evaluation.compare) and the downstream comparison."""
    checks: list[Check] = []
    if evaluation is None:
        return Decision(
            False,
            [Check("evaluation", False, "the round has no evaluation (evaluation.enabled is false)")],
            "no evaluation",
        )
    primary = evaluation["comparisons"][evaluation["primary"]]
    trust = evaluation.get("trust") or {}
    evidence = _evidence(rule, primary, trust)
    checks.append(evidence)
    low = primary.get("win_rate_ci_low")
    if low is None:
        checks.append(Check("win rate", False, "no prompt was judged, so there is no win rate"))
    else:
        above = low > rule.min_win_rate_lower
        checks.append(
            Check(
                "win rate",
                above,
                f"the 95% interval's lower bound {pct(low)} (win rate {describe_win_rate(primary)}) "
                f"{'is' if above else 'is not'} above promotion.min_win_rate_lower={pct(rule.min_win_rate_lower)}",
            )
        )
    agreement = trust.get("agreement")
    items = trust.get("items", 0)
    if agreement is None:
        checks.append(Check("judge agreement", False, f"the judge rated none of {items} trust items"))
    else:
        ok = agreement >= rule.min_judge_agreement
        counts = ""
        if "correct_verdicts" in trust:
            invalid = trust.get("invalid_verdicts", 0)
            counts = f", {trust['correct_verdicts']} of {2 * items} verdicts right"
            counts += f", {invalid} unparseable counted wrong" if invalid else ""
        checks.append(
            Check(
                "judge agreement",
                ok,
                f"{pct(agreement)} on {items} labelled pairs{counts} {'meets' if ok else 'is under'} "
                f"promotion.min_judge_agreement={pct(rule.min_judge_agreement)}",
            )
        )
    checks.append(
        Check(
            "downstream",
            not downstream_failures,
            "; ".join(downstream_failures)
            if downstream_failures
            else f"no task fell more than promotion.max_downstream_drop={rule.max_downstream_drop:g} points",
        )
    )
    if not evidence.passed:
        return Decision(False, checks, NOT_ENOUGH_EVIDENCE)
    promote = all(c.passed for c in checks)
    return Decision(promote, checks, "rule held" if promote else "rule failed")
