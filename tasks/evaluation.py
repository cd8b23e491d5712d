"""Evaluation: the trained policy against the campaign's current model (and the original), judged in both
orders, and the judge rated on labelled pairs (sao_core.evaluation.compare)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from sao_core.config import ModelConfig, RoundConfig
from sao_core.evaluation.compare import Contender, evaluate_candidate, headline
from sao_core.store import storage
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent
from tasks.engines import engine_for, release_engine


def _evaluation_output(parameters: dict[str, Any]) -> str | None:
    """What is wrong with the evaluation folder next to the model, or None when it holds its verdicts
    and its manifest (written last, so a finished evaluation)."""
    out = storage.join(parameters["model"]["url"], "eval")
    if not storage.exists(storage.join(out, "manifest.json")):
        return f"{storage.join(out, 'manifest.json')} is missing"
    if not storage.list_files(out, "results*.jsonl"):
        return f"{out} has no results*.jsonl"
    return None


@task(
    name="evaluate",
    task_run_name="evaluate-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("evaluate", "model", output=_evaluation_output),
    persist_result=True,
)
def evaluate(round_ref: dict[str, Any], settings_hash: str, model: dict[str, Any]) -> dict[str, Any]:
    """The trained policy against the current model (and the original), the judge on the trust set."""
    cfg = load_round_config(round_ref["config_url"])
    policy_cfg = policy_config(cfg, model)
    candidate = Contender("candidate", describe(policy_cfg.model), engine_for(policy_cfg))
    baselines = [Contender("current", describe(cfg.model), engine_for(cfg))]
    original = cfg.evaluation.original
    if original and original != cfg.model.path:
        original_cfg = loaded_config(
            cfg, cfg.model.model_copy(update={"path": original, "adapter": None, "revision": None})
        )
        baselines.append(Contender("original", original, engine_for(original_cfg)))
    judge_cfg = judge_config(cfg)
    judge = Contender("judge", describe(judge_cfg.model), engine_for(judge_cfg))
    out = storage.join(model["url"], "eval")
    # Engines stay loaded if this try fails, so a retry does not load them again.
    result = evaluate_candidate(cfg, candidate, baselines, judge, out)
    release_engine(policy_cfg)
    if len(baselines) > 1:
        release_engine(original_cfg)
    create_table_artifact(
        headline(result),
        key=artifact_key(cfg.run.campaign, "evaluation"),
        description=f"round {cfg.run.round}: {result['prompts']} instructions ({result['prompt_set']}), "
        f"judge {result['judge']} in both orders",
    )
    return {**result, "url": out}


def policy_config(cfg: RoundConfig, model: dict[str, Any]) -> RoundConfig:
    """The round config with its trained policy as the model (the full model when there is one), on the
    evaluation's engine."""
    if model.get("full"):
        policy = cfg.model.model_copy(update={"path": model["full"], "adapter": None, "revision": None})
    else:
        policy = cfg.model.model_copy(update={"adapter": model["adapter"]})
    return loaded_config(cfg, policy)


def loaded_config(cfg: RoundConfig, model: ModelConfig) -> RoundConfig:
    """The round config with `model` on the engine that loads models for the evaluation
    (evaluation.engine, else the round's)."""
    return cfg.model_copy(update={"model": model, "engine": cfg.evaluation.engine or cfg.engine})


def judge_config(cfg: RoundConfig) -> RoundConfig:
    """The round config with the evaluation's judge as model and engine (default: the current model)."""
    j = cfg.evaluation.judge
    return cfg.model_copy(update={"model": j.model or cfg.model, "engine": j.engine or cfg.engine})


def describe(model: ModelConfig) -> str:
    return model.path + (f" + adapter {model.adapter}" if model.adapter else "")
