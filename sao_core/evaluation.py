"""Held-out comparison of a trained policy with its base, judged by the base model in both orders.

The placeholder the evaluation suite replaces: a bundled set of instructions written for this project
(sao_core/data/eval_prompts.jsonl) or a JSONL of prompts by URL; each answered greedily by both
policies; the base model judges every pair twice (new first, then base first) with the paper's
template. A prompt is a win or a loss only when both orders agree; otherwise it is a tie.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sao_core import storage
from sao_core.chat import ChatRequest, Sampling
from sao_core.config import RoundConfig
from sao_core.judging import format_judge_prompt, parse_verdict, strip_quoted
from sao_core.stages.runner import EngineProvider

BUILTIN_PROMPTS = Path(__file__).parent / "data" / "eval_prompts.jsonl"


def load_eval_prompts(source: str, n: int) -> list[dict[str, str]]:
    """The first n prompts of the set ({id, prompt} rows)."""
    text = BUILTIN_PROMPTS.read_text() if source == "builtin" else storage.read_text(source)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"evaluation prompts {source}: line {lineno} has no 'prompt' field")
        rows.append({"id": str(row.get("id", f"ev-{lineno:03d}")), "prompt": str(row["prompt"])})
    if not rows:
        raise ValueError(f"evaluation prompts {source} holds no prompts")
    return rows[:n]


def evaluate_policy(
    cfg: RoundConfig,
    policy: EngineProvider,
    base: EngineProvider,
    output_url: str,
) -> dict[str, Any]:
    """Answer, judge both orders, write eval/results.jsonl and eval/manifest.json; return the manifest."""
    ecfg = cfg.evaluation
    start = time.perf_counter()
    prompts = load_eval_prompts(ecfg.prompts, ecfg.n)
    reqs = [ChatRequest.user(p["id"], p["prompt"], kind="response") for p in prompts]
    sampling = Sampling(ecfg.temperature, 1.0, ecfg.max_tokens, seed=cfg.run.seed)
    new_answers = [o[0] for o in policy.get().generate(reqs, sampling)]
    base_answers = [o[0] for o in base.get().generate(reqs, sampling)]
    judge_reqs = []
    prefill = cfg.judging.prefill or ""  # the round's judge settings
    for p, new, old in zip(prompts, new_answers, base_answers, strict=True):
        for order, one, two in (("new-first", new, old), ("base-first", old, new)):
            text = format_judge_prompt(p["prompt"], one.text, two.text)
            judge_reqs.append(ChatRequest.user(f"{p['id']}:{order}", text, kind="judge", prefill=prefill))
    verdicts = base.get().generate(judge_reqs, Sampling(0.0, 1.0, ecfg.judge_max_tokens, seed=cfg.run.seed))
    rows, wins, losses, ties, invalid, first, parsed = [], 0, 0, 0, 0, 0, 0
    for i, p in enumerate(prompts):
        # A judge that copies an answer back must not have that answer's own "ranking:" read as its verdict.
        quoted = (p["prompt"], new_answers[i].text, base_answers[i].text)
        a = strip_quoted(verdicts[2 * i][0].text, quoted)
        b = strip_quoted(verdicts[2 * i + 1][0].text, quoted)
        va, vb = parse_verdict(a, cfg.judging.lenient), parse_verdict(b, cfg.judging.lenient)
        # In the first order the new answer is Response 1, in the second Response 2.
        new_won = [
            None if va.preferred_position is None else va.preferred_position == 1,
            None if vb.preferred_position is None else vb.preferred_position == 2,
        ]
        first += sum(v.preferred_position == 1 for v in (va, vb))
        parsed += sum(v.preferred_position is not None for v in (va, vb))
        if None in new_won:
            outcome = "invalid"
            invalid += 1
        elif all(new_won):
            outcome, wins = "win", wins + 1
        elif not any(new_won):
            outcome, losses = "loss", losses + 1
        else:
            outcome, ties = "tie", ties + 1
        rows.append(
            {
                "id": p["id"],
                "prompt": p["prompt"],
                "new": new_answers[i].text,
                "base": base_answers[i].text,
                "verdict_new_first": a,
                "verdict_base_first": b,
                "outcome": outcome,
            }
        )
    valid = wins + losses + ties
    manifest = {
        "prompts": len(prompts),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "invalid": invalid,
        "win_rate": round((wins + 0.5 * ties) / valid, 4) if valid else None,
        "position_bias": round(first / parsed, 4) if parsed else None,  # share of "1 > 2"
        "mean_length_new": round(sum(len(a.text) for a in new_answers) / len(prompts), 1),
        "mean_length_base": round(sum(len(a.text) for a in base_answers) / len(prompts), 1),
        "seconds": round(time.perf_counter() - start, 2),
        "judge": "base model, both orders",
    }
    storage.write_bytes(storage.join(output_url, "results.jsonl"), storage.encode_rows(rows, "jsonl"))
    storage.write_json(storage.join(output_url, "manifest.json"), manifest)
    return manifest
