"""The `vllm` engine: vllm.LLM in a child process under the vLLM environment's interpreter.

vLLM pins packages that clash with Prefect's (ENV.md) and holds its GPU for the life of its process, so it
never runs inside the orchestration process (STYLE.md rule 6):

    engine = make_engine(cfg.engine, cfg.model)   # VLLMEngine: a worker child, the model loaded once
    engine.generate(requests, sampling)          # every shard of a stage or a GPU batch, one after another
    engine.close()

The worker runs under `engine.python` (default: this interpreter), started through
sao_core.engines.child. A crash or an OOM kill of the worker, or a call that runs past
`engine.shard_timeout_s`, fails that call with the worker's last log lines; the engine is then dead
(`alive` is False) and the shard runner starts a new one for the retry. This module never imports vllm:
the child's side is sao_core.engines.vllm_worker. The pure helpers here are shared with the worker and
the openai engine.

With model.adapter set (a trained round's LoRA policy), the parent resolves the adapter once (any fsspec
URL, fetched into the model cache) and passes its folder in the start command; the worker starts vLLM
with `enable_lora` and a `max_lora_rank` that holds the adapter's rank, loads the adapter before it
answers the start, and sends every request with the adapter's LoRARequest. vLLM's CPU build runs LoRA
too (its PunicaWrapperCPU), with the same greedy tokens as transformers with the adapter merged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from sao_core.config import EngineConfig, ModelConfig
from sao_core.engines import ChatRequest, Completion, Sampling
from sao_core.engines.child import ChildProcess, interpreter
from sao_core.errors import ConfigError, EngineError, ModelNotFoundError
from sao_core.store.models import model_revision, resolve_adapter, resolve_model

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")
# The LoRA ranks vLLM accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks in vLLM 0.32 and 0.33).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The one adapter a worker serves: vLLM's lora_name for it; its lora_int_id is 1.
ADAPTER_NAME = "policy"


# --- pure helpers, shared with the worker ------------------------------------------------------------------


def request_seed(seed: int, request_id: str, index: int = 0) -> int:
    """A per-request sampling seed, so a request's text does not depend on its batch or shard neighbours."""
    digest = hashlib.sha256(f"{seed}\x1f{request_id}\x1f{index}".encode()).hexdigest()
    return int(digest[:8], 16)


def max_lora_rank(adapter_dir: str) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds the adapter: its adapter_config.json `r` (and
    any larger rank in its `rank_pattern`), rounded up to one of LORA_RANKS."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
        ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelNotFoundError(f"LoRA adapter {adapter_dir}: no rank `r` in {path}: {e}") from e
    rank = max(ranks)
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(
        f"LoRA adapter {adapter_dir} has rank {rank}; vLLM serves ranks up to {LORA_RANKS[-1]}: "
        "merge it into its base (training.merge) and give the merged model as model.path"
    )


def llm_kwargs(
    engine: EngineConfig,
    model_dir: str,
    seed: int,
    on_cpu: bool,
    revision: str | None = None,
    lora_rank: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Keyword arguments of `vllm.LLM` from the engine section.

    On CPU: float32 for dtype "auto" and eager mode always (vLLM's CPU backend, ENV.md "vLLM on CPU").
    With `lora_rank` (from max_lora_rank): LoRA on, for one adapter of at most that rank.
    """
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "seed": seed,
        "dtype": "float32" if on_cpu and engine.dtype == "auto" else engine.dtype,
        "enforce_eager": engine.enforce_eager or on_cpu,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "disable_log_stats": True,
        # engine.batch_size under vLLM: the most sequences its scheduler runs at once (vLLM's own default
        # is 256 on GPUs; the paper recipes say so). Outputs do not depend on it: each request has its seed.
        "max_num_seqs": engine.batch_size,
        # model.trust_remote_code, said explicitly: a model's own code runs only when the config says so.
        "trust_remote_code": trust_remote_code,
    }
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    if revision and not Path(model_dir).is_dir():
        kwargs["revision"] = revision  # a hub id; a local folder has no revisions
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    return kwargs


def sampling_kwargs(sampling: Sampling, request: ChatRequest) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request."""
    return {
        "n": request.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": request_seed(sampling.seed, request.request_id),
    }


def conversation(request: ChatRequest) -> list[dict[str, str]]:
    """The request's messages, plus its prefill as an unfinished assistant turn for the model to continue."""
    messages = [m.to_dict() for m in request.messages]
    if request.prefill:
        messages.append({"role": "assistant", "content": request.prefill})
    return messages


def to_completion(
    text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, where: str
) -> Completion:
    """A Completion, refusing finish reasons other than stop/length (an aborted request is no answer)."""
    if finish_reason not in FINISH_REASONS:
        raise EngineError(
            f"{where}: finish_reason {finish_reason!r}, expected one of {', '.join(FINISH_REASONS)}"
        )
    return Completion(text, finish_reason, prompt_tokens, completion_tokens)


def completion_to_dict(c: Completion) -> dict[str, Any]:
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
    }


def request_to_dict(r: ChatRequest) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "messages": [m.to_dict() for m in r.messages],
        "n": r.n,
        "kind": r.kind,
        "prefill": r.prefill,
    }


# --- the engine for callers outside the shard runner ----------------------------------------------------------


class VLLMEngine:
    """The `vllm` engine behind the Engine interface: a worker child holding one vllm.LLM until close().

    Requests and completions travel as JSON lines over two pipes of their own (vLLM logs to stdout).
    `start_seconds` is the child's start-up (interpreter, vLLM import, model load); `generate` then adds
    only the round trip of the JSON. `worker_seconds` is the worker's own time for the last `generate`,
    so a caller can tell that round trip from the generation. A `generate` that runs past
    `engine.shard_timeout_s` ends the worker and raises; so does a worker that dies.
    """

    name = "vllm"

    def __init__(self, engine: EngineConfig, model: ModelConfig, seed: int = 0) -> None:
        self.model = model.path
        model_dir = resolve_model(model.path)
        self.model_revision = model_revision(model.path, model_dir, model.revision)
        adapter_dir = None
        if model.adapter:
            # Resolved here, like the model: the worker may not reach the adapter's store (memory://, S3
            # credentials), and a rank vLLM cannot serve fails before a worker starts.
            adapter_dir = resolve_adapter(model.adapter)
            max_lora_rank(adapter_dir)
            self.model_revision += "+adapter:" + model_revision(model.adapter, adapter_dir)
        cmd_read, cmd_write = os.pipe()
        reply_read, reply_write = os.pipe()
        cmd = [
            interpreter(engine),
            "-m",
            "sao_core.engines.vllm_worker",
            "--commands-fd",
            str(cmd_read),
            "--replies-fd",
            str(reply_write),
        ]
        try:
            self._child = ChildProcess(cmd, f"vllm engine ({model.path})", pass_fds=(cmd_read, reply_write))
        finally:
            os.close(cmd_read)
            os.close(reply_write)
        self._commands: IO[str] = os.fdopen(cmd_write, "w", encoding="utf-8")
        self._replies: IO[str] = os.fdopen(reply_read, "r", encoding="utf-8")
        self._lock = threading.Lock()
        self._timeout_s = engine.shard_timeout_s
        self._timed_out = False
        start = {
            "op": "start",
            "engine": engine.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "model_dir": model_dir,
            "adapter_dir": adapter_dir,
            "seed": seed,
        }
        try:
            reply = self._call(start)
        except BaseException:
            self._child.kill_group()
            raise
        self.start_seconds = time.perf_counter() - self._child.started
        self.load_seconds = float(reply.get("load_seconds", 0.0))
        self.worker_seconds = 0.0
        log.info("vllm engine ready in %.1fs (model load %.1fs)", self.start_seconds, self.load_seconds)

    @property
    def alive(self) -> bool:
        """Whether the worker still runs; a dead engine is closed and built anew by its provider."""
        return self._child.proc.poll() is None

    def _expire(self) -> None:
        self._timed_out = True
        self._child.kill_group()

    def _call(self, message: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        with self._lock:
            timer = threading.Timer(timeout_s, self._expire) if timeout_s else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                self._commands.write(json.dumps(message) + "\n")
                self._commands.flush()
                line = self._replies.readline()
            except (BrokenPipeError, ValueError, OSError):
                line = ""
            finally:
                if timer is not None:
                    timer.cancel()
            if not line:
                try:
                    rc: int | None = self._child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    rc = None
                status = (
                    f"was ended: the call ran past engine.shard_timeout_s={self._timeout_s:g}s"
                    if self._timed_out
                    else None
                )
                error = self._child.failure(rc, status=status)
                self._child.kill_group()
                raise error
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise EngineError(f"vllm engine ({self.model}): {reply.get('error', 'unknown error')}")
        return reply

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        reply = self._call(
            {
                "op": "generate",
                "requests": [request_to_dict(r) for r in requests],
                "sampling": {
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_tokens,
                    "seed": sampling.seed,
                },
            },
            timeout_s=self._timeout_s,
        )
        self.worker_seconds = float(reply.get("seconds", 0.0))
        outputs = [[Completion(**c) for c in row] for row in reply["outputs"]]
        if len(outputs) != len(requests) or any(
            len(o) != r.n for o, r in zip(outputs, requests, strict=True)
        ):
            raise EngineError(f"vllm engine ({self.model}): wrong number of completions from the worker")
        return outputs

    def close(self) -> None:
        """Ask the worker to exit; end its process group if it does not within 60 s."""
        if self._child.proc.poll() is None:
            try:
                self._call({"op": "close"})
                self._child.wait(timeout=60)
            except (EngineError, subprocess.TimeoutExpired):
                pass
        self._child.kill_group()
        for f in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                f.close()
