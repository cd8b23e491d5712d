"""Processes killed mid-way, and a re-run that completes the round without redoing finished work.

- `sao run` SIGKILLed (its whole process group, the temporary Prefect server with it) while the
  responses stage is part-way: the re-run completes the round; the shards finished before the kill keep
  their manifests byte for byte and their write times, are not generated again, the shard being written
  at the kill is taken over from the dead process's claim and written once; every count exact, id by id;
- `sao train` SIGKILLed mid-epoch after a checkpoint: the re-run resumes from the last checkpoint
  (resumed_from_step > 0), trains to training.max_steps and records every row trained, before and after
  the kill: the same rows, tokens and steps as a run never killed;
- launched training ranks stop once the `sao train` that launched them is SIGKILLed;
- the Prefect server restarted while a round runs on a real cluster (PostgreSQL, `prefect server`,
  `sao deploy`, process workers; tests/cluster/harness.py), away 20 s and then 120 s: the round
  completes, or fails naming what failed and a second trigger completes it; either way the shards
  finished before the restart are not written again.

    .venv/bin/python -m pytest -q tests/reliability/test_process_faults.py -k "not outage"   # ~2.5 min
    .venv/bin/python -m pytest -q tests/reliability/test_process_faults.py -k outage         # SLOW: ~3.5 min

On 2 idle cores: sao run killed ~30 s, sao train killed 15-60 s, server restart (20 s away) ~90 s,
server outage (120 s away) ~200 s.

The shards and training steps are slowed down by a start-up hook (sitecustomize on PYTHONPATH) so that a
kill lands part-way; the commands are the installed `sao`, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sao_core import campaign, locks, storage
from sao_core.config import load_config, round_url
from sao_core.pipeline import run_synth
from sao_core.stages.layout import (
    MODEL_STAGES,
    input_stage,
    num_shards,
    output_url,
    shard_claim_url,
    stage_url,
)
from sao_core.training import default_output_url
from sao_core.training.outputs import last_checkpoint, train_claim_url

pytestmark = pytest.mark.tier1

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SAO = str(BIN / "sao")
TINY = str(REPO / "configs" / "tiny.yaml")
ID_KEY = {"prompts": "persona_id", "responses": "prompt_id", "judgements": "prompt_id"}

# Loaded at start-up by every Python process given this folder on PYTHONPATH: slows the scripted engine's
# calls (one per shard) and the trainer's steps, so that a kill lands part-way.
SITECUSTOMIZE = """
import os, time
_delay = float(os.environ.get("SAO_TEST_GENERATE_DELAY_S") or 0)
if _delay:
    from sao_core.engines import fake as _fake
    _generate = _fake.FakeEngine.generate
    def _slow_generate(self, requests, sampling):
        time.sleep(_delay)
        return _generate(self, requests, sampling)
    _fake.FakeEngine.generate = _slow_generate
_step = float(os.environ.get("SAO_TEST_TRAIN_STEP_DELAY_S") or 0)
if _step:
    from sao_core.training import arguments as _arguments
    _trainer_class = _arguments.trainer_class
    def _slow_trainer_class(objective):
        base = _trainer_class(objective)
        class Slow(base):
            def training_step(self, *args, **kwargs):
                time.sleep(_step)
                return super().training_step(*args, **kwargs)
        return Slow
    _arguments.trainer_class = _slow_trainer_class
"""


@pytest.fixture
def hook_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `sao` child: the slowing hook on PYTHONPATH, its own Prefect home (so `sao
    run` starts a temporary server whose database and result cache survive the kill for the re-run)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SAO_TEST_"))}
    env.update(
        PYTHONPATH=str(hooks),
        PYTHONUNBUFFERED="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its process group (a temporary server, training ranks)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_exit(proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(
            f"{proc.args} still running after {timeout_s} s:\n{log.read_text()[-4000:]}"
        ) from None
    text = log.read_text()
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def wait_for(what: str, check: Any, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> Any:
    """Poll `check()` until it returns something true; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert proc.poll() is None, (
            f"{proc.args} ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        )
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    return found


def shard_lines(text: str) -> list[tuple[str, int]]:
    """(stage, shard) of every shard a process generated and wrote (the runner's INFO line)."""
    return [
        (m[1], int(m[2]))
        for m in re.finditer(r"sao_core\.stages\.runner[: -]+(\w+) shard (\d+): \d+ in", text)
    ]


def snapshot(folder: str, pattern: str) -> dict[str, tuple[bytes, int]]:
    """Bytes and write time (ns) of every file under a local folder matching a glob."""
    return {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in storage.list_files(folder, pattern)}


def check_round_by_ids(round_dir: str) -> dict[str, int]:
    """Every model stage: one complete shard per input shard, every input row answered once (kept or
    dropped), no id kept twice, the stage manifest's totals the sums of its shards; the pairs'
    prompt ids all judged, each once. Returns the rows kept per stage."""
    kept_rows: dict[str, int] = {}
    for stage in MODEL_STAGES:
        count = num_shards(round_dir, stage)
        in_url, out_url = stage_url(round_dir, input_stage(stage)), output_url(round_dir, stage)
        names = sorted(
            u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(out_url, "_shards"), "*.json")
        )
        assert names == [f"part-{i:05d}.json" for i in range(count)], (stage, names)
        assert len(storage.list_files(out_url, "part-*")) == count
        key = ID_KEY[stage]
        inputs: list[str] = []
        kept: list[str] = []
        answered: list[str] = []
        for index in range(count):
            in_rows, _ = storage.read_shard(in_url, index, "jsonl")
            rows, entry = storage.read_shard(out_url, index, "jsonl")
            assert entry.rows_in == len(in_rows), (stage, index)
            dropped = []
            if entry.dropped_file:
                data = storage.read_bytes(storage.join(out_url, entry.dropped_file))
                dropped = storage.decode_rows(data, "jsonl", entry.dropped_file)
            assert sum(entry.drops.values()) == len(dropped), (stage, index)
            inputs += [r[key] for r in in_rows]
            kept += [r[key] for r in rows]
            answered += [r[key] for r in rows] + [r[key] for r in dropped if key in r]
        assert not [i for i, n in Counter(kept).items() if n > 1], f"{stage}: an id written twice"
        assert sorted(answered) == sorted(inputs), f"{stage}: rows lost or invented"
        manifest = storage.read_stage_manifest(stage_url(round_dir, stage))
        assert manifest["num_shards"] == count
        if stage != "prompts":  # prompts' stage manifest counts after the round-wide duplicate pass
            assert (manifest["rows_in"], manifest["rows_out"]) == (len(inputs), len(kept)), stage
        kept_rows[stage] = len(kept)
    pairs = storage.read_stage_rows(stage_url(round_dir, "pairs"), "jsonl")
    judged = {r["prompt_id"] for r in storage.read_stage_rows(stage_url(round_dir, "judgements"), "jsonl")}
    assert len({p["prompt_id"] for p in pairs}) == len(pairs) and {p["prompt_id"] for p in pairs} <= judged
    kept_rows["pairs"] = len(pairs)
    return kept_rows


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
        done = [i for i in range(4) if storage.exists(storage.shard_manifest_url(responses, i))]
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
    assert storage.read_shard_manifest(responses, killed_shard) is None  # killed before it was written
    left = locks.read_lease(shard_claim_url(round_dir, "responses", killed_shard))
    assert left is not None and locks.stale_reason(left) == f"its process {left['pid']} is gone", left
    before = {
        **snapshot(round_dir, "*/_shards/*.json"),
        **snapshot(round_dir, "*/_candidates/_shards/*.json"),
        **snapshot(round_dir, "*/manifest.json"),
        **snapshot(round_dir, "*/part-*"),
    }
    # The killed shard's own file may be there without its manifest (killed between the two): not done.
    before = {p: v for p, v in before.items() if f"/responses/part-{killed_shard:05d}." not in p}
    assert sorted(p for p in before if "/responses/_shards/" in p) == [
        storage.shard_manifest_url(responses, i) for i in finished
    ]

    rerun_log = tmp_path / "rerun.log"
    text = wait_exit(start(argv, hook_env, rerun_log), rerun_log)
    assert f"round folder: {round_dir}" in text

    # Nothing finished before the kill was written again: same bytes, same write time.
    after = {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in before}
    changed = sorted(p for p in before if after[p] != before[p])
    assert changed == [], changed
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

ROUND_DEPLOYMENT = "sao-round/round"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def trigger_round(cluster: Any, overrides: list[str]) -> str:
    """A run of sao-round/round, as the UI's run form creates it (tests/cluster/test_fanout_cluster.py)."""
    deployment = cluster.get(f"/deployments/name/{ROUND_DEPLOYMENT}")
    run = cluster.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        {"parameters": {"config": TINY, "overrides": overrides}},
    )
    return str(run["id"])


def state_of(cluster: Any, run_id: str) -> dict[str, Any]:
    return cluster.get(f"/flow_runs/{run_id}").get("state") or {}


def wait_final(cluster: Any, run_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (state := state_of(cluster, run_id)).get("type") not in FINAL:
        assert time.monotonic() < deadline, (
            f"run {run_id} not final after {timeout_s} s: {state}\n{cluster.log_tails()}"
        )
        time.sleep(2)
    return state


def healthy(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def restarted_server(cluster: Any, log: Path, down_s: float) -> Iterator[dict[str, float]]:
    """Stop the cluster's `prefect server` (SIGINT, as harness.local_cluster stops it), keep it down
    `down_s` (a restart's start-up and migrations), start it again with the same command, environment and
    database on the same port; stopped again on the way out. Yields once it is healthy again, with how
    long the API was away."""
    import psutil

    port = cluster.api.rsplit(":", 1)[1].split("/")[0]
    [server] = [
        p
        for p in psutil.Process().children()
        if {"server", "start"} <= set(p.cmdline()) and port in p.cmdline() and "worker" not in p.cmdline()
    ]
    argv, env, cwd = server.cmdline(), server.environ(), server.cwd()
    stopped_at = time.monotonic()
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except psutil.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
    while healthy(cluster.api):
        time.sleep(0.2)
    time.sleep(max(0.0, down_s - (time.monotonic() - stopped_at)))
    with log.open("ab") as out:
        again = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not healthy(cluster.api):
            assert again.poll() is None, f"restarted server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"restarted server not healthy:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"down_s": time.monotonic() - stopped_at}
    finally:
        again.send_signal(signal.SIGINT)
        try:
            again.wait(timeout=20)
        except subprocess.TimeoutExpired:
            again.kill()
            again.wait(timeout=10)


@pytest.mark.parametrize("down_s", [20.0, 120.0], ids=["restart-20s", "outage-120s"])
def test_a_prefect_server_restart_mid_round(tmp_path: Path, hook_env: dict[str, str], down_s: float):
    """About 3-4 minutes: a cluster on PostgreSQL, one gpu-batch worker, a round of 6 shards a stage,
    each shard slowed to 1 s; the server is restarted while the responses stage is part-way."""
    from tests.cluster.harness import PG_BIN, local_cluster

    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL at {PG_BIN} (set SAO_POSTGRES_BIN)")
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    root = tmp_path / "root"
    overrides = [
        f"run.root={root}",
        "fanout.mode=deployment",
        "fanout.workers=1",
        "fanout.poll_interval_s=1",
        "personas.n=24",
        "evaluation.enabled=false",
    ]
    cfg = load_config(TINY, overrides)
    round_dir = round_url(cfg)
    responses = output_url(round_dir, "responses")
    slow = {"PYTHONPATH": hook_env["PYTHONPATH"], "SAO_TEST_GENERATE_DELAY_S": "1.0"}
    started = time.monotonic()
    with local_cluster(
        logs, None, postgres=True, gpu_workers=("gpu-a",), train_worker=False, worker_env=slow
    ) as cluster:
        run_id = trigger_round(cluster, overrides)
        deadline = time.monotonic() + 300
        while not storage.exists(storage.shard_manifest_url(responses, 0)):
            assert state_of(cluster, run_id).get("type") not in FINAL, cluster.log_tails()
            assert time.monotonic() < deadline, f"no responses shard after 300 s\n{cluster.log_tails()}"
            time.sleep(0.1)
        finished = {
            **snapshot(round_dir, "*/_shards/*.json"),
            **snapshot(round_dir, "*/_candidates/_shards/*.json"),
        }
        done_at_stop = sorted(i for i in range(6) if storage.shard_manifest_url(responses, i) in finished)
        with restarted_server(cluster, logs / "server.log", down_s=down_s) as restart:
            first = wait_final(cluster, run_id)
            outcome = first.get("type")
            if outcome != "COMPLETED":
                # A failed round says what failed; a second trigger completes it from where it stopped.
                message = first.get("message") or ""
                print(f"\nround after the restart: {outcome}: {message}", flush=True)
                assert message, first
                second = wait_final(cluster, trigger_round(cluster, overrides))
                assert second.get("type") == "COMPLETED", f"{second}\n{cluster.log_tails()}"
            seconds = time.monotonic() - started
    # What was finished before the restart was not written again, whichever run completed the round.
    changed = sorted(p for p, v in finished.items() if (Path(p).read_bytes(), os.stat(p).st_mtime_ns) != v)
    assert changed == [], changed
    print(
        f"\nserver restart: API away {restart['down_s']:.1f} s with responses shards {done_at_stop} of 6 "
        f"done; first run {outcome}; {seconds:.0f} s in all",
        flush=True,
    )
    kept = check_round_by_ids(round_dir)
    assert kept["judgements"] == 24, kept
    # The round deployment plans its round as the campaign's next (tasks/campaign.plan_round), which may
    # change the training section (training.merge), so its model is found as `sao promote` finds it.
    model = storage.read_json(storage.join(campaign.round_model(round_dir), "manifest.json"))
    assert model["complete"] and model["steps"] == cfg.training.max_steps
    # Each shard was written by one batch run: the records of the batches name every shard once.
    for stage in MODEL_STAGES:
        records = [
            storage.read_json(u)
            for u in storage.list_files(storage.join(round_dir, "_batches", stage), "*.json")
        ]
        written = Counter(i for r in records for i in r["shards"])
        assert set(written) <= set(range(6)) and set(written.values()) <= {1}, (stage, records)
