"""One Prefect test harness (a temporary server and database) for every flow test in the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id) -> dict[str, list[str]]:
    """Task-run name -> state names of a flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
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
