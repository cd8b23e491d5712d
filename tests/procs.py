"""Child processes of the tests: started into a log, waited for, stopped, and servers polled until healthy.

    proc = start([sao, "synth", ...], env, tmp_path / "synth.log")   # its own session: kill_group reaches all
    text = wait_exit(proc, log)                                      # its output; fails unless it exited 0
    wait_for("a claim", lambda: storage.exists(claim), proc, log)    # fails if the process ends first
    wait_healthy(f"{api}/health", server, log)                       # GET 200, or fails with the log's end
    stop(server)                                                     # SIGINT, then SIGKILL after a grace

Shared by the fault tests (tests/reliability), the cluster harness (tests/cluster/harness.py), the UI test
and the `vllm serve` test. Every wait has a deadline, only a guard against a hang: no outcome depends on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log, for an assertion message; "" when it is not there (yet)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points s3fs (in this process or a child) at a test S3 endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def start(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    *,
    cwd: Path | str = REPO,
    new_session: bool = True,
) -> subprocess.Popen:
    """`argv` with stdout and stderr appended to `log`; in a session of its own unless `new_session` is
    False, so that kill_group stops what it starts too (a temporary Prefect server, training ranks)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=new_session,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its process group (started with new_session)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stop(proc: Any, grace_s: float = 20.0) -> None:
    """SIGINT (a server's graceful stop), then SIGKILL if it has not exited within `grace_s`.

    `proc` is a subprocess.Popen or a psutil.Process (a server this test did not start itself)."""
    import psutil

    if isinstance(proc, subprocess.Popen) and proc.poll() is not None:
        return
    with suppress(ProcessLookupError, psutil.NoSuchProcess):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        with suppress(ProcessLookupError, psutil.NoSuchProcess):
            proc.kill()
        proc.wait(timeout=10)


def wait_exit(proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> str:
    """The process's output once it has exited 0; it is killed (its group) if still running at the guard."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{proc.args} still running after {timeout_s} s:\n{tail(log)}") from None
    text = log.read_text()
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def wait_for(
    what: str,
    check: Callable[[], T],
    proc: subprocess.Popen,
    log: Path,
    timeout_s: float = 180,
    every_s: float = 0.05,
) -> T:
    """Poll `check()` until it returns something true, and return that; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert proc.poll() is None, f"{proc.args} ended ({proc.returncode}) before {what}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{tail(log)}"
        time.sleep(every_s)
    return found


def healthy(url: str) -> bool:
    """Whether GET `url` (a server's /health) answers 200 now."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(
    url: str,
    proc: subprocess.Popen,
    log: Path,
    timeout_s: float = 180.0,
    every_s: float = 0.5,
    what: str = "server",
) -> None:
    """Poll GET `url` until it answers 200; fail with the log's end if `proc` exits first or at the guard."""
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        assert proc.poll() is None, f"{what} exited ({proc.returncode}):\n{tail(log)}"
        assert time.monotonic() < deadline, f"{what} not healthy at {url} after {timeout_s} s:\n{tail(log)}"
        time.sleep(every_s)
