"""Prompt synthesis (SAO.md step 2): each persona asks the model for a prompt it might write.

build_prompt_requests -> engine -> parse_prompt_output per completion -> dedupe_prompts across the round.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sao_core.chat import ChatRequest, Completion

# Verbatim from Persona Hub as reproduced in the SAO paper (SAO.md step 2). Do not edit.
PROMPT_TEMPLATE = """Guess a prompt that the following persona may ask you to do:

{persona}

Note:

1. The prompt should be informative and specific.
2. Your output should start with "User prompt:\""""

_PREFIX_RE = re.compile(r"user prompt\s*:", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


def _echo_key() -> str:
    # The template's opening words ("guess a prompt that the following persona").
    return " ".join(normalize_prompt(PROMPT_TEMPLATE).split()[:7])


def build_prompt_requests(
    personas: Iterable[dict[str, Any]], prefill: str | None = None
) -> list[ChatRequest]:
    """One single-turn chat per persona row ({persona_id, persona}), optionally with an answer prefill."""
    return [
        ChatRequest.user(
            row["persona_id"],
            PROMPT_TEMPLATE.format(persona=row["persona"]),
            kind="prompt",
            prefill=prefill or "",
        )
        for row in personas
    ]


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str | None  # None when dropped
    drop_reason: str | None = None


def parse_prompt_output(text: str, finish_reason: str) -> ParsedPrompt:
    """Keep the text after the first `User prompt:`, stripped of quotes and white space.

    Drops: `truncated` (the model hit max_tokens), `no_prefix`, `empty`, `echoes_template` (the text
    after the prefix is the instruction itself, a failure mode of small models).
    """
    if finish_reason == "length":
        return ParsedPrompt(None, "truncated")
    match = _PREFIX_RE.search(text or "")
    if match is None:
        return ParsedPrompt(None, "no_prefix")
    body = text[match.end() :]
    # Quotes, markdown emphasis (**...**) and spacing around the prompt are presentation, not content.
    previous = None
    while body != previous:
        previous = body
        body = body.strip().strip("*_").strip(_QUOTES)
    if not body:
        return ParsedPrompt(None, "empty")
    if normalize_prompt(body).startswith(_ECHO):
        return ParsedPrompt(None, "echoes_template")  # small models repeat the instruction back
    return ParsedPrompt(body)


def normalize_prompt(text: str) -> str:
    """The key for near-duplicate detection: case, accents, punctuation and spacing folded."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


_ECHO = _echo_key()


def prompt_id(persona_id: str, prompt: str) -> str:
    return "pr-" + hashlib.sha256(f"{persona_id}\x1f{prompt}".encode()).hexdigest()[:16]


def parse_prompt_completions(
    personas: list[dict[str, Any]], completions: list[list[Completion]], round_index: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompt rows kept and dropped (with `drop_reason` and the raw output) for one shard."""
    kept, dropped = [], []
    for persona, outs in zip(personas, completions, strict=True):
        out = outs[0]
        parsed = parse_prompt_output(out.text, out.finish_reason)
        base = {
            "persona_id": persona["persona_id"],
            "persona": persona["persona"],
            "raw_output": out.text,
            "finish_reason": out.finish_reason,
            "round": round_index,
        }
        if parsed.prompt is None:
            dropped.append({**base, "drop_reason": parsed.drop_reason})
        else:
            kept.append(
                {
                    "prompt_id": prompt_id(persona["persona_id"], parsed.prompt),
                    "prompt": parsed.prompt,
                    **base,
                }
            )
    return kept, dropped


class PromptDeduper:
    """Removes exact and normalised-text duplicates in the order rows are offered (first one wins)."""

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.normalized: set[str] = set()
        self.seen = 0
        self.repeats = 0

    def offer(self, prompt: str) -> str | None:
        """None if new (and remembered), else the drop reason."""
        self.seen += 1
        norm = normalize_prompt(prompt)
        if prompt in self.exact:
            self.repeats += 1
            return "duplicate_exact"
        if norm in self.normalized:
            self.repeats += 1
            return "duplicate_normalized"
        self.exact.add(prompt)
        self.normalized.add(norm)
        return None

    @property
    def repetition_rate(self) -> float:
        """Share of parsed prompts that repeat an earlier one (the paper's "repeated prompts")."""
        return self.repeats / self.seen if self.seen else 0.0
