"""Responses (SAO.md step 3): k answers per prompt."""

from __future__ import annotations

from typing import Any

from tasks.shards import run_model_stage, stage_task


@stage_task("responses")
def generate_responses(round_ref: dict[str, Any], settings_hash: str, input_url: str) -> dict[str, Any]:
    return run_model_stage("responses", round_ref, settings_hash, input_url)
