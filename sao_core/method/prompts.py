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
# Marks models put around a prompt, as (opening, closing). Only a pair that wraps the whole text is
# presentation: `"Hamlet" is a play` and `__init__` keep theirs. Longest emphasis run first, so that
# `**x**` is read as bold rather than as italics around `*x*`.
_EMPHASIS = ("***", "**", "*", "___", "__", "_")
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("`", "`"), ("“", "”"), ("‘", "’"), ("«", "»"))
_WRAPPERS = tuple((m, m) for m in _EMPHASIS) + _QUOTE_PAIRS
_APOSTROPHES = "'’"  # also a closing quote mark, except between two letters (don't, it’s)


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


def parse_prompt_output(text: str, finish_reason: str, prefill: str | None = None) -> ParsedPrompt:
    """Keep the text after the first `User prompt:`, less white space and the quotes or emphasis around it.

    Drops: `truncated` (the model hit max_tokens), `no_prefix`, `empty`, `prefill_only` (nothing after
    the request's `prefill` but spacing and punctuation: the model stopped at once), `echoes_template`
    (the text after the prefix is the instruction itself, a failure mode of small models).
    """
    if finish_reason == "length":
        return ParsedPrompt(None, "truncated")
    match = _PREFIX_RE.search(text or "")
    if match is None:
        return ParsedPrompt(None, "no_prefix")
    body = _close_label(text[: match.start()], text[match.end() :])
    body = unwrap_prompt(body)
    if not any(ch.isalnum() for ch in body):
        return ParsedPrompt(None, "empty")  # nothing, or marks only (a lone `"`)
    if prefill and normalize_prompt(body) == _prefill_words(prefill):
        return ParsedPrompt(None, "prefill_only")  # prefill "User prompt: As a", output "As a."
    if normalize_prompt(body).startswith(_ECHO):
        return ParsedPrompt(None, "echoes_template")  # small models repeat the instruction back
    return ParsedPrompt(body)


def _prefill_words(prefill: str) -> str | None:
    """What a prefill puts into the prompt itself ("as a" for "User prompt: As a"); None if nothing."""
    match = _PREFIX_RE.search(prefill)
    return normalize_prompt(prefill[match.end() :] if match else prefill) or None


def _close_label(before: str, body: str) -> str:
    """The body less the closing half of a mark opened before the label: `**User prompt:** ...`."""
    before = before.rstrip()
    for opening, closing in _WRAPPERS:
        if not before.endswith(opening):
            continue
        if body.startswith(closing):  # **User prompt:** text
            return body[len(closing) :]
        stripped = body.rstrip()
        inner = stripped[: -len(closing)]
        if stripped.endswith(closing) and _wraps(opening + inner + closing, opening, closing):
            return inner  # **User prompt: text**
        return body
    return body


def unwrap_prompt(text: str) -> str:
    """`text` stripped of white space and of quote or emphasis pairs around the whole of it, nested or not.

    A mark is only removed with its partner at the other end: `"Hamlet" is a play`, `__init__` and
    `**Bold** and **more**` are left as they are.
    """
    text = text.strip()
    while True:
        for opening, closing in _WRAPPERS:
            if _wraps(text, opening, closing):
                text = text[len(opening) : -len(closing)].strip()
                break
        else:
            return text


def _wraps(text: str, opening: str, closing: str) -> bool:
    """Whether `text` is one `opening ... closing` pair, the closing mark being the partner of the opening."""
    if len(text) < len(opening) + len(closing) or not text.startswith(opening) or not text.endswith(closing):
        return False
    inner = text[len(opening) : -len(closing)]
    if not inner.strip():
        return True  # a pair around nothing: `""`
    if opening in _EMPHASIS:
        mark = opening[0]
        # The same run inside makes the ends two spans (**a** and **b**), a mark next to an end a run of
        # another length (**a***); an underscored single word is a name (__init__, _id_), not emphasis.
        return not (
            opening in inner
            or mark in (inner[0], inner[-1])
            or (mark == "_" and re.fullmatch(r"\w+", inner) is not None)
        )
    depth = 1
    for i, ch in enumerate(inner):
        if (
            ch in _APOSTROPHES
            and 0 < i < len(inner) - 1
            and inner[i - 1].isalnum()
            and inner[i + 1].isalnum()
        ):
            continue
        if ch == closing:
            depth -= 1
        elif ch == opening:
            depth += 1
        if depth == 0:
            return False  # the opening mark closes before the end: "Hamlet" is a "play"
    return depth == 1


def normalize_prompt(text: str) -> str:
    """The key for near-duplicate detection: case, accents, punctuation and spacing folded."""
    # Accents go (NFKD splits them off as combining marks), letters of every script stay: an ASCII
    # fold would turn any Chinese or Russian prompt into "" and make them all duplicates of each other.
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


_ECHO = _echo_key()


def prompt_id(persona_id: str, prompt: str) -> str:
    return "pr-" + hashlib.sha256(f"{persona_id}\x1f{prompt}".encode()).hexdigest()[:16]


def parse_prompt_completions(
    personas: list[dict[str, Any]],
    completions: list[list[Completion]],
    round_index: int,
    prefill: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompt rows kept and dropped (with `drop_reason` and the raw output) for one shard.

    `prefill` is the one the requests were built with (`prompts.prefill`).
    """
    kept, dropped = [], []
    for persona, outs in zip(personas, completions, strict=True):
        out = outs[0]
        parsed = parse_prompt_output(out.text, out.finish_reason, prefill)
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
