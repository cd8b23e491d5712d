"""The engines a worker process holds: one per model, shared by the stages and retries that use it.

A batch run (or a round in one process) builds the engine once for all its shards; `close_engines` frees
them and says how many model loads the process paid for and when each was ready.

At most one engine is alive at a time: building one model's engine first closes every other (its vLLM
child gone, its memory free), and the round closes them all before training. On one GPU node a vLLM
child holds `gpu_memory_utilization` of every GPU it sees until it exits, so a second engine, or the
trainer's ranks, would otherwise start on memory that is already taken.
"""

from __future__ import annotations

import hashlib
import threading

from sao_core.config import RoundConfig
from sao_core.engines import Engine, make_engine
from sao_core.engines.provider import EngineProvider

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
            _ENGINES[key] = EngineProvider(cfg, factory=lambda: _build_alone(key, cfg))
        return _ENGINES[key]


def _build_alone(key: str, cfg: RoundConfig) -> Engine:
    """Close every other model's engine, then build this one: one engine alive at a time. The others'
    providers stay registered (a later stage or retry rebuilds on use) but hold no loaded model."""
    with _ENGINE_LOCK:
        others = [provider for k, provider in _ENGINES.items() if k != key]
    for provider in others:
        provider.close()
    return make_engine(cfg.engine, cfg.model, seed=cfg.run.seed)


def release_engine(cfg: RoundConfig) -> None:
    """Free the engine of one model (a trained policy once it is evaluated)."""
    with _ENGINE_LOCK:
        provider = _ENGINES.pop(_engine_key(cfg), None)
    if provider is not None:
        provider.close()


def free_engines() -> None:
    """Close every loaded engine, keeping the providers and their counts: before training, whose ranks
    need the GPU memory an engine holds. A stage that asks again (an evaluation) loads anew."""
    with _ENGINE_LOCK:
        providers = list(_ENGINES.values())
    for provider in providers:
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
