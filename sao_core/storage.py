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
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sao_core.errors import (
    ManifestError,
    StorageConflict,
    StorageError,
    TransientStorageError,
)

log = logging.getLogger(__name__)

SHARD_DIGITS = 5

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
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _s3_code(error: BaseException) -> str:
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


def _retrying(
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


def _disk_full(url: str, size: int, error: OSError) -> StorageError:
    return StorageError(
        f"cannot write {url}: no space left on the device ({size} bytes to write; {error.strerror}); "
        "free some space and run again: finished shards are kept"
    )


def _write_temp(url: str, path: str, data: bytes) -> str:
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
        _remove_quietly(tmp)
        if e.errno in _DISK_FULL:
            raise _disk_full(url, len(data), e) from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# --- files --------------------------------------------------------------------------------------------


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return bool(_retrying("check", url, fs, lambda: fs.exists(path)))


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
        return bytes(_retrying("read", url, fs, lambda: fs.cat_file(path)))
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
        tmp = _write_temp(url, path, data)
        try:
            os.replace(tmp, path)
        finally:
            _remove_quietly(tmp)
    else:
        # s3fs: pipe_file is a single put_object (multipart, also all-or-nothing, above 5 GB); sent again
        # after a lost reply it writes the same bytes, so a retry is safe.
        _retrying("write", url, fs, lambda: fs.pipe_file(path, data))


_MEMORY_CREATE_LOCK = threading.Lock()
# What S3 answers while another conditional write of the same key is in flight (409), as s3fs gives it.
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted", "409"}


def _is_transient_for_create(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.EBUSY and _s3_code(error) in _CONFLICT_CODES:
        return False  # another writer, not a fault: StorageConflict below
    return is_transient(error)


def write_bytes_exclusive(url: str, data: bytes) -> None:
    """Create a file that must not exist yet; StorageConflict when it does (another writer got there first).

    Local disks: the bytes go to a temporary name and are hard-linked into place, which fails if the name
    exists, so the file appears whole or not at all. S3: one PUT with `If-None-Match: *` (s3fs's
    mode="create"), refused by the store when the key exists; the object is read back, so a store that
    ignores the condition is caught when it let another writer replace ours. A PUT whose reply was lost
    is sent again (by botocore or here) and refused, as the key now holds our own bytes: when what is there
    is byte for byte what we wrote, the write is ours. memory://: under a lock. Other stores get fsspec's
    create mode, which checks and then writes (not atomic).
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        _create_local(url, path, data)
        return
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "memory" in protocols:
        with _MEMORY_CREATE_LOCK:
            if fs.exists(path):
                raise StorageConflict(f"{url} already exists")
            fs.pipe_file(path, data)
        return
    try:
        _retrying(
            "create", url, fs, lambda: fs.pipe_file(path, data, mode="create"), _is_transient_for_create
        )
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
        return bytes(_retrying("read", url, fs, lambda: fs.cat_file(path)))
    except FileNotFoundError:
        return None


def _create_local(url: str, path: str, data: bytes) -> None:
    tmp = _write_temp(url, path, data)
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
                _remove_quietly(path)  # never a torn record under the final name
                if e3.errno in _DISK_FULL:
                    raise _disk_full(url, len(data), e3) from e3
                raise
    finally:
        _remove_quietly(tmp)


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
    found = sorted(_retrying("list", url, fs, lambda: fs.glob(f"{path.rstrip('/')}/{pattern}")))
    if isinstance(fs, LocalFileSystem):
        return found
    return [f"{protocol}://{p.lstrip('/')}" for p in found]


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    if exists(url):
        with contextlib.suppress(FileNotFoundError):  # removed by a try whose reply was lost
            _retrying("remove", url, fs, lambda: fs.rm(path, recursive=recursive))


# --- rows ------------------------------------------------------------------------------------------


def encode_rows(rows: Iterable[Mapping[str, Any]], fmt: str) -> bytes:
    rows = list(rows)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()
    raise ValueError(f"unknown shard format {fmt!r}; allowed: jsonl, parquet")


def decode_rows(data: bytes, fmt: str, where: str) -> list[dict[str, Any]]:
    try:
        if fmt == "jsonl":
            rows = []
            # Lines end at "\n" only: str.splitlines also cuts at U+2028 or U+0085, which json.dumps leaves
            # as they are inside a string when ensure_ascii is off.
            for lineno, line in enumerate(data.decode("utf-8").split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StorageError(f"unreadable shard {where}: line {lineno} is not JSON ({e})") from e
            return rows
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(io.BytesIO(data)).to_pylist())
    except StorageError:
        raise
    except Exception as e:  # a torn or foreign file must name itself, not crash deep in a parser
        raise StorageError(f"unreadable shard {where}: {type(e).__name__}: {e}") from e
    raise ValueError(f"unknown shard format {fmt!r}; allowed: jsonl, parquet")


# --- shards and manifests ----------------------------------------------------------------------------


def shard_name(index: int, fmt: str, kind: str = "part") -> str:
    return f"{kind}-{index:0{SHARD_DIGITS}d}.{fmt}"


@dataclass
class ShardManifest:
    """What one shard of one stage holds and how it was made; `complete` is written last."""

    stage: str
    shard: int
    rows_in: int
    file: str = ""  # file, sha256 and rows_out are filled in by write_shard
    sha256: str = ""
    rows_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    dropped_file: str | None = None
    dropped_sha256: str | None = None
    input_sha256: str = ""
    settings_hash: str = ""  # sao_core.stages.layout.stage_settings_hash: the stage's own settings
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine: str = ""
    model: str = ""
    model_revision: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ShardManifest:
        if "params_hash" in data and "settings_hash" not in data:  # shards written before the rename
            data = {("settings_hash" if k == "params_hash" else k): v for k, v in data.items()}
        try:
            return cls(**data)
        except TypeError as e:
            raise ManifestError(f"malformed shard manifest {where}: {e}") from e


def shard_manifest_url(stage_url: str, index: int) -> str:
    return join(stage_url, "_shards", f"part-{index:0{SHARD_DIGITS}d}.json")


def write_shard(
    stage_url: str,
    index: int,
    rows: list[dict[str, Any]],
    dropped: list[dict[str, Any]],
    fmt: str,
    manifest: ShardManifest,
) -> ShardManifest:
    """Write a shard's rows, its dropped rows and then its manifest entry (last, so it marks completion)."""
    data = encode_rows(rows, fmt)
    name = shard_name(index, fmt)
    write_bytes(join(stage_url, name), data)
    manifest.file = name
    manifest.sha256 = sha256_bytes(data)
    manifest.rows_out = len(rows)
    if dropped:
        dropped_data = encode_rows(dropped, "jsonl")
        dropped_name = shard_name(index, "jsonl", kind="dropped")
        write_bytes(join(stage_url, "_dropped", dropped_name), dropped_data)
        manifest.dropped_file = f"_dropped/{dropped_name}"
        manifest.dropped_sha256 = sha256_bytes(dropped_data)
    manifest.complete = True
    write_json(shard_manifest_url(stage_url, index), asdict(manifest))
    return manifest


def read_shard_manifest(stage_url: str, index: int) -> ShardManifest | None:
    url = shard_manifest_url(stage_url, index)
    if not exists(url):
        return None
    data = read_json(url)
    if not isinstance(data, dict):
        raise ManifestError(f"malformed shard manifest {url}: expected an object")
    return ShardManifest.from_dict(data, url)


def verify_shard(stage_url: str, entry: ShardManifest) -> bytes:
    """Return the shard's bytes after checking them against the manifest's sha256."""
    url = join(stage_url, entry.file)
    try:
        data = read_bytes(url)
    except FileNotFoundError as e:
        raise ManifestError(f"shard {url} is listed in its manifest but missing") from e
    actual = sha256_bytes(data)
    if actual != entry.sha256:
        raise ManifestError(
            f"shard {url} does not match its manifest: sha256 {actual[:16]}... != {entry.sha256[:16]}..."
        )
    return data


def verify_dropped(stage_url: str, entry: ShardManifest) -> None:
    """Check a shard's dropped rows file (when it has one) against the manifest's sha256."""
    if not entry.dropped_file:
        return
    url = join(stage_url, entry.dropped_file)
    try:
        data = read_bytes(url)
    except FileNotFoundError as e:
        raise ManifestError(f"dropped rows {url} are listed in their manifest but missing") from e
    if sha256_bytes(data) != entry.dropped_sha256:
        raise ManifestError(f"dropped rows {url} do not match their manifest (sha256)")


def read_shard(stage_url: str, index: int, fmt: str) -> tuple[list[dict[str, Any]], ShardManifest]:
    """Rows of a finished shard, verified against its manifest entry."""
    entry = read_shard_manifest(stage_url, index)
    if entry is None or not entry.complete:
        raise StorageError(f"shard {index} of {stage_url} is not finished (no complete manifest entry)")
    data = verify_shard(stage_url, entry)
    rows = decode_rows(data, fmt, join(stage_url, entry.file))
    if len(rows) != entry.rows_out:
        raise ManifestError(
            f"shard {join(stage_url, entry.file)} has {len(rows)} rows, its manifest says {entry.rows_out}"
        )
    return rows, entry


def shard_is_done(stage_url: str, index: int, input_sha256: str, settings_hash: str) -> ShardManifest | None:
    """The manifest entry when the shard is complete, valid (its file and its dropped rows verify) and
    made from these inputs; else None. A store that does not answer raises TransientStorageError: an
    unanswered check is not "not done"."""
    try:
        entry = read_shard_manifest(stage_url, index)
        if entry is None or not entry.complete:
            return None
        if entry.input_sha256 != input_sha256 or entry.settings_hash != settings_hash:
            return None
        verify_shard(stage_url, entry)
        # The dropped rows are half of what the shard answered: a shard whose dropped file is torn would
        # lose those rows from the round's counts for good if it still counted as done.
        verify_dropped(stage_url, entry)
    except (StorageError, FileNotFoundError):
        return None
    return entry


def stage_is_done(stage_url: str, inputs: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The stage manifest when it has one shard per input and every shard is done (shard_is_done) from
    its (input sha256, settings hash); else None: a stage whose output is made whole in one pass."""
    try:
        manifest = read_stage_manifest(stage_url)
    except (StorageError, FileNotFoundError):
        return None
    if int(manifest.get("num_shards", -1)) != len(inputs):
        return None
    if any(shard_is_done(stage_url, i, sha, settings) is None for i, (sha, settings) in enumerate(inputs)):
        return None
    return manifest


def write_stage_manifest(stage_url: str, stage: str, entries: list[ShardManifest], **extra: Any) -> dict:
    """The stage-level manifest: its shards plus totals (rows in/out, drops by reason, tokens, seconds)."""
    drops: dict[str, int] = {}
    for e in entries:
        for reason, count in e.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    manifest = {
        "stage": stage,
        "num_shards": len(entries),
        "rows_in": sum(e.rows_in for e in entries),
        "rows_out": sum(e.rows_out for e in entries),
        "drops": dict(sorted(drops.items())),
        "seconds": round(sum(e.seconds for e in entries), 3),
        "prompt_tokens": sum(e.prompt_tokens for e in entries),
        "completion_tokens": sum(e.completion_tokens for e in entries),
        "engine": entries[0].engine if entries else "",
        "model": entries[0].model if entries else "",
        "model_revision": entries[0].model_revision if entries else "",
        **extra,
        "shards": [asdict(e) for e in entries],
    }
    write_json(join(stage_url, "manifest.json"), manifest)
    return manifest


def read_stage_manifest(stage_url: str) -> dict:
    url = join(stage_url, "manifest.json")
    if not exists(url):
        raise StorageError(f"stage {stage_url} has no manifest.json: it has not finished")
    manifest = read_json(url)
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ManifestError(f"malformed stage manifest {url}")
    return manifest


def read_stage_rows(stage_url: str, fmt: str) -> list[dict[str, Any]]:
    """All rows of a finished stage, every shard verified."""
    manifest = read_stage_manifest(stage_url)
    rows: list[dict[str, Any]] = []
    for entry in manifest["shards"]:
        shard_rows, _ = read_shard(stage_url, int(entry["shard"]), fmt)
        rows.extend(shard_rows)
    return rows


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A finished stage's content: sha256 over its shard hashes, in shard order (what cache keys are made of)."""
    shas = [str(e.get("sha256", "")) for e in manifest.get("shards", [])]
    return hashlib.sha256("\x1f".join(shas).encode()).hexdigest()


def data_files(stage_url: str, fmt: str) -> list[str]:
    """The URLs of a finished stage's shards, for `datasets.load_dataset(fmt, data_files=...)`."""
    manifest = read_stage_manifest(stage_url)
    return [join(stage_url, e["file"]) for e in manifest["shards"]]
