"""Engines: chat requests in, completions out, behind one interface.

    engine = make_engine(cfg.engine, cfg.model, seed=cfg.run.seed)
    outputs = engine.generate(requests, Sampling(temperature=0.6, top_p=0.95, max_tokens=256))
    outputs[i][j]  # the j-th of requests[i].n completions

Stages never see which engine runs: they build requests and parse completions (sao_core.stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sao_core.config import EngineConfig, ModelConfig


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatRequest:
    """One chat to complete `n` times; `kind` says which stage built it (the fake engine reads it)."""

    request_id: str
    messages: tuple[Message, ...]
    n: int = 1
    kind: str = "chat"
    # Text the assistant turn starts with; the model continues it and each completion's text begins
    # with it (so parsers see it). Empty: a plain generation prompt.
    prefill: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def user(
        cls, request_id: str, text: str, n: int = 1, kind: str = "chat", prefill: str = "", **meta: str
    ) -> ChatRequest:
        return cls(request_id, (Message("user", text),), n=n, kind=kind, prefill=prefill, meta=dict(meta))


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or stop string) or "length" (hit max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int = 0


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

        return FakeEngine(engine.fake, model=model.path, seed=seed)
    if engine.name == "transformers":
        from sao_core.engines.transformers_engine import TransformersEngine

        return TransformersEngine(engine, model, seed=seed)
    if engine.name == "vllm":
        from sao_core.engines.vllm import VLLMEngine  # type: ignore[import-not-found,unused-ignore]

        return VLLMEngine(engine, model, seed=seed)  # type: ignore[no-any-return,unused-ignore]
    if engine.name == "openai":
        from sao_core.engines.openai import OpenAIEngine  # type: ignore[import-not-found,unused-ignore]

        return OpenAIEngine(engine, model, seed=seed)  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"unknown engine.name {engine.name!r}; allowed: transformers, fake, vllm, openai")
