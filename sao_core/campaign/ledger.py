"""Campaign state: the promoted model each round starts from, and every promotion and rollback behind it.

    promote(root, "nightly", round_dir, model_url, who="ana", why="won the gate: win rate 0.61")
    current(root, "nightly")                  # the latest record, or None before the first promotion
    rollback(root, "nightly", who="ana", why="regressed on GSM8K")   # back to the model before it
    history(root, "nightly")                  # every promotion and rollback, oldest first
    start_model(cfg)                          # (model.path, model.adapter) that round cfg.run.round starts from

SAO.md step 7: round t+1 starts from M_{t+1}, the model promoted last; round 1 from model.path.

Layout under {root}/{campaign}/ (DESIGN.md, "Artifact layout"):

    promotions/000001.json ...   one immutable record per promotion or rollback, created exclusively
    CURRENT                      a copy of the latest record, for people and tools that read one file
    history.jsonl                every record, oldest first, rebuilt after each new one

The records are the truth. A new one takes the next number with a create-only write (a hard link on
local disks, `If-None-Match: *` on S3: atomic.write_bytes_exclusive), so of two promotions at once one
gets the number and the other finds it taken, reads again and takes the next: both are kept, in order,
and no reader ever sees a half-written record. CURRENT is then overwritten as a cache; readers take the
highest-numbered record and rewrite CURRENT when it is missing, unreadable or behind.

A promoted model is the output folder of a finished training run (sao_core.training: manifest.json,
written last, beside its adapter/ or full/ weights). Its record also says how the next round loads it:
full/ as model.path, or adapter/ as model.adapter on the base model it was trained from.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal

from sao_core.errors import CampaignError, StorageConflict, StorageError
from sao_core.store import atomic, layout, storage, trained
from sao_core.store.trained import TrainedModel

log = logging.getLogger(__name__)

Action = Literal["promote", "rollback"]

PROMOTIONS = "promotions"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"
SEQ_DIGITS = 6
ATTEMPTS = 5  # tries at the next record number when other writers keep taking it
ACTIONS = ("promote", "rollback")
_RECORD_NAME = re.compile(r"^(\d+)\.json$")
_CAMPAIGN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # as config.RunConfig.campaign


@dataclass(frozen=True)
class Promotion:
    """One record: the model the campaign's next round starts from, since when, by whom and why."""

    seq: int
    action: Action
    round: int | None  # the round the model was trained in
    round_dir: str
    model: str  # the training run's output folder
    model_sha: str  # content key of the weights the next round loads (sao_core.store.models.content_key)
    model_path: str  # the next round's model.path
    model_adapter: str | None  # the next round's model.adapter
    model_revision: str | None  # the next round's model.revision (a hub base under an adapter)
    parent: str | None  # the model current before this record; None: the campaign's base model
    parent_seq: int | None
    to_seq: int | None  # rollback: the record whose model it restores
    who: str
    when: str  # UTC, ISO 8601
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Promotion:
        """A record read back; StorageError naming the file when it is not one (keys it lacks, bad action)."""
        if not isinstance(data, dict):
            raise StorageError(f"malformed promotion record {where}: expected a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise StorageError(f"malformed promotion record {where}: no {', '.join(missing)}")
        if not isinstance(data["seq"], int) or data["action"] not in ACTIONS:
            raise StorageError(
                f"malformed promotion record {where}: seq {data['seq']!r} must be a number and action "
                f"{data['action']!r} one of {', '.join(ACTIONS)}"
            )
        return cls(**{n: data[n] for n in names})


def campaign_url(root: str, campaign: str) -> str:
    """{root}/{campaign}, the folder holding a campaign's rounds and its promotion records."""
    if not _CAMPAIGN_NAME.match(campaign):
        raise CampaignError(
            f"campaign name {campaign!r} must start with a letter or digit and hold only letters, digits, "
            "'_', '.' and '-' (as run.campaign)"
        )
    return f"{storage.normalise_url(root)}/{campaign}"


# --- records -------------------------------------------------------------------------------------------


def default_who() -> str:
    """Who is promoting: $SAO_USER, else the login name."""
    try:
        return os.environ.get("SAO_USER") or getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _reason(why: str) -> str:
    why = " ".join(str(why or "").split())
    if not why:
        raise CampaignError("a promotion or a rollback needs a reason (why): the history keeps it")
    return why


def _record_url(curl: str, seq: int) -> str:
    return storage.join(curl, PROMOTIONS, f"{seq:0{SEQ_DIGITS}d}.json")


def _seqs(curl: str) -> list[int]:
    folder = storage.join(curl, PROMOTIONS)
    storage.forget_listing(folder)
    names = (url.rstrip("/").rsplit("/", 1)[-1] for url in storage.list_files(folder, "*.json"))
    return sorted(int(m.group(1)) for name in names if (m := _RECORD_NAME.match(name)))


def _read(curl: str, seq: int) -> Promotion:
    url = _record_url(curl, seq)
    record = Promotion.from_dict(storage.read_json(url), url)
    if record.seq != seq:
        raise StorageError(f"promotion record {url} says it is number {record.seq}")
    return record


def _latest(curl: str) -> Promotion | None:
    seqs = _seqs(curl)
    return _read(curl, seqs[-1]) if seqs else None


def _encode(record: Promotion) -> bytes:
    return (json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _current_problem(curl: str, latest: Promotion | None) -> str | None:
    """What is wrong with CURRENT, given the latest record; None when it is a copy of that record."""
    url = storage.join(curl, CURRENT)
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        return None if latest is None else "is missing"
    if latest is None:
        raise StorageError(
            f"{url} exists but {storage.join(curl, PROMOTIONS)} holds no promotion record to check it "
            "against: restore the records, or remove CURRENT to start from the base model"
        )
    try:
        cached = Promotion.from_dict(json.loads(text), url)
    except (ValueError, StorageError) as e:
        return f"is unreadable ({str(e)[:160]})"
    if cached == latest:
        return None
    if cached.seq != latest.seq:
        return f"names record {cached.seq}, the latest record is {latest.seq}"
    return f"differs from record {latest.seq}"


def _write_views(curl: str, records: list[Promotion]) -> None:
    """CURRENT (the latest record) and history.jsonl (all of them), both rebuilt from the records."""
    storage.write_bytes(storage.join(curl, CURRENT), _encode(records[-1]))
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    storage.write_text(storage.join(curl, HISTORY), lines)


def _append(curl: str, make: Callable[[Promotion | None], Promotion | None], attempts: int) -> Promotion:
    """Write the record `make` builds on the latest one under the next number, retrying when another
    writer takes that number first; `make` returns None when the latest record already says it all."""
    for attempt in range(1, attempts + 1):
        latest = _latest(curl)
        record = make(latest)
        if record is None:
            assert latest is not None
            return latest
        try:
            atomic.write_bytes_exclusive(_record_url(curl, record.seq), _encode(record))
        except StorageConflict:
            log.info(
                "%s: record %d was taken by another writer (try %d of %d)",
                curl,
                record.seq,
                attempt,
                attempts,
            )
            continue
        _write_views(curl, [_read(curl, s) for s in _seqs(curl)])
        log.info("%s: record %d, %s %s", curl, record.seq, record.action, record.model)
        return record
    raise StorageConflict(
        f"{curl}: gave up after {attempts} tries; each time another writer took the next record number"
    )


# --- the public API ------------------------------------------------------------------------------------


def current(root: str, campaign: str, repair: bool = True) -> Promotion | None:
    """The latest promotion record (None before the first); CURRENT is rewritten from it when it
    disagrees (missing, unreadable, behind), unless repair is False."""
    curl = campaign_url(root, campaign)
    latest = _latest(curl)
    problem = _current_problem(curl, latest)
    if problem is not None:
        # A record written since the listing (CURRENT ahead of it): read again rather than step back.
        newer = _latest(curl)
        if newer is not None and latest is not None and newer.seq > latest.seq:
            latest, problem = newer, _current_problem(curl, newer)
    if problem is not None and latest is not None and repair:
        log.warning("%s %s: rewritten from record %d", storage.join(curl, CURRENT), problem, latest.seq)
        storage.write_bytes(storage.join(curl, CURRENT), _encode(latest))
    return latest


def history(root: str, campaign: str) -> list[Promotion]:
    """Every promotion and rollback of the campaign, oldest first."""
    curl = campaign_url(root, campaign)
    return [_read(curl, seq) for seq in _seqs(curl)]


def next_round_model(model: TrainedModel, settings: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(model.path, model.adapter, model.revision) that load the trained model in the next round."""
    if model.manifest.get("full_model"):
        return model.weights, None, None
    started = settings.get("model") or {}
    if started.get("adapter"):
        # Training merges the starting adapter into the base (training.run.load_model), so the new adapter
        # fits base + old adapter, which no single (model.path, model.adapter) can load.
        raise CampaignError(
            f"{model.url} holds only a LoRA adapter, trained on {started.get('path')} with the adapter "
            f"{started['adapter']} merged in, which no (model.path, model.adapter) loads: train that round "
            "with training.merge: true (it also writes full/) and promote it"
        )
    base = model.manifest.get("model") or started.get("path")
    return str(base), model.weights, started.get("revision")


class PromotionSuperseded(CampaignError):
    """A round's promotion found the campaign moved on since the round was planned (another record, or its
    campaign lock lost): nothing is written, CURRENT stays as it is, and the round's outcome says why."""


class _Unchecked:
    """`expect_seq` left out: promote on top of whatever is latest (a person's `sao promote`)."""


UNCHECKED = _Unchecked()


def promote(
    root: str,
    campaign: str,
    round_dir: str,
    model_url: str,
    who: str | None = None,
    why: str = "",
    attempts: int = ATTEMPTS,
    expect_seq: int | _Unchecked | None = UNCHECKED,
    guard: Callable[[], None] | None = None,
) -> Promotion:
    """Make a round's trained model the one the campaign's next round starts from; return its record.

    The model must be a finished training run (trained_model) on the pairs of `round_dir`. Promoting the
    model that is already current writes nothing and returns the current record, so a retried promotion
    step does not record it twice.

    Compare-and-set: with `expect_seq` (the record the round was planned from and evaluated against, None
    for "no record yet") the record is written only while that is still the latest, so its parent is the
    model the round was compared with; `guard` (e.g. the campaign lock's check) is called just before the
    write. Either failing raises PromotionSuperseded and writes nothing. A rollback or promotion made while
    the round ran stands.
    """
    why = _reason(why)
    curl = campaign_url(root, campaign)
    round_dir = storage.normalise_url(round_dir)
    settings = layout.round_settings(round_dir)
    model = trained.trained_model(model_url)
    if model.round_dir is None:
        raise CampaignError(
            f"cannot tell which round {model.url} was trained from: its pair files are not in a round "
            "folder and it is not under {round}/model/"
        )
    if model.round_dir != round_dir:
        raise CampaignError(f"{model.url} was trained on the pairs of {model.round_dir}, not of {round_dir}")
    path, adapter, revision = next_round_model(model, settings)
    sha = trained.weights_key(model.weights)
    who = who or default_who()
    round_index = (settings.get("run") or {}).get("round")

    def make(latest: Promotion | None) -> Promotion | None:
        if latest is not None and latest.model == model.url and latest.model_sha == sha:
            log.info("%s is already current (record %d): nothing to write", model.url, latest.seq)
            return None
        latest_seq = latest.seq if latest else None
        if not isinstance(expect_seq, _Unchecked) and latest_seq != expect_seq:
            now = (
                f"record {latest.seq} ({latest.action} {latest.model} by {latest.who})" if latest else "none"
            )
            raise PromotionSuperseded(
                f"{curl}: the round was planned from and evaluated against "
                f"{'record ' + str(expect_seq) if expect_seq is not None else 'the base model (no record)'}, "
                f"but the latest record is now {now}: not promoted, CURRENT left as it is"
            )
        if guard is not None:
            try:
                guard()
            except Exception as e:  # the lock lost or unreadable: someone else may be planning meanwhile
                raise PromotionSuperseded(f"{curl}: not promoted: {e}") from e
        return Promotion(
            seq=latest.seq + 1 if latest else 1,
            action="promote",
            round=round_index,
            round_dir=round_dir,
            model=model.url,
            model_sha=sha,
            model_path=path,
            model_adapter=adapter,
            model_revision=revision,
            parent=latest.model if latest else None,
            parent_seq=latest.seq if latest else None,
            to_seq=None,
            who=who,
            when=_now(),
            why=why,
        )

    return _append(curl, make, attempts)


def _in_force(records: dict[int, Promotion], record: Promotion) -> Promotion:
    """The promotion a record stands for: itself, or for a rollback the promotion it went back to."""
    seen = set()
    while record.action == "rollback":
        if record.to_seq is None or record.to_seq not in records or record.seq in seen:
            raise StorageError(
                f"rollback record {record.seq} names record {record.to_seq}, which is not there"
            )
        seen.add(record.seq)
        record = records[record.to_seq]
    return record


def rollback(
    root: str,
    campaign: str,
    who: str | None = None,
    why: str = "",
    to_seq: int | None = None,
    attempts: int = ATTEMPTS,
) -> Promotion:
    """Go back to an earlier model with a new record: by default the one current before the promotion
    now in force, or the model of record `to_seq`. The model must still be there with the same weights.

    Without `to_seq` the target depends on what is current, so a record written meanwhile by someone
    else stops the rollback (StorageConflict) instead of rolling back their promotion.
    """
    why = _reason(why)
    curl = campaign_url(root, campaign)
    records = {r.seq: r for r in history(root, campaign)}
    if not records:
        raise CampaignError(f"{curl} has no promotion to roll back")
    latest = records[max(records)]
    if to_seq is None:
        in_force = _in_force(records, latest)
        if in_force.parent_seq is None:
            raise CampaignError(
                f"nothing to roll back to: {in_force.model} (record {in_force.seq}) is the first model "
                f"{campaign} promoted; its base model is in the rounds' configs"
            )
        target = records[in_force.parent_seq]
    elif to_seq in records:
        target = records[to_seq]
    else:
        raise CampaignError(f"{curl} has no record {to_seq}; its records are 1 to {max(records)}")
    if target.model == latest.model and target.model_sha == latest.model_sha:
        raise CampaignError(f"{target.model} is already current (record {latest.seq})")
    sha = trained.weights_key(trained.trained_model(target.model).weights)
    if sha != target.model_sha:
        raise CampaignError(
            f"{target.model} changed since record {target.seq} promoted it (weights {sha[:12]}, then "
            f"{target.model_sha[:12]}): it is no longer the model that was promoted"
        )
    who = who or default_who()

    def make(now: Promotion | None) -> Promotion:
        assert now is not None
        if to_seq is None and now.seq != latest.seq:
            raise StorageConflict(
                f"{curl} moved on to record {now.seq} ({now.action} {now.model}) while rolling back from "
                f"record {latest.seq}: look at the history and roll back again"
            )
        return Promotion(
            seq=now.seq + 1,
            action="rollback",
            round=target.round,
            round_dir=target.round_dir,
            model=target.model,
            model_sha=target.model_sha,
            model_path=target.model_path,
            model_adapter=target.model_adapter,
            model_revision=target.model_revision,
            parent=now.model,
            parent_seq=now.seq,
            to_seq=target.seq,
            who=who,
            when=_now(),
            why=why,
        )

    return _append(curl, make, attempts)


def format_history(latest: Promotion | None, records: list[Promotion], campaign: str) -> str:
    """Markdown: what is current, how the next round loads it, and every record."""
    if latest is None:
        return f"# Campaign {campaign}\n\nNothing promoted yet: rounds start from the config's model.\n"
    loads = f"model.path `{latest.model_path}`"
    if latest.model_adapter:
        loads += f", model.adapter `{latest.model_adapter}`"
    out = [
        f"# Campaign {campaign}\n",
        f"**Current:** record {latest.seq} ({latest.action}), round {latest.round}: `{latest.model}`\n",
        f"**Next round loads:** {loads} (weights {latest.model_sha[:12]})\n",
        f"**By** {latest.who} **at** {latest.when}: {latest.why}\n",
        "| record | action | round | model | by | when | why |",
        "|---:|---|---:|---|---|---|---|",
    ]
    for r in records:
        action = f"rollback to {r.to_seq}" if r.action == "rollback" else r.action
        out.append(f"| {r.seq} | {action} | {r.round} | `{r.model}` | {r.who} | {r.when} | {r.why} |")
    return "\n".join(out) + "\n"
