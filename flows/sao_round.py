"""One SAO round as a Prefect flow, in the order of the paper's algorithm.

    python -m flows.sao_round --config configs/cpu-smollm2.yaml [--set personas.n=8 ...]
    sao run --config configs/cpu-smollm2.yaml

With no PREFECT_API_URL the run uses Prefect's temporary local server; with it set, the run shows in
that server's UI. Every stage is a retried, cached task; see tasks/.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from prefect import flow

from tasks.common import result_storage, stored
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
    p = ref["params"]
    personas = stored(sample_personas, results)(ref, p["personas"])
    prompts = stored(synthesize_prompts, results)(ref, p["prompts"], personas["url"])
    responses = stored(generate_responses, results)(ref, p["responses"], prompts["url"])
    judgements = stored(judge_responses, results)(ref, p["judgements"], responses["url"])
    pairs = stored(build_pairs, results)(ref, p["pairs"], judgements["url"], responses["url"])
    quality_gate(ref, pairs, judgements)
    model = stored(train_policy, results)(ref, ref["training_hash"], pairs["url"])
    evaluation = stored(evaluate, results)(ref, ref["evaluation_hash"], model) if ref["evaluate"] else None
    stages = {s["stage"]: s for s in (personas, prompts, responses, judgements, pairs)}
    report = write_report(ref, stages, model, evaluation)
    return {"round_dir": ref["round_dir"], "report": report, "model": model["url"], "evaluation": evaluation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sao_round", description="run one SAO round on Prefect")
    ap.add_argument("--config", required=True, help="round recipe: a YAML path or any fsspec URL")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    where = os.environ.get("PREFECT_API_URL") or "a temporary local Prefect server"
    print(f"sao run: {args.config} on {where}", flush=True)
    result = sao_round(args.config, args.overrides)
    print(f"round folder: {result['round_dir']}")
    print(f"model: {result['model']}")
    if result.get("evaluation"):
        e = result["evaluation"]
        print(
            f"evaluation: win rate {e['win_rate']} ({e['wins']} wins, {e['losses']} losses, {e['ties']} ties)"
        )
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
