"""The quality gate: a round trains only if enough pairs survived and the judge mostly parsed."""

from __future__ import annotations

from typing import Any

from sao_core.config import RoundConfig
from sao_core.errors import RoundQualityError


def check_quality(cfg: RoundConfig, pairs: dict[str, Any], judgements: dict[str, Any]) -> dict[str, Any]:
    """The figures checked; RoundQualityError naming the failed threshold and its config key."""
    n_pairs = int(pairs.get("rows_out", 0))
    diagnostics = judgements.get("diagnostics") or {}
    parse_rate = diagnostics.get("parse_rate")
    problems = []
    if n_pairs < cfg.pairing.min_pairs:
        problems.append(f"{n_pairs} pairs survived, fewer than pairing.min_pairs={cfg.pairing.min_pairs}")
    if parse_rate is None and cfg.judging.min_valid_rate > 0:
        problems.append("the judge gave no verdicts at all (judging.min_valid_rate needs some)")
    elif parse_rate is not None and parse_rate < cfg.judging.min_valid_rate:
        problems.append(
            f"judge parse rate {parse_rate:.1%} is under judging.min_valid_rate={cfg.judging.min_valid_rate:.1%}"
        )
    if problems:
        raise RoundQualityError("round below the quality gate: " + "; ".join(problems))
    return {"pairs": n_pairs, "parse_rate": parse_rate, "min_pairs": cfg.pairing.min_pairs}
