"""The evaluation's two model steps as pure functions: answer an instruction, judge a case both ways.

    requests = build_answer_requests(rows)              # rows of {id, instruction, category}
    kept = parse_answer_completions(rows, outs)         # {id, category, answer, finish_reason}
    requests = build_case_requests(cases, prefill)      # two per case: first shown first, then second
    verdicts = parse_case_completions(cases, outs, lenient)

A case is one pair of answers to compare: the candidate's and a baseline's to one instruction, or a
labelled trust pair (better, worse). Its verdicts say which position the judge preferred in each order
(None: no verdict), with the judge's text less verbatim copies of the inputs (judging.strip_quoted).
"""

from __future__ import annotations

from typing import Any

from sao_core.chat import ChatRequest, Completion
from sao_core.method.judging import format_judge_prompt, parse_verdict, strip_quoted

ORDERS = ("ab", "ba")  # the case's first answer shown as Response 1, then as Response 2


def build_answer_requests(rows: list[dict[str, Any]]) -> list[ChatRequest]:
    return [ChatRequest.user(r["id"], r["instruction"], kind="response") for r in rows]


def parse_answer_completions(
    rows: list[dict[str, Any]], outs: list[list[Completion]]
) -> list[dict[str, Any]]:
    return [
        {
            "id": r["id"],
            "category": r.get("category"),
            "answer": o[0].text,
            "finish_reason": o[0].finish_reason,
        }
        for r, o in zip(rows, outs, strict=True)
    ]


def build_case_requests(cases: list[dict[str, Any]], prefill: str | None) -> list[ChatRequest]:
    requests = []
    for c in cases:
        for order, one, two in (("ab", c["first"], c["second"]), ("ba", c["second"], c["first"])):
            text = format_judge_prompt(c["instruction"], one, two)
            # The id is the instruction's (and its order), as the judge's request seed has always been.
            requests.append(ChatRequest.user(f"{c['id']}:{order}", text, kind="judge", prefill=prefill or ""))
    return requests


def parse_case_completions(
    cases: list[dict[str, Any]], outs: list[list[Completion]], lenient: bool
) -> list[dict[str, Any]]:
    """One verdict row per case: the case less its texts, plus each order's preferred position and text."""
    rows = []
    for i, c in enumerate(cases):
        quoted = (c["instruction"], c["first"], c["second"])
        texts = [strip_quoted(outs[2 * i + k][0].text, quoted) for k in range(2)]
        row = {k: v for k, v in c.items() if k not in ("instruction", "first", "second")}
        row |= {"first_len": len(c["first"]), "second_len": len(c["second"])}  # characters
        for order, text in zip(ORDERS, texts, strict=True):
            row[f"position_{order}"] = parse_verdict(text, lenient).preferred_position
            row[f"verdict_{order}"] = text
        rows.append(row)
    return rows
