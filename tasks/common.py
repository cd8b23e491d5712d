"""What every SAO task shares: cache keys from content hashes, one engine per process, artifacts.

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
import os
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State

from sao_core import storage
from sao_core.config import RoundConfig, load_config
from sao_core.errors import (
    CampaignError,
    ConfigError,
    ModelNotFoundError,
    PersonaSourceError,
    RoundQualityError,
    StorageError,
)
from sao_core.evalsets import EvalSetError
from sao_core.stages.layout import MODEL_STAGES, digest, input_stage, output_url, stage_url
from sao_core.stages.runner import EngineProvider

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
    """sha256 over a finished stage's shard hashes (its content), or "" when it has none yet."""
    try:
        manifest = storage.read_stage_manifest(stage_url)
    except (StorageError, FileNotFoundError):
        return ""  # not finished: the task will fail on it, and a failed run is never cached
    shas = [str(e.get("sha256", "")) for e in manifest.get("shards", [])]
    return hashlib.sha256("\x1f".join(shas).encode()).hexdigest()


# What is wrong with a task's output, given the task's parameters; None when it is there and verifies.
OutputCheck = Callable[[dict[str, Any]], str | None]


def stage_problem(url: str) -> str | None:
    """Why a stage's output cannot be used (no manifest, a shard missing or unlike its sha256), or None."""
    try:
        manifest = storage.read_stage_manifest(url)
        for raw in manifest["shards"]:
            entry = storage.ShardManifest.from_dict(raw, storage.join(url, "manifest.json"))
            storage.verify_shard(url, entry)
            if entry.dropped_file:
                dropped = storage.join(url, entry.dropped_file)
                if storage.sha256_bytes(storage.read_bytes(dropped)) != entry.dropped_sha256:
                    return f"{dropped} does not match its manifest"
    except (StorageError, FileNotFoundError) as e:
        return str(e)
    return None


def stage_output(stage: str) -> OutputCheck:
    """The check of a stage task's output: its folder under the round, manifest and every shard."""

    def check(parameters: dict[str, Any]) -> str | None:
        return stage_problem(stage_url(parameters["round_ref"]["round_dir"], stage))

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
    entry = storage.read_shard_manifest(in_url, p["index"])
    input_sha = entry.sha256 if entry else ""
    raw = f"v1|{p['round_dir']}|{p['stage']}|{p['index']}|{p['settings_hash']}|{input_sha}"
    key = f"sao-shard-{p['stage']}-" + hashlib.sha256(raw.encode()).hexdigest()[:32]
    out_url = output_url(p["round_dir"], p["stage"])
    done = storage.shard_is_done(out_url, p["index"], digest(input_sha), p["settings_hash"])
    problem = None if done else f"{p['stage']} shard {p['index']} of {out_url} is missing or does not verify"
    return checked_cache_key(context, key, problem)


_ENGINES: dict[str, EngineProvider] = {}
_ENGINE_LOCK = threading.Lock()


def _engine_key(cfg: RoundConfig) -> str:
    raw = cfg.engine.model_dump_json() + cfg.model.model_dump_json() + str(cfg.run.seed)
    return hashlib.sha256(raw.encode()).hexdigest()


def engine_for(cfg: RoundConfig) -> EngineProvider:
    """One engine per process and model: stages of a round (and its retries) share the loaded weights."""
    key = _engine_key(cfg)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = EngineProvider(cfg)
        return _ENGINES[key]


def release_engine(cfg: RoundConfig) -> None:
    """Free the engine of one model (a trained policy once it is evaluated)."""
    with _ENGINE_LOCK:
        provider = _ENGINES.pop(_engine_key(cfg), None)
    if provider is not None:
        provider.close()


def close_engines() -> tuple[int, list[float]]:
    """Free every engine this process holds (a batch run's last step); return how many were built and
    when each was ready to generate (epoch seconds)."""
    with _ENGINE_LOCK:
        providers = list(_ENGINES.values())
        _ENGINES.clear()
    builds, ready_at = 0, []
    for provider in providers:
        builds += provider.builds
        ready_at += provider.ready_at
        provider.close()
    return builds, sorted(ready_at)


@task(
    name="result-storage",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
)
def result_storage(root: str) -> str | None:
    """Where task results persist: Prefect's local result folder for local roots; for an s3:// root a
    saved RemoteFileSystem block under {root}/_prefect_results (its slug), so any worker sharing the
    bucket is served from the same cache. Credentials stay in the environment, not in the block."""
    if not root.startswith("s3://"):
        return None
    from prefect.filesystems import RemoteFileSystem

    settings: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        settings["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    name = "sao-results-" + hashlib.sha256(root.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=storage.join(root, "_prefect_results"), settings=settings).save(
        name, overwrite=True
    )
    return f"remote-file-system/{name}"


def with_result_storage(task_: Any, slug: str | None) -> Any:
    """The task with the round's result storage, when it has one of its own."""
    return task_.with_options(result_storage=slug) if slug else task_


def load_round_config(config_url: str) -> RoundConfig:
    return load_config(config_url)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def link_for(url: str) -> str:
    return url if "://" in url else f"file://{url}"


def publish_stage(stage: str, round_dir: str, summary: dict[str, Any], campaign: str, sample_md: str) -> None:
    """The three artifacts a person opens for a stage: counts table, sample rows, links to its files."""
    tokens = int(summary.get("completion_tokens", 0))
    seconds = float(summary.get("seconds", 0.0))
    drops = summary.get("drops", {})
    table = [
        {"metric": "rows in", "value": summary.get("rows_in", 0)},
        {"metric": "rows out", "value": summary.get("rows_out", 0)},
        *({"metric": f"dropped: {k}", "value": v} for k, v in drops.items()),
        {"metric": "prompt tokens", "value": summary.get("prompt_tokens", 0)},
        {"metric": "completion tokens", "value": tokens},
        {"metric": "seconds", "value": round(seconds, 2)},
        {"metric": "tokens/s", "value": round(tokens / seconds, 1) if seconds and tokens else 0},
    ]
    if "repetition_rate" in summary:
        table.append({"metric": "repetition rate", "value": summary["repetition_rate"]})
    for k, v in (summary.get("diagnostics") or {}).items():
        if isinstance(v, (int, float)) or v is None:
            table.append({"metric": f"judge {k.replace('_', ' ')}", "value": v})
    key = artifact_key(campaign, stage)
    create_table_artifact(
        table, key=f"{key}-counts", description=f"{stage}: rows, drops by reason, tokens, time"
    )
    create_markdown_artifact(sample_md, key=f"{key}-sample", description=f"{stage}: sample rows")
    url = storage.join(round_dir, stage)
    create_link_artifact(link_for(url), link_text=f"{stage} files", key=f"{key}-files", description=url)
