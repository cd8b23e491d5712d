"""Preference optimisation on the round's pairs (SimPO by default), launched as the config says.

With `training.deployment` set, the round's train task runs the training flow (flows/train.py) as that
deployment on a multi-GPU pool and waits for it; the output folder, resume and manifest are the same,
since the run trains into the same `{round}/model/{training hash}/` URL.
"""

from __future__ import annotations

from typing import Any, cast

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from sao_core.errors import ModelNotFoundError, TrainingError
from sao_core.store import storage, trained
from sao_core.training import default_output_url, train
from tasks.artifacts import artifact_key, link_for
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent


def _model_output(parameters: dict[str, Any]) -> str | None:
    """What is wrong with the model folder the train task writes, or None when the run finished and its
    weights are there (store.trained.trained_model, the one check of a trained model folder)."""
    out = default_output_url(load_round_config(parameters["round_ref"]["config_url"]))
    try:
        trained.trained_model(out)
    except ModelNotFoundError as e:
        return str(e)
    return None


@task(name="train-model", task_run_name="train-model", retries=0)
def train_model(config_url: str, pairs_url: str, output_url: str) -> dict[str, Any]:
    """Train here, with the config's launcher (one process, accelerate or torchrun)."""
    return train(load_round_config(config_url), pairs_url, output_url)


def _train_on_deployment(deployment: str, config_url: str, pairs_url: str, output_url: str) -> dict[str, Any]:
    # Called from a sync task, run_deployment returns the flow run itself, not a coroutine.
    run = cast(
        FlowRun,
        run_deployment(
            deployment,
            parameters={"config_url": config_url, "pairs_url": pairs_url, "output_url": output_url},
            flow_run_name="train",
            timeout=None,  # training takes as long as it takes; a lost worker ends the run Crashed
        ),
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.type.value if run.state else "unknown"
        message = run.state.message if run.state else ""
        raise TrainingError(f"training run {run.id} on deployment {deployment} ended {state}: {message}")
    manifest_url = storage.join(output_url, "manifest.json")
    if not storage.exists(manifest_url):
        raise TrainingError(f"training run {run.id} on {deployment} completed but wrote no {manifest_url}")
    manifest: dict[str, Any] = storage.read_json(manifest_url)
    return manifest


@task(
    name="train",
    task_run_name="train-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("train", "pairs_url", output=_model_output),
    persist_result=True,
)
def train_policy(round_ref: dict[str, Any], settings_hash: str, pairs_url: str) -> dict[str, Any]:
    """Train (or resume, or find finished) the round's policy; returns where it is and its figures."""
    cfg = load_round_config(round_ref["config_url"])
    out = default_output_url(cfg)
    if cfg.training.deployment:
        manifest = _train_on_deployment(cfg.training.deployment, round_ref["config_url"], pairs_url, out)
    else:
        manifest = train(cfg, pairs_url, out)
    figures = {
        k: v for k, v in manifest.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    }
    create_table_artifact(
        [{"metric": k, "value": v} for k, v in figures.items()],
        key=artifact_key(cfg.run.campaign, "train"),
        description="training: steps, loss, throughput",
    )
    create_link_artifact(link_for(out), link_text="model folder", key=artifact_key(cfg.run.campaign, "model"))
    adapter = storage.join(out, "adapter") if cfg.training.lora.enabled else None
    full = storage.join(out, "full") if (not cfg.training.lora.enabled or cfg.training.merge) else None
    return {"url": out, "adapter": adapter, "full": full, "manifest": figures}
