"""The quality gate: a round trains only if enough pairs survived and enough judgements gave a pair."""

from __future__ import annotations

from typing import Any

from sao_core.config import RoundConfig
from sao_core.errors import RoundQualityError


def judge_valid_rate(cfg: RoundConfig, judgements: dict[str, Any]) -> tuple[float | None, str | None]:
    """The share of judgements that gave a usable pair, and the figure it was read from (None: none).

    Valid, not parsed: with `judging.swap` both orders can parse and still name different winners, and
    with more than two answers the wins can tie. `judgements` is the judgements stage manifest or its
    summary. A summary with only the parse rate (hand-written, or older than the valid rate) stands in
    only where the two rates are the same figure: one order, two answers.
    """
    diagnostics = judgements.get("diagnostics") or {}
    if "valid_rate" in diagnostics:
        return diagnostics["valid_rate"], "valid rate"
    counts = judgements.get("judge_counts") or {}
    if "judgements" in counts:
        total = int(counts["judgements"])
        return (round(int(counts.get("valid_judgements", 0)) / total, 4) if total else None), "valid rate"
    if "parse_rate" in diagnostics and not cfg.judging.swap and cfg.responses.k == 2:
        return diagnostics["parse_rate"], "parse rate"
    return None, None


def check_quality(cfg: RoundConfig, pairs: dict[str, Any], judgements: dict[str, Any]) -> dict[str, Any]:
    """The figures checked; RoundQualityError naming the failed threshold and its config key."""
    n_pairs = int(pairs.get("rows_out", 0))
    diagnostics = judgements.get("diagnostics") or {}
    valid_rate, measure = judge_valid_rate(cfg, judgements)
    min_rate = cfg.judging.min_valid_rate
    problems = []
    if n_pairs < cfg.pairing.min_pairs:
        problems.append(f"{n_pairs} pairs survived, fewer than pairing.min_pairs={cfg.pairing.min_pairs}")
    if measure is None and min_rate > 0:
        problems.append(
            "the judgements manifest has no valid rate (diagnostics.valid_rate) for "
            f"judging.min_valid_rate={min_rate:.1%} to check"
        )
    elif valid_rate is None and min_rate > 0:
        problems.append(
            f"the judge gave no verdicts at all (judging.min_valid_rate={min_rate:.1%} needs some)"
        )
    elif valid_rate is not None and valid_rate < min_rate:
        problem = f"judge {measure} {valid_rate:.1%} is under judging.min_valid_rate={min_rate:.1%}"
        consistency = diagnostics.get("swap_consistency")
        if cfg.judging.swap and consistency is not None:
            # The usual cause with swap on: a position-biased judge ranks the first answer first both times.
            problem += f" (judging.swap: the two orders agreed on {consistency:.1%} of pairs)"
        problems.append(problem)
    if problems:
        raise RoundQualityError("round below the quality gate: " + "; ".join(problems))
    return {
        "pairs": n_pairs,
        "valid_rate": valid_rate,
        "parse_rate": diagnostics.get("parse_rate"),
        "min_pairs": cfg.pairing.min_pairs,
        "min_valid_rate": min_rate,
    }
