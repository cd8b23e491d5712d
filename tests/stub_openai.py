"""A scripted OpenAI-compatible chat server on 127.0.0.1, for the openai engine's tests.

    stub = StubServer()                 # answers like `vllm serve`: the last message echoed back
    stub.faults = ["429", "drop"]       # the next chat calls fail so, one fault per call
    stub.hold_calls(); ...; stub.release()
    stub.stop()

It stands in for one `vllm serve` replica: tests/core/test_openai_engine.py drives the engine's
retries, timeouts and limits with it, tests/flows/test_replicas.py runs a round over two of them.
No outcome depends on timing: a stalled call waits until the server stops, and after `hold_calls()`
every chat call (or every one the test picks) waits until the test lets it go, so a test knows at each
step which calls are in flight (`wait_until` blocks until the counters read as expected).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

T = TypeVar("T")

# Only a guard against a hang when the engine misbehaves; no outcome depends on it.
HANG_GUARD_S = 60.0

# A chat call's JSON body -> the text of its answer.
AnswerFn = Callable[[dict[str, Any]], str]
# ("start" | "end", a chat call's JSON body): a call came in, or stopped counting as in flight.
WatchFn = Callable[[str, dict[str, Any]], None]


def echo(body: dict[str, Any]) -> str:
    """The stub's answer by default: the last message and the call's seed."""
    return f"echo:{body['messages'][-1]['content']}:seed={body['seed']}"


class StubServer:
    """An OpenAI-compatible chat server that echoes the last message and fails as scripted.

    `answer` writes the text of an answer instead of the echo; `watch` is told, under the server's
    lock, when a chat call comes in and when it stops counting as in flight (before its answer leaves),
    so a test can follow calls across several servers.
    """

    def __init__(
        self, model: str = "stub-model", answer: AnswerFn | None = None, watch: WatchFn | None = None
    ) -> None:
        self.model = model
        self.answer = answer or echo
        self.watch = watch
        self.faults: list[str] = []  # consumed one per chat call: 429, 500, drop, stall, abort, 401, 400
        self.calls: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.models_calls = 0  # GET /models: the engine asks once when it is built
        self.in_flight = 0  # chat calls received and not answered yet
        self.max_in_flight = 0
        self.answered = 0
        self.stalled = 0  # stalled calls still waiting
        self.holding = False
        self.hold_which: Callable[[dict[str, Any]], bool] | None = None  # None: every call is held
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
                with stub.changed:
                    stub.models_calls += 1
                self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.changed:
                    stub.calls.append(body)
                    stub.headers.append(dict(self.headers))
                    fault = stub.faults.pop(0) if stub.faults else ""
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    if stub.watch is not None:
                        stub.watch("start", body)
                    stub.changed.notify_all()
                    if stub._held(body):
                        stub.changed.wait_for(
                            lambda: not stub._held(body) or stub.releases > 0 or stub.closing
                        )
                        if stub._held(body) and not stub.closing:
                            stub.releases -= 1
                reply = self._reply(body, fault)
                # A call stops counting before its answer leaves: the engine cannot start another call
                # on the freed slot until it has the answer, so `in_flight` never counts one too many.
                with stub.changed:
                    stub.in_flight -= 1
                    stub.answered += reply is not None
                    if stub.watch is not None:
                        stub.watch("end", body)
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
                text = stub.answer(body)
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

    def _held(self, body: dict[str, Any]) -> bool:
        return self.holding and (self.hold_which is None or self.hold_which(body))

    def hold_calls(self, which: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """From now on every chat call (or every one `which` picks, given its body) waits for a
        `release()` before it is answered. Called again, the calls waiting are picked anew: those the
        new `which` leaves out go at once."""
        with self.changed:
            self.holding = True
            self.hold_which = which
            self.changed.notify_all()

    def release(self, calls: int = 1) -> None:
        with self.changed:
            self.releases += calls
            self.changed.notify_all()

    def let_go(self) -> None:
        """Stop holding calls: the held ones are answered, the next ones are not held."""
        with self.changed:
            self.holding = False
            self.hold_which = None
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


def in_background(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run fn on a thread of its own, so that a test can drive the stubs while the caller waits on them."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def serve_runtime_lora(stub: StubServer, allowed: bool = True) -> StubServer:
    """Make the stub load and unload adapters as `vllm serve --enable-lora` does with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or answer 404 there, as it does without), and list them."""
    handler = stub.httpd.RequestHandlerClass
    stub.lora_log = []  # type: ignore[attr-defined]  # (verb, body, chat calls received before it)
    stub.lora_at = []  # type: ignore[attr-defined]  # chat calls received before each of lora_log
    loaded: dict[str, str] = {}

    class Lora(handler):  # type: ignore[misc,valid-type]
        def do_GET(self) -> None:
            cards = [{"id": stub.model, "object": "model", "parent": None}]
            cards += [
                {"id": name, "object": "model", "root": path, "parent": stub.model}
                for name, path in loaded.items()
            ]
            self._send(200, {"object": "list", "data": cards})

        def do_POST(self) -> None:
            if not self.path.endswith(("/load_lora_adapter", "/unload_lora_adapter")):
                return super().do_POST()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not allowed:
                return self._send(404, {"detail": "Not Found"})
            verb = self.path.rsplit("/", 1)[-1].split("_")[0]
            stub.lora_log.append((verb, body))  # type: ignore[attr-defined]
            stub.lora_at.append(len(stub.calls))  # type: ignore[attr-defined]
            if verb == "load":
                loaded[body["lora_name"]] = body["lora_path"]
            else:
                loaded.pop(body["lora_name"], None)
            return self._send(200, {})

    stub.httpd.RequestHandlerClass = Lora
    return stub
