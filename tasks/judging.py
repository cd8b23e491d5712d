"""Self-judgement (SAO.md step 4): the model ranks its own answers; diagnostics in the artifacts."""

from __future__ import annotations

from typing import Any

from tasks.shards import run_model_stage, stage_task


@stage_task("judgements")
def judge_responses(round_ref: dict[str, Any], settings_hash: str, input_url: str) -> dict[str, Any]:
    return run_model_stage("judgements", round_ref, settings_hash, input_url)
