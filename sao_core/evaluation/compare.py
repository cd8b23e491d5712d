"""Can a round say "better"? The candidate policy against its baselines, and how far the judge is trusted.

    result = evaluate_candidate(cfg, candidate, [current, original], judge, eval_dir)   # in this process
    result = summarize_evaluation(cfg, eval_dir, models, judge)   # once the stages ran anywhere
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

Steps 1 and 2-3 are stages in the evaluation folder (sao_core.evaluation.eval_stages: answers-NAME,
verdicts), sharded and resumable like the data stages, so they run wherever the round's shards run.
Lengths are in characters. The LC fit has the model and length terms only (no instruction difficulty:
that needs earlier runs on the same set, which a campaign's first round does not have).
Writes results-NAME.jsonl, trust.jsonl and manifest.json (last) in the evaluation folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sao_core.config import RoundConfig
from sao_core.engines.provider import EngineProvider
from sao_core.evaluation.eval_stages import write_cases, write_eval_prompts
from sao_core.evaluation.winrate import (
    JudgedPrompt,
    compute_win_rate,
    describe_win_rate,
    winner_from_position,
)
from sao_core.fmt import pct
from sao_core.stages.runner import run_model_stage
from sao_core.store import shards, storage
from sao_core.store.evalsets import judge_agreement
from sao_core.store.layout import EVAL_CASES, EVAL_PROMPTS, evaluation_settings_hash, stage_url


@dataclass(frozen=True)
class Contender:
    """A policy to answer the instructions: its name in the report, what it is, and its engine."""

    name: str
    model: str  # the model URL (and adapter) as the report shows it
    engines: EngineProvider


def compare(
    verdicts: Sequence[Mapping[str, Any]], cfg: RoundConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The win rate of the candidate (each case's first answer) over a baseline, from the verdict rows
    of one comparison, and one result row per instruction."""
    judged, rows = [], []
    for v in verdicts:
        item = JudgedPrompt(
            v["id"],
            v["first_len"],
            v["second_len"],
            winner_from_position(v["position_ab"], candidate_shown_first=True),
            winner_from_position(v["position_ba"], candidate_shown_first=False),
        )
        judged.append(item)
        rows.append(
            {
                "id": v["id"],
                "category": v["category"],
                "candidate_first": item.candidate_first,
                "baseline_first": item.baseline_first,
                "preference": item.preference,
                "verdict_candidate_first": v["verdict_ab"],
                "verdict_baseline_first": v["verdict_ba"],
            }
        )
    result = compute_win_rate(judged, n_bootstrap=cfg.evaluation.bootstrap, seed=cfg.run.seed)
    return result.to_dict(), rows


def trust_the_judge(
    verdicts: Sequence[Mapping[str, Any]], cfg: RoundConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The judge's agreement with the labelled judge-trust set (better shown first, then second), with
    its item count and the agreement by kind of flaw."""
    pairs = [(v["position_ab"], v["position_ba"]) for v in verdicts]
    rows = [
        {
            "id": v["id"],
            "kind": v["category"],
            "better_first": v["position_ab"],
            "worse_first": v["position_ba"],
        }
        for v in verdicts
    ]
    summary = judge_agreement(pairs)
    by_kind: dict[str, list[tuple[int | None, int | None]]] = {}
    for v, pair in zip(verdicts, pairs, strict=True):
        by_kind.setdefault(v["category"], []).append(pair)
    summary["by_kind"] = {kind: judge_agreement(p)["agreement"] for kind, p in sorted(by_kind.items())}
    summary["set"] = cfg.evaluation.trust
    return summary, rows


def summarize_evaluation(
    cfg: RoundConfig, eval_dir: str, models: Mapping[str, str], judge: str
) -> dict[str, Any]:
    """Read the verdicts stage, write results-NAME.jsonl, trust.jsonl and manifest.json; return the manifest.

    `models` describes each contender by name (candidate first, then the baselines in the order the
    cases were written; the first baseline is the one the promotion gate reads)."""
    fmt = cfg.run.format
    verdict_stage = shards.read_stage_manifest(stage_url(eval_dir, "verdicts"))
    verdicts = shards.read_stage_rows(stage_url(eval_dir, "verdicts"), fmt)
    names = list(models)
    baselines = names[1:]
    if not baselines:
        raise ValueError("an evaluation needs at least one baseline")
    comparisons: dict[str, Any] = {}
    for base in baselines:
        result, rows = compare([v for v in verdicts if v["kind"] == base], cfg)
        comparisons[base] = {"baseline": models[base], **result}
        storage.write_bytes(
            storage.join(eval_dir, f"results-{base}.jsonl"), shards.encode_rows(rows, "jsonl")
        )
    trust, trust_rows = trust_the_judge([v for v in verdicts if v["kind"] == "trust"], cfg)
    storage.write_bytes(storage.join(eval_dir, "trust.jsonl"), shards.encode_rows(trust_rows, "jsonl"))
    primary = comparisons[baselines[0]]
    stages = [EVAL_PROMPTS, *(f"answers-{n}" for n in names), EVAL_CASES, "verdicts"]
    seconds = sum(float(shards.read_stage_manifest(stage_url(eval_dir, s)).get("seconds", 0)) for s in stages)
    manifest = {
        "prompts": shards.read_stage_manifest(stage_url(eval_dir, EVAL_PROMPTS))["rows_out"],
        "prompt_set": cfg.evaluation.prompts,
        "candidate": models[names[0]],
        "judge": judge,
        "primary": baselines[0],
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
        "settings_hash": evaluation_settings_hash(cfg),
        "verdicts_sha256": shards.manifest_digest(verdict_stage),
        "seconds": round(seconds, 2),  # the stages' generation time, summed over shards
    }
    storage.write_json(storage.join(eval_dir, "manifest.json"), manifest)
    return manifest


def evaluate_candidate(
    cfg: RoundConfig,
    candidate: Contender,
    baselines: Sequence[Contender],
    judge: Contender,
    eval_dir: str,
) -> dict[str, Any]:
    """Every evaluation stage in this process, on the engines given: answer, judge every baseline pair in
    both orders, rate the judge; write the files, return the manifest. (A round runs the same stages
    through tasks/evaluation.py, where the round's fan-out places them.)

    Contender names are the stages' (candidate, current, original); the first baseline is the one the
    promotion gate reads. No contenders.json is needed here: the engines are given.
    """
    if not baselines:
        raise ValueError("evaluate_candidate needs at least one baseline")
    write_eval_prompts(cfg, eval_dir)
    for c in (candidate, *baselines):
        run_model_stage(f"answers-{c.name}", cfg, eval_dir, c.engines)
    write_cases(cfg, eval_dir, [b.name for b in baselines])
    run_model_stage("verdicts", cfg, eval_dir, judge.engines)
    models = {c.name: c.model for c in (candidate, *baselines)}
    return summarize_evaluation(cfg, eval_dir, models, judge.model)


def headline(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table the round report and the UI artifact show: one row per comparison, plus the judge."""

    rows = []
    for name, c in manifest["comparisons"].items():
        rows.append(
            {
                "vs": f"{name} ({c['baseline']})",
                "win rate": describe_win_rate(c),  # with its counts: of how many prompts, invalid as ties
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
            "win rate": pct(t["agreement"])
            + (f" ({t['correct_verdicts']} of {2 * t['items']} verdicts)" if "correct_verdicts" in t else ""),
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
