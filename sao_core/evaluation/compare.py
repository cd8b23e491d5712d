"""Can a round say "better"? The candidate policy against its baselines, and how far the judge is trusted.

    result = evaluate_candidate(cfg, candidate, {"current": current, "original": original}, judge, out_url)
    result["comparisons"]["current"]["win_rate_ci_low"]   # what the promotion gate reads

1. A fixed instruction set (`evaluation.prompts`: the bundled 130 instructions written for this project,
   a JSONL by URL, or `hf:DATASET` such as AlpacaEval 2.0's 805 through `datasets`) is answered greedily
   by the candidate and by each baseline (the campaign's current model; from round 2 also the original).
2. The judge (by default the current model with the paper's judge template, or any engine and model
   under `evaluation.judge`) compares each pair in both orders. sao_core.evaluation.winrate turns the verdicts into
   a win rate with its 95% interval, the length-controlled win rate, the tie and order-inconsistent
   shares, and the position and length bias.
3. The same judge, same template, rates the labelled judge-trust set (one answer clearly better) in both
   orders: its agreement says how far this round's verdicts, and its training pairs, can be believed.

Lengths are in characters. The LC fit has the model and length terms only (no instruction difficulty:
that needs earlier runs on the same set, which a campaign's first round does not have).
Writes answers-*.jsonl, results-*.jsonl, trust.jsonl and manifest.json under `output_url`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sao_core.chat import ChatRequest, Completion, Sampling
from sao_core.config import RoundConfig
from sao_core.engines.provider import EngineProvider
from sao_core.evaluation.winrate import JudgedPrompt, compute_win_rate, winner_from_position
from sao_core.fmt import pct
from sao_core.method.judging import format_judge_prompt, parse_verdict, strip_quoted
from sao_core.store import shards, storage
from sao_core.store.evalsets import EvalInstruction, judge_agreement, load_eval_prompts, load_judge_trust


@dataclass(frozen=True)
class Contender:
    """A policy to answer the instructions: its name in the report, what it is, and its engine."""

    name: str
    model: str  # the model URL (and adapter) as the report shows it
    engines: EngineProvider


def _answer(
    prompts: Sequence[EvalInstruction], engines: EngineProvider, cfg: RoundConfig
) -> list[Completion]:
    e = cfg.evaluation
    requests = [ChatRequest.user(p.id, p.instruction, kind="response") for p in prompts]
    sampling = Sampling(e.temperature, 1.0, e.max_tokens, seed=cfg.run.seed)
    return [row[0] for row in engines.get().generate(requests, sampling)]


def _judge(
    cases: Sequence[tuple[str, str, str, str]], judge: EngineProvider, cfg: RoundConfig
) -> list[tuple[int | None, int | None, str | None, str | None]]:
    """Each (id, instruction, a, b) judged with a as Response 1, then b as Response 1: the preferred
    positions and the verdict texts (less verbatim copies of the inputs, see judging.strip_quoted)."""
    prefill = cfg.judging.prefill or ""
    requests = []
    for case_id, instruction, a, b in cases:
        for order, one, two in (("ab", a, b), ("ba", b, a)):
            text = format_judge_prompt(instruction, one, two)
            requests.append(ChatRequest.user(f"{case_id}:{order}", text, kind="judge", prefill=prefill))
    sampling = Sampling(0.0, 1.0, cfg.evaluation.judge_max_tokens, seed=cfg.run.seed)
    outs = judge.get().generate(requests, sampling) if requests else []
    verdicts = []
    for i, (_, instruction, a, b) in enumerate(cases):
        first = strip_quoted(outs[2 * i][0].text, (instruction, a, b))
        second = strip_quoted(outs[2 * i + 1][0].text, (instruction, a, b))
        verdicts.append(
            (
                parse_verdict(first, cfg.judging.lenient).preferred_position,
                parse_verdict(second, cfg.judging.lenient).preferred_position,
                first,
                second,
            )
        )
    return verdicts


def compare(
    prompts: Sequence[EvalInstruction],
    candidate: Sequence[Completion],
    baseline: Sequence[Completion],
    judge: EngineProvider,
    cfg: RoundConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The win rate of `candidate` over `baseline` answers, and one result row per instruction."""
    cases = [
        (p.id, p.instruction, c.text, b.text) for p, c, b in zip(prompts, candidate, baseline, strict=True)
    ]
    verdicts = _judge(cases, judge, cfg)
    judged, rows = [], []
    for p, c, b, (pos_cf, pos_bf, text_cf, text_bf) in zip(
        prompts, candidate, baseline, verdicts, strict=True
    ):
        item = JudgedPrompt(
            p.id,
            len(c.text),
            len(b.text),
            winner_from_position(pos_cf, candidate_shown_first=True),
            winner_from_position(pos_bf, candidate_shown_first=False),
        )
        judged.append(item)
        rows.append(
            {
                "id": p.id,
                "category": p.category,
                "candidate_first": item.candidate_first,
                "baseline_first": item.baseline_first,
                "preference": item.preference,
                "verdict_candidate_first": text_cf,
                "verdict_baseline_first": text_bf,
            }
        )
    result = compute_win_rate(judged, n_bootstrap=cfg.evaluation.bootstrap, seed=cfg.run.seed)
    return result.to_dict(), rows


def trust_the_judge(judge: EngineProvider, cfg: RoundConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The judge's agreement with the labelled judge-trust set, both orders; with its item count."""
    e = cfg.evaluation
    items = load_judge_trust(e.trust)
    if e.trust_n is not None:
        items = items[: e.trust_n]
    verdicts = _judge([(t.id, t.instruction, t.better, t.worse) for t in items], judge, cfg)
    rows = [
        {"id": t.id, "kind": t.kind, "better_first": v[0], "worse_first": v[1]}
        for t, v in zip(items, verdicts, strict=True)
    ]
    summary = judge_agreement((v[0], v[1]) for v in verdicts)
    by_kind: dict[str, list[tuple[int | None, int | None]]] = {}
    for t, v in zip(items, verdicts, strict=True):
        by_kind.setdefault(t.kind, []).append((v[0], v[1]))
    summary["by_kind"] = {
        kind: judge_agreement(pairs)["agreement"] for kind, pairs in sorted(by_kind.items())
    }
    summary["set"] = e.trust
    return summary, rows


def evaluate_candidate(
    cfg: RoundConfig,
    candidate: Contender,
    baselines: Sequence[Contender],
    judge: Contender,
    output_url: str,
) -> dict[str, Any]:
    """Answer, judge every baseline pair in both orders, rate the judge; write the files, return the manifest.

    The first baseline is the one the promotion gate reads (the campaign's current model).
    """
    if not baselines:
        raise ValueError("evaluate_candidate needs at least one baseline")
    start = time.perf_counter()
    e = cfg.evaluation
    prompts = load_eval_prompts(e.prompts, e.n)
    answers = {c.name: _answer(prompts, c.engines, cfg) for c in (candidate, *baselines)}
    for name, outs in answers.items():
        rows = [
            {"id": p.id, "answer": o.text, "finish_reason": o.finish_reason}
            for p, o in zip(prompts, outs, strict=True)
        ]
        storage.write_bytes(
            storage.join(output_url, f"answers-{name}.jsonl"), shards.encode_rows(rows, "jsonl")
        )
    comparisons: dict[str, Any] = {}
    for base in baselines:
        result, rows = compare(prompts, answers[candidate.name], answers[base.name], judge.engines, cfg)
        comparisons[base.name] = {"baseline": base.model, **result}
        storage.write_bytes(
            storage.join(output_url, f"results-{base.name}.jsonl"), shards.encode_rows(rows, "jsonl")
        )
    trust, trust_rows = trust_the_judge(judge.engines, cfg)
    storage.write_bytes(storage.join(output_url, "trust.jsonl"), shards.encode_rows(trust_rows, "jsonl"))
    primary = comparisons[baselines[0].name]
    manifest = {
        "prompts": len(prompts),
        "prompt_set": e.prompts,
        "candidate": candidate.model,
        "judge": judge.model,
        "primary": baselines[0].name,
        # The primary comparison's headline figures, where a reader of one number looks.
        "win_rate": primary["win_rate"],
        "win_rate_ci": [primary["win_rate_ci_low"], primary["win_rate_ci_high"]],
        "lc_win_rate": primary["lc_win_rate"],
        "wins": primary["wins"],
        "losses": primary["losses"],
        "ties": primary["ties"],
        "judge_agreement": trust["agreement"],
        "comparisons": comparisons,
        "trust": trust,
        "seconds": round(time.perf_counter() - start, 2),
    }
    storage.write_json(storage.join(output_url, "manifest.json"), manifest)
    return manifest


def headline(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table the round report and the UI artifact show: one row per comparison, plus the judge."""

    rows = []
    for name, c in manifest["comparisons"].items():
        rows.append(
            {
                "vs": f"{name} ({c['baseline']})",
                "win rate": pct(c["win_rate"]),
                "95% interval": f"{pct(c['win_rate_ci_low'])} to {pct(c['win_rate_ci_high'])}",
                "LC win rate": pct(c["lc_win_rate"]),
                "W/L/T": f"{c['wins']}/{c['losses']}/{c['ties']}",
                "invalid": c["invalid"],
                "order-inconsistent": pct(c["order_inconsistent_share"]),
                "position bias": pct(c["position_bias"]),
                "longer wins": pct(c["longer_wins_share"]),
            }
        )
    t = manifest["trust"]
    rows.append(
        {
            "vs": f"judge trust ({t['items']} labelled pairs)",
            "win rate": pct(t["agreement"]),
            "95% interval": "",
            "LC win rate": "",
            "W/L/T": f"both orders right: {pct(t['both_orders_correct'])}",
            "invalid": t["invalid_verdicts"],
            "order-inconsistent": "",
            "position bias": pct(
                None if t["first_position_share"] is None else t["first_position_share"] - 0.5
            ),
            "longer wins": "",
        }
    )
    return rows
