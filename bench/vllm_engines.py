"""The same SmolLM2 chats through transformers (batched), our vllm engine, and a bare vllm.LLM script.

    .venv/bin/python -m bench.vllm_engines [--requests 64] [--max-tokens 64] [--rounds 2]   (make bench-vllm)

Needs .venv-vllm (scripts/setup_vllm_env.sh). The chats are SAO prompt-synthesis requests (the persona
template); decoding is greedy so every run decodes the same answers. Tokens/s is completion tokens over
the seconds of the generate call, after one warm-up call; start-up (interpreter, vLLM import, model load)
is reported apart. Our engine is timed from this process, so its figure includes the JSON round trip to
its worker; the bare script (bench/vllm_bare.py) has no project code. Target: ours / bare >= 0.95.
Writes bench/results/vllm_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import machine, write_report
from sao_core.config import build_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.models import resolve_model
from sao_core.personas import sample_personas
from sao_core.prompts import build_prompt_requests

REPO = Path(__file__).resolve().parents[1]


def timed_runs(engine, requests: list[ChatRequest], sampling: Sampling, rounds: int) -> list[dict]:
    engine.generate(requests[:2], sampling)  # warm-up: first-call allocations are in no figure
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        outs = engine.generate(requests, sampling)
        seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "tokens": sum(c.completion_tokens for o in outs for c in o)})
    return runs


def best(runs: list[dict]) -> dict:
    """The fastest round (the least disturbed by anything else on the machine)."""
    run = min(runs, key=lambda r: r["seconds"] / max(r["tokens"], 1))
    return {
        "seconds": round(run["seconds"], 2),
        "tokens": run["tokens"],
        "tokens_per_s": round(run["tokens"] / run["seconds"], 1),
        "rounds": [round(r["tokens"] / r["seconds"], 1) for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="timed calls per engine; the fastest is reported")
    ap.add_argument("--python", default=str(REPO / ".venv-vllm" / "bin" / "python"), help="the vLLM env")
    args = ap.parse_args()

    cfg = build_config(
        {
            "personas": {"n": args.requests},
            "engine": {"device": "cpu", "dtype": "float32", "batch_size": 16, "max_model_len": 2048},
        }
    )
    requests = build_prompt_requests(sample_personas(cfg.personas, seed=0))
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    model_dir = resolve_model(cfg.model.path)

    transformers = make_engine(cfg.engine.model_copy(update={"name": "transformers"}), cfg.model)
    hf = best(timed_runs(transformers, requests, sampling, 1))
    transformers.close()

    vllm_cfg = cfg.engine.model_copy(update={"name": "vllm", "python": args.python})
    ours_engine = make_engine(vllm_cfg, cfg.model)
    ours_start = float(getattr(ours_engine, "start_seconds", 0.0))
    ours = best(timed_runs(ours_engine, requests, sampling, args.rounds))
    ours_engine.close()

    with tempfile.TemporaryDirectory() as tmp:
        chats = Path(tmp) / "chats.json"
        chats.write_text(json.dumps([[m.to_dict() for m in r.messages] for r in requests]))
        out = Path(tmp) / "bare.json"
        started = time.perf_counter()
        bare_cmd = [
            args.python,
            str(REPO / "bench" / "vllm_bare.py"),
            "--model",
            model_dir,
            "--chats",
            str(chats),
        ]
        bare_cmd += ["--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds), "--out", str(out)]
        subprocess.run(
            bare_cmd,
            check=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
        )
        bare_total = time.perf_counter() - started
        bare_raw = json.loads(out.read_text())
    bare = best(bare_raw["rounds"])

    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
    payload = {
        "benchmark": "vllm_engines",
        "model": cfg.model.path,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "transformers_batched": {**hf, "batch_size": cfg.engine.batch_size},
        "vllm_engine": {**ours, "startup_s": round(ours_start, 1)},
        "vllm_bare": {
            **bare,
            "startup_s": round(bare_raw["startup_s"], 1),
            "process_s": round(bare_total, 1),
        },
        "ratio_engine_to_bare": round(ratio, 3),
        "ratio_vllm_to_transformers": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
        "target": 0.95,
        "load_average": os.getloadavg(),
        "machine": machine(),
    }
    rows = [
        ("transformers, batch 16", hf, "-"),
        ("vllm engine (sao_core, .venv-vllm)", ours, f"{ours_start:.1f}"),
        ("bare vllm.LLM script", bare, f"{bare_raw['startup_s']:.1f}"),
    ]
    table = "".join(
        f"| {name} | {r['seconds']} | {r['tokens']} | **{r['tokens_per_s']}** | {r['rounds']} | {start} |\n"
        for name, r, start in rows
    )
    md = (
        f"# SmolLM2: transformers vs vllm engine vs bare vLLM (CPU)\n\n"
        f"`.venv/bin/python -m bench.vllm_engines --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--rounds {args.rounds}`\n\n"
        f"{args.requests} prompt-synthesis chats, greedy, up to {args.max_tokens} tokens each.\n\n"
        f"| run | seconds | tokens | tokens/s | tokens/s per round | start-up s |\n|---|---|---|---|---|---|\n"
        f"{table}\n"
        f"Engine / bare: **{ratio:.3f}** (target >= 0.95). vllm engine / transformers: "
        f"{payload['ratio_vllm_to_transformers']}x. Load average during the run: "
        f"{', '.join(f'{x:.1f}' for x in payload['load_average'])}. {payload['machine']}\n"
    )
    path = write_report("vllm_engines", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
