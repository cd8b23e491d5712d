"""Load: the five data stages with the scripted engine at 1k, 10k and 100k personas, each size in a fresh process.

    .venv/bin/python -m bench.scale [--sizes 1000 10000 100000] [--shard-size 1000]

Each size runs `run_synth` (what `sao synth` runs: personas -> prompts -> responses -> judgements ->
pairs) on configs/tiny.yaml with engine.name=fake, personas.n=N and run.shard_size=S, in a child
interpreter of its own under a new artifact folder. The parent waits for the child with os.wait4, whose
rusage is that child's alone: its peak RSS (ru_maxrss) and wall time are the size's figures. The child
also reports its peak RSS before the round starts (imports and config), the floor every size pays.

Targets (the issue's "Load" item): peak RSS at the largest size at most 1.5x the peak at the smallest
(shards are streamed, so memory must not grow with the round); seconds per persona flat across sizes
(time linear in personas); manifests exact, checked after each child exits:
- personas: rows_out == N in ceil(N / S) shards;
- every stage: rows_in == rows_out + dropped (judgements keep invalid verdicts: rows_out == rows_in),
  and each stage's rows_in is the rows_out of the stage before it; pairs out == valid judgements;
- the stage totals are the sums of the shard entries, and every shard file has rows_out lines and the
  sha256 its entry names.

Writes bench/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import machine, write_report

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
STAGES = ("personas", "prompts", "responses", "judgements", "pairs")
RSS_TARGET = 1.5
CHILD = "from bench.scale import child; child()"


def child() -> None:
    """One size in this process: run the data stages and print what the parent needs as one JSON line."""
    import resource

    from sao_core.stages.synth import run_synth
    from sao_core.store.layout import load_config

    root, n, shard_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(
        TINY,
        [f"run.root={root}", "engine.name=fake", f"personas.n={n}", f"run.shard_size={shard_size}"],
    )
    floor_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run_synth(cfg)
    seconds = time.perf_counter() - start
    print(json.dumps({"round_dir": result.round_url, "seconds": seconds, "floor_kb": floor_kb}), flush=True)


def _stage_manifest(round_dir: str, stage: str) -> dict[str, Any]:
    return json.loads((Path(round_dir) / stage / "manifest.json").read_text())


def check_manifests(round_dir: str, n: int, shard_size: int) -> list[str]:
    """Every way the round's manifests disagree with each other or with their files (empty: exact)."""
    problems: list[str] = []
    m = {stage: _stage_manifest(round_dir, stage) for stage in STAGES}
    if m["personas"]["rows_out"] != n:
        problems.append(f"personas: {m['personas']['rows_out']} rows out, asked for {n}")
    want_shards = math.ceil(n / shard_size)
    for stage in STAGES:
        s = m[stage]
        if s["num_shards"] != want_shards or len(s["shards"]) != want_shards:
            problems.append(f"{stage}: {s['num_shards']} shards, want {want_shards}")
        dropped = sum(s["drops"].values())
        if stage == "judgements":
            if s["rows_out"] != s["rows_in"]:
                problems.append(f"judgements: {s['rows_in']} in, {s['rows_out']} out")
        elif s["rows_in"] != s["rows_out"] + dropped:
            problems.append(f"{stage}: {s['rows_in']} in != {s['rows_out']} out + {dropped} dropped")
        totals: Counter[str] = Counter()
        drops: Counter[str] = Counter()
        for entry in s["shards"]:
            totals.update(rows_in=entry["rows_in"], rows_out=entry["rows_out"])
            drops.update(entry["drops"])
            data = (Path(round_dir) / stage / entry["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{stage} {entry['file']}: sha256 differs from its entry")
            lines = data.count(b"\n")
            if lines != entry["rows_out"]:
                problems.append(f"{stage} {entry['file']}: {lines} rows, its entry says {entry['rows_out']}")
        if (totals["rows_in"], totals["rows_out"]) != (s["rows_in"], s["rows_out"]):
            problems.append(f"{stage}: totals {s['rows_in']}/{s['rows_out']} != shard sums {dict(totals)}")
        if dict(drops) != s["drops"]:
            problems.append(f"{stage}: drops {s['drops']} != shard sums {dict(drops)}")
    for before, after in itertools.pairwise(STAGES):
        if m[after]["rows_in"] != m[before]["rows_out"]:
            problems.append(f"{after}: {m[after]['rows_in']} in, {before} gave {m[before]['rows_out']}")
    valid = m["judgements"]["diagnostics"]["valid_judgements"]
    if m["pairs"]["rows_out"] != valid:
        problems.append(f"pairs: {m['pairs']['rows_out']} out, {valid} valid judgements")
    return problems


def run_size(n: int, shard_size: int, workdir: Path) -> dict[str, Any]:
    """One size in a child process: its peak RSS and wall time (from wait4), its stages, its checks."""
    root = workdir / f"n{n}"
    cmd = [sys.executable, "-c", CHILD, str(root), str(n), str(shard_size)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # the child's output is a few lines
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if proc.returncode != 0:
        raise RuntimeError(f"n={n}: child exited {proc.returncode}:\n{err.decode()[-3000:]}")
    reported = json.loads(out.decode().strip().splitlines()[-1])
    round_dir = reported["round_dir"]
    stages = {}
    for stage in STAGES:
        s = _stage_manifest(round_dir, stage)
        stages[stage] = {k: s[k] for k in ("rows_in", "rows_out", "drops", "seconds")}
    problems = check_manifests(round_dir, n, shard_size)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "personas": n,
        "shards": math.ceil(n / shard_size),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "floor_rss_mb": round(reported["floor_kb"] / 1024, 1),
        "wall_s": round(wall, 2),
        "synth_s": round(reported["seconds"], 2),
        "us_per_persona": round(reported["seconds"] / n * 1e6, 1),
        "stages": stages,
        "manifests_exact": not problems,
        "problems": problems,
    }


def markdown(results: list[dict[str, Any]], payload: dict[str, Any]) -> str:
    lines = [
        "# Load: the data stages with the scripted engine",
        "",
        f"`python -m bench.scale`: configs/tiny.yaml, engine fake, run.shard_size={payload['shard_size']}, "
        "each size in a fresh process (peak RSS from wait4's rusage of that child).",
        "",
        "| personas | shards | peak RSS (MB) | RSS before the round (MB) | synth s | µs/persona "
        "| µs per further persona | pairs | manifests exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in results:
        lines.append(
            f"| {r['personas']:,} | {r['shards']} | {r['peak_rss_mb']} | {r['floor_rss_mb']} | {r['synth_s']} "
            f"| {r['us_per_persona']} | {r.get('marginal_us_per_persona', '')} "
            f"| {r['stages']['pairs']['rows_out']:,} | "
            f"{'yes' if r['manifests_exact'] else 'NO: ' + '; '.join(r['problems'][:3])} |"
        )
    v = payload["verdict"]
    lines += [
        "",
        f"- Peak RSS, largest over smallest: {v['rss_ratio']}x (target <= {RSS_TARGET}x): "
        f"{'pass' if v['rss_ok'] else 'FAIL'}.",
        f"- Seconds per persona, largest over smallest: {v['time_per_persona_ratio']}x (at most 1.0: linear, "
        "the fixed start spread over more personas).",
        f"- Manifests exact at every size: {'yes' if v['manifests_exact'] else 'NO'}.",
        "",
        f"Machine: {payload['machine']}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sao-scale-") as tmp:
        for n in sorted(args.sizes):
            r = run_size(n, args.shard_size, Path(tmp))
            print(
                f"{n:>7} personas: peak RSS {r['peak_rss_mb']} MB, {r['synth_s']} s "
                f"({r['us_per_persona']} µs/persona), manifests {'exact' if r['manifests_exact'] else r['problems']}",
                flush=True,
            )
            results.append(r)
    small, large = results[0], results[-1]
    # What each further persona costs between consecutive sizes: flat when time is linear in personas
    # (the smallest size's µs/persona also carries the fixed start of the stages).
    for before, after in itertools.pairwise(results):
        extra = (after["synth_s"] - before["synth_s"]) / (after["personas"] - before["personas"])
        after["marginal_us_per_persona"] = round(extra * 1e6, 1)
    verdict = {
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "rss_ok": large["peak_rss_mb"] <= RSS_TARGET * small["peak_rss_mb"],
        "time_per_persona_ratio": round(large["us_per_persona"] / small["us_per_persona"], 3),
        "manifests_exact": all(r["manifests_exact"] for r in results),
    }
    payload = {
        "benchmark": "scale",
        "shard_size": args.shard_size,
        "results": results,
        "verdict": verdict,
        "machine": machine(),
    }
    path = write_report("scale", payload, markdown(results, payload))
    print(f"rss ratio {verdict['rss_ratio']}x, time/persona ratio {verdict['time_per_persona_ratio']}x")
    print(f"report: {path}")
    return 0 if verdict["rss_ok"] and verdict["manifests_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
