"""A reverse proxy on 127.0.0.1 that stands in front of an S3 endpoint (moto) and fails on purpose.

    proxy = FaultProxy("http://127.0.0.1:5000", seed=0).start()   # AWS_ENDPOINT_URL=proxy.url
    proxy.error_rate = 0.2     # a fifth of the requests answered 500 InternalError or 503 SlowDown
    proxy.drop_rate = 0.05     # forwarded, done by the store, then the connection closed with no reply
    proxy.down()               # connections refused, open ones cut: the endpoint is stopped
    proxy.up()                 # listening again on the same port
    proxy.outage(3.0)          # down now, up again after 3 s (a timer thread)
    proxy.drop_next = 1        # the next request is forwarded and its reply dropped, whatever the rates
    proxy.counts               # requests, forwarded, errors, drops, bad_gateway

Each request's fate is drawn from one seeded random.Random, so a run's share of faults is the same
from run to run (which request gets it depends on thread timing). A request the store cannot take
(moto stopped behind the proxy) is answered 502 Bad Gateway, as a load balancer would.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import socketserver
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}

ERRORS = (
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
)


def s3_error_body(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's connection pool expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the body back
        # until the client's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures only
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        fate = proxy._draw()
        if fate == "error":
            status, code, message = proxy._pick_error()
            self._answer(status, s3_error_body(code, message), {"Content-Type": "application/xml"})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                status, reason = resp.status, resp.reason
            finally:
                conn.close()
        except OSError:
            proxy._count("bad_gateway")
            self._answer(502, s3_error_body("BadGateway", "The endpoint behind the proxy is down."), {})
            return
        proxy._count("forwarded")
        if fate == "drop":  # the store did the work; its answer never arrives
            proxy._count("drops")
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response_only(status, reason)
        has_length = False
        for k, v in out_headers:
            if k.lower() == "content-length":
                has_length = True
                if self.command != "HEAD":
                    v = str(len(payload))
            self.send_header(k, v)
        if not has_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response_only(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


class FaultProxy:
    """S3 through a proxy that fails a share of requests, drops replies and goes down on command."""

    def __init__(self, upstream: str, seed: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.host = host
        self.port = port
        self.error_rate = 0.0
        self.drop_rate = 0.0
        self.drop_next = 0
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._timers: list[threading.Timer] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> FaultProxy:
        self.up()
        return self

    def up(self) -> None:
        """Listen (again, on the same port)."""
        with self._lock:
            if self._server is not None:
                return
            server = _Server((self.host, self.port), self)
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, name="faultproxy", daemon=True)
            self._thread.start()

    def down(self) -> None:
        """Stop listening and cut every open connection: new ones are refused, as by a stopped endpoint."""
        with self._lock:
            server, self._server = self._server, None
            open_now, self._open = list(self._open), set()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.counts["downs"] += 1

    def outage(self, seconds: float) -> None:
        """Down now, up again after `seconds`, from a timer thread."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self.down()

    def calm(self) -> None:
        """No more faults from now on."""
        self.error_rate = 0.0
        self.drop_rate = 0.0
        self.drop_next = 0

    # --- used by the handler threads -------------------------------------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._open.add(conn)
            else:
                self._open.discard(conn)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _draw(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if self.drop_next > 0:
                self.drop_next -= 1
                return "drop"
            x = self._rng.random()
            if x < self.error_rate:
                self.counts["errors"] += 1
                return "error"
            if x < self.error_rate + self.drop_rate:
                return "drop"
            return "pass"

    def _pick_error(self) -> tuple[int, str, str]:
        with self._lock:
            return ERRORS[self._rng.randrange(len(ERRORS))]
