"""Evaluation of the new policy against the base, judged by the base model in both orders."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from sao_core import storage
from sao_core.evaluation import evaluate_policy
from tasks.common import artifact_key, engine_for, load_round_config, make_cache_key, release_engine


@task(
    name="evaluate",
    task_run_name="evaluate-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=10,
    cache_key_fn=make_cache_key("evaluate", "model"),
    persist_result=True,
)
def evaluate(round_ref: dict[str, Any], settings_hash: str, model: dict[str, Any]) -> dict[str, Any]:
    cfg = load_round_config(round_ref["config_url"])
    if model.get("full") and not model.get("adapter"):
        policy_model = cfg.model.model_copy(update={"path": model["full"]})
    else:
        policy_model = cfg.model.model_copy(update={"adapter": model["adapter"]})
    policy_cfg = cfg.model_copy(update={"model": policy_model})
    out = storage.join(model["url"], "eval")
    # The policy's engine stays loaded if this try fails, so a retry does not load it again.
    result = evaluate_policy(cfg, engine_for(policy_cfg), engine_for(cfg), out)
    release_engine(policy_cfg)
    create_table_artifact(
        [{"metric": k, "value": v} for k, v in result.items()],
        key=artifact_key(cfg.run.campaign, "evaluation"),
        description="new policy vs base on held-out prompts, base model judging both orders",
    )
    return {**result, "url": out}
