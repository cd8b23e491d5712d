"""Two runners at once on one artifact root: leases (sao_core.store.locks), shard claims, the campaign lock.

- a lease has one holder: of many takers at once one gets it, a live holder keeps it past its ttl by
  renewing it, a stale one (expired, or its process gone on this machine) is taken over by exactly one
  taker, a holder whose lease was taken cannot write under it; on local disks, memory:// and S3 (moto);
- two `sao synth` of the same round started together both finish, share the shards, write each shard
  once and wait for the other where they meet; every count is exact, row id by row id;
- a claim left by a SIGKILLed `sao synth` on another machine (its host rewritten) is taken over once it
  expires (engine.shard_timeout_s short);
- two processes under `campaign_lock` of one campaign hold it one after the other; a SIGKILLed
  holder's lock is taken over.

    .venv/bin/python -m pytest -q tests/reliability/test_concurrency.py            # tier 0: the leases
    .venv/bin/python -m pytest -q tests/reliability/test_concurrency.py -m tier1   # the processes (~1 min)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sao_core.store import locks, shards, storage
from sao_core.store.layout import MODEL_STAGES, load_config, output_url, round_url, shard_claim_url
from tests.procs import kill_group, start, wait_exit, wait_for
from tests.round_checks import check_round_by_ids, shard_lines

REPO = Path(__file__).resolve().parents[2]
SAO = str(Path(sys.executable).parent / "sao")
TINY = str(REPO / "configs" / "tiny.yaml")


# --- the leases, in one process ------------------------------------------------------------------------


@pytest.fixture(params=["file", "memory", pytest.param("s3", marks=pytest.mark.tier1)])
def lease_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A lease's URL on a local disk, in memory://, and on a real S3 endpoint (moto; If-None-Match)."""
    if request.param == "file":
        return str(tmp_path / "_claims" / "part-00000.json")
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_env')}/_claims/part-00000.json"
    return f"memory://leases-{tmp_path.name}/_claims/part-00000.json"


def test_one_holder_at_a_time_and_released_for_the_next(lease_url: str):
    first = locks.try_acquire(lease_url, "shard 0", ttl_s=5)
    assert first is not None
    assert locks.try_acquire(lease_url, "shard 0", ttl_s=5) is None
    data = locks.read_lease(lease_url)
    assert data is not None and data["token"] == first.token and data["pid"] == os.getpid()
    assert locks.stale_reason(data) is None
    first.release()
    assert locks.read_lease(lease_url) is None
    second = locks.try_acquire(lease_url, "shard 0", ttl_s=5)
    assert second is not None
    second.release()


def take_at_once(url: str, takers: int) -> list[locks.Lease]:
    """`takers` threads released together by a barrier, each trying once to take the lease: those that got it."""
    barrier = threading.Barrier(takers)
    got: list[locks.Lease] = []

    def take() -> None:
        barrier.wait()
        lease = locks.try_acquire(url, "shard 0", ttl_s=5)
        if lease is not None:
            got.append(lease)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_of_many_takers_at_once_one_gets_it(lease_url: str):
    got = take_at_once(lease_url, 8)
    assert len(got) == 1
    got[0].release()


def stale_lease(url: str, **fields: Any) -> dict[str, Any]:
    """A lease of a holder on another machine, written by hand."""
    data = {
        "what": "shard 0",
        "holder": "a runner elsewhere",
        "host": "elsewhere",
        "pid_ns": "pid:[1]",
        "pid": 4242,
        "token": "t-stale",
        "acquired": time.time() - 100,
        "renewed": time.time() - 100,
        "expires": time.time() - 1,
        "ttl_s": 99,
        **fields,
    }
    storage.write_bytes(url, json.dumps(data).encode())
    return data


def test_an_expired_lease_is_taken_over_by_exactly_one_of_its_takers(lease_url: str):
    stale_lease(lease_url)
    got = take_at_once(lease_url, 6)
    assert len(got) == 1, got
    # Taken over, or created in the moment between the taker's removal of the stale lease and its own
    # create (the taker then finds it taken and steps back): one holder either way.
    assert got[0].taken_from is None or got[0].taken_from.startswith("expired"), got[0].taken_from
    assert locks.read_lease(lease_url)["token"] == got[0].token
    got[0].release()
    assert locks.read_lease(lease_url) is None
    assert not [u for u in storage.list_files(lease_url.rsplit("/", 1)[0]) if ".taken-" in u]


def test_a_live_lease_on_another_machine_is_waited_for_until_it_expires(lease_url: str):
    stale_lease(lease_url, expires=time.time() + 1.0)
    assert locks.try_acquire(lease_url, "shard 0", ttl_s=5) is None
    started = time.monotonic()
    lease = locks.acquire(lease_url, "shard 0", ttl_s=5, wait_s=30)
    waited = time.monotonic() - started
    assert 0.5 < waited < 10, waited
    lease.release()


def test_a_lease_of_a_process_gone_from_this_machine_is_free_at_once(tmp_path: Path):
    url = str(tmp_path / "lease.json")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    me = locks.this_process()
    stale_lease(url, host=me["host"], pid_ns=me["pid_ns"], pid=int(gone.stdout), expires=time.time() + 3600)
    assert locks.stale_reason(locks.read_lease(url)) == f"its process {int(gone.stdout)} is gone"
    lease = locks.try_acquire(url, "shard 0", ttl_s=5)
    assert lease is not None and lease.taken_from == f"its process {int(gone.stdout)} is gone"
    lease.release()


def test_a_held_lease_is_renewed_past_its_ttl_and_stops_at_its_limit(tmp_path: Path):
    url = str(tmp_path / "lease.json")
    lease = locks.try_acquire(url, "shard 0", ttl_s=0.3, max_hold_s=1.0)
    assert lease is not None
    time.sleep(0.8)  # over two ttls: only renewal keeps it
    data = locks.read_lease(url)
    assert data is not None and data["token"] == lease.token and locks.stale_reason(data) is None
    # Another process's view: a holder past max_hold_s stops renewing, and its lease then expires.
    time.sleep(1.0)
    assert locks.stale_reason(locks.read_lease(url), now=time.time()) is not None
    lease.release()


def test_a_holder_whose_lease_was_taken_writes_nothing(tmp_path: Path):
    url = str(tmp_path / "lease.json")
    lease = locks.try_acquire(url, "shard 0", ttl_s=5)
    assert lease is not None
    lease._stop.set()  # as if the holder froze: no more renewals
    stale_lease(url, token="t-other", expires=time.time() + 60)  # another runner holds it now
    with pytest.raises(locks.LeaseLost, match=r"shard 0: lost .*nothing written"):
        lease.check()
    lease.release()
    assert locks.read_lease(url)["token"] == "t-other"  # never someone else's


def test_a_wait_that_runs_out_names_the_holder(tmp_path: Path):
    url = str(tmp_path / "lease.json")
    stale_lease(url, expires=time.time() + 60)
    with pytest.raises(locks.LeaseTimeout, match=r"still held by a runner elsewhere \(pid 4242 on elsewhere"):
        locks.acquire(url, "shard 0", ttl_s=0.4, wait_s=0.5)


# --- processes -----------------------------------------------------------------------------------------


@pytest.mark.tier1
def test_two_sao_synth_of_one_round_at_once_write_each_shard_once(tmp_path: Path, hook_env: dict[str, str]):
    root = tmp_path / "root"
    overrides = [f"run.root={root}", "personas.n=24", "evaluation.enabled=false"]  # 6 shards a stage
    argv = [SAO, "-v", "synth", "--config", TINY, *[a for o in overrides for a in ("--set", o)]]
    env = {**hook_env, "SAO_TEST_GENERATE_DELAY_S": "0.4"}
    logs = [tmp_path / "synth-a.log", tmp_path / "synth-b.log"]
    procs = [start(argv, env, log) for log in logs]
    texts = [wait_exit(p, log, timeout_s=240) for p, log in zip(procs, logs, strict=True)]

    # Each shard of each stage was generated and written by exactly one of the two.
    written = Counter(s for text in texts for s in shard_lines(text))
    expected = {(stage, i) for stage in MODEL_STAGES for i in range(6)}
    assert set(written) == expected and set(written.values()) == {1}, written
    shares = [Counter(stage for stage, _ in shard_lines(text)) for text in texts]
    assert all(sum(s.values()) > 0 for s in shares), shares  # both did some of the work
    met = [t for t in texts if re.search(r"claimed by .*; left for later|is held by .*; waiting", t)]
    assert met, "neither process met the other's claim:\n" + "\n".join(t[-2000:] for t in texts)

    round_dir = round_url(load_config(TINY, overrides))
    kept = check_round_by_ids(round_dir)
    assert kept["judgements"] == 24 and kept["pairs"] > 0, kept
    # Both printed the same round, and no claim is left behind.
    assert all(f"round folder: {round_dir}" in t for t in texts)
    claims = [
        u
        for u in storage.list_files(round_dir, "*/_claims/*") + storage.list_files(round_dir, "*/*/_claims/*")
    ]
    assert claims == [], claims


@pytest.mark.tier1
def test_a_claim_of_a_killed_synth_elsewhere_is_taken_over_once_it_expires(
    tmp_path: Path, hook_env: dict[str, str]
):
    root = tmp_path / "root"
    overrides = [f"run.root={root}", "personas.n=16", "evaluation.enabled=false", "engine.shard_timeout_s=3"]
    argv = [SAO, "-v", "synth", "--config", TINY, *[a for o in overrides for a in ("--set", o)]]
    round_dir = round_url(load_config(TINY, overrides))
    log = tmp_path / "killed.log"
    proc = start(argv, {**hook_env, "SAO_TEST_GENERATE_DELAY_S": "1.5"}, log)
    claim = shard_claim_url(round_dir, "responses", 1)
    try:
        wait_for("a claim of the second responses shard", lambda: storage.exists(claim), proc, log, 120)
    finally:
        kill_group(proc)
    left = locks.read_lease(claim)
    assert left is not None and left["pid"] == proc.pid
    assert shards.read_shard_manifest(output_url(round_dir, "responses"), 1) is None
    # As if it had run on another machine: its process cannot be seen to be gone, only its lease expire.
    storage.write_bytes(claim, json.dumps({**left, "host": "gpu-node-7", "pid_ns": ""}).encode())
    assert not (locks.stale_reason(locks.read_lease(claim)) or "").startswith("its process")

    rerun = tmp_path / "rerun.log"
    text = wait_exit(start(argv, hook_env, rerun), rerun, timeout_s=240)
    assert re.search(r"responses shard 1: took over .* from .*gpu-node-7.*: expired", text), text[-3000:]
    assert ("responses", 1) in shard_lines(text) and ("responses", 0) not in shard_lines(text)
    kept = check_round_by_ids(round_dir)
    assert kept["judgements"] == 16, kept


CAMPAIGN_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from sao_core.store.locks import campaign_lock
    root, name, out, hold_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    with campaign_lock(root, "nightly", holder=name, ttl_s=1.0, wait_s=60):
        began = time.time()
        print("holding", flush=True)
        time.sleep(hold_s)
        with open(out, "w") as f:
            json.dump({"name": name, "began": began, "ended": time.time()}, f)
    """
)


@pytest.mark.tier1
def test_two_rounds_of_one_campaign_hold_its_lock_one_after_the_other(
    tmp_path: Path, hook_env: dict[str, str]
):
    root = str(tmp_path / "root")
    logs = {k: tmp_path / f"round-{k}.log" for k in ("a", "b")}
    procs = {
        k: start([sys.executable, "-c", CAMPAIGN_HOLDER, root, f"round {k}", str(tmp_path / f"{k}.json"), "2"],
                 hook_env, logs[k])
        for k in ("a", "b")
    }  # fmt: skip
    for k, proc in procs.items():
        wait_exit(proc, logs[k], timeout_s=90)
    spans = sorted(
        (json.loads((tmp_path / f"{k}.json").read_text()) for k in procs), key=lambda s: s["began"]
    )
    assert spans[1]["began"] >= spans[0]["ended"], spans
    waited = [
        k for k in procs if "campaign nightly" in logs[k].read_text() and "waiting" in logs[k].read_text()
    ]
    assert len(waited) == 1, {k: logs[k].read_text() for k in procs}
    assert f"held by {spans[0]['name']}" in logs[waited[0]].read_text()
    assert locks.read_lease(locks.campaign_lock_url(root, "nightly")) is None


@pytest.mark.tier1
def test_a_killed_rounds_campaign_lock_is_taken_over(tmp_path: Path, hook_env: dict[str, str]):
    root = str(tmp_path / "root")
    log = tmp_path / "killed.log"
    proc = start(
        [sys.executable, "-c", CAMPAIGN_HOLDER, root, "round 1", str(tmp_path / "1.json"), "600"],
        hook_env,
        log,
    )
    try:
        wait_for("the campaign lock held", lambda: "holding" in log.read_text(), proc, log, 60)
    finally:
        kill_group(proc)
    started = time.monotonic()
    with locks.campaign_lock(root, "nightly", holder="round 2", ttl_s=1.0, wait_s=30) as lease:
        assert lease.taken_from == f"its process {proc.pid} is gone"
    assert time.monotonic() - started < 5
