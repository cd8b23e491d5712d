"""Personas (SAO.md step 1): n distinct personas, none used by an earlier round of the campaign."""

from __future__ import annotations

from typing import Any

from prefect import task

from sao_core.campaign.round_report import format_chains, sample_chains
from sao_core.stages.no_model import run_personas
from sao_core.stages.synth import stage_summary
from sao_core.store.layout import stage_url
from tasks.artifacts import publish_stage
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent


@task(
    name="personas",
    task_run_name="personas-round-{round_ref[round]}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("personas"),
    persist_result=True,
)
def sample_personas(round_ref: dict[str, Any], settings_hash: str) -> dict[str, Any]:
    cfg = load_round_config(round_ref["config_url"])
    manifest = run_personas(cfg, round_ref["round_dir"])
    summary = stage_summary(manifest)
    chains = sample_chains(round_ref["round_dir"], "personas", cfg.run.format, n=5, seed=cfg.run.seed)
    publish_stage(
        "personas", round_ref["round_dir"], summary, cfg.run.campaign, format_chains(chains, "personas")
    )
    return {"stage": "personas", "url": stage_url(round_ref["round_dir"], "personas"), "summary": summary}
