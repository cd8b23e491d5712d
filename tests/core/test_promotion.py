"""The promotion gate's rule: each check with its figure and threshold, and the decision."""

from __future__ import annotations

from typing import Any

import pytest

from sao_core.campaign.promotion import decide
from sao_core.config import PromotionConfig
from sao_core.evaluation.winrate import JudgedPrompt, compute_win_rate
from sao_core.store.evalsets import judge_agreement


def _evaluation(
    low: float | None, agreement: float | None, win: float = 0.6, judged: int = 120, valid: int = 240
) -> dict[str, Any]:
    current = {
        "win_rate": win,
        "win_rate_ci_low": low,
        "prompts": 120,
        "complete": judged,
        "score": win * 120,
        "invalid": 120 - judged,
        "valid_verdicts": valid,
    }
    return {
        "primary": "current",
        "comparisons": {"current": current},
        "trust": {"agreement": agreement, "items": 75, "valid_verdicts": 150},
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
    assert [c.rule for c in d.checks] == ["evidence", "win rate", "judge agreement", "downstream"]
    assert d.to_dict()["promote"] is promote
    assert d.reason == ("rule held" if promote else "rule failed")


def test_messages_name_the_figure_and_the_config_key() -> None:
    d = decide(PromotionConfig(min_win_rate_lower=0.55), _evaluation(0.512, 0.9, win=0.6))
    (message,) = d.failed
    assert "51.2%" in message and "60.0% (72 of 120 prompts, ties half)" in message
    assert "promotion.min_win_rate_lower=55.0%" in message
    ok = decide(PromotionConfig(), _evaluation(0.6, 0.7))
    assert ok.promote and "meets promotion.min_judge_agreement=60.0%" in ok.checks[2].detail
    assert "120 of 120 prompts judged in both orders" in ok.checks[0].detail


def _manifest(judged: list[JudgedPrompt], trust: list[tuple[int | None, int | None]]) -> dict[str, Any]:
    """An evaluation manifest as sao_core.evaluation.compare writes it, from the statistics themselves."""
    return {
        "primary": "current",
        "comparisons": {"current": compute_win_rate(judged).to_dict()},
        "trust": judge_agreement(trust),
    }


def test_two_judged_prompts_of_24_are_not_enough_evidence() -> None:
    # Issue 17: 24 evaluation prompts with 2 judged (both wins), 30 trust pairs with 2 valid verdicts of
    # 60 (both right). Before: "lower bound 100.0%", "100.0% on 30 labelled pairs": promoted.
    judged = [JudgedPrompt(f"e{i}", 9, 9, "candidate", "candidate") for i in range(2)]
    judged += [JudgedPrompt(f"x{i}", 9, 9, None, None) for i in range(22)]
    trust: list[tuple[int | None, int | None]] = [(1, 2)] + [(None, None)] * 29
    d = decide(PromotionConfig(), _manifest(judged, trust))
    assert not d.promote and d.reason == "not enough evidence"
    evidence = d.checks[0]
    assert evidence.rule == "evidence" and not evidence.passed
    assert "2 of 24 prompts judged in both orders, under promotion.min_judged=20" in evidence.detail
    assert "4 of 48 evaluation verdicts parsed (8.3%)" in evidence.detail
    assert "2 of 60 trust-set verdicts parsed (3.3%)" in evidence.detail
    rates = {c.rule: c for c in d.checks}
    assert "13 of 24 prompts, ties half; 22 invalid counted as ties" in rates["win rate"].detail
    assert not rates["win rate"].passed and not rates["judge agreement"].passed
    assert "2 of 60 verdicts right, 58 unparseable counted wrong" in rates["judge agreement"].detail
    # The same judge saying enough passes on evidence, and the rule decides.
    plenty = [JudgedPrompt(f"e{i}", 9, 9, "candidate", "candidate") for i in range(24)]
    d = decide(PromotionConfig(), _manifest(plenty, [(1, 2)] * 30))
    assert d.promote and d.reason == "rule held"


@pytest.mark.parametrize(
    ("judged", "valid", "min_judged", "min_valid_share", "promote"),
    [
        (120, 240, 120, 1.0, True),  # at both thresholds: enough
        (119, 240, 120, 0.0, False),  # one judged prompt short
        (120, 191, 1, 0.8, False),  # 191 of 240 = 79.6% parsed
        (120, 192, 1, 0.8, True),  # 192 of 240 = 80%
    ],
)
def test_evidence_thresholds(judged: int, valid: int, min_judged: int, min_valid_share: float, promote: bool):
    rule = PromotionConfig(min_judged=min_judged, min_valid_share=min_valid_share)
    d = decide(rule, _evaluation(0.6, 0.9, judged=judged, valid=valid))
    assert d.promote is promote
    assert d.reason == ("rule held" if promote else "not enough evidence")


def test_no_evaluation_is_no_promotion() -> None:
    d = decide(PromotionConfig(), None)
    assert not d.promote and "evaluation.enabled" in d.failed[0] and d.reason == "no evaluation"
