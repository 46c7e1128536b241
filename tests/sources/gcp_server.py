"""A local HTTP server that implements the Cloud Logging ``entries.list`` REST call.

Google ships no Cloud Logging emulator, so tests point google-cloud-logging at this server. It
implements ``POST /v2/entries:list`` with the parts of the request keytrail sends:
``resourceNames`` (one project), the ``logName``, ``protoPayload.serviceName`` and ``timestamp``
terms of the filter, ascending order, ``pageSize`` and ``pageToken``. Every request body is
recorded, and error responses can be queued for the next requests.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import pandas as pd

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass
class LoggingServerState:
    """Entries by project id, recorded request bodies and queued error responses."""

    entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: deque[int] = field(default_factory=deque)
    errors_at: dict[int, int] = field(default_factory=dict)
    empty_first_page: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class LoggingServer:
    """Serve ``entries:list`` on 127.0.0.1 at a free port; use it as a context manager."""

    def __init__(self) -> None:
        self.state = LoggingServerState()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self.state))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL to pass as the client's ``api_endpoint``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of the ``entries:list`` requests received, in order."""
        return self.state.requests

    def add(self, project: str, *entries: dict[str, Any]) -> None:
        """Store entries that ``projects/<project>`` returns."""
        self.state.entries.setdefault(project, []).extend(entries)

    def fail_next(self, *statuses: int) -> None:
        """Respond to the next requests with these HTTP error statuses, one each."""
        self.state.errors.extend(statuses)

    def fail_request(self, number: int, status: int) -> None:
        """Respond to the ``number``-th request counted from the server's start (1-based) with
        the HTTP error ``status``."""
        self.state.errors_at[number] = status

    def __enter__(self) -> LoggingServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_class(state: LoggingServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/v2/entries:list":
                self._send(404, _error(404, f"no such method: {self.path}"))
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with state.lock:
                state.requests.append(body)
                status = state.errors_at.pop(len(state.requests), None)
                if status is None and state.errors:
                    status = state.errors.popleft()
            if status is not None:
                self._send(status, _error(status, "injected by the test"))
                return
            self._send(200, _list_entries(state, body))

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output clean."""

    return Handler


def _error(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }


def _list_entries(state: LoggingServerState, body: dict[str, Any]) -> dict[str, Any]:
    """Select, sort and page entries the way the Logging API does for keytrail's filters."""
    (resource,) = body["resourceNames"]
    selected = _select(state.entries.get(resource.removeprefix("projects/"), []), body)
    descending = body.get("orderBy", "timestamp asc").endswith("desc")
    selected.sort(key=lambda entry: pd.Timestamp(entry["timestamp"]), reverse=descending)

    token = body.get("pageToken")
    if state.empty_first_page and token is None and selected:
        # The real API may return a page without entries that still has a next page token.
        return {"nextPageToken": "offset-0"}
    offset = int(token.removeprefix("offset-")) if token else 0
    size = int(body.get("pageSize") or 50)
    page: dict[str, Any] = {}
    if selected[offset : offset + size]:
        page["entries"] = selected[offset : offset + size]
    if offset + size < len(selected):
        page["nextPageToken"] = f"offset-{offset + size}"
    return page


def _select(entries: list[dict[str, Any]], body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the entries that the filter's logName, serviceName and timestamp terms match."""
    text = body.get("filter", "")
    log_names = set(re.findall(r'logName="([^"]+)"', text))
    services = set(re.findall(r'protoPayload\.serviceName="([^"]+)"', text))
    start = re.search(r'timestamp>="([^"]+)"', text)
    end = re.search(r'timestamp<"([^"]+)"', text)
    selected = []
    for entry in entries:
        stamp = pd.Timestamp(entry["timestamp"])
        if log_names and entry.get("logName") not in log_names:
            continue
        if services and entry.get("protoPayload", {}).get("serviceName") not in services:
            continue
        if start and stamp < pd.Timestamp(start.group(1)):
            continue
        if end and stamp >= pd.Timestamp(end.group(1)):
            continue
        selected.append(entry)
    return selected
