import difflib
import hashlib

import pytest

from sao_core.engines import Completion
from sao_core.prompts import (
    PROMPT_TEMPLATE,
    PromptDeduper,
    build_prompt_requests,
    normalize_prompt,
    parse_prompt_completions,
    parse_prompt_output,
)

# SAO.md, "One round" step 2: Persona Hub's prompt-synthesis template as the SAO paper reproduces it,
# copied character for character. The digest is that of SAO.md's text, so this copy cannot drift from it
# unnoticed; the copy itself is kept so that a failure shows what changed.
PAPER_PROMPT_TEMPLATE = """Guess a prompt that the following persona may ask you to do:

{persona}

Note:

1. The prompt should be informative and specific.
2. Your output should start with "User prompt:\""""
PAPER_PROMPT_TEMPLATE_SHA256 = "bb005c55e07d880e40a92e293ea5dfdb6ef39a313e211c67f5c8139c514964bb"


def test_template_is_the_papers():
    assert hashlib.sha256(PAPER_PROMPT_TEMPLATE.encode()).hexdigest() == PAPER_PROMPT_TEMPLATE_SHA256
    diff = difflib.ndiff(
        PAPER_PROMPT_TEMPLATE.splitlines(keepends=True), PROMPT_TEMPLATE.splitlines(keepends=True)
    )
    assert PROMPT_TEMPLATE == PAPER_PROMPT_TEMPLATE, (
        "PROMPT_TEMPLATE differs from the paper's (- paper, + ours):\n" + "".join(diff)
    )
    text = PROMPT_TEMPLATE.format(persona="A beekeeper.")
    assert text == PAPER_PROMPT_TEMPLATE.replace("{persona}", "A beekeeper.")


@pytest.mark.parametrize(
    ("text", "finish", "prompt", "reason"),
    [
        ("User prompt: How do I prune roses?", "stop", "How do I prune roses?", None),
        ('Sure!\nUser prompt: "Plan a 3-day trip to Rome."', "stop", "Plan a 3-day trip to Rome.", None),
        ("user PROMPT:   **Write a haiku**  ", "stop", "Write a haiku", None),
        ("User prompt: “Explain VAT.”", "stop", "Explain VAT.", None),
        ("User prompt: A. User prompt: B.", "stop", "A. User prompt: B.", None),  # first prefix only
        ("How do I prune roses?", "stop", None, "no_prefix"),
        ("", "stop", None, "no_prefix"),
        ("User prompt:", "stop", None, "empty"),
        ('User prompt: ""', "stop", None, "empty"),
        ("User prompt: How do I", "length", None, "truncated"),
        ("User prompt: Guess a prompt that the following persona may ask", "stop", None, "echoes_template"),
    ],
)
def test_parse_prompt_output(text, finish, prompt, reason):
    parsed = parse_prompt_output(text, finish)
    assert parsed.prompt == prompt
    assert parsed.drop_reason == reason


def test_requests_and_rows_carry_lineage():
    personas = [{"persona_id": "pe-1", "persona": "A chef."}, {"persona_id": "pe-2", "persona": "A pilot."}]
    reqs = build_prompt_requests(personas)
    assert [r.request_id for r in reqs] == ["pe-1", "pe-2"]
    assert "A chef." in reqs[0].messages[0].content and reqs[0].messages[0].role == "user"
    outs = [[Completion("User prompt: Cook pasta?", "stop")], [Completion("nothing", "stop")]]
    kept, dropped = parse_prompt_completions(personas, outs, round_index=3)
    assert kept[0]["persona_id"] == "pe-1" and kept[0]["prompt"] == "Cook pasta?" and kept[0]["round"] == 3
    assert kept[0]["prompt_id"].startswith("pr-")
    assert dropped == [
        {
            "persona_id": "pe-2",
            "persona": "A pilot.",
            "raw_output": "nothing",
            "finish_reason": "stop",
            "round": 3,
            "drop_reason": "no_prefix",
        }
    ]


def test_dedupe_exact_then_normalised_and_repetition_rate():
    d = PromptDeduper()
    assert d.offer("How do I bake bread?") is None
    assert d.offer("How do I bake bread?") == "duplicate_exact"
    assert d.offer("how do i BAKE bread") == "duplicate_normalized"
    assert d.offer("How do I bake a cake?") is None
    assert d.repetition_rate == pytest.approx(2 / 4)
    assert normalize_prompt("  Café,  au LAIT! ") == "cafe au lait"
    assert PromptDeduper().repetition_rate == 0.0
