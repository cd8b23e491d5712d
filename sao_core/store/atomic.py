"""Writes that only one writer can win: the store's create-only write and its conditional replace and remove.

    atomic.write_bytes_exclusive(url, data)     # StorageConflict if url exists
    atomic.replace_if(url, expected, data)      # StorageConflict unless url still holds `expected`
    atomic.remove_if(url, expected)             # False if url no longer holds `expected`

Leases (store.locks) and the promotion ledger stand on these. They are atomic on local disks (a hard
link; an flock on the folder), on S3 (If-None-Match / If-Match) and in memory://; any other scheme is
refused by name rather than served by a check-then-write that two writers could both pass.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sao_core.errors import StorageConflict, StorageError, TransientStorageError
from sao_core.store.storage import (
    DISK_FULL_ERRNOS,
    disk_full_error,
    is_transient,
    remove_quietly,
    retrying,
    s3_code,
    url_to_fs,
    write_bytes,
    write_temp,
)

log = logging.getLogger(__name__)

_MEMORY_CREATE_LOCK = threading.RLock()
ATOMIC_SCHEMES = ("file", "s3", "memory")  # where a create-only and a conditional write are atomic


def _refuse(url: str, scheme: str, what: str) -> StorageError:
    return StorageError(
        f"cannot {what} at {url}: {scheme}:// offers no atomic conditional write here, and leases, claims "
        "and campaign records need one; put run.root on a local or shared folder, s3:// or memory://"
    )


def _atomic_kind(url: str, fs: fsspec.AbstractFileSystem, what: str) -> str:
    """How this store makes a write conditional ("local", "memory" or "s3"); a StorageError naming the
    scheme for any other store (leases and campaign records need the condition kept by the store)."""
    if isinstance(fs, LocalFileSystem):
        return "local"
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    for kind in ("memory", "s3"):
        if kind in protocols:
            return kind
    raise _refuse(url, url.split("://", 1)[0] if "://" in url else str(protocols[0]), what)


def _conditional_fs(url: str, what: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, path, kind) of a store with conditional writes; refused by scheme before its
    filesystem is even loaded (gs:// needs no gcsfs installed to be told no)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme not in ("file", "local", "s3", "s3a", "memory"):
        raise _refuse(url, scheme, what)
    fs, path = url_to_fs(url)
    return fs, path, _atomic_kind(url, fs, what)


# What S3 answers while another conditional write of the same key is in flight (409), as s3fs gives it.
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted", "409"}


def _is_transient_for_create(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.EBUSY and s3_code(error) in _CONFLICT_CODES:
        return False  # another writer, not a fault: StorageConflict below
    return is_transient(error)


def write_bytes_exclusive(url: str, data: bytes) -> None:
    """Create a file that must not exist yet; StorageConflict when it does (another writer got there first).

    Local disks: the bytes go to a temporary name and are hard-linked into place, which fails if the name
    exists, so the file appears whole or not at all. S3: one PUT with `If-None-Match: *` (s3fs's
    mode="create"), refused by the store when the key exists; the object is read back, so a store that
    ignores the condition is caught when it let another writer replace ours. A PUT whose reply was lost
    is sent again (by botocore or here) and refused, as the key now holds our own bytes: when what is there
    is byte for byte what we wrote, the write is ours. memory://: under a lock. Other stores (gs://, ...)
    are refused by name: fsspec's create mode there checks and then writes, which two writers can both
    pass, and leases and campaign records rest on exactly one of them winning.
    """
    fs, path, kind = _conditional_fs(url, "create a file only if it does not exist")
    if kind == "local":
        _create_local(url, path, data)
        return
    if kind == "memory":
        with _MEMORY_CREATE_LOCK:
            if fs.exists(path):
                raise StorageConflict(f"{url} already exists")
            fs.pipe_file(path, data)
        return
    try:
        retrying("create", url, fs, lambda: fs.pipe_file(path, data, mode="create"), _is_transient_for_create)
    except FileExistsError as e:  # s3fs: 412 PreconditionFailed
        if _read_back(url, fs, path) == data:
            log.info("%s holds the very bytes written: ours, sent again after a lost reply", url)
            return
        raise StorageConflict(f"{url} already exists") from e
    except OSError as e:
        # S3 answers 409 ConditionalRequestConflict while another conditional write of the key is in flight.
        if e.errno == errno.EBUSY:
            raise StorageConflict(f"{url} is being written by another writer") from e
        raise
    if _read_back(url, fs, path) != data:
        raise StorageConflict(f"{url} was replaced by another writer (the store ignored If-None-Match)")


def _read_back(url: str, fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """What the store holds at `path` now (None: removed since, by another writer)."""
    fs.invalidate_cache(path)
    try:
        return bytes(retrying("read", url, fs, lambda: fs.cat_file(path)))
    except FileNotFoundError:
        return None


def _create_local(url: str, path: str, data: bytes) -> None:
    tmp = write_temp(url, path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise StorageConflict(f"{url} already exists") from e
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                raise
            # A filesystem without hard links: O_EXCL still makes the name ours alone.
            try:
                f = open(path, "xb")  # noqa: SIM115 (the name is ours from here: removed if the write fails)
            except FileExistsError as e2:
                raise StorageConflict(f"{url} already exists") from e2
            try:
                with f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e3:
                remove_quietly(path)  # never a torn record under the final name
                if e3.errno in DISK_FULL_ERRNOS:
                    raise disk_full_error(url, len(data), e3) from e3
                raise
    finally:
        remove_quietly(tmp)


# --- conditional writes: leases renew and are taken over only from what they were -------------------

_local_guard_lock = threading.Lock()  # flock over NFS is per process: threads of one process take this too
_LOCAL_GUARD = ".lease-guard"  # where a folder cannot be locked itself (NFS): a hidden file in it
_LOCAL_GUARD_WAIT_S = 10.0  # a guard is held for a read and a rename; longer means a frozen process


def _flock(fd: int, url: str) -> None:
    import fcntl

    deadline = time.monotonic() + _LOCAL_GUARD_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TransientStorageError(
                    f"cannot change {url}: the lock of its folder has been held for over "
                    f"{_LOCAL_GUARD_WAIT_S:.0f} s by another process"
                ) from None
            time.sleep(0.005)


@contextlib.contextmanager
def _local_guard(url: str, path: str) -> Any:
    """The file's folder locked (flock) for a read-compare-write of the file: the folder itself, which
    leaves nothing behind; where the file system locks no folders (NFS emulates flock with POSIX locks,
    which need a file open for writing), a hidden file in it."""
    folder = os.path.dirname(path) or "."
    with _local_guard_lock:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                _flock(fd, url)
            except TransientStorageError:
                raise
            except OSError:
                os.close(fd)
                fd = os.open(os.path.join(folder, _LOCAL_GUARD), os.O_CREAT | os.O_RDWR, 0o644)
                _flock(fd, url)
            yield
        finally:
            os.close(fd)  # releases the flock


def _s3_get(fs: Any, path: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of exactly those bytes (one GET); None when there is none."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str] | None:
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return bytes(data), str(resp["ETag"])

    return sync(fs.loop, get)


def _s3_conditional(url: str, fs: Any, path: str, expected: bytes, data: bytes | None) -> bool:
    """One read, then a PUT (data) or DELETE (data None) with If-Match on the ETag read; see replace_if."""
    bucket, key, _ = fs.split_path(path)

    def attempt() -> bool:
        fs.invalidate_cache(path)
        found = _s3_get(fs, path)
        if found is None:
            if data is None:
                return False
            raise StorageConflict(f"{url} was removed by another writer")
        now, etag = found
        if data is not None and now == data:
            return True  # our PUT landed and its reply was lost: what is there is ours
        if now != expected:
            raise StorageConflict(f"{url} was changed by another writer")
        try:
            if data is None:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            else:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
        except FileNotFoundError:  # removed between our read and our write
            if data is None:
                return False
            raise StorageConflict(f"{url} was removed by another writer") from None
        except FileExistsError:  # 412: another writer changed it after our read (or our own retry landed)
            if data is not None and _read_back(url, fs, path) == data:
                return True
            raise StorageConflict(f"{url} was changed by another writer") from None
        except OSError as e:
            if e.errno == errno.EBUSY:  # 409: another conditional write of the key is in flight
                raise StorageConflict(f"{url} is being written by another writer") from e
            raise
        finally:
            fs.invalidate_cache(path)
        return True

    return retrying("change", url, fs, attempt, _is_transient_for_create)


def replace_if(url: str, expected: bytes, data: bytes) -> None:
    """Replace the file at `url` with `data` only while it holds exactly `expected`; StorageConflict when
    another writer changed or removed it since. Atomic where the store makes it so: local disks under a
    lock of the folder (flock, which shared file systems with POSIX locks honour), S3 with If-Match on
    the ETag of the bytes read, memory:// under a lock; other stores are refused (see ATOMIC_SCHEMES)."""
    fs, path, kind = _conditional_fs(url, "replace a file only if unchanged")
    if kind == "s3":
        _s3_conditional(url, fs, path, expected, data)
        return
    guard = _local_guard(url, path) if kind == "local" else _MEMORY_CREATE_LOCK
    try:
        with guard:
            now = bytes(fs.cat_file(path))
            if now != expected:
                raise StorageConflict(f"{url} was changed by another writer")
            write_bytes(url, data)
    except FileNotFoundError:  # the file, or its folder
        raise StorageConflict(f"{url} was removed by another writer") from None


def remove_if(url: str, expected: bytes) -> bool:
    """Remove the file at `url` only while it holds exactly `expected` (as replace_if); True when removed
    here, False when it was already gone, StorageConflict when it holds something else."""
    fs, path, kind = _conditional_fs(url, "remove a file only if unchanged")
    if kind == "s3":
        return _s3_conditional(url, fs, path, expected, None)
    guard = _local_guard(url, path) if kind == "local" else _MEMORY_CREATE_LOCK
    try:
        with guard:
            if bytes(fs.cat_file(path)) != expected:
                raise StorageConflict(f"{url} was changed by another writer")
            fs.rm_file(path)
    except FileNotFoundError:  # the file, or its folder
        return False
    return True
