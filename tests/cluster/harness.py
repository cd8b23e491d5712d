"""A small Prefect cluster on 127.0.0.1, as a cluster runs one: for the fan-out tests and bench/fanout.py.

    with local_cluster(logs, s3_endpoint, bucket="s3://b") as cluster:   # or s3_endpoint=None: no S3
        cluster.post("/deployments/...")

    PostgreSQL 15 (or Prefect's SQLite) -> `prefect server start` on it -> `sao deploy` -> workers:
    one process worker on sao-cpu (rounds), N on sao-gpu-batch (`--limit 1`: one batch each) and one
    on sao-train (`--limit 1`: the runs of training.deployment; train_worker=False leaves it out).

As on a real cluster, `sao deploy` runs from a shell without SAO_PROJECT_DIR, and the workers run the
project from a folder of their own: a copy of this one at another path (Cluster.project_dir), named by
their SAO_PROJECT_DIR, which prefect.yaml's pull step resolves when each run starts. The workers
themselves start elsewhere (the logs folder), so a run finds its code through the pull step or not at all.

Everything started here is stopped by its PID on the way out, even after an error: workers get SIGINT
twice (they ignore SIGTERM) and then SIGKILL, the flow-run processes they leave behind SIGKILL, the
server SIGINT, PostgreSQL `pg_ctl stop`. The logs stay in the folder given, for a failed run to be read.

PostgreSQL comes from /usr/lib/postgresql/15/bin (SAO_POSTGRES_BIN elsewhere).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.procs import REPO, s3_env, start, stop, tail, wait_healthy

BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("SAO_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
# The nightly schedule `sao deploy` is given: a rare date, so no scheduled round starts mid-test.
CRON, TIMEZONE = "17 3 29 2 *", "Europe/Paris"
GPU_WORKERS = ("gpu-a", "gpu-b")
TRAIN_WORKER = "train"
# Flow runs beat every 30 s here (PREFECT_FLOWS_HEARTBEAT_FREQUENCY); the automation waits this long.
HEARTBEAT_FREQUENCY_S, HEARTBEAT_GRACE_S = 30, 60
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
ROUND_DEPLOYMENT = "sao-round/round"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg(argv: list[str], as_postgres: bool, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program; as root through runuser (initdb and postgres refuse root)."""
    cmd = ["runuser", "-u", "postgres", "--", *argv] if as_postgres else argv
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@dataclass
class Postgres:
    url: str  # postgresql+asyncpg://...
    port: int


class _PostgresCluster:
    """initdb + pg_ctl start in a temporary folder the postgres user owns (when running as root)."""

    def __init__(self) -> None:
        self.as_postgres = os.geteuid() == 0
        # Not under pytest's tmp folder: that one is 0700 root, and postgres must reach its data dir.
        self.base = Path(tempfile.mkdtemp(prefix="sao-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "postgres.log"
        self.port = free_port()
        self.started = False

    def start(self) -> Postgres:
        self.sock.mkdir()
        if self.as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        init = _pg(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            self.as_postgres,
        )
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        options = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        started = _pg(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            self.as_postgres,
        )
        assert started.returncode == 0, (
            f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{tail(self.log)}"
        )
        self.started = True
        created = _pg(
            [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect"],
            self.as_postgres,
        )
        assert created.returncode == 0, f"createdb failed:\n{created.stdout}\n{created.stderr}"
        return Postgres(f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect", self.port)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        try:
            if self.started:
                pid = self.pid()
                stop = _pg(
                    [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"],
                    self.as_postgres,
                )
                if stop.returncode != 0 and pid is not None:
                    _kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _kill(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_exit(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def worker_children(cluster: Cluster, name: str) -> list[Any]:
    """The processes a worker started (its flow runs), as psutil.Process objects."""
    import psutil

    try:
        return list(psutil.Process(cluster.workers[name].pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def kill_process(process: Any) -> None:
    """SIGKILL a psutil.Process, unless it is gone (psutil also refuses a PID reused since)."""
    import psutil

    with suppress(psutil.NoSuchProcess):
        process.kill()


def stop_worker(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGINT (a worker ignores SIGTERM), SIGINT again, then SIGKILL; the runs it started, SIGKILL."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for sig, wait in ((signal.SIGINT, 3.0), (signal.SIGINT, grace_s)):
        if proc.poll() is not None:
            break
        _kill(proc.pid, sig)
        if _wait_exit(proc, wait):
            break
    if proc.poll() is None:
        _kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for child in children:
        kill_process(child)


# The statuses Prefect's own client retries: a server on SQLite answers 503 while its database is
# locked by another writer, which a loaded 2-core machine sees now and then.
RETRY_STATUSES = frozenset({408, 429, 502, 503})


def api_call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the Prefect API as the tests make it, its JSON answer. A transient status (see
    RETRY_STATUSES) is retried after 0.5, 1, 2, 4 and 8 s, as Prefect's client does; any other error
    status raises at once, and a transient one raises once the waits are spent."""
    for wait_s in (0.5, 1.0, 2.0, 4.0, 8.0):
        r = httpx.request(method, url, json=body, timeout=30)
        if r.status_code not in RETRY_STATUSES:
            break
        time.sleep(wait_s)
    else:
        r = httpx.request(method, url, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def state_type(run: dict[str, Any]) -> str:
    """A flow run's state type as the API gives it ("COMPLETED", ...), "" before it has one."""
    return (run.get("state") or {}).get("type", "")


@dataclass
class Cluster:
    """What the tests need: the API, the bucket, each worker's process and log, the deploy's output."""

    api: str  # http://127.0.0.1:PORT/api
    bucket: str  # s3://name
    env: dict[str, str]
    logs: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    deploy_output: str = ""
    project_dir: Path = REPO  # the workers' SAO_PROJECT_DIR

    def get(self, path: str) -> Any:
        return api_call("GET", f"{self.api}{path}")

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return api_call("POST", f"{self.api}{path}", body or {})

    def trigger_round(
        self, config: str, overrides: list[str], job_variables: dict[str, Any] | None = None
    ) -> str:
        """A run of sao-round/round with these parameters, as the UI's custom run form creates it; its id.
        `job_variables` (the form's job variables, e.g. {"env": {...}}) reach the process it runs in."""
        deployment = self.get(f"/deployments/name/{ROUND_DEPLOYMENT}")
        body: dict[str, Any] = {"parameters": {"config": config, "overrides": overrides}}
        if job_variables is not None:
            body["job_variables"] = job_variables
        return str(self.post(f"/deployments/{deployment['id']}/create_flow_run", body)["id"])

    def read_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def wait_final(self, run_id: str, timeout_s: float = 600.0, every_s: float = 2.0) -> dict[str, Any]:
        """The flow run once its state is final (Completed, Failed, Cancelled, Crashed)."""
        deadline = time.monotonic() + timeout_s
        while state_type(run := self.read_run(run_id)) not in FINAL:
            assert time.monotonic() < deadline, (
                f"flow run {run_id} not final after {timeout_s} s: {run.get('state')}\n{self.log_tails()}"
            )
            time.sleep(every_s)
        return run

    def cancel_unfinished_runs(self) -> list[str]:
        """Cancel every flow run due by now and not in a final state (the nightly schedule's future
        runs stay): waiting ones at once, running ones through Cancelling (their worker stops the
        process). Returns their names."""
        now = datetime.now(UTC).isoformat()
        unfinished = {"state": {"type": {"not_any_": sorted(FINAL)}}, "expected_start_time": {"before_": now}}
        runs = self.post("/flow_runs/filter", {"flow_runs": unfinished, "limit": 200})
        for run in runs:
            started = (run.get("state") or {}).get("type") not in ("SCHEDULED", "PENDING")
            state = {"type": "CANCELLING" if started else "CANCELLED", "message": "left behind by a test"}
            self.post(f"/flow_runs/{run['id']}/set_state", {"state": state, "force": True})
        return [r["name"] for r in runs]

    def worker_log(self, name: str) -> str:
        return (self.logs / f"worker-{name}.log").read_text(errors="replace")

    def log_tails(self) -> str:
        """The end of every log, for an assertion message."""
        return "\n".join(f"--- {p.name}\n{tail(p, 2500)}" for p in sorted(self.logs.glob("*.log")))


def _base_env(prefect_home: Path, api: str, s3: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("SAO_PROJECT_DIR", None)
    if s3 is not None:
        env.update(s3_env(s3))
    return env


def copy_project(dest: Path) -> Path:
    """The project's files (tracked, and new ones git does not ignore) copied under `dest`: the folder a
    worker's SAO_PROJECT_DIR names, at a path other than the deploying machine's."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run_sao_deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The installed `sao deploy`, from the project folder, against the cluster's server."""
    return subprocess.run(
        [str(BIN / "sao"), "deploy", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _wait_workers_online(cluster: Cluster, want: Mapping[str, set[str]], timeout_s: float = 120.0) -> None:
    """Each worker has sent a heartbeat to its pool (it polls from then on)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        for name, proc in cluster.workers.items():
            assert proc.poll() is None, f"worker {name} exited:\n{tail(cluster.logs / f'worker-{name}.log')}"
        seen = {
            pool: {w["name"] for w in cluster.post(f"/work_pools/{pool}/workers/filter")} for pool in want
        }
        if all(want[pool] <= seen[pool] for pool in want):
            return
        time.sleep(1)
    raise AssertionError(f"workers not online after {timeout_s} s (seen {seen}):\n{cluster.log_tails()}")


@contextmanager
def local_cluster(
    logs: Path,
    s3_endpoint: str | None,
    bucket: str = "",
    postgres: bool = True,
    gpu_workers: Sequence[str] = GPU_WORKERS,
    train_worker: bool = True,
    worker_env: Mapping[str, str] | None = None,
    deploy_args: Sequence[str] = (
        "--cron",
        CRON,
        "--timezone",
        TIMEZONE,
        "--heartbeat-grace-s",
        str(HEARTBEAT_GRACE_S),
    ),
) -> Iterator[Cluster]:
    """Server (on PostgreSQL, or SQLite with postgres=False), `sao deploy`, one worker on sao-cpu, one
    per name in `gpu_workers` on sao-gpu-batch and, with `train_worker`, one on sao-train; all stopped
    on the way out."""  # fmt: skip
    started = time.monotonic()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _base_env(logs / "prefect-home", api, s3_endpoint)
    with ExitStack() as stack:
        server_env = {
            **env,
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "PREFECT_UI_API_URL": api,
            # A round that waits for the deployment's concurrency slot retries after this long (30 s).
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
        }
        if postgres:
            pg = _PostgresCluster()
            stack.callback(pg.stop)
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.start().url
        server_env.pop("PREFECT_API_URL")
        server_log = logs / "server.log"
        server = start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env,
            server_log,
            new_session=False,
        )
        stack.callback(stop, server)
        wait_healthy(f"{api}/health", server, server_log, every_s=1.0, what="prefect server")
        t_server = time.monotonic() - started

        project = Path(tempfile.mkdtemp(prefix="sao-worker-project-"))
        stack.callback(shutil.rmtree, project, ignore_errors=True)
        cluster = Cluster(api=api, bucket=bucket, env=env, logs=logs, project_dir=copy_project(project))
        deploy = run_sao_deploy(env, *deploy_args)
        (logs / "sao-deploy.log").write_text(deploy.stdout + deploy.stderr)
        assert deploy.returncode == 0, f"sao deploy failed:\n{deploy.stdout[-3000:]}\n{deploy.stderr[-3000:]}"
        cluster.deploy_output = deploy.stdout
        t_deploy = time.monotonic() - started - t_server

        env_of_workers = {
            **env,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_FREQUENCY_S),
            "SAO_PROJECT_DIR": str(cluster.project_dir),
            **(worker_env or {}),
        }
        specs = [("cpu", "sao-cpu", [])] + [(n, "sao-gpu-batch", ["--limit", "1"]) for n in gpu_workers]
        online = {"sao-cpu": {"cpu"}, "sao-gpu-batch": set(gpu_workers)}
        if train_worker:
            specs.append((TRAIN_WORKER, "sao-train", ["--limit", "1"]))
            online["sao-train"] = {TRAIN_WORKER}
        for name, pool, extra in specs:
            argv = [
                str(BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                name,
            ]
            proc = start(
                [*argv, *extra], env_of_workers, logs / f"worker-{name}.log", cwd=logs, new_session=False
            )
            cluster.workers[name] = proc
            stack.callback(stop_worker, proc)
        _wait_workers_online(cluster, online)
        print(
            f"cluster up in {time.monotonic() - started:.0f} s (server {t_server:.0f} s, "
            f"sao deploy {t_deploy:.0f} s)",
            flush=True,
        )
        yield cluster
