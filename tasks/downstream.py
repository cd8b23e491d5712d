"""Downstream skills: lm-eval tasks on the trained policy and on the model it started from."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from sao_core.config import ModelConfig
from sao_core.evaluation.downstream import run_downstream
from sao_core.store import storage
from sao_core.store.models import resolve_adapter, resolve_model
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent
from tasks.evaluation import policy_config


def _downstream_output(parameters: dict[str, Any]) -> str | None:
    url = storage.join(parameters["model"]["url"], "eval", "downstream.json")
    return None if storage.exists(url) else f"{url} is missing"


def headline_scores(result: dict[str, Any]) -> dict[str, float]:
    """Each task's main figure (acc when the task has it, else its first 0-1 metric)."""
    scores = {}
    for name, t in result["tasks"].items():
        metrics = t.get("metrics") or {}
        key = "acc" if "acc" in metrics else next(iter(metrics), None)
        if key is not None and metrics[key].get("value") is not None:
            scores[f"{name} {key}"] = float(metrics[key]["value"])
    return scores


def _scores(cfg: Any, model: ModelConfig) -> dict[str, Any]:
    d = cfg.evaluation.downstream
    return run_downstream(
        resolve_model(model.path),
        list(d.tasks),
        adapter=resolve_adapter(model.adapter) if model.adapter else None,
        include_path=d.include_path,
        limit=d.limit,
        batch_size=d.batch_size,
        device=cfg.engine.device,
        dtype=cfg.engine.dtype,
        num_fewshot=d.num_fewshot,
        seed=cfg.run.seed,
    )


@task(
    name="downstream",
    task_run_name="downstream-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("downstream", "model", output=_downstream_output),
    persist_result=True,
)
def downstream(round_ref: dict[str, Any], settings_hash: str, model: dict[str, Any]) -> dict[str, Any]:
    """lm-eval on the candidate and on the current model, written to {model}/eval/downstream.json."""
    cfg = load_round_config(round_ref["config_url"])
    candidate = _scores(cfg, policy_config(cfg, model).model)
    baseline = _scores(cfg, cfg.model)
    result = {
        "candidate": candidate,
        "baseline": baseline,
        "scores": headline_scores(candidate),
        "baseline_scores": headline_scores(baseline),
    }
    storage.write_json(storage.join(model["url"], "eval", "downstream.json"), result)
    create_table_artifact(
        [
            {
                "task": k,
                "candidate": round(v, 4),
                "current model": round(result["baseline_scores"].get(k, 0.0), 4),
            }
            for k, v in result["scores"].items()
        ],
        key=artifact_key(cfg.run.campaign, "downstream"),
        description=f"round {cfg.run.round}: lm-eval {candidate['lm_eval_version']}, "
        f"{', '.join(cfg.evaluation.downstream.tasks)}",
    )
    return result
