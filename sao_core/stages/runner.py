"""The shard runner: one shard of a model stage is the unit of work, of retry and of fan-out.

    engines = EngineProvider(cfg)
    run_shard("responses", cfg, round_dir, 3, engines)   # one shard, in this process
    finalize_stage("responses", cfg, round_dir)           # stage manifest with totals
    run_model_stage("responses", cfg, round_dir, engines) # every shard in turn, then the manifest

The evaluation's model stages (answers-NAME, verdicts, downstream; sao_core.evaluation.eval_stages) run
here too, with the evaluation's folder where a data stage has the round's.

A shard whose manifest entry is complete, verifies against its file's sha256 and was made from the same
input shard and stage settings is skipped, so a re-run after a crash resumes where it stopped. The engine
is built once per EngineProvider and held for every shard given to it (a stage, or a GPU batch of shards):
under vLLM that is one worker child and one model load, however many shards. An engine whose worker died
is dropped, so the shard's retry starts a fresh one.

Two runners of the same round (two `sao synth` at once, a batch run and the resubmission of it) never
write one shard together: a shard is generated and written under its claim (layout.shard_claim_url, a
lease of sao_core.store.locks); a runner that finds it claimed waits, or with try_run_shard leaves it for
later, and then finds it done. A stage's manifest is written under the stage's claim, once no shard of
the stage is claimed any more.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sao_core.config import JudgingConfig, PromptsConfig, ResponsesConfig, RoundConfig
from sao_core.engines import ChatRequest, Completion, Engine, Sampling
from sao_core.engines.provider import EngineProvider
from sao_core.errors import EngineError, StorageError
from sao_core.store import locks, shards
from sao_core.store.layout import (
    EVAL_MODEL_STAGES,
    MODEL_STAGES,
    SHARD_STAGES,
    WHOLE_STAGE_PASS,
    claim_ttl,
    claim_wait,
    digest,
    input_stage,
    num_shards,
    output_url,
    shard_claim_url,
    stage_claim_url,
    stage_settings_hash,
    stage_url,
)
from sao_core.store.shards import ShardManifest

log = logging.getLogger(__name__)

ParseFn = Callable[[list[list[Completion]]], tuple[list[dict], list[dict], dict]]
# A shard made otherwise than by the engine (downstream's lm-eval run): input rows -> (rows, stats, model).
ProduceFn = Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], dict[str, Any], str]]


def _sampling(cfg: RoundConfig, stage: str, shard: int) -> Sampling:
    if stage in EVAL_MODEL_STAGES:  # greedy by default, seeded as the evaluation always was
        e = cfg.evaluation
        if stage == "verdicts":
            return Sampling(0.0, 1.0, e.judge_max_tokens, seed=cfg.run.seed)
        return Sampling(e.temperature, 1.0, e.max_tokens, seed=cfg.run.seed)
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


def _build_and_parse(
    stage: str, cfg: RoundConfig, rows: list[dict[str, Any]]
) -> tuple[list[ChatRequest], ParseFn]:
    """The stage's pure halves: requests for the engine, and a parser of its completions."""
    if stage == "prompts":
        from sao_core.method.prompts import build_prompt_requests, parse_prompt_completions

        def parse_prompts(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            kept, dropped = parse_prompt_completions(rows, outs, cfg.run.round, cfg.prompts.prefill)
            return kept, dropped, {}

        return build_prompt_requests(rows, cfg.prompts.prefill), parse_prompts
    if stage == "responses":
        from sao_core.method.responses import build_response_requests, parse_response_completions

        def parse_responses(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            kept, dropped = parse_response_completions(rows, outs)
            return kept, dropped, {}

        return build_response_requests(rows, cfg.responses.k), parse_responses
    if stage == "judgements":
        from sao_core.method.judging import build_judge_requests, count_judgements, parse_judge_completions

        def parse_judgements(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            judged = parse_judge_completions(rows, outs, cfg.judging.swap, cfg.judging.lenient)
            return judged, [], {"judge_counts": count_judgements(judged, rows)}

        return build_judge_requests(rows, cfg.judging.swap, cfg.judging.prefill), parse_judgements
    if stage.startswith("answers-") and stage in EVAL_MODEL_STAGES:
        from sao_core.method.eval_requests import build_answer_requests, parse_answer_completions

        return build_answer_requests(rows), lambda outs: (parse_answer_completions(rows, outs), [], {})
    if stage == "verdicts":
        from sao_core.method.eval_requests import build_case_requests, parse_case_completions

        def parse_cases(outs: list[list[Completion]]) -> tuple[list[dict], list[dict], dict]:
            return parse_case_completions(rows, outs, cfg.judging.lenient), [], {}

        return build_case_requests(rows, cfg.judging.prefill), parse_cases
    raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(MODEL_STAGES)}")


def run_shard(
    stage: str,
    cfg: RoundConfig,
    round_dir: str,
    index: int,
    engines: EngineProvider,
    produce: ProduceFn | None = None,
) -> ShardManifest:
    """Run one shard of a model stage (skipped when already done from the same input and settings);
    while another runner holds the shard's claim, wait for it and take its result. `produce` makes the
    shard's rows instead of the engine (a stage whose model runs in another library, such as lm-eval)."""
    entry = _run_shard(stage, cfg, round_dir, index, engines, wait=True, produce=produce)
    assert entry is not None  # a waiting runner always comes back with the shard
    return entry


def try_run_shard(
    stage: str, cfg: RoundConfig, round_dir: str, index: int, engines: EngineProvider
) -> ShardManifest | None:
    """run_shard, or None at once when another runner holds the shard's claim."""
    return _run_shard(stage, cfg, round_dir, index, engines, wait=False)


def _run_shard(
    stage: str,
    cfg: RoundConfig,
    round_dir: str,
    index: int,
    engines: EngineProvider,
    wait: bool,
    produce: ProduceFn | None = None,
) -> ShardManifest | None:
    if stage not in SHARD_STAGES:
        raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(SHARD_STAGES)}")
    in_url = stage_url(round_dir, input_stage(stage))
    in_rows, in_entry = shards.read_shard(in_url, index, cfg.run.format)
    out_url = output_url(round_dir, stage)
    settings = stage_settings_hash(cfg, stage)
    input_sha = digest(in_entry.sha256)
    done = shards.shard_is_done(out_url, index, input_sha, settings)
    if done is not None:
        log.info("%s shard %d: done earlier, skipped", stage, index)
        return done
    what, url = f"{stage} shard {index}", shard_claim_url(round_dir, stage, index)
    ttl = claim_ttl(cfg)
    claim: locks.Lease | None
    if wait:
        claim = locks.acquire(url, what, ttl, claim_wait(cfg), max_hold_s=cfg.engine.shard_timeout_s)
    else:
        claim = locks.try_acquire(url, what, ttl, max_hold_s=cfg.engine.shard_timeout_s)
    if claim is None:
        log.warning("%s: claimed by %s; left for later", what, locks.describe(locks.read_lease(url)))
        return None
    try:
        done = shards.shard_is_done(out_url, index, input_sha, settings)
        if done is not None:  # written by the runner whose claim we waited for
            log.info("%s: written by another runner meanwhile, skipped", what)
            return done
        if produce is not None:
            return _produce_shard(stage, cfg, index, in_rows, out_url, input_sha, settings, produce, claim)
        return _generate_shard(stage, cfg, index, in_rows, out_url, input_sha, settings, engines, claim)
    finally:
        claim.release()


def _generate_shard(
    stage: str,
    cfg: RoundConfig,
    index: int,
    in_rows: list[dict[str, Any]],
    out_url: str,
    input_sha: str,
    settings: str,
    engines: EngineProvider,
    claim: locks.Lease,
) -> ShardManifest:
    requests, parse = _build_and_parse(stage, cfg, in_rows)
    start = time.perf_counter()
    engine: Engine | None = None
    outs: list[list[Completion]] = []
    if requests:  # an empty input shard (every row dropped upstream) loads no model
        try:
            # Built (the model loaded) before the clock starts: a shard's seconds are its generation only.
            engine = engines.get()
            start = time.perf_counter()
            outs = engine.generate(requests, _sampling(cfg, stage, index))
        except EngineError as e:
            raise EngineError(f"{stage} shard {index}: {e}") from e
    seconds = time.perf_counter() - start
    name = engine.name if engine else cfg.engine.name
    if len(outs) != len(requests) or any(len(o) != r.n for o, r in zip(outs, requests, strict=False)):
        raise EngineError(f"{stage} shard {index}: engine {name} returned a wrong number of completions")
    kept, dropped, stats = parse(outs)
    entry = ShardManifest(
        stage=stage,
        shard=index,
        rows_in=len(in_rows),
        drops=dict(Counter(d["drop_reason"] for d in dropped)),
        input_sha256=input_sha,
        settings_hash=settings,
        seconds=round(seconds, 3),
        prompt_tokens=sum(c.prompt_tokens for o in outs for c in o[:1]),
        completion_tokens=sum(c.completion_tokens for o in outs for c in o),
        engine=name,
        model=engine.model if engine else cfg.model.path,
        model_revision=engine.model_revision if engine else "",  # nothing generated, no model loaded
        stats=stats,
    )
    claim.check()  # taken over while we generated (we froze past its ttl): the new holder writes it
    written = shards.write_shard(out_url, index, kept, dropped, cfg.run.format, entry)
    log.info("%s shard %d: %d in, %d out, %.1fs", stage, index, len(in_rows), len(kept), seconds)
    return written


def _produce_shard(
    stage: str,
    cfg: RoundConfig,
    index: int,
    in_rows: list[dict[str, Any]],
    out_url: str,
    input_sha: str,
    settings: str,
    produce: ProduceFn,
    claim: locks.Lease,
) -> ShardManifest:
    start = time.perf_counter()
    rows, stats, model = produce(in_rows)
    entry = ShardManifest(
        stage=stage,
        shard=index,
        rows_in=len(in_rows),
        input_sha256=input_sha,
        settings_hash=settings,
        seconds=round(time.perf_counter() - start, 3),
        model=model,
        stats=stats,
    )
    claim.check()
    return shards.write_shard(out_url, index, rows, [], cfg.run.format, entry)


def _read_entries(url: str, count: int) -> list[ShardManifest]:
    entries = []
    for i in range(count):
        entry = shards.read_shard_manifest(url, i)
        if entry is None or not entry.complete:
            raise StorageError(f"{url}: shard {i} of {count} has not finished; run it before finalising")
        entries.append(entry)
    return entries


def finalize_stage(stage: str, cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Check every shard of a stage finished and write the stage manifest (prompts: dedupe first).

    Runs under the stage's claim, once no other runner holds a claim on one of its shards; a manifest
    already written from the same shards is returned as it is."""
    count = num_shards(round_dir, stage)
    out_url = output_url(round_dir, stage)
    ttl, wait = claim_ttl(cfg), claim_wait(cfg)
    with locks.hold(stage_claim_url(round_dir, stage), f"{stage} manifest", ttl, wait):
        claims = [shard_claim_url(round_dir, stage, i) for i in range(count)]
        locks.wait_until_free(claims, f"{stage} manifest", ttl, wait)
        entries = _read_entries(out_url, count)
        if stage == "prompts":
            return _dedupe_prompts(cfg, round_dir, entries)
        earlier = _finalised_earlier(out_url, entries)
        if earlier is not None:
            return earlier
        return _write_stage_manifest(stage, cfg, out_url, entries)


def _finalised_earlier(url: str, entries: list[ShardManifest]) -> dict[str, Any] | None:
    """The stage manifest already at `url` when it lists exactly these shard entries, else None."""
    try:
        manifest = shards.read_stage_manifest(url)
    except (StorageError, FileNotFoundError):
        return None
    return manifest if manifest.get("shards") == [asdict(e) for e in entries] else None


def _write_stage_manifest(
    stage: str, cfg: RoundConfig, out_url: str, entries: list[ShardManifest]
) -> dict[str, Any]:
    extra: dict[str, Any] = {"format": cfg.run.format}
    if stage == "judgements":
        from sao_core.method.judging import judge_diagnostics

        counts: Counter[str] = Counter()
        for e in entries:
            counts.update(e.stats.get("judge_counts", {}))
        extra["judge_counts"] = dict(counts)
        extra["diagnostics"] = judge_diagnostics(dict(counts))
        extra["swap"] = cfg.judging.swap
    return shards.write_stage_manifest(out_url, stage, entries, **extra)


class EvalOverlap:
    """Drops synthetic prompts that share a word n-gram with the evaluation set (sao_core.method.decontaminate),
    so a round never trains on what it is evaluated on; counted in the prompts manifest."""

    def __init__(self, cfg: RoundConfig) -> None:
        self.source = cfg.evaluation.prompts
        self.n = cfg.evaluation.decontamination_n
        self.checked = 0
        self.dropped = 0
        self.eval_ids_hit: set[str] = set()
        self.index = None
        if cfg.evaluation.enabled and self.n > 0:
            from sao_core.method.decontaminate import build_ngram_index
            from sao_core.store.evalsets import load_eval_prompts

            self.index = build_ngram_index(
                ((p.id, p.instruction) for p in load_eval_prompts(self.source)), self.n
            )

    def offer(self, prompt: str) -> str | None:
        """ "eval_overlap" for a prompt that overlaps the evaluation set, else None."""
        if self.index is None:
            return None
        self.checked += 1
        count, ids = self.index.match(prompt)
        if not count:
            return None
        self.dropped += 1
        self.eval_ids_hit.update(ids)
        return "eval_overlap"

    def summary(self) -> dict[str, Any]:
        if self.index is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "eval_set": self.source,
            "n": self.n,
            "checked": self.checked,
            "dropped": self.dropped,
            "eval_ids_hit": sorted(self.eval_ids_hit),
        }


def _dedupe_prompts(cfg: RoundConfig, round_dir: str, candidates: list[ShardManifest]) -> dict[str, Any]:
    """Drop exact and normalised duplicates across the whole round, first occurrence kept, shards kept."""
    from sao_core.method.prompts import PromptDeduper

    cand_url = output_url(round_dir, "prompts")
    out_url = stage_url(round_dir, "prompts")
    # The pass is deterministic: deduped shards made from these candidates would be written the same again.
    # (candidates[i] is shard i: finalize_stage reads them in order.)
    earlier = shards.stage_is_done(out_url, [(digest(c.sha256), c.settings_hash) for c in candidates])
    if earlier is not None:
        return earlier
    deduper = PromptDeduper()
    overlap = EvalOverlap(cfg)
    entries = []
    for cand in candidates:
        rows, _ = shards.read_shard(cand_url, cand.shard, cfg.run.format)
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for row in rows:
            reason = overlap.offer(row["prompt"]) or deduper.offer(row["prompt"])
            (kept if reason is None else dropped).append(
                row if reason is None else {**row, "drop_reason": reason}
            )
        drops = Counter(cand.drops)
        drops.update(d["drop_reason"] for d in dropped)
        entry = ShardManifest(
            **{**cand.__dict__, "drops": dict(drops), "dropped_file": None, "dropped_sha256": None}
        )
        entry.input_sha256 = digest(cand.sha256)
        entries.append(shards.write_shard(out_url, cand.shard, kept, dropped, cfg.run.format, entry))
    return shards.write_stage_manifest(
        out_url,
        "prompts",
        entries,
        format=cfg.run.format,
        repetition_rate=round(deduper.repetition_rate, 4),
        parsed_prompts=deduper.seen,
        decontamination=overlap.summary(),
    )


def run_model_stage(stage: str, cfg: RoundConfig, round_dir: str, engines: EngineProvider) -> dict[str, Any]:
    """Every shard of a model stage in turn, then its manifest. Shards another runner has claimed are
    left for later, so two runners of one round share the shards; then each left one is waited for."""
    later = [
        index
        for index in range(num_shards(round_dir, stage))
        if try_run_shard(stage, cfg, round_dir, index, engines) is None
    ]
    for index in later:
        run_shard(stage, cfg, round_dir, index, engines)
    return finalize_stage(stage, cfg, round_dir)


def batch_steps(chain: list[str], indices: list[int]) -> list[tuple[str, int | None]]:
    """The order in which one batch of shards goes through a chain of stages on one engine: (stage, shard)
    for a shard, (stage, None) for the whole stage (run_model_stage: every shard, those of other batches
    included, then the stage's manifest).

    Each shard goes through the stages in turn, so a batch that dies leaves whole shards behind it. A stage
    with a pass over the whole stage (layout.WHOLE_STAGE_PASS: prompts, whose duplicate pass writes the
    shards the next stage reads) ends a segment: the batch's shards go through it, then the whole stage is
    finished (shards nobody has claimed are run here, those another batch holds are waited for), and only
    then does the next segment start."""
    steps: list[tuple[str, int | None]] = []
    segment: list[str] = []
    for position, stage in enumerate(chain):
        segment.append(stage)
        barrier = stage in WHOLE_STAGE_PASS and position < len(chain) - 1
        if barrier or position == len(chain) - 1:
            steps += [(s, index) for index in indices for s in segment]
            steps += [(stage, None)] if barrier else []
            segment = []
    return steps
