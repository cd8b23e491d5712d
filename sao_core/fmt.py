"""How reports print numbers: one percent format for every table (round, evaluation, campaign, gate)."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """A share as a percent with one decimal (0.4567 -> "45.7%"); "n/a" when there is none."""
    return "n/a" if x is None else f"{float(x):.1%}"
