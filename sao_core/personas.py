"""Personas (SAO.md step 1): sample n distinct personas, one prompt each, from a pluggable source.

    rows = sample_personas(PersonasConfig(source="builtin", n=8), seed=0)
    rows[0]  # {"persona_id": "pe-...", "persona": "A seasoned ...", "source": "builtin"}

Sources:
- `builtin`: a persona space the project generates itself from attribute lists shipped as package data
  (sao_core/data/personas/builtin.yaml: sentence template, occupation, experience, trait, interest, goal,
  life context). A mixed-radix index maps to one persona, so sampling never materialises the space; no
  download, no third-party licence.
- `file`: JSONL, JSON, Parquet or CSV (optionally .gz for the text formats) at any fsspec URL (local,
  s3://, memory://) with a persona column; Persona Hub's persona.jsonl works as it is.
- `hf`: a Hugging Face dataset through `datasets.load_dataset` (needs network, or a local folder).

Every source is sampled the same way: a seeded permutation of its distinct personas, skipping the ids of
personas used by earlier rounds (exclude_ids), first n kept. So a larger n extends a smaller one with the
same seed, and file sampling does not depend on the order of rows in the file.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import math
import random
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any

import yaml

from sao_core.config import PersonasConfig
from sao_core.errors import PersonaSourceError, StorageError
from sao_core.storage import read_bytes

__all__ = [
    "builtin_attributes",
    "builtin_lists",
    "builtin_persona",
    "builtin_size",
    "load_persona_pool",
    "normalize_persona",
    "persona_id",
    "read_persona_file",
    "sample_personas",
]


def normalize_persona(text: str) -> str:
    """The persona text with runs of white space (newlines included) folded to one space."""
    return " ".join(text.split())


def persona_id(text: str) -> str:
    """Stable id of a persona: "pe-" + 16 hex digits of the sha256 of its whitespace-normalised text."""
    return "pe-" + hashlib.sha256(normalize_persona(text).encode("utf-8")).hexdigest()[:16]


# --- builtin: the attribute lists -------------------------------------------------------------------
# The lists are data (sao_core/data/personas/builtin.yaml, shipped as package data), read once per process.
# The digit order below and the order of entries in each list fix which persona an index gives, so seeds
# keep meaning the same personas; tests pin digests of builtin samples.

# The least significant digit comes first: index -> template, occupation, experience, trait, ...
_DIGITS = ("template", "occupation", "experience", "trait", "interest", "goal", "context")
_TEMPLATE_FIELDS = ["a", "c", "g", "i", "t"]  # each template uses each field once, sorted


def _builtin_data() -> Traversable:
    return resources.files("sao_core") / "data" / "personas" / "builtin.yaml"


def _read_builtin_lists(resource: Traversable) -> Mapping[str, tuple[str, ...]]:
    """The attribute lists of a builtin data file, in digit order; PersonaSourceError names a bad file."""
    where = f"builtin persona data {resource}"
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PersonaSourceError(
            f"{where} does not exist: sao_core was installed without its package data"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise PersonaSourceError(f"{where} cannot be read: {type(e).__name__}: {e}") from e
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PersonaSourceError(f"{where} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PersonaSourceError(f"{where} holds {type(data).__name__}, not a mapping of the lists by name")
    # PyYAML keeps the last of two equal keys without a word; a second list of the same name is an error.
    keys = [key.value for key, _ in root.value] if isinstance(root, yaml.MappingNode) else []
    repeated_keys = sorted({key for key in keys if keys.count(key) > 1})
    missing = [name for name in _DIGITS if name not in data]
    unknown = sorted(str(key) for key in data if key not in _DIGITS)
    if repeated_keys or missing or unknown:
        raise PersonaSourceError(
            f"{where} must hold exactly the lists {', '.join(_DIGITS)}; "
            f"repeated: {repeated_keys}, missing: {missing}, unknown: {unknown}"
        )
    lists: dict[str, tuple[str, ...]] = {}
    for name in _DIGITS:
        values = data[name]
        if not isinstance(values, list) or not values:
            raise PersonaSourceError(f"{where}: {name!r} must be a non-empty list of entries")
        for pos, value in enumerate(values, 1):
            if not isinstance(value, str) or not value or value != normalize_persona(value):
                raise PersonaSourceError(
                    f"{where}: {name} entry {pos} is {value!r}; entries are text with single spaces, not blank or padded"
                )
        repeated = sorted(v for v, count in Counter(values).items() if count > 1)
        if repeated:
            raise PersonaSourceError(
                f"{where}: {name} repeats {repeated}; each index must give a distinct text"
            )
        lists[name] = tuple(values)
    for pos, template in enumerate(lists["template"], 1):
        try:
            fields = sorted(f for _, f, _, _ in string.Formatter().parse(template) if f is not None)
        except ValueError as e:
            raise PersonaSourceError(f"{where}: template {pos} ({template!r}) is malformed: {e}") from e
        if fields != _TEMPLATE_FIELDS:
            raise PersonaSourceError(
                f"{where}: template {pos} ({template!r}) must use each of {{a}}, {{t}}, {{i}}, {{g}}, {{c}} once"
            )
    return MappingProxyType(lists)


@functools.cache
def builtin_lists() -> Mapping[str, tuple[str, ...]]:
    """The builtin attribute lists by attribute name, in digit order (template first), read once."""
    return _read_builtin_lists(_builtin_data())


@functools.cache
def builtin_size() -> int:
    """How many distinct personas the builtin source has: the product of its list lengths."""
    return math.prod(len(values) for values in builtin_lists().values())


# "an" goes by sound, not by letter: a university lecturer, an MRI technician, an hour.
_AN_PREFIXES = ("hour", "honest", "honour", "heir")
_A_PREFIXES = ("uni", "use", "usu", "eu", "one", "once", "ewe")


def _article(phrase: str) -> str:
    word = phrase.split(maxsplit=1)[0]
    lower = word.lower()
    if lower.startswith(_AN_PREFIXES):
        return "an"
    if lower.startswith(_A_PREFIXES):
        return "a"
    # Initialisms read letter by letter: an MRI, an X-ray, an IT, but a UX.
    head = word.split("-", 1)[0]
    if head.isupper() and len(head) <= 4:
        return "an" if head[0] in "AEFHILMNORSX" else "a"
    return "an" if lower[0] in "aeiou" else "a"


def builtin_attributes(index: int) -> dict[str, str]:
    """The attributes (template, occupation, experience, trait, interest, goal, context) of a builtin index."""
    size = builtin_size()
    if not 0 <= index < size:
        raise IndexError(f"builtin persona index {index} is outside 0..{size - 1}")
    parts: dict[str, str] = {}
    rest = index
    for name, values in builtin_lists().items():
        rest, digit = divmod(rest, len(values))
        parts[name] = values[digit]
    return parts


def builtin_persona(index: int) -> str:
    """The builtin persona at `index` (0 <= index < builtin_size()); each index gives a distinct text."""
    p = builtin_attributes(index)
    person = f"{p['experience']} {p['occupation']}"
    text = p["template"].format(
        a=f"{_article(person)} {person}", t=p["trait"], i=p["interest"], g=p["goal"], c=p["context"]
    )
    return text[0].upper() + text[1:]


def _builtin_order(seed: int, size: int) -> Iterator[int]:
    """Distinct indices of range(size) in a seeded random order, drawn lazily."""
    rng = random.Random(seed)
    if size <= 1 << 20:
        yield from rng.sample(range(size), size)
        return
    seen: set[int] = set()
    while len(seen) < size:  # rejection sampling: the space is far larger than any n asked for
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index


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
        for lineno, line in enumerate(text.splitlines(), 1):
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


def _pool(values: Iterable[Any], where: str, column: str) -> dict[str, str]:
    """Distinct personas by id, first text kept; empty and missing values skipped."""
    pool: dict[str, str] = {}
    for row, value in enumerate(values, 1):
        if value is None:
            continue
        if not isinstance(value, str):
            raise PersonaSourceError(
                f"persona source {where}: row {row} of column {column!r} holds {type(value).__name__}, not text"
            )
        text = normalize_persona(value)
        if text:
            pool.setdefault(persona_id(text), text)
    return pool


def read_persona_file(url: str, column: str = "persona") -> dict[str, str]:
    """Distinct personas (persona_id -> text) of a JSONL/JSON/Parquet/CSV file at any fsspec URL."""
    fmt, compressed = _file_format(url)
    try:
        data = read_bytes(url)
    except FileNotFoundError as e:
        raise PersonaSourceError(f"persona file {url} does not exist") from e
    except StorageError as e:
        raise PersonaSourceError(f"persona file {url} cannot be read: {e}") from e
    except Exception as e:  # credentials, endpoint, permissions: name the file, keep the cause
        raise PersonaSourceError(f"persona file {url} cannot be read: {type(e).__name__}: {e}") from e
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
    pool = _pool(values, url, column)
    if not pool:
        raise PersonaSourceError(
            f"persona file {url} has no personas: column {column!r} is empty in all {len(values)} rows"
        )
    return pool


def _read_hf(cfg: PersonasConfig, where: str) -> dict[str, str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
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
    pool = _pool(values, where, cfg.column)
    if not pool:
        raise PersonaSourceError(
            f"persona source {where} has no personas: column {cfg.column!r} is empty in all {len(values)} rows"
        )
    return pool


def _source_name(cfg: PersonasConfig) -> str:
    if cfg.source == "file":
        return f"file:{cfg.path}"
    if cfg.source == "hf":
        return f"hf:{cfg.dataset}" + (f":{cfg.subset}" if cfg.subset else "")
    return "builtin"


def load_persona_pool(cfg: PersonasConfig) -> dict[str, str]:
    """All distinct personas (persona_id -> text) of a file or hf source; builtin is never materialised."""
    where = _source_name(cfg)
    if cfg.source == "file":
        assert cfg.path is not None  # PersonasConfig refuses a file source without a path
        return read_persona_file(cfg.path, cfg.column)
    if cfg.source == "hf":
        return _read_hf(cfg, where)
    raise PersonaSourceError(
        f"persona source {where} has {builtin_size()} personas; sample it, do not load it"
    )


# --- sampling ----------------------------------------------------------------------------------------


def _too_few(n: int, where: str, size: int, excluded: int) -> PersonaSourceError:
    return PersonaSourceError(
        f"asked for {n} personas but {where} has {size} distinct personas, {excluded} of them excluded "
        f"as used by earlier rounds ({size - excluded} left); lower personas.n or use a larger source"
    )


def _take(
    order: Iterable[tuple[str, str]], n: int, exclude_ids: AbstractSet[str], where: str
) -> tuple[list[dict[str, str]], int, int]:
    """The first n personas of `order` not excluded, plus how many were seen and how many excluded."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    excluded = 0
    for pid, text in order:
        if pid in seen:
            continue
        seen.add(pid)
        if pid in exclude_ids:
            excluded += 1
            continue
        rows.append({"persona_id": pid, "persona": text, "source": where})
        if len(rows) == n:
            break
    return rows, len(seen), excluded


def _builtin_texts(seed: int, size: int) -> Iterator[tuple[str, str]]:
    for index in _builtin_order(seed, size):
        text = builtin_persona(index)
        yield persona_id(text), text


def sample_personas(
    cfg: PersonasConfig, seed: int, exclude_ids: AbstractSet[str] = frozenset()
) -> list[dict[str, str]]:
    """n distinct personas {persona_id, persona, source}, deterministic for (cfg, seed), none in exclude_ids.

    Raises PersonaSourceError when the source is unreadable, has no personas, or has fewer than n left
    after exclusion (the message gives how many were asked, how many the source has, how many excluded).
    """
    where = _source_name(cfg)
    n = cfg.n
    if cfg.source == "builtin":
        size = builtin_size()
        if n > size:
            raise _too_few(n, where, size, 0)
        rows, seen, excluded = _take(_builtin_texts(seed, size), n, exclude_ids, where)
        if len(rows) < n:  # only after the whole space was drawn
            raise _too_few(n, where, seen, excluded)
        return rows
    pool = load_persona_pool(cfg)
    # Sorting by id first makes the sample independent of row order in the file.
    ids = sorted(pool)
    random.Random(seed).shuffle(ids)
    rows, _, _ = _take(((pid, pool[pid]) for pid in ids), n, exclude_ids, where)
    if len(rows) < n:
        raise _too_few(n, where, len(pool), sum(1 for pid in pool if pid in exclude_ids))
    return rows
