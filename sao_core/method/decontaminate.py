"""Decontamination: which synthetic prompts share a word n-gram with an evaluation prompt (SAO.md, weak points).

    index = build_ngram_index([(row["id"], row["instruction"]) for row in eval_rows], n=13)
    for hit in find_overlaps(index, ((r["prompt_id"], r["prompt"]) for r in prompt_rows)):
        ...  # hit.prompt_id, hit.matched_ngrams, hit.eval_ids
    report = check_prompts(index, prompt_pairs)  # counts and ids, for a manifest

The evaluation side is indexed once; synthetic prompts are then checked one at a time, so a stream of any
length needs memory for the index only. Text is normalised the same way on both sides: Unicode NFKC,
lower case, and every run of characters that are not letters or digits (punctuation, underscores, white
space) is one word break, so "Don't" and "don t" are the same two words.

Short texts: a text with fewer than n words (but at least one) contributes a single gram, its whole word
sequence. Such a gram is shorter than n and can only equal another short text's whole sequence, so a short
synthetic prompt is flagged exactly when it equals (after normalisation) a short evaluation prompt, and a
short text never matches part of a longer one. A text with no words has no grams and never overlaps.
The default n = 13 follows GPT-3's contamination study (Brown et al. 2020, appendix C).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_N",
    "DecontaminationReport",
    "NgramIndex",
    "Overlap",
    "build_ngram_index",
    "check_prompts",
    "find_overlaps",
    "normalize_words",
    "text_ngrams",
]

DEFAULT_N = 13
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; everything else separates words

Gram = tuple[str, ...]


def normalize_words(text: str) -> list[str]:
    """The words of `text`: NFKC, lower-cased, split on every run of non-alphanumeric characters."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def text_ngrams(text: str, n: int = DEFAULT_N) -> set[Gram]:
    """The distinct word n-grams of `text`; a text of 1..n-1 words gives one gram, its whole sequence."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _word_ngrams(normalize_words(text), n)


def _word_ngrams(words: list[str], n: int) -> set[Gram]:
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class NgramIndex:
    """The n-grams of an evaluation set, each with the ids of the evaluation prompts that contain it."""

    n: int
    grams: dict[Gram, tuple[str, ...]] = field(repr=False)
    eval_prompts: int
    short_eval_prompts: int  # evaluation prompts of fewer than n words, indexed whole

    def match(self, text: str) -> tuple[int, tuple[str, ...]]:
        """(number of distinct n-grams of `text` found in the index, sorted ids of the prompts they hit)."""
        return self._match_words(normalize_words(text))

    def _match_words(self, words: list[str]) -> tuple[int, tuple[str, ...]]:
        found = [self.grams[g] for g in _word_ngrams(words, self.n) if g in self.grams]
        return len(found), tuple(sorted({i for ids in found for i in ids}))


def build_ngram_index(eval_prompts: Iterable[tuple[str, str]], n: int = DEFAULT_N) -> NgramIndex:
    """Index (id, text) evaluation prompts by their word n-grams (see the module docstring for short texts)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: dict[Gram, list[str]] = {}
    count = short = 0
    seen: set[str] = set()
    for eval_id, text in eval_prompts:
        if eval_id in seen:
            raise ValueError(f"evaluation prompt id {eval_id!r} appears twice")
        seen.add(eval_id)
        count += 1
        own = text_ngrams(text, n)
        short += any(len(g) < n for g in own)
        for g in own:
            grams.setdefault(g, []).append(eval_id)
    return NgramIndex(n, {g: tuple(ids) for g, ids in grams.items()}, count, short)


@dataclass(frozen=True)
class Overlap:
    """A synthetic prompt that shares `matched_ngrams` distinct n-grams with the evaluation prompts `eval_ids`."""

    prompt_id: str
    matched_ngrams: int
    eval_ids: tuple[str, ...]


def find_overlaps(index: NgramIndex, prompts: Iterable[tuple[str, str]]) -> Iterator[Overlap]:
    """Yield an Overlap for each (id, text) synthetic prompt that shares an n-gram with the index, lazily."""
    for prompt_id, text in prompts:
        matched, eval_ids = index.match(text)
        if matched:
            yield Overlap(prompt_id, matched, eval_ids)


@dataclass(frozen=True)
class DecontaminationReport:
    """Counts and ids of a check of synthetic prompts against an evaluation set."""

    n: int
    eval_prompts: int
    eval_ngrams: int
    checked: int
    short_prompts: int  # synthetic prompts of 1..n-1 words, compared whole
    overlapping: int
    overlap_share: float | None
    matched_ngrams: int  # summed over overlapping prompts
    overlapping_ids: tuple[str, ...]
    eval_ids_hit: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["overlapping_ids"] = list(self.overlapping_ids)
        out["eval_ids_hit"] = list(self.eval_ids_hit)
        return out


def check_prompts(index: NgramIndex, prompts: Iterable[tuple[str, str]]) -> DecontaminationReport:
    """Check a stream of (id, text) synthetic prompts; the report lists overlapping ids in input order."""
    checked = short = matched = 0
    ids: list[str] = []
    hit: set[str] = set()
    for prompt_id, text in prompts:
        checked += 1
        words = normalize_words(text)
        short += 0 < len(words) < index.n
        count, eval_ids = index._match_words(words)
        if count:
            ids.append(prompt_id)
            matched += count
            hit.update(eval_ids)
    return DecontaminationReport(
        n=index.n,
        eval_prompts=index.eval_prompts,
        eval_ngrams=len(index.grams),
        checked=checked,
        short_prompts=short,
        overlapping=len(ids),
        overlap_share=len(ids) / checked if checked else None,
        matched_ngrams=matched,
        overlapping_ids=tuple(ids),
        eval_ids_hit=tuple(sorted(hit)),
    )
