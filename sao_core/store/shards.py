"""Rows, shards and manifests in the store: how a stage's output is written, verified and read back.

A stage writes its rows in shards (`part-00000.jsonl` or `.parquet`, which `datasets.load_dataset` reads
as they are), each with a manifest entry holding its sha256, counts and the inputs it was made from; the
stage manifest lists them with the totals. Readers verify every shard against its entry
(DESIGN.md, "Artifact layout"), so a torn or edited shard is found, named and made again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sao_core.errors import ManifestError, StorageError
from sao_core.store.storage import exists, join, read_bytes, read_json, sha256_bytes, write_bytes, write_json

SHARD_DIGITS = 5


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
    settings_hash: str = ""  # sao_core.store.layout.stage_settings_hash: the stage's own settings
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


def stage_problem(stage_url: str) -> str | None:
    """Why a finished stage's output cannot be used (no manifest; a shard or its dropped rows missing or
    unlike their sha256), or None when every shard verifies."""
    try:
        manifest = read_stage_manifest(stage_url)
        for raw in manifest["shards"]:
            entry = ShardManifest.from_dict(raw, join(stage_url, "manifest.json"))
            verify_shard(stage_url, entry)
            verify_dropped(stage_url, entry)
    except (StorageError, FileNotFoundError) as e:
        return str(e)
    return None


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
