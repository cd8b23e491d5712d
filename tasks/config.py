"""Resolve a round's config once: validate, write resolved_config.yaml and its hash, hand out URIs."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.states import Failed, State

from sao_core.config import RoundConfig
from sao_core.errors import ConfigError
from sao_core.redact import error_line
from sao_core.store.layout import (
    downstream_settings_hash,
    evaluation_settings_hash,
    hash_config,
    load_config,
    prepare_round,
    run_config_url,
    stage_settings_hash,
)
from sao_core.training import training_hash
from tasks.cache import retry_unless_permanent


def _config_or_failure(config: str, overrides: list[str]) -> RoundConfig | State:
    """The config, or the Failed state a bad one ends its task in: the error's one line as the state's
    message (what the UI and API show; Prefect logs it), without the traceback a raised error would get;
    the error itself is the state's data, so the flow still fails with it and it is never retried."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        line = error_line(e)
        return Failed(message=line, data=ConfigError(line))


def config_result(value: dict[str, Any] | State) -> dict[str, Any]:
    """What check_config or resolve_config gave the flow: their mapping, or a bad config's error raised.
    (A task that returns a state, as these do for a bad config, hands the caller that state.)"""
    if isinstance(value, State):
        value.result()  # raises the ConfigError the Failed state holds
        raise ConfigError(value.message or "invalid config")  # a state that holds no error
    return value


# Whoever triggers a run writes its config (SECURITY.md): checked as the run's first task, on the
# worker, whose environment decides what a config may ask for.
@task(name="check-config", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)
def check_config(config: str, overrides: list[str]) -> dict[str, Any] | State:
    """Validate the config before the run takes the campaign lock; where the campaign lives."""
    cfg = _config_or_failure(config, overrides)
    if isinstance(cfg, State):
        return cfg
    return {"root": cfg.run.root, "campaign": cfg.run.campaign}


# A wrong key or value fails at once (retry_unless_permanent): only a flaky artifact store is retried.
@task(
    name="resolve-config",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def resolve_config(config: str, overrides: list[str]) -> dict[str, Any] | State:
    """The round's identity: where it lives and the hash of each section (the tasks' cache keys)."""
    cfg = _config_or_failure(config, overrides)
    if isinstance(cfg, State):
        return cfg
    round_dir = prepare_round(cfg)
    return {
        "round_dir": round_dir,
        # This run's own settings: runs that share the round folder (they differ only in training, fan-out
        # or promotion) never read each other's.
        "config_url": run_config_url(round_dir, cfg),
        "config_hash": hash_config(cfg),
        "campaign": cfg.run.campaign,
        "root": cfg.run.root,
        "round": cfg.run.round,
        "format": cfg.run.format,
        # What each task's output depends on besides its inputs: its `settings_hash` parameter.
        "settings": {
            stage: stage_settings_hash(cfg, stage)
            for stage in ("personas", "prompts", "responses", "judgements")
        }
        | {
            "pairs": hash_config(cfg),
            "training": training_hash(cfg),
            # Each also names the folder its results go to ({model}/eval/...), keyed by these settings.
            "evaluation": evaluation_settings_hash(cfg),
            "downstream": downstream_settings_hash(cfg),
        },
        "evaluate": cfg.evaluation.enabled,
        "downstream": cfg.evaluation.enabled and cfg.evaluation.downstream.enabled,
        "promotion": cfg.promotion.enabled and cfg.evaluation.enabled,
        "approval": cfg.promotion.approval,
        "approval_timeout_s": cfg.promotion.approval_timeout_s,
        "shard_timeout_s": cfg.engine.shard_timeout_s,
    }
