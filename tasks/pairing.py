"""Pairing (SAO.md step 5): valid judgements become TRL preference rows with lineage."""

from __future__ import annotations

from typing import Any

from prefect import task

from sao_core.campaign.round_report import format_chains, sample_chains
from sao_core.stages.no_model import run_pairs
from sao_core.stages.synth import stage_summary
from sao_core.store.layout import stage_url
from tasks.artifacts import publish_stage
from tasks.cache import load_round_config, make_cache_key, retry_unless_permanent


@task(
    name="pairs",
    task_run_name="pairs-round-{round_ref[round]}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=make_cache_key("pairs", "input_url", "responses_url"),
    persist_result=True,
)
def build_pairs(
    round_ref: dict[str, Any], settings_hash: str, input_url: str, responses_url: str
) -> dict[str, Any]:
    """Pairs from the judgements (input_url) and the answers they name (responses_url)."""
    cfg = load_round_config(round_ref["config_url"])
    manifest = run_pairs(cfg, round_ref["round_dir"])
    summary = stage_summary(manifest)
    chains = sample_chains(round_ref["round_dir"], "pairs", cfg.run.format, n=3, seed=cfg.run.seed)
    publish_stage("pairs", round_ref["round_dir"], summary, cfg.run.campaign, format_chains(chains, "pairs"))
    return {"stage": "pairs", "url": stage_url(round_ref["round_dir"], "pairs"), "summary": summary}
