"""One frozen config per round, a section per stage, built from a mapping with `--set a.b=c` overrides.

    cfg = build_config({"personas": {"n": 8}}, ["judging.swap=true"])
    cfg.judging.swap  # True

sections  the schema (RoundConfig and its sections) and the URL schemes its references use
loading   validation of raw mappings and overrides, with errors that name the key; YAML out

Reading a config file from the store, and the hash that names a round's folder, are the store's
(sao_core.store.layout: load_config, hash_config, round_url).
"""

from sao_core.config.loading import build_config, config_to_dict, config_to_yaml
from sao_core.config.sections import (
    DEFAULT_SCHEMES,
    SCHEME_ALIASES,
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
    RefKind,
    ResponsesConfig,
    RoundConfig,
    RunConfig,
    Section,
    TrainingConfig,
    url_schemes,
)

__all__ = [
    "DEFAULT_SCHEMES",
    "SCHEME_ALIASES",
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
