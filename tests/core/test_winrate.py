"""Win rate, biases and the length-controlled win rate against numbers derived by hand."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from sao_core.evaluation.winrate import (
    DEFAULT_L2,
    JudgedPrompt,
    compute_win_rate,
    describe_win_rate,
    fit_length_controlled,
    winner_from_position,
)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# (prompt_id, candidate_len, baseline_len, verdict with the candidate shown first, with the baseline first)
TABLE = [
    ("p1", 120, 100, "candidate", "candidate"),  # preference 1
    ("p2", 150, 100, "candidate", "candidate"),  # 1
    ("p3", 100, 100, "candidate", "baseline"),  # 0.5, orders disagree, both for the first shown
    ("p4", 80, 100, "baseline", "baseline"),  # 0
    ("p5", 200, 100, "candidate", "tie"),  # 0.75, orders disagree
    ("p6", 90, 100, "tie", "tie"),  # 0.5, orders agree on a tie
    ("p7", 100, 50, None, "candidate"),  # 0.75: the unparseable verdict scores as a tie
    ("p8", 60, 100, "candidate", "baseline"),  # 0.5, orders disagree, both for the first shown
]
PROMPTS = [JudgedPrompt(*row) for row in TABLE]  # type: ignore[arg-type]


def test_counts_and_shares_of_a_hand_table() -> None:
    r = compute_win_rate(PROMPTS)
    assert (r.prompts, r.complete, r.invalid) == (8, 7, 1)
    assert (r.valid_verdicts, r.invalid_verdicts, r.valid_share) == (15, 1, 15 / 16)
    assert (r.wins, r.losses, r.ties) == (4, 1, 3)  # p1 p2 p5 p7 / p4 / p3 p6 p8
    # Every prompt counts: (1 + 1 + 0.5 + 0 + 0.75 + 0.5 + 0.75 + 0.5) / 8
    assert r.score == pytest.approx(5.0)
    assert r.win_rate == pytest.approx(5 / 8)
    assert r.order_inconsistent_share == pytest.approx(3 / 7)  # p3 p5 p8; p6's two ties agree
    # Decisive verdicts, p7's one valid verdict included: 2+2+2+2+1+0+1+2 = 12. For the answer shown
    # first: p1 1, p2 1, p3 2, p4 1 (baseline first, baseline won), p5 1, p7 0, p8 2 = 8.
    assert r.decisive_verdicts == 12
    assert r.first_position_share == pytest.approx(8 / 12)
    assert r.position_bias == pytest.approx(8 / 12 - 0.5)
    # Unequal lengths (p3 left out): p1 2/2, p2 2/2, p4 2/2 (baseline longer, won twice), p5 1/1,
    # p7 1/1, p8 1/2 (the shorter candidate won once) -> 9 of 10 won by the longer answer.
    assert r.longer_wins_share == pytest.approx(9 / 10)
    diffs = [20, 50, 0, -20, 100, -10, 50, -40]
    prefs = [1, 1, 0.5, 0, 0.75, 0.5, 0.75, 0.5]
    assert r.length_correlation == pytest.approx(statistics.correlation(prefs, diffs))
    assert r.mean_candidate_len == 900 / 8
    assert r.mean_baseline_len == 750 / 8
    assert r.win_rate_ci == pytest.approx(_wilson_by_hand(5, 8))
    assert "Wilson" in r.ci_method and "seed 0" in r.bootstrap_method
    assert r.bootstrap_ci_low is not None and r.bootstrap_ci_low <= 5 / 8 <= r.bootstrap_ci_high  # type: ignore[operator]
    assert json.loads(json.dumps(r.to_dict()))["win_rate"] == pytest.approx(5 / 8)
    assert describe_win_rate(r.to_dict()) == "62.5% (5 of 8 prompts, ties half; 1 invalid counted as ties)"


def _wilson_by_hand(s: float, n: int) -> tuple[float, float]:
    z = 1.959963984540054  # the normal 97.5% quantile
    p = s / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_few_judged_prompts_do_not_make_a_sure_win() -> None:
    # Issue 17: 24 prompts, the judge parsed only 2 (both for the candidate). Dropping the invalid ones
    # made a win rate of 100% with a bootstrap interval [100%, 100%]; counted as ties they make
    # (2 + 22 * 0.5) / 24 = 13/24, and the interval says it could well be a coin.
    prompts = [JudgedPrompt(f"e{i}", 5, 5, "candidate", "candidate") for i in range(2)]
    prompts += [JudgedPrompt(f"x{i}", 5, 5, None, None) for i in range(22)]
    r = compute_win_rate(prompts)
    assert (r.complete, r.invalid, r.valid_verdicts) == (2, 22, 4)
    assert r.win_rate == pytest.approx(13 / 24)
    assert r.win_rate_ci_low is not None and r.win_rate_ci_low < 0.5
    assert r.win_rate_ci == pytest.approx(_wilson_by_hand(13, 24))
    # Five wins of five: Wilson's [56.6%, 100%] (z^2 / (5 + z^2)), not the bootstrap's zero width.
    five = compute_win_rate([JudgedPrompt(f"w{i}", 1, 1, "candidate", "candidate") for i in range(5)])
    assert five.bootstrap_ci_low == five.bootstrap_ci_high == 1.0
    assert five.win_rate_ci == pytest.approx((5 / (5 + 1.959963984540054**2), 1.0))


def test_bootstrap_interval_is_seeded_and_matches_the_normal_approximation() -> None:
    # 240 wins and 160 losses: p = 0.6, standard error sqrt(0.6 * 0.4 / 400) = 0.0245, so the normal
    # interval is 0.6 -+ 1.96 * 0.0245 = [0.552, 0.648]; the percentile bootstrap lands within 0.01.
    prompts = [
        JudgedPrompt(f"q{i}", 10, 10, *(("candidate",) * 2 if i < 240 else ("baseline",) * 2))
        for i in range(400)
    ]
    r = compute_win_rate(prompts)
    assert r.win_rate == pytest.approx(0.6)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert r.bootstrap_ci_low == pytest.approx(0.6 - half, abs=0.01)
    assert r.bootstrap_ci_high == pytest.approx(0.6 + half, abs=0.01)
    # At n = 400 Wilson and the normal interval agree closely too.
    assert r.win_rate_ci_low == pytest.approx(0.6 - half, abs=0.002)
    again = compute_win_rate(prompts)
    assert (again.bootstrap_ci_low, again.bootstrap_ci_high) == (r.bootstrap_ci_low, r.bootstrap_ci_high)
    other = compute_win_rate(prompts, seed=1, n_bootstrap=500).bootstrap_ci_low
    assert other == pytest.approx(0.6 - half, abs=0.015)
    # Every prompt won: every resample's mean is 1.
    wins = [JudgedPrompt(f"w{i}", 1, 1, "candidate", "candidate") for i in range(5)]
    assert compute_win_rate(wins).bootstrap_ci_low == 1.0


def test_lc_equals_the_raw_win_rate_when_lengths_are_equal() -> None:
    # No length spread: the length column is dropped, and the model term's score equation
    # sum_i (sigmoid(theta) - y_i) = 0 gives sigmoid(theta) = mean(y) = the raw win rate.
    prompts = [JudgedPrompt(p.prompt_id, 100, 100, p.candidate_first, p.baseline_first) for p in PROMPTS]
    r = compute_win_rate(prompts, l2=0)
    assert r.lc_win_rate == pytest.approx(r.win_rate, abs=1e-9)
    assert r.lc_coef_model == pytest.approx(_logit(5 / 8), abs=1e-8)
    assert r.lc_coef_length == 0 and r.lc_length_std is None
    # With the default penalty the stationarity condition is n (mean(y) - sigmoid(theta)) = l2 theta:
    # slightly shrunk towards one half.
    r = compute_win_rate(prompts)
    theta = r.lc_coef_model
    assert theta is not None and r.lc_win_rate is not None
    assert 8 * (5 / 8 - _sigmoid(theta)) == pytest.approx(DEFAULT_L2 * theta, abs=1e-9)
    assert 0.5 < r.lc_win_rate < 5 / 8


def test_lc_with_a_difficulty_term_and_equal_lengths_still_equals_the_raw_win_rate() -> None:
    # Two difficulty levels: q = 0 for p1..p4 (mean preference 3/4), q = 1 for p5..p8 (mean 1/4). The model
    # is saturated: theta = logit(3/4) = ln 3, phi = logit(1/4) - logit(3/4) = -2 ln 3, and the average of
    # the fitted probabilities is (4 * 3/4 + 4 * 1/4) / 8 = 1/2 = the raw win rate.
    prefs = [1, 1, 1, 0, 0, 0, 1, 0]
    q = [0, 0, 0, 0, 1, 1, 1, 1]
    fit = fit_length_controlled(prefs, [0] * 8, q, l2=0)
    assert fit.coef_model == pytest.approx(math.log(3), abs=1e-9)
    assert fit.coef_difficulty == pytest.approx(-2 * math.log(3), abs=1e-9)
    assert fit.win_rate == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("short_group", [[1.0, 0.0], [0.5, 0.5]])
@pytest.mark.parametrize("gap", [3, 100, 5000])
def test_lc_has_a_closed_form_for_two_length_groups(short_group: list[float], gap: int) -> None:
    # Six prompts where the candidate is longer by `gap` (it wins 5 of 6) and two where it is shorter by
    # `gap` (mean preference 1/2). tanh(d / s) takes two values, +t and -t, so the unpenalised model is
    # saturated and fits each group's mean exactly:
    #   theta + beta t = logit(5/6) = ln 5,   theta - beta t = logit(1/2) = 0
    # so theta = ln(5) / 2, beta = ln(5) / (2t), and LC = sigmoid(ln(5) / 2) = sqrt(5) / (1 + sqrt(5)),
    # whatever the gap and whether the short group is one win and one loss or two ties.
    # s: the differences are +gap (x6) and -gap (x2), mean gap/2, squared deviations 6 (gap/2)^2 +
    # 2 (3 gap/2)^2 = 6 gap^2, so s = gap sqrt(6/7) and t = tanh(sqrt(7/6)).
    prefs = [1, 1, 1, 1, 1, 0, *short_group]
    diffs = [gap] * 6 + [-gap] * 2
    fit = fit_length_controlled(prefs, diffs, l2=0)
    assert fit.win_rate == pytest.approx(math.sqrt(5) / (1 + math.sqrt(5)), abs=1e-9)
    assert fit.coef_model == pytest.approx(math.log(5) / 2, abs=1e-9)
    assert fit.length_std == pytest.approx(gap * math.sqrt(6 / 7))
    assert fit.coef_length == pytest.approx(math.log(5) / (2 * math.tanh(math.sqrt(7 / 6))), abs=1e-9)
    raw = sum(prefs) / 8  # 0.75: LC (0.691) is below it, the longer answer won more often
    assert fit.win_rate < raw


def test_lc_falls_below_the_raw_win_rate_when_the_longer_answer_always_wins() -> None:
    # The candidate is longer on 6 prompts and wins all of them, shorter on 2 and loses both: raw 6/8.
    # The data are separable (the length sign predicts every verdict), so only the penalty keeps beta finite.
    prompts = [
        JudgedPrompt(f"l{i}", 300, 100, "candidate", "candidate") if i < 6 else
        JudgedPrompt(f"l{i}", 100, 300, "baseline", "baseline")
        for i in range(8)
    ]  # fmt: skip
    r = compute_win_rate(prompts)
    assert r.win_rate == 0.75 and r.longer_wins_share == 1.0
    assert r.lc_win_rate is not None and r.lc_coef_model is not None and r.lc_coef_length is not None
    assert 0.5 < r.lc_win_rate < 0.75
    assert r.lc_coef_length > 0
    # The penalised gradient vanishes at the returned coefficients (computed here, not by the module).
    assert r.lc_length_std is not None
    t = math.tanh(200 / r.lc_length_std)
    theta, beta = r.lc_coef_model, r.lc_coef_length
    p_long, p_short = _sigmoid(theta + beta * t), _sigmoid(theta - beta * t)
    assert 6 * (p_long - 1) + 2 * p_short + DEFAULT_L2 * theta == pytest.approx(0, abs=1e-8)
    assert t * (6 * (p_long - 1) - 2 * p_short) + DEFAULT_L2 * beta == pytest.approx(0, abs=1e-8)
    # As l2 -> 0, beta grows without bound and the loss near the limit is 6 e^-(beta t + theta) +
    # 2 e^-(beta t - theta); its minimum over theta is at e^(2 theta) = 6/2, so LC tends to
    # sigmoid(ln(3) / 2) = sqrt(3) / (1 + sqrt(3)) = 0.634, still below the raw 0.75.
    tiny = fit_length_controlled([1] * 6 + [0] * 2, [200] * 6 + [-200] * 2, l2=1e-6)
    assert tiny.win_rate == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=0.01)
    # Without a penalty there is no finite fit, and the fit says so.
    with pytest.raises(ValueError, match="separable"):
        fit_length_controlled([1] * 6 + [0] * 2, [200] * 6 + [-200] * 2, l2=0)


def test_lc_rises_above_the_raw_win_rate_when_the_candidate_is_shorter() -> None:
    # The mirror image: the candidate is shorter on 6 prompts and wins 1 of them (mean 1/6), longer on 2
    # (one win, one loss: mean 1/2). Raw win rate 2/8 = 0.25. Saturated fit:
    #   theta - beta t = logit(1/6) = -ln 5,   theta + beta t = 0
    # so theta = -ln(5) / 2 and LC = sigmoid(-ln(5) / 2) = 1 / (1 + sqrt(5)) = 0.309 > 0.25.
    prefs = [1, 0, 0, 0, 0, 0, 1, 0]
    fit = fit_length_controlled(prefs, [-50] * 6 + [50] * 2, l2=0)
    assert fit.coef_length > 0  # the judge still favours the longer answer
    assert fit.win_rate == pytest.approx(1 / (1 + math.sqrt(5)), abs=1e-9)
    assert fit.win_rate > 0.25


def test_winner_from_position() -> None:
    assert winner_from_position(1, candidate_shown_first=True) == "candidate"
    assert winner_from_position(2, candidate_shown_first=True) == "baseline"
    assert winner_from_position(1, candidate_shown_first=False) == "baseline"
    assert winner_from_position(2, candidate_shown_first=False) == "candidate"
    assert winner_from_position(None, candidate_shown_first=True) is None
    with pytest.raises(ValueError, match="1, 2 or None"):
        winner_from_position(3, candidate_shown_first=True)


def test_nothing_valid_is_a_coin_with_a_wide_interval_not_a_crash() -> None:
    r = compute_win_rate([JudgedPrompt("x", 3, 4, None, None), JudgedPrompt("y", 3, 4, None, "tie")])
    assert (r.complete, r.invalid, r.valid_verdicts) == (0, 2, 1)
    assert r.win_rate == 0.5 and r.win_rate_ci == pytest.approx(_wilson_by_hand(1, 2))
    assert r.order_inconsistent_share is None
    assert r.first_position_share is None and r.longer_wins_share is None
    json.dumps(r.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidate_first": "win"}, "candidate_first is 'win'"),
        ({"baseline_len": -1}, "baseline_len must be an int >= 0"),
        ({"candidate_len": 2.5}, "candidate_len must be an int >= 0"),
        ({"prompt_id": ""}, "prompt_id must be non-empty"),
    ],
)
def test_judged_prompt_rejects_bad_fields(kwargs: dict, message: str) -> None:
    row = {
        "prompt_id": "p",
        "candidate_len": 1,
        "baseline_len": 1,
        "candidate_first": None,
        "baseline_first": None,
    }
    with pytest.raises(ValueError, match=message):
        JudgedPrompt(**{**row, **kwargs})


def test_compute_win_rate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        compute_win_rate([])
    with pytest.raises(ValueError, match=r"repeated: \['p1'\]"):
        compute_win_rate([PROMPTS[0], PROMPTS[0]])
    with pytest.raises(ValueError, match="difficulty has no value"):
        compute_win_rate(PROMPTS, {"p1": 0.0})
    with pytest.raises(ValueError, match="l2 must be"):
        fit_length_controlled([1, 0], [1, 2], l2=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_length_controlled([2, 0], [1, 2])


def test_fit_agrees_with_a_brute_force_minimum() -> None:
    # An independent check on noisy data: the penalised objective at the Newton solution is no larger
    # than anywhere on a fine grid around it.
    rng = np.random.default_rng(7)
    diffs = rng.normal(0, 300, 60)
    prefs = (rng.random(60) < 1 / (1 + np.exp(-(0.3 + diffs / 300)))).astype(float)
    fit = fit_length_controlled(prefs, diffs)
    x1 = np.tanh(diffs / np.std(diffs, ddof=1))

    def objective(theta: float, beta: float) -> float:
        z = theta + beta * x1
        return float(np.sum(np.logaddexp(0, z) - prefs * z) + DEFAULT_L2 / 2 * (theta**2 + beta**2))

    best = objective(fit.coef_model, fit.coef_length)
    for dt in np.linspace(-0.2, 0.2, 21):
        for db in np.linspace(-0.2, 0.2, 21):
            assert best <= objective(fit.coef_model + dt, fit.coef_length + db) + 1e-12
