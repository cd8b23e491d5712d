"""Artifact storage: every read and write goes through an fsspec URL.

A local folder by default; `s3://bucket/prefix` through s3fs (credentials and AWS_ENDPOINT_URL from the
environment, never from configs); `memory://` in tests. Shards are JSONL or Parquet files that
`datasets.load_dataset("json"|"parquet", data_files=...)` reads as they are.

Writes are atomic: the whole payload is built in memory, then written to a temporary name and renamed on
local disks, or sent in one PUT on object stores, so a crash never leaves a half-written file behind.
Each shard has a manifest entry with its sha256; readers verify it (DESIGN.md, "Artifact layout").

Failures name the file. A full disk is a StorageError saying "no space left" (a retry cannot fix it; free
space and run again). An object store that does not answer (connection refused or cut, 5xx) is tried
again a few times with growing waits; if it still does not answer, a TransientStorageError, which is not
a StorageError, so the orchestrator retries the task (tests/reliability/test_storage_faults.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sao_core.errors import StorageError, TransientStorageError

log = logging.getLogger(__name__)

# One storage call on an object store is tried this many times, waiting TRANSIENT_WAIT_S, then twice that,
# and so on between tries; no new try starts TRANSIENT_GIVE_UP_S after the first. botocore already retries
# each request 4 times (5xx, refused or cut connections: up to ~15 s of its own backoff), so an endpoint
# down for about a minute is ridden out, and one that stays down fails the call within about two minutes
# (one that accepts connections and never answers: botocore's read timeouts, 5 x 60 s, then no new try).
TRANSIENT_TRIES = 4
TRANSIENT_WAIT_S = 2.0
TRANSIENT_GIVE_UP_S = 120.0

T = TypeVar("T")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return isinstance(fs, LocalFileSystem)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- faults of the store ------------------------------------------------------------------------------

# errno values s3fs gives answers a later try may not get: 500 InternalError (EREMOTEIO), 503 SlowDown or
# ServiceUnavailable (EBUSY), codes it does not know, such as a proxy's 502 (EIO).
_TRANSIENT_ERRNOS = {errno.EREMOTEIO, errno.EBUSY, errno.EIO, errno.EAGAIN, errno.ETIMEDOUT}
_ANSWERS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def s3_code(error: BaseException) -> str:
    """The S3 error code behind an error s3fs translated ("" when there is none)."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        seen = seen.__cause__
    return ""


def is_transient(error: BaseException) -> bool:
    """Whether a failed call on an object store may pass when tried again: no answer, a cut connection,
    a timeout, a 5xx; never an answer such as "no such key", "already exists" or "access denied"."""
    if isinstance(error, _ANSWERS):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError):
        return error.errno in _TRANSIENT_ERRNOS
    # Raised as they are by s3fs: botocore's EndpointConnectionError (refused), ConnectionClosedError (cut),
    # ReadTimeoutError; aiohttp's client errors. Looked up only when loaded: s3fs loads them.
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(error, (botocore.ConnectionError, botocore.HTTPClientError)):
        return True
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(error, aiohttp.ClientError)


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return not isinstance(fs, LocalFileSystem) and "memory" not in protocols


def retrying(
    what: str,
    url: str,
    fs: fsspec.AbstractFileSystem,
    call: Callable[[], T],
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """`call()`, tried again on an object store while it fails with a transient error, at most
    TRANSIENT_TRIES times in all and none started TRANSIENT_GIVE_UP_S after the first; then a
    TransientStorageError naming what was done to which URL."""
    if not _is_remote(fs):
        return call()
    started = time.monotonic()
    wait = TRANSIENT_WAIT_S
    for attempt in range(1, TRANSIENT_TRIES + 1):
        try:
            return call()
        except Exception as e:
            if not transient(e):
                raise
            if attempt == TRANSIENT_TRIES or time.monotonic() - started + wait > TRANSIENT_GIVE_UP_S:
                raise TransientStorageError(
                    f"cannot {what} {url}: the artifact store failed {attempt} tries in "
                    f"{time.monotonic() - started:.0f} s ({type(e).__name__}: {e})"
                ) from e
            log.warning(
                "cannot %s %s (%s: %s); try %d of %d in %.1f s",
                what,
                url,
                type(e).__name__,
                e,
                attempt + 1,
                TRANSIENT_TRIES,
                wait,
            )
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


def disk_full_error(url: str, size: int, error: OSError) -> StorageError:
    return StorageError(
        f"cannot write {url}: no space left on the device ({size} bytes to write; {error.strerror}); "
        "free some space and run again: finished shards are kept"
    )


def write_temp(url: str, path: str, data: bytes) -> str:
    """The bytes in a hidden temporary file beside `path`, flushed to disk; its name. Nothing is left
    behind when it fails; a full disk is a StorageError naming `url`."""
    folder, name = os.path.split(path)
    # Hidden and with a suffix of its own, so globs for shards ("part-*", "*.jsonl") never pick up one
    # left by a killed process.
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(folder or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        remove_quietly(tmp)
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(url, len(data), e) from e
        raise
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# --- files --------------------------------------------------------------------------------------------


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return bool(retrying("check", url, fs, lambda: fs.exists(path)))


def read_input(url: str, where: str, error: type[Exception]) -> bytes:
    """The bytes of an input file the config names; `error` saying `where` it is missing or unreadable
    (credentials, endpoint, permissions included), with the cause kept."""
    try:
        return read_bytes(url)
    except FileNotFoundError as e:
        raise error(f"{where} does not exist") from e
    except StorageError as e:
        raise error(f"{where} cannot be read: {e}") from e
    except Exception as e:
        raise error(f"{where} cannot be read: {type(e).__name__}: {e}") from e


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    try:
        return bytes(retrying("read", url, fs, lambda: fs.cat_file(path)))
    except FileNotFoundError:
        raise
    except IsADirectoryError as e:
        raise StorageError(f"{url} is a folder, not a file") from e


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file atomically: temp name + rename locally, one PUT on object stores."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        tmp = write_temp(url, path, data)
        try:
            os.replace(tmp, path)
        finally:
            remove_quietly(tmp)
    else:
        # s3fs: pipe_file is a single put_object (multipart, also all-or-nothing, above 5 GB); sent again
        # after a lost reply it writes the same bytes, so a retry is safe.
        retrying("write", url, fs, lambda: fs.pipe_file(path, data))


def forget_listing(url: str) -> None:
    """Drop this process's cached listings under a folder (s3fs keeps them), so the next listing or
    existence check sees what other processes wrote since."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except json.JSONDecodeError as e:
        raise StorageError(f"{url} is not valid JSON: {e}") from e


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Full URLs of the files under a folder that match a glob pattern, sorted."""
    fs, path = url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    found = sorted(retrying("list", url, fs, lambda: fs.glob(f"{path.rstrip('/')}/{pattern}")))
    if isinstance(fs, LocalFileSystem):
        return found
    return [f"{protocol}://{p.lstrip('/')}" for p in found]


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    if exists(url):
        with contextlib.suppress(FileNotFoundError):  # removed by a try whose reply was lost
            retrying("remove", url, fs, lambda: fs.rm(path, recursive=recursive))


# --- where things are ----------------------------------------------------------------------------------


def normalise_url(url: str) -> str:
    """The one spelling of a store location: no trailing slash; a local path with `~` expanded and made
    absolute, so that every folder, record, lock and cache key built on it names one place, whichever
    directory the command ran from (`~/sao-art`, never `./~/sao-art`). Every place that turns a root or
    folder into a location goes through here: layout.round_url, the campaign records and lock, training."""
    url = url.rstrip("/")
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]
