"""Word n-gram decontamination: normalisation, short texts, streaming, counts and ids."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sao_core.method.decontaminate import (
    DEFAULT_N,
    build_ngram_index,
    check_prompts,
    find_overlaps,
    normalize_words,
    text_ngrams,
)

# Texts written for these tests. e1 has 18 words, e2 16, e3 is short (4 words).
EVAL = [
    (
        "e1",
        "Explain how a heat pump moves warmth from cold outdoor air into a house during the winter months.",
    ),
    ("e2", "Write a limerick about a forgetful wizard who keeps misplacing his spell book in the library."),
    ("e3", "Define photosynthesis in brief."),
]


def test_normalize_words_folds_case_punctuation_and_unicode() -> None:
    assert normalize_words("Don't STOP—now!!  ok_then") == ["don", "t", "stop", "now", "ok", "then"]
    assert normalize_words("Ｆｕｌｌ width, café.") == ["full", "width", "café"]  # NFKC folds full width
    assert normalize_words("  ...  ") == []


def test_text_ngrams_counts_and_short_texts() -> None:
    words = "one two three four five"
    assert text_ngrams(words, 3) == {
        ("one", "two", "three"),
        ("two", "three", "four"),
        ("three", "four", "five"),
    }
    assert text_ngrams(words, 5) == {("one", "two", "three", "four", "five")}
    assert text_ngrams(words, 6) == {("one", "two", "three", "four", "five")}  # short: one gram, the whole
    assert text_ngrams("", 3) == set()
    assert text_ngrams("a a a a", 2) == {("a", "a")}  # distinct grams
    with pytest.raises(ValueError, match="n must be >= 1"):
        text_ngrams(words, 0)


def test_a_copied_thirteen_word_span_is_flagged_and_a_paraphrase_is_not() -> None:
    index = build_ngram_index(EVAL)
    assert index.n == DEFAULT_N == 13
    # e1 has 18 words, so 6 13-grams; e2 has 16 words, so 4; e3 is short, 1 whole-text gram.
    assert len(index.grams) == 6 + 4 + 1
    assert (index.eval_prompts, index.short_eval_prompts) == (3, 1)
    prompts = [
        # Exactly e1's first 13 words inside a longer prompt, with different case and punctuation.
        ("s1", "Please: EXPLAIN how a heat-pump moves warmth from cold outdoor air, into a? Thanks"),
        # Only 12 of those words in a row: below n, no overlap.
        ("s2", "Tell me how a heat pump moves warmth from cold outdoor air into a flat."),
        # e2 verbatim: all 4 of its 13-grams.
        ("s3", EVAL[1][1]),
        ("s4", "Write a sonnet about a tidy wizard who never loses anything at all, ever."),
    ]
    hits = list(find_overlaps(index, prompts))
    assert [(h.prompt_id, h.matched_ngrams, h.eval_ids) for h in hits] == [
        ("s1", 1, ("e1",)),  # "explain how a heat pump moves warmth from cold outdoor air into a"
        ("s3", 4, ("e2",)),
    ]


def test_short_prompts_match_only_whole_short_texts() -> None:
    index = build_ngram_index(EVAL)
    prompts = [
        ("t1", "define PHOTOSYNTHESIS, in brief!"),  # equals e3 after normalisation: flagged
        ("t2", "Define photosynthesis"),  # a prefix of e3: a different whole text, not flagged
        ("t3", "Define photosynthesis in brief for a ten year old child who likes plants a lot"),  # 15 words
        ("t4", "heat pump"),  # inside e1, but short texts never match part of a longer one
        ("t5", "?!"),  # no words: never overlaps
        ("t6", ""),
    ]
    report = check_prompts(index, prompts)
    assert report.overlapping_ids == ("t1",)
    assert report.short_prompts == 3  # t1 t2 t4; t5 and t6 have no words, t3 has 15
    assert report.checked == 6


def test_short_texts_with_a_small_n() -> None:
    # With n = 2 a 1-word text is short: it matches only a 1-word evaluation text.
    index = build_ngram_index([("a", "Photosynthesis"), ("b", "light reactions explained")], n=2)
    report = check_prompts(index, [("x", "photosynthesis."), ("y", "Reactions explained!"), ("z", "light")])
    assert report.overlapping_ids == ("x", "y")
    assert report.eval_ids_hit == ("a", "b")


def test_report_counts_ids_and_is_json() -> None:
    index = build_ngram_index(EVAL)
    report = check_prompts(index, [("s3", EVAL[1][1]), ("s5", "Nothing alike here."), ("s6", EVAL[0][1])])
    assert report.overlapping == 2 and report.overlapping_ids == ("s3", "s6")
    assert report.matched_ngrams == 4 + 6
    assert report.overlap_share == pytest.approx(2 / 3)
    assert report.eval_ids_hit == ("e1", "e2")
    assert report.eval_ngrams == 11 and report.eval_prompts == 3
    assert json.loads(json.dumps(report.to_dict()))["overlapping_ids"] == ["s3", "s6"]
    empty = check_prompts(index, [])
    assert empty.checked == 0 and empty.overlap_share is None


def test_one_gram_shared_by_two_eval_prompts_names_both() -> None:
    shared = "the quick brown fox jumps over the lazy dog near the quiet river bank"
    index = build_ngram_index([("a", shared + " today"), ("b", "Yesterday " + shared)])
    hit = next(find_overlaps(index, [("s", shared)]))
    assert hit.eval_ids == ("a", "b")
    assert hit.matched_ngrams == 2  # the text's 14 words give two 13-grams, both in the index


def test_synthetic_prompts_are_read_one_at_a_time() -> None:
    index = build_ngram_index(EVAL)
    pulled: list[str] = []

    def stream() -> Iterator[tuple[str, str]]:
        for i in range(1_000):
            pulled.append(f"g{i}")
            yield f"g{i}", EVAL[1][1] if i == 2 else f"prompt number {i}"

    hits = find_overlaps(index, stream())
    assert next(hits).prompt_id == "g2"
    assert pulled == ["g0", "g1", "g2"]  # nothing past the first hit was read


def test_repeated_eval_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="'e1' appears twice"):
        build_ngram_index([("e1", "a"), ("e1", "b")])
