"""An HTTP proxy on 127.0.0.1 that forwards to a local server or responds with a chosen error.

Placed between boto3 and moto, it makes the server throttle or fail the requests a test
chooses (moto alone always succeeds), and it records every request it saw.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy", "fault_proxy", "s3_error"]

# Headers that describe one connection, not the message, and are not forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)


@dataclass(frozen=True)
class Fault:
    """The response sent instead of forwarding a request."""

    status: int
    body: bytes
    content_type: str = "application/xml"


def s3_error(status: int, code: str, message: str) -> Fault:
    """Return an S3 REST error response (an ``<Error>`` XML document)."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>0000000000000000</RequestId></Error>"
    )
    return Fault(status, body.encode())


# Returns the fault to respond with, from the method and the path with its query, or None.
FaultRule = Callable[[str, str], Fault | None]


class FaultProxy:
    """The running proxy: its URL, the requests it saw, and the rule it applies."""

    def __init__(self, upstream: str, rule: FaultRule | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rule: FaultRule | None = rule
        self.requests: list[tuple[str, str]] = []
        self.faults: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    fault = proxy.rule(self.command, self.path) if proxy.rule else None
                    if fault is not None:
                        proxy.faults.append((self.command, self.path))
                if fault is not None:
                    self._send(fault.status, [("Content-Type", fault.content_type)], fault.body)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=30
                )
                try:
                    headers = {
                        name: value
                        for name, value in self.headers.items()
                        if name.lower() not in _HOP_BY_HOP
                    }
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    response_headers = [
                        (name, value)
                        for name, value in response.getheaders()
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"
                    ]
                    self._send(response.status, response_headers, payload)
                finally:
                    connection.close()

            def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


@contextmanager
def fault_proxy(upstream: str, rule: FaultRule | None = None) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` in front of ``upstream`` for the duration of the block."""
    proxy = FaultProxy(upstream, rule)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
