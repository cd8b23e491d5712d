"""Responses (SAO.md step 3): the same model answers each prompt k >= 2 times.

A prompt survives when at least two of its answers are complete (not truncated, not empty) and
distinct; otherwise it is dropped as `truncated`, `empty` or `identical`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from sao_core.chat import ChatRequest, Completion


def build_response_requests(prompts: Iterable[dict[str, Any]], k: int) -> list[ChatRequest]:
    """One chat per prompt row, sampled k times (the model's chat template, generation prompt added)."""
    return [ChatRequest.user(row["prompt_id"], row["prompt"], n=k, kind="response") for row in prompts]


def response_id(prompt_id: str, index: int) -> str:
    return "rs-" + hashlib.sha256(f"{prompt_id}\x1f{index}".encode()).hexdigest()[:16]


def select_responses(outs: list[Completion]) -> tuple[list[int], str | None]:
    """Indices of the usable, distinct answers; a drop reason when fewer than two remain."""
    reason = None
    usable = []
    seen: set[str] = set()
    for i, out in enumerate(outs):
        text = out.text.strip()
        if out.finish_reason == "length":
            reason = reason or "truncated"
        elif not text:
            reason = reason or "empty"
        elif text in seen:
            reason = reason or "identical"
        else:
            seen.add(text)
            usable.append(i)
    if len(usable) >= 2:
        return usable, None
    return usable, reason or "too_few_responses"


def parse_response_completions(
    prompts: list[dict[str, Any]], completions: list[list[Completion]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Response rows (one per prompt, holding its usable answers) kept and dropped for one shard."""
    kept, dropped = [], []
    for row, outs in zip(prompts, completions, strict=True):
        answers = [
            {
                "response_id": response_id(row["prompt_id"], i),
                "text": out.text.strip(),
                "finish_reason": out.finish_reason,
                "completion_tokens": out.completion_tokens,
            }
            for i, out in enumerate(outs)
        ]
        usable, reason = select_responses(outs)
        base = {
            "prompt_id": row["prompt_id"],
            "persona_id": row["persona_id"],
            "prompt": row["prompt"],
            "round": row["round"],
        }
        if reason is None:
            kept.append({**base, "responses": [answers[i] for i in usable]})
        else:
            dropped.append({**base, "responses": answers, "drop_reason": reason})
    return kept, dropped
