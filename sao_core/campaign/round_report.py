"""What a person reads about a round: sample chains (persona -> prompt -> answers -> verdict) and report.md.

Pure functions over the round folder; the Prefect tasks publish them as artifacts, `sao` prints them.
"""

from __future__ import annotations

import random
from typing import Any

from sao_core.evaluation.compare import headline
from sao_core.fmt import pct
from sao_core.store import shards, storage
from sao_core.store.layout import STAGE_ORDER


def _rows_by(round_dir: str, stage: str, key: str, fmt: str) -> dict[str, dict[str, Any]]:
    url = storage.join(round_dir, stage)
    if not storage.exists(storage.join(url, "manifest.json")):
        return {}
    return {row[key]: row for row in shards.read_stage_rows(url, fmt)}


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sample_chains(round_dir: str, stage: str, fmt: str, n: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Up to n rows of `stage`, each joined back to its persona, prompt, answers and verdict."""
    upto = STAGE_ORDER.index(stage)
    personas = _rows_by(round_dir, "personas", "persona_id", fmt)
    prompts = _rows_by(round_dir, "prompts", "prompt_id", fmt) if upto >= 1 else {}
    responses = _rows_by(round_dir, "responses", "prompt_id", fmt) if upto >= 2 else {}
    judgements = _rows_by(round_dir, "judgements", "prompt_id", fmt) if upto >= 3 else {}
    base = {"personas": personas, "prompts": prompts, "responses": responses, "judgements": judgements}
    if stage == "pairs":
        keys = [r["prompt_id"] for r in shards.read_stage_rows(storage.join(round_dir, "pairs"), fmt)]
    else:
        keys = list(base[stage])
    chains = []
    for key in random.Random(seed).sample(keys, min(n, len(keys))):
        persona_id = (
            key if stage == "personas" else (prompts.get(key) or responses.get(key) or {}).get("persona_id")
        )
        chain: dict[str, Any] = {"persona": personas.get(persona_id or "", {}).get("persona", "")}
        if key in prompts:
            chain["prompt"] = prompts[key]["prompt"]
        if key in responses:
            chain["responses"] = [(r["response_id"], r["text"]) for r in responses[key]["responses"]]
        if key in judgements:
            j = judgements[key]
            chain["verdict"] = j["raw_judge_output"]
            chain["valid"] = j["valid"]
            chain["chosen_response_id"] = j.get("chosen_response_id")
            chain["invalid_reason"] = j.get("invalid_reason")
        chains.append(chain)
    return chains


def format_chains(chains: list[dict[str, Any]], title: str) -> str:
    if not chains:
        return f"# {title}\n\nNo rows.\n"
    out = [f"# {title}\n"]
    for i, c in enumerate(chains, 1):
        out.append(f"## Sample {i}\n\n**Persona:** {_clip(c['persona'])}\n")
        if "prompt" in c:
            out.append(f"**Prompt:** {_clip(c['prompt'])}\n")
        for k, (rid, text) in enumerate(c.get("responses", []), 1):
            mark = " (chosen)" if rid == c.get("chosen_response_id") else ""
            out.append(f"**Response {k}{mark}:** {_clip(text)}\n")
        if "verdict" in c:
            status = "valid" if c["valid"] else f"invalid: {c['invalid_reason']}"
            out.append(f"**Verdict ({status}):** `{_clip(c['verdict'], 200)}`\n")
    return "\n".join(out)


def format_round_report(
    round_dir: str,
    summary: dict[str, dict[str, Any]],
    training: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    plot_url: str | None = None,
    promotion: dict[str, Any] | None = None,
) -> str:
    """report.md: per-stage counts, judge diagnostics, the training curve, the evaluation, the promotion."""
    lines = [f"# SAO round report\n\nRound folder: `{round_dir}`\n", "## Stages\n"]
    lines.append("| stage | rows in | rows out | drops | seconds | tokens/s |\n|---|---|---|---|---|---|")
    for stage in STAGE_ORDER:
        s = summary.get(stage)
        if not s:
            continue
        drops = ", ".join(f"{k}: {v}" for k, v in s.get("drops", {}).items()) or "none"
        secs, toks = float(s.get("seconds", 0.0)), int(s.get("completion_tokens", 0))
        # Under a second the clock says little (a stage served from its shards shows ~0 s).
        rate = f"{toks / secs:.1f}" if secs >= 1.0 and toks else "-"
        lines.append(
            f"| {stage} | {s.get('rows_in', 0)} | {s.get('rows_out', 0)} | {drops} | {secs:.1f} | {rate} |"
        )
    if "repetition_rate" in summary.get("prompts", {}):
        lines.append(f"\nPrompt repetition rate: {pct(summary['prompts']['repetition_rate'])}")
    d = summary.get("judgements", {}).get("diagnostics")
    if d:
        lines.append("\n## Judge diagnostics\n")
        lines.append("| measure | value |\n|---|---|")
        lines.append(f"| verdicts parsed | {pct(d.get('parse_rate'))} of {d.get('verdicts', 0)} |")
        lines.append(f"| valid judgements | {d.get('valid_judgements', 0)} of {d.get('judgements', 0)} |")
        lines.append(f'| position bias (share of "1 > 2") | {pct(d.get("first_wins_rate"))} |')
        lines.append(f"| length bias (longer answer wins) | {pct(d.get('longer_wins_rate'))} |")
        lines.append(f"| swap consistency | {pct(d.get('swap_consistency'))} |")
        for reason, count in (d.get("invalid_by_reason") or {}).items():
            lines.append(f"| invalid: {reason} | {count} |")
    if training:
        lines.append("\n## Training\n")
        # The training manifest (sao_core.training.run) names its last logged loss final_loss.
        keys = ("objective", "steps", "final_loss", "rows_repeated", "seconds", "tokens_per_s", "output")
        for key in keys:
            value = training.get(key)
            if value is None or (key == "rows_repeated" and not value):
                continue  # rows repeat only under several processes (sao_core.training.data.repeated_rows)
            lines.append(f"- {key.replace('_', ' ')}: {value}")
        if plot_url:
            lines.append(f"\n![training curves]({plot_url})")
    if evaluation:
        lines.append("\n## Evaluation\n")
        lines.append(
            f"{evaluation['prompts']} instructions ({evaluation['prompt_set']}); candidate "
            f"`{evaluation['candidate']}`; judge `{evaluation['judge']}`, both orders.\n"
        )
        lines.append(markdown_table(headline(evaluation)))
    if promotion:
        # The outcome's status when the flow gives it: a standalone round "would be promoted", a campaign
        # round the campaign moved past is "superseded" (sao_core.campaign.outcomes).
        verdict = promotion.get("status") or ("promoted" if promotion["promote"] else "rejected")
        lines.append(f"\n## Promotion: {verdict}\n")
        if promotion.get("reason") == "not enough evidence":
            lines.append("Not enough evidence: too few verdicts to read any rate (see the evidence check).\n")
        if verdict in ("superseded", "would be promoted"):
            lines.append(f"{promotion.get('why', '')}\n")
        for check in promotion["checks"]:
            lines.append(f"- {'pass' if check['passed'] else 'FAIL'}: {check['rule']}: {check['detail']}")
        if promotion.get("approval"):
            lines.append(f"- approval: {promotion['approval']}")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of one shape as a markdown table (the keys of the first row are the columns)."""
    if not rows:
        return ""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)
