"""A scripted, deterministic engine for tests of every path, failures included.

It reads `ChatRequest.kind` to act as prompt writer ("prompt"), responder ("response") or judge
("judge"), and draws each behaviour from a hash of (seed, request id, completion index), so the same
inputs always give the same outputs whatever the batch or shard layout. A LoRA adapter (model.adapter)
stands for a trained policy: the sha256 of its files joins the seed of every draw, so the adapter's
engine writes other text than its base, the same text for the same adapter, and model_revision names it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from sao_core.config import FakeEngineConfig
from sao_core.engines import ChatRequest, Completion, Sampling
from sao_core.errors import EngineError
from sao_core.store.models import model_revision, resolve_adapter

_MALFORMED_VERDICTS = (
    "Both answers are fine.",
    "ranking: 1 > 1",
    "ranking: 2 >",
    "",
    "RANKING 1 2",
)
_TOPICS = ("a budget", "a lesson plan", "a training schedule", "a grant proposal", "a bug report", "a recipe")


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FakeEngine:
    name = "fake"

    def __init__(
        self, cfg: FakeEngineConfig, model: str = "fake", seed: int = 0, adapter: str | None = None
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.seed = seed
        self.model_revision = "fake"
        # What every draw is seeded with: the run seed, and the adapter's content when there is one.
        self._key: str = str(seed)
        if adapter:
            folder = resolve_adapter(adapter)  # any fsspec URL, fetched once into the model cache
            revision = model_revision(adapter, folder)  # the sha256 of its weights' bytes
            self.model_revision += "+adapter:" + revision
            self._key += "+adapter:" + revision
        self.calls = 0

    def close(self) -> None:
        pass

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        self.calls += 1
        if self.calls <= self.cfg.fail_calls:
            raise EngineError(f"fake engine: scripted failure of call {self.calls} of {self.cfg.fail_calls}")
        out = []
        for req in requests:
            text = req.messages[-1].content
            prompt_tokens = sum(len(m.content.split()) for m in req.messages)
            completions = []
            for j in range(req.n):
                body = self._complete(req, text, j, sampling)
                if req.prefill and not body.startswith(req.prefill):
                    body = req.prefill + " " + body.split(":", 1)[-1].strip()
                truncated = _unit(self._key, "trunc", req.request_id, j) < self.cfg.truncate_rate
                words = body.split()
                if truncated or len(words) > sampling.max_tokens:
                    body = " ".join(words[: max(1, min(len(words) - 1, sampling.max_tokens))])
                    finish = "length"
                else:
                    finish = "stop"
                completions.append(Completion(body, finish, prompt_tokens, len(body.split())))
            out.append(completions)
        return out

    def _complete(self, req: ChatRequest, text: str, j: int, sampling: Sampling) -> str:
        key = (self._key, req.request_id, j)
        if req.kind == "prompt":
            return self._prompt(text, key)
        if req.kind == "judge":
            return self._verdict(text, key)
        return self._response(req, text, j, key)

    def _prompt(self, text: str, key: tuple) -> str:
        persona = text.split("\n\n")[1].strip() if text.count("\n\n") >= 2 else text[:80]
        if _unit(*key, "dup") < self.cfg.duplicate_prompt_rate:
            return "User prompt: What is the best way to learn a new language?"
        topic = _TOPICS[int(_unit(*key, "topic") * len(_TOPICS))]
        who = " ".join(persona.rstrip(".").split()[:6])
        ask = f'"Could you draft {topic} for {who}?"'
        if _unit(*key, "prefix") < self.cfg.missing_prefix_rate:
            return f"Here is a prompt: {ask}"
        return f"Sure.\nUser prompt: {ask}"

    def _response(self, req: ChatRequest, text: str, j: int, key: tuple) -> str:
        identical = _unit(self._key, "same", req.request_id) < self.cfg.identical_response_rate
        variant = 0 if identical else j
        length = 8 + int(_unit(self._key, req.request_id, variant, "len") * 40)
        words = [f"w{int(_unit(self._key, req.request_id, variant, i) * 997)}" for i in range(length)]
        return f"Answer to '{text[:40]}': " + " ".join(words) + "."

    def _verdict(self, text: str, key: tuple) -> str:
        if _unit(*key, "malformed") < self.cfg.malformed_judge_rate:
            return _MALFORMED_VERDICTS[int(_unit(*key, "which") * len(_MALFORMED_VERDICTS))]
        if _unit(*key, "position") < self.cfg.position_bias:
            return "ranking: 1 > 2"
        first = re.search(r"<Response 1>(.*?)</Response 1>", text, re.S)
        second = re.search(r"<Response 2>(.*?)</Response 2>", text, re.S)
        len1 = len(first.group(1)) if first else 0
        len2 = len(second.group(1)) if second else 0
        return "ranking: 1 > 2" if len1 >= len2 else "ranking: 2 > 1"
