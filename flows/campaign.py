"""A campaign: N SAO rounds in a row, each from the last promoted model (SAO.md step 7).

    sao campaign --config configs/cpu-smollm2.yaml --rounds 3     # flows/cli.py
    sao_campaign("configs/cpu-smollm2.yaml", [], rounds=3)

Each round is a sao-round subflow with `continue_campaign`: it takes the next round number, starts
from the campaign's CURRENT model, is evaluated against it, and is promoted only if the config's rule
holds. The nightly deployment runs the same round flow, one round a night. The campaign report (a
markdown artifact with its plot, and campaign_report.md/.png in the campaign folder) is rewritten after
every round.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.sao_round import sao_round


@flow(name="sao-campaign")
def sao_campaign(config: str, overrides: list[str] | None = None, rounds: int = 1) -> dict[str, Any]:
    """`rounds` campaign rounds in turn; a round that fails stops the campaign (its work is kept)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    done = [sao_round(config, list(overrides or []), continue_campaign=True) for _ in range(rounds)]
    return {
        "rounds": [
            {
                "round": r["round"],
                "round_dir": r["round_dir"],
                "status": r["outcome"]["status"],
                "why": r["outcome"]["why"],
            }
            for r in done
        ],
        "report": done[-1]["campaign_report"],
    }
