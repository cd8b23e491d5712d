"""Personas (SAO.md step 1): what a persona is, the builtin persona space, and how n are drawn.

    persona_id("A beekeeper who writes poems.")   # "pe-" + 16 hex digits of the normalised text
    builtin_persona(12345)                        # one persona of the builtin space, by index
    draw_personas(order, n, exclude_ids, where)   # the first n of a seeded order, used ids skipped

The `builtin` space is generated from attribute lists shipped as package data
(sao_core/data/personas/builtin.yaml: sentence template, occupation, experience, trait, interest, goal,
life context). A mixed-radix index maps to one persona, so sampling never materialises the space; no
download, no third-party licence.

Every source is sampled the same way: a seeded permutation of its distinct personas, skipping the ids of
personas used by earlier rounds (exclude_ids), first n kept. So a larger n extends a smaller one with the
same seed. Reading a persona file or dataset, and `sample_personas` over any source, live in
sao_core.stages.persona_sources; this module reads no store.
"""

from __future__ import annotations

import functools
import hashlib
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

import yaml

from sao_core.errors import PersonaSourceError

__all__ = [
    "builtin_attributes",
    "builtin_lists",
    "builtin_persona",
    "builtin_size",
    "builtin_texts",
    "draw_personas",
    "normalize_persona",
    "persona_id",
    "too_few",
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


# --- sampling ----------------------------------------------------------------------------------------


def too_few(n: int, where: str, size: int, excluded: int) -> PersonaSourceError:
    return PersonaSourceError(
        f"asked for {n} personas but {where} has {size} distinct personas, {excluded} of them excluded "
        f"as used by earlier rounds ({size - excluded} left); lower personas.n or use a larger source"
    )


def draw_personas(
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
    raise too_few(n, where, drawn, excluded)


def builtin_texts(seed: int, size: int) -> Iterator[tuple[str, str]]:
    # Distinct indices give distinct texts (_read_builtin_lists checks the lists), so distinct ids.
    for index in _builtin_order(seed, size):
        text = builtin_persona(index)
        yield persona_id(text), text
