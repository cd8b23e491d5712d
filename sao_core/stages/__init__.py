"""The SAO data stages over the artifact store: personas -> prompts -> responses -> judgements -> pairs.

Each model stage is a loop over shards; a shard is the unit of work, of retry and of fan-out:

    run_shard("responses", cfg, round_url, 3, engines)   # one shard, in this process
    finalize_stage("responses", cfg, round_url)           # stage manifest with totals

A shard whose manifest entry is complete, verifies against its file's sha256 and was made from the same
input shard and stage parameters is skipped, so a re-run after a crash resumes where it stopped.
`python -m sao_core.stages.<stage> --config URL --round URL --shard N` runs one shard by hand or in a
child process (sao_core.stages.cli).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sao_core import storage
from sao_core.config import (
    JudgingConfig,
    PromptsConfig,
    ResponsesConfig,
    RoundConfig,
    config_to_yaml,
    hash_config,
    round_url,
)
from sao_core.engines import ChatRequest, Completion, Engine, Sampling, make_engine
from sao_core.errors import PersonaSourceError, StorageError
from sao_core.storage import ShardManifest

log = logging.getLogger(__name__)

STAGES = ("personas", "prompts", "responses", "judgements", "pairs")
MODEL_STAGES = ("prompts", "responses", "judgements")
CANDIDATES = "_candidates"  # prompts before the round-wide duplicate pass


class EngineProvider:
    """Builds the engine on first use, so a fully resumed stage never loads the model."""

    def __init__(self, cfg: RoundConfig, factory: Callable[[], Engine] | None = None) -> None:
        self.cfg = cfg
        self._factory = factory or (lambda: make_engine(cfg.engine, cfg.model, seed=cfg.run.seed))
        self._engine: Engine | None = None

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = self._factory()
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def stage_url(round_dir: str, stage: str) -> str:
    return storage.join(round_dir, stage)


def prepare_round(cfg: RoundConfig) -> str:
    """Create the round folder with resolved_config.yaml and its hash; return the folder URL."""
    url = round_url(cfg)
    storage.write_text(storage.join(url, "resolved_config.yaml"), config_to_yaml(cfg))
    storage.write_text(storage.join(url, "config_hash"), hash_config(cfg) + "\n")
    return url


def stage_params_hash(cfg: RoundConfig, stage: str) -> str:
    """What a stage's output depends on besides its input: its own section, the model and the seed."""
    parts: dict[str, Any] = {"model": cfg.model.model_dump(mode="json"), "seed": cfg.run.seed}
    if stage in ("prompts", "responses", "judging", "judgements"):
        section = "judging" if stage == "judgements" else stage
        parts[section] = getattr(cfg, section).model_dump(mode="json")
    if stage == "personas":
        parts = {
            "personas": cfg.personas.model_dump(mode="json"),
            "seed": cfg.run.seed,
            "round": cfg.run.round,
        }
    if cfg.engine.name == "fake":  # the fake engine's script changes what it says
        parts["fake"] = cfg.engine.fake.model_dump(mode="json")
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _digest(*shas: str) -> str:
    return hashlib.sha256("\x1f".join(shas).encode()).hexdigest()


# --- personas -----------------------------------------------------------------------------------------

_ROUND_DIR = re.compile(r"round_(\d{3,})-[0-9a-f]+$")


def used_persona_ids(cfg: RoundConfig) -> set[str]:
    """Persona ids sampled by earlier rounds (lower round numbers) of the same campaign."""
    campaign = storage.join(cfg.run.root, cfg.run.campaign)
    used: set[str] = set()
    if not storage.exists(campaign):
        return used
    fs, path = storage.url_to_fs(campaign)
    for folder in sorted(fs.ls(path, detail=False)):
        m = _ROUND_DIR.search(str(folder).rstrip("/"))
        if not m or int(m.group(1)) >= cfg.run.round:
            continue
        personas = storage.join(campaign, str(folder).rstrip("/").rsplit("/", 1)[-1], "personas")
        if not storage.exists(storage.join(personas, "manifest.json")):
            continue
        fmt = storage.read_stage_manifest(personas).get("format", cfg.run.format)
        used.update(row["persona_id"] for row in storage.read_stage_rows(personas, fmt))
    return used


def run_personas(cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Sample the round's personas and write them as shards of run.shard_size rows."""
    from sao_core.personas import sample_personas

    out = stage_url(round_dir, "personas")
    params = stage_params_hash(cfg, "personas")
    if storage.exists(storage.join(out, "manifest.json")):
        manifest = storage.read_stage_manifest(out)
        entries = [storage.shard_is_done(out, int(e["shard"]), "", params) for e in manifest["shards"]]
        if entries and all(entries):
            return manifest
    start = time.perf_counter()
    exclude = used_persona_ids(cfg) if cfg.personas.exclude_used else set()
    rows = sample_personas(cfg.personas, seed=cfg.run.seed + 7919 * cfg.run.round, exclude_ids=exclude)
    if not rows:
        raise PersonaSourceError(f"persona source {cfg.personas.source!r} gave zero personas")
    rows = [{**r, "round": cfg.run.round} for r in rows]  # type: ignore[dict-item]
    size = cfg.run.shard_size
    entries_out = []
    for index, begin in enumerate(range(0, len(rows), size)):
        chunk = rows[begin : begin + size]
        entry = ShardManifest(
            stage="personas",
            shard=index,
            rows_in=len(chunk),
            params_hash=params,
            seconds=0.0,
            stats={"excluded_used": len(exclude)},
        )
        entries_out.append(storage.write_shard(out, index, chunk, [], cfg.run.format, entry))
    entries_out[0].seconds = round(time.perf_counter() - start, 3)
    return storage.write_stage_manifest(
        out,
        "personas",
        entries_out,
        format=cfg.run.format,
        source=cfg.personas.source,
        excluded_used=len(exclude),
    )


# --- model stages ---------------------------------------------------------------------------------------


def _sampling(cfg: RoundConfig, stage: str, shard: int) -> Sampling:
    sections: dict[str, PromptsConfig | ResponsesConfig | JudgingConfig] = {
        "prompts": cfg.prompts,
        "responses": cfg.responses,
        "judgements": cfg.judging,
    }
    section = sections[stage]
    return Sampling(
        temperature=section.temperature,
        top_p=section.top_p,
        max_tokens=section.max_tokens,
        seed=cfg.run.seed * 1_000_003 + shard,
    )


def _input_stage(stage: str) -> str:
    return {"prompts": "personas", "responses": "prompts", "judgements": "responses", "pairs": "judgements"}[
        stage
    ]


def _output_url(round_dir: str, stage: str) -> str:
    base = stage_url(round_dir, stage)
    return storage.join(base, CANDIDATES) if stage == "prompts" else base


def num_shards(cfg: RoundConfig, round_dir: str, stage: str) -> int:
    """How many shards a stage has: as many as its input stage wrote."""
    manifest = storage.read_stage_manifest(stage_url(round_dir, _input_stage(stage)))
    return int(manifest["num_shards"])


def _build_and_parse(
    stage: str, cfg: RoundConfig, rows: list[dict[str, Any]]
) -> tuple[list[ChatRequest], Callable[[list[list[Completion]]], tuple[list[dict], list[dict], dict]]]:
    """The stage's pure halves: requests for the engine, and a parser of its completions."""
    if stage == "prompts":
        from sao_core.prompts import build_prompt_requests, parse_prompt_completions

        def parse_prompts(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            kept, dropped = parse_prompt_completions(rows, outs, cfg.run.round)
            return kept, dropped, {}

        return build_prompt_requests(rows, cfg.prompts.prefill), parse_prompts
    if stage == "responses":
        from sao_core.responses import build_response_requests, parse_response_completions

        def parse_responses(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            kept, dropped = parse_response_completions(rows, outs)
            return kept, dropped, {}

        return build_response_requests(rows, cfg.responses.k), parse_responses
    if stage == "judgements":
        from sao_core.judging import build_judge_requests, count_judgements, parse_judge_completions

        def parse_judgements(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            judged = parse_judge_completions(rows, outs, cfg.judging.swap, cfg.judging.lenient)
            return judged, [], {"judge_counts": count_judgements(judged, rows)}

        return build_judge_requests(rows, cfg.judging.swap, cfg.judging.prefill), parse_judgements
    raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(MODEL_STAGES)}")


def run_shard(
    stage: str, cfg: RoundConfig, round_dir: str, index: int, engines: EngineProvider
) -> ShardManifest:
    """Run one shard of a model stage (skipped when already done from the same input and parameters)."""
    if stage not in MODEL_STAGES:
        raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(MODEL_STAGES)}")
    in_url = stage_url(round_dir, _input_stage(stage))
    in_rows, in_entry = storage.read_shard(in_url, index, cfg.run.format)
    out_url = _output_url(round_dir, stage)
    params = stage_params_hash(cfg, stage)
    input_sha = _digest(in_entry.sha256)
    done = storage.shard_is_done(out_url, index, input_sha, params)
    if done is not None:
        log.info("%s shard %d: done earlier, skipped", stage, index)
        return done
    if cfg.engine.name == "vllm" and os.environ.get("SAO_STAGE_CHILD") != "1":
        # vLLM holds the GPU for the life of its process: the shard runs in a child of its own.
        from sao_core.engines.vllm import run_shard_in_child  # type: ignore[import-not-found,unused-ignore]

        result: ShardManifest = run_shard_in_child(stage, cfg, round_dir, index)
        return result
    requests, parse = _build_and_parse(stage, cfg, in_rows)
    start = time.perf_counter()
    engine = engines.get()
    outs = engine.generate(requests, _sampling(cfg, stage, index)) if requests else []
    seconds = time.perf_counter() - start
    if len(outs) != len(requests) or any(len(o) != r.n for o, r in zip(outs, requests, strict=False)):
        raise StorageError(
            f"{stage} shard {index}: engine {engine.name} returned a wrong number of completions"
        )
    kept, dropped, stats = parse(outs)
    entry = ShardManifest(
        stage=stage,
        shard=index,
        rows_in=len(in_rows),
        drops=dict(Counter(d["drop_reason"] for d in dropped)),
        input_sha256=input_sha,
        params_hash=params,
        seconds=round(seconds, 3),
        prompt_tokens=sum(c.prompt_tokens for o in outs for c in o[:1]),
        completion_tokens=sum(c.completion_tokens for o in outs for c in o),
        engine=engine.name,
        model=engine.model,
        model_revision=engine.model_revision,
        stats=stats,
    )
    written = storage.write_shard(out_url, index, kept, dropped, cfg.run.format, entry)
    log.info("%s shard %d: %d in, %d out, %.1fs", stage, index, len(in_rows), len(kept), seconds)
    return written


def _read_entries(url: str, count: int) -> list[ShardManifest]:
    entries = []
    for i in range(count):
        entry = storage.read_shard_manifest(url, i)
        if entry is None or not entry.complete:
            raise StorageError(f"{url}: shard {i} of {count} has not finished; run it before finalising")
        entries.append(entry)
    return entries


def finalize_stage(stage: str, cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Check every shard of a stage finished and write the stage manifest (prompts: dedupe first)."""
    count = num_shards(cfg, round_dir, stage)
    out_url = _output_url(round_dir, stage)
    entries = _read_entries(out_url, count)
    if stage == "prompts":
        return _dedupe_prompts(cfg, round_dir, entries)
    extra: dict[str, Any] = {"format": cfg.run.format}
    if stage == "judgements":
        from sao_core.judging import judge_diagnostics

        counts: Counter[str] = Counter()
        for e in entries:
            counts.update(e.stats.get("judge_counts", {}))
        extra["judge_counts"] = dict(counts)
        extra["diagnostics"] = judge_diagnostics(dict(counts))
        extra["swap"] = cfg.judging.swap
    return storage.write_stage_manifest(out_url, stage, entries, **extra)


def _dedupe_prompts(cfg: RoundConfig, round_dir: str, candidates: list[ShardManifest]) -> dict[str, Any]:
    """Drop exact and normalised duplicates across the whole round, first occurrence kept, shards kept."""
    from sao_core.prompts import PromptDeduper

    cand_url = _output_url(round_dir, "prompts")
    out_url = stage_url(round_dir, "prompts")
    deduper = PromptDeduper()
    entries = []
    for cand in candidates:
        rows, _ = storage.read_shard(cand_url, cand.shard, cfg.run.format)
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for row in rows:
            reason = deduper.offer(row["prompt"])
            (kept if reason is None else dropped).append(
                row if reason is None else {**row, "drop_reason": reason}
            )
        drops = Counter(cand.drops)
        drops.update(d["drop_reason"] for d in dropped)
        entry = ShardManifest(
            **{**cand.__dict__, "drops": dict(drops), "dropped_file": None, "dropped_sha256": None}
        )
        entry.input_sha256 = _digest(cand.sha256)
        entries.append(storage.write_shard(out_url, cand.shard, kept, dropped, cfg.run.format, entry))
    return storage.write_stage_manifest(
        out_url,
        "prompts",
        entries,
        format=cfg.run.format,
        repetition_rate=round(deduper.repetition_rate, 4),
        parsed_prompts=deduper.seen,
    )


def run_pairs(cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Turn each shard's valid judgements into TRL preference rows (cheap: always recomputed)."""
    from sao_core.pairing import select_pairs

    count = num_shards(cfg, round_dir, "pairs")
    judge_url, resp_url, out_url = (stage_url(round_dir, s) for s in ("judgements", "responses", "pairs"))
    chash = hash_config(cfg)
    entries = []
    for i in range(count):
        start = time.perf_counter()
        judgements, j_entry = storage.read_shard(judge_url, i, cfg.run.format)
        responses, r_entry = storage.read_shard(resp_url, i, cfg.run.format)
        kept, dropped = select_pairs(judgements, responses, chash)
        entry = ShardManifest(
            stage="pairs",
            shard=i,
            rows_in=len(judgements),
            drops=dict(Counter(d["drop_reason"] for d in dropped)),
            input_sha256=_digest(j_entry.sha256, r_entry.sha256),
            params_hash=chash,
            seconds=round(time.perf_counter() - start, 3),
        )
        entries.append(storage.write_shard(out_url, i, kept, dropped, cfg.run.format, entry))
    return storage.write_stage_manifest(out_url, "pairs", entries, format=cfg.run.format, config_hash=chash)


def run_model_stage(stage: str, cfg: RoundConfig, round_dir: str, engines: EngineProvider) -> dict[str, Any]:
    """Every shard of a model stage in turn, then its manifest."""
    for index in range(num_shards(cfg, round_dir, stage)):
        run_shard(stage, cfg, round_dir, index, engines)
    return finalize_stage(stage, cfg, round_dir)
