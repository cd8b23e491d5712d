"""In-process generation with transformers: chat template, left padding, batched `generate`.

The embedded default on CPU. Requests are sorted by prompt length before batching (less padding) and
the outputs put back in request order. Each batch is seeded from the run seed and its first request id,
so a shard re-run gives the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from sao_core.config import EngineConfig, ModelConfig
from sao_core.engines import ChatRequest, Completion, Sampling
from sao_core.errors import ModelNotFoundError
from sao_core.store.models import load_kwargs, model_revision, resolve_adapter, resolve_model

log = logging.getLogger(__name__)


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def _apply_adapter(lm: Any, adapter_dir: str) -> Any:
    """Load a LoRA adapter onto the base model and merge it: inference then costs what the base does."""
    from peft import PeftModel

    return PeftModel.from_pretrained(lm, adapter_dir).merge_and_unload()


class TransformersEngine:
    name = "transformers"

    def __init__(self, engine: EngineConfig, model: ModelConfig, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = engine
        self.model = model.path
        self.seed = seed
        resolved = resolve_model(model.path)
        self.device = _pick_device(engine.device)
        kwargs: dict[str, Any] = load_kwargs(resolved, model.revision, model.trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
            self.lm = AutoModelForCausalLM.from_pretrained(
                resolved, dtype=_pick_dtype(engine.dtype, self.device), **kwargs
            )
        except OSError as e:
            raise ModelNotFoundError(f"cannot load model {model.path!r} (resolved to {resolved}): {e}") from e
        self.model_revision = model_revision(model.path, resolved, model.revision)
        if model.adapter:
            adapter = resolve_adapter(model.adapter)  # any fsspec URL, fetched once into the model cache
            self.lm = _apply_adapter(self.lm, adapter)
            self.model_revision += "+adapter:" + model_revision(model.adapter, adapter)
        self.lm.to(self.device).eval()  # type: ignore[arg-type]
        # Decoder-only batching needs left padding so every prompt ends where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.chat_template is None:
            raise ModelNotFoundError(f"model {model.path!r} has no chat template; SAO needs a chat model")
        eos = self.lm.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        eos_ids = [*eos_ids, self.tokenizer.eos_token_id]
        self.eos_ids = {int(i) for i in eos_ids if i is not None}

    def close(self) -> None:
        import gc

        del self.lm
        gc.collect()

    def _render(self, request: ChatRequest) -> str:
        messages = [m.to_dict() for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text) + request.prefill

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        import torch

        rendered = [self._render(r) for r in requests]
        lengths = [len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in rendered]
        # One sequence per (request, sample); longest first so batches hold similar lengths.
        jobs = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
        jobs.sort(key=lambda ij: -lengths[ij[0]])
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        bs = self.cfg.batch_size
        for start in range(0, len(jobs), bs):
            batch = jobs[start : start + bs]
            texts = [rendered[i] for i, _ in batch]
            seed_key = f"{self.seed}:{requests[batch[0][0]].request_id}:{batch[0][1]}"
            torch.manual_seed(int(hashlib.sha256(seed_key.encode()).hexdigest()[:8], 16))
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            do_sample = sampling.temperature > 0
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_tokens,
                "do_sample": do_sample,
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if do_sample:
                gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            with torch.inference_mode():
                out = self.lm.generate(**enc, **gen_kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            for (i, j), tokens in zip(batch, new_tokens, strict=True):
                done = self._completion(tokens, lengths[i], sampling.max_tokens)
                if requests[i].prefill:
                    done = dataclasses.replace(done, text=requests[i].prefill + done.text)
                results[i][j] = done
        return [[c for c in row if c is not None] for row in results]

    def _completion(self, tokens: list[int], prompt_tokens: int, max_tokens: int) -> Completion:
        cut = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        if cut is not None:
            kept, finish, count = tokens[:cut], "stop", cut + 1
        else:
            kept, finish, count = tokens, ("length" if len(tokens) >= max_tokens else "stop"), len(tokens)
        text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
        return Completion(
            text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=count
        )
