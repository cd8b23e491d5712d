"""Pairing (SAO.md step 5): valid judgements become TRL conversational preference rows.

    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}

plus lineage columns, so every pair can be traced back to its persona, prompt, answers and verdict.
"""

from __future__ import annotations

from typing import Any


def select_pairs(
    judgements: list[dict[str, Any]],
    responses: list[dict[str, Any]],
    config_hash: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs kept, and judgements dropped with a reason (invalid verdict, missing or equal answers, a
    second judgement of a prompt already paired: one prompt gives at most one pair)."""
    by_prompt = {row["prompt_id"]: row for row in responses}
    kept, dropped = [], []
    paired: set[str] = set()
    for j in judgements:

        def drop(reason: str, j: dict[str, Any] = j) -> None:
            dropped.append(
                {
                    "prompt_id": j["prompt_id"],
                    "drop_reason": reason,
                    "raw_judge_output": j.get("raw_judge_output"),
                }
            )

        if not j.get("valid"):
            drop(f"invalid_judgement:{j.get('invalid_reason') or 'unknown'}")
            continue
        row = by_prompt.get(j["prompt_id"])
        answers = {r["response_id"]: r for r in row["responses"]} if row else {}
        chosen = answers.get(j["chosen_response_id"])
        rejected = answers.get(j["rejected_response_id"])
        if row is None or chosen is None or rejected is None:
            drop("missing_responses")
            continue
        if chosen["text"].strip() == rejected["text"].strip():
            drop("identical")  # equal answers carry no preference signal
            continue
        if row["prompt_id"] in paired:
            drop("duplicate_judgement")
            continue
        paired.add(row["prompt_id"])
        kept.append(
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": chosen["text"]}],
                "rejected": [{"role": "assistant", "content": rejected["text"]}],
                "persona_id": row["persona_id"],
                "prompt_id": row["prompt_id"],
                "chosen_response_id": chosen["response_id"],
                "rejected_response_id": rejected["response_id"],
                "raw_judge_output": j["raw_judge_output"],
                "round": row["round"],
                "config_hash": config_hash,
            }
        )
    return kept, dropped
