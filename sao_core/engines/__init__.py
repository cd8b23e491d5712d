"""Engines: chat requests in, completions out, behind one interface.

    engine = make_engine(cfg.engine, cfg.model, seed=cfg.run.seed)
    outputs = engine.generate(requests, Sampling(temperature=0.6, top_p=0.95, max_tokens=256))
    outputs[i][j]  # the j-th of requests[i].n completions

Stages never see which engine runs: they build requests and parse completions (sao_core.stages); the
request and completion types live in sao_core.chat, below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sao_core.chat import ChatRequest, Completion, Message, Sampling
from sao_core.config import EngineConfig, ModelConfig

__all__ = ["ChatRequest", "Completion", "Engine", "Message", "Sampling", "make_engine"]


class Engine(Protocol):
    name: str
    model: str
    model_revision: str

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        """One list of `request.n` completions per request, in request order."""
        ...

    def close(self) -> None: ...


def make_engine(engine: EngineConfig, model: ModelConfig, seed: int = 0) -> Engine:
    """Build the engine the config names. Heavy libraries load here, not at import."""
    if engine.name == "fake":
        from sao_core.engines.fake import FakeEngine

        return FakeEngine(engine.fake, model=model.path, seed=seed, adapter=model.adapter)
    if engine.name == "transformers":
        from sao_core.engines.transformers_engine import TransformersEngine

        return TransformersEngine(engine, model, seed=seed)
    if engine.name == "vllm":
        from sao_core.engines.vllm import VLLMEngine

        return VLLMEngine(engine, model, seed=seed)  # type: ignore[no-any-return,unused-ignore]
    if engine.name == "openai":
        from sao_core.engines.openai import OpenAIEngine

        return OpenAIEngine(engine, model, seed=seed)  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"unknown engine.name {engine.name!r}; allowed: transformers, fake, vllm, openai")
