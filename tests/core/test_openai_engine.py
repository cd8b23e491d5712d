"""The openai engine against a scripted OpenAI-compatible server on 127.0.0.1: retries, timeouts, limits.

The stub answers like `vllm serve` does and fails on cue (429, 500, dropped connections, stalls,
aborted requests), so each failure path is exact and fast. The engine against a real `vllm serve`,
killed mid-run, is in tests/integration/test_openai_vllm_serve.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sao_core import storage
from sao_core.config import EngineConfig, ModelConfig, load_config
from sao_core.engines import ChatRequest, Sampling, make_engine
from sao_core.engines import openai as openai_engine
from sao_core.engines.openai import OpenAIEngine, backoff_seconds
from sao_core.errors import ConfigError, EngineError
from sao_core.stages.layout import prepare_round
from sao_core.stages.round import run_personas
from sao_core.stages.runner import EngineProvider, run_shard

REPO = Path(__file__).resolve().parents[2]
SAMPLING = Sampling(temperature=0.6, top_p=0.95, max_tokens=16, seed=1)
# Only a guard against a hang when the engine misbehaves; no outcome depends on it.
HANG_GUARD_S = 60.0
T = TypeVar("T")


class StubServer:
    """An OpenAI-compatible chat server that echoes the last message and fails as scripted.

    No outcome here depends on timing: a stalled call waits until the server stops, and after
    `hold_calls()` every chat call waits until the test lets it go with `release()`, so a test knows
    at each step which calls are in flight (`wait_until` blocks until the counters read as expected).
    """

    def __init__(self, model: str = "stub-model") -> None:
        self.model = model
        self.faults: list[str] = []  # consumed one per chat call: 429, 500, drop, stall, abort, 401, 400
        self.calls: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0  # chat calls received and not answered yet
        self.max_in_flight = 0
        self.answered = 0
        self.stalled = 0  # stalled calls still waiting
        self.holding = False
        self.releases = 0  # held calls the test has let go and that have not gone yet
        self.closing = False
        self.changed = threading.Condition()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.changed:
                    stub.calls.append(body)
                    stub.headers.append(dict(self.headers))
                    fault = stub.faults.pop(0) if stub.faults else ""
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    stub.changed.notify_all()
                    if stub.holding:
                        stub.changed.wait_for(lambda: stub.releases > 0 or stub.closing)
                        if not stub.closing:
                            stub.releases -= 1
                reply = self._reply(body, fault)
                # A call stops counting before its answer leaves: the engine cannot start another call
                # on the freed slot until it has the answer, so `in_flight` never counts one too many.
                with stub.changed:
                    stub.in_flight -= 1
                    stub.answered += reply is not None
                    stub.changed.notify_all()
                if reply is None:  # the connection drops without an answer
                    self.close_connection = True
                    with contextlib.suppress(OSError):  # the client may have hung up already
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(*reply)

            def _reply(
                self, body: dict[str, Any], fault: str
            ) -> tuple[int, dict[str, Any], dict[str, str]] | None:
                if fault == "drop":
                    return None
                if fault == "stall":
                    with stub.changed:
                        stub.stalled += 1
                        stub.changed.notify_all()
                        stub.changed.wait_for(lambda: stub.closing)
                        stub.stalled -= 1
                    return None
                if fault.isdigit() and fault != "200":
                    return int(fault), {"error": {"message": f"scripted {fault}"}}, {"Retry-After": "0"}
                text = f"echo:{body['messages'][-1]['content']}:seed={body['seed']}"
                finish = "abort" if fault == "abort" else "length" if body["max_tokens"] < 4 else "stop"
                return (
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": finish,
                            }
                        ],
                        "usage": {"prompt_tokens": 7, "completion_tokens": min(5, body["max_tokens"])},
                    },
                    {},
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def hold_calls(self) -> None:
        """From now on every chat call waits for a `release()` before it is answered."""
        with self.changed:
            self.holding = True

    def release(self, calls: int = 1) -> None:
        with self.changed:
            self.releases += calls
            self.changed.notify_all()

    def wait_until(self, **counts: int) -> None:
        """Block until each named counter (in_flight, answered, stalled) has reached the given value."""
        with self.changed:
            if not self.changed.wait_for(
                lambda: all(getattr(self, k) >= v for k, v in counts.items()), timeout=HANG_GUARD_S
            ):
                now = {k: getattr(self, k) for k in ("in_flight", "answered", "stalled", "max_in_flight")}
                raise AssertionError(f"stub server: waited for {counts}, counters are {now}")

    def stop(self) -> None:
        with self.changed:
            self.closing = True  # held and stalled calls go, so no handler outlives the test
            self.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()


def _in_background(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run fn on a thread of its own, so that the test can drive the stub while the engine waits on it."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


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
    outs = _in_background(engine.generate, requests, SAMPLING)
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
    outs = _in_background(engine.generate, [ChatRequest.user("r0", "q")], SAMPLING)
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
        ],
    )
    round_dir = prepare_round(cfg)
    run_personas(cfg, round_dir)
    stub.faults = ["200", "503", "503", "503"]  # the first call answers, the second never does
    with pytest.raises(EngineError, match=r"failed after 3 tries; last error: .*HTTP 503"):
        run_shard("prompts", cfg, round_dir, 0, EngineProvider(cfg))
    out = storage.join(round_dir, "prompts", "_candidates")
    assert storage.read_shard_manifest(out, 0) is None
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
    monkeypatch.setenv("SAO_TEST_KEY", "sk-test-123")
    _engine(stub.url, api_key_env="SAO_TEST_KEY").generate([ChatRequest.user("r0", "q")], SAMPLING)
    monkeypatch.delenv("SAO_TEST_KEY")
    _engine(stub.url, api_key_env="SAO_TEST_KEY").generate([ChatRequest.user("r1", "q")], SAMPLING)
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
