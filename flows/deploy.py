"""`sao deploy`: work pools, the crash-detection automation, the nightly schedule's variables, then
`prefect --no-prompt deploy --all` on prefect.yaml, all against the server PREFECT_API_URL names.

    sao deploy                                       # process pools: one machine, or workers you start
    sao deploy --gpu-pool-type docker --train-pool-type kubernetes --cron "30 1 * * *" --timezone Europe/Paris

Every step is idempotent: pools are created or their templates updated, the automation is replaced,
variables are kept unless given. Credentials are never written anywhere: workers read them from their
environment (AWS_*) or from Prefect blocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sao_core.errors import SAOError

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
AUTOMATION_NAME = "sao-crash-runs-without-heartbeats"
# Prefect variables read by prefect.yaml's nightly schedule.
CRON_VARIABLE, TIMEZONE_VARIABLE = "sao_nightly_cron", "sao_nightly_timezone"
DEFAULT_CRON, DEFAULT_TIMEZONE = "0 2 * * *", "UTC"
TEMPLATES = {
    ("sao-cpu", "process"): "process.json",
    ("sao-gpu-batch", "process"): "process.json",
    ("sao-gpu-batch", "docker"): "docker-gpu.json",
    ("sao-gpu-batch", "kubernetes"): "kubernetes-gpu.json",
    ("sao-train", "process"): "process.json",
    ("sao-train", "docker"): "docker-train.json",
    ("sao-train", "kubernetes"): "kubernetes-train.json",
}


class DeployError(SAOError):
    """The pools, automation or deployments could not be set up on the server."""


@dataclass(frozen=True)
class PoolSpec:
    name: str
    type: str
    template: Path


def pool_specs(gpu_pool_type: str, train_pool_type: str) -> list[PoolSpec]:
    """The three pools and the base job template each gets from deployments/pools/."""
    specs = []
    for name, kind in (
        ("sao-cpu", "process"),
        ("sao-gpu-batch", gpu_pool_type),
        ("sao-train", train_pool_type),
    ):
        file = TEMPLATES.get((name, kind))
        if file is None:
            allowed = sorted(k for n, k in TEMPLATES if n == name)
            raise DeployError(f"pool {name}: type {kind!r} has no template; allowed: {', '.join(allowed)}")
        specs.append(PoolSpec(name, kind, POOLS / file))
    return specs


def ensure_pools(specs: list[PoolSpec]) -> list[str]:
    """Create each pool, or update the template of one that exists with the same type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        for spec in specs:
            try:
                template = json.loads(spec.template.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DeployError(f"pool {spec.name}: cannot read template {spec.template}: {e}") from e
            try:
                existing = client.read_work_pool(spec.name)
            except ObjectNotFound:
                existing = None
            if existing is None:
                client.create_work_pool(
                    WorkPoolCreate(name=spec.name, type=spec.type, base_job_template=template)
                )
                done.append(f"pool {spec.name} ({spec.type}) created")
            elif existing.type != spec.type:
                raise DeployError(
                    f"pool {spec.name} exists with type {existing.type!r}, not {spec.type!r}: delete it "
                    f"(prefect work-pool delete {spec.name}) or deploy with its type"
                )
            else:
                client.update_work_pool(spec.name, WorkPoolUpdate(base_job_template=template))
                done.append(f"pool {spec.name} ({spec.type}) updated")
    return done


def ensure_schedule_variables(cron: str | None, timezone: str | None) -> list[str]:
    """Set the nightly schedule's variables: given values always, defaults only where none is set."""
    from prefect.variables import Variable

    done = []
    for name, given, default in (
        (CRON_VARIABLE, cron, DEFAULT_CRON),
        (TIMEZONE_VARIABLE, timezone, DEFAULT_TIMEZONE),
    ):
        current = Variable.get(name, default=None)
        if given is not None or current is None:
            value = given if given is not None else default
            Variable.set(name, value, overwrite=True)
            done.append(f"variable {name} = {value!r}")
        else:
            done.append(f"variable {name} kept ({current!r})")
    return done


def ensure_crash_automation(grace_s: int) -> str:
    """An automation that marks a running flow run Crashed when its heartbeats stop for `grace_s`.

    A killed worker or node leaves its run Running forever otherwise, and a stage waiting on it
    (tasks/fanout.py) could not resubmit the batch until its timeout.
    """
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    with contextlib.suppress(ValueError):  # ValueError: none yet
        Automation.read(name=AUTOMATION_NAME).delete()
    Automation(
        name=AUTOMATION_NAME,
        description="Flow runs whose heartbeats stopped (killed worker, lost node) are marked Crashed, "
        "so the round can resubmit their shards.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=grace_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {grace_s} s: its worker or node stopped",
            )
        ],
    ).create()
    return f"automation {AUTOMATION_NAME} (no heartbeat for {grace_s} s -> Crashed)"


def check_deployment_configs(project_dir: Path | None = None) -> list[str]:
    """Load the recipe (and overrides) every deployment of prefect.yaml names in its default parameters,
    as the worker will: a bad one stops `sao deploy` before any pool or deployment is touched."""
    import yaml

    from sao_core.errors import ConfigError
    from sao_core.store.layout import load_config

    project_dir = project_dir or REPO
    spec = project_dir / "prefect.yaml"
    try:
        deployments = (yaml.safe_load(spec.read_text()) or {}).get("deployments") or []
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise DeployError(f"cannot read the deployments of {spec}: {e}") from e
    done = []
    for d in deployments:
        params = d.get("parameters") or {}
        if "config" not in params:
            continue
        # Relative paths are the project folder's: the workers run from it (prefect.yaml's pull step).
        config = str(params["config"])
        url = config if "://" in config else str(project_dir / config)
        try:
            load_config(url, list(params.get("overrides") or []))
        except ConfigError as e:
            raise ConfigError(f"deployment {d.get('name')!r} of {spec.name}: {e}") from None
        done.append(f"deployment {d.get('name')}: config {config} is valid")
    return done


def deploy_all(project_dir: Path = REPO) -> str:
    """`prefect --no-prompt deploy --all` on prefect.yaml; its output, or a DeployError quoting it."""
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all"]
    # Prefect prints each result in a panel as wide as the terminal: 80 columns in a pipe, which cuts
    # the "successfully created with id '...'" lines that deploy() passes on.
    env = {**os.environ, "COLUMNS": "250"}
    # prefect.yaml's pull step names `{{ $SAO_PROJECT_DIR }}` for each worker to resolve when a run starts
    # (its own project folder); `prefect deploy` would write this shell's value into the deployment.
    env.pop("SAO_PROJECT_DIR", None)
    out = subprocess.run(cmd, cwd=project_dir, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise DeployError(
            f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out.stdout


def deploy(
    gpu_pool_type: str = "process",
    train_pool_type: str = "process",
    cron: str | None = None,
    timezone: str | None = None,
    heartbeat_grace_s: int = 600,
) -> list[str]:
    """Everything `sao deploy` does, in order; returns one line per step."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError(
            "sao deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); "
            "deployments on the temporary local server would vanish with it"
        )
    steps = check_deployment_configs()
    steps += ensure_pools(pool_specs(gpu_pool_type, train_pool_type))
    steps += ensure_schedule_variables(cron, timezone)
    steps.append(ensure_crash_automation(heartbeat_grace_s))
    output = deploy_all()
    steps += [
        line.strip(" │")  # the panel's borders
        for line in output.splitlines()
        if "Deployment '" in line and "success" in line.lower()
    ]
    steps.append("deployments: prefect --no-prompt deploy --all done")
    return steps
