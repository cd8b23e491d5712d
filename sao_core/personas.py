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
same seed, and file sampling does not depend on the order of rows in the file. `iter_personas` gives the
same rows one at a time, so a round of 100k builtin personas is written shard by shard, never held whole.

Rows of a file or hf source that cannot be personas are left out and counted by reason (`drops`): empty,
duplicate (the same text as an earlier row, white space folded: a file's own id column is not read),
too_long (over MAX_PERSONA_CHARS: a document in a cell, not a persona). Control characters are removed.
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
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any

import yaml

from sao_core.config import PersonasConfig
from sao_core.errors import PersonaSourceError
from sao_core.storage import read_input

__all__ = [
    "builtin_attributes",
    "builtin_lists",
    "builtin_persona",
    "builtin_size",
    "iter_personas",
    "load_persona_pool",
    "normalize_persona",
    "persona_id",
    "read_persona_file",
    "sample_personas",
]


# Persona Hub's personas are a sentence or two (under 600 characters); a longer text is a broken row (a
# whole document in one cell) and would crowd the persona out of the prompt writer's context.
MAX_PERSONA_CHARS = 2000


def normalize_persona(text: str) -> str:
    """The persona text with runs of white space (newlines included) folded to one space, and control
    characters (NUL, ESC of escape sequences, DEL) and lone surrogates (a JSON "\\ud800" escape, which no
    shard could store as UTF-8) removed."""
    text = " ".join(text.split())
    if text.isprintable():
        return text
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs"))


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
        f"persona source {where} has {builtin_size()} personas; sample it, do not load it"
    )


# --- sampling ----------------------------------------------------------------------------------------


def _too_few(n: int, where: str, size: int, excluded: int) -> PersonaSourceError:
    return PersonaSourceError(
        f"asked for {n} personas but {where} has {size} distinct personas, {excluded} of them excluded "
        f"as used by earlier rounds ({size - excluded} left); lower personas.n or use a larger source"
    )


def _draw(
    order: Iterable[tuple[str, str]], n: int, exclude_ids: AbstractSet[str], where: str
) -> Iterator[dict[str, str]]:
    """The first n personas of `order` (distinct ids) not excluded, one at a time; PersonaSourceError,
    with how many were drawn and excluded, when `order` ends first."""
    given = drawn = excluded = 0
    for pid, text in order:
        drawn += 1
        if pid in exclude_ids:
            excluded += 1
            continue
        yield {"persona_id": pid, "persona": text, "source": where}
        given += 1
        if given == n:
            return
    raise _too_few(n, where, drawn, excluded)


def _builtin_texts(seed: int, size: int) -> Iterator[tuple[str, str]]:
    # Distinct indices give distinct texts (_read_builtin_lists checks the lists), so distinct ids.
    for index in _builtin_order(seed, size):
        text = builtin_persona(index)
        yield persona_id(text), text


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
        size = builtin_size()
        if cfg.n > size:
            raise _too_few(cfg.n, where, size, 0)
        yield from _draw(_builtin_texts(seed, size), cfg.n, exclude_ids, where)
        return
    pool = load_persona_pool(cfg, drops)
    # Sorting by id first makes the sample independent of row order in the file.
    ids = sorted(pool)
    random.Random(seed).shuffle(ids)
    yield from _draw(((pid, pool[pid]) for pid in ids), cfg.n, exclude_ids, where)


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
