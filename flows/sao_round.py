"""One SAO round as a Prefect flow, in the order of the paper's algorithm.

    sao run --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]    # flows/cli.py
    sao_round("configs/cpu-smollm2.yaml", ["personas.n=8"])                # from Python

With no PREFECT_API_URL the run uses Prefect's temporary local server; with it set, the run shows in
that server's UI. Every stage is a retried, cached task; see tasks/.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.common import result_storage, with_result_storage
from tasks.config import resolve_config
from tasks.evaluation import evaluate
from tasks.gate import quality_gate
from tasks.judging import judge_responses
from tasks.pairing import build_pairs
from tasks.personas import sample_personas
from tasks.prompts import synthesize_prompts
from tasks.report import write_report
from tasks.responses import generate_responses
from tasks.training import train_policy


@flow(name="sao-round")
def sao_round(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """resolve -> personas -> prompts -> responses -> judgements -> pairs -> gate -> train -> evaluate -> report"""
    ref = resolve_config(config, list(overrides or []))
    results = result_storage(ref["root"])
    ref = {**ref, "result_storage": results}
    s = ref["settings"]
    personas = with_result_storage(sample_personas, results)(ref, s["personas"])
    prompts = with_result_storage(synthesize_prompts, results)(ref, s["prompts"], personas["url"])
    responses = with_result_storage(generate_responses, results)(ref, s["responses"], prompts["url"])
    judgements = with_result_storage(judge_responses, results)(ref, s["judgements"], responses["url"])
    pairs = with_result_storage(build_pairs, results)(ref, s["pairs"], judgements["url"], responses["url"])
    quality_gate(ref, pairs, judgements)
    model = with_result_storage(train_policy, results)(ref, s["training"], pairs["url"])
    evaluation = (
        with_result_storage(evaluate, results)(ref, s["evaluation"], model) if ref["evaluate"] else None
    )
    stages = {s["stage"]: s for s in (personas, prompts, responses, judgements, pairs)}
    report = write_report(ref, stages, model, evaluation)
    return {"round_dir": ref["round_dir"], "report": report, "model": model["url"], "evaluation": evaluation}
