"""Planning a campaign's next round: which round it is, which record and model it starts from, its seed,
and whether the campaign is paused.

    plan = plan_next(root, "nightly", seed=0, max_consecutive_failures=3)
    plan.round, plan.start_seq, plan.seed, plan.paused
    resume(root, "nightly", who="ana", why="fixed the judge template")   # lifts a pause

A campaign's rounds live under {root}/{campaign}/round_{k:03d}-{hash}; the next round starts from the model
the ledger's CURRENT names (a full model folder, or a base plus an adapter), else from the recipe's model.

Every round ends in an outcome record ({round}/outcome.json: promoted, rejected, superseded, failed, ...).
The next round is one past the last one with an outcome, so a round that crashed before its outcome is
planned again with the same settings and resumes from its finished work, while one that failed for good
is passed: the next round has a new number, so new personas (drawn per round) and a new seed (run.seed
plus the number of failed rounds so far), and does not fail the same way from the same cache. After
`campaign.max_consecutive_failures` failed rounds in a row the campaign is paused: planning says why and
plans nothing until a person resumes it (`resume`), which restarts the count.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sao_core.campaign.campaign_report import campaign_rows
from sao_core.campaign.ledger import Promotion, campaign_url, current, default_who, history
from sao_core.config import RoundConfig
from sao_core.errors import CampaignError, ConfigError, ModelNotFoundError
from sao_core.store import storage
from sao_core.store.layout import load_config
from sao_core.store.storage import normalise_url, parent_url
from sao_core.store.trained import finished_run

FAILED = "failed"
RESUMES = "resumes"
_RESUME_NAME = re.compile(r"^after-(\d+)\.json$")


class CampaignPaused(CampaignError):
    """The campaign's last rounds all failed: no round is planned until a person resumes it."""


@dataclass(frozen=True)
class Plan:
    """The campaign's next round: its number, the record it starts from and is compared with, its seed."""

    round: int
    start: Promotion | None  # the record whose model the round starts from; None: the config's model
    seed: int
    failed_rounds: int  # failed rounds of the campaign so far (the seed moves on by this much)
    consecutive_failures: int  # failed rounds since the last success or resume
    paused: str | None  # why no round is planned; None when the campaign may go on

    @property
    def start_seq(self) -> int | None:
        return self.start.seq if self.start else None


def _resumed_after(curl: str) -> int:
    """The last round a person resumed the campaign after (0: never)."""
    folder = storage.join(curl, RESUMES)
    storage.forget_listing(folder)
    names = (u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_files(folder, "*.json"))
    return max((int(m.group(1)) for n in names if (m := _RESUME_NAME.match(n))), default=0)


def pause_message(failures: int, last: dict | None, limit: int) -> str:
    failure = (last or {}).get("failure") or {}
    return (
        f"paused after {failures} failed rounds in a row (campaign.max_consecutive_failures={limit}); "
        f"the last, round {(last or {}).get('round')}, failed in {failure.get('stage', '?')}: "
        f"{failure.get('error', '?')}: {str(failure.get('message', ''))[:300]}. Fix the cause, then resume: "
        "sao campaign-resume --config CFG --why TEXT (or raise campaign.max_consecutive_failures)"
    )


def plan_next(root: str, campaign: str, seed: int, max_consecutive_failures: int) -> Plan:
    """The campaign's next round (see the module docstring); `seed` is the recipe's run.seed."""
    curl = campaign_url(root, campaign)
    rows = campaign_rows(root, campaign)
    number = max((int(r["round"]) for r in rows), default=0) + 1
    failed_rounds = sum(r.get("status") == FAILED for r in rows)
    resumed = _resumed_after(curl)
    streak: list[dict] = []
    for r in reversed(rows):
        if r.get("status") != FAILED or int(r["round"]) <= resumed:
            break
        streak.append(r)
    start = current(root, campaign)
    if start is not None and start.action == "promote" and start.round == number:
        # The round promoted, then crashed before writing its outcome: plan it again from the record it was
        # compared with (None: the config's model), so it resumes with the same settings and finds its
        # promotion already made.
        parent = start.parent_seq
        start = None if parent is None else {r.seq: r for r in history(root, campaign)}[parent]
    paused = None
    if len(streak) >= max_consecutive_failures:
        paused = pause_message(len(streak), streak[0], max_consecutive_failures)
    return Plan(number, start, seed + failed_rounds, failed_rounds, len(streak), paused)


def resume(root: str, campaign: str, who: str | None = None, why: str = "") -> str:
    """Lift a pause: failed rounds up to the last decided one no longer count towards the limit."""
    why = " ".join(why.split())
    if not why:
        raise CampaignError("resuming a paused campaign needs a reason (why): the campaign folder keeps it")
    curl = campaign_url(root, campaign)
    last = max((int(r["round"]) for r in campaign_rows(root, campaign)), default=0)
    url = storage.join(curl, RESUMES, f"after-{last:03d}.json")
    record = {
        "after_round": last,
        "who": who or default_who(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "why": why,
    }
    storage.write_text(url, json.dumps(record, indent=2) + "\n")
    return url


def campaign_of_round(round_dir: str) -> tuple[str, str]:
    """(root, campaign) of a round folder {root}/{campaign}/round_{k:03d}-{hash}."""
    campaign_dir = parent_url(normalise_url(round_dir))
    root, _, campaign = campaign_dir.rpartition("/")
    return root, campaign


def round_model(round_dir: str) -> str:
    """The output folder of the round's finished training run: {round}/model/{training hash of its
    resolved config}, else the one finished run under {round}/model/. ModelNotFoundError if none or several."""
    from sao_core.training.outputs import training_hash

    round_dir = normalise_url(round_dir)
    models = storage.join(round_dir, "model")
    expected: str | None
    try:
        cfg = load_config(storage.join(round_dir, "resolved_config.yaml"))
        expected = storage.join(models, training_hash(cfg))
    except ConfigError:  # a round written under older config keys: look for its runs instead
        expected = None
    if expected and finished_run(expected) is not None:
        return expected
    storage.forget_listing(models)
    found = [
        normalise_url(parent_url(m))
        for m in storage.list_files(models, "*/manifest.json")
        if finished_run(parent_url(m))
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"round {round_dir} has no finished training run under {models}/: train it first "
            "(sao run, or sao train), or name the model"
        )
    raise ModelNotFoundError(
        f"round {round_dir} has {len(found)} trained models ({', '.join(found)}): name one"
    )


def start_model(cfg: RoundConfig) -> tuple[str, str | None]:
    """(model.path, model.adapter) of the model round cfg.run.round starts from (SAO.md step 7): round 1
    from the config's model; a later round from the campaign's current promotion, or from the config's
    model while nothing has been promoted (every round so far failed its gate)."""
    path, adapter, _ = start_point(cfg)
    return path, adapter


def start_point(cfg: RoundConfig) -> tuple[str, str | None, str | None]:
    """(model.path, model.adapter, model.revision) of that model: a promoted adapter keeps the revision
    its hub base was pinned to (the record's model_revision), so the next round loads the very base it
    was trained on, not the hub's newest."""
    if cfg.run.round > 1:
        promoted = current(cfg.run.root, cfg.run.campaign)
        if promoted is not None:
            return promoted.model_path, promoted.model_adapter, promoted.model_revision
    return cfg.model.path, cfg.model.adapter, cfg.model.revision
