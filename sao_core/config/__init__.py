"""One frozen config per round, a section per stage, built from a mapping with `--set a.b=c` overrides.

    cfg = build_config({"personas": {"n": 8}}, ["judging.swap=true"])
    cfg.judging.swap  # True

sections    the schema (RoundConfig and its sections) and the references it holds
schemes     the URL schemes a reference uses, and the defaults of the scheme allow-lists
loading     validation of raw mappings and overrides, with errors that name the key; YAML out
worker_env  what a config may ask of the machine that runs it, which that machine's environment decides

Reading a config file from the store, and the hash that names a round's folder, are the store's
(sao_core.store.layout: load_config, hash_config, round_url).
"""

from sao_core.config.loading import build_config, config_to_dict, config_to_yaml
from sao_core.config.schemes import DEFAULT_SCHEMES, SCHEME_ALIASES, RefKind, url_schemes
from sao_core.config.sections import (
    CampaignConfig,
    DownstreamConfig,
    EngineConfig,
    EvaluationConfig,
    FakeEngineConfig,
    FanoutConfig,
    JudgeConfig,
    JudgingConfig,
    LoraSection,
    ModelConfig,
    PairingConfig,
    PersonasConfig,
    PromotionConfig,
    PromptsConfig,
    ResponsesConfig,
    RoundConfig,
    RunConfig,
    Section,
    TrainingConfig,
)

__all__ = [
    "DEFAULT_SCHEMES",
    "SCHEME_ALIASES",
    "CampaignConfig",
    "DownstreamConfig",
    "EngineConfig",
    "EvaluationConfig",
    "FakeEngineConfig",
    "FanoutConfig",
    "JudgeConfig",
    "JudgingConfig",
    "LoraSection",
    "ModelConfig",
    "PairingConfig",
    "PersonasConfig",
    "PromotionConfig",
    "PromptsConfig",
    "RefKind",
    "ResponsesConfig",
    "RoundConfig",
    "RunConfig",
    "Section",
    "TrainingConfig",
    "build_config",
    "config_to_dict",
    "config_to_yaml",
    "url_schemes",
]
