"""The data half of one SAO round without any orchestrator: what `sao synth` runs.

cfg = load_config("configs/cpu-smollm2.yaml")
result = run_synth(cfg)          # personas -> prompts -> responses -> judgements -> pairs
result.round_url, result.summary["judgements"]["diagnostics"]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sao_core.config import RoundConfig
from sao_core.engines.provider import EngineProvider
from sao_core.fmt import pct
from sao_core.stages.no_model import run_pairs, run_personas
from sao_core.stages.runner import run_model_stage
from sao_core.store import storage
from sao_core.store.layout import MODEL_STAGES, hash_config, prepare_round, stage_url

SUMMARY_KEYS = (
    "rows_in",
    "rows_out",
    "drops",
    "seconds",
    "prompt_tokens",
    "completion_tokens",
    "engine",
    "model_revision",
    "repetition_rate",
    "diagnostics",
)


@dataclass
class SynthResult:
    round_url: str
    summary: dict[str, dict[str, Any]]
    seconds: float

    @property
    def pairs_url(self) -> str:
        return stage_url(self.round_url, "pairs")


def stage_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of a stage manifest a person reads (no per-shard detail)."""
    return {k: manifest[k] for k in SUMMARY_KEYS if k in manifest}


def write_round_manifest(cfg: RoundConfig, round_dir: str, summary: dict[str, dict[str, Any]]) -> None:
    storage.write_json(
        storage.join(round_dir, "manifest.json"),
        {
            "campaign": cfg.run.campaign,
            "round": cfg.run.round,
            "config_hash": hash_config(cfg),
            "model": cfg.model.path,
            "engine": cfg.engine.name,
            "stages": summary,
        },
    )


def run_synth(
    cfg: RoundConfig,
    engines: EngineProvider | None = None,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
) -> SynthResult:
    """Run the five data stages of a round, resuming any finished shards; the engine loads once."""
    start = time.perf_counter()
    round_dir = prepare_round(cfg)
    own_engines = engines is None
    engines = engines or EngineProvider(cfg)
    summary: dict[str, dict[str, Any]] = {}

    def record(stage: str, manifest: dict[str, Any]) -> None:
        summary[stage] = stage_summary(manifest)
        write_round_manifest(cfg, round_dir, summary)
        if on_stage:
            on_stage(stage, summary[stage])

    try:
        record("personas", run_personas(cfg, round_dir))
        for stage in MODEL_STAGES:
            record(stage, run_model_stage(stage, cfg, round_dir, engines))
        record("pairs", run_pairs(cfg, round_dir))
    finally:
        if own_engines:
            engines.close()
    return SynthResult(round_dir, summary, time.perf_counter() - start)


def format_stage_line(stage: str, s: dict[str, Any]) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in s.get("drops", {}).items()) or "none"
    tokens = s.get("completion_tokens", 0)
    secs = s.get("seconds", 0.0)
    rate = f", {tokens / secs:.0f} tok/s" if tokens and secs else ""
    line = f"{stage:<11} {s.get('rows_in', 0):>6} in {s.get('rows_out', 0):>6} out  {secs:7.1f}s{rate}  drops: {drops}"
    if "repetition_rate" in s:
        line += f"  repetition rate: {s['repetition_rate']:.2%}"
    return line


def format_diagnostics(d: dict[str, Any]) -> str:
    parts = [
        f"parse rate {pct(d.get('parse_rate'))}",
        f"valid {d.get('valid_judgements', 0)}/{d.get('judgements', 0)}",
        f'"1 > 2" share {pct(d.get("first_wins_rate"))}',
        f"longer answer wins {pct(d.get('longer_wins_rate'))}",
    ]
    if d.get("swap_consistency") is not None:
        parts.append(f"swap consistency {pct(d['swap_consistency'])}")
    if d.get("invalid_by_reason"):
        parts.append("invalid: " + ", ".join(f"{k}={v}" for k, v in d["invalid_by_reason"].items()))
    return "judge: " + "; ".join(parts)
