"""Cache keys and retry policy of the SAO tasks.

Cache keys are built from the hash of the settings a task's output depends on (its `settings_hash`) and
the sha256 of the shards it reads, never from pickled objects, so a re-run of a finished round is served
from the cache and a change to one section re-runs only the tasks that read it. A cached result counts
only while what the task wrote is still there and verifies against its manifest: a deleted round folder
or a corrupted shard makes the task run again (`checked_cache_key`). Errors that a retry cannot fix fail
a task at once (`retry_unless_permanent`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State

from sao_core.config import RoundConfig
from sao_core.errors import (
    CampaignError,
    ConfigError,
    ModelNotFoundError,
    PersonaSourceError,
    RoundQualityError,
    StorageError,
)
from sao_core.store import shards
from sao_core.store.evalsets import EvalSetError
from sao_core.store.layout import MODEL_STAGES, digest, input_stage, load_config, output_url, stage_url

CACHE_VERSION = "v1"  # bump to invalidate every cached task result after a change of task semantics
ROUND_STAGES = ("personas", *MODEL_STAGES, "pairs")

# Errors a retry cannot fix: a wrong config, a missing file or model, input that is not what its
# manifest says, a round under the quality gate. The task fails on the first try with their message.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    PersonaSourceError,
    ModelNotFoundError,
    StorageError,
    RoundQualityError,
    CampaignError,
    EvalSetError,
    FileNotFoundError,
)


def retry_unless_permanent(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    """A `retry_condition_fn`: retry what may pass next time (a lost worker, a timeout, a flaky
    server), never a PERMANENT_ERRORS error, raised or chained (`raise ... from e`)."""
    error = state.data
    while isinstance(error, BaseException):
        if isinstance(error, PERMANENT_ERRORS):
            return False
        error = error.__cause__
    return True


def stage_digest(stage_url: str) -> str:
    """A finished stage's content digest (shards.manifest_digest), or "" when it has none yet."""
    try:
        return shards.manifest_digest(shards.read_stage_manifest(stage_url))
    except (StorageError, FileNotFoundError):
        return ""  # not finished: the task will fail on it, and a failed run is never cached


# What is wrong with a task's output, given the task's parameters; None when it is there and verifies.
OutputCheck = Callable[[dict[str, Any]], str | None]


def stage_output(stage: str) -> OutputCheck:
    """The check of a stage task's output: its folder under the round, manifest and every shard."""

    def check(parameters: dict[str, Any]) -> str | None:
        return shards.stage_problem(stage_url(parameters["round_ref"]["round_dir"], stage))

    return check


def checked_cache_key(context: TaskRunContext, key: str, problem: str | None) -> str:
    """`key`, after retiring the cached result stored under it when the task's output has a problem.

    The key itself never depends on the output: Prefect computes it once, before the task runs, and
    stores the result under it when the task ends, so a key that changed with the output would miss on
    the run after every first run. Instead a result whose output is gone (a deleted round folder) or no
    longer verifies (a corrupted shard) is replaced by an expired record: Prefect's cache then misses,
    the task runs again and stores its new result under the same key.
    """
    if problem is None:
        return key
    store = context.result_store
    if store.exists(key):
        get_run_logger().warning("cached result not used, the task runs again: %s", problem)
        expired = datetime.now(UTC) - timedelta(seconds=1)
        # Annotated with Prefect's pendulum-based DateTime (deprecated); it is compared as a datetime.
        store.write(obj=None, key=key, expiration=expired)  # type: ignore[arg-type]
    return key


def make_cache_key(
    name: str, *input_params: str, output: OutputCheck | None = None
) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A cache_key_fn: task name, the round folder it writes to, its `settings_hash` parameter and the
    content digests of its input URLs (or the hash of an input given as an upstream task's result).

    `output` checks what the task wrote (a stage task: its stage folder, by default); a cached result
    whose output is missing or does not verify is not used (`checked_cache_key`).
    """
    if output is None:
        if name not in ROUND_STAGES:
            raise ValueError(
                f"cache key {name!r}: say how to check the task's output (output=...); only the round's "
                f"stages have a default ({', '.join(ROUND_STAGES)})"
            )
        output = stage_output(name)
    check = output

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        round_dir = (parameters.get("round_ref") or {}).get("round_dir", "")
        parts = [CACHE_VERSION, name, round_dir, str(parameters.get("settings_hash", ""))]
        for p in input_params:
            value = parameters.get(p)
            if isinstance(value, str):
                parts.append(stage_digest(value))
            elif isinstance(value, dict):  # an upstream task's result: where it wrote and its figures
                parts.append(
                    hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
                )
            else:
                parts.append(repr(value))
        cache_key = f"sao-{name}-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
        return checked_cache_key(context, cache_key, check(parameters))

    return key


def shard_cache_key(context: TaskRunContext, p: dict[str, Any]) -> str:
    """A shard task's key: its stage settings hash plus the sha256 of the input shard it reads; a cached
    shard whose file is gone or does not verify runs again."""
    in_url = stage_url(p["round_dir"], input_stage(p["stage"]))
    entry = shards.read_shard_manifest(in_url, p["index"])
    input_sha = entry.sha256 if entry else ""
    raw = f"v1|{p['round_dir']}|{p['stage']}|{p['index']}|{p['settings_hash']}|{input_sha}"
    key = f"sao-shard-{p['stage']}-" + hashlib.sha256(raw.encode()).hexdigest()[:32]
    out_url = output_url(p["round_dir"], p["stage"])
    done = shards.shard_is_done(out_url, p["index"], digest(input_sha), p["settings_hash"])
    problem = None if done else f"{p['stage']} shard {p['index']} of {out_url} is missing or does not verify"
    return checked_cache_key(context, key, problem)


def load_round_config(config_url: str) -> RoundConfig:
    return load_config(config_url)
