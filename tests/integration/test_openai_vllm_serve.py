"""The openai engine against a real OpenAI-compatible server: `vllm serve` from .venv-vllm on 127.0.0.1.

One server (SmolLM2) for the module. It is killed twice on purpose: once mid-shard and started again
(the engine's retries carry the shard through), once for good (the shard fails and writes nothing).
Skipped without the vLLM environment unless SAO_REQUIRE_VLLM=1 (see test_vllm_engine.py).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sao_core.config import EngineConfig, ModelConfig, RoundConfig
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines.provider import EngineProvider
from sao_core.errors import EngineError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import load_config, prepare_round
from sao_core.store.models import resolve_model
from sao_core.testing import build_tiny_llama
from tests.integration.test_adapters_engines import GREEDY, answers, build_adapter, chat_requests, same
from tests.procs import kill_group, start, wait_healthy

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"
SMOLLM2 = "bundled:smollm2-135m-instruct"
SERVED = "smollm2"
KEY_ENV = "SAO_TEST_VLLM_API_KEY"
KEY = "sk-sao-test"
CHAT_OK = '"POST /v1/chat/completions HTTP/1.1" 200'

pytestmark = [pytest.mark.vllm, pytest.mark.tier1]


class VLLMServer:
    """`vllm serve` on 127.0.0.1 in a session of its own, so a kill takes its engine processes too."""

    def __init__(self, python: Path, log_path: Path) -> None:
        self.python = python
        self.log_path = log_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300) -> None:
        cmd = [
            str(self.python.parent / "vllm"), "serve", resolve_model(SMOLLM2),
            "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", SERVED,
            "--api-key", KEY, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = start(cmd, env, self.log_path)
        self.starts += 1
        wait_healthy(
            f"http://127.0.0.1:{self.port}/health", self.proc, self.log_path, timeout, what="vllm serve"
        )

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def answered(self) -> int:
        return self.log_path.read_text(errors="replace").count(CHAT_OK)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, vllm_python: str, smollm2: str) -> Iterator[VLLMServer]:
    served = VLLMServer(Path(vllm_python), tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    served.start()
    yield served
    served.kill()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _engine_config(server: VLLMServer, **extra: int) -> EngineConfig:
    return EngineConfig(
        name="openai", base_urls=(server.url,), served_model_name=SERVED, api_key_env=KEY_ENV, **extra
    )


def _round(tmp_path: Path, server: VLLMServer, *overrides: str) -> tuple[RoundConfig, str]:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={tmp_path / 'art'}",
            f"model.path={SMOLLM2}",
            "engine.name=openai",
            f"engine.base_urls=[{server.url}]",
            f"engine.served_model_name={SERVED}",
            f"engine.api_key_env={KEY_ENV}",
            "engine.max_concurrency=2",
            "evaluation.enabled=false",  # the stages only: no trained policy to evaluate
            "prompts.max_tokens=48",
            *overrides,
        ],
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    return cfg, round_dir


def _kill_after(server: VLLMServer, answers: int, restart: bool) -> threading.Thread:
    """Kill the server once it has answered `answers` more chat calls; optionally start it again."""
    first = server.answered()

    def run() -> None:
        deadline = time.monotonic() + 300
        while server.answered() < first + answers and time.monotonic() < deadline:
            time.sleep(0.1)
        server.kill()
        if restart:
            server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_completions_tokens_and_finish_reasons_come_through(server: VLLMServer, api_key: None) -> None:
    engine = make_engine(_engine_config(server, max_concurrency=4), ModelConfig(path=SMOLLM2))
    requests = [
        ChatRequest.user("q0", "What is 7 times 8?", n=2),
        ChatRequest.user("q1", "Name the three primary colors.", n=2),
        ChatRequest.user("q2", "Write a long story about a dragon.", n=1),
        ChatRequest.user("q3", "Suggest a question a teacher might ask.", prefill="User prompt:"),
    ]
    try:
        outs = engine.generate(requests, Sampling(temperature=0.6, top_p=0.95, max_tokens=48, seed=0))
        short = engine.generate(requests[:1], Sampling(temperature=0.0, top_p=1.0, max_tokens=3, seed=0))
    finally:
        engine.close()
    assert [len(o) for o in outs] == [2, 2, 1, 1]
    assert all(c.text and c.prompt_tokens > 0 and 0 < c.completion_tokens <= 48 for o in outs for c in o)
    assert "stop" in {c.finish_reason for c in outs[0] + outs[1]}
    assert outs[2][0].finish_reason == "length" and outs[2][0].completion_tokens == 48
    assert outs[3][0].text.startswith("User prompt:") and len(outs[3][0].text) > len("User prompt:")
    assert [(c.finish_reason, c.completion_tokens) for c in short[0]] == [("length", 3), ("length", 3)]


def test_a_wrong_api_key_is_refused_by_name(server: VLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(EngineError, match=rf"refused the API key \(HTTP 401\); set \${KEY_ENV}"):
        make_engine(_engine_config(server), ModelConfig(path=SMOLLM2))


def test_a_server_killed_mid_shard_and_restarted_is_retried_to_the_end(
    server: VLLMServer, api_key: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, round_dir = _round(tmp_path, server, "personas.n=12", "run.shard_size=12", "engine.max_retries=12")
    killer = _kill_after(server, answers=2, restart=True)
    with caplog.at_level(logging.INFO, logger="sao_core.engines.openai"):
        entry = run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    killer.join()
    assert server.starts == 2
    assert any("failed" in r.getMessage() and "try 2" in r.getMessage() for r in caplog.records)
    assert entry.rows_in == 12 and entry.rows_out + sum(entry.drops.values()) == 12
    assert entry.engine == "openai" and entry.completion_tokens > 0
    out = storage.join(round_dir, "prompts", "_candidates")
    assert shards.read_shard(out, 0, "jsonl")[1] == entry  # written whole, and it verifies


def test_a_server_killed_for_good_fails_the_shard_and_writes_nothing(
    server: VLLMServer, api_key: None, tmp_path: Path
) -> None:
    cfg, round_dir = _round(tmp_path, server, "personas.n=12", "run.shard_size=12", "engine.max_retries=2")
    killer = _kill_after(server, answers=2, restart=False)
    with pytest.raises(
        EngineError, match=r"failed after 3 tries; last error: http://127\.0\.0\.1:\d+/v1: \w+Error"
    ):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    killer.join()
    out = storage.join(round_dir, "prompts", "_candidates")
    assert shards.read_shard_manifest(out, 0) is None
    assert not storage.list_files(out, "part-*")


def test_a_lora_policy_is_loaded_into_the_running_server_and_unloaded(
    vllm_python: str, api_key: None, tmp_path: Path
) -> None:
    """Issue 18, 6: `vllm serve --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True holds the base
    model only; the openai engine loads the trained adapter into it (POST /v1/load_lora_adapter), answers
    through it as transformers does with the adapter merged, and unloads it on close, no restart."""
    base = build_tiny_llama(tmp_path / "model")
    adapter = build_adapter(base, tmp_path / "adapter")
    reference = answers(
        EngineConfig(name="transformers", device="cpu"), ModelConfig(path=base, adapter=adapter)
    )[0]
    log_path = tmp_path / "serve.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [
        str(Path(vllm_python).parent / "vllm"), "serve", base, "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--api-key", KEY, "--enable-lora", "--max-lora-rank", "8",
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    proc = start(cmd, env, log_path)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path, 300, what="vllm serve --enable-lora")
        served = EngineConfig(name="openai", base_urls=(url,), served_model_name="tiny", api_key_env=KEY_ENV)
        headers = {"Authorization": f"Bearer {KEY}"}

        def listed() -> dict[str, Any]:
            return {m["id"]: m for m in httpx.get(f"{url}/models", headers=headers).json()["data"]}

        assert set(listed()) == {"tiny"}
        policy = make_engine(served, ModelConfig(path=base, adapter=adapter))
        name = policy.served_model
        try:
            assert listed()[name]["parent"] == "tiny"
            texts = [row[0].text for row in policy.generate(chat_requests(), GREEDY)]
        finally:
            policy.close()
        assert set(listed()) == {"tiny"}  # unloaded
        base_texts = answers(served, ModelConfig(path=base))[0]
    finally:
        kill_group(proc)
    log = log_path.read_text(errors="replace")
    assert f"Loaded new LoRA adapter: name '{name}'" in log and f"Removed LoRA adapter: name '{name}'" in log
    # fp32 and greedy: the served adapter gives the merged model's tokens (bar a near-tie), not the base's.
    assert same(texts, reference) >= len(texts) - 1, list(zip(reference, texts, strict=True))
    assert same(texts, base_texts) == 0, list(zip(base_texts, texts, strict=True))
