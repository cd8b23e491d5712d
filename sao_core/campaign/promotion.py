"""The promotion gate: a round's model replaces the campaign's current one only if the config's rule holds.

    decision = decide(cfg.promotion, evaluation_manifest, downstream_failures)
    decision.promote, decision.failed    # ["win rate: the interval's lower bound 47.1% is not above 50.0%", ...]

Default rule (`promotion` section): the lower bound of the win rate's 95% interval against the current
model above `min_win_rate_lower` (0.5: better than a coin, with the uncertainty of the sample), the judge's
agreement with the labelled trust set at least `min_judge_agreement`, and no downstream task down more
than `max_downstream_drop` points. Every check is reported, passed or not, with its figure and its
threshold, so the report can say which rule failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sao_core.config import PromotionConfig
from sao_core.fmt import pct


@dataclass(frozen=True)
class Check:
    rule: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [f"{c.rule}: {c.detail}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "failed": self.failed, "checks": [asdict(c) for c in self.checks]}


def decide(
    rule: PromotionConfig,
    evaluation: Mapping[str, Any] | None,
    downstream_failures: Sequence[str] = (),
) -> Decision:
    """Apply the rule to an evaluation manifest (sao_core.evaluation.compare) and the downstream comparison."""
    checks: list[Check] = []
    if evaluation is None:
        return Decision(
            False, [Check("evaluation", False, "the round has no evaluation (evaluation.enabled is false)")]
        )
    primary = evaluation["comparisons"][evaluation["primary"]]
    low = primary.get("win_rate_ci_low")
    if low is None:
        checks.append(
            Check("win rate", False, "no prompt was judged in both orders, so there is no win rate")
        )
    else:
        checks.append(
            Check(
                "win rate",
                low > rule.min_win_rate_lower,
                f"the 95% interval's lower bound {pct(low)} (win rate {pct(primary['win_rate'])}, "
                f"{primary['complete']} prompts) {'is' if low > rule.min_win_rate_lower else 'is not'} above "
                f"promotion.min_win_rate_lower={pct(rule.min_win_rate_lower)}",
            )
        )
    agreement = evaluation.get("trust", {}).get("agreement")
    items = evaluation.get("trust", {}).get("items", 0)
    if agreement is None:
        checks.append(
            Check("judge agreement", False, f"the judge gave no valid verdict on {items} trust items")
        )
    else:
        ok = agreement >= rule.min_judge_agreement
        checks.append(
            Check(
                "judge agreement",
                ok,
                f"{pct(agreement)} on {items} labelled pairs {'meets' if ok else 'is under'} "
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
    return Decision(all(c.passed for c in checks), checks)
