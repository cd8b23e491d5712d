"""Where a round's stages live and what their outputs depend on: folders, shard counts, settings hashes.

round_dir = prepare_round(cfg)                  # {root}/{campaign}/round_{k:03d}-{config_hash}/
stage_url(round_dir, "responses")               # the stage's folder
stage_settings_hash(cfg, "responses")           # what the stage's output depends on besides its input
shard_target("responses", cfg, round_dir, 3)    # where shard 3 goes and what makes it count as done
shard_claim_url(round_dir, "responses", 3)      # the lease of whoever is writing shard 3 (sao_core.store.locks)

Two runners of one round (two `sao synth`, a crashed batch and its resubmission) share the folder: a shard
is written under its claim, {stage}/_claims/part-NNNNN.json, and a stage's manifest (and the personas and
pairs stages) under {stage}/_claims/stage.json, so no two of them ever write the same files at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from sao_core.config import RoundConfig, build_config, config_to_dict, config_to_yaml
from sao_core.errors import ConfigError, StorageError
from sao_core.store import shards, storage
from sao_core.store.locks import LEASE_TTL_S

STAGE_ORDER = ("personas", "prompts", "responses", "judgements", "pairs")  # the data stages, in order
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
    manifest = shards.read_stage_manifest(stage_url(round_dir, input_stage(stage)))
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
    entry = shards.read_shard_manifest(in_url, index)
    if entry is None or not entry.complete:
        raise StorageError(f"{stage} shard {index}: its input shard {index} of {in_url} is not finished")
    return ShardTarget(output_url(round_dir, stage), digest(entry.sha256), stage_settings_hash(cfg, stage))


CLAIMS = "_claims"


def shard_claim_url(round_dir: str, stage: str, index: int) -> str:
    """The lease of the runner writing shard `index` of a model stage (sao_core.store.locks)."""
    return storage.join(output_url(round_dir, stage), CLAIMS, f"part-{index:0{shards.SHARD_DIGITS}d}.json")


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


# --- the round's config and the hash that names its folder ---------------------------------------


def load_config(url: str, overrides: list[str] | tuple[str, ...] = ()) -> RoundConfig:
    """Load a YAML recipe from a local path or any fsspec URL and apply `a.b=c` overrides."""
    from sao_core.store import storage

    try:
        text = storage.read_text(url)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {url}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {url} is not UTF-8 text: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {url} is not valid YAML: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"config file {url} must hold a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return build_config(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{url}: {e}") from e


# Keys that say how a round's data is made, not what it is: a round keeps its folder (and every finished
# shard) when they change, so a longer timeout after a shard timed out, or a lower gate after the gate
# failed, redoes nothing. Only what changes the output may name where the output goes.
_NOT_DATA_KEYS: dict[str, tuple[str, ...]] = {
    "run": ("root", "allowed_schemes"),  # where the artifacts live; which references are allowed
    # whether a model may run its own code: a model that needs it fails to load without it, and one that
    # loads writes the same text either way
    "model": ("trust_remote_code",),
    "engine": (
        # patience and retries: a shard that finishes is the same shard
        "shard_timeout_s",
        "max_retries",
        "request_timeout_s",
        "max_concurrency",
        # where the engine runs and how it is reached: the model is model.path (or served_model_name)
        "python",
        "base_urls",
        "api_key_env",
        # vLLM memory and scheduling: every request carries its own seed (engines.vllm.request_seed)
        "gpu_memory_utilization",
        "enforce_eager",
    ),
    "pairing": ("min_pairs",),  # read by the quality gate, not by pairing
    "judging": ("min_valid_rate",),  # likewise
}
# Sections with a hash of their own (training names model/{training hash}/) or that say where shards run.
_OWN_HASH_SECTIONS = ("training", "fanout", "promotion")
# The evaluation section scores the trained policy, except for what chooses the evaluation set and the
# n-gram size: the prompts stage drops prompts that overlap that set (stages.runner.EvalOverlap).
_EVALUATION_DATA_KEYS = ("enabled", "prompts", "decontamination_n")


def data_settings(cfg: RoundConfig) -> dict[str, Any]:
    """The round's config as a mapping, less every key that does not change its data (see _NOT_DATA_KEYS).

    engine.batch_size stays only under the transformers engine, which seeds each batch from its first
    request and pads to the batch's longest prompt, so the batch size changes the text. vLLM (where it is
    max_num_seqs) and the openai engine seed every request by itself, so a request's text does not
    depend on its neighbours, up to the floating-point differences any two GPU runs have; the fake
    engine ignores it. engine.fake.fail_calls only makes the first calls fail.
    """
    data = config_to_dict(cfg)
    for section in _OWN_HASH_SECTIONS:
        data.pop(section, None)
    data["evaluation"] = {k: v for k, v in data["evaluation"].items() if k in _EVALUATION_DATA_KEYS}
    for section, keys in _NOT_DATA_KEYS.items():
        for key in keys:
            data[section].pop(key, None)
    if cfg.engine.name != "transformers":
        data["engine"].pop("batch_size", None)
    data["engine"]["fake"].pop("fail_calls", None)
    return data


def hash_config(cfg: BaseModel) -> str:
    """Content hash of a config or one of its sections: canonical JSON, sha256, 12 hex digits.

    A round's hash covers what its data depends on (`data_settings`): not where the artifacts live or
    the shards run, not how patient the engine is, what the quality gate demands or how the policy is
    scored, and not the `training` section, which has its own hash (the model/ folder is keyed by the
    training hash), so retuning training reuses the round's data.
    """
    data = data_settings(cfg) if isinstance(cfg, RoundConfig) else config_to_dict(cfg)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def round_url(cfg: RoundConfig) -> str:
    """The round folder, {root}/{campaign}/round_{k:03d}-{config_hash} (DESIGN.md).

    A relative local root is made absolute: the folder (and every cache key built on it) must name
    one place, whichever directory the command ran from.
    """
    root = cfg.run.root.rstrip("/")
    if "://" not in root:
        root = os.path.abspath(root)
    return f"{root}/{cfg.run.campaign}/round_{cfg.run.round:03d}-{hash_config(cfg)}"


def round_settings(round_dir: str) -> dict[str, Any]:
    """The round's resolved_config.yaml as a plain mapping (read as written, so an older round still reads)."""
    url = storage.join(round_dir, "resolved_config.yaml")
    try:
        data = yaml.safe_load(storage.read_text(url))
    except FileNotFoundError as e:
        raise StorageError(f"{round_dir} is not a round folder: it has no resolved_config.yaml") from e
    except yaml.YAMLError as e:
        raise StorageError(f"{url} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise StorageError(f"{url} does not hold a mapping")
    return data
