"""Resolve a round's config once: validate, write resolved_config.yaml and its hash, hand out URIs."""

from __future__ import annotations

from typing import Any

from prefect import task

from sao_core.store.layout import hash_config, load_config, prepare_round, stage_settings_hash
from sao_core.store.storage import join
from sao_core.training import training_hash
from tasks.cache import retry_unless_permanent


# A wrong key or value fails at once (retry_unless_permanent): only a flaky artifact store is retried.
@task(
    name="resolve-config",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def resolve_config(config: str, overrides: list[str]) -> dict[str, Any]:
    """The round's identity: where it lives and the hash of each section (the tasks' cache keys)."""
    cfg = load_config(config, overrides)
    round_dir = prepare_round(cfg)
    return {
        "round_dir": round_dir,
        "config_url": join(round_dir, "resolved_config.yaml"),
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
            "evaluation": hash_config(cfg.evaluation) + hash_config(cfg.model),
            "downstream": hash_config(cfg.evaluation.downstream)
            + hash_config(cfg.model)
            + hash_config(cfg.engine),
        },
        "evaluate": cfg.evaluation.enabled,
        "downstream": cfg.evaluation.enabled and cfg.evaluation.downstream.enabled,
        "promotion": cfg.promotion.enabled and cfg.evaluation.enabled,
        "approval": cfg.promotion.approval,
        "approval_timeout_s": cfg.promotion.approval_timeout_s,
        "shard_timeout_s": cfg.engine.shard_timeout_s,
    }
