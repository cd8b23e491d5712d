"""Downstream skills: lm-eval tasks on the trained policy and on the model it started from.

A stage of two shards in {model}/eval/downstream-{downstream settings hash}/, one per model scored, run
where the round's shards run (tasks/evaluation.py run_stage): with `fanout.mode: deployment` lm-eval
loads its models on the GPU pool, not in the round's process.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from sao_core.evaluation.eval_stages import policy_model, read_downstream, write_downstream_models
from sao_core.store import storage
from sao_core.store.layout import downstream_url
from tasks.artifacts import artifact_key
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent
from tasks.engines import free_engines
from tasks.evaluation import run_stage


def _downstream_output(parameters: dict[str, Any]) -> str | None:
    cfg = load_round_config(parameters["round_ref"]["config_url"])
    url = storage.join(downstream_url(parameters["model"]["url"], cfg), "downstream.json")
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
    """lm-eval on the candidate and on the current model, written to {model}/eval/downstream-{hash}/."""
    cfg = load_round_config(round_ref["config_url"])
    out = downstream_url(model["url"], cfg)
    # lm-eval loads its models through transformers, never the served replicas: the candidate's weights.
    candidate = policy_model(cfg, model)
    write_downstream_models(cfg, out, candidate)
    if cfg.fanout.mode != "deployment":
        free_engines()  # lm-eval loads here: no other engine holds memory meanwhile
    run_stage("downstream", cfg, round_ref, out)
    runs = read_downstream(out, cfg.run.format)
    result = {
        "candidate": runs["candidate"],
        "baseline": runs["current"],
        "scores": headline_scores(runs["candidate"]),
        "baseline_scores": headline_scores(runs["current"]),
        "url": out,
    }
    storage.write_json(storage.join(out, "downstream.json"), result)
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
        description=f"round {cfg.run.round}: lm-eval {runs['candidate']['lm_eval_version']}, "
        f"{', '.join(cfg.evaluation.downstream.tasks)}",
    )
    return result
