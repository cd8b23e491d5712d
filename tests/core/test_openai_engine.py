"""The openai engine against a scripted OpenAI-compatible server on 127.0.0.1: retries, timeouts, limits.

The stub (tests/stub_openai.py) answers like `vllm serve` does and fails on cue (429, 500, dropped
connections, stalls, aborted requests), so each failure path is exact and fast. The engine against a
real `vllm serve`, killed mid-run, is in tests/integration/test_openai_vllm_serve.py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sao_core.config import EngineConfig, ModelConfig
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines import openai as openai_engine
from sao_core.engines.openai import OpenAIEngine, backoff_seconds
from sao_core.engines.provider import EngineProvider
from sao_core.errors import ConfigError, EngineError
from sao_core.stages.no_model import run_personas
from sao_core.stages.runner import run_shard
from sao_core.store import shards, storage
from sao_core.store.layout import load_config, prepare_round
from tests.stub_openai import HANG_GUARD_S, StubServer, in_background

REPO = Path(__file__).resolve().parents[2]
SAMPLING = Sampling(temperature=0.6, top_p=0.95, max_tokens=16, seed=1)
T = TypeVar("T")


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.01)


def _engine(*urls: str, **engine: Any) -> OpenAIEngine:
    cfg = EngineConfig(name="openai", base_urls=urls, served_model_name="stub-model", **engine)
    built = make_engine(cfg, ModelConfig(path="some/model"), seed=0)
    assert isinstance(built, OpenAIEngine)
    return built


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_completions_come_back_in_order_with_their_finish_reasons(stub: StubServer) -> None:
    engine = _engine(stub.url)
    requests = [ChatRequest.user(f"r{i}", f"question {i}", n=2) for i in range(5)]
    outs = engine.generate(requests, SAMPLING)
    assert [len(o) for o in outs] == [2] * 5
    for i, row in enumerate(outs):
        assert all(c.text.startswith(f"echo:question {i}:") for c in row)
        assert row[0].text != row[1].text  # each completion has its own seed
        assert all(
            c.finish_reason == "stop" and c.prompt_tokens == 7 and c.completion_tokens == 5 for c in row
        )
    short = engine.generate(requests[:1], Sampling(0.0, 1.0, max_tokens=3, seed=1))
    assert [c.finish_reason for c in short[0]] == ["length", "length"]
    assert engine.generate([], SAMPLING) == []
    assert {c["model"] for c in stub.calls} == {"stub-model"} and {c["n"] for c in stub.calls} == {1}
    engine.close()


def test_a_prefill_is_continued_and_starts_the_text(stub: StubServer) -> None:
    engine = _engine(stub.url)
    request = ChatRequest.user("r0", "persona text", kind="prompt", prefill="User prompt: As a")
    out = engine.generate([request], SAMPLING)[0][0]
    assert out.text.startswith("User prompt: As aecho:User prompt: As a:")
    call = stub.calls[-1]
    assert call["messages"][-1] == {"role": "assistant", "content": "User prompt: As a"}
    assert call["continue_final_message"] is True and call["add_generation_prompt"] is False


def test_concurrency_is_bounded(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    callers: set[int] = set()
    post = OpenAIEngine._post

    def recorded_post(self: OpenAIEngine, *args: Any, **kwargs: Any) -> Any:
        callers.add(threading.get_ident())
        return post(self, *args, **kwargs)

    monkeypatch.setattr(OpenAIEngine, "_post", recorded_post)
    # Calls are answered one at a time, when the test says so. Each freed slot is refilled from the
    # queue at once: three calls are in flight while three or more remain, and never a fourth.
    stub.hold_calls()
    engine = _engine(stub.url, max_concurrency=3)
    requests = [ChatRequest.user(f"r{i}", f"q{i}") for i in range(12)]
    outs = in_background(engine.generate, requests, SAMPLING)
    for answered in range(12):
        stub.wait_until(answered=answered, in_flight=min(3, 12 - answered))
        assert stub.max_in_flight == 3, f"{stub.max_in_flight} calls in flight with max_concurrency=3"
        stub.release()
    assert [o[0].text.split(":")[1] for o in outs.result(timeout=HANG_GUARD_S)] == [
        f"q{i}" for i in range(12)
    ]
    assert stub.max_in_flight == 3 and len(stub.calls) == 12
    # Calls run on max_concurrency threads (the engine's docstring). The server alone can miss a
    # fourth caller whose call lands just after the test let one go; the number of callers cannot.
    assert len(callers) == 3
    engine.close()


def test_429_5xx_dropped_connections_and_aborts_are_retried(stub: StubServer) -> None:
    stub.faults = ["429", "500", "drop", "abort"]
    engine = _engine(stub.url, max_concurrency=1, max_retries=4)
    outs = engine.generate([ChatRequest.user("r0", "q")], SAMPLING)
    assert outs[0][0].finish_reason == "stop"
    assert len(stub.calls) == 5


def test_a_stalled_call_times_out_and_is_retried(stub: StubServer) -> None:
    stub.faults = ["stall"]  # the first call is not answered while the test runs
    engine = _engine(stub.url, request_timeout_s=0.5, max_retries=3)
    outs = in_background(engine.generate, [ChatRequest.user("r0", "q")], SAMPLING)
    out = outs.result(timeout=HANG_GUARD_S)[0][0]
    # The answer can only have come from a retry: the stalled call is still waiting. A retry repeats
    # the same completion (same body, so the same seed).
    stub.wait_until(stalled=1)
    assert out.text == f"echo:q:seed={stub.calls[0]['seed']}" and out.finish_reason == "stop"
    assert len(stub.calls) >= 2 and all(call == stub.calls[0] for call in stub.calls)
    engine.close()


def test_retries_running_out_fail_the_shard_and_write_nothing(stub: StubServer, tmp_path: Path) -> None:
    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"run.root={tmp_path}",
            "personas.n=3",
            "engine.name=openai",
            f"engine.base_urls=[{stub.url}]",
            "engine.served_model_name=stub-model",
            "engine.max_retries=2",
            "engine.max_concurrency=1",
            "evaluation.enabled=false",
        ],
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    stub.faults = ["200", "503", "503", "503"]  # the first call answers, the second never does
    with pytest.raises(EngineError, match=r"failed after 3 tries; last error: .*HTTP 503"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    out = storage.join(round_dir, "prompts", "_candidates")
    assert shards.read_shard_manifest(out, 0) is None
    assert not storage.list_files(out, "part-*")
    stub.faults = []
    entry = run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))  # the re-run finishes it
    assert entry.rows_in == 3 and entry.engine == "openai" and entry.model_revision == "served:stub-model"


def test_client_errors_are_not_retried(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(stub.url, max_retries=3)
    stub.faults = ["401"]
    with pytest.raises(EngineError, match=r"refused the API key \(HTTP 401\); set \$OPENAI_API_KEY"):
        engine.generate([ChatRequest.user("r0", "q")], SAMPLING)
    stub.faults = ["400"]
    with pytest.raises(EngineError, match=r"HTTP 400: .*scripted 400"):
        engine.generate([ChatRequest.user("r0", "q")], SAMPLING)
    assert len(stub.calls) == 2


def test_the_api_key_comes_from_the_named_variable(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAO_TEST_API_KEY", "sk-test-123")
    _engine(stub.url, api_key_env="SAO_TEST_API_KEY").generate([ChatRequest.user("r0", "q")], SAMPLING)
    monkeypatch.delenv("SAO_TEST_API_KEY")
    _engine(stub.url, api_key_env="SAO_TEST_API_KEY").generate([ChatRequest.user("r1", "q")], SAMPLING)
    assert stub.headers[0]["Authorization"] == "Bearer sk-test-123"
    assert "Authorization" not in stub.headers[1]


def test_a_dead_replica_is_skipped_by_retries(stub: StubServer) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    engine = _engine(dead, stub.url, max_retries=2, max_concurrency=4)
    outs = engine.generate([ChatRequest.user(f"r{i}", f"q{i}") for i in range(8)], SAMPLING)
    assert [o[0].text.split(":")[1] for o in outs] == [f"q{i}" for i in range(8)]
    assert len(stub.calls) == 8


def test_config_mistakes_are_named(stub: StubServer) -> None:
    with pytest.raises(ConfigError, match=r"needs engine\.base_urls"):
        make_engine(EngineConfig(name="openai"), ModelConfig(path="m"))
    with pytest.raises(ConfigError, match="not an http"):
        make_engine(EngineConfig(name="openai", base_urls=("127.0.0.1:8000",)), ModelConfig(path="m"))
    with pytest.raises(EngineError, match=r"serves \['stub-model'\], not 'other'"):
        make_engine(EngineConfig(name="openai", base_urls=(stub.url,)), ModelConfig(path="other"))


def test_backoff_doubles_up_to_its_cap_and_honours_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.5)
    assert 0.25 <= backoff_seconds(0) <= 0.5
    assert 4.0 <= backoff_seconds(4) <= 8.0
    assert 15.0 <= backoff_seconds(20) <= 30.0
    assert backoff_seconds(3, retry_after=2.0) == 2.0
