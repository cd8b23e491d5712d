"""Orchestration overhead of the Prefect round, on the embedded default (cpu-smollm2).

    .venv/bin/python -m bench.round_overhead [--config configs/cpu-smollm2.yaml] [--set key=value ...]

Runs the round twice in one process against one Prefect server (a temporary one unless
PREFECT_API_URL is set), on a fresh artifact folder:
- first run: wall time vs the sum of the stages' own compute seconds (generation, training and
  evaluation time from their manifests); target ratio <= 1.15;
- second run (same config, served from the cache): wall time vs the first; target <= 0.15.
Writes bench/results/round_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import flows  # noqa: F401  (Prefect defaults for a laptop, before Prefect loads)
from bench.common import machine, write_report
from sao_core import storage


def compute_seconds(result: dict) -> dict[str, float]:
    round_dir = result["round_dir"]
    parts: dict[str, float] = {}
    for stage in ("personas", "prompts", "responses", "judgements", "pairs"):
        m = storage.read_stage_manifest(storage.join(round_dir, stage))
        parts[stage] = float(m.get("seconds", 0.0))
    train = storage.read_json(storage.join(result["model"], "manifest.json"))
    parts["train"] = float(train.get("seconds", 0.0))
    if result.get("evaluation"):
        parts["evaluate"] = float(result["evaluation"].get("seconds", 0.0))
    return parts


def main() -> None:
    from flows.sao_round import sao_round

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu-smollm2.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="sao-bench-round-")
    overrides = [f"run.root={root}", *args.overrides]

    start = time.perf_counter()
    first = sao_round(args.config, overrides)
    first_wall = time.perf_counter() - start
    parts = compute_seconds(first)
    compute = sum(parts.values())

    start = time.perf_counter()
    sao_round(args.config, overrides)
    cached_wall = time.perf_counter() - start

    payload = {
        "benchmark": "round_overhead",
        "config": args.config,
        "overrides": args.overrides,
        "first_run_wall_s": round(first_wall, 2),
        "stage_compute_s": {k: round(v, 2) for k, v in parts.items()},
        "compute_s": round(compute, 2),
        "overhead_ratio": round(first_wall / compute, 3) if compute else None,
        "overhead_target": 1.15,
        "cached_run_wall_s": round(cached_wall, 2),
        "cached_ratio": round(cached_wall / first_wall, 3),
        "cached_target": 0.15,
        "machine": machine(),
    }
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in parts.items())
    md = (
        "# Prefect round: orchestration overhead\n\n"
        f"`.venv/bin/python -m bench.round_overhead --config {args.config}`\n\n"
        f"| stage | compute seconds |\n|---|---|\n{rows}\n| **sum** | **{compute:.1f}** |\n\n"
        f"First run wall time: {first_wall:.1f} s; ratio to compute: **{payload['overhead_ratio']}** (target <= 1.15)\n\n"
        f"Cached re-run: {cached_wall:.1f} s; ratio to first run: **{payload['cached_ratio']}** (target <= 0.15)\n"
    )
    path = write_report("round_overhead", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
