"""Lineage: where a round's data and a trained model came from, down to the persona behind any pair.

    lin = lineage("artifacts/tiny/round_002-ab12cd34ef56")   # or a model folder, {round}/model/{hash}
    print(lin.to_markdown())          # round, config hash, parent model, each stage by URL and digest
    trace = trace_pair(lin.round_dir, "pr-3f2a...")   # pair -> judgement -> responses -> prompt -> persona
    print(trace.to_markdown())

Stages are joined by ids: pairs, judgements and responses rows carry prompt_id, prompt rows persona_id;
shard i of each stage was made from shard i of the stage before it (sao_core.store.layout), so a trace
reads one shard per stage. A trained model names the pair files it trained on and their hash in its
manifest; the round it came from is where those files are (sao_core.store.trained.trained_model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sao_core.campaign import ledger, planning
from sao_core.errors import ModelNotFoundError, SAOError, StorageError
from sao_core.store import layout, shards, storage, trained
from sao_core.store.layout import STAGE_ORDER, stage_url


@dataclass
class StageLineage:
    """One stage of a round: where it is and what it holds, by the hashes in its manifest."""

    stage: str
    url: str
    digest: str | None  # shards.manifest_digest: sha256 over its shard hashes; None if unfinished
    rows_out: int | None
    shards: list[dict[str, Any]] = field(default_factory=list)  # {file (URL), sha256, rows}
    problem: str | None = None  # unfinished, or (verify) a shard unlike its manifest


@dataclass
class ModelLineage:
    """A finished training run of the round: what it trained on and where it was promoted."""

    url: str
    objective: str | None
    steps: int | None
    training_hash: str | None
    started_from: str | None  # the base model path its manifest records
    adapter: str | None
    full_model: str | None
    pairs_sha256: str | None
    pairs_files: list[str]
    pairs_match: bool | None  # the round's pairs hash to what it trained on; None without pairs
    promotions: list[dict[str, Any]] = field(default_factory=list)  # campaign records naming it


@dataclass
class Lineage:
    round_dir: str
    campaign: str
    round: int | None
    config_hash: str
    resolved_config: str  # URL of resolved_config.yaml
    resolved_config_sha256: str
    parent_model: dict[str, Any]  # model.path, adapter, revision the round started from (its M_t)
    parent_promotion: dict[str, Any] | None  # the campaign record that made it current, if any
    stages: list[StageLineage]
    models: list[ModelLineage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """The round's lineage for people: a Prefect artifact, `sao lineage`."""
        p = self.parent_model
        started = f"model.path `{p.get('path')}`"
        if p.get("adapter"):
            started += f", model.adapter `{p['adapter']}`"
        if p.get("revision"):
            started += f", revision `{p['revision']}`"
        pp = self.parent_promotion
        source = (
            f"promoted by record {pp['seq']} ({pp['action']}, round {pp['round']}, `{pp['round_dir']}`)"
            if pp
            else "the campaign's base model (no promotion record names it)"
        )
        out = [
            f"# Lineage of round {self.round} ({self.campaign})\n",
            f"- round folder: `{self.round_dir}`",
            f"- config hash: `{self.config_hash}`; resolved_config.yaml sha256 `{self.resolved_config_sha256[:16]}`",
            f"- started from: {started}: {source}\n",
            "## Stages\n",
            "| stage | rows | shards | digest | folder |",
            "|---|---:|---:|---|---|",
        ]
        for s in self.stages:
            digest = f"`{s.digest[:16]}`" if s.digest else f"({s.problem})"
            out.append(f"| {s.stage} | {s.rows_out} | {len(s.shards)} | {digest} | `{s.url}` |")
        problems = [f"- {s.stage}: {s.problem}" for s in self.stages if s.problem and s.digest]
        if problems:
            out += ["", "**Problems:**", *problems]
        out.append("\n## Models\n")
        if not self.models:
            out.append("No finished training run in this round.")
        for m in self.models:
            match = {True: "the round's pairs", False: "NOT the round's pairs", None: "pairs not found"}
            out.append(
                f"- `{m.url}`: {m.objective}, {m.steps} steps from `{m.started_from}`; trained on pairs "
                f"sha256 `{(m.pairs_sha256 or '')[:16]}` ({match[m.pairs_match]})"
            )
            for r in m.promotions:
                out.append(f"  - record {r['seq']} ({r['action']}) by {r['who']} at {r['when']}: {r['why']}")
        return "\n".join(out) + "\n"


@dataclass
class TraceStep:
    stage: str
    url: str  # the shard file holding the row
    shard: int
    fields: dict[str, Any]


@dataclass
class PairTrace:
    """One pair followed back to the persona that asked for it."""

    round_dir: str
    key: str
    steps: list[TraceStep]
    problems: list[str]  # links that do not hold (ids or texts that differ between stages)

    def step(self, stage: str) -> TraceStep:
        return next(s for s in self.steps if s.stage == stage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        out = [f"# Trace of {self.key}\n", f"round folder: `{self.round_dir}`\n"]
        for s in self.steps:
            out.append(f"## {s.stage} (shard {s.shard}: `{s.url}`)\n")
            for k, v in s.fields.items():
                text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                out.append(f"- {k}: {_clip(text)}")
            out.append("")
        out.append("Problems: " + ("; ".join(self.problems) if self.problems else "none, every link holds"))
        return "\n".join(out) + "\n"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- finding the round ---------------------------------------------------------------------------------


def round_of(ref: str) -> tuple[str, str | None]:
    """(round folder, model folder or None) for a round folder or a finished training run's folder."""
    url = storage.normalise_url(ref)
    if trained.is_round(url):
        return url, None
    try:
        model = trained.trained_model(url)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"{ref} is neither a round folder (no resolved_config.yaml) nor a finished training run: {e}"
        ) from e
    if model.round_dir is None:
        raise StorageError(
            f"cannot tell which round {model.url} was trained from: its pair files are not in a round "
            "folder and it is not under {round}/model/"
        )
    return model.round_dir, model.url


def _stage_format(manifest: dict[str, Any], settings: dict[str, Any]) -> str:
    return str(manifest.get("format") or (settings.get("run") or {}).get("format") or "jsonl")


def stage_lineage(round_dir: str, stage: str, verify: bool = False) -> StageLineage:
    """A stage's URL, digest and shards from its manifest; with verify, every shard read and checked."""
    url = stage_url(round_dir, stage)
    storage.forget_listing(storage.join(url, "manifest.json"))  # shards may come from other processes
    try:
        manifest = shards.read_stage_manifest(url)
    except StorageError as e:
        return StageLineage(stage, url, None, None, problem=str(e))
    files = [
        {"file": storage.join(url, str(e["file"])), "sha256": e.get("sha256"), "rows": e.get("rows_out")}
        for e in manifest["shards"]
    ]
    problem = None
    if verify:
        for raw in manifest["shards"]:
            try:
                shards.verify_shard(
                    url, shards.ShardManifest.from_dict(raw, storage.join(url, "manifest.json"))
                )
            except StorageError as e:
                problem = str(e)
                break
    return StageLineage(
        stage, url, shards.manifest_digest(manifest), manifest.get("rows_out"), files, problem
    )


def _pairs_hash(stage: StageLineage) -> str | None:
    """The hash training gives these pair files (training.data.pairs_sha256), from their manifest hashes."""
    if stage.digest is None:
        return None
    h = hashlib.sha256()
    for shard in stage.shards:
        h.update(bytes.fromhex(str(shard["sha256"])))
    return h.hexdigest()


def _records(round_dir: str) -> list[ledger.Promotion]:
    root, name = planning.campaign_of_round(round_dir)
    try:
        return ledger.history(root, name)
    except SAOError:  # not a campaign folder's name, or unreadable records: the lineage still stands
        return []


def model_lineage(url: str, pairs: StageLineage, records: list[ledger.Promotion]) -> ModelLineage:
    m = trained.trained_model(url).manifest
    trained_on = m.get("pairs_sha256")
    round_pairs = _pairs_hash(pairs)
    return ModelLineage(
        url=storage.normalise_url(url),
        objective=m.get("objective"),
        steps=m.get("steps"),
        training_hash=m.get("training_hash"),
        started_from=m.get("model"),
        adapter=storage.join(url, m["adapter"]) if m.get("adapter") else None,
        full_model=storage.join(url, m["full_model"]) if m.get("full_model") else None,
        pairs_sha256=trained_on,
        pairs_files=[str(f) for f in m.get("pairs_files") or []],
        pairs_match=None if round_pairs is None else round_pairs == trained_on,
        promotions=[r.to_dict() for r in records if r.model == storage.normalise_url(url)],
    )


def lineage(ref: str, verify: bool = False) -> Lineage:
    """The lineage of a round folder (with every finished training run in it) or of one trained model."""
    round_dir, model_url = round_of(ref)
    settings = layout.round_settings(round_dir)
    config_url = storage.join(round_dir, "resolved_config.yaml")
    hash_url = storage.join(round_dir, "config_hash")
    config_hash = storage.read_text(hash_url).strip() if storage.exists(hash_url) else ""
    started = settings.get("model") or {}
    parent = {k: started.get(k) for k in ("path", "adapter", "revision")}
    records = _records(round_dir)
    promoted = [r for r in records if (r.model_path, r.model_adapter) == (parent["path"], parent["adapter"])]
    stages = [stage_lineage(round_dir, s, verify) for s in STAGE_ORDER]
    if model_url is not None:
        model_urls = [model_url]
    else:
        models = storage.join(round_dir, "model")
        storage.forget_listing(models)
        found = storage.list_files(models, "*/manifest.json")
        model_urls = [storage.parent_url(m) for m in found if trained.finished_run(storage.parent_url(m))]
    return Lineage(
        round_dir=round_dir,
        campaign=planning.campaign_of_round(round_dir)[1],
        round=(settings.get("run") or {}).get("round"),
        config_hash=config_hash,
        resolved_config=config_url,
        resolved_config_sha256=storage.sha256_bytes(storage.read_bytes(config_url)),
        parent_model=parent,
        parent_promotion=promoted[-1].to_dict() if promoted else None,
        stages=stages,
        models=[model_lineage(u, stages[-1], records) for u in model_urls],
    )


def write_lineage(lin: Lineage) -> str:
    """{round}/lineage.json and lineage.md; returns the markdown's URL."""
    storage.write_json(storage.join(lin.round_dir, "lineage.json"), lin.to_dict())
    url = storage.join(lin.round_dir, "lineage.md")
    storage.write_text(url, lin.to_markdown())
    return url


# --- one pair, back to its persona ---------------------------------------------------------------------


def _find_row(
    round_dir: str, stage: str, column: str, value: str, settings: dict[str, Any], first: int | None
) -> tuple[dict[str, Any], int, str] | None:
    """The row of `stage` whose `column` is `value`, its shard and file; shard `first` is read first."""
    url = stage_url(round_dir, stage)
    storage.forget_listing(storage.join(url, "manifest.json"))
    manifest = shards.read_stage_manifest(url)
    fmt = _stage_format(manifest, settings)
    order = [int(e["shard"]) for e in manifest["shards"]]
    if first in order:
        order.remove(first)
        order.insert(0, first)
    for index in order:
        storage.forget_listing(shards.shard_manifest_url(url, index))
        rows, entry = shards.read_shard(url, index, fmt)
        for row in rows:
            if row.get(column) == value:
                return row, index, storage.join(url, entry.file)
    return None


def _pick(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: row.get(k) for k in keys if k in row}


def _content(messages: Any) -> str | None:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("content")
    return None


def trace_pair(round_dir: str, key: str) -> PairTrace:
    """Follow one pair (by its prompt_id, or the id of its chosen or rejected response) back through its
    judgement, responses and prompt to its persona, checking that every link holds."""
    round_dir = storage.normalise_url(round_dir)
    settings = layout.round_settings(round_dir)
    found = None
    for column in ("prompt_id", "chosen_response_id", "rejected_response_id"):
        found = _find_row(round_dir, "pairs", column, key, settings, None)
        if found:
            break
    if found is None:
        raise StorageError(
            f"no pair in {stage_url(round_dir, 'pairs')} has the prompt id or response id {key!r}"
        )
    pair, shard, url = found
    steps = [
        TraceStep(
            "pairs",
            url,
            shard,
            {
                **_pick(pair, "prompt_id", "persona_id", "chosen_response_id", "rejected_response_id"),
                **_pick(pair, "round", "config_hash", "raw_judge_output"),
                "chosen": _content(pair.get("chosen")),
                "rejected": _content(pair.get("rejected")),
            },
        )
    ]
    problems: list[str] = []
    prompt_id = pair["prompt_id"]

    def follow(stage: str, column: str, value: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
        hit = _find_row(round_dir, stage, column, value, settings, shard)
        if hit is None:
            problems.append(f"{stage}: no row with {column} {value!r}")
            return None
        row, index, file_url = hit
        steps.append(TraceStep(stage, file_url, index, _pick(row, *keys)))
        return row

    judgement = follow(
        "judgements",
        "prompt_id",
        prompt_id,
        (
            "prompt_id",
            "valid",
            "invalid_reason",
            "chosen_response_id",
            "rejected_response_id",
            "raw_judge_output",
        ),
    )
    if judgement is not None:
        if not judgement.get("valid"):
            problems.append("judgements: the verdict is not valid, yet a pair was made from it")
        for side in ("chosen_response_id", "rejected_response_id"):
            if judgement.get(side) != pair.get(side):
                problems.append(f"judgements: {side} {judgement.get(side)} != the pair's {pair.get(side)}")
    responses = follow("responses", "prompt_id", prompt_id, ("prompt_id", "persona_id", "responses"))
    if responses is not None:
        texts = {r["response_id"]: r.get("text") for r in responses.get("responses", [])}
        for side, column in (("chosen", "chosen_response_id"), ("rejected", "rejected_response_id")):
            rid = pair.get(column)
            if rid not in texts:
                problems.append(f"responses: no answer {rid} ({side})")
            elif (texts[rid] or "").strip() != (_content(pair.get(side)) or "").strip():
                problems.append(f"responses: the {side} text of the pair differs from answer {rid}")
    prompt = follow(
        "prompts",
        "prompt_id",
        prompt_id,
        ("prompt_id", "persona_id", "prompt", "finish_reason", "raw_output"),
    )
    if prompt is not None and prompt.get("prompt") != _content(pair.get("prompt")):
        problems.append("prompts: the pair's prompt differs from the prompt row")
    persona_id = (prompt or pair).get("persona_id")
    if persona_id != pair.get("persona_id"):
        problems.append(f"prompts: persona_id {persona_id} != the pair's {pair.get('persona_id')}")
    follow("personas", "persona_id", str(persona_id), ("persona_id", "persona", "source", "round"))
    return PairTrace(round_dir, key, steps, problems)
