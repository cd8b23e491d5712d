import difflib
import hashlib

import pytest

from sao_core.engines import Completion
from sao_core.method.prompts import (
    PROMPT_TEMPLATE,
    PromptDeduper,
    build_prompt_requests,
    normalize_prompt,
    parse_prompt_completions,
    parse_prompt_output,
    unwrap_prompt,
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
        # Marks are only presentation as a pair around the whole prompt.
        ('User prompt: "Hamlet" is a play', "stop", '"Hamlet" is a play', None),
        ("User prompt: Explain __init__", "stop", "Explain __init__", None),
        ('User prompt: **"Plan a trip."**', "stop", "Plan a trip.", None),
        ('User prompt: "', "stop", None, "empty"),  # a lone mark is nothing
        ("User prompt: ** **", "stop", None, "empty"),
        # The label's own markup: its closing half after the colon, or the pair around label and prompt.
        ('**User prompt:** "Write a limerick."', "stop", "Write a limerick.", None),
        ("**User prompt: Write a limerick.**", "stop", "Write a limerick.", None),
        ('"User prompt: Write a limerick."', "stop", "Write a limerick.", None),
        ("*User prompt:* _Write a limerick._", "stop", "Write a limerick.", None),
        ('Sure! "User prompt:" "Write a limerick."', "stop", "Write a limerick.", None),
        ("User prompt: 写一首关于秋天的诗。", "stop", "写一首关于秋天的诗。", None),
    ],
)
def test_parse_prompt_output(text, finish, prompt, reason):
    parsed = parse_prompt_output(text, finish)
    assert parsed.prompt == prompt
    assert parsed.drop_reason == reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Balanced pairs around the whole text go, nested or not.
        ('"Write a poem."', "Write a poem."),
        ("'Write a poem.'", "Write a poem."),
        ("`ls -la`", "ls -la"),
        ("“Explain VAT.”", "Explain VAT."),
        ("‘Explain VAT.’", "Explain VAT."),
        ("« Explique la TVA. »", "Explique la TVA."),
        ("*Write a poem.*", "Write a poem."),
        ("**Write a poem.**", "Write a poem."),
        ("***Write a poem.***", "Write a poem."),
        ("_Write a poem._", "Write a poem."),
        ("__Write a poem.__", "Write a poem."),
        ('**"Write a poem."**', "Write a poem."),
        ('"**Write a poem.**"', "Write a poem."),
        ('  ** " Write a poem. " **  ', "Write a poem."),
        ("_“‘Deep’”_", "Deep"),
        ('""', ""),
        ("****", ""),
        ("   ", ""),
        # Marks inside are content.
        ("\"Explain 'duck typing'\"", "Explain 'duck typing'"),
        ("**Write a *short* poem**", "Write a *short* poem"),
        ("'Don't stop'", "Don't stop"),
        ("‘It’s late’", "It’s late"),
        ("“A “nested” quote”", "A “nested” quote"),
        # Unbalanced or not one pair: left alone.
        ('"Hamlet" is a play', '"Hamlet" is a play'),
        ('Read "Hamlet"', 'Read "Hamlet"'),
        ('"Hamlet" and "Macbeth"', '"Hamlet" and "Macbeth"'),
        ("“Hamlet” and “Macbeth”", "“Hamlet” and “Macbeth”"),
        ('"Write a poem.', '"Write a poem.'),
        ('Write a poem."', 'Write a poem."'),
        ('“Write a poem."', '“Write a poem."'),
        ("**Bold** and **more**", "**Bold** and **more**"),
        ("*Write a **bold** poem*", "*Write a **bold** poem*"),
        ("**Write a poem.*", "**Write a poem.*"),
        ("**Write a poem.***", "**Write a poem.***"),
        ("Write a poem**", "Write a poem**"),
        ("__init__", "__init__"),
        ("_private_", "_private_"),
        ("Explain __init__", "Explain __init__"),
        ("__init__ vs __new__", "__init__ vs __new__"),
        ("_use snake_case names_", "_use snake_case names_"),
        ("'The students' exams'", "'The students' exams'"),
        ("2 * 3 * 4", "2 * 3 * 4"),
    ],
)
def test_unwrap_prompt(text, expected):
    assert unwrap_prompt(text) == expected


@pytest.mark.parametrize(
    ("text", "finish", "prompt", "reason"),
    [
        ("User prompt: As a", "stop", None, "prefill_only"),  # the model stopped at once
        ("User prompt: As a ", "stop", None, "prefill_only"),
        ("User prompt: As a...", "stop", None, "prefill_only"),
        ("User prompt: As a\n\n", "stop", None, "prefill_only"),
        ('User prompt: As a "', "stop", None, "prefill_only"),
        ("User prompt: As a —?", "stop", None, "prefill_only"),
        ("User prompt: **As a**", "stop", None, "prefill_only"),
        ("User prompt: as A.", "stop", None, "prefill_only"),
        ("User prompt: As a chef?", "stop", "As a chef?", None),
        (
            "User prompt: As a beekeeper, how do I calm bees?",
            "stop",
            "As a beekeeper, how do I calm bees?",
            None,
        ),
        ("User prompt:", "stop", None, "empty"),
        ("User prompt: As a", "length", None, "truncated"),
        ("As a", "stop", None, "no_prefix"),
    ],
)
def test_prompt_that_is_only_the_prefill_is_dropped(text, finish, prompt, reason):
    parsed = parse_prompt_output(text, finish, prefill="User prompt: As a")
    assert (parsed.prompt, parsed.drop_reason) == (prompt, reason)


def test_prefill_only_needs_the_prefill():
    # Without a prefill (or with one that adds nothing to the prompt) a short prompt is the model's own.
    assert parse_prompt_output("User prompt: As a", "stop").prompt == "As a"
    assert parse_prompt_output("User prompt: As a", "stop", prefill="User prompt:").prompt == "As a"
    assert parse_prompt_output("User prompt:", "stop", prefill="User prompt:").drop_reason == "empty"


def test_prefill_only_rows_are_dropped_with_their_reason():
    personas = [{"persona_id": f"pe-{i}", "persona": "A chef."} for i in range(3)]
    outs = [
        [Completion("User prompt: As a", "stop")],
        [Completion("User prompt: As a.", "stop")],
        [Completion("User prompt: As a chef, what knife should I buy?", "stop")],
    ]
    kept, dropped = parse_prompt_completions(personas, outs, round_index=1, prefill="User prompt: As a")
    assert [r["prompt"] for r in kept] == ["As a chef, what knife should I buy?"]
    # The reason is what the runner counts into the shard manifest's `drops`.
    assert [(d["persona_id"], d["drop_reason"], d["raw_output"]) for d in dropped] == [
        ("pe-0", "prefill_only", "User prompt: As a"),
        ("pe-1", "prefill_only", "User prompt: As a."),
    ]


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


def test_prompts_in_other_scripts_are_not_duplicates_of_each_other():
    assert normalize_prompt("Напиши стихотворение!") == "напиши стихотворение"
    assert normalize_prompt("写一首诗。") == "写一首诗"
    d = PromptDeduper()
    assert d.offer("写一首诗。") is None
    assert d.offer("Напиши стихотворение.") is None
    assert d.offer("写一首诗") == "duplicate_normalized"


def test_prefill_through_the_fake_engine_keeps_real_prompts():
    from sao_core.config import FakeEngineConfig
    from sao_core.engines import Sampling
    from sao_core.engines.fake import FakeEngine

    personas = [{"persona_id": f"pe-{i}", "persona": f"A cook from town {i}."} for i in range(8)]
    reqs = build_prompt_requests(personas, prefill="User prompt: As a")
    assert all(r.prefill == "User prompt: As a" for r in reqs)
    outs = FakeEngine(FakeEngineConfig(truncate_rate=0.0, missing_prefix_rate=0.0)).generate(
        reqs, Sampling(0.6, 0.95, 64)
    )
    kept, dropped = parse_prompt_completions(personas, outs, round_index=1, prefill="User prompt: As a")
    assert dropped == [] and len(kept) == 8
    assert all(
        r["prompt"].startswith("As a ") and r["raw_output"].startswith("User prompt: As a") for r in kept
    )
