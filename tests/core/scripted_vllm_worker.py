"""A stand-in for sao_core.engines.vllm_worker that speaks its pipe protocol without vLLM.

Started by VLLMEngine in place of the real worker (engine.python points at a wrapper that runs this file
with the worker's arguments). It appends every command it receives to $SCRIPTED_LOG as one JSON line, so a
test can count model loads and see what the parent sent, and answers each request with a short question
(a judge request with `ranking: 1 > 2`). Each `start` also records `alive`: the other workers named in
the log that are still running then, so a test can tell whether two engines were ever alive at once.
$SCRIPTED_DIE_AT=N kills this process with SIGKILL on its N-th generate (an OOM kill, as the kernel does
it); $SCRIPTED_SLEEP_S makes every generate hang that long first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent's wait() is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def others_alive(log_path: str) -> list[int]:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        pids = {json.loads(line)["pid"] for line in f if line.strip()}
    return sorted(p for p in pids if p != os.getpid() and running(p))


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
            if command["op"] == "start":
                command["alive"] = others_alive(log_path)
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
                            "text": "ranking: 1 > 2"
                            if r["kind"] == "judge"
                            else f"{r['prefill']} a {r['request_id']} asks: what is {i} plus {j}?",
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
