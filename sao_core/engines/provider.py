"""One engine for a run of shards: built on first use, held for every shard given to it, rebuilt when
its worker died.

    engines = EngineProvider(cfg)
    engines.get().generate(requests, sampling)   # the model loads here, once
    engines.close()

A fully resumed stage never loads the model; `builds` and `ready_at` record each load, so a batch run can
say how many it paid for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sao_core.config import RoundConfig
from sao_core.engines import Engine, make_engine

log = logging.getLogger(__name__)


class EngineProvider:
    """Builds the engine on first use, so a fully resumed stage never loads the model."""

    def __init__(self, cfg: RoundConfig, factory: Callable[[], Engine] | None = None) -> None:
        self.cfg = cfg
        self._factory = factory or (lambda: make_engine(cfg.engine, cfg.model, seed=cfg.run.seed))
        self._engine: Engine | None = None
        self.builds = 0  # model loads so far: a batch of shards should cost one
        self.ready_at: list[float] = []  # when each build was ready to generate (epoch seconds)
        self._lock = threading.Lock()

    def get(self) -> Engine:
        # Shard tasks running concurrently (fanout.mode replicas) share one provider: one build between them.
        with self._lock:
            if self._engine is not None and not getattr(self._engine, "alive", True):
                log.warning("%s engine: its worker died; starting a new one", self._engine.name)
                self._close()
            if self._engine is None:
                self._engine = self._factory()
                self.builds += 1
                self.ready_at.append(time.time())
            return self._engine

    def _close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def close(self) -> None:
        with self._lock:
            self._close()
