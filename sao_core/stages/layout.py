"""Where a round's stages live and what their outputs depend on: folders, shard counts, settings hashes.

round_dir = prepare_round(cfg)                  # {root}/{campaign}/round_{k:03d}-{config_hash}/
stage_url(round_dir, "responses")               # the stage's folder
stage_settings_hash(cfg, "responses")           # what the stage's output depends on besides its input
shard_target("responses", cfg, round_dir, 3)    # where shard 3 goes and what makes it count as done
shard_claim_url(round_dir, "responses", 3)      # the lease of whoever is writing shard 3 (sao_core.locks)

Two runners of one round (two `sao synth`, a crashed batch and its resubmission) share the folder: a shard
is written under its claim, {stage}/_claims/part-NNNNN.json, and a stage's manifest (and the personas and
pairs stages) under {stage}/_claims/stage.json, so no two of them ever write the same files at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sao_core import storage
from sao_core.config import RoundConfig, config_to_yaml, data_settings, hash_config, round_url
from sao_core.errors import StorageError
from sao_core.locks import LEASE_TTL_S

MODEL_STAGES = ("prompts", "responses", "judgements")
CANDIDATES = "_candidates"  # prompts before the round-wide duplicate pass
INPUT_STAGE = {
    "prompts": "personas",
    "responses": "prompts",
    "judgements": "responses",
    "pairs": "judgements",
}


def stage_url(round_dir: str, stage: str) -> str:
    return storage.join(round_dir, stage)


def input_stage(stage: str) -> str:
    """The stage whose shards this stage reads, shard for shard."""
    try:
        return INPUT_STAGE[stage]
    except KeyError:
        raise ValueError(f"stage {stage!r} has no input stage; allowed: {', '.join(INPUT_STAGE)}") from None


def output_url(round_dir: str, stage: str) -> str:
    """Where a stage's shards are written: prompts go to a candidates folder before the duplicate pass."""
    base = stage_url(round_dir, stage)
    return storage.join(base, CANDIDATES) if stage == "prompts" else base


def prepare_round(cfg: RoundConfig) -> str:
    """Create the round folder with resolved_config.yaml and its hash; return the folder URL.

    Files already there with the same text are left as they are: a resumed round, or a second runner of
    it, rewrites nothing."""
    url = round_url(cfg)
    for name, text in (
        ("resolved_config.yaml", config_to_yaml(cfg)),
        ("config_hash", hash_config(cfg) + "\n"),
    ):
        target = storage.join(url, name)
        try:
            if storage.read_text(target) == text:
                continue
        except (FileNotFoundError, StorageError, UnicodeDecodeError):
            pass
        storage.write_text(target, text)
    return url


def stage_settings_hash(cfg: RoundConfig, stage: str) -> str:
    """What a stage's output depends on besides its input: its own section, the model and the seed.

    Sections are read through `data_settings`, so what only the quality gate reads (judging.min_valid_rate)
    or what only makes the fake engine fail (engine.fake.fail_calls) does not redo a finished shard.
    """
    data = data_settings(cfg)
    parts: dict[str, Any] = {"model": data["model"], "seed": cfg.run.seed}
    if stage in ("prompts", "responses", "judging", "judgements"):
        section = "judging" if stage == "judgements" else stage
        parts[section] = data[section]
    if stage == "personas":
        parts = {"personas": data["personas"], "seed": cfg.run.seed, "round": cfg.run.round}
    if cfg.engine.name == "fake":  # the fake engine's script changes what it says
        parts["fake"] = data["engine"]["fake"]
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def digest(*shas: str) -> str:
    """One sha256 over the sha256 of every input a shard was made from."""
    return hashlib.sha256("\x1f".join(shas).encode()).hexdigest()


def num_shards(round_dir: str, stage: str) -> int:
    """How many shards a stage has: as many as its input stage wrote."""
    manifest = storage.read_stage_manifest(stage_url(round_dir, input_stage(stage)))
    return int(manifest["num_shards"])


@dataclass(frozen=True)
class ShardTarget:
    """Where a shard's output goes and what its manifest must name to count as done."""

    out_url: str
    input_sha256: str
    settings_hash: str


def shard_target(stage: str, cfg: RoundConfig, round_dir: str, index: int) -> ShardTarget:
    """The output folder, input digest and settings hash that a finished shard's manifest must match."""
    if stage not in MODEL_STAGES:
        raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(MODEL_STAGES)}")
    in_url = stage_url(round_dir, input_stage(stage))
    entry = storage.read_shard_manifest(in_url, index)
    if entry is None or not entry.complete:
        raise StorageError(f"{stage} shard {index}: its input shard {index} of {in_url} is not finished")
    return ShardTarget(output_url(round_dir, stage), digest(entry.sha256), stage_settings_hash(cfg, stage))


CLAIMS = "_claims"


def shard_claim_url(round_dir: str, stage: str, index: int) -> str:
    """The lease of the runner writing shard `index` of a model stage (sao_core.locks)."""
    return storage.join(output_url(round_dir, stage), CLAIMS, f"part-{index:0{storage.SHARD_DIGITS}d}.json")


def stage_claim_url(round_dir: str, stage: str) -> str:
    """The lease of the runner writing a stage's manifest, or all of personas or pairs."""
    base = output_url(round_dir, stage) if stage in MODEL_STAGES else stage_url(round_dir, stage)
    return storage.join(base, CLAIMS, "stage.json")


def claim_ttl(cfg: RoundConfig) -> float:
    """How long a claim outlives its holder's last renewal: locks.LEASE_TTL_S, or less when a shard may
    not run that long (engine.shard_timeout_s)."""
    return min(cfg.engine.shard_timeout_s, LEASE_TTL_S)


def claim_wait(cfg: RoundConfig) -> float:
    """How long a runner waits for another's claim: a holder renews it for at most engine.shard_timeout_s,
    after which it expires within claim_ttl; waiting longer means something else is wrong."""
    return cfg.engine.shard_timeout_s + 2 * claim_ttl(cfg)
