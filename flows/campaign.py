"""A campaign: N SAO rounds in a row, each from the last promoted model (SAO.md step 7).

    sao campaign --config configs/cpu-smollm2.yaml --rounds 3     # flows/cli.py
    sao_campaign("configs/cpu-smollm2.yaml", [], rounds=3)

Each round is a sao-round subflow with `continue_campaign`: it takes the next round number, starts
from the campaign's CURRENT model, is evaluated against it, and is promoted only if the config's rule
holds. The nightly deployment runs the same round flow, one round a night. The campaign report (a
markdown artifact with its plot, and campaign_report.md/.png in the campaign folder) is rewritten after
every round. A round that fails for good is recorded and passed; after campaign.max_consecutive_failures
of them in a row the campaign pauses (the report and the failed run say why).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.sao_round import sao_round
from sao_core.campaign.campaign_report import campaign_rows
from sao_core.campaign.outcomes import permanent_failure
from sao_core.campaign.planning import FAILED, CampaignPaused
from sao_core.store import storage
from sao_core.store.layout import load_config


@flow(name="sao-campaign")
def sao_campaign(config: str, overrides: list[str] | None = None, rounds: int = 1) -> dict[str, Any]:
    """`rounds` campaign rounds in turn. A round that fails for good has its outcome recorded and the
    campaign goes on with the next (the run still ends Failed, with the last such round's error); a paused
    campaign, or a round that failed without an outcome (the store, a lease: it resumes next time), stops
    it with that error."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    done: list[dict[str, Any]] = []
    last_failure = None
    for _ in range(rounds):
        state = sao_round(config, list(overrides or []), continue_campaign=True, return_state=True)
        if state.is_completed():
            r = state.result()
            done.append(
                {
                    "round": r["round"],
                    "round_dir": r["round_dir"],
                    "outcome": r["outcome"],
                    "evaluation": r.get("evaluation"),
                }
            )
            continue
        error = state.result(raise_on_failure=False)
        failed = _failed_outcome(config, overrides)
        if failed is not None and any(d["round"] == failed["round"] for d in done):
            failed = None  # an earlier round's: this one recorded nothing
        if (
            failed is None
            or isinstance(error, CampaignPaused)
            or not isinstance(error, BaseException)
            or not permanent_failure(error)
        ):
            state.result()  # raises the round's error (or the pause): the campaign run fails with it
        assert failed is not None
        last_failure = state
        done.append(
            {
                "round": failed["round"],
                "round_dir": failed["round_dir"],
                "outcome": failed,
                "evaluation": None,
            }
        )
    rows = [
        {
            "round": r["round"],
            "round_dir": r["round_dir"],
            "status": r["outcome"]["status"],
            "why": r["outcome"]["why"],
            "evaluation": r["evaluation"],  # the round's evaluation manifest (its url), None if it had none
        }
        for r in done
    ]
    if last_failure is not None:
        # The campaign went on past it, but a failed round still fails the run, with that round's error.
        last_failure.result()
    return {"rounds": rows, "report": _report_url(config, overrides)}


def _failed_outcome(config: str, overrides: list[str] | None) -> dict[str, Any] | None:
    """The outcome the last planned round recorded when it failed; None if it recorded none."""
    cfg = load_config(config, list(overrides or []))
    rows = campaign_rows(cfg.run.root, cfg.run.campaign)
    return rows[-1] if rows and rows[-1]["status"] == FAILED else None


def _report_url(config: str, overrides: list[str] | None) -> str:
    cfg = load_config(config, list(overrides or []))
    return storage.join(cfg.run.root, cfg.run.campaign, "campaign_report.md")
