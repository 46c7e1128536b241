"""Local network peers for the delivery tests: an HTTP server and an aiosmtpd server.

Both listen on 127.0.0.1 on a port the OS picks, record what arrives, and answer from a
script, so a test can assert exactly what a Slack, webhook or SMTP receiver was sent.
Test modules wrap them in small fixtures::

    @pytest.fixture
    def hook() -> Iterator[HttpPeer]:
        with HttpPeer() as peer:
            yield peer
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = [
    "HttpPeer",
    "Reply",
    "Request",
    "SmtpPeer",
    "smtp_server",
    "start_smtp",
]


@dataclass
class Reply:
    """One scripted HTTP response.

    ``hang`` is how many seconds the handler waits, after recording the request, before it
    closes the connection without a response; :meth:`HttpPeer.stop` ends the wait early.
    """

    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0


@dataclass
class Request:
    """One request as the peer received it; ``body`` is the parsed JSON, or None."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    arrived: float
    """``time.monotonic()`` when the request was read."""


Responder = Callable[[Request, int], Reply]
"""Computes the reply to a request from the request and its 1-based number."""


class HttpPeer:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script.

    Replies set with :meth:`script` are used in order. When they run out, ``then`` answers
    every later request (by default the last scripted reply repeats). A ``responder`` given
    to the constructor computes every reply instead, for peers whose answer depends on the
    request (a Slack Web API stand-in returning a new ``ts`` each time).
    """

    def __init__(self, responder: Responder | None = None) -> None:
        self.requests: list[Request] = []
        self._replies: list[Reply] = [Reply()]
        self._then: Reply | None = None
        self._used = 0
        self._responder = responder
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, path: str = "/") -> str:
        """Return the URL of ``path`` on this peer."""
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, *replies: Reply, then: Reply | None = None) -> None:
        """Answer the next requests with ``replies``, then with ``then`` (or the last reply)."""
        with self._lock:
            self._replies = list(replies) or [Reply()]
            self._then = then
            self._used = 0

    @property
    def bodies(self) -> list[Any]:
        """The parsed JSON bodies of the requests so far, in order."""
        return [request.body for request in self.requests]

    def stop(self) -> None:
        """Release hanging handlers, stop serving and close the socket."""
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _next_reply(self, request: Request, number: int) -> Reply:
        if self._responder is not None:
            return self._responder(request, number)
        with self._lock:
            if self._used < len(self._replies):
                reply = self._replies[self._used]
                self._used += 1
                return reply
            return self._then or self._replies[-1]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                request = Request(
                    "POST", self.path, dict(self.headers.items()), raw, body, time.monotonic()
                )
                with peer._lock:
                    peer.requests.append(request)
                    number = len(peer.requests)
                reply = peer._next_reply(request, number)
                if reply.hang:
                    peer._release.wait(reply.hang)
                    return
                data = reply.body.encode("utf-8")
                self.send_response(reply.status)
                kind = "application/json" if reply.body.startswith("{") else "text/plain"
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


@dataclass
class SmtpPeer:
    """aiosmtpd handler that records each accepted envelope, or answers from its settings.

    ``rcpt_reply`` answers every RCPT TO (``rcpt_replies`` per address wins over it),
    ``data_reply`` answers DATA, ``drop_after_data`` closes the connection after DATA, and
    ``hang_after_data`` waits 30 seconds before answering DATA.
    """

    rcpt_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_after_data: bool = False
    hang_after_data: bool = False
    received: list[Envelope] = field(default_factory=list)
    data_commands: int = 0

    @property
    def raw(self) -> list[bytes]:
        """The bytes of each accepted message, in order."""
        return [envelope.original_content or b"" for envelope in self.received]

    @property
    def messages(self) -> list[EmailMessage]:
        """Each accepted message, parsed."""
        parsed = []
        for data in self.raw:
            message = email.message_from_bytes(data, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            parsed.append(message)
        return parsed

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address, self.rcpt_reply)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.drop_after_data:
            assert server.transport is not None
            server.transport.close()
            return "250 OK"
        if self.hang_after_data:
            await asyncio.sleep(30)
        if self.data_reply:
            return self.data_reply
        self.received.append(envelope)
        return "250 OK queued"


class _LocalController(Controller):
    """A Controller on a port the OS picks (``port=0``).

    aiosmtpd 1.4.6 connects once to ``self.port`` after binding, to create the SMTP object,
    so the chosen port has to be read back before that connection.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.base_events.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def start_smtp(handler: Any, **kwargs: Any) -> Controller:
    """Start an aiosmtpd server for ``handler`` on 127.0.0.1; the caller stops it.

    ``kwargs`` go to :class:`aiosmtpd.controller.Controller` (``tls_context``,
    ``authenticator``, ``server_hostname`` ...). The port is in ``controller.port``.
    """
    controller = _LocalController(handler, hostname="127.0.0.1", port=0, **kwargs)
    controller.start()
    return controller


@contextmanager
def smtp_server(handler: SmtpPeer | None = None, **kwargs: Any) -> Iterator[tuple[SmtpPeer, int]]:
    """Run an :class:`SmtpPeer` (a new one by default) and yield it with its port."""
    peer = handler or SmtpPeer()
    controller = start_smtp(peer, **kwargs)
    try:
        yield peer, int(controller.port)
    finally:
        controller.stop()
