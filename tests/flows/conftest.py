"""One Prefect test harness (a temporary server and database) for every flow test in the session."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id, expect: Iterable[str] = (), wait_s: float = 60.0) -> dict[str, list[str]]:
    """Task-run name -> state names of a flow run, from the Prefect API.

    The server records task runs from the events their client sends, a moment after the flow run itself
    may have ended (longer on a loaded machine): this waits, up to `wait_s`, until every name in `expect`
    is there and every run it reads is in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    expected = set(expect)
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            settled = all(run.state is not None and run.state.is_final() for run in runs)
            if (settled and expected <= {run.name for run in runs}) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.name, []).append(str(run.state.name) if run.state else "?")
    return out


def task_run_tries(flow_run_id, name: str) -> tuple[int, list[str]]:
    """How often the flow run's task run named `name` (or `name-<suffix>`) ran, and every state it took."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        [run] = [r for r in runs if r.name == name or r.name.rsplit("-", 1)[0] == name]
        return run.run_count, [str(s.name) for s in client.read_task_run_states(run.id)]
