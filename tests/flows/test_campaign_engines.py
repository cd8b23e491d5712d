"""Round 2 of a campaign generates with round 1's promoted model on the real engines.

Round 1 is the tiny recipe (the scripted engine writes the data, the tiny Llama trains a LoRA adapter,
merged into the full model the campaign promotes). Round 2 continues the campaign on the transformers
engine, then on vLLM CPU, from CURRENT's model. The tiny model's text is noise, so round 2's prompts are
all dropped and it stops at the quality gate; what is checked is what the engine that wrote the prompts
says it loaded: its manifest's model and model_revision, a hash of the weights' bytes that the engine
computes from the folder it loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sao_core.campaign import ledger
from sao_core.store import shards
from sao_core.store.models import model_revision, resolve_model
from tests.integration.conftest import vllm_python  # noqa: F401  (a fixture)

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = "bundled:tiny-random-llama"
PROMOTE_ALWAYS = [
    "promotion.min_win_rate_lower=0.0",
    "promotion.min_judge_agreement=0.0",
    "promotion.min_judged=1",
    "promotion.min_valid_share=0.0",
]
pytestmark = pytest.mark.tier1


def _campaign_round(root: Path, *overrides: str) -> Any:
    from flows.campaign import sao_campaign

    return sao_campaign(
        TINY,
        [f"run.root={root}", "evaluation.n=8", "evaluation.downstream.enabled=false", *overrides],
        rounds=1,
        return_state=True,
    )


def _round_two_on(engine: list[str], root: Path) -> None:
    first = _campaign_round(root, *PROMOTE_ALWAYS)
    assert first.is_completed(), first
    (promoted,) = ledger.history(str(root), "tiny")
    assert promoted.round == 1 and promoted.model_adapter is None  # merged: one loadable folder
    base_revision = model_revision(BASE, resolve_model(BASE))
    promoted_revision = model_revision(promoted.model_path, resolve_model(promoted.model_path))
    assert promoted_revision != base_revision  # trained weights, not the base's

    second = _campaign_round(root, *engine)
    # The tiny model's noise never ends a prompt before max_tokens, so every prompt is dropped (counted)
    # and the round stops at the quality gate; what matters here is the stage that generated.
    assert second.is_failed() and "quality gate" in str(second.message), second
    (round_two,) = [p for p in (root / "tiny").iterdir() if p.name.startswith("round_002-")]
    prompts = shards.read_stage_manifest(str(round_two / "prompts"))
    assert prompts["rows_in"] == 8 and prompts["completion_tokens"] > 0, prompts
    assert prompts["engine"] == engine[0].split("=", 1)[1]
    assert prompts["model"] == promoted.model_path
    assert prompts["model_revision"] == promoted_revision
    assert {s["model_revision"] for s in prompts["shards"]} == {promoted_revision}
    assert ledger.current(str(root), "tiny").round == 1  # the failed round promoted nothing


def test_round_two_generates_with_round_one_on_transformers(tmp_path: Path, prefect_api: None) -> None:
    _round_two_on(["engine.name=transformers"], tmp_path)


@pytest.mark.vllm
def test_round_two_generates_with_round_one_on_vllm(
    tmp_path: Path,
    prefect_api: None,
    vllm_python: str,  # noqa: F811
) -> None:
    _round_two_on(["engine.name=vllm", f"engine.python={vllm_python}", "engine.max_model_len=2048"], tmp_path)
