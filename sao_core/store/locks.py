"""Leases in the artifact store: one holder at a time for a shard, a stage's manifest, a training run or a
campaign's round, across processes and machines that share nothing but the store.

    with hold(url, "responses shard 3", ttl_s=120, wait_s=600) as lease:   # waits while another holds it
        ...                                                                  # released on the way out
    lease = try_acquire(url, "responses shard 3", ttl_s=120)               # None: someone else holds it
    with campaign_lock(root, "nightly", holder="flow run 1f3c", ttl_s=120, wait_s=3600):
        ...                                                                  # one round of the campaign at a time

A lease is a small JSON file made with a create-only write (atomic.write_bytes_exclusive: a hard link on
local disks, `If-None-Match: *` on S3), so of two processes one creates it and the other finds it there.
It names its holder (host, process, a random token) and when it expires. A thread renews it every third
of `ttl_s` while it is held, so a holder that dies or freezes loses it within `ttl_s`, on any machine; a
holder on this machine whose process is gone loses it at once. Renewal stops after `max_hold_s` (a
shard's engine.shard_timeout_s): a holder stuck past its own time limit lets others in.

Every change of a lease that exists is conditional on the very bytes last read (atomic.replace_if and
remove_if: a lock of the folder on local disks, If-Match on the ETag on S3, a lock in memory://), so:
- renewal replaces only the record its holder wrote last, and never after that record's own expiry
  (a holder that stalled past it may already have been replaced): LeaseLost instead;
- a stale lease is taken over by removing exactly the stale record read, then creating ours: of two
  takers, one removes it and the other finds it gone or changed, and the create-only write lets one in.
Nothing else is written on the way, so a taker that crashes half-way leaves nothing that blocks the
next one (an earlier version left a take-over marker that did, for ever). Leases live only on stores
with these writes: a local or shared folder, s3:// and memory:// (atomic.ATOMIC_SCHEMES).

A lease this process released but could not remove (the store down at that moment) is remembered here, by
URL and token: its record is still there and still looks live, but this process knows it holds nothing
under it, so its next acquire (or wait) takes it over at once, the same safe way, rather than waiting
out the ttl for itself. Other processes still wait for it to expire.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from sao_core.errors import LeaseLost, LeaseTimeout, StorageConflict, StorageError
from sao_core.store import atomic, storage

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # a lease nobody renews is free after this long (less when a caller asks for less)
MIN_POLL_S, MAX_POLL_S = 0.1, 1.0  # how often a waiter looks again: a quarter of the ttl, within these
CAMPAIGN_LOCK = "_lock.json"

T = TypeVar("T")

# (url, token) of leases this process released but could not remove; see the module docstring.
_unreleased: set[tuple[str, str]] = set()
_unreleased_lock = threading.Lock()


# --- who holds a lease ------------------------------------------------------------------------------


def _pid_namespace() -> str:
    # Two containers may share a host name (host networking) but never a PID namespace.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """The host, PID namespace and PID a lease records of its holder."""
    return {"host": socket.gethostname(), "pid_ns": _pid_namespace(), "pid": os.getpid()}


def process_gone(pid: int) -> bool:
    """True when no process `pid` runs on this machine (a zombie counts as gone: it writes nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def describe(data: dict[str, Any] | None) -> str:
    """A lease's holder in words, for a log line or an error."""
    if not data:
        return "nobody"
    until = datetime.fromtimestamp(float(data.get("expires", 0)), UTC).strftime("%H:%M:%S")
    where = f"pid {data.get('pid', '?')} on {data.get('host', '?')}"
    label = data.get("holder") or where
    return f"{label} (until {until} UTC)" if label == where else f"{label} ({where}, until {until} UTC)"


def stale_reason(data: dict[str, Any] | None, now: float | None = None) -> str | None:
    """Why a lease (as read) can be taken over: expired, unreadable, or its process gone; None while live."""
    if data is None:
        return "released"
    if not data or "token" not in data:
        return "unreadable"
    now = time.time() if now is None else now
    expires = float(data.get("expires", 0))
    if expires <= now:
        return f"expired {now - expires:.1f} s ago"
    me = this_process()
    same_machine = data.get("host") == me["host"] and data.get("pid_ns", "") == me["pid_ns"]
    if same_machine and isinstance(data.get("pid"), int) and process_gone(data["pid"]):
        return f"its process {data['pid']} is gone"
    return None


def _remember_unreleased(url: str, token: str) -> None:
    with _unreleased_lock:
        _unreleased.add((url, token))


def _forget_unreleased(url: str, token: str) -> None:
    with _unreleased_lock:
        _unreleased.discard((url, token))


def released_here(url: str, data: dict[str, Any] | None) -> bool:
    """Whether the lease at `url` (as read) is one this process released but could not remove."""
    if not data or "token" not in data:
        return False
    with _unreleased_lock:
        return (url, str(data["token"])) in _unreleased


def read_lease(url: str) -> dict[str, Any] | None:
    """The lease at `url` as written; None when there is none, {} when it cannot be read."""
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- one lease ------------------------------------------------------------------------------------------


@dataclass
class Lease:
    """A lease this process holds; renewed by a thread until released (see the module docstring)."""

    url: str
    what: str
    holder: str
    token: str
    ttl_s: float
    acquired: float
    max_hold_s: float | None = None
    taken_from: str | None = None  # why the lease before ours was stale, when we took it over
    lost: str | None = None  # why we no longer hold it
    written: bytes = b""  # the record as we wrote it last: what a renewal or release may replace
    expires: float = 0.0  # when that record expires: no renewal after it
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def body(self, now: float) -> bytes:
        data = {
            "what": self.what,
            "holder": self.holder,
            **this_process(),
            "token": self.token,
            "acquired": self.acquired,
            "renewed": now,
            "expires": now + self.ttl_s,
            "ttl_s": self.ttl_s,
        }
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")

    def _expired(self, now: float) -> bool:
        if now < self.expires:
            return False
        if not self.lost:
            self.lost = (
                f"it expired {now - self.expires:.1f} s ago, unrenewed (its holder stalled, or the store "
                "was away), so another may hold it now"
            )
        return True

    def held(self) -> bool:
        """Whether the lease is still ours: not past the expiry we wrote, and our record in the store."""
        if self.lost or self._expired(time.time()):
            return False
        data = read_lease(self.url)
        if not data or data.get("token") != self.token:
            self.lost = f"now held by {describe(data)}" if data else "removed by another process"
            return False
        return True

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours: call it just before writing what it guards."""
        if not self.held():
            raise LeaseLost(f"{self.what}: lost {self.url} ({self.lost}); nothing written")

    def renew(self) -> bool:
        """Push the expiry on by ttl_s, replacing only the record we wrote last and only before it expires;
        LeaseLost when it is no longer ours; False (stop renewing) past max_hold_s; True otherwise."""
        now = time.time()
        if self.max_hold_s is not None and now - self.acquired > self.max_hold_s:
            log.warning(
                "%s: held for %.0f s, past its limit of %.0f s; no longer renewed", self.what,
                now - self.acquired, self.max_hold_s,
            )  # fmt: skip
            return False
        if self.lost or self._expired(now):
            raise LeaseLost(f"{self.what}: lost {self.url} ({self.lost}); not renewed")
        body = self.body(now)
        try:
            atomic.replace_if(self.url, self.written, body)
        except StorageConflict as e:
            data = read_lease(self.url)
            self.lost = f"now held by {describe(data)}" if data else "removed by another process"
            raise LeaseLost(f"{self.what}: lost {self.url} ({self.lost}); not renewed") from e
        except (OSError, StorageError) as e:  # the store is briefly away: the next try may reach it
            log.warning("%s: could not renew %s: %s", self.what, self.url, e)
            return True
        self.written, self.expires = body, now + self.ttl_s
        return True

    def start_renewing(self) -> None:
        def loop() -> None:
            interval = max(self.ttl_s / 3, MIN_POLL_S)
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        return
                except LeaseLost as e:
                    log.warning("%s", e)
                    return

        self._thread = threading.Thread(target=loop, name=f"lease {self.what}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (never someone else's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        try:
            # Only our own record, as we wrote it last: after a take-over it is someone else's.
            atomic.remove_if(self.url, self.written)
        except StorageConflict:
            pass
        except (OSError, StorageError) as e:  # left behind, it expires within ttl_s
            # its record still looks live: let this process's next try take it back
            _remember_unreleased(self.url, self.token)
            log.warning(
                "%s: could not release %s: %s (others wait until it expires, within %.0f s; "
                "this process takes it back at once)", self.what, self.url, e, self.ttl_s,
            )  # fmt: skip


def _read_raw(url: str) -> bytes | None:
    storage.forget_listing(url)
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    """A lease record as read_lease gives it: None when there is none, {} when it cannot be read."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_stale(url: str, raw: bytes) -> bool:
    """Remove the stale record `raw` at `url`, unless it changed since it was read (renewed, released or
    taken by another); False when it did, or the store did not let us now (the next try may)."""
    try:
        atomic.remove_if(url, raw)
    except StorageConflict:
        return False
    except (OSError, StorageError) as e:
        log.warning("could not remove the stale lease %s: %s", url, e)
        return False
    data = _parse(raw)
    if data and "token" in data:
        _forget_unreleased(url, str(data["token"]))
    return True


def _create(lease: Lease) -> bool:
    now = time.time()
    body = lease.body(now)
    try:
        atomic.write_bytes_exclusive(lease.url, body)
    except StorageConflict:
        return False
    lease.written, lease.expires = body, now + lease.ttl_s
    return True


def try_acquire(
    url: str,
    what: str,
    ttl_s: float = LEASE_TTL_S,
    holder: str | None = None,
    max_hold_s: float | None = None,
) -> Lease | None:
    """Take the lease at `url` if it is free or stale, and start renewing it; None while another holds it."""
    if ttl_s <= 0:
        raise ValueError(f"lease ttl_s must be above 0, got {ttl_s}")
    me = this_process()
    lease = Lease(
        url=url,
        what=what,
        holder=holder or f"pid {me['pid']} on {me['host']}",
        token=uuid.uuid4().hex,
        ttl_s=float(ttl_s),
        acquired=time.time(),
        max_hold_s=max_hold_s,
    )
    if _create(lease):
        lease.start_renewing()
        return lease
    raw = _read_raw(url)
    stale = _parse(raw)
    reason = stale_reason(stale)
    if reason is None and released_here(url, stale):
        reason = "released by this process, which could not remove it then"
    if reason is None:
        return None
    # Remove exactly the stale record read, then create ours: of two takers one removes it and the other
    # finds it gone (and loses the create) or changed (and steps back).
    if raw is not None and not _remove_stale(url, raw):
        return None
    if not _create(lease):
        return None
    if raw is None:  # released since our first try: created, not taken over
        lease.start_renewing()
        return lease
    lease.taken_from = reason
    log.warning("%s: took over %s from %s: %s", what, url, describe(stale), reason)
    lease.start_renewing()
    return lease


def poll_interval(ttl_s: float) -> float:
    return min(max(ttl_s / 4, MIN_POLL_S), MAX_POLL_S)


def _wait_for(
    url: str,
    what: str,
    ttl_s: float,
    wait_s: float | None,
    deadline: float | None,
    attempt: Callable[[], tuple[T | None, dict[str, Any] | None]],
    waiting: str,
) -> tuple[T, bool]:
    """Call `attempt` (one try: its result, None while `url` is held, and the lease as read) until it gives
    a result; logs the first wait, LeaseTimeout naming the holder after `deadline`. The result and whether
    it waited."""
    announced = False
    while True:
        result, data = attempt()
        if result is not None:
            return result, announced
        if not announced:
            log.warning("%s: %s %s; %s", what, url, _held_by(data), waiting)
            announced = True
        if deadline is not None and time.monotonic() > deadline:
            raise LeaseTimeout(f"{what}: {url} {_held_by(data, still=True)} after waiting {wait_s:.0f} s")
        time.sleep(poll_interval(ttl_s))


def _held_by(data: dict[str, Any] | None, still: bool = False) -> str:
    """What stands in the way, in words: a live holder, or a lease that is stale but not yet taken over
    (an expired lease is not "held")."""
    reason = stale_reason(data)
    if reason is None or data is None:
        return f"{'is still' if still else 'is'} held by {describe(data)}"
    return (
        f"{'still has' if still else 'has'} a stale lease of {describe(data)} ({reason}) that could not "
        "be taken over yet"
    )


def acquire(
    url: str,
    what: str,
    ttl_s: float = LEASE_TTL_S,
    wait_s: float | None = None,
    holder: str | None = None,
    max_hold_s: float | None = None,
) -> Lease:
    """Take the lease, waiting while another live holder has it (at most `wait_s`; None: as long as it
    takes); LeaseTimeout naming the holder when the wait runs out. The first wait is logged."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    started = time.monotonic()

    def attempt() -> tuple[Lease | None, dict[str, Any] | None]:
        lease = try_acquire(url, what, ttl_s, holder, max_hold_s)
        return lease, None if lease is not None else read_lease(url)

    lease, waited = _wait_for(url, what, ttl_s, wait_s, deadline, attempt, "waiting")
    if waited:
        log.warning("%s: waited %.1f s for %s", what, time.monotonic() - started, url)
    return lease


@contextmanager
def hold(
    url: str,
    what: str,
    ttl_s: float = LEASE_TTL_S,
    wait_s: float | None = None,
    holder: str | None = None,
    max_hold_s: float | None = None,
) -> Iterator[Lease]:
    """The lease for the length of a `with` block (see acquire); released on the way out, even on error."""
    lease = acquire(url, what, ttl_s, wait_s, holder, max_hold_s)
    try:
        yield lease
    finally:
        lease.release()


def _free(url: str) -> tuple[bool | None, dict[str, Any] | None]:
    """One look at the lease at `url`: True when nobody live holds it, else None; and the lease as read.
    A lease this process released but could not remove is removed now, if it is still that one."""
    raw = _read_raw(url)
    data = _parse(raw)
    if stale_reason(data) is not None:
        return True, data
    if raw is not None and released_here(url, data):
        _remove_stale(url, raw)
        return True, data
    return None, data


def wait_until_free(urls: list[str], what: str, ttl_s: float, wait_s: float | None) -> None:
    """Wait until none of the leases at `urls` is held by a live holder; LeaseTimeout after `wait_s`."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    for url in urls:
        _wait_for(url, what, ttl_s, wait_s, deadline, partial(_free, url), "waiting for it")


# --- the campaign lock -----------------------------------------------------------------------------------


def campaign_lock_url(root: str, campaign: str) -> str:
    """{root}/{campaign}/_lock.json, the root spelt by storage.normalise_url (as every campaign location)."""
    return storage.join(storage.normalise_url(root), campaign, CAMPAIGN_LOCK)


@contextmanager
def campaign_lock(
    root: str, campaign: str, holder: str, ttl_s: float = LEASE_TTL_S, wait_s: float | None = None
) -> Iterator[Lease]:
    """One round of a campaign at a time: held from planning a round to its outcome; a second round
    waits here (LeaseTimeout after `wait_s`, naming the round that holds it)."""
    with hold(campaign_lock_url(root, campaign), f"campaign {campaign}", ttl_s, wait_s, holder) as lease:
        yield lease
