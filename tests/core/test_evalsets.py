"""The bundled evaluation sets load and are well-formed; loaders name the file and line of a bad row."""

from __future__ import annotations

import json
import tomllib
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sao_core.store.evalsets import (
    CATEGORIES,
    TRUST_KINDS,
    EvalSetError,
    judge_agreement,
    load_instructions,
    load_judge_trust,
    parse_instructions,
    parse_trust_items,
)
from sao_core.store.storage import write_text

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_instructions_are_many_unique_and_balanced() -> None:
    rows = load_instructions()
    assert len(rows) >= 120
    assert len({r.id for r in rows}) == len(rows)
    assert len({" ".join(r.instruction.lower().split()) for r in rows}) == len(rows)
    counts = Counter(r.category for r in rows)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 10 and max(counts.values()) <= 2 * min(counts.values())
    # The file interleaves the categories: any prefix is balanced, so `evaluation.n` can take the head.
    head = Counter(r.category for r in rows[: len(CATEGORIES)])
    assert set(head) == set(CATEGORIES)
    assert rows[0].as_prompt_row() == {"id": rows[0].id, "prompt": rows[0].instruction}


def test_bundled_instructions_are_not_one_template() -> None:
    # No opening of three words is shared by more than a handful of instructions.
    openings = Counter(" ".join(r.instruction.lower().split()[:3]) for r in load_instructions())
    assert openings.most_common(1)[0][1] <= 6


def test_bundled_judge_trust_set() -> None:
    items = load_judge_trust()
    assert len(items) >= 60
    assert len({i.id for i in items}) == len(items)
    assert all(i.better.strip() != i.worse.strip() for i in items)
    kinds = Counter(i.kind for i in items)
    assert set(kinds) == set(TRUST_KINDS)
    assert min(kinds.values()) >= 4


def test_package_data_ships_the_eval_files() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "data/**" in config["tool"]["setuptools"]["package-data"]["sao_core"]
    for name in ("instructions.jsonl", "judge_trust.jsonl"):
        assert (ROOT / "sao_core" / "data" / "eval" / name).is_file()


def test_loads_a_users_set_from_any_url(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "instruction": "Say hello.", "category": "greetings"},  # any category in a user's set
        {"id": "b", "instruction": "Count to three.", "category": "counting"},
    ]
    url = f"memory://evalsets-{uuid.uuid4().hex}/mine.jsonl"
    write_text(url, "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [(r.id, r.category) for r in load_instructions(url)] == [("a", "greetings"), ("b", "counting")]
    local = tmp_path / "trust.jsonl"
    local.write_text(
        json.dumps({"id": "t", "instruction": "2+2?", "better": "4", "worse": "5", "kind": "sums"}) + "\n",
        encoding="utf-8-sig",  # a byte-order mark is read past
    )
    assert load_judge_trust(str(local))[0].better == "4"


GOOD = {"id": "x1", "instruction": "Write a haiku.", "category": "writing"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], "line 1 is not JSON"),
        ([json.dumps(GOOD), "[1, 2]"], "line 2 holds list"),
        (
            [json.dumps({"id": "x1", "instruction": "Hi"})],
            r"line 1 must have exactly .* missing: \['category'\]",
        ),
        ([json.dumps({**GOOD, "extra": 1})], r"line 1 .* unknown: \['extra'\]"),
        ([json.dumps({**GOOD, "instruction": "   "})], "line 1: 'instruction' must be non-empty text"),
        ([json.dumps({**GOOD, "id": 7})], "line 1: 'id' must be non-empty text, got 7"),
        (
            [json.dumps({**GOOD, "category": " writing"})],
            "line 1: 'category' is ' writing', with white space",
        ),
        ([json.dumps(GOOD), "", json.dumps(GOOD)], "line 3: id 'x1' is already used on line 1"),
        (["", "  "], "is empty"),
    ],
)
def test_instruction_errors_name_the_file_and_line(lines: list[str], message: str) -> None:
    with pytest.raises(EvalSetError, match=message) as info:
        parse_instructions("\n".join(lines), "set.jsonl")
    assert str(info.value).startswith("set.jsonl")


def test_categories_and_kinds_are_checked_when_given() -> None:
    text = json.dumps({**GOOD, "category": "poetry"})
    with pytest.raises(EvalSetError, match=r"set\.jsonl: line 1: category 'poetry' is not one of writing"):
        parse_instructions(text, "set.jsonl", CATEGORIES)
    item = {"id": "t", "instruction": "Q", "better": "A", "worse": "B", "kind": "vibes"}
    with pytest.raises(EvalSetError, match="line 1: kind 'vibes' is not one of arithmetic"):
        parse_trust_items(json.dumps(item), "t.jsonl", TRUST_KINDS)


def test_trust_item_with_the_same_answer_twice_is_refused() -> None:
    good = {"id": "t1", "instruction": "Q", "better": "A", "worse": "B", "kind": "k"}
    same = {"id": "t2", "instruction": "Q", "better": "The  answer.", "worse": "The answer. ", "kind": "k"}
    with pytest.raises(EvalSetError, match=r"t\.jsonl: line 2: 'better' and 'worse' are the same answer"):
        parse_trust_items(f"{json.dumps(good)}\n{json.dumps(same)}", "t.jsonl")


def test_missing_and_unreadable_sources_name_the_url(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match=r"evaluation set .*nowhere\.jsonl does not exist"):
        load_instructions(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(EvalSetError, match="is a folder"):
        load_instructions(str(tmp_path))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "instruction": "caf\xe9", "category": "c"}\n')
    with pytest.raises(EvalSetError, match=r"latin1\.jsonl is not UTF-8"):
        load_instructions(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD) + "\n" + json.dumps({"id": "y"}) + "\n")
    with pytest.raises(EvalSetError, match=r"broken\.jsonl: line 2 must have exactly"):
        load_instructions(str(broken))


def test_judge_agreement_counts_by_hand() -> None:
    # (position chosen with better as Response 1, position chosen with worse as Response 1)
    verdicts = [(1, 2), (1, 1), (2, 2), (None, 2)]
    out = judge_agreement(verdicts)
    # Verdicts: 8, valid 7. For the better answer: item 1 both (2), item 2 first only (1), item 3 second
    # only (1), item 4 second (1) -> 5 of 8, the unparseable one counted wrong. Both orders right: item 1
    # only -> 1 of 4. Response 1 chosen, of the valid ones: 1, 1, 1 -> 3 of 7.
    assert out == {
        "items": 4,
        "verdicts": 8,
        "valid_verdicts": 7,
        "invalid_verdicts": 1,
        "correct_verdicts": 5,
        "agreement": pytest.approx(5 / 8),
        "valid_share": pytest.approx(7 / 8),
        "both_orders_correct": pytest.approx(1 / 4),
        "first_position_share": pytest.approx(3 / 7),
    }
    assert judge_agreement([])["agreement"] is None


def test_judge_agreement_counts_unparseable_verdicts_as_wrong() -> None:
    # Issue 17: 30 trust pairs, the judge parsed 2 of 60 verdicts, both right. Over valid verdicts that
    # was "100.0% on 30 labelled pairs"; over all of them it is 2 of 60.
    out = judge_agreement([(1, 2)] + [(None, None)] * 29)
    assert out["agreement"] == pytest.approx(2 / 60)
    assert (out["valid_verdicts"], out["valid_share"]) == (2, pytest.approx(2 / 60))
    with pytest.raises(ValueError, match="1, 2 or None"):
        judge_agreement([(3, 1)])


def test_hf_instructions_load_through_datasets_from_a_local_folder(tmp_path, monkeypatch) -> None:
    # The loading code the hub path uses, exercised offline on a folder laid out as a dataset repo.
    from sao_core.store.evalsets import load_eval_prompts

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "alpaca_like"
    (repo / "data").mkdir(parents=True)
    rows = [{"instruction": f"Explain idea {i} in one line.", "dataset": "helpful"} for i in range(5)]
    (repo / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_eval_prompts(f"hf:{repo}", 3)
    assert [p.instruction for p in got] == [r["instruction"] for r in rows[:3]]
    assert [p.id for p in got] == ["alpaca_like-0000", "alpaca_like-0001", "alpaca_like-0002"]
    assert {p.category for p in got} == {"helpful"}
    (repo / "data" / "eval.jsonl").write_text('{"prompt": "no instruction column"}\n')
    with pytest.raises(EvalSetError, match="no 'instruction' column"):
        load_eval_prompts(f"hf:{repo}")
    with pytest.raises(EvalSetError, match=r"hf:.*missing.*cannot load"):
        load_eval_prompts(f"hf:{tmp_path / 'missing'}")
