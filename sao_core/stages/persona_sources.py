"""A round's personas from their source: the builtin generator, a persona file or a Hugging Face dataset.

    rows = sample_personas(PersonasConfig(source="builtin", n=8), seed=0)
    rows[0]  # {"persona_id": "pe-...", "persona": "A seasoned ...", "source": "builtin"}

Sources:
- `builtin`: the generated persona space of sao_core.method.personas, drawn one persona at a time.
- `file`: JSONL, JSON, Parquet or CSV (optionally .gz for the text formats) at any fsspec URL (local,
  s3://, memory://) with a persona column; Persona Hub's persona.jsonl works as it is.
- `hf`: a Hugging Face dataset through `datasets.load_dataset` (needs network, or a local folder).

A file or dataset is read whole (its permutation needs every id), so file sampling does not depend on the
order of its rows. `iter_personas` gives the rows one at a time, so a round of 100k builtin personas is
written shard by shard, never held whole. Rows that cannot be personas are left out and counted by reason
(`drops`): empty, duplicate (the same text as an earlier row, white space folded: a file's own id column
is not read), too_long (over MAX_PERSONA_CHARS: a document in a cell, not a persona). Control characters
are removed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

from sao_core.config import PersonasConfig
from sao_core.errors import PersonaSourceError
from sao_core.method import personas
from sao_core.method.personas import (
    MAX_PERSONA_CHARS,
    builtin_texts,
    draw_personas,
    normalize_persona,
    persona_id,
    too_few,
)
from sao_core.store.storage import read_input

# --- file and hf: a pool of distinct personas ----------------------------------------------------------

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _file_format(url: str) -> tuple[str, bool]:
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[: -len(".gz")]
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            if compressed and fmt == "parquet":
                break  # parquet compresses its own pages
            return fmt, compressed
    raise PersonaSourceError(
        f"persona file {url}: unknown format; allowed: .jsonl, .json, .parquet, .csv (.jsonl.gz, .json.gz, .csv.gz)"
    )


def _missing_column(url: str, column: str, found: Iterable[str]) -> PersonaSourceError:
    names = ", ".join(repr(c) for c in found) or "none"
    return PersonaSourceError(
        f"persona file {url} has no column {column!r}; columns found: {names} (set personas.column)"
    )


def _jsonl_values(text: str, url: str, column: str, json_array_ok: bool) -> list[Any]:
    # A .json file may hold one array of objects; otherwise (and for .jsonl) one object per line.
    if json_array_ok and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PersonaSourceError(f"persona file {url} is not valid JSON: {e}") from e
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        # Lines end at "\n" only: str.splitlines would also cut at U+2028 or U+0085 inside a JSON string.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PersonaSourceError(f"persona file {url}: line {lineno} is not JSON ({e})") from e
    if not numbered:
        raise PersonaSourceError(f"persona file {url} is empty: it has no rows")
    found: dict[str, None] = {}
    values = []
    for lineno, row in numbered:
        if not isinstance(row, dict):
            raise PersonaSourceError(
                f"persona file {url}: row {lineno} holds {type(row).__name__}, not an object with a {column!r} field"
            )
        found.update(dict.fromkeys(row))
        values.append(row.get(column))
    if column not in found:
        raise _missing_column(url, column, found)
    return values


def _csv_values(text: str, url: str, column: str) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise PersonaSourceError(f"persona file {url} is empty: it has no header row")
    if column not in reader.fieldnames:
        raise _missing_column(url, column, reader.fieldnames)
    try:
        return [row.get(column) for row in reader]
    except csv.Error as e:
        raise PersonaSourceError(f"persona file {url} is not valid CSV: {e}") from e


def _parquet_values(data: bytes, url: str, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        names = pf.schema_arrow.names
        if column not in names:
            raise _missing_column(url, column, names)
        return list(pf.read(columns=[column]).column(column).to_pylist())
    except PersonaSourceError:
        raise
    except Exception as e:  # a torn or foreign file must name itself
        raise PersonaSourceError(
            f"persona file {url} is not readable Parquet: {type(e).__name__}: {e}"
        ) from e


def _pool(values: Iterable[Any], where: str, column: str, drops: Counter[str]) -> dict[str, str]:
    """Distinct personas by id, first text kept; empty, repeated and overlong values counted in `drops`."""
    pool: dict[str, str] = {}
    for row, value in enumerate(values, 1):
        if value is not None and not isinstance(value, str):
            raise PersonaSourceError(
                f"persona source {where}: row {row} of column {column!r} holds {type(value).__name__}, not text"
            )
        text = normalize_persona(value) if value else ""
        if not text:
            drops["empty"] += 1
        elif len(text) > MAX_PERSONA_CHARS:
            drops["too_long"] += 1
        else:
            pid = persona_id(text)
            if pid in pool:
                drops["duplicate"] += 1
            else:
                pool[pid] = text
    return pool


def _no_personas(where: str, column: str, rows: int, drops: Counter[str]) -> PersonaSourceError:
    if set(drops) == {"empty"}:
        why = f"column {column!r} is empty in all {rows} rows"
    else:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
        why = f"none of its {rows} rows is a persona ({counts}; at most {MAX_PERSONA_CHARS} characters)"
    return PersonaSourceError(f"{where} has no personas: {why}")


def read_persona_file(url: str, column: str = "persona", drops: Counter[str] | None = None) -> dict[str, str]:
    """Distinct personas (persona_id -> text) of a JSONL/JSON/Parquet/CSV file at any fsspec URL; the
    rows left out are counted by reason in `drops` when given (module docstring)."""
    fmt, compressed = _file_format(url)
    data = read_input(url, f"persona file {url}", PersonaSourceError)
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise PersonaSourceError(f"persona file {url} is not valid gzip: {e}") from e
    if fmt == "parquet":
        values = _parquet_values(data, url, column)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PersonaSourceError(f"persona file {url} is not UTF-8 text: {e}") from e
        if fmt == "csv":
            values = _csv_values(text, url, column)
        else:
            values = _jsonl_values(text, url, column, json_array_ok=fmt == "json")
    drops = Counter() if drops is None else drops
    pool = _pool(values, url, column, drops)
    if not pool:
        raise _no_personas(f"persona file {url}", column, len(values), drops)
    return pool


def _read_hf(cfg: PersonasConfig, where: str, drops: Counter[str]) -> dict[str, str]:
    import datasets

    try:
        # datasets 4 and later run no loading scripts at all; said explicitly, so no version's default decides.
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, trust_remote_code=False)
    except Exception as e:  # offline, unknown id, missing subset or split
        raise PersonaSourceError(
            f"persona source {where} (subset {cfg.subset!r}, split {cfg.split!r}) cannot be loaded: "
            f"{type(e).__name__}: {e}"
        ) from e
    if cfg.column not in ds.column_names:
        names = ", ".join(repr(c) for c in ds.column_names) or "none"
        raise PersonaSourceError(
            f"persona source {where} has no column {cfg.column!r}; columns found: {names} (set personas.column)"
        )
    values = ds.select_columns([cfg.column]).to_dict()[cfg.column]
    pool = _pool(values, where, cfg.column, drops)
    if not pool:
        raise _no_personas(f"persona source {where}", cfg.column, len(values), drops)
    return pool


def _source_name(cfg: PersonasConfig) -> str:
    if cfg.source == "file":
        return f"file:{cfg.path}"
    if cfg.source == "hf":
        return f"hf:{cfg.dataset}" + (f":{cfg.subset}" if cfg.subset else "")
    return "builtin"


def load_persona_pool(cfg: PersonasConfig, drops: Counter[str] | None = None) -> dict[str, str]:
    """All distinct personas (persona_id -> text) of a file or hf source; builtin is never materialised.
    The source rows left out are counted by reason in `drops` when given."""
    where = _source_name(cfg)
    drops = Counter() if drops is None else drops
    if cfg.source == "file":
        assert cfg.path is not None  # PersonasConfig refuses a file source without a path
        return read_persona_file(cfg.path, cfg.column, drops)
    if cfg.source == "hf":
        return _read_hf(cfg, where, drops)
    raise PersonaSourceError(
        f"persona source {where} has {personas.builtin_size()} personas; sample it, do not load it"
    )


def iter_personas(
    cfg: PersonasConfig,
    seed: int,
    exclude_ids: AbstractSet[str] = frozenset(),
    drops: Counter[str] | None = None,
) -> Iterator[dict[str, str]]:
    """`sample_personas` one row at a time: the builtin source draws each persona when it is asked for,
    so a stage can write n personas in shards without holding them (a file or hf source is read whole,
    as its permutation needs every id). The source rows left out are counted in `drops` when given.

    Raises PersonaSourceError as sample_personas does; a shortfall after exclusion only once the source
    is exhausted, after the rows it had.
    """
    where = _source_name(cfg)
    if cfg.source == "builtin":
        size = personas.builtin_size()
        if cfg.n > size:
            raise too_few(cfg.n, where, size, 0)
        yield from draw_personas(builtin_texts(seed, size), cfg.n, exclude_ids, where)
        return
    pool = load_persona_pool(cfg, drops)
    # Sorting by id first makes the sample independent of row order in the file.
    ids = sorted(pool)
    random.Random(seed).shuffle(ids)
    yield from draw_personas(((pid, pool[pid]) for pid in ids), cfg.n, exclude_ids, where)


def sample_personas(
    cfg: PersonasConfig,
    seed: int,
    exclude_ids: AbstractSet[str] = frozenset(),
    drops: Counter[str] | None = None,
) -> list[dict[str, str]]:
    """n distinct personas {persona_id, persona, source}, deterministic for (cfg, seed), none in exclude_ids;
    the source rows left out are counted by reason in `drops` when given.

    Raises PersonaSourceError when the source is unreadable, has no personas, or has fewer than n left
    after exclusion (the message gives how many were asked, how many the source has, how many excluded).
    """
    return list(iter_personas(cfg, seed, exclude_ids, drops))
