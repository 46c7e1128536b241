"""A local CloudTrail LookupEvents endpoint on 127.0.0.1 (moto does not implement the call).

It speaks the AWS JSON 1.1 protocol: a POST with ``X-Amz-Target:
com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101.LookupEvents`` and a JSON body, and
returns ``{"Events": [...], "NextToken": ...}`` with times as epoch seconds. It filters by the
one ``EventSource`` attribute and the time range, returns events newest first, pages them, and
responds with ``ThrottlingException`` (or any chosen error) for the requests a test picks.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LookupRequest", "LookupServer", "lookup_event", "lookup_server"]

TARGET = "com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101.LookupEvents"
_REGION = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/cloudtrail/")


@dataclass(frozen=True)
class LookupRequest:
    """One LookupEvents call as the server received it."""

    region: str
    event_source: str | None
    attributes: int
    start: float | None
    end: float | None
    token: str | None


def lookup_event(record: dict[str, Any], event_time: datetime) -> dict[str, Any]:
    """Return a LookupEvents ``Events[]`` item that carries ``record`` as its CloudTrailEvent."""
    return {
        "EventId": record.get("eventID", ""),
        "EventName": record.get("eventName", ""),
        "ReadOnly": "true",
        "EventTime": event_time.timestamp(),
        "EventSource": record.get("eventSource", ""),
        "Username": record.get("userIdentity", {}).get("userName", ""),
        "Resources": [],
        "CloudTrailEvent": json.dumps(record),
    }


# Returns the AWS error code to respond with, from the request's number (1 for the first) and
# the request, or None to respond normally.
ErrorRule = Callable[[int, LookupRequest], str | None]


@dataclass
class LookupServer:
    """The events per region, the page size, the error rule, and the requests received."""

    events: dict[str, list[dict[str, Any]]]
    page_size: int = 50
    error: ErrorRule | None = None
    requests: list[LookupRequest] = field(default_factory=list)
    url: str = ""
    _pages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, request: LookupRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
            code = self.error(len(self.requests), request) if self.error else None
        if code is not None:
            status = 400 if code in ("ThrottlingException", "AccessDeniedException") else 500
            return status, {"__type": code, "message": f"{code} returned by the test server"}
        if request.attributes > 1:
            return 400, {
                "__type": "InvalidLookupAttributesException",
                "message": "only one lookup attribute is allowed",
            }
        if request.token is not None:
            with self._lock:
                remaining = self._pages.pop(request.token, None)
            if remaining is None:
                return 400, {"__type": "InvalidNextTokenException", "message": "unknown token"}
        else:
            remaining = self._matching(request)
        limit = min(int(body.get("MaxResults") or 50), self.page_size)
        page, rest = remaining[:limit], remaining[limit:]
        reply: dict[str, Any] = {"Events": page}
        if rest:
            token = f"token-{len(self.requests)}"
            with self._lock:
                self._pages[token] = rest
            reply["NextToken"] = token
        return 200, reply

    def _matching(self, request: LookupRequest) -> list[dict[str, Any]]:
        found = [
            event
            for event in self.events.get(request.region, [])
            if (request.event_source is None or event["EventSource"] == request.event_source)
            and (request.start is None or event["EventTime"] >= request.start)
            and (request.end is None or event["EventTime"] <= request.end)
        ]
        return sorted(found, key=lambda event: event["EventTime"], reverse=True)


def _handler(server: LookupServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.headers.get("X-Amz-Target") != TARGET:
                self._reply(400, {"__type": "UnknownOperationException", "message": "unknown"})
                return
            match = _REGION.search(self.headers.get("Authorization", ""))
            attributes = body.get("LookupAttributes") or []
            event_source = None
            if attributes and attributes[0].get("AttributeKey") == "EventSource":
                event_source = attributes[0].get("AttributeValue")
            request = LookupRequest(
                region=match.group(1) if match else "",
                event_source=event_source,
                attributes=len(attributes),
                start=body.get("StartTime"),
                end=body.get("EndTime"),
                token=body.get("NextToken"),
            )
            status, reply = server.answer(request, body)
            self._reply(status, reply)

        def _reply(self, status: int, reply: dict[str, Any]) -> None:
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@contextmanager
def lookup_server(server: LookupServer) -> Iterator[LookupServer]:
    """Serve ``server`` on 127.0.0.1 for the duration of the block; its ``url`` is set."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    http.daemon_threads = True
    host, port = http.server_address[:2]
    server.url = f"http://{host!s}:{port}"
    thread = threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        thread.join(timeout=10)
