"""The harness's API calls ride out what a busy Prefect server answers now and then: a server on SQLite
answers 503 while another writer holds its database (a CI run failed on one such answer)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.cluster import harness


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next status of the server's script, then 200 with the body seen."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(json.loads(body or b"null"))  # type: ignore[attr-defined]
        script: list[int] = self.server.script  # type: ignore[attr-defined]
        status = script.pop(0) if script else 200
        payload = json.dumps({"id": "run-1", "body": self.server.seen[-1]}).encode()  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen = [], []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(harness.time, "sleep", waits.append)
    return waits


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/api/deployments/d/create_flow_run"


def test_a_locked_database_answer_is_retried_with_the_same_body(
    scripted: ThreadingHTTPServer, no_wait: list[float]
) -> None:
    scripted.script = [503, 503, 429]  # type: ignore[attr-defined]
    body = {"parameters": {"config": "configs/tiny.yaml"}}
    assert harness.api_call("POST", _url(scripted), body)["id"] == "run-1"
    assert scripted.seen == [body] * 4  # type: ignore[attr-defined]
    assert no_wait == [0.5, 1.0, 2.0]


def test_a_server_that_stays_busy_fails_after_the_last_wait(
    scripted: ThreadingHTTPServer, no_wait: list[float]
) -> None:
    scripted.script = [503] * 10  # type: ignore[attr-defined]
    with pytest.raises(httpx.HTTPStatusError, match="503"):
        harness.api_call("POST", _url(scripted), {})
    assert no_wait == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert len(scripted.seen) == 6  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
def test_any_other_error_status_fails_at_once(
    scripted: ThreadingHTTPServer, no_wait: list[float], status: int
) -> None:
    scripted.script = [status]  # type: ignore[attr-defined]
    with pytest.raises(httpx.HTTPStatusError, match=str(status)):
        harness.api_call("POST", _url(scripted), {})
    assert no_wait == [] and len(scripted.seen) == 1  # type: ignore[attr-defined]
