"""Orchestration overhead of the Prefect round, timed as a user's first and second `sao run`.

    .venv/bin/python -m bench.round_overhead [--config configs/cpu-smollm2.yaml] [--set key=value ...]

Runs `sao run --config C --set run.root=R` (the installed command) twice, each as a process of its own,
with one PREFECT_HOME (a temporary folder, telemetry off) and one artifact folder R, and takes each
process's wall time, start-up and the temporary Prefect server included:
- first run: wall time over the stages' compute seconds; target <= 1.15. The PREFECT_HOME is new, so
  this run also creates Prefect's database, as a user's first run does;
- second run (same config, a new interpreter served from Prefect's cache and the round folder): wall
  time over the first run's; target <= 0.15.

Compute follows one rule for every stage: the seconds of the stage's own work, read from the manifests
the first run wrote, with every model load left out. Generation for prompts, responses and judgements;
`trainer.train` for training; answering and judging for evaluation; sampling personas and selecting
pairs. The manifests do not all time the same span, so loads are taken out where they are in:
- a stage shard times its engine call only: the engine is built (the model loaded) before the timer
  starts, by the first shard to generate, and later stages share it;
- training's seconds are `trainer.train` only (its model load is outside them already);
- evaluation's seconds include building the trained policy's engine (the base model's is the one
  the stages held).
The manifests do not record load times, so after the runs each load is timed again the way the round
does it, in a fresh interpreter (the first one there pays the torch and transformers imports, as prompts
shard 0 does), and subtracted from the stage that contains it. The loads are reported on a line of their
own; being outside compute, they count as overhead in the ratio, like training's set-up (tokenising
pairs, building the trainer) and its adapter merge and save. The bundled model is converted before
the timed runs: that is a one-time install step, not a round's cost.

Writes bench/results/round_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_report
from sao_core.store import shards, storage
from sao_core.store.layout import evaluation_url, load_config
from sao_core.store.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
STAGES = ("personas", "prompts", "responses", "judgements", "pairs")
# measure_loads in a fresh interpreter, as a `sao run` process meets its first load.
LOADS_CHILD = (
    "import json, sys\n"
    "from bench.round_overhead import measure_loads\n"
    "print(json.dumps(measure_loads(*sys.argv[1:])))\n"
)


def loads_inside(engine_name: str) -> dict[str, list[str]]:
    """Which model loads each stage's manifest seconds contain: only evaluation's (the trained policy).

    Every engine alike since the shard runner builds its engine before a shard's timer starts; the
    argument stays so a report names the engine it was measured with.
    """
    del engine_name
    return {"evaluate": ["policy"]}


def manifest_seconds(round_dir: str, model_url: str) -> dict[str, float]:
    """Each stage's seconds as its manifest records them (see the module docstring for what they span)."""
    parts = {
        stage: float(shards.read_stage_manifest(storage.join(round_dir, stage)).get("seconds", 0.0))
        for stage in STAGES
    }
    parts["train"] = float(storage.read_json(storage.join(model_url, "manifest.json")).get("seconds", 0.0))
    cfg = load_config(storage.join(round_dir, "resolved_config.yaml"))
    evaluation = storage.join(evaluation_url(model_url, cfg), "manifest.json")
    if storage.exists(evaluation):
        parts["evaluate"] = float(storage.read_json(evaluation).get("seconds", 0.0))
    return parts


def measure_loads(config_url: str, model_url: str) -> dict[str, float]:
    """Seconds to build each engine the round builds, and training's model; run in a fresh interpreter.

    Modules the round had already imported before a load are imported before its timer here too.
    """
    from sao_core.engines import make_engine

    cfg = load_config(config_url)
    loads: dict[str, float] = {}
    start = time.perf_counter()
    make_engine(cfg.engine, cfg.model, seed=cfg.run.seed).close()
    loads["base"] = time.perf_counter() - start

    trained = storage.read_json(storage.join(model_url, "manifest.json"))
    adapter = storage.join(model_url, "adapter") if trained.get("adapter") else None
    full = storage.join(model_url, "full") if trained.get("full_model") else None
    # As tasks/evaluation.py picks the policy: the merged model only when there is no adapter.
    update = {"path": full} if full and not adapter else {"adapter": adapter}
    if cfg.engine.name != "vllm":
        import peft  # noqa: F401  (training imported it before evaluation loaded the policy)
    start = time.perf_counter()
    make_engine(cfg.engine, cfg.model.model_copy(update=update), seed=cfg.run.seed).close()
    loads["policy"] = time.perf_counter() - start

    import trl  # noqa: F401  (imported before training loads its model)

    from sao_core.training import load_model, load_tokenizer

    start = time.perf_counter()
    model_dir = resolve_model(cfg.model.path)
    load_tokenizer(model_dir)
    load_model(model_dir)
    loads["train"] = time.perf_counter() - start
    return loads


def sao_run(config: str, overrides: list[str], env: dict[str, str]) -> tuple[float, list[str], tuple]:
    """One `sao run` as its own process: its wall seconds, its output lines and the load average after."""
    cmd = [str(REPO / ".venv" / "bin" / "sao"), "run", "--config", config]
    for override in overrides:
        cmd += ["--set", override]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    lines: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        sys.stderr.write(line)
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"sao run exited with {rc}")
    return wall, lines, os.getloadavg()


def printed(lines: list[str], label: str) -> str:
    """A value `sao run` printed as `label: value`."""
    for line in lines:
        if line.startswith(f"{label}: "):
            return line[len(label) + 2 :].strip()
    raise SystemExit(f"sao run printed no '{label}:' line")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu-smollm2.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the artifact folder and PREFECT_HOME")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="sao-bench-round-")
    prefect_home = tempfile.mkdtemp(prefix="sao-bench-prefect-")
    overrides = [f"run.root={root}", *args.overrides]
    cfg = load_config(args.config, overrides)
    resolve_model(cfg.model.path)  # the one-time conversion of a bundled model is no round's cost
    env = {**os.environ, "PREFECT_HOME": prefect_home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        load_before = os.getloadavg()
        first_wall, lines, load_first = sao_run(args.config, overrides, env)
        round_dir, model_url = printed(lines, "round folder"), printed(lines, "model")
        recorded = manifest_seconds(round_dir, model_url)
        cached_wall, cached_lines, load_cached = sao_run(args.config, overrides, env)
        # Prefect's log line for a task run answered from its cache: the re-run did skip the work.
        cached_tasks = sum("Finished in state Cached" in line for line in cached_lines)
        # A re-run that names another model folder trained again (the code or config changed between
        # the runs): its time is then no cached re-run, and the report says so.
        same_model = printed(cached_lines, "model") == model_url
        config_url = storage.join(round_dir, "resolved_config.yaml")
        out = subprocess.run(
            [sys.executable, "-c", LOADS_CHILD, config_url, model_url],
            cwd=REPO,
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        loads = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(prefect_home, ignore_errors=True)

    inside = loads_inside(cfg.engine.name)
    compute_parts = {
        stage: max(seconds - sum(loads[name] for name in inside.get(stage, [])), 0.0)
        for stage, seconds in recorded.items()
    }
    compute = sum(compute_parts.values())
    load_total = sum(loads.values())
    payload: dict[str, Any] = {
        "benchmark": "round_overhead",
        "config": args.config,
        "overrides": args.overrides,
        "engine": cfg.engine.name,
        "first_run_wall_s": round(first_wall, 2),
        "manifest_s": {k: round(v, 2) for k, v in recorded.items()},
        "loads_inside_manifest": inside,
        "model_load_s": {k: round(v, 2) for k, v in loads.items()},
        "stage_compute_s": {k: round(v, 2) for k, v in compute_parts.items()},
        "compute_s": round(compute, 2),
        "overhead_ratio": round(first_wall / compute, 3) if compute else None,
        "overhead_target": 1.15,
        "other_overhead_s": round(first_wall - compute - load_total, 2),
        "cached_run_wall_s": round(cached_wall, 2),
        "cached_ratio": round(cached_wall / first_wall, 3),
        "cached_task_runs": cached_tasks,
        "cached_run_same_model": same_model,
        "cached_target": 0.15,
        "load_average": {"before": load_before, "after_first": load_first, "after_cached": load_cached},
        "machine": machine(),
    }
    rows = "\n".join(
        f"| {k} | {recorded[k]:.1f} | {', '.join(inside.get(k, [])) or '-'} | {compute_parts[k]:.1f} |"
        for k in recorded
    )
    sets = "".join(f" --set {o}" for o in args.overrides)
    fmt = ", ".join
    md = (
        "# Prefect round: orchestration overhead\n\n"
        f"`.venv/bin/python -m bench.round_overhead --config {args.config}{sets}`: two `sao run` processes, "
        f"one PREFECT_HOME, one artifact folder, engine {cfg.engine.name}.\n\n"
        "Compute is each stage's own work with every model load left out (see the module docstring).\n\n"
        "| stage | manifest seconds | model loads inside | compute seconds |\n|---|---|---|---|\n"
        f"{rows}\n| **sum** | | | **{compute:.1f}** |\n\n"
        f"Model loads, outside compute (timed again in a fresh interpreter): "
        f"{fmt(f'{k} {v:.1f} s' for k, v in loads.items())}; {load_total:.1f} s in all.\n\n"
        f"First run wall time: {first_wall:.1f} s; ratio to compute: **{payload['overhead_ratio']}** "
        f"(target <= 1.15). Wall time neither compute nor a model load: {payload['other_overhead_s']:.1f} s.\n\n"
        f"Cached re-run (a new process): {cached_wall:.1f} s; ratio to the first run: "
        f"**{payload['cached_ratio']}** (target <= 0.15); {cached_tasks} task runs answered from the cache."
        + ("" if same_model else " NOT A CACHED RE-RUN: it wrote another model folder and trained again.")
        + "\n\n"
        f"Load average before: {fmt(f'{x:.1f}' for x in load_before)}; after the first run: "
        f"{fmt(f'{x:.1f}' for x in load_first)}; after the second: {fmt(f'{x:.1f}' for x in load_cached)}. "
        f"{payload['machine']}\n"
    )
    path = write_report("round_overhead", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
