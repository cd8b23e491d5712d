"""The baseline of bench.vllm_engines: vllm.LLM on its own, with no project code at all.

    .venv-vllm/bin/python bench/vllm_bare.py --requests requests.json --commands-fd 5 --replies-fd 8

requests.json (bench.vllm_engines writes it) holds the `vllm.LLM` keyword arguments and the chats, each
with the SamplingParams arguments of its request, both as the project's engine builds them: the same
settings, and one seed per request as the engine gives every request (its text must not depend on its
batch neighbours), so the two do the same work. The script starts vLLM, answers `{"ok": true,
"startup_s": ...}` on the replies pipe, then reads one command per line: `{"count": N}` answers the
first N chats with one `LLM.chat` call and replies with that call's seconds and completion tokens;
`{"op": "close"}` ends it. The benchmark drains its output as it drains the engine worker's.
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", required=True)
    ap.add_argument("--commands-fd", type=int, required=True)
    ap.add_argument("--replies-fd", type=int, required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as the engine's worker sets it
    with open(args.requests) as f:
        spec = json.load(f)

    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["llm"])
    startup = time.perf_counter() - started
    chats = [c["messages"] for c in spec["chats"]]
    params = [SamplingParams(**c["sampling"]) for c in spec["chats"]]
    with os.fdopen(args.commands_fd, "r") as commands, os.fdopen(args.replies_fd, "w") as replies:
        replies.write(json.dumps({"ok": True, "startup_s": startup}) + "\n")
        replies.flush()
        for line in commands:
            command = json.loads(line)
            if command.get("op") == "close":
                break
            count = int(command["count"])
            start = time.perf_counter()
            outputs = llm.chat(chats[:count], params[:count], use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
            replies.write(json.dumps({"ok": True, "seconds": seconds, "tokens": tokens}) + "\n")
            replies.flush()
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()  # its engine-core and worker processes end now, not at exit
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import this file
    sys.exit(main())
