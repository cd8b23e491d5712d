"""Fixtures of the fault suite: an S3 endpoint behind a fault-injecting proxy, a small disk, and the
environment of a slowed-down `sao` child.

`faulty_s3`: a fresh bucket on moto, reached through tests/reliability/faultproxy.py (AWS_ENDPOINT_URL
is the proxy): `faulty_s3.root` is "s3://<bucket>", `faulty_s3.proxy.error_rate = 0.2` fails a share of
requests, `faulty_s3.restart_store(after_s=8.0)` stops moto and starts it again.
`small_disk`: a 4 MiB tmpfs (or a loop-mounted ext4 image) folder; `small_disk.fill()` leaves no space.
`hook_env`: the environment of a `sao` child (or a worker and its flow runs) with the start-up hook
SITECUSTOMIZE on PYTHONPATH, which slows the scripted engine and the trainer down as SAO_TEST_* say.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.procs import s3_env
from tests.reliability.faultproxy import FaultProxy

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer


class StoreServer:
    """moto's S3 server in this process, on a fixed port, that can be stopped and started again: its
    objects live in moto's in-process backend, so they outlive a restart, as on a real endpoint."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._make = lambda port: ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        first = self._make(0)
        first.start()
        self.host, self.port = first.get_host_and_port()
        self._server: ThreadedMotoServer | None = first
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        with self._lock:
            if self._server is None:
                return
            self._server.stop()
            # ThreadedMotoServer.stop leaves the socket bound; close it so connections are refused.
            inner = getattr(self._server, "_server", None)
            if inner is not None:
                inner.server_close()
            self._server = None

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            self._server = self._make(self.port)
            self._server.start()


@pytest.fixture(scope="module")
def store_behind_proxy() -> Iterator[tuple[StoreServer, FaultProxy]]:
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    werkzeug = logging.getLogger("werkzeug")  # a line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    store = StoreServer()
    proxy = FaultProxy(store.url, seed=20240607).start()
    try:
        yield store, proxy
    finally:
        proxy.stop()
        store.stop()
        werkzeug.setLevel(level)


@dataclass
class FaultyS3:
    """A fresh bucket on moto, reached through a FaultProxy (AWS_ENDPOINT_URL is the proxy)."""

    root: str
    proxy: FaultProxy
    store: StoreServer
    env: dict[str, str]
    timers: list[threading.Timer] = field(default_factory=list)

    def restart_store(self, after_s: float) -> None:
        """Stop moto now (the proxy answers 502 meanwhile) and start it again after `after_s` seconds."""
        self.store.stop()
        timer = threading.Timer(after_s, self.store.start)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()


@pytest.fixture
def faulty_s3(
    store_behind_proxy: tuple[StoreServer, FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultyS3]:
    import s3fs

    from sao_core.store import storage

    store, proxy = store_behind_proxy
    store.start()
    proxy.up()
    proxy.calm()
    env = s3_env(proxy.url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
    ):
        monkeypatch.delenv(name, raising=False)
    # Short waits between storage's own tries: the faults here last seconds, not minutes.
    monkeypatch.setattr(storage, "TRANSIENT_WAIT_S", 0.5)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"sao-faults-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=store.url).mkdir(bucket)
    proxy.counts.clear()
    faulty = FaultyS3(root=f"s3://{bucket}", proxy=proxy, store=store, env=env)
    try:
        yield faulty
    finally:
        for timer in faulty.timers:
            timer.cancel()
        store.start()
        proxy.up()
        proxy.calm()
        s3fs.S3FileSystem.clear_instance_cache()


# --- a small disk ----------------------------------------------------------------------------------------

SMALL_DISK_BYTES = 4 * 1024 * 1024


@dataclass
class SmallDisk:
    """A folder on a filesystem of its own, a few MiB in size."""

    path: Path
    kind: str  # "tmpfs" or "ext4 image on a loop device"

    def fill(self) -> Path:
        """Write a ballast file until the filesystem has no space left; its path (remove it to free space)."""
        ballast = self.path / "ballast.bin"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            # Big writes first, then ever smaller ones take the last blocks, so that a later write of even
            # a few bytes fails.
            for size in (1 << 16, 4096, 512, 1):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)
        return ballast


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A tmpfs of 4 MiB mounted on a temporary folder; where tmpfs cannot be mounted, a 4 MiB ext4 image on
    a loop device; where neither can (no root, no CAP_SYS_ADMIN), the test is skipped and says why."""
    mount = tmp_path / "disk"
    mount.mkdir()
    tried: list[str] = []
    kind = ""
    if shutil.which("mount"):
        out = _run("mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(mount))
        if out.returncode == 0:
            kind = "tmpfs"
        else:
            tried.append(f"mount -t tmpfs: {out.stderr.strip()}")
        if not kind and shutil.which("mkfs.ext4"):
            image = tmp_path / "disk.img"
            with open(image, "wb") as f:
                f.truncate(SMALL_DISK_BYTES)
            made = _run("mkfs.ext4", "-q", "-F", str(image))
            out = made if made.returncode else _run("mount", "-o", "loop", str(image), str(mount))
            if out.returncode == 0:
                kind = "ext4 image on a loop device"
            else:
                tried.append(f"loop-mounted ext4: {out.stderr.strip()}")
    else:
        tried.append("no mount command")
    if not kind:
        pytest.skip("cannot mount a small filesystem (needs root): " + "; ".join(tried))
    try:
        yield SmallDisk(mount, kind)
    finally:
        out = _run("umount", str(mount))
        if out.returncode and os.path.ismount(mount):
            _run("umount", "-l", str(mount))


# --- a slowed-down `sao` child ----------------------------------------------------------------------------

# Loaded at start-up by every Python process given this folder on PYTHONPATH (a `sao` command, a worker and
# the flow runs it starts), so that a kill or a restart lands part-way through the work:
# - SAO_TEST_GENERATE_DELAY_S: each call of the scripted engine (one per shard) sleeps this long first;
# - SAO_TEST_GENERATE_HOLD_FILE: while this file exists, each call of the scripted engine waits before it
#   starts (a stage cannot finish until the test removes it);
# - SAO_TEST_TRAIN_STEP_DELAY_S: each training step sleeps this long first.
SITECUSTOMIZE = """
import os, time
_delay = float(os.environ.get("SAO_TEST_GENERATE_DELAY_S") or 0)
_hold = os.environ.get("SAO_TEST_GENERATE_HOLD_FILE") or ""
if _delay or _hold:
    from sao_core.engines import fake as _fake
    _generate = _fake.FakeEngine.generate
    def _slow_generate(self, requests, sampling):
        while _hold and os.path.exists(_hold):
            time.sleep(0.05)
        time.sleep(_delay)
        return _generate(self, requests, sampling)
    _fake.FakeEngine.generate = _slow_generate
_step = float(os.environ.get("SAO_TEST_TRAIN_STEP_DELAY_S") or 0)
if _step:
    from sao_core.training import arguments as _arguments
    _trainer_class = _arguments.trainer_class
    def _slow_trainer_class(objective):
        base = _trainer_class(objective)
        class Slow(base):
            def training_step(self, *args, **kwargs):
                time.sleep(_step)
                return super().training_step(*args, **kwargs)
        return Slow
    _arguments.trainer_class = _slow_trainer_class
"""


@pytest.fixture
def hook_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `sao` child: this venv, the slowing hook on PYTHONPATH (idle until a SAO_TEST_*
    variable is set), no Prefect settings of this process, its own Prefect home (so `sao run` starts a
    temporary server whose database and result cache survive a kill for the re-run)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SAO_TEST_"))}
    env.update(
        PYTHONPATH=str(hooks),
        PYTHONUNBUFFERED="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env
