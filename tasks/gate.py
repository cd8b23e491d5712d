"""The quality gate between data and training: too few pairs or too few judgements that give a pair stop the round."""

from __future__ import annotations

from typing import Any

from prefect import task

from sao_core.method.quality import check_quality


@task(name="quality-gate", task_run_name="quality-gate-round-{round_ref[round]}")
def quality_gate(
    round_ref: dict[str, Any], pairs: dict[str, Any], judgements: dict[str, Any]
) -> dict[str, Any]:
    """Raise RoundQualityError (the round fails, training never starts) or return the figures checked."""
    from tasks.cache import load_round_config

    cfg = load_round_config(round_ref["config_url"])
    return check_quality(cfg, pairs["summary"], judgements["summary"])
