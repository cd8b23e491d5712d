"""A stand-in for sao_core.engines.vllm_worker that speaks its pipe protocol without vLLM.

Started by VLLMEngine in place of the real worker (engine.python points at a wrapper that runs this file
with the worker's arguments). It appends every command it receives to $SCRIPTED_LOG as one JSON line, so a
test can count model loads and see what the parent sent, and answers each request with a short question.
$SCRIPTED_DIE_AT=N kills this process with SIGKILL on its N-th generate (an OOM kill, as the kernel does
it); $SCRIPTED_SLEEP_S makes every generate hang that long first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    commands_fd = int(argv[argv.index("--commands-fd") + 1])
    replies_fd = int(argv[argv.index("--replies-fd") + 1])
    log_path = os.environ["SCRIPTED_LOG"]
    die_at = int(os.environ.get("SCRIPTED_DIE_AT", "0"))
    sleep_s = float(os.environ.get("SCRIPTED_SLEEP_S", "0"))
    print(f"scripted worker {os.getpid()} up", flush=True)
    generates = 0
    with os.fdopen(commands_fd, "r") as commands, os.fdopen(replies_fd, "w") as replies:
        for line in commands:
            command = json.loads(line)
            with open(log_path, "a") as log:
                log.write(json.dumps({"pid": os.getpid(), **command}) + "\n")
            op = command["op"]
            if op == "start":
                reply: dict = {"ok": True, "load_seconds": 0.01}
            elif op == "generate":
                generates += 1
                if generates == die_at:
                    print("allocating the KV cache", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(sleep_s)
                outputs = [
                    [
                        {
                            "text": f"{r['prefill']} a {r['request_id']} asks: what is {i} plus {j}?",
                            "finish_reason": "stop",
                            "prompt_tokens": 7,
                            "completion_tokens": 9,
                        }
                        for j in range(r["n"])
                    ]
                    for i, r in enumerate(command["requests"])
                ]
                reply = {"ok": True, "seconds": 0.01, "outputs": outputs}
            else:
                replies.write(json.dumps({"ok": True}) + "\n")
                replies.flush()
                return 0
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
