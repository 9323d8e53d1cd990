"""An HTTPS gateway on 127.0.0.1 in front of one HTTP server, the way an ingress or an access
proxy (Cloudflare Access, IAP) stands in front of a self-hosted Prefect.

It terminates TLS with a certificate from the test's own CA, refuses requests that lack its
access headers (answering with the credentials it got, as a careless debug page would), and can
rate-limit like Prefect Cloud: a fixed window of N requests, then 429 with Retry-After until the
window ends. Every request it answers is recorded.
"""

from __future__ import annotations

import http.client
import math
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from prefect_gpu_operator.adapters.pki import CertificateAuthority

__all__ = ["Gateway", "Seen"]

# Hop-by-hop headers (RFC 9110 7.6.1) are the gateway's own business, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


# Left out of a refusal's echo, which shows the request's credentials.
_ORDINARY = frozenset(
    {"accept", "accept-encoding", "connection", "content-length", "content-type", "host"}
    | {"user-agent"}
)


@dataclass(frozen=True)
class Seen:
    """A request the gateway answered: when it arrived, what it was, what it got."""

    at: float  # time.monotonic()
    method: str
    path: str
    status: int
    retry_after: int | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections end on the handler's timeout

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client refusing the certificate is a case under test, not noise


class Gateway:
    """HTTPS on 127.0.0.1 (``url``) forwarding to ``upstream`` (http://127.0.0.1:port)."""

    def __init__(
        self,
        upstream: str,
        ca: CertificateAuthority,
        directory: Path,
        *,
        required_headers: Mapping[str, str] | None = None,
    ) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.required_headers = dict(required_headers or {})
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._window: tuple[int, float] | None = None  # (requests, seconds)
        self._window_start = 0.0
        self._window_count = 0
        pair = ca.issue_server("gateway", ["127.0.0.1"])
        directory.mkdir(parents=True, exist_ok=True)
        pair.write(directory / "tls.crt", directory / "tls.key")
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(directory / "tls.crt", directory / "tls.key")
        self._server = _Server(("127.0.0.1", 0), self._handler())
        # The handshake runs in the handler's thread, not in the accepting one.
        self._server.socket = self._tls.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def rate_limit(self, requests: int | None, seconds: float = 1.0) -> None:
        """At most ``requests`` per fixed window of ``seconds``; None lifts the limit."""
        with self._lock:
            self._window = None if requests is None else (requests, seconds)
            self._window_start, self._window_count = time.monotonic(), 0

    def _throttle(self) -> int | None:
        """Retry-After seconds if this request is over the window's budget, else None."""
        with self._lock:
            if self._window is None:
                return None
            budget, seconds = self._window
            now = time.monotonic()
            if now - self._window_start >= seconds:
                self._window_start, self._window_count = now, 0
            self._window_count += 1
            if self._window_count <= budget:
                return None
            return max(1, math.ceil(self._window_start + seconds - now))

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                arrived = time.monotonic()
                missing = [
                    name
                    for name, value in gateway.required_headers.items()
                    if self.headers.get(name) != value
                ]
                if missing:
                    got = "; ".join(
                        f"{name}: {value}"
                        for name, value in self.headers.items()
                        if name.lower() not in _ORDINARY
                    )
                    text = f"access denied (check {', '.join(missing)}); request had {got}"
                    self._answer(403, text.encode(), {"Content-Type": "text/plain"})
                    gateway._record(Seen(arrived, self.command, self.path, 403))
                    return
                if (retry_after := gateway._throttle()) is not None:
                    headers = {"Retry-After": str(retry_after), "Content-Type": "text/plain"}
                    self._answer(429, b"rate limit exceeded", headers)
                    gateway._record(Seen(arrived, self.command, self.path, 429, retry_after))
                    return
                upstream = http.client.HTTPConnection(*gateway.upstream, timeout=30)
                try:
                    forwarded = {
                        name: value
                        for name, value in self.headers.items()
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "host"
                    }
                    upstream.request(self.command, self.path, body=body, headers=forwarded)
                    response = upstream.getresponse()
                    content = response.read()
                    headers = {
                        name: value
                        for name, value in response.getheaders()
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"
                    }
                finally:
                    upstream.close()
                self._answer(response.status, content, headers)
                gateway._record(Seen(arrived, self.command, self.path, response.status))

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        return Handler
