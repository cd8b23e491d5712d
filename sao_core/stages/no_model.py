"""The two stages of a round that call no model: personas (first) and pairs (last).

run_personas(cfg, round_dir)   # n personas, none used by an earlier round of the campaign, in shards
run_pairs(cfg, round_dir)      # each shard's valid judgements as TRL preference rows

Each writes its whole stage under the stage's claim (layout.stage_claim_url), so two runners of one round
never write it at once; the second finds it done and returns its manifest.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from typing import Any

from sao_core.config import RoundConfig
from sao_core.errors import PersonaSourceError
from sao_core.store import locks, shards, storage
from sao_core.store.layout import (
    claim_ttl,
    claim_wait,
    digest,
    hash_config,
    num_shards,
    stage_claim_url,
    stage_settings_hash,
    stage_url,
)
from sao_core.store.shards import ShardManifest

_ROUND_DIR = re.compile(r"round_(\d{3,})-[0-9a-f]+$")


def used_persona_ids(cfg: RoundConfig) -> set[str]:
    """Persona ids sampled by earlier rounds (lower round numbers) of the same campaign."""
    campaign = storage.join(storage.normalise_url(cfg.run.root), cfg.run.campaign)
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
        fmt = shards.read_stage_manifest(personas).get("format", cfg.run.format)
        used.update(row["persona_id"] for row in shards.read_stage_rows(personas, fmt))
    return used


def _personas_done(out: str, settings: str) -> dict[str, Any] | None:
    if not storage.exists(storage.join(out, "manifest.json")):
        return None
    manifest = shards.read_stage_manifest(out)
    entries = [shards.shard_is_done(out, int(e["shard"]), "", settings) for e in manifest["shards"]]
    return manifest if entries and all(entries) else None


def _hold_stage(cfg: RoundConfig, round_dir: str, stage: str) -> Any:
    return locks.hold(stage_claim_url(round_dir, stage), stage, claim_ttl(cfg), claim_wait(cfg))


def run_personas(cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Sample the round's personas and write them as shards of run.shard_size rows."""
    out = stage_url(round_dir, "personas")
    settings = stage_settings_hash(cfg, "personas")
    done = _personas_done(out, settings)
    if done is not None:
        return done
    with _hold_stage(cfg, round_dir, "personas"):
        done = _personas_done(out, settings)  # written by the runner whose claim we waited for
        return done if done is not None else _write_personas(cfg, out, settings)


def _write_personas(cfg: RoundConfig, out: str, settings: str) -> dict[str, Any]:
    from sao_core.stages.persona_sources import iter_personas

    start = time.perf_counter()
    exclude = used_persona_ids(cfg) if cfg.personas.exclude_used else set()
    source_drops: Counter[str] = Counter()  # rows of a file or hf source that are not personas
    rows = iter_personas(
        cfg.personas, seed=cfg.run.seed + 7919 * cfg.run.round, exclude_ids=exclude, drops=source_drops
    )
    size = cfg.run.shard_size
    entries_out: list[ShardManifest] = []
    # Shard by shard: the builtin source draws each persona when asked, so no round holds them all
    # (bench/scale.py). The stage manifest is written last, so a shortfall raised mid-way leaves no stage.
    while chunk := [{**r, "round": cfg.run.round} for r in itertools.islice(rows, size)]:
        entry = ShardManifest(
            stage="personas",
            shard=len(entries_out),
            rows_in=len(chunk),
            settings_hash=settings,
            seconds=0.0,
            stats={"excluded_used": len(exclude)},
        )
        entries_out.append(shards.write_shard(out, entry.shard, chunk, [], cfg.run.format, entry))
    if not entries_out:
        raise PersonaSourceError(f"persona source {cfg.personas.source!r} gave zero personas")
    entries_out[0].seconds = round(time.perf_counter() - start, 3)
    return shards.write_stage_manifest(
        out,
        "personas",
        entries_out,
        format=cfg.run.format,
        source=cfg.personas.source,
        excluded_used=len(exclude),
        source_drops=dict(sorted(source_drops.items())),
    )


def run_pairs(cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    """Turn each shard's valid judgements into TRL preference rows (cheap, but a pairs stage already made
    from the same judgements and responses is kept as it is)."""
    with _hold_stage(cfg, round_dir, "pairs"):
        return _write_pairs(cfg, round_dir)


def _write_pairs(cfg: RoundConfig, round_dir: str) -> dict[str, Any]:
    from sao_core.method.pairing import select_pairs

    count = num_shards(round_dir, "pairs")
    judge_url, resp_url, out_url = (stage_url(round_dir, s) for s in ("judgements", "responses", "pairs"))
    chash = hash_config(cfg)
    inputs = [
        digest(j.sha256, r.sha256)
        for j, r in (
            (shards.read_shard_manifest(judge_url, i), shards.read_shard_manifest(resp_url, i))
            for i in range(count)
        )
        if j is not None and r is not None
    ]
    if len(inputs) == count:
        done = shards.stage_is_done(out_url, [(sha, chash) for sha in inputs])
        if done is not None:
            return done
    entries = []
    for i in range(count):
        start = time.perf_counter()
        judgements, j_entry = shards.read_shard(judge_url, i, cfg.run.format)
        responses, r_entry = shards.read_shard(resp_url, i, cfg.run.format)
        kept, dropped = select_pairs(judgements, responses, chash)
        entry = ShardManifest(
            stage="pairs",
            shard=i,
            rows_in=len(judgements),
            drops=dict(Counter(d["drop_reason"] for d in dropped)),
            input_sha256=digest(j_entry.sha256, r_entry.sha256),
            settings_hash=chash,
            seconds=round(time.perf_counter() - start, 3),
        )
        entries.append(shards.write_shard(out_url, i, kept, dropped, cfg.run.format, entry))
    return shards.write_stage_manifest(out_url, "pairs", entries, format=cfg.run.format, config_hash=chash)
