"""What the SAO steps and the engines exchange: chat requests in, completions out, sampling settings.

    request = ChatRequest.user("p-0001", "Write a prompt as ...", n=2, kind="response")
    outputs = engine.generate([request], Sampling(temperature=0.6, top_p=0.95, max_tokens=256))
    outputs[0][1].text, outputs[0][1].finish_reason   # the second of request.n completions

Plain data, no imports: the steps (prompts, responses, judging) build and parse these without knowing
which engine runs them.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @classmethod
    def user(
        cls, request_id: str, text: str, n: int = 1, kind: str = "chat", prefill: str = ""
    ) -> ChatRequest:
        return cls(request_id, (Message("user", text),), n=n, kind=kind, prefill=prefill)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or stop string) or "length" (hit max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        # A server's JSON may escape a lone surrogate ("\\ud800"): it is not UTF-8, so no shard could store
        # it and no id could hash it. It becomes U+FFFD, as a UTF-8 decoder makes of a broken byte.
        if not self.text.isascii():
            clean = self.text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            if clean != self.text:
                object.__setattr__(self, "text", clean)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int = 0
