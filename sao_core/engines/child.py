"""Child processes for engines that must not live in the orchestration process (STYLE.md rule 6).

vLLM pins packages that clash with Prefect's (ENV.md) and holds its GPU for the life of its process, so
it runs under another interpreter (`engine.python`), in a session of its own whose output is drained into
a bounded tail: when the child dies, the error quotes its last lines.

    child = ChildProcess([interpreter(cfg.engine), "-m", "sao_core.engines.vllm_worker", ...], "what")
    rc = child.wait(); child.kill_group()
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sao_core.config import EngineConfig
from sao_core.errors import ConfigError, EngineError

log = logging.getLogger(__name__)
child_log = logging.getLogger("sao_core.engines.child.output")

TAIL_LINES = 40  # how much of a failed child's log goes into the error


def interpreter(engine: EngineConfig) -> str:
    """The vLLM environment's python: engine.python (a path or a name on PATH), else this interpreter."""
    if engine.python is None:
        return sys.executable
    found = shutil.which(engine.python)
    if found is None:
        raise ConfigError(
            f"engine.python {engine.python!r} is not an executable; build the vLLM environment with "
            "scripts/setup_vllm_env.sh and point engine.python at .venv-vllm/bin/python"
        )
    return str(Path(found).absolute())  # absolute, not resolved: a venv's python is a symlink into its base


def child_env() -> dict[str, str]:
    """The child's environment: ours, unbuffered, with this sao_core first on its path."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The child runs the same sao_core source as the parent, whatever its environment has installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ChildProcess:
    """A child in a session of its own whose output is drained by a thread, keeping its last lines."""

    def __init__(self, cmd: list[str], what: str, pass_fds: Sequence[int] = ()) -> None:
        self.cmd = cmd
        self.what = what
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.started = time.perf_counter()
        log.info("%s: starting %s", what, " ".join(cmd))
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env(),
                # A group of its own, so vLLM's engine-core and worker processes can be ended with it.
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except OSError as e:
            raise EngineError(f"{what}: cannot start {cmd[0]}: {e}") from e
        self._reader = threading.Thread(target=self._drain, name=f"drain-{self.proc.pid}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            child_log.debug("[%d] %s", self.proc.pid, line)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill_group(self) -> None:
        """End the child and anything it left behind (vLLM's engine core and workers)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=5)

    @staticmethod
    def _exit_status(rc: int | None) -> str:
        if rc is None:
            return "stopped answering"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            hint = " (killed: out of memory?)" if -rc == signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        return f"exited with code {rc}"

    def failure(self, rc: int | None = None, status: str | None = None) -> EngineError:
        """An EngineError naming the exit status (or `status`) and quoting the child's last log lines."""
        self._reader.join(timeout=5)
        rc = self.proc.poll() if rc is None else rc
        status = status or self._exit_status(rc)
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return EngineError(
            f"{self.what}: the vLLM child ({self.cmd[0]}) {status}; its last log lines:\n{lines}"
        )
