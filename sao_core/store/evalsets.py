"""Evaluation sets: held-out instructions and a labelled judge-trust set, bundled or at any fsspec URL.

    instructions = load_instructions()            # 130 bundled instructions, 10 categories
    trust = load_judge_trust()                    # 75 bundled pairs where one answer is clearly better
    mine = load_instructions("s3://bucket/my_eval.jsonl")

Both are JSONL, one object per line, with exactly these fields (all non-empty text):
- instructions: id, instruction, category
- judge trust: id, instruction, better, worse, kind

The bundled files (sao_core/data/eval/, package data) were written for this project. Their lines interleave
the categories (kinds), so the first n rows of either file are as balanced as n allows. Every row is
validated; an error names the file and the line. A user's own set may use any categories and kinds; the
bundled ones use CATEGORIES and TRUST_KINDS.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sao_core.errors import SAOError
from sao_core.store.storage import read_input

__all__ = [
    "BUILTIN",
    "CATEGORIES",
    "TRUST_KINDS",
    "EvalInstruction",
    "EvalSetError",
    "TrustItem",
    "judge_agreement",
    "load_instructions",
    "load_judge_trust",
    "parse_instructions",
    "parse_trust_items",
]

BUILTIN = "builtin"
CATEGORIES = (
    "writing",
    "coding",
    "maths",
    "advice",
    "explanation",
    "brainstorm",
    "summarise",
    "classification",
    "rewrite",
    "planning",
)
TRUST_KINDS = (
    "arithmetic",  # right vs wrong arithmetic
    "factual",  # right vs wrong fact
    "off_topic",  # answers the question vs answers another one
    "truncated",  # complete vs cut off mid-sentence
    "format",  # follows an output format vs ignores it
    "constraint",  # meets a length, letter or count constraint vs breaks it
    "code",  # working code or command vs broken
    "language",  # answers in the language asked for vs another
    "reasoning",  # sound vs unsound reasoning
    "refusal",  # helps vs refuses a harmless request
    "faithfulness",  # summary true to the given text vs invents or contradicts it
)

_INSTRUCTION_FIELDS = ("id", "instruction", "category")
_TRUST_FIELDS = ("id", "instruction", "better", "worse", "kind")
_LABEL_FIELDS = ("id", "category", "kind")  # short labels: no surrounding white space either


class EvalSetError(SAOError, ValueError):
    """An evaluation set cannot be read, or one of its rows is malformed (the message names file and line)."""


@dataclass(frozen=True)
class EvalInstruction:
    """One held-out instruction, answered by both policies and judged."""

    id: str
    instruction: str
    category: str

    def as_prompt_row(self) -> dict[str, str]:
        """The {id, prompt} row of sao_core.evaluation.compare."""
        return {"id": self.id, "prompt": self.instruction}


@dataclass(frozen=True)
class TrustItem:
    """An instruction with two answers, one clearly better; a judge is trusted as far as it picks `better`."""

    id: str
    instruction: str
    better: str
    worse: str
    kind: str


def _rows(text: str, where: str, fields: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each non-blank line, every field present, known and non-empty text."""
    rows: list[tuple[int, dict[str, str]]] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where}: line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{at} is not JSON ({e})") from e
        if not isinstance(row, dict):
            raise EvalSetError(
                f"{at} holds {type(row).__name__}, not an object with fields {', '.join(fields)}"
            )
        missing = [f for f in fields if f not in row]
        unknown = sorted(str(k) for k in row if k not in fields)
        if missing or unknown:
            raise EvalSetError(
                f"{at} must have exactly the fields {', '.join(fields)}; missing: {missing}, unknown: {unknown}"
            )
        for name in fields:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise EvalSetError(f"{at}: {name!r} must be non-empty text, got {value!r}")
            if name in _LABEL_FIELDS and value != value.strip():
                raise EvalSetError(f"{at}: {name!r} is {value!r}, with white space around it")
        if row["id"] in first_line:
            raise EvalSetError(f"{at}: id {row['id']!r} is already used on line {first_line[row['id']]}")
        first_line[row["id"]] = lineno
        rows.append((lineno, row))
    if not rows:
        raise EvalSetError(f"{where} is empty: it has no rows")
    return rows


def _check_label(value: str, allowed: Collection[str] | None, at: str, name: str) -> None:
    if allowed is not None and value not in allowed:
        raise EvalSetError(f"{at}: {name} {value!r} is not one of {', '.join(allowed)}")


def parse_instructions(
    text: str, where: str, categories: Collection[str] | None = None
) -> list[EvalInstruction]:
    """The instructions of a JSONL text; `categories`, when given, is the set of allowed categories."""
    out = []
    for lineno, row in _rows(text, where, _INSTRUCTION_FIELDS):
        _check_label(row["category"], categories, f"{where}: line {lineno}", "category")
        out.append(EvalInstruction(row["id"], row["instruction"], row["category"]))
    return out


def parse_trust_items(text: str, where: str, kinds: Collection[str] | None = None) -> list[TrustItem]:
    """The judge-trust items of a JSONL text; `better` and `worse` must differ beyond white space."""
    out = []
    for lineno, row in _rows(text, where, _TRUST_FIELDS):
        at = f"{where}: line {lineno}"
        _check_label(row["kind"], kinds, at, "kind")
        if " ".join(row["better"].split()) == " ".join(row["worse"].split()):
            raise EvalSetError(f"{at}: 'better' and 'worse' are the same answer")
        out.append(TrustItem(row["id"], row["instruction"], row["better"], row["worse"], row["kind"]))
    return out


def _read(source: str, filename: str) -> tuple[str, str]:
    """(text, where) of a bundled file (source "builtin") or of the file at an fsspec URL."""
    if source == BUILTIN:
        resource = resources.files("sao_core") / "data" / "eval" / filename
        where = f"builtin evaluation set sao_core/data/eval/{filename}"
        try:
            data = resource.read_bytes()
        except FileNotFoundError as e:
            raise EvalSetError(
                f"{where} does not exist: sao_core was installed without its package data"
            ) from e
    else:
        where = f"evaluation set {source}"
        data = read_input(source, where, EvalSetError)
    try:
        return data.decode("utf-8-sig"), where
    except UnicodeDecodeError as e:
        raise EvalSetError(f"{where} is not UTF-8 text: {e}") from e


def load_instructions(source: str = BUILTIN) -> list[EvalInstruction]:
    """The bundled instructions ("builtin"), or a JSONL of {id, instruction, category} at an fsspec URL."""
    text, where = _read(source, "instructions.jsonl")
    return parse_instructions(text, where, CATEGORIES if source == BUILTIN else None)


def load_judge_trust(source: str = BUILTIN) -> list[TrustItem]:
    """The bundled judge-trust set ("builtin"), or a JSONL of {id, instruction, better, worse, kind} by URL."""
    text, where = _read(source, "judge_trust.jsonl")
    return parse_trust_items(text, where, TRUST_KINDS if source == BUILTIN else None)


def judge_agreement(verdicts: Iterable[tuple[int | None, int | None]]) -> dict[str, Any]:
    """How often a judge picks the better answer of trust items, each judged in both orders.

    Each element is (preferred position when `better` was Response 1, preferred position when `worse` was
    Response 1), a position being 1, 2 or None for an unparseable verdict. Shares are None when undefined.
    agreement: share of all 2 * items verdicts for the better answer (an unparseable verdict counts as
    wrong: a judge that says nothing on most items has not shown it can be trusted); both_orders_correct:
    share of items where both verdicts chose it; valid_share: share of verdicts that parsed;
    first_position_share: share of valid verdicts for Response 1 (a bias measure, so over valid ones).
    """
    items = valid = correct = both = first = 0
    for better_first, worse_first in verdicts:
        items += 1
        ok = []
        for position, better_position in ((better_first, 1), (worse_first, 2)):
            if position is None:
                ok.append(False)
                continue
            if position not in (1, 2):
                raise ValueError(f"item {items}: preferred position must be 1, 2 or None, got {position!r}")
            valid += 1
            first += position == 1
            ok.append(position == better_position)
            correct += position == better_position
        both += all(ok)
    return {
        "items": items,
        "verdicts": 2 * items,
        "valid_verdicts": valid,
        "invalid_verdicts": 2 * items - valid,
        "correct_verdicts": correct,
        "agreement": correct / (2 * items) if items else None,
        "valid_share": valid / (2 * items) if items else None,
        "both_orders_correct": both / items if items else None,
        "first_position_share": first / valid if valid else None,
    }


HF_PREFIX = "hf:"


def load_eval_prompts(source: str, n: int | None = None) -> list[EvalInstruction]:
    """The first n instructions of the set: "builtin", a JSONL URL, or hf:DATASET[:SUBSET]."""
    items = _load_hf_instructions(source) if source.startswith(HF_PREFIX) else load_instructions(source)
    return items[:n] if n is not None else items


def _load_hf_instructions(source: str) -> list[EvalInstruction]:
    """Instructions of a Hugging Face dataset (an id, or a local folder as the hub would serve it): its
    "eval" split, or its only split; the "instruction" column."""
    import datasets

    name, _, subset = source[len(HF_PREFIX) :].partition(":")
    where = f"evaluation.prompts {source}"
    try:
        # datasets 4 and later run no loading scripts; said explicitly, so no version's default decides.
        splits = datasets.load_dataset(name, subset or None, trust_remote_code=False)
    except Exception as e:  # no network, no such dataset: say which
        raise EvalSetError(f"{where}: cannot load: {type(e).__name__}: {e}") from e
    # AlpacaEval names its split "eval"; a folder of files has the split its file names give.
    if "eval" in splits:
        ds = splits["eval"]
    elif len(splits) == 1:
        ds = next(iter(splits.values()))
    else:
        raise EvalSetError(f"{where}: no 'eval' split and more than one other ({', '.join(splits)})")
    if "instruction" not in ds.column_names:
        raise EvalSetError(f"{where}: no 'instruction' column (columns: {', '.join(ds.column_names)})")
    out = []
    for i, row in enumerate(ds):
        text = row["instruction"]
        if not isinstance(text, str) or not text.strip():
            raise EvalSetError(f"{where}: row {i} has an empty instruction")
        category = str(row.get("dataset") or "hf")
        out.append(EvalInstruction(f"{name.rsplit('/', 1)[-1]}-{i:04d}", text, category))
    if not out:
        raise EvalSetError(f"{where}: the 'eval' split is empty")
    return out
