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
    """Pairs kept, and judgements dropped with a reason (invalid verdict, missing or equal answers)."""
    by_prompt = {row["prompt_id"]: row for row in responses}
    kept, dropped = [], []
    for j in judgements:
        row = by_prompt.get(j["prompt_id"])
        reason = None
        if not j.get("valid"):
            reason = f"invalid_judgement:{j.get('invalid_reason') or 'unknown'}"
        elif row is None:
            reason = "missing_responses"
        else:
            answers = {r["response_id"]: r for r in row["responses"]}
            chosen = answers.get(j["chosen_response_id"])
            rejected = answers.get(j["rejected_response_id"])
            if chosen is None or rejected is None:
                reason = "missing_responses"
            elif chosen["text"].strip() == rejected["text"].strip():
                reason = "identical"  # ties carry no preference signal
        if reason is not None:
            dropped.append({"prompt_id": j["prompt_id"], "drop_reason": reason, "raw_judge_output": j.get("raw_judge_output")})
            continue
        assert row is not None
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
