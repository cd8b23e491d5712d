"""Leases (sao_core.store.locks) in a local folder and in memory://: a lease whose release failed (the store
down at that moment) is taken back at once by the process that released it, while another holder's live
lease is still waited for; the one wait loop behind acquire and wait_until_free; where the lease errors
live.

    .venv/bin/python -m pytest -q tests/core/test_locks.py
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sao_core import errors
from sao_core.errors import LeaseLost, LeaseTimeout, StorageConflict, StorageError, TransientStorageError
from sao_core.store import locks, storage


@pytest.fixture(params=["file", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A lease's URL in a local folder and in memory:// (a create-only write under a lock)."""
    if request.param == "file":
        return str(tmp_path / "lease.json")
    return f"memory://locks-{tmp_path.name}/lease.json"


def other_holder(url: str) -> dict[str, Any]:
    """A live lease of a holder on another machine, written by hand."""
    lease = locks.Lease(url, "shard 0", "a runner elsewhere", "t-other", ttl_s=3600, acquired=time.time())
    data = {**json.loads(lease.body(time.time())), "host": "elsewhere", "pid_ns": "pid:[1]", "pid": 4242}
    storage.write_bytes(url, json.dumps(data).encode())
    return data


def fail_remove_once(monkeypatch: pytest.MonkeyPatch, url: str, error: Exception) -> list[str]:
    """Make the store's delete of `url` fail once with `error`; the URLs it was asked to delete."""
    real_remove: Callable[..., None] = storage.remove
    calls: list[str] = []

    def remove(target: str, recursive: bool = False) -> None:
        calls.append(target)
        if target == url and calls.count(url) == 1:
            raise error
        real_remove(target, recursive=recursive)

    monkeypatch.setattr(storage, "remove", remove)
    return calls


def release_left_behind(monkeypatch: pytest.MonkeyPatch, url: str, error: Exception) -> list[str]:
    """Take the lease at `url` and release it while the store's delete of it fails once with `error`:
    its record stays behind. The URLs the delete was asked for."""
    calls = fail_remove_once(monkeypatch, url, error)
    locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01).release()
    return calls


def markers(url: str) -> list[str]:
    return [u for u in storage.list_files(url.rsplit("/", 1)[0]) if ".taken-" in u]


@pytest.mark.parametrize(
    "error",
    [
        TransientStorageError("cannot remove lease.json: failed 4 tries"),
        StorageError("cannot remove lease.json"),
    ],
    ids=["transient", "storage"],
)
def test_a_lease_whose_release_failed_is_taken_back_at_once_by_its_process(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
):
    with caplog.at_level(logging.WARNING, logger="sao_core.store.locks"):
        calls = release_left_behind(monkeypatch, url, error)
    assert calls == [url]
    assert any("could not release" in r.getMessage() and url in r.getMessage() for r in caplog.records)
    left = locks.read_lease(url)
    assert left is not None and left["holder"].startswith("pid ")
    assert locks.stale_reason(left) is None  # to anyone else it still looks held
    assert locks.released_here(url, left)

    # A wait would raise LeaseTimeout after 0.01 s: the re-run takes it over on its first try instead.
    second = locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01)
    assert second.taken_from is not None and "released by this process" in second.taken_from
    assert calls.count(url) == 2  # the delete was tried again
    assert locks.read_lease(url)["token"] == second.token
    assert not locks.released_here(url, left)
    second.release()
    assert locks.read_lease(url) is None
    assert markers(url) == []


def test_wait_until_free_removes_a_lease_whose_release_failed(url: str, monkeypatch: pytest.MonkeyPatch):
    release_left_behind(monkeypatch, url, TransientStorageError("cannot remove lease.json"))
    assert locks.read_lease(url) is not None

    locks.wait_until_free([url], "responses manifest", ttl_s=60, wait_s=0.01)
    assert locks.read_lease(url) is None
    assert markers(url) == []
    assert locks.try_acquire(url, "shard 0", ttl_s=60) is not None


def test_a_live_lease_of_another_holder_is_still_waited_for(url: str):
    other_holder(url)
    assert locks.try_acquire(url, "shard 0", ttl_s=60) is None
    with pytest.raises(LeaseTimeout, match=r"still held by a runner elsewhere \(pid 4242 on elsewhere"):
        locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01)
    with pytest.raises(LeaseTimeout, match=r"still held by a runner elsewhere"):
        locks.wait_until_free([url], "responses manifest", ttl_s=60, wait_s=0.01)
    assert locks.read_lease(url)["token"] == "t-other"


def test_a_failed_release_does_not_free_the_next_holders_lease(url: str, monkeypatch: pytest.MonkeyPatch):
    release_left_behind(monkeypatch, url, StorageError("cannot remove lease.json"))
    assert locks.released_here(url, locks.read_lease(url))
    # Our record expired and another runner took the lease since: it is theirs, not ours to take back.
    other_holder(url)
    assert not locks.released_here(url, locks.read_lease(url))
    assert locks.try_acquire(url, "shard 0", ttl_s=60) is None
    with pytest.raises(LeaseTimeout, match=r"still held by a runner elsewhere"):
        locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01)
    assert locks.read_lease(url)["token"] == "t-other"


def test_a_lease_released_cleanly_leaves_nothing_to_take_back(url: str):
    lease = locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01)
    lease.release()
    assert locks.read_lease(url) is None
    again = locks.acquire(url, "shard 0", ttl_s=60, wait_s=0.01)
    assert again.taken_from is None
    again.release()


def test_the_first_wait_is_announced_once_in_words_of_its_caller(url: str, caplog: pytest.LogCaptureFixture):
    other_holder(url)
    with caplog.at_level(logging.WARNING, logger="sao_core.store.locks"), pytest.raises(LeaseTimeout):
        locks.acquire(url, "shard 0", ttl_s=0.4, wait_s=0.3)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "is held by" in m] == [
        f"shard 0: {url} is held by {locks.describe(locks.read_lease(url))}; waiting"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sao_core.store.locks"), pytest.raises(LeaseTimeout):
        locks.wait_until_free([url], "responses manifest", ttl_s=0.4, wait_s=0.3)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "is held by" in m] == [
        f"responses manifest: {url} is held by {locks.describe(locks.read_lease(url))}; waiting for it"
    ]


def test_the_lease_and_store_errors_live_in_errors_and_keep_their_bases():
    assert storage.TransientStorageError is errors.TransientStorageError
    assert locks.LeaseLost is errors.LeaseLost and locks.LeaseTimeout is errors.LeaseTimeout
    assert issubclass(TransientStorageError, ConnectionError) and not issubclass(
        TransientStorageError, StorageError
    )
    assert issubclass(LeaseTimeout, StorageConflict) and issubclass(LeaseLost, errors.SAOError)
    assert not issubclass(LeaseLost, StorageError)
