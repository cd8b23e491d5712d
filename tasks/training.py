"""Preference optimisation on the round's pairs (SimPO by default), launched as the config says."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact

from sao_core import storage
from sao_core.training import default_output_url, train
from tasks.common import artifact_key, link_for, load_round_config, make_cache_key


@task(
    name="train",
    task_run_name="train-round-{round_ref[round]}",
    retries=1,
    retry_delay_seconds=30,
    cache_key_fn=make_cache_key("train", "pairs_url"),
    persist_result=True,
)
def train_policy(round_ref: dict[str, Any], settings_hash: str, pairs_url: str) -> dict[str, Any]:
    """Train (or resume, or find finished) the round's policy; returns where it is and its figures."""
    cfg = load_round_config(round_ref["config_url"])
    out = default_output_url(cfg)
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
