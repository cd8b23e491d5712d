"""Transformers engine on the bundled SmolLM2: batched (batch 16) vs one request at a time.

    .venv/bin/python -m bench.engine_batching [--requests 64] [--max-tokens 64]

Both runs answer the same chats with the same engine object, side by side in one process; the figure
that matters is the ratio of their tokens/s (target >= 3x). Tokens are completion tokens actually
produced (padding after a finished answer is not counted). Writes bench/results/engine_batching.{json,md}.
"""

from __future__ import annotations

import argparse
import time

from bench.common import machine, write_report
from sao_core.config import build_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.method.prompts import build_prompt_requests
from sao_core.stages.persona_sources import sample_personas


def requests_for(n: int) -> list[ChatRequest]:
    cfg = build_config({"personas": {"n": n}})
    return build_prompt_requests(sample_personas(cfg.personas, seed=0), prefill="User prompt: As a")


def timed(engine, requests: list[ChatRequest], sampling: Sampling, batch_size: int) -> dict:
    engine.cfg = engine.cfg.model_copy(update={"batch_size": batch_size})
    start = time.perf_counter()
    outs = engine.generate(requests, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(c.completion_tokens for o in outs for c in o)
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    cfg = build_config({"engine": {"name": "transformers", "device": "cpu", "dtype": "float32"}})
    engine = make_engine(cfg.engine, cfg.model, seed=0)
    reqs = requests_for(args.requests)
    # Greedy, so both runs decode the same number of tokens per answer and the ratio is about batching.
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    engine.generate(reqs[:2], sampling)  # warm-up: first-call allocations are not part of either figure
    batched = timed(engine, reqs, sampling, args.batch_size)
    single = timed(engine, reqs, sampling, 1)
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    payload = {
        "benchmark": "engine_batching",
        "model": cfg.model.path,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "batched": batched,
        "one_at_a_time": single,
        "ratio": round(ratio, 2),
        "target": 3.0,
        "machine": machine(),
    }
    md = (
        f"# Transformers engine: batched vs one at a time\n\n"
        f"`.venv/bin/python -m bench.engine_batching --requests {args.requests} --max-tokens {args.max_tokens}`\n\n"
        f"| run | batch | seconds | tokens | tokens/s |\n|---|---|---|---|---|\n"
        f"| batched | {batched['batch_size']} | {batched['seconds']} | {batched['tokens']} | {batched['tokens_per_s']} |\n"
        f"| one at a time | 1 | {single['seconds']} | {single['tokens']} | {single['tokens_per_s']} |\n\n"
        f"Ratio: **{ratio:.2f}x** (target >= 3x). {payload['machine']}\n"
    )
    path = write_report("engine_batching", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
