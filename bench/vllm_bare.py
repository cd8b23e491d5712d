"""The baseline of bench.vllm_engines: vllm.LLM on its own, with no project code at all.

    .venv-vllm/bin/python bench/vllm_bare.py --model DIR --chats chats.json --max-tokens 96 --out bare.json

Reads a JSON list of conversations, starts vLLM with the same settings the project's engine uses on
CPU, answers every conversation greedily (one warm-up call first, then `--rounds` timed calls) and
writes start-up seconds, generation seconds and completion tokens as JSON.
"""

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--chats", required=True)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, seed=0)
    startup = time.perf_counter() - started
    with open(args.chats) as f:
        chats = json.load(f)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat(chats[:2], params, use_tqdm=False)  # warm-up, as the engine run has
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        outputs = llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        rounds.append({"seconds": seconds, "tokens": tokens})
    with open(args.out, "w") as f:
        json.dump({"startup_s": startup, "rounds": rounds}, f)


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import this file
    main()
