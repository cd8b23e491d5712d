"""Prompt synthesis (SAO.md step 2): one prompt per persona, duplicates removed round-wide."""

from __future__ import annotations

from typing import Any

from tasks.shards import run_model_stage, stage_task


@stage_task("prompts")
def synthesize_prompts(round_ref: dict[str, Any], settings_hash: str, input_url: str) -> dict[str, Any]:
    return run_model_stage("prompts", round_ref, settings_hash, input_url)
