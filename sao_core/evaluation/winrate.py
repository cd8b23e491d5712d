"""Win rate of a candidate policy against a baseline, judged per prompt in both orders, with its biases.

    prompts = [JudgedPrompt("ev-001", candidate_len=812, baseline_len=640,
                            candidate_first="candidate", baseline_first="tie"), ...]
    result = compute_win_rate(prompts)
    result.win_rate, result.win_rate_ci, result.lc_win_rate, result.position_bias

Per prompt the judge saw the two answers twice: candidate as Response 1 (`candidate_first`) and baseline as
Response 1 (`baseline_first`). Each order's verdict is "candidate", "baseline", "tie" or None (unparseable).
A prompt's preference is the mean of its two orders' scores (candidate 1, tie 0.5, baseline 0), so a prompt
whose orders disagree counts as a tie, as in sao_core/evaluation/compare.py. An unparseable verdict scores
as a tie in its order: every prompt counts, so a judge that says little moves the win rate towards one half
instead of leaving a few lucky verdicts to speak for the whole set. `valid_verdicts` and `complete` say how
much the judge did say; the promotion gate asks for enough of both (promotion.min_judged, min_valid_share).

Reported (WinRateResult):
- win_rate: mean preference over all prompts (ties and invalid verdicts count half), `score` the sum, with a
  95% Wilson score interval (win_rate_ci) for `score` successes in `prompts` trials. Wilson stays honest at
  small n (five wins of five give [56.6%, 100%], where a bootstrap gives [100%, 100%]) and, since a prompt's
  preference varies less than a coin's when it can be a tie, it is never narrower than the truth. The
  percentile bootstrap is kept beside it (bootstrap_ci): prompts resampled with replacement, `n_bootstrap`
  (2000) resamples, numpy `default_rng(seed=0)`, 2.5th and 97.5th percentiles of the resampled means.
- ties (preference exactly 0.5) and order_inconsistent_share (the two verdicts differ; in the pipeline,
  whose verdicts name a position, these are the same prompts).
- first_position_share: share of decisive verdicts (either order) for the answer shown first;
  position_bias = first_position_share - 0.5.
- longer_wins_share: share of decisive verdicts, over answers of unequal length, won by the longer answer;
  length_correlation: Pearson correlation of preference with the length difference (candidate - baseline).
- lc_win_rate, the length-controlled win rate of AlpacaEval 2.0 (Dubois et al. 2024, arXiv 2404.04475;
  alpaca_eval `length_controlled_v1`), see `fit_length_controlled`.

Lengths are whatever the caller measures (AlpacaEval uses characters); both answers must use the same unit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from sao_core.fmt import pct

__all__ = [
    "DEFAULT_L2",
    "JudgedPrompt",
    "LengthControlledFit",
    "WinRateResult",
    "Winner",
    "compute_win_rate",
    "describe_win_rate",
    "fit_length_controlled",
    "wilson_interval",
    "winner_from_position",
]

Winner = Literal["candidate", "baseline", "tie"]
WINNERS: tuple[str, ...] = get_args(Winner)
_SCORE = {"candidate": 1.0, "tie": 0.5, "baseline": 0.0}

# L2 strength on the summed log-loss. AlpacaEval fits an L1 logistic regression with cross-validated C and
# pulls it towards "gamed" baselines, data we do not have; a small fixed ridge keeps every coefficient
# finite when the data are separable (the candidate wins every prompt, or the longer answer always wins)
# and moves a non-separable fit on hundreds of prompts by far less than its bootstrap noise.
DEFAULT_L2 = 0.1
_SEPARATED_LOGIT = 20.0  # |logit| beyond which an unpenalised fit has run off to infinity


@dataclass(frozen=True)
class JudgedPrompt:
    """One evaluation prompt: both answers' lengths and the judge's verdict in each presentation order."""

    prompt_id: str
    candidate_len: int
    baseline_len: int
    candidate_first: Winner | None  # the verdict when the candidate was Response 1
    baseline_first: Winner | None  # the verdict when the baseline was Response 1

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_id, str) or not self.prompt_id:
            raise ValueError(f"prompt_id must be non-empty text, got {self.prompt_id!r}")
        for name in ("candidate_len", "baseline_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"prompt {self.prompt_id}: {name} must be an int >= 0, got {value!r}")
        for name in ("candidate_first", "baseline_first"):
            value = getattr(self, name)
            if value is not None and value not in WINNERS:
                raise ValueError(
                    f"prompt {self.prompt_id}: {name} is {value!r}; allowed: {', '.join(WINNERS)} or None"
                )

    @property
    def complete(self) -> bool:
        """Both orders have a verdict."""
        return self.candidate_first is not None and self.baseline_first is not None

    @property
    def valid_verdicts(self) -> int:
        return (self.candidate_first is not None) + (self.baseline_first is not None)

    @property
    def preference(self) -> float:
        """Mean score of the two orders (candidate 1, tie 0.5, baseline 0; an unparseable verdict: a tie)."""
        return (_score(self.candidate_first) + _score(self.baseline_first)) / 2


def _score(verdict: Winner | None) -> float:
    return 0.5 if verdict is None else _SCORE[verdict]


def winner_from_position(position: int | None, candidate_shown_first: bool) -> Winner | None:
    """The winner named by a judge's preferred position (1 or 2, None when invalid) in one order."""
    if position is None:
        return None
    if position not in (1, 2):
        raise ValueError(f"preferred position must be 1, 2 or None, got {position!r}")
    return "candidate" if (position == 1) == candidate_shown_first else "baseline"


# --- length-controlled win rate ------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthControlledFit:
    """The fitted GLM of `fit_length_controlled` and the win rate it predicts at zero length difference."""

    win_rate: float
    coef_model: float
    coef_length: float
    coef_difficulty: float | None  # None when no difficulty was given
    length_std: float | None  # None when the length term is absent (fewer than 2 prompts or no spread)
    l2: float
    iterations: int


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _objective(w: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    z = x @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, tol: float = 1e-10, max_iter: int = 100
) -> tuple[np.ndarray, int]:
    """Minimise sum(log(1 + e^z) - y z) + l2/2 |w|^2, z = x w, y in [0, 1], by damped Newton steps."""
    w = np.zeros(x.shape[1])
    f = _objective(w, x, y, l2)
    for it in range(1, max_iter + 1):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + l2 * w
        if np.max(np.abs(grad)) < tol:
            return w, it - 1
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError as e:
            raise ValueError(
                "length-controlled fit: the design is singular (a constant difficulty duplicates the model "
                "term); use l2 > 0"
            ) from e
        t = 1.0
        while True:  # halve the step until the objective does not increase
            w_new = w - t * step
            f_new = _objective(w_new, x, y, l2)
            if f_new <= f + 1e-12 * abs(f) or t < 1e-10:
                break
            t /= 2
        w, f = w_new, f_new
        if np.max(np.abs(t * step)) < tol:
            return w, it
    raise ValueError(
        f"length-controlled fit did not converge in {max_iter} Newton steps (l2 = {l2}); "
        "separable data (one side always wins) has no finite fit without a penalty: use l2 > 0"
    )


def fit_length_controlled(
    preference: npt.ArrayLike,
    length_diff: npt.ArrayLike,
    difficulty: npt.ArrayLike | None = None,
    l2: float = DEFAULT_L2,
) -> LengthControlledFit:
    """AlpacaEval 2.0's length-controlled win rate (its GLM `length_controlled_v1`), fitted here.

    Per prompt i, with preference y_i in [0, 1] (soft labels: 0.5 is a tie) and length difference
    d_i = len(candidate) - len(baseline):

        P(candidate preferred | i) = sigmoid(theta + beta * tanh(d_i / s) + phi * q_i)

    theta is the model term, s the sample standard deviation (ddof=1) of the d_i, and q_i the instruction's
    difficulty (optional; the term is left out without it). The fit minimises the soft-label log-loss
    sum_i [log(1 + e^z_i) - y_i z_i] + (l2 / 2)(theta^2 + beta^2 + phi^2) by Newton's method with step
    halving (the objective is convex; strictly so when l2 > 0). The length-controlled win rate is the
    prediction with the length term set to zero, averaged over prompts: mean_i sigmoid(theta + phi q_i).

    A length column that is zero everywhere (all d_i equal, so s = 0, or one prompt) is dropped and beta is
    0. Then with l2 = 0 the fitted probabilities average to the mean preference (the model term's score
    equation), so LC equals the raw win rate. With l2 = 0, separable data (one side always wins, overall or
    given the length) has no finite fit and raises ValueError; the default l2 > 0 always has one.

    Differences from alpaca_eval: it fits the same formula (no intercept apart from theta) with an L1 penalty
    and cross-validated C, regularised towards annotations of "gamed" (deliberately verbose and terse)
    baselines that exist only for its own instruction set, and reads the difficulty from a file fitted on
    its leaderboard; here the penalty is a fixed small L2 and the difficulty is the caller's.
    """
    if l2 < 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    y = np.asarray(preference, dtype=float)
    d = np.asarray(length_diff, dtype=float)
    if y.ndim != 1:
        raise ValueError("preference must be one value per prompt")
    n = y.shape[0]
    if n == 0:
        raise ValueError("length-controlled fit needs at least one prompt")
    if d.shape != (n,):
        raise ValueError(f"length_diff has {d.shape[0] if d.ndim else 0} values for {n} preferences")
    if np.any((y < 0) | (y > 1)) or not np.all(np.isfinite(y)):
        raise ValueError("preferences must lie in [0, 1]")
    columns = [np.ones(n)]
    std = float(np.std(d, ddof=1)) if n > 1 else 0.0
    has_length = std > 0
    if has_length:
        columns.append(np.tanh(d / std))
    q = None
    if difficulty is not None:
        q = np.asarray(difficulty, dtype=float)
        if q.shape != (n,) or not np.all(np.isfinite(q)):
            raise ValueError(f"difficulty must hold {n} finite values, one per preference")
        columns.append(q)
    x = np.column_stack(columns)
    w, iterations = _fit_logistic(x, y, l2)
    if l2 == 0 and np.max(np.abs(x @ w)) > _SEPARATED_LOGIT:
        # Without a penalty, separable data has no finite fit: Newton stops wherever the gradient underflows,
        # and that point depends on the start, not on the data.
        raise ValueError(
            "length-controlled fit with l2 = 0: the data are separable (a fitted win probability reached 0 or 1), "
            "so no finite fit exists; use l2 > 0"
        )
    theta = float(w[0])
    beta = float(w[1]) if has_length else 0.0
    phi = float(w[-1]) if q is not None else None
    z0 = np.full(n, theta) if q is None else theta + w[-1] * q
    return LengthControlledFit(
        win_rate=float(np.mean(_sigmoid(z0))),
        coef_model=theta,
        coef_length=beta,
        coef_difficulty=phi,
        length_std=std if has_length else None,
        l2=l2,
        iterations=iterations,
    )


# --- the report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRateResult:
    """Win rate, its interval, ties and the inconsistency share, position and length bias, and the LC win rate.

    Shares are fractions in [0, 1]; a value that the data cannot define (no complete prompt, no decisive
    verdict, no spread in length) is None.
    """

    prompts: int
    complete: int  # prompts with a verdict in both orders
    invalid: int  # prompts with an unparseable verdict in at least one order
    wins: int  # preference > 0.5
    losses: int  # preference < 0.5
    ties: int  # preference == 0.5, invalid prompts included
    win_rate: float | None  # over every prompt; None only for the dict of an older manifest
    win_rate_ci_low: float | None
    win_rate_ci_high: float | None
    ci_method: str
    order_inconsistent_share: float | None
    decisive_verdicts: int  # verdicts, either order, naming a winner
    first_position_share: float | None
    position_bias: float | None
    longer_wins_share: float | None
    length_correlation: float | None
    mean_candidate_len: float
    mean_baseline_len: float
    lc_win_rate: float | None
    lc_coef_model: float | None
    lc_coef_length: float | None
    lc_coef_difficulty: float | None
    lc_length_std: float | None
    lc_l2: float
    score: float = 0.0  # sum of preferences: win_rate = score / prompts
    valid_verdicts: int = 0  # parsed verdicts, of 2 per prompt
    invalid_verdicts: int = 0  # unparseable verdicts, each scored as a tie
    bootstrap_ci_low: float | None = None
    bootstrap_ci_high: float | None = None
    bootstrap_method: str = ""

    @property
    def valid_share(self) -> float:
        """Share of the 2 * prompts verdicts that parsed."""
        return self.valid_verdicts / (2 * self.prompts) if self.prompts else 0.0

    @property
    def win_rate_ci(self) -> tuple[float, float] | None:
        if self.win_rate_ci_low is None or self.win_rate_ci_high is None:
            return None
        return self.win_rate_ci_low, self.win_rate_ci_high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bootstrap_ci(values: np.ndarray, n_bootstrap: int, seed: int, confidence: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    means = np.empty(n_bootstrap)
    chunk = max(1, 2_000_000 // n)  # bounds the index matrix at ~16 MB
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `successes` of `n` trials (fractional successes allowed: ties count half).

    centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), z the normal
    quantile at (1 + confidence) / 2. Unlike the normal or the bootstrap interval it is not of zero width
    when every trial went one way.
    """
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape[0] < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def compute_win_rate(
    prompts: Sequence[JudgedPrompt],
    difficulty: Mapping[str, float] | None = None,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    l2: float = DEFAULT_L2,
) -> WinRateResult:
    """Win rate of the candidate over the baseline and the judge's biases (see the module docstring).

    `difficulty` maps every prompt id to its difficulty (e.g. the baseline's smoothed log-odds on each prompt in earlier runs) and
    adds the instruction term to the LC fit; without it the LC model has the model and length terms only.
    """
    if not prompts:
        raise ValueError("compute_win_rate needs at least one judged prompt")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"prompt ids must be unique; repeated: {repeated[:10]}")
    complete = [p for p in prompts if p.complete]
    if difficulty is not None:
        missing = [p.prompt_id for p in prompts if p.prompt_id not in difficulty]
        if missing:
            raise ValueError(f"difficulty has no value for prompts {missing[:10]} ({len(missing)} in all)")

    prefs = np.array([p.preference for p in prompts], dtype=float)
    diffs = np.array([p.candidate_len - p.baseline_len for p in prompts], dtype=float)
    n = len(prompts)

    # Position and length bias over every valid verdict that names a winner.
    first = decisive = longer = unequal = 0
    for p in prompts:
        for verdict, candidate_first in ((p.candidate_first, True), (p.baseline_first, False)):
            if verdict not in ("candidate", "baseline"):
                continue
            decisive += 1
            first += (verdict == "candidate") == candidate_first
            if p.candidate_len != p.baseline_len:
                unequal += 1
                longer += (verdict == "candidate") == (p.candidate_len > p.baseline_len)
    first_share = first / decisive if decisive else None

    score = float(prefs.sum())
    ci = wilson_interval(score, n, confidence)
    boot = _bootstrap_ci(prefs, n_bootstrap, seed, confidence)
    q = [float(difficulty[p.prompt_id]) for p in prompts] if difficulty is not None else None
    lc = fit_length_controlled(prefs, diffs, q, l2)
    valid = sum(p.valid_verdicts for p in prompts)
    level = round(confidence * 100, 2)
    return WinRateResult(
        prompts=n,
        complete=len(complete),
        invalid=n - len(complete),
        wins=int(np.sum(prefs > 0.5)),
        losses=int(np.sum(prefs < 0.5)),
        ties=int(np.sum(prefs == 0.5)),
        win_rate=score / n,
        win_rate_ci_low=ci[0],
        win_rate_ci_high=ci[1],
        ci_method=f"{level:g}% Wilson score interval over {n} prompts (invalid verdicts count as ties)",
        order_inconsistent_share=(
            sum(p.candidate_first != p.baseline_first for p in complete) / len(complete) if complete else None
        ),
        decisive_verdicts=decisive,
        first_position_share=first_share,
        position_bias=first_share - 0.5 if first_share is not None else None,
        longer_wins_share=longer / unequal if unequal else None,
        length_correlation=_pearson(prefs, diffs),
        mean_candidate_len=sum(p.candidate_len for p in prompts) / n,
        mean_baseline_len=sum(p.baseline_len for p in prompts) / n,
        lc_win_rate=lc.win_rate,
        lc_coef_model=lc.coef_model,
        lc_coef_length=lc.coef_length,
        lc_coef_difficulty=lc.coef_difficulty,
        lc_length_std=lc.length_std,
        lc_l2=l2,
        score=score,
        valid_verdicts=valid,
        invalid_verdicts=2 * n - valid,
        bootstrap_ci_low=boot[0],
        bootstrap_ci_high=boot[1],
        bootstrap_method=f"{level:g}% percentile bootstrap over prompts, {n_bootstrap} resamples, seed {seed}",
    )


def describe_win_rate(result: Mapping[str, Any]) -> str:
    """A win rate with its counts, e.g. `58.3% (14 of 24 prompts, ties half; 2 invalid counted as ties)`,
    from a WinRateResult's dict (an evaluation manifest's comparison)."""
    rate, prompts = result.get("win_rate"), result.get("prompts")
    if rate is None or not prompts:
        return f"{pct(rate)} (no prompt counts)"
    score = result.get("score", rate * prompts)
    invalid = result.get("invalid", 0)
    extra = f"; {invalid} invalid counted as ties" if invalid else ""
    return f"{pct(rate)} ({score:g} of {prompts} prompts, ties half{extra})"
