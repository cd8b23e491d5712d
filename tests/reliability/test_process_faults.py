"""Processes killed mid-way, and a re-run that completes the round without redoing finished work.

- `sao run` SIGKILLed (its whole process group, the temporary Prefect server with it) while the
  responses stage is part-way: the re-run completes the round; the shards finished before the kill keep
  their manifests byte for byte and their write times, are not generated again, the shard being written
  at the kill is taken over from the dead process's claim and written once; every count exact, id by id;
- `sao train` SIGKILLed mid-epoch after a checkpoint: the re-run resumes from the last checkpoint
  (resumed_from_step > 0), trains to training.max_steps and records every row trained, before and after
  the kill: the same rows, tokens and steps as a run never killed;
- launched training ranks stop once the `sao train` that launched them is SIGKILLed;
- the Prefect server stopped while a round's responses are part-way (written by the prompts stage's batch
  run, which goes on to the responses and judgements on its engine), on a real cluster
  (PostgreSQL, `prefect server`, `sao deploy`, process workers; tests/cluster/harness.py), each case
  with its outcome set by the round's client retries (PREFECT_CLIENT_MAX_RETRIES), not by timing:
  - restarted, with retries that outlast the restart: the round completes in its first run, no batch
    is submitted twice;
  - kept down until a round with few retries has given up: the round is Crashed, its own output names
    the prompts stage (waiting on its batch run) and the lost API, and a second run completes it from
    what the first left;
  either way the shards finished before the stop are not written again and every row is there once.

    .venv/bin/python -m pytest -q tests/reliability/test_process_faults.py -k "not prefect"   # ~1 min
    .venv/bin/python -m pytest -q tests/reliability/test_process_faults.py -k prefect         # SLOW: ~5.5 min

On 2 cores: sao run killed ~35 s, sao train killed ~20 s, server restarted ~110 s, server outage ~210 s.

The shards and training steps are slowed down, and the responses stage held part-way, by a start-up hook
(sitecustomize on PYTHONPATH, tests/reliability/conftest.py) so that a kill or a stop lands part-way;
the commands are the installed `sao` and `prefect`, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from sao_core.campaign import planning
from sao_core.stages.synth import run_synth
from sao_core.store import locks, shards, storage
from sao_core.store.layout import MODEL_STAGES, load_config, output_url, round_url, shard_claim_url
from sao_core.training import default_output_url
from sao_core.training.outputs import last_checkpoint, train_claim_url
from tests.cluster.harness import CRON, FINAL, PG_BIN, TIMEZONE, local_cluster, state_type, worker_children
from tests.procs import healthy, kill_group, start, stop, wait_exit, wait_for, wait_healthy
from tests.round_checks import changed_since, check_round_by_ids, shard_lines, snapshot

pytestmark = pytest.mark.tier1

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SAO = str(BIN / "sao")
TINY = str(REPO / "configs" / "tiny.yaml")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --- a shard runner SIGKILLed mid-shard ------------------------------------------------------------------


def test_sao_run_killed_mid_shard_resumes_without_redoing_finished_shards(
    tmp_path: Path, hook_env: dict[str, str]
):
    overrides = [
        f"run.root={tmp_path / 'root'}",
        "personas.n=16",
        "evaluation.enabled=false",
    ]  # 4 shards a stage
    cfg = load_config(TINY, overrides)
    round_dir = round_url(cfg)
    argv = [SAO, "-v", "run", "--config", TINY, *sets(overrides)]
    responses = output_url(round_dir, "responses")
    log = tmp_path / "killed.log"
    proc = start(argv, {**hook_env, "SAO_TEST_GENERATE_DELAY_S": "1.0"}, log)

    def part_way() -> int | None:
        """The responses shard being written while some before it are done: (done) shards, claimed next."""
        done = [i for i in range(4) if storage.exists(shards.shard_manifest_url(responses, i))]
        if 1 <= len(done) < 4 and done == list(range(len(done))):
            claimed = len(done)
            if storage.exists(shard_claim_url(round_dir, "responses", claimed)):
                return claimed + 1  # +1: 0 is not true
        return None

    try:
        killed_shard = wait_for("a responses shard part-way", part_way, proc, log) - 1
    finally:
        kill_group(proc)
    first = log.read_text()
    assert "round folder:" not in first, first[-3000:]
    finished = list(range(killed_shard))
    assert shards.read_shard_manifest(responses, killed_shard) is None  # killed before it was written
    left = locks.read_lease(shard_claim_url(round_dir, "responses", killed_shard))
    assert left is not None and locks.stale_reason(left) == f"its process {left['pid']} is gone", left
    before = snapshot(
        round_dir, "*/_shards/*.json", "*/_candidates/_shards/*.json", "*/manifest.json", "*/part-*"
    )
    # The killed shard's own file may be there without its manifest (killed between the two): not done.
    before = {p: v for p, v in before.items() if f"/responses/part-{killed_shard:05d}." not in p}
    assert sorted(p for p in before if "/responses/_shards/" in p) == [
        shards.shard_manifest_url(responses, i) for i in finished
    ]

    rerun_log = tmp_path / "rerun.log"
    text = wait_exit(start(argv, hook_env, rerun_log), rerun_log)
    assert f"round folder: {round_dir}" in text

    # Nothing finished before the kill was written again: same bytes, same write time.
    assert changed_since(before) == []
    # Shards generated by the re-run: the killed one and the ones after it, once each; nothing of prompts.
    written = Counter(shard_lines(text))
    expected = {("responses", i) for i in range(killed_shard, 4)} | {("judgements", i) for i in range(4)}
    assert set(written) == expected and set(written.values()) == {1}, (written, finished)
    assert re.search(
        rf"responses shard {killed_shard}: took over .* its process {left['pid']} is gone", text
    ), text[-4000:]

    kept = check_round_by_ids(round_dir)
    assert kept["judgements"] == 16 and kept["pairs"] > 0, kept
    model = storage.read_json(storage.join(default_output_url(cfg), "manifest.json"))
    assert model["complete"] and model["steps"] == cfg.training.max_steps
    assert storage.exists(storage.join(round_dir, "report.md"))
    leftover = storage.list_files(round_dir, "*/_claims/*") + storage.list_files(round_dir, "*/*/_claims/*")
    assert leftover == [], leftover


# --- the trainer SIGKILLed mid-epoch ---------------------------------------------------------------------


def test_sao_train_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path: Path, hook_env: dict[str, str]):
    overrides = [f"run.root={tmp_path / 'root'}", "personas.n=16", "evaluation.enabled=false"]
    pairs_url = run_synth(load_config(TINY, overrides)).pairs_url
    training = ["training.max_steps=10", "training.checkpoint_steps=2", "training.save_total_limit=2"]
    argv = [SAO, "train", "--config", TINY, *sets(overrides + training), "--pairs", pairs_url]
    killed_out, clean_out = tmp_path / "model-killed", tmp_path / "model-clean"

    log = tmp_path / "killed.log"
    proc = start(
        [*argv, "--output", str(killed_out)], {**hook_env, "SAO_TEST_TRAIN_STEP_DELAY_S": "0.5"}, log
    )

    def past_step_4() -> Path | None:
        found = last_checkpoint(killed_out / "checkpoints")
        return found if found is not None and int(found.name[11:]) >= 4 else None

    try:
        wait_for("a checkpoint at step 4", past_step_4, proc, log)
    finally:
        kill_group(proc)
    assert not (killed_out / "manifest.json").exists(), log.read_text()[-3000:]
    resumable = last_checkpoint(killed_out / "checkpoints")
    assert resumable is not None
    step = int(resumable.name[11:])
    assert 4 <= step < 10, step
    assert locks.stale_reason(locks.read_lease(train_claim_url(str(killed_out)))) is not None

    rerun_log = tmp_path / "rerun.log"
    text = wait_exit(start([*argv, "--output", str(killed_out)], hook_env, rerun_log), rerun_log)
    assert f"resuming from {resumable.name} (step {step})" in text, text[-3000:]
    assert re.search(r"training into .*: took over .* its process \d+ is gone", text), text[-3000:]
    clean_log = tmp_path / "clean.log"
    wait_exit(start([*argv, "--output", str(clean_out)], hook_env, clean_log), clean_log)

    resumed = json.loads((killed_out / "manifest.json").read_text())
    clean = json.loads((clean_out / "manifest.json").read_text())
    assert resumed["complete"] is True and resumed["steps"] == clean["steps"] == 10
    assert (resumed["resumed_from"], resumed["resumed_from_step"]) == (resumable.name, step)
    assert resumed["rows_counted_from_start"] is True and clean["resumed_from_step"] == 0
    # Every row trained is counted, those before the kill too: the rows of a run never killed, in order.
    ranks_resumed = json.loads((killed_out / "ranks.json").read_text())
    ranks_clean = json.loads((clean_out / "ranks.json").read_text())
    assert [r["rows"] for r in ranks_resumed] == [r["rows"] for r in ranks_clean]
    # By hand: one process, batches of 1, accumulation 2, so an epoch of N pairs is ceil(N / 2) steps,
    # the last one of a single row when N is odd; 10 steps are `full` whole epochs and `rest` steps more.
    n = resumed["rows"]
    full, rest = divmod(10, -(-n // 2))
    trained = full * n + min(2 * rest, n)
    assert len(ranks_resumed[0]["rows"]) == trained
    assert [r["rows"] for r in resumed["ranks"]] == [r["rows"] for r in clean["ranks"]] == [trained]
    assert resumed["tokens"] == clean["tokens"] and resumed["rows"] == clean["rows"]
    # The train log holds every step, from the checkpoint's history and after it, as the clean run's.
    log_resumed = json.loads((killed_out / "train_log.json").read_text())["steps"]
    log_clean = json.loads((clean_out / "train_log.json").read_text())["steps"]
    assert [s["step"] for s in log_resumed] == [s["step"] for s in log_clean] == list(range(1, 11)), (
        log_resumed
    )
    for a, b in zip(log_resumed, log_clean, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
    assert not (killed_out / "_claims" / "train.json").exists()


def test_launched_ranks_stop_when_the_process_that_launched_them_is_killed(tmp_path: Path):
    """`sao train` with accelerate or torchrun starts its ranks in a session of their own; SIGKILLed, it
    cannot stop them, so each rank watches it and exits (sao_core.training.run.stop_with_launcher)."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    rank_code = (
        "import sys, time\n"
        "from sao_core.training.run import stop_with_launcher\n"
        "stop_with_launcher(int(sys.argv[1]), every_s=0.1)\n"
        "print('training', flush=True)\n"
        "time.sleep(120)\n"
    )
    rank = subprocess.Popen(
        [sys.executable, "-c", rank_code, str(launcher.pid)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert rank.stdout is not None and rank.stdout.readline() == "training\n"
        assert rank.poll() is None  # the launcher lives: the rank trains on
        launcher.kill()
        launcher.wait()
        started = time.monotonic()
        assert rank.wait(timeout=30) == 1
        assert time.monotonic() - started < 10
        assert f"(pid {launcher.pid}) is gone: stopping this rank" in rank.stdout.read()
    finally:
        for proc in (launcher, rank):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- the Prefect server restarted while a round runs -----------------------------------------------------

SHARDS = 6  # personas.n=24 in shards of 4: 6 shards a stage
# Prefect's client (prefect/client/base.py) retries a request whose connection was refused
# PREFECT_CLIENT_MAX_RETRIES times, once it has reached the server before, waiting about 2, 4, 8, ... s.
# The cluster's workers and the flow runs they start get 9 retries (~17 min): they ride out any outage
# here. A round given 2 (~6 s a request) gives up on an outage that outlasts its stage task's one retry.
RIDE_OUT_RETRIES, GIVE_UP_RETRIES = "9", "2"


@dataclass
class RoundOnCluster:
    """A round of tiny.yaml on a real cluster (tests/cluster/harness.py), its responses stage held."""

    cluster: Any
    overrides: list[str]
    round_dir: str
    hold: Path  # while it exists, the scripted engine starts no shard (tests/reliability/conftest.py)

    def done(self, stage: str) -> list[int]:
        out = output_url(self.round_dir, stage)
        return [i for i in range(SHARDS) if storage.exists(shards.shard_manifest_url(out, i))]

    def hold_responses_part_way(self, run_id: str) -> list[int]:
        """Once the first responses shard is written, hold the others: the stage cannot finish until the
        hold is lifted. Returns the responses shards finished by then."""
        deadline = time.monotonic() + 300
        while not self.done("responses"):
            state = state_type(self.cluster.read_run(run_id))
            assert state not in FINAL, f"round ended {state} before its responses\n{self.cluster.log_tails()}"
            assert time.monotonic() < deadline, f"no responses shard after 300 s\n{self.cluster.log_tails()}"
            time.sleep(0.1)
        self.hold.touch()
        done = self.done("responses")
        assert 1 <= len(done) < SHARDS, done
        return done

    def batch_runs(self, stage: str) -> list[dict[str, Any]]:
        """The gpu-batch flow runs submitted for one stage of this round, by any run of it."""
        runs = self.cluster.post(
            "/flow_runs/filter", {"flow_runs": {"name": {"like_": f"{stage}-batch-"}}, "limit": 200}
        )
        return [r for r in runs if (r.get("parameters") or {}).get("round_dir") == self.round_dir]

    def check_complete(self) -> None:
        """Every row once, id by id; the model trained; each shard written by one batch run."""
        kept = check_round_by_ids(self.round_dir)
        assert kept["judgements"] == 4 * SHARDS, kept
        # The round deployment plans its round as the campaign's next (tasks/campaign.plan_round), which
        # may change the training section (training.merge), so its model is found as `sao promote` does.
        model = storage.read_json(storage.join(planning.round_model(self.round_dir), "manifest.json"))
        assert model["complete"] and model["steps"] == load_config(TINY, self.overrides).training.max_steps
        # The responses and judgements run on the prompts' batch runs (tasks/shards.SAME_ENGINE_NEXT): no
        # records of their own, and each prompts record lists the three stages.
        records = {
            stage: [
                storage.read_json(u)
                for u in storage.list_files(storage.join(self.round_dir, "_batches", stage), "*.json")
            ]
            for stage in MODEL_STAGES
        }
        assert records["responses"] == [] == records["judgements"], records
        written = Counter(i for r in records["prompts"] for i in r["shards"])
        assert set(written) == set(range(SHARDS)) and set(written.values()) == {1}, records
        assert all(r["stages"] == list(MODEL_STAGES) for r in records["prompts"]), records


@contextlib.contextmanager
def round_on_cluster(tmp_path: Path, hook_env: dict[str, str]) -> Iterator[RoundOnCluster]:
    """A cluster on PostgreSQL with one gpu-batch worker, each shard slowed to 1 s; no crash automation
    in the way (a heartbeat grace of an hour): what happens here is the outage's doing alone."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL at {PG_BIN} (set SAO_POSTGRES_BIN)")
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    hold = tmp_path / "hold-generation"
    overrides = [
        f"run.root={tmp_path / 'root'}",
        "fanout.mode=deployment",
        "fanout.workers=1",
        "fanout.poll_interval_s=1",
        f"personas.n={4 * SHARDS}",
        "evaluation.enabled=false",
    ]
    worker_env = {
        "PYTHONPATH": hook_env["PYTHONPATH"],
        "SAO_TEST_GENERATE_DELAY_S": "1.0",
        "SAO_TEST_GENERATE_HOLD_FILE": str(hold),
        "PREFECT_CLIENT_MAX_RETRIES": RIDE_OUT_RETRIES,
    }
    deploy_args = ("--cron", CRON, "--timezone", TIMEZONE, "--heartbeat-grace-s", "3600")
    with local_cluster(
        logs,
        None,
        postgres=True,
        gpu_workers=("gpu-a",),
        train_worker=False,
        worker_env=worker_env,
        deploy_args=deploy_args,
    ) as cluster:
        yield RoundOnCluster(cluster, overrides, round_url(load_config(TINY, overrides)), hold)


@dataclass
class StoppedServer:
    """A cluster's `prefect server`, stopped: what it takes to start it again as it was."""

    api: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stopped_at: float


def stop_server(cluster: Any) -> StoppedServer:
    """Stop the cluster's `prefect server` (SIGINT, as harness.local_cluster stops it) and wait until its
    API is gone."""
    port = cluster.api.rsplit(":", 1)[1].split("/")[0]
    [server] = [
        p
        for p in psutil.Process().children()
        if {"server", "start"} <= set(p.cmdline()) and port in p.cmdline() and "worker" not in p.cmdline()
    ]
    stopped = StoppedServer(cluster.api, server.cmdline(), server.environ(), server.cwd(), time.monotonic())
    stop(server, grace_s=30)
    while healthy(f"{cluster.api}/health"):
        time.sleep(0.2)
    return stopped


@contextlib.contextmanager
def started_again(stopped: StoppedServer, log: Path) -> Iterator[float]:
    """The stopped server started with the same command, environment and database on the same port;
    yields once it is healthy, with how long its API was away; stopped again on the way out."""
    again = start(stopped.argv, stopped.env, log, cwd=stopped.cwd, new_session=False)
    try:
        wait_healthy(f"{stopped.api}/health", again, log, what="restarted prefect server")
        yield time.monotonic() - stopped.stopped_at
    finally:
        stop(again)


def round_process_of(cluster: Any, run_id: str) -> Any:
    """The process the cpu worker started for a round's flow run (its infrastructure_pid), psutil's."""
    pid = int(str(cluster.read_run(run_id)["infrastructure_pid"]).rsplit(":", 1)[-1])
    [process] = [p for p in worker_children(cluster, "cpu") if p.pid == pid]
    return process


def test_a_prefect_server_restart_mid_round_is_ridden_out(tmp_path: Path, hook_env: dict[str, str]):
    """The server stopped while the responses are part-way and started again; the round's requests
    wait for it (their retries outlast the restart): the first run completes, no stage resubmits a batch,
    nothing finished before the restart is written again."""
    with round_on_cluster(tmp_path, hook_env) as r:
        run_id = r.cluster.trigger_round(TINY, r.overrides)
        done_at_stop = r.hold_responses_part_way(run_id)
        finished = snapshot(r.round_dir, "*/_shards/*.json", "*/_candidates/_shards/*.json")
        stopped = stop_server(r.cluster)
        with started_again(stopped, r.cluster.logs / "server.log") as away_s:
            r.hold.unlink()
            run = r.cluster.wait_final(run_id)
            assert state_type(run) == "COMPLETED", f"{run['state']}\n{r.cluster.log_tails()}"
            batches = {stage: r.batch_runs(stage) for stage in MODEL_STAGES}
    # The responses and judgements ran on the prompts' batch run (tasks/shards.SAME_ENGINE_NEXT).
    assert batches.pop("responses") == [] == batches.pop("judgements")
    assert [(b["name"], state_type(b)) for b in batches["prompts"]] == [
        ("prompts-batch-00-try-1", "COMPLETED")
    ]
    assert changed_since(finished) == []
    r.check_complete()
    print(f"\nserver restart: API away {away_s:.0f} s with responses shards {done_at_stop} done", flush=True)


def test_a_round_that_gives_up_on_a_prefect_outage_crashes_and_a_rerun_completes_it(
    tmp_path: Path, hook_env: dict[str, str]
):
    """The server stopped while the responses are part-way and kept down until the round has given up:
    its requests run out of retries (PREFECT_CLIENT_MAX_RETRIES=2 in its job's environment), its prompts
    task (waiting on the batch run that goes on to the responses and judgements) fails twice, it cannot
    report that and exits 1, and its worker reports it Crashed once the server is back. Its batch run,
    which rides out the outage, finishes the data path. A second run completes the round with what the
    first left: no batch again, every shard written once."""
    with round_on_cluster(tmp_path, hook_env) as r:
        env = {
            "PREFECT_CLIENT_MAX_RETRIES": GIVE_UP_RETRIES,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        # Its stage gives up on polls unanswered for 10 s, not the default 120 s: fanout.outage_s is what
        # a user shortens too, and the outcome is the same, sooner (fanout is not in the round's hash).
        quick = [*r.overrides, "fanout.outage_s=10"]
        first_id = r.cluster.trigger_round(TINY, quick, job_variables={"env": env})
        done_at_stop = r.hold_responses_part_way(first_id)
        before_stop = snapshot(r.round_dir, "*/_shards/*.json", "*/_candidates/_shards/*.json")
        round_process = round_process_of(r.cluster, first_id)
        stopped = stop_server(r.cluster)
        _, alive = psutil.wait_procs([round_process], timeout=300)
        assert not alive, f"the round has not given up with the server down\n{r.cluster.log_tails()}"
        r.hold.unlink()
        with started_again(stopped, r.cluster.logs / "server.log") as away_s:
            first = r.cluster.wait_final(first_id)
            assert state_type(first) == "CRASHED", f"{first['state']}\n{r.cluster.log_tails()}"
            assert "exited with non-zero status code 1" in first["state"]["message"], first["state"]
            # What failed, in the round's own output (its worker's log): the prompts stage, which waits on
            # its batch run through the responses and judgements, on the API, after its one retry.
            task = f"Task run 'prompts-round-{load_config(TINY, r.overrides).run.round}'"
            out = r.cluster.worker_log("cpu")
            for line in (
                rf"{task} - Task run failed with exception: ConnectError\(.*\) - Retries are exhausted",
                rf"{task} - Finished in state Failed\('Task run encountered an exception ConnectError",
            ):
                assert re.search(line, out), f"{line}\n{out[-6000:]}"
            # The batch run finishes its stages (prompts, responses, then judgements on the same engine)
            # whatever became of the round that submitted it.
            [batch] = r.batch_runs("prompts")
            assert state_type(r.cluster.wait_final(batch["id"])) == "COMPLETED"
            assert r.done("responses") == list(range(SHARDS)) == r.done("judgements")
            finished = snapshot(r.round_dir, "*/_shards/*.json", "*/_candidates/_shards/*.json", "*/part-*")

            second = r.cluster.wait_final(r.cluster.trigger_round(TINY, r.overrides))
            assert state_type(second) == "COMPLETED", f"{second['state']}\n{r.cluster.log_tails()}"
            batches = {stage: r.batch_runs(stage) for stage in MODEL_STAGES}
    # The batch the first run left running was not submitted again; no later stage had one of its own.
    assert batches.pop("responses") == [] == batches.pop("judgements")
    assert [(b["name"], state_type(b)) for b in batches["prompts"]] == [
        ("prompts-batch-00-try-1", "COMPLETED")
    ]
    assert changed_since(before_stop) == [] and changed_since(finished) == []
    r.check_complete()
    print(
        f"\nserver outage: API away {away_s:.0f} s with responses shards {done_at_stop} done; "
        "first run Crashed, second Completed",
        flush=True,
    )
