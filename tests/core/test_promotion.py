"""The promotion gate's rule: each check with its figure and threshold, and the decision."""

from __future__ import annotations

from typing import Any

import pytest

from sao_core.campaign.promotion import decide
from sao_core.config import PromotionConfig


def _evaluation(low: float | None, agreement: float | None, win: float = 0.6) -> dict[str, Any]:
    return {
        "primary": "current",
        "comparisons": {"current": {"win_rate": win, "win_rate_ci_low": low, "complete": 120}},
        "trust": {"agreement": agreement, "items": 75},
    }


@pytest.mark.parametrize(
    ("low", "agreement", "downstream", "promote", "failed"),
    [
        (0.52, 0.8, [], True, []),
        (0.50, 0.8, [], False, ["win rate"]),  # at the bound is not above it
        (0.41, 0.8, [], False, ["win rate"]),
        (0.55, 0.59, [], False, ["judge agreement"]),
        (0.55, 0.60, [], True, []),  # at least: the bound itself passes
        (0.55, 0.8, ["arith acc fell 7.5 points (62.5 -> 55.0), more than 2.0"], False, ["downstream"]),
        (None, None, [], False, ["win rate", "judge agreement"]),
        (0.3, 0.2, ["x fell"], False, ["win rate", "judge agreement", "downstream"]),
    ],
)
def test_rule(
    low: float | None, agreement: float | None, downstream: list[str], promote: bool, failed: list[str]
):
    d = decide(PromotionConfig(), _evaluation(low, agreement), downstream)
    assert d.promote is promote
    assert [f.split(":")[0] for f in d.failed] == failed
    assert [c.rule for c in d.checks] == ["win rate", "judge agreement", "downstream"]
    assert d.to_dict()["promote"] is promote


def test_messages_name_the_figure_and_the_config_key() -> None:
    d = decide(PromotionConfig(min_win_rate_lower=0.55), _evaluation(0.512, 0.9, win=0.6))
    (message,) = d.failed
    assert "51.2%" in message and "60.0%" in message and "120 prompts" in message
    assert "promotion.min_win_rate_lower=55.0%" in message
    ok = decide(PromotionConfig(), _evaluation(0.6, 0.7))
    assert ok.promote and "meets promotion.min_judge_agreement=60.0%" in ok.checks[1].detail


def test_no_evaluation_is_no_promotion() -> None:
    d = decide(PromotionConfig(), None)
    assert not d.promote and "evaluation.enabled" in d.failed[0]
