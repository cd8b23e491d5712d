"""The `openai` engine: any OpenAI-compatible chat endpoint, such as a fleet of `vllm serve` replicas.

    engine:
      name: openai
      base_urls: [http://gpu-1:8000/v1, http://gpu-2:8000/v1]
      served_model_name: smollm2        # what the servers call the model (default: model.path)
      api_key_env: OPENAI_API_KEY       # the key is read from this variable, never from a config
      max_concurrency: 8

A trained round's LoRA policy (model.adapter) runs where the servers serve it under a name of its own:

    vllm serve BASE --served-model-name base --enable-lora --lora-modules policy=/path/to/adapter
    engine: {name: openai, served_model_name: base, served_adapter_name: policy}

Requests name `served_adapter_name` when model.adapter is set and `served_model_name` when it is not, so
the base and its policy are both reachable from one engine section. A model.adapter with no
engine.served_adapter_name is loaded into the running replicas when the engine starts (POST
/load_lora_adapter; the servers run with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and read
the adapter at this process's local copy of it) and unloaded when it closes, so an evaluation reaches a
policy trained minutes ago without restarting them. A server that lists the adapter's
name as a base model (vLLM's /models gives an adapter its `parent`), or lists an adapter for a model with
no model.adapter, is refused too: either would answer as the wrong model.

A request's prefill is sent as a final assistant message with vLLM's `continue_final_message` (servers
other than vLLM may not support it). Each completion is one /chat/completions call (n=1, its own seed), so replicas share the load evenly and
a retry repeats one completion, not a request's n. Calls run on max_concurrency threads; a 429, a 5xx, a
timeout or a dropped connection is retried on the next replica with exponential backoff, up to
engine.max_retries times; any other error, or retries running out, fails the whole generate call, and
then the stage writes nothing for its shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from sao_core.config import EngineConfig, ModelConfig
from sao_core.config.worker_env import key_env_problem
from sao_core.engines import ChatRequest, Completion, Sampling
from sao_core.engines.vllm import FINISH_REASONS, conversation, request_seed
from sao_core.errors import ConfigError, EngineError, ModelNotFoundError
from sao_core.store.models import model_revision, resolve_adapter

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


class _Retryable(Exception):
    """A failure worth another try (the server is busy, restarting or unreachable)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def backoff_seconds(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before try `attempt + 1`: the server's Retry-After, else 0.5 s doubling to 30 s, jittered."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), 60.0)
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


def _adapter_revision(adapter: str, served_model: str) -> str:
    """The adapter's model_revision when this process can read it (the pipeline's adapters are at URLs
    it can), else its served name: the server may hold the only copy."""
    try:
        return model_revision(adapter, resolve_adapter(adapter))
    except ModelNotFoundError as e:
        log.warning(
            "openai engine: cannot read the adapter %s here (%s); naming it by its served name", adapter, e
        )
        return f"served:{served_model}"


class OpenAIEngine:
    """Chat completions from OpenAI-compatible servers, `max_concurrency` calls in flight at most."""

    name = "openai"

    def __init__(self, engine: EngineConfig, model: ModelConfig, seed: int = 0) -> None:
        import httpx

        if not engine.base_urls:
            raise ConfigError(
                "engine.name 'openai' needs engine.base_urls, e.g. ['http://127.0.0.1:8000/v1']"
            )
        for url in engine.base_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"engine.base_urls: {url!r} is not an http(s) URL")
        self.cfg = engine
        self.model = model.path
        self.adapter = model.adapter
        # An adapter no server was started with is loaded into the running replicas (vLLM's runtime
        # LoRA loading) under a name made from its URL, and unloaded by close().
        self.runtime_adapter = bool(model.adapter and not engine.served_adapter_name)
        if model.adapter:
            runtime_name = "sao-lora-" + hashlib.sha256(model.adapter.encode()).hexdigest()[:12]
            self.served_model: str = engine.served_adapter_name or runtime_name
        else:
            self.served_model = engine.served_model_name or model.path
        if model.adapter:
            revision = model.revision or f"served:{model.path}"
            self.model_revision = f"{revision}+adapter:{_adapter_revision(model.adapter, self.served_model)}"
        else:
            self.model_revision = model.revision or f"served:{self.served_model}"
        self.base_urls = [u.rstrip("/") for u in engine.base_urls]
        self.seed = seed
        headers = {"Content-Type": "application/json"}
        # Checked again where the key is read: the worker's environment decides which variable may leave
        # the machine as a bearer token, whatever process built this EngineConfig (SECURITY.md).
        problem = key_env_problem(engine.api_key_env)
        if problem:
            raise ConfigError(f"engine.api_key_env: {problem}")
        key = os.environ.get(engine.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(engine.request_timeout_s, connect=min(10.0, engine.request_timeout_s))
        limits = httpx.Limits(
            max_connections=engine.max_concurrency, max_keepalive_connections=engine.max_concurrency
        )
        self._client = httpx.Client(timeout=timeout, limits=limits, headers=headers)
        self._loaded_on: list[str] = []
        try:
            if self.runtime_adapter:
                self._load_adapter(model.adapter or "")
            self._check_models()
        except BaseException:
            self.close()
            raise

    def _load_adapter(self, adapter: str) -> None:
        """POST /load_lora_adapter to every replica: the servers run `vllm serve BASE --enable-lora` with
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and read the adapter folder at the path given, so they must
        see this process's copy of it (one machine, or a shared volume)."""
        path = resolve_adapter(adapter)
        body = {"lora_name": self.served_model, "lora_path": path}
        for url in self.base_urls:
            resp = self._client.post(f"{url}/load_lora_adapter", json=body)
            if resp.status_code == 400 and "already been loaded" in resp.text:
                log.info("openai engine: %s already holds adapter %s", url, self.served_model)
            elif resp.status_code in (404, 405):
                raise EngineError(
                    f"{url} cannot load adapters at run time (HTTP {resp.status_code} on /load_lora_adapter): "
                    "start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, or serve "
                    f"{adapter} with --lora-modules NAME=FOLDER and set engine.served_adapter_name to NAME"
                )
            elif resp.status_code != 200:
                raise EngineError(
                    f"{url} did not load adapter {adapter} from {path} (HTTP {resp.status_code}): {resp.text[:500]}"
                )
            self._loaded_on.append(url)
            log.info("openai engine: loaded adapter %s into %s as %s", adapter, url, self.served_model)

    def _unload_adapter(self) -> None:
        """POST /unload_lora_adapter where _load_adapter loaded it; a replica that is gone is only logged."""
        import httpx

        for url in self._loaded_on:
            try:
                resp = self._client.post(f"{url}/unload_lora_adapter", json={"lora_name": self.served_model})
            except httpx.TransportError as e:
                log.warning("openai engine: could not unload %s from %s: %s", self.served_model, url, e)
                continue
            if resp.status_code != 200:
                log.warning(
                    "openai engine: %s did not unload %s (HTTP %d): %s",
                    url,
                    self.served_model,
                    resp.status_code,
                    resp.text[:200],
                )
        self._loaded_on = []

    def _check_models(self) -> None:
        """Refuse a model name the reachable replicas do not serve; unreachable ones are only logged."""
        import httpx

        for url in self.base_urls:
            try:
                resp = self._client.get(f"{url}/models")
            except httpx.TransportError as e:
                log.warning(
                    "openai engine: %s is unreachable at start (%s); its calls will be retried", url, e
                )
                continue
            if resp.status_code in (401, 403):
                raise EngineError(
                    f"{url} refused the API key (HTTP {resp.status_code}); set ${self.cfg.api_key_env} to its key"
                )
            if resp.status_code != 200:
                continue  # not every OpenAI-compatible server lists its models
            try:
                cards = {m["id"]: m for m in resp.json()["data"]}
            except (ValueError, KeyError, TypeError):
                continue
            if self.served_model not in cards:
                raise EngineError(
                    f"{url} serves {list(cards)}, not {self.served_model!r}; set engine."
                    f"{'served_adapter_name' if self.adapter else 'served_model_name'} "
                    "(or start the server with --served-model-name)"
                )
            self._check_adapter(url, cards[self.served_model])

    def _check_adapter(self, url: str, card: Any) -> None:
        """Refuse a served model that is not what model.adapter says: vLLM lists an adapter with its base
        model as `parent` and a base model with `parent` null; a server that gives no parent is trusted."""
        if not isinstance(card, dict) or "parent" not in card:
            return
        if self.adapter and not card["parent"]:
            raise EngineError(
                f"{url} serves {self.served_model!r} as a base model, not as the adapter {self.adapter}; "
                "serve the adapter (--enable-lora --lora-modules NAME=ADAPTER_FOLDER) and set "
                "engine.served_adapter_name to NAME"
            )
        if not self.adapter and card["parent"]:
            raise EngineError(
                f"{url} serves {self.served_model!r} as a LoRA adapter of {card['parent']!r}, but "
                "model.adapter is not set; set engine.served_model_name to the base model's name, or "
                "model.adapter to the adapter it serves"
            )

    def close(self) -> None:
        if self._loaded_on:
            self._unload_adapter()
        self._client.close()

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[Completion]]:
        jobs = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        if not jobs:
            return []
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(jobs))) as pool:
            futures = {
                pool.submit(self._complete, requests[i], j, sampling, k, stop): (i, j)
                for k, (i, j) in enumerate(jobs)
            }
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()  # the first failure, if any, is raised here
            except BaseException:
                stop.set()  # running calls give up at their next retry; queued ones never start
                for future in futures:
                    future.cancel()
                raise
            for future, (i, j) in futures.items():
                results[i][j] = future.result()
        return [[c for c in row if c is not None] for row in results]

    def _complete(
        self, request: ChatRequest, index: int, sampling: Sampling, job: int, stop: threading.Event
    ) -> Completion:
        import httpx

        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": conversation(request),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "n": 1,
            "seed": request_seed(sampling.seed, request.request_id, index),
        }
        if request.prefill:
            # vLLM's chat API continues a final assistant message when asked (not part of OpenAI's API).
            body.update(add_generation_prompt=False, continue_final_message=True)
        where = f"request {request.request_id} (completion {index})"
        reason = ""
        for attempt in range(self.cfg.max_retries + 1):
            if stop.is_set():
                raise EngineError(f"{where}: cancelled after another request failed")
            url = self.base_urls[(job + attempt) % len(self.base_urls)]  # a retry moves to the next replica
            try:
                return self._post(url, body, where, request.prefill)
            except _Retryable as e:
                reason, retry_after = f"{url}: {e}", e.retry_after
            except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                reason, retry_after = f"{url}: {type(e).__name__}: {e}", None
            if attempt < self.cfg.max_retries:
                delay = backoff_seconds(attempt, retry_after)
                log.info("openai engine: %s failed (%s); try %d in %.1fs", where, reason, attempt + 2, delay)
                if stop.wait(delay):
                    raise EngineError(f"{where}: cancelled after another request failed")
        raise EngineError(f"{where} failed after {self.cfg.max_retries + 1} tries; last error: {reason}")

    def _post(self, url: str, body: dict[str, Any], where: str, prefill: str = "") -> Completion:
        resp = self._client.post(f"{url}/chat/completions", json=body)
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(
                f"HTTP {resp.status_code} {resp.text[:200]}", _retry_after(resp.headers.get("retry-after"))
            )
        if resp.status_code in (401, 403):
            raise EngineError(
                f"{url} refused the API key (HTTP {resp.status_code}); set ${self.cfg.api_key_env}"
            )
        if resp.status_code != 200:
            raise EngineError(f"{where}: {url} answered HTTP {resp.status_code}: {resp.text[:500]}")
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed answer ({type(e).__name__}: {e}): {resp.text[:200]}") from e
        if finish == "abort":  # vLLM aborts running requests when it shuts down
            raise _Retryable("the server aborted the request")
        if finish not in FINISH_REASONS:
            raise EngineError(
                f"{where}: finish_reason {finish!r}, expected one of {', '.join(FINISH_REASONS)}"
            )
        return Completion(
            text=prefill + text,
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )
