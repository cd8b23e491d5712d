"""Leases (sao_core.store.locks) in a local folder and in memory://: a lease whose release failed (the store
down at that moment) is taken back at once by the process that released it, while another holder's live
lease is still waited for; the one wait loop behind acquire and wait_until_free; where the lease errors
live.

    .venv/bin/python -m pytest -q tests/core/test_locks.py
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sao_core import errors
from sao_core.errors import LeaseLost, LeaseTimeout, StorageConflict, StorageError, TransientStorageError
from sao_core.store import atomic, locks, storage


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
    """Make the store's delete of `url` (a conditional one: atomic.remove_if) fail once with `error`; the
    URLs it was asked to delete."""
    real_remove: Callable[..., bool] = atomic.remove_if
    calls: list[str] = []

    def remove_if(target: str, expected: bytes) -> bool:
        calls.append(target)
        if target == url and calls.count(url) == 1:
            raise error
        return real_remove(target, expected)

    monkeypatch.setattr(atomic, "remove_if", remove_if)
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


# --- leases that cannot wedge or double (issue 17) ----------------------------------------------------


def expired_holder(url: str, token: str = "t-gone") -> dict[str, Any]:
    """The lease of a holder on another machine that stopped renewing it 5 s ago."""
    lease = locks.Lease(url, "shard 0", "a runner elsewhere", token, ttl_s=1, acquired=time.time() - 60)
    data = {**json.loads(lease.body(time.time() - 6)), "host": "elsewhere", "pid_ns": "pid:[1]", "pid": 4242}
    storage.write_bytes(url, json.dumps(data).encode())
    return data


def test_a_takeover_marker_left_by_a_crashed_taker_does_not_block_the_lease(url: str):
    # A taker made the marker named after the stale lease (as the take-over used to, first of its two
    # create-only steps) and was killed before removing the lease: every later taker found the marker
    # there and stepped back, so the lease stayed blocked for ever.
    stale = expired_holder(url)
    key = hashlib.sha256(f"{stale['token']}|{json.dumps(stale, sort_keys=True)}".encode()).hexdigest()[:16]
    storage.write_bytes(f"{url}.taken-{key}", b"token of a taker that crashed")

    lease = locks.acquire(url, "shard 0", ttl_s=60, wait_s=1.0)
    assert lease.taken_from is not None and lease.taken_from.startswith("expired"), lease.taken_from
    assert locks.read_lease(url)["token"] == lease.token
    lease.release()
    assert locks.read_lease(url) is None


def test_an_expired_lease_not_yet_taken_over_is_called_expired_not_held(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    expired_holder(url)

    def refuse(target: str, expected: bytes) -> bool:  # the store will not delete it just now
        raise TransientStorageError(f"cannot remove {target}: the artifact store failed 4 tries")

    monkeypatch.setattr(atomic, "remove_if", refuse, raising=False)
    with caplog.at_level(logging.WARNING, logger="sao_core.store.locks"), pytest.raises(LeaseTimeout) as e:
        locks.acquire(url, "shard 0", ttl_s=0.4, wait_s=0.3)
    assert "held by" not in str(e.value)
    assert re.search(
        r"still has a stale lease of a runner elsewhere .*\(expired [\d.]+ s ago\)", str(e.value)
    )
    said = [r.getMessage() for r in caplog.records if url in r.getMessage()]
    assert said and not [m for m in said if "held by" in m], said


def test_a_holder_that_stalled_past_its_expiry_is_refused_renewal_and_overwrites_nobody(
    url: str, monkeypatch: pytest.MonkeyPatch
):
    first = locks.try_acquire(url, "shard 0", ttl_s=0.3)
    assert first is not None
    first._stop.set()  # the holder freezes: its renewals stop ...
    assert first._thread is not None
    first._thread.join()
    time.sleep(0.5)  # ... past its expiry
    # ... and wakes to renew just as another runner takes the expired lease over: the renewal used to read
    # the record (still its own), let the taker in, then write over the taker's lease: two holders.
    taken: list[locks.Lease | None] = []

    def take_over_first(real: Callable[..., Any]) -> Callable[..., Any]:
        def write(target: str, *args: Any) -> Any:
            if target == url and not taken:
                taken.append(locks.try_acquire(url, "shard 0", ttl_s=60))
            return real(target, *args)

        return write

    monkeypatch.setattr(storage, "write_bytes", take_over_first(storage.write_bytes))
    if hasattr(storage, "replace_if"):
        monkeypatch.setattr(atomic, "replace_if", take_over_first(atomic.replace_if))
    with pytest.raises(LeaseLost, match=r"shard 0: lost .*expired"):
        first.renew()
    monkeypatch.undo()
    second = taken[0] if taken else locks.try_acquire(url, "shard 0", ttl_s=60)
    assert second is not None and second.taken_from is not None and second.taken_from.startswith("expired")
    assert locks.read_lease(url)["token"] == second.token
    with pytest.raises(LeaseLost):
        first.check()
    first.release()
    second.check()
    assert locks.read_lease(url)["token"] == second.token  # never someone else's
    second.release()


def test_renewal_replaces_only_the_record_its_holder_wrote(url: str):
    lease = locks.try_acquire(url, "shard 0", ttl_s=60)
    assert lease is not None
    lease._stop.set()
    other_holder(url)  # taken over meanwhile (the holder's clock said it was alive)
    with pytest.raises(LeaseLost, match=r"shard 0: lost .*now held by a runner elsewhere"):
        lease.renew()
    assert locks.read_lease(url)["token"] == "t-other"
    lease.release()
    assert locks.read_lease(url)["token"] == "t-other"


def test_a_campaign_lock_on_a_store_without_an_atomic_create_is_refused_by_name():
    lock = locks.campaign_lock("gs://bucket/art", "nightly", holder="round 3", wait_s=0.1)
    with pytest.raises(StorageError, match=r"gs:// offers no atomic conditional write"), lock:
        pass
