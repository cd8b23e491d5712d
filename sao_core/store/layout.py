"""Where a round's stages live and what their outputs depend on: folders, shard counts, settings hashes.

round_dir = prepare_round(cfg)                  # {root}/{campaign}/round_{k:03d}-{config_hash}/
run_config_url(round_dir, cfg)                  # this run's own full config: {round}/configs/{full hash}.yaml
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
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from sao_core.config import RoundConfig, build_config, config_to_dict, config_to_yaml
from sao_core.errors import ConfigError, StorageError
from sao_core.redact import redact
from sao_core.store import shards, storage
from sao_core.store.locks import LEASE_TTL_S

STAGE_ORDER = ("personas", "prompts", "responses", "judgements", "pairs")  # the data stages, in order
MODEL_STAGES = ("prompts", "responses", "judgements")
CANDIDATES = "_candidates"  # prompts before the round-wide duplicate pass
# Stages whose shards the next stage can read only once every shard is in and a pass over the whole stage
# has run (prompts: the round-wide duplicate pass); their shards are written under CANDIDATES first.
WHOLE_STAGE_PASS = frozenset({"prompts"})
INPUT_STAGE = {
    "prompts": "personas",
    "responses": "prompts",
    "judgements": "responses",
    "pairs": "judgements",
}
# The evaluation's stages, under its own folder ({model}/eval/{evaluation_settings_hash}/, used where the
# data stages use the round folder): each contender answers the instruction shards, then the judge rates
# the comparison and trust cases in both orders. Downstream (lm-eval) has a folder of its own
# ({model}/eval/downstream-{downstream_settings_hash}/), one shard per model scored.
CONTENDERS = ("candidate", "current", "original")
EVAL_PROMPTS, EVAL_CASES, DOWNSTREAM_MODELS = "eval_prompts", "eval_cases", "downstream_models"
EVAL_MODEL_STAGES = (*(f"answers-{c}" for c in CONTENDERS), "verdicts", "downstream")
INPUT_STAGE |= {f"answers-{c}": EVAL_PROMPTS for c in CONTENDERS}
INPUT_STAGE |= {"verdicts": EVAL_CASES, "downstream": DOWNSTREAM_MODELS}
SHARD_STAGES = (*MODEL_STAGES, *EVAL_MODEL_STAGES)  # what the shard runner and the fan-out run


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
    return storage.join(base, CANDIDATES) if stage in WHOLE_STAGE_PASS else base


def prepare_round(cfg: RoundConfig) -> str:
    """Create the round folder with resolved_config.yaml, its hash and this run's own full config
    (run_config_url); return the folder URL.

    Runs whose settings differ only outside the round hash (training, fan-out, promotion, the gate's
    thresholds) share the folder, and each reads its settings back from its own configs/{full hash}.yaml,
    never from another run's. resolved_config.yaml stays the round's record of its data settings (the
    same for every run of the folder; the last run's full text, which older tools and rounds read).
    Files already there with the same text are left as they are: a resumed round, or a second runner of
    it, rewrites nothing."""
    url = round_url(cfg)
    text = config_to_yaml(cfg)
    for name, content in (
        ("resolved_config.yaml", text),
        ("config_hash", hash_config(cfg) + "\n"),
        (f"{RUN_CONFIGS}/{full_config_hash(cfg)}.yaml", text),
    ):
        target = storage.join(url, name)
        try:
            if storage.read_text(target) == content:
                continue
        except (FileNotFoundError, StorageError, UnicodeDecodeError):
            pass
        storage.write_text(target, content)
    return url


RUN_CONFIGS = "configs"  # {round}/configs/{full hash}.yaml: each run's own settings


def full_config_hash(cfg: RoundConfig) -> str:
    """Content hash of every key of the config (hash_config covers only what the round's data depends on):
    two runs that differ in anything, training.beta or a promotion threshold included, get two."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_config_url(round_dir: str, cfg: RoundConfig) -> str:
    """Where prepare_round wrote this run's full config: what every task of the run reads its settings
    from (tasks.config.resolve_config hands it out as round_ref["config_url"])."""
    return storage.join(round_dir, RUN_CONFIGS, f"{full_config_hash(cfg)}.yaml")


def stage_settings_hash(cfg: RoundConfig, stage: str) -> str:
    """What a stage's output depends on besides its input: its own section, the model and the seed.

    Sections are read through `data_settings`, so what only the quality gate reads (judging.min_valid_rate)
    or what only makes the fake engine fail (engine.fake.fail_calls) does not redo a finished shard.
    """
    if stage in EVAL_MODEL_STAGES:  # their folder is named by the same hash (evaluation_url)
        return downstream_settings_hash(cfg) if stage == "downstream" else evaluation_settings_hash(cfg)
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
    """The output folder, input digest and settings hash that a finished shard's manifest must match.
    (`round_dir` is the evaluation's folder for an evaluation stage.)"""
    target = shard_target_if_ready(stage, cfg, round_dir, index)
    if target is None:
        in_url = stage_url(round_dir, input_stage(stage))
        raise StorageError(f"{stage} shard {index}: its input shard {index} of {in_url} is not finished")
    return target


def shard_target_if_ready(stage: str, cfg: RoundConfig, round_dir: str, index: int) -> ShardTarget | None:
    """shard_target, or None while the input shard is not finished (the shard cannot have been made)."""
    if stage not in SHARD_STAGES:
        raise ValueError(f"unknown model stage {stage!r}; allowed: {', '.join(SHARD_STAGES)}")
    in_url = stage_url(round_dir, input_stage(stage))
    entry = shards.read_shard_manifest(in_url, index)
    if entry is None or not entry.complete:
        return None
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
    """Load a YAML recipe from a local path or any fsspec URL and apply `a.b=c` overrides.

    A file that is missing, a folder, unreadable, not UTF-8, not YAML, empty or only comments is refused
    by name; so is every bad key. Messages are redacted (sao_core.redact): no URL credential in them."""
    from sao_core.store import storage

    shown = redact(url)
    try:
        text = storage.read_text(url)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {shown}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {shown} is not UTF-8 text: {e}") from e
    except (IsADirectoryError, NotADirectoryError, PermissionError, StorageError) as e:
        # A store that does not answer (TransientStorageError) is not among them: a retry may read it.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"config file {shown} cannot be read: {redact(reason)}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {shown} is not valid YAML: {e}") from e
    if data is None:
        # An empty recipe would run a whole round on defaults without a word; `{}` says so on purpose.
        raise ConfigError(
            f"config file {shown} is empty (or only comments): write the sections to set, e.g. "
            "'personas: {n: 8}', or '{}' to run on every default"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {shown} must hold a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return build_config(data, overrides)
    except ConfigError as e:
        # Not chained: the validation error behind it repeats every input value, a URL's credentials
        # included, and tracebacks (Prefect's logs) print causes; this message names the key already.
        raise ConfigError(redact(f"{shown}: {e}")) from None


# Keys that say how a round's data is made, not what it is: a round keeps its folder (and every finished
# shard) when they change, so a longer timeout after a shard timed out, or a lower gate after the gate
# failed, redoes nothing. Only what changes the output may name where the output goes.
_NOT_DATA_KEYS: dict[str, tuple[str, ...]] = {
    # where the artifacts live; which references and engine URLs are allowed
    "run": ("root", "allowed_schemes", "allowed_base_url_schemes"),
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
_OWN_HASH_SECTIONS = ("training", "fanout", "promotion", "campaign")
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

    The root goes through storage.normalise_url (`~` expanded, a relative path made absolute), as the
    campaign records and lock do: the folder (and every cache key built on it) must name one place.
    """
    root = storage.normalise_url(cfg.run.root)
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


# --- the evaluation's folders ----------------------------------------------------------------------


def _engine_data(engine: BaseModel | None) -> dict[str, Any] | None:
    """An engine section less what does not change its text (as data_settings does for the round's)."""
    if engine is None:
        return None
    data = config_to_dict(engine)
    for key in _NOT_DATA_KEYS["engine"]:
        data.pop(key, None)
    if data.get("name") != "transformers":
        data.pop("batch_size", None)
    data.get("fake", {}).pop("fail_calls", None)
    return data


def eval_shard_size(cfg: RoundConfig) -> int:
    """Rows per shard of the evaluation's stages: evaluation.shard_size, or run.shard_size when unset."""
    return cfg.evaluation.shard_size or cfg.run.shard_size


def evaluation_settings_hash(cfg: RoundConfig) -> str:
    """What the evaluation's results depend on besides the candidate (whose folder holds them): the
    evaluation section less downstream, the current model, the engines that answer and judge, the judge
    prompt's prefill and parsing, the seed and the shard format. It names {model}/eval/{hash}/, so an
    evaluation made with other settings is never served for these (issue 17, 8b)."""
    e = config_to_dict(cfg.evaluation)
    for key in ("downstream", "enabled", "decontamination_n", "engine", "judge", "shard_size"):
        e.pop(key, None)
    judge = cfg.evaluation.judge
    parts = {
        "evaluation": e,
        "model": data_settings(cfg)["model"],
        "engine": _engine_data(cfg.evaluation.engine or cfg.engine),
        "judge_model": config_to_dict(judge.model) if judge.model else None,
        "judge_engine": _engine_data(judge.engine or cfg.engine),
        "judging": {"prefill": cfg.judging.prefill, "lenient": cfg.judging.lenient},
        "seed": cfg.run.seed,
        "format": cfg.run.format,
        "shard_size": eval_shard_size(cfg),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def downstream_settings_hash(cfg: RoundConfig) -> str:
    """What the lm-eval scores depend on besides the candidate: the downstream section, the current
    model (the baseline), the device and dtype they run in, and the seed."""
    parts = {
        "downstream": config_to_dict(cfg.evaluation.downstream),
        "model": data_settings(cfg)["model"],
        "device": cfg.engine.device,
        "dtype": cfg.engine.dtype,
        "seed": cfg.run.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def evaluation_url(model_url: str, cfg: RoundConfig) -> str:
    """{model}/eval/{evaluation_settings_hash}: the evaluation's stages and its manifest."""
    return storage.join(model_url, "eval", evaluation_settings_hash(cfg))


def downstream_url(model_url: str, cfg: RoundConfig) -> str:
    """{model}/eval/downstream-{downstream_settings_hash}: the lm-eval runs and downstream.json."""
    return storage.join(model_url, "eval", f"downstream-{downstream_settings_hash(cfg)}")
