"""Artifact storage: every read and write goes through an fsspec URL.

A local folder by default; `s3://bucket/prefix` through s3fs (credentials and AWS_ENDPOINT_URL from the
environment, never from configs); `memory://` in tests. Shards are JSONL or Parquet files that
`datasets.load_dataset("json"|"parquet", data_files=...)` reads as they are.

Writes are atomic: the whole payload is built in memory, then written to a temporary name and renamed on
local disks, or sent in one PUT on object stores, so a crash never leaves a half-written file behind.
Each shard has a manifest entry with its sha256; readers verify it (DESIGN.md, "Artifact layout").
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sao_core.errors import ManifestError, StorageConflict, StorageError

SHARD_DIGITS = 5


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


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return bool(fs.exists(path))


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    try:
        return bytes(fs.cat_file(path))
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
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # s3fs: pipe_file is a single put_object (multipart, also all-or-nothing, above 5 GB).
        fs.pipe_file(path, data)


_MEMORY_CREATE_LOCK = threading.Lock()


def write_bytes_exclusive(url: str, data: bytes) -> None:
    """Create a file that must not exist yet; StorageConflict when it does (another writer got there first).

    Local disks: the bytes go to a temporary name and are hard-linked into place, which fails if the name
    exists, so the file appears whole or not at all. S3: one PUT with `If-None-Match: *` (s3fs's
    mode="create"), refused by the store when the key exists; the object is read back, so a store that
    ignores the condition is caught when it let another writer replace ours. memory://: under a lock.
    Other stores get fsspec's create mode, which checks and then writes (not atomic).
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
        fs.pipe_file(path, data, mode="create")
    except FileExistsError as e:  # s3fs: 412 PreconditionFailed
        raise StorageConflict(f"{url} already exists") from e
    except OSError as e:
        # S3 answers 409 ConditionalRequestConflict while another conditional write of the key is in flight.
        if e.errno == errno.EBUSY:
            raise StorageConflict(f"{url} is being written by another writer") from e
        raise
    fs.invalidate_cache(path)
    if bytes(fs.cat_file(path)) != data:
        raise StorageConflict(f"{url} was replaced by another writer (the store ignored If-None-Match)")


def _create_local(url: str, path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise StorageConflict(f"{url} already exists") from e
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                raise
            # A filesystem without hard links: O_EXCL still makes the name ours alone.
            try:
                with open(path, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except FileExistsError as e2:
                raise StorageConflict(f"{url} already exists") from e2
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    found = sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))
    if isinstance(fs, LocalFileSystem):
        return found
    return [f"{protocol}://{p.lstrip('/')}" for p in found]


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


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
            for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
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
    """The manifest entry when the shard is complete, valid and made from these inputs; else None."""
    try:
        entry = read_shard_manifest(stage_url, index)
        if entry is None or not entry.complete:
            return None
        if entry.input_sha256 != input_sha256 or entry.settings_hash != settings_hash:
            return None
        verify_shard(stage_url, entry)
    except (StorageError, FileNotFoundError):
        return None
    return entry


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
