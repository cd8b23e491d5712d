"""Fan-out polling at the paper's size, without a Prefect server: what a poll reads, how soon a crash is resent.

    .venv/bin/python -m bench.fanout_polling [--personas 60000] [--shard-size 2000] [--workers 4 16]
                                             [--poll-s 1.0] [--shard-s 1.0]

A round of configs/tiny.yaml (fake engine) at `--personas` rows in `--shard-size` shards gets its personas
and prompts written here; then the responses stage runs through tasks/fanout.run_on_deployment as a round
with `fanout.mode=deployment` would, with the judgements chained onto the same batch runs. The batch runs
are threads standing in for gpu-batch flow runs (SimulatedRuns: the interface of fanout.DeploymentRuns):
each writes its shards with the fake engine, holding each shard `--shard-s` seconds longer (a GPU's
time), and batch 0's first try crashes after its first shard. The rest is the real code: the shard
runner, the store, the listing and the final verification.

Reported per worker count:
- bytes of shard data and manifests a poll reads (target: under 1 MB), and how many files its listing
  names; beside it, what the earlier poll (verify every finished shard: `missing_shards`) reads once the
  stage is done, measured on the same folder;
- seconds from batch 0's crash to its resubmission (target: under two poll intervals);
- every shard of both stages verified at the end, and the model loads (one per batch run).

Writes bench/results/fanout_polling.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


class ReadCounter:
    """Bytes read through the store, counted for the thread that asks (the fan-out's, not the batches')."""

    def __init__(self) -> None:
        self.counting: int | None = None  # the thread id being counted
        self.bytes = 0
        self.files = 0

    def install(self) -> None:
        from sao_core.store import shards, storage

        read_bytes = storage.read_bytes

        def counted(url: str) -> bytes:
            data = read_bytes(url)
            if self.counting == threading.get_ident():
                self.bytes += len(data)
                self.files += 1
            return data

        storage.read_bytes = counted  # read_json and read_text go through it
        shards.read_bytes = counted  # the shard runner's verify_shard imported it by name

    def measure(self, fn: Any) -> tuple[Any, int, int]:
        self.counting, self.bytes, self.files = threading.get_ident(), 0, 0
        try:
            out = fn()
        finally:
            self.counting = None
        return out, self.bytes, self.files


class SimulatedRuns:
    """gpu-batch flow runs as threads: submit, final_state, stop (tasks.fanout.DeploymentRuns)."""

    def __init__(self, cfg: Any, round_dir: str, shard_s: float) -> None:
        self.cfg, self.round_dir, self.shard_s = cfg, round_dir, shard_s
        self.runs: dict[UUID, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def submit(
        self, deployment: str, parameters: dict[str, Any], key: str, name: str, tags: list[str]
    ) -> UUID:
        run_id = uuid4()
        run = {"params": parameters, "submitted": time.monotonic(), "state": None, "ended": None, "builds": 0}
        self.runs[run_id] = run
        threading.Thread(target=self._run, args=(run,), daemon=True).start()
        return run_id

    def _run(self, run: dict[str, Any]) -> None:
        from sao_core.engines.provider import EngineProvider
        from sao_core.stages.runner import run_shard

        p = run["params"]
        engines = EngineProvider(self.cfg)  # one engine per run, as one gpu-batch process holds
        state = "COMPLETED"
        try:
            for n, index in enumerate(p["shards"]):
                if p["batch"] == 0 and p["attempt"] == 1 and n == 1:
                    state = "CRASHED"  # the process died after its first shard
                    break
                time.sleep(self.shard_s)
                for stage in p.get("stages") or [p["stage"]]:
                    run_shard(stage, self.cfg, self.round_dir, index, engines)
        except Exception as e:  # a failed shard fails the run, as in a flow run
            logging.getLogger("bench").warning("batch %s failed: %s", p["batch"], e)
            state = "FAILED"
        finally:
            engines.close()
        run["builds"] = engines.builds
        run["ended"] = time.monotonic()
        run["state"] = state

    def final_state(self, run_id: UUID) -> str | None:
        state: str | None = self.runs[run_id]["state"]
        return state

    def stop(self, run_id: UUID) -> None:  # batch_timeout_s is far off here
        raise AssertionError("no batch should time out in this simulation")


def prepare(personas: int, shard_size: int, root: Path) -> tuple[Any, str]:
    from sao_core.engines.provider import EngineProvider
    from sao_core.stages.no_model import run_personas
    from sao_core.stages.runner import run_model_stage
    from sao_core.store.layout import load_config, prepare_round

    cfg = load_config(TINY, [f"run.root={root}", f"personas.n={personas}", f"run.shard_size={shard_size}"])
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    engines = EngineProvider(cfg)
    run_model_stage("prompts", cfg, round_dir, engines)
    engines.close()
    return cfg, round_dir


def run_arm(cfg: Any, round_dir: str, workers: int, poll_s: float, shard_s: float) -> dict[str, Any]:
    import tasks.fanout as fanout
    from sao_core.config import build_config
    from sao_core.store.layout import num_shards, stage_settings_hash

    cfg = build_config(
        cfg.model_dump(mode="json"),
        [f"fanout.workers={workers}", f"fanout.poll_interval_s={poll_s}", "fanout.mode=deployment"],
    )
    runs = SimulatedRuns(cfg, round_dir, shard_s)
    counter = ReadCounter()
    counter.install()
    polls: list[dict[str, int]] = []
    listed = fanout.listed_shards

    def measured_listing(stages: Any, folder: str) -> set[int]:
        from sao_core.store import storage

        found, nbytes, nfiles = counter.measure(lambda: listed(stages, folder))
        entries = sum(
            len(storage.list_files(storage.join(fanout.output_url(folder, s), "_shards"), "part-*.json"))
            for s in stages
        )
        polls.append({"bytes": nbytes, "files_read": nfiles, "listed": entries})
        return found

    # The fan-out's seams: its runs, its logger (no Prefect run here) and its listing, measured.
    setattr(fanout, "open_runs", lambda: nullcontext(runs))  # noqa: B010
    setattr(fanout, "get_run_logger", lambda: logging.getLogger("bench.fanout_polling"))  # noqa: B010
    setattr(fanout, "listed_shards", measured_listing)  # noqa: B010
    total = num_shards(round_dir, "responses")
    ref = {
        "round_dir": round_dir,
        "config_url": f"{round_dir}/resolved_config.yaml",
        "shard_timeout_s": 3600.0,
        "round": 1,
    }
    start = time.monotonic()
    try:
        tries = fanout.run_on_deployment(
            "responses",
            cfg,
            ref,
            stage_settings_hash(cfg, "responses"),
            total,
            lambda done: None,
            then=[("judgements", stage_settings_hash(cfg, "judgements"))],
        )
    finally:
        setattr(fanout, "listed_shards", listed)  # noqa: B010
    wall = time.monotonic() - start
    crashed = [r for r in runs.runs.values() if r["state"] == "CRASHED"]
    retry = [r for r in runs.runs.values() if r["params"]["batch"] == 0 and r["params"]["attempt"] == 2]
    resubmit_s = retry[0]["submitted"] - crashed[0]["ended"] if crashed and retry else None
    slowest = max(r["ended"] for r in runs.runs.values()) - start
    # What the earlier poll read: every finished shard downloaded and hashed, once the stage is done.
    _, old_bytes, old_files = counter.measure(
        lambda: fanout.missing_in_chain(["responses", "judgements"], cfg, round_dir, list(range(total)))
    )
    missing = fanout.missing_in_chain(["responses", "judgements"], cfg, round_dir, list(range(total)))
    return {
        "workers": workers,
        "shards": total,
        "polls": len(polls),
        "poll_bytes_max": max(p["bytes"] for p in polls),
        "poll_bytes_median": statistics.median(p["bytes"] for p in polls),
        "poll_listed_files_max": max(p["listed"] for p in polls),
        "old_poll_bytes": old_bytes,
        "old_poll_files": old_files,
        "crash_to_resubmit_s": round(resubmit_s, 2) if resubmit_s is not None else None,
        "crash_at_s": round(crashed[0]["ended"] - start, 2) if crashed else None,
        "slowest_batch_end_s": round(slowest, 1),
        "wall_s": round(wall, 1),
        "batch_runs": len(runs.runs),
        "model_loads": sum(r["builds"] for r in runs.runs.values()),
        "tries": [[(r["batch"], r["state"]) for r in t["runs"]] for t in tries],
        "missing_after": missing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--personas", type=int, default=60_000)
    parser.add_argument("--shard-size", type=int, default=2_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--shard-s", type=float, default=1.0, help="extra seconds each shard holds its run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    arms = []
    with tempfile.TemporaryDirectory(prefix="sao-bench-polling-") as tmp:
        start = time.monotonic()
        _, round_dir = prepare(args.personas, args.shard_size, Path(tmp) / "base")
        print(f"personas and prompts: {time.monotonic() - start:.1f} s", flush=True)
        for workers in args.workers:
            # Each arm on a copy of the prepared round: its responses and judgements start from nothing.
            import shutil

            root = Path(tmp) / f"w{workers}"
            shutil.copytree(Path(tmp) / "base", root)
            arm_dir = round_dir.replace(str(Path(tmp) / "base"), str(root))
            from sao_core.store.layout import load_config

            arm_cfg = load_config(f"{arm_dir}/resolved_config.yaml")
            arm = run_arm(arm_cfg, arm_dir, workers, args.poll_s, args.shard_s)
            print(arm, flush=True)
            arms.append(arm)
    report(arms, args)


def report(arms: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from bench.common import machine, write_report

    ok_bytes = all(a["poll_bytes_max"] < 1_000_000 for a in arms)
    ok_resubmit = all(
        a["crash_to_resubmit_s"] is not None and a["crash_to_resubmit_s"] < 2 * args.poll_s for a in arms
    )
    payload = {
        "personas": args.personas,
        "shard_size": args.shard_size,
        "poll_s": args.poll_s,
        "shard_s": args.shard_s,
        "arms": arms,
        "poll_under_1mb": ok_bytes,
        "resubmit_under_two_polls": ok_resubmit,
        "machine": machine(),
    }
    rows = "\n".join(
        f"| {a['workers']} | {a['shards']} | {a['polls']} | {a['poll_bytes_max']} | {a['poll_listed_files_max']} | "
        f"{a['old_poll_bytes'] / 1e6:.1f} MB ({a['old_poll_files']} files) | {a['crash_at_s']} | "
        f"{a['crash_to_resubmit_s']} | {a['slowest_batch_end_s']} | {a['batch_runs']} / {a['model_loads']} | "
        f"{'none' if not a['missing_after'] else a['missing_after']} |"
        for a in arms
    )
    md = (
        "# Fan-out polling at the paper's size (simulated batch runs, real store and runner)\n\n"
        f"`.venv/bin/python -m bench.fanout_polling --personas {args.personas} --shard-size {args.shard_size} "
        f"--workers {' '.join(map(str, args.workers))} --poll-s {args.poll_s} --shard-s {args.shard_s}` "
        "(responses with judgements chained on the same runs; batch 0 crashes after its first shard).\n\n"
        "| workers | shards | polls | bytes read per poll (max) | manifests listed per poll | "
        "earlier poll (verify all) | crash at s | crash to resubmission s | slowest batch ends s | "
        "batch runs / model loads | missing after |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Every poll under 1 MB: **{ok_bytes}**. Crash to resubmission under two poll intervals "
        f"({2 * args.poll_s} s): **{ok_resubmit}**.\n\n{payload['machine']}\n"
    )
    path = write_report("fanout_polling", payload, md)
    print(md)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
