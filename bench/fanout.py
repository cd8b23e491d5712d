"""Fan-out over GPU-batch workers: the same SmolLM2 data stages on one worker and on two.

    .venv/bin/python -m bench.fanout [--personas 16] [--shard-size 4] [--repeats 1] [--worker-query-s 1]
                                     [--set key=value ...]

Stands up the cluster of the integration tests (tests/cluster/harness.py: `prefect server` on
PostgreSQL when the machine has it, else on SQLite; `sao deploy`; a sao-cpu worker and two process
workers on sao-gpu-batch, each flow run limited to one torch thread), then runs the data stages of
configs/cpu-smollm2.yaml (personas, prompts, responses, judgements) with `fanout.mode=deployment`,
once with `fanout.workers=1` and once with `fanout.workers=2`, arms alternating when `--repeats` > 1.
Each arm writes a fresh artifact folder, so nothing is served from a cache; the stages run in a flow of
this process against the cluster's API, as a round's would.

Reported per arm: wall seconds of the data stages (the flow run, from its first task to its last), the
ratio of two workers to one (target <= 0.62), model loads per stage against the batch runs that stage
submitted, and in the whole round (target: equal; the prompts batches go on to the responses and
judgements on their engine, so those stages submit none), and per batch run its overhead: from the flow
run's creation (the submission) to its engine being ready to generate, i.e. worker pick-up, process
start, imports and the model load; the first token follows at once.

Every process here shares the machine's cores, so the report also says where each arm's CPU time went
(read from /proc, by command line: every such process on the machine counts, so run the bench alone): the
batch runs, and the control plane (the Prefect server, PostgreSQL, the workers'
own loops, and this process, which runs the round's flow). On a cluster the control plane runs on other
machines than the GPUs; here the CPU it takes during the two-worker arm comes out of the two "GPUs".
Beside it, the generation slowdown: the shards' generation seconds with two workers over one (1.0 when
two batch runs generate side by side as fast as one alone).

Writes bench/results/fanout.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cpu-smollm2.yaml")
DATA_STAGES = ("prompts", "responses", "judgements")
# One torch thread per worker process: two workers then use the two cores of a small machine, and a
# GPU worker's single device is what a thread stands for here.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def data_stages_flow() -> Any:
    """The round flow's first four stages (flows/sao_round.py), as a flow of its own."""
    from prefect import flow

    from flows.sao_round import data_stages

    @flow(name="bench-fanout-data-stages")
    def four_stages(config: str, overrides: list[str]) -> dict[str, Any]:
        ref, _ = data_stages(config, overrides)
        return {"round_dir": ref["round_dir"]}

    return four_stages


def batch_overheads(cluster: Any, records: list[dict[str, Any]]) -> list[float]:
    """Seconds from each batch run's submission to its engine being ready (batches that built one)."""
    out = []
    for record in records:
        ready = record.get("engine_ready_at") or []
        if not ready:
            continue
        run = cluster.get(f"/flow_runs/{record['flow_run_id']}")
        out.append(min(ready) - _when(run["created"]))
    return out


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _kind(cmdline: str) -> str | None:
    """Which part of the bench's cluster a process is, by its command line (None: not ours)."""
    if "prefect.engine" in cmdline:
        return "batch runs"
    if " server start" in cmdline and "prefect" in cmdline:
        return "server"
    if " worker start" in cmdline and "prefect" in cmdline:
        return "workers"
    if cmdline.startswith("postgres") or "/bin/postgres" in cmdline:
        return "postgres"
    return None


def _our_processes() -> list[tuple[str, list[str]]]:
    """(part, the fields of /proc/PID/stat after the command name) of every process of the cluster but
    this one; [] where there is no /proc. A batch run that has exited but is not reaped yet (a zombie: no
    command line, its CPU time still its own until its parent's wait adds it to the parent's) counts as
    a batch run while its parent is a worker or another batch-run process."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    seen: dict[int, tuple[str | None, list[str]]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        seen[int(entry.name)] = (_kind(cmdline), fields)
    out = []
    for kind, fields in seen.values():
        if kind is None and fields[0] == "Z":  # fields[0]: the state, fields[1]: the parent's pid
            parent = seen.get(int(fields[1]), (None, []))[0]
            kind = "batch runs" if parent in ("workers", "batch runs") else None
        if kind is not None:
            out.append((kind, fields))
    return out


def cpu_by_part() -> dict[str, float]:
    """CPU seconds used so far by each part of the cluster, and by this process ("round").

    A process's own time and that of its children it has reaped; a worker's reaped children are the
    batch runs it started, so they are counted there and not as the worker's. Linux only (only "round"
    elsewhere)."""
    out: dict[str, float] = {}
    for kind, fields in _our_processes():
        own, reaped = (int(fields[11]) + int(fields[12])) / TICKS, (int(fields[13]) + int(fields[14])) / TICKS
        out[kind] = out.get(kind, 0.0) + own
        reaped_kind = "batch runs" if kind == "workers" else kind
        out[reaped_kind] = out.get(reaped_kind, 0.0) + reaped
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["round"] = usage.ru_utime + usage.ru_stime
    return out


def batch_runs_alive() -> bool:
    return any(kind == "batch runs" for kind, _ in _our_processes())


def run_arm(
    cluster: Any, flow: Any, workers: int, root: Path, extra: list[str], personas: int, shard_size: int
) -> dict[str, Any]:
    from sao_core.store import shards, storage

    overrides = [
        f"run.root={root}",
        "fanout.mode=deployment",
        f"fanout.workers={workers}",
        "fanout.poll_interval_s=1",
        f"personas.n={personas}",
        f"run.shard_size={shard_size}",
        *extra,
    ]
    cpu_before = cpu_by_part()
    start = time.perf_counter()
    result = flow(CONFIG, overrides)
    wall = time.perf_counter() - start
    # A batch run reports its end before its process has exited: its CPU time counts once it is reaped.
    deadline = time.monotonic() + 60
    while batch_runs_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    cpu_after = cpu_by_part()
    cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in sorted(cpu_after)}
    round_dir = result["round_dir"]
    stages: dict[str, Any] = {}
    overheads: list[float] = []
    for stage in DATA_STAGES:
        records = [
            storage.read_json(url)
            for url in storage.list_files(storage.join(round_dir, "_batches", stage), "*.json")
        ]
        manifest = shards.read_stage_manifest(storage.join(round_dir, stage))
        stages[stage] = {
            "shards": manifest["num_shards"],
            "rows_out": manifest["rows_out"],
            "batch_runs": len(records),
            "model_loads": sum(r["engine_builds"] for r in records),
            "pids": sorted({r["pid"] for r in records}),
            "generation_s": round(float(manifest.get("seconds", 0.0)), 1),
        }
        overheads += batch_overheads(cluster, records)
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "stages": stages,
        "batch_overhead_s": [round(x, 1) for x in overheads],
        "cpu_s": cpu,
        "control_plane_cores": round(sum(v for k, v in cpu.items() if k != "batch runs") / wall, 3),
        "round_dir": round_dir,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--personas", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm, alternating")
    parser.add_argument(
        "--worker-query-s",
        type=float,
        default=1.0,
        help="how often each worker asks the server for runs (PREFECT_WORKER_QUERY_SECONDS): 1 s as in the "
        "cluster tests; Prefect's default is 10 s, fewer polls for the server to answer, a later pick-up",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from tests.cluster.harness import PG_BIN, local_cluster

    work = Path(tempfile.mkdtemp(prefix="sao-bench-fanout-"))
    logs = work / "logs"
    logs.mkdir()
    postgres = (PG_BIN / "initdb").exists()
    print(f"bench.fanout: logs in {logs}; server on {'PostgreSQL' if postgres else 'SQLite'}", flush=True)
    with local_cluster(
        logs,
        None,
        postgres=postgres,
        gpu_workers=("gpu-1", "gpu-2"),
        train_worker=False,
        worker_env={**ONE_THREAD, "PREFECT_WORKER_QUERY_SECONDS": str(args.worker_query_s)},
    ) as cluster:
        os.environ["PREFECT_API_URL"] = cluster.api
        os.environ["PREFECT_HOME"] = cluster.env["PREFECT_HOME"]
        flow = data_stages_flow()
        arms: list[dict[str, Any]] = []
        for r in range(args.repeats):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                print(f"bench.fanout: run {r + 1}, {workers} worker(s)", flush=True)
                arm = run_arm(
                    cluster,
                    flow,
                    workers,
                    work / f"root-{r}-{workers}",
                    args.overrides,
                    args.personas,
                    args.shard_size,
                )
                print(f"  {arm['wall_s']} s; {arm['stages']}", flush=True)
                arms.append(arm)
    report(arms, args, postgres)


def report(arms: list[dict[str, Any]], args: argparse.Namespace, postgres: bool) -> None:
    from bench.common import machine, write_report

    def walls(n: int) -> list[float]:
        return [a["wall_s"] for a in arms if a["workers"] == n]

    one, two = statistics.median(walls(1)), statistics.median(walls(2))
    ratio = round(two / one, 3)
    loads_ok = all(
        sum(s["model_loads"] for s in a["stages"].values())
        == sum(s["batch_runs"] for s in a["stages"].values())
        for a in arms
    )
    overheads = [x for a in arms for x in a["batch_overhead_s"]]

    def generation(n: int) -> float:
        return statistics.median(
            sum(s["generation_s"] for s in a["stages"].values()) for a in arms if a["workers"] == n
        )

    slowdown = round(generation(2) / generation(1), 3)
    payload = {
        "config": CONFIG,
        "personas": args.personas,
        "shard_size": args.shard_size,
        "worker_query_s": args.worker_query_s,
        "overrides": args.overrides,
        "server_database": "postgresql" if postgres else "sqlite",
        "arms": arms,
        "wall_s_median": {"1": one, "2": two},
        "ratio_two_to_one": ratio,
        "loads_equal_batch_runs": loads_ok,
        "generation_slowdown_two_to_one": slowdown,
        "batch_overhead_s_median": round(statistics.median(overheads), 1) if overheads else None,
        "machine": machine(),
    }
    rows = "\n".join(
        f"| {a['workers']} | {a['wall_s']} | "
        + "; ".join(f"{k} {s['batch_runs']} runs / {s['model_loads']} loads" for k, s in a["stages"].items())
        + f" | {', '.join(str(x) for x in a['batch_overhead_s'])} | "
        + ", ".join(f"{k} {v}" for k, v in a["cpu_s"].items())
        + f" | {a['control_plane_cores']} |"
        for a in arms
    )
    md = (
        "# Fan-out: the SmolLM2 data stages on one and two GPU-batch workers\n\n"
        f"`.venv/bin/python -m bench.fanout --personas {args.personas} --shard-size {args.shard_size} "
        f"--repeats {args.repeats} --worker-query-s {args.worker_query_s:g}` (one torch thread per worker, "
        f"server on {payload['server_database']}).\n\n"
        "| workers | wall s | batch runs / model loads per stage | batch overhead s (submission to engine "
        "ready) | CPU s by part | control plane, cores |\n"
        f"|---|---|---|---|---|---|\n{rows}\n\n"
        f"Two workers over one: **{ratio}** (target <= 0.62). Model loads equal to batch runs in the "
        f"whole round: **{loads_ok}**. Median batch overhead: {payload['batch_overhead_s_median']} s. "
        f"Generation slowdown (the shards' generation seconds, two workers over one): **{slowdown}**; the "
        "control plane's cores are its CPU seconds over the arm's wall time, taken from the two cores the "
        "batch runs share.\n\n"
        f"{payload['machine']}\n"
    )
    path = write_report("fanout", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
