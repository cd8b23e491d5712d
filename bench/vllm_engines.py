"""The same SmolLM2 chats through transformers (batched), our vllm engine, and a bare vllm.LLM script.

    .venv/bin/python -m bench.vllm_engines [--requests 64] [--max-tokens 64] [--rounds 3]   (make bench-vllm)

Needs .venv-vllm (scripts/setup_vllm_env.sh). The chats are SAO prompt-synthesis requests (the persona
template); decoding is greedy so every round decodes the same answers. The three arms are held open
side by side and treated alike: one warm-up call on two chats each, then `--rounds` timed calls on all
the chats, interleaved round by round (ORDERS: our engine and the bare script back to back, each first
in turn), with a pause before each call, so a busy spell on the shared machine falls on the arms
alike. An arm's tokens/s is its completion tokens over its seconds, summed over all its timed rounds
(the per-round figures and the per-round ratio of the two vLLM arms are listed too); start-up is
reported apart. Target: ours / bare >= 0.95.

What the seconds of a call cover:
- transformers: `engine.generate` in this process;
- our vllm engine: `engine.generate` timed in this process, so building the requests, the JSON round
  trip to its worker and the conversion of the outputs are in;
- bare: the `LLM.chat` call alone, timed inside bench/vllm_bare.py, which has no project code.
The report also gives what each vLLM arm spends outside vLLM per call: our engine's time here beyond
its worker's own seconds (pipes and JSON), and the bare script's command round trip.
Both vLLM children get the same `vllm.LLM` arguments (the engine's own `llm_kwargs`: stats logging off
in both), the same environment (VLLM_LOGGING_LEVEL and the rest), one seeded SamplingParams per request
(the engine must seed each request: a request's text may not depend on its batch neighbours) and
their output drained by a thread here into the same logger (sao_core.engines.child).

Writes bench/results/vllm_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bench.common import machine, write_report
from sao_core.config import build_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.child import ChildProcess
from sao_core.engines.vllm import conversation, llm_kwargs, sampling_kwargs
from sao_core.errors import EngineError
from sao_core.method.prompts import build_prompt_requests
from sao_core.stages.persona_sources import sample_personas
from sao_core.store.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2  # chats in the warm-up call of every arm: first-call allocations are in no figure
# Seconds of quiet before each timed call: vLLM's worker polls its queue for about a second after its
# last step, which would otherwise land on whichever arm runs next.
PAUSE_S = 2.0

# chats -> seconds, completion tokens and the arm's own extra timings
Call = Callable[[int], dict[str, Any]]
# Round r runs the arms in ORDERS[r % 4] (transformers, engine, bare): our engine and the bare script
# always run back to back, each first in turn, and transformers runs before them and after them.
ORDERS = (
    ("transformers", "vllm_engine", "vllm_bare"),
    ("transformers", "vllm_bare", "vllm_engine"),
    ("vllm_engine", "vllm_bare", "transformers"),
    ("vllm_bare", "vllm_engine", "transformers"),
)


class BareVLLM:
    """bench/vllm_bare.py held open under the vLLM environment, started and drained like the worker."""

    def __init__(self, python: str, spec: Path) -> None:
        cmd_read, cmd_write = os.pipe()
        reply_read, reply_write = os.pipe()
        cmd = [python, str(REPO / "bench" / "vllm_bare.py"), "--requests", str(spec)]
        cmd += ["--commands-fd", str(cmd_read), "--replies-fd", str(reply_write)]
        try:
            self.child = ChildProcess(cmd, "bare vllm", pass_fds=(cmd_read, reply_write))
        finally:
            os.close(cmd_read)
            os.close(reply_write)
        self._commands: IO[str] = os.fdopen(cmd_write, "w")
        self._replies: IO[str] = os.fdopen(reply_read, "r")
        self.startup_s = float(self._read()["startup_s"])
        self.start_seconds = time.perf_counter() - self.child.started

    def _read(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            self.child.kill_group()
            raise self.child.failure()
        reply: dict[str, Any] = json.loads(line)
        return reply

    def chat(self, count: int) -> dict[str, Any]:
        """The script's own seconds of one `LLM.chat` call (and, apart, the call as seen from here)."""
        start = time.perf_counter()
        self._commands.write(json.dumps({"count": count}) + "\n")
        self._commands.flush()
        reply = self._read()
        wall = time.perf_counter() - start
        return {"seconds": float(reply["seconds"]), "tokens": int(reply["tokens"]), "parent_s": wall}

    def close(self) -> None:
        with contextlib.suppress(OSError, EngineError):
            self._commands.write(json.dumps({"op": "close"}) + "\n")
            self._commands.flush()
            self.child.wait(timeout=60)
        self.child.kill_group()
        for f in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                f.close()


def engine_call(engine: Any, requests: list[ChatRequest], sampling: Sampling) -> Call:
    def call(count: int) -> dict[str, Any]:
        start = time.perf_counter()
        outs = engine.generate(requests[:count], sampling)
        run: dict[str, Any] = {
            "seconds": time.perf_counter() - start,
            "tokens": sum(c.completion_tokens for o in outs for c in o),
        }
        if hasattr(engine, "worker_seconds"):
            run["worker_s"] = engine.worker_seconds
        return run

    return call


def interleave(arms: dict[str, Call], n: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """One warm-up call per arm, then `rounds` timed calls each, in the order ORDERS gives each round."""
    for call in arms.values():
        call(WARMUP)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for r in range(rounds):
        for name in ORDERS[r % len(ORDERS)]:
            time.sleep(PAUSE_S)
            run = {"round": r, **arms[name](n), "load_1m": os.getloadavg()[0]}
            runs[name].append(run)
            rate = run["tokens"] / run["seconds"]
            print(
                f"round {r} {name}: {run['tokens']} tokens in {run['seconds']:.2f}s = {rate:.1f}/s",
                flush=True,
            )
    return runs


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "rounds": [round(r["tokens"] / r["seconds"], 1) for r in runs],
    }


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per arm, interleaved")
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
    vllm_cfg = cfg.engine.model_copy(update={"name": "vllm", "python": args.python})
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "requests.json"
        chats = [{"messages": conversation(r), "sampling": sampling_kwargs(sampling, r)} for r in requests]
        # The worker's own arguments for this model on CPU (no revision: a local folder has none).
        llm = llm_kwargs(vllm_cfg, model_dir, seed=0, on_cpu=True)
        spec.write_text(json.dumps({"llm": llm, "chats": chats}))
        ours = make_engine(vllm_cfg, cfg.model)
        bare = BareVLLM(args.python, spec)
        transformers = make_engine(cfg.engine.model_copy(update={"name": "transformers"}), cfg.model)
        try:
            runs = interleave(
                {
                    "transformers": engine_call(transformers, requests, sampling),
                    "vllm_engine": engine_call(ours, requests, sampling),
                    "vllm_bare": bare.chat,
                },
                len(requests),
                args.rounds,
            )
        finally:
            for arm in (transformers, ours, bare):
                arm.close()

    hf, mine, base = (summary(runs[k]) for k in ("transformers", "vllm_engine", "vllm_bare"))
    ratio = mine["tokens_per_s"] / base["tokens_per_s"]
    paired = [
        round((a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]), 3)
        for a, b in zip(runs["vllm_engine"], runs["vllm_bare"], strict=True)
    ]
    outside_ms = {
        "vllm_engine": median_ms([r["seconds"] - r["worker_s"] for r in runs["vllm_engine"]]),
        "vllm_bare": median_ms([r["parent_s"] - r["seconds"] for r in runs["vllm_bare"]]),
    }
    load_end = os.getloadavg()
    ours_start = float(getattr(ours, "start_seconds", 0.0))
    payload = {
        "benchmark": "vllm_engines",
        "model": cfg.model.path,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "warmup_chats": WARMUP,
        "llm_kwargs": {k: v for k, v in llm.items() if k != "model"},
        "transformers_batched": {**hf, "batch_size": cfg.engine.batch_size},
        "vllm_engine": {**mine, "startup_s": round(ours_start, 1)},
        "vllm_bare": {**base, "startup_s": round(bare.start_seconds, 1)},
        "ratio_engine_to_bare": round(ratio, 3),
        "ratio_engine_to_bare_per_round": paired,
        "ratio_vllm_to_transformers": round(mine["tokens_per_s"] / hf["tokens_per_s"], 2),
        "outside_vllm_ms_per_call": outside_ms,
        "target": 0.95,
        "load_average": {"start": load_start, "end": load_end},
        "runs": runs,
        "machine": machine(),
    }
    rows = [
        ("transformers, batch 16", hf, "-"),
        ("vllm engine (sao_core, .venv-vllm)", mine, f"{ours_start:.1f}"),
        ("bare vllm.LLM script", base, f"{bare.start_seconds:.1f}"),
    ]
    table = "".join(
        f"| {name} | {r['seconds']} | {r['tokens']} | **{r['tokens_per_s']}** | {r['rounds']} | {start} |\n"
        for name, r, start in rows
    )
    fmt = ", ".join
    md = (
        f"# SmolLM2: transformers vs vllm engine vs bare vLLM (CPU)\n\n"
        f"`.venv/bin/python -m bench.vllm_engines --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--rounds {args.rounds}`\n\n"
        f"{args.requests} prompt-synthesis chats, greedy, up to {args.max_tokens} tokens each; every arm: "
        f"one warm-up call ({WARMUP} chats), then {args.rounds} timed calls, interleaved.\n\n"
        f"| run | seconds (all rounds) | tokens | tokens/s | tokens/s per round | start-up s |\n"
        f"|---|---|---|---|---|---|\n{table}\n"
        f"Engine / bare: **{ratio:.3f}** (target >= 0.95); per round: {paired}. vllm engine / transformers: "
        f"{payload['ratio_vllm_to_transformers']}x. Per call outside vLLM (median): our engine's pipes "
        f"and JSON {outside_ms['vllm_engine']} ms, the bare script's command {outside_ms['vllm_bare']} ms. "
        f"Load average at the start: "
        f"{fmt(f'{x:.1f}' for x in load_start)}; at the end: {fmt(f'{x:.1f}' for x in load_end)}. "
        f"{payload['machine']}\n"
    )
    path = write_report("vllm_engines", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
