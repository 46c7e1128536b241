"""Tests of the azure_log_analytics source against a local HTTPS query endpoint."""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import trustme
from azure.core.credentials import AccessToken
from pydantic import ValidationError

from pipeline.sources import SourceError
from pipeline.sources.azure_log_analytics import (
    AzureLogAnalyticsSettings,
    AzureLogAnalyticsSource,
    build_query,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
WORKSPACE = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
RESOURCE_ID = (
    "/SUBSCRIPTIONS/0000AAAA-1111-2222-3333-444455556666/RESOURCEGROUPS/RG-SECRETS/"
    "PROVIDERS/MICROSOFT.KEYVAULT/VAULTS/KV-PAYMENTS"
)


class StaticToken:
    """A TokenCredential that returns a fixed bearer token (the local server checks it)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("local-test-token", int(time.time()) + 3600)


class QueryServer:
    """Serve ``POST /v1/workspaces/<id>/query`` over TLS on 127.0.0.1 at a free port.

    Rows are kept per table. The server applies the query's ``TimeGenerated`` bounds and its
    ``top N`` limit, records every request, and returns the error statuses queued in
    ``errors`` and the ``partial_error`` a test sets.
    """

    def __init__(self, certificate: trustme.LeafCert) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.errors: list[int] = []
        self.partial_error: str | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(context)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"https://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                match = re.fullmatch(r"/v1/workspaces/([^/]+)/query", self.path.split("?")[0])
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if match is None or match.group(1) != WORKSPACE:
                    self._send(404, {"error": {"code": "WorkspaceNotFound", "message": "no"}})
                elif self.headers.get("Authorization") != "Bearer local-test-token":
                    self._send(401, {"error": {"code": "AuthorizationRequired", "message": "no"}})
                elif server.errors:
                    status = server.errors.pop(0)
                    error = {"code": f"Injected{status}", "message": "injected by the test"}
                    self._send(status, {"error": error})
                else:
                    self._send(200, server.answer(body["query"]))

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

    def answer(self, query: str) -> dict[str, Any]:
        """Return the rows of the query's table within its bounds, sorted, at most top N."""
        rows = self._select(query)
        columns = sorted({name for row in rows for name in row})
        types = {"TimeGenerated": "datetime", "HttpStatusCode": "int", "Identity": "dynamic"}
        table = {
            "name": "PrimaryResult",
            "columns": [{"name": name, "type": types.get(name, "string")} for name in columns],
            "rows": [[row.get(name) for name in columns] for row in rows],
        }
        payload: dict[str, Any] = {"tables": [table]}
        if self.partial_error is not None:
            payload["error"] = {"code": "PartialError", "message": self.partial_error}
        return payload

    def _select(self, query: str) -> list[dict[str, Any]]:
        table = query.splitlines()[0].strip()
        start = re.search(r"TimeGenerated >= datetime\(([^)]+)\)", query)
        end = re.search(r"TimeGenerated < datetime\(([^)]+)\)", query)
        top = re.search(r"\| top (\d+) by TimeGenerated asc", query)
        assert start is not None, query
        assert end is not None, query
        assert top is not None, query
        lower, upper = pd.Timestamp(start.group(1)), pd.Timestamp(end.group(1))
        rows = [
            row
            for row in self.rows.get(table, [])
            if lower <= pd.Timestamp(row["TimeGenerated"]) < upper
        ]
        rows.sort(key=lambda row: pd.Timestamp(row["TimeGenerated"]))
        return rows[: int(top.group(1))]


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(
    certificate_authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[QueryServer]:
    bundle = tmp_path / "local-ca.pem"
    certificate_authority.cert_pem.write_to_path(str(bundle))
    # requests, under azure-core, trusts this bundle for the local server's certificate.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    running = QueryServer(certificate_authority.issue_cert("127.0.0.1"))
    running.start()
    yield running
    running.stop()


def audit_row(number: int, time: str) -> dict[str, Any]:
    """Return an AZKVAuditLogs SecretGet row as the query API returns it."""
    return {
        "TimeGenerated": time,
        "OperationName": "SecretGet",
        "OperationVersion": "7.4",
        "ResultType": "Success",
        "ResultSignature": "OK",
        "DurationMs": 11,
        "CallerIpAddress": "198.51.100.30",
        "CorrelationId": f"5d6e0000-0000-4000-8000-{number:012d}",
        "Identity": json.dumps({"claim": {"appid": "22222222-3333-4444-5555-666666666666"}}),
        "HttpStatusCode": 200,
        "Id": f"https://kv-payments.vault.azure.net/secrets/api-{number}/00ff",
        "_ResourceId": RESOURCE_ID.lower(),
        "Type": "AZKVAuditLogs",
    }


def diagnostics_row(number: int, time: str) -> dict[str, Any]:
    """Return an AzureDiagnostics Key Vault row as the query API returns it."""
    return {
        "TimeGenerated": time,
        "OperationName": "SecretGet",
        "ResultType": "Success",
        "ResultSignature": "OK",
        "CorrelationId": f"6e7f0000-0000-4000-8000-{number:012d}",
        "CallerIPAddress": "198.51.100.31",
        "identity_claim_upn_s": "dana@example.com",
        "id_s": f"https://kv-payments.vault.azure.net/secrets/db-{number}/11ee",
        "httpStatusCode_d": 200,
        "ResourceProvider": "MICROSOFT.KEYVAULT",
        "Category": "AuditEvent",
        "ResourceId": RESOURCE_ID,
        "Type": "AzureDiagnostics",
    }


def make_source(server: QueryServer, **settings: Any) -> AzureLogAnalyticsSource:
    config = AzureLogAnalyticsSettings(
        name="law", workspace_id=WORKSPACE, endpoint=server.url, retries=0, **settings
    )
    return AzureLogAnalyticsSource(config, credential=StaticToken(), clock=lambda: NOW)


def test_rows_read_with_raw_times(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [
        audit_row(1, "2026-12-04T10:00:00.1234567Z"),
        audit_row(2, "2026-12-04T11:00:00.7654321Z"),
    ]

    batch = make_source(server).read({})

    assert batch.result.records == 2
    assert len(batch.result.events) == 2
    assert batch.result.quarantined == []
    assert batch.checkpoints == {
        f"{WORKSPACE}/AZKVAuditLogs": {"timestamp": "2026-12-04T11:00:00.765432100Z"}
    }
    assert batch.problems == []


def test_request_query_and_headers(server: QueryServer) -> None:
    make_source(server, max_rows=500, server_timeout_seconds=90).read({})

    (request,) = server.requests
    assert request["query"] == (
        "AZKVAuditLogs\n"
        "| where TimeGenerated >= datetime(2026-12-03T12:00:00Z) "
        "and TimeGenerated < datetime(2026-12-04T12:00:00Z)\n"
        "| top 500 by TimeGenerated asc"
    )
    assert request["timespan"] == "2026-12-03T12:00:00Z/2026-12-04T12:00:00Z"
    assert server.headers[0]["Prefer"] == "wait=90"


def test_diagnostics_query_filters_key_vault() -> None:
    query = build_query(
        "AzureDiagnostics",
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 2, tzinfo=UTC),
        10,
    )

    assert query.splitlines()[1] == (
        '| where ResourceProvider == "MICROSOFT.KEYVAULT" and Category == "AuditEvent"'
    )


def test_both_tables_read(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [audit_row(1, "2026-12-04T10:00:00Z")]
    server.rows["AzureDiagnostics"] = [
        diagnostics_row(1, "2026-12-04T10:30:00Z"),
        diagnostics_row(2, "2026-12-04T10:31:00Z"),
    ]

    batch = make_source(server, tables=["AZKVAuditLogs", "AzureDiagnostics"]).read({})

    assert batch.result.records == 3
    assert len(batch.result.events) == 3
    assert sorted(batch.checkpoints) == [
        f"{WORKSPACE}/AZKVAuditLogs",
        f"{WORKSPACE}/AzureDiagnostics",
    ]


def test_next_run_starts_at_checkpoint_minus_lookback(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [audit_row(1, "2026-12-04T10:00:00Z")]
    source = make_source(server, lookback_minutes=30)
    first = source.read({})

    source.read(first.checkpoints)

    assert "TimeGenerated >= datetime(2026-12-04T09:30:00Z)" in server.requests[1]["query"]


def test_row_cap_notes_and_advances(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [
        audit_row(number, f"2026-12-04T10:0{number}:00Z") for number in range(5)
    ]

    batch = make_source(server, max_rows=3).read({})

    assert batch.result.records == 3
    assert batch.checkpoints == {
        f"{WORKSPACE}/AZKVAuditLogs": {"timestamp": "2026-12-04T10:02:00Z"}
    }
    assert batch.notes == [
        "table AZKVAuditLogs: stopped at max_rows (3) rows, at 2026-12-04T10:02:00Z; the next "
        "run continues from there"
    ]


def test_partial_result_keeps_checkpoint(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [audit_row(1, "2026-12-04T10:00:00Z")]
    server.partial_error = "query exceeded the memory limit"

    batch = make_source(server).read({})

    assert batch.result.records == 1
    assert batch.checkpoints == {}
    assert batch.problems == [
        "table AZKVAuditLogs: the query returned partial results: query exceeded the memory "
        "limit; the next run queries the same window again"
    ]


def test_throttled_query_raises(server: QueryServer) -> None:
    server.errors.append(429)

    with pytest.raises(SourceError) as caught:
        make_source(server).read({})

    assert caught.value.reason == (
        f"table AZKVAuditLogs: query of workspace {WORKSPACE} failed: HTTP 429: "
        "Injected429: injected by the test"
    )
    assert caught.value.hint == (
        "the workspace throttled the query; the next run queries the same window again"
    )


def test_forbidden_query_names_role(server: QueryServer) -> None:
    server.errors.append(403)

    with pytest.raises(SourceError) as caught:
        make_source(server).read({})

    assert "HTTP 403" in caught.value.reason
    assert "Log Analytics Reader" in caught.value.hint


def test_one_failed_table_is_a_problem(server: QueryServer) -> None:
    server.rows["AzureDiagnostics"] = [diagnostics_row(1, "2026-12-04T10:30:00Z")]
    server.errors.append(500)

    batch = make_source(server, tables=["AZKVAuditLogs", "AzureDiagnostics"]).read({})

    assert len(batch.problems) == 1
    assert batch.problems[0].startswith(
        f"table AZKVAuditLogs: query of workspace {WORKSPACE} failed: HTTP 500: "
    )
    assert list(batch.checkpoints) == [f"{WORKSPACE}/AzureDiagnostics"]
    assert batch.result.records == 1


def test_backfill_stores_no_checkpoints(server: QueryServer) -> None:
    server.rows["AZKVAuditLogs"] = [
        audit_row(1, "2026-12-01T10:00:00Z"),
        audit_row(2, "2026-12-02T10:00:00Z"),
    ]

    batch = make_source(server).read(
        {}, since=datetime(2026, 12, 1, tzinfo=UTC), until=datetime(2026, 12, 2, tzinfo=UTC)
    )

    assert batch.result.records == 1
    assert batch.checkpoints == {}


def test_settings_reject_bad_workspace_id() -> None:
    with pytest.raises(ValidationError):
        AzureLogAnalyticsSettings(name="law", workspace_id="my-workspace")


def test_settings_reject_plain_http_endpoint() -> None:
    with pytest.raises(ValidationError):
        AzureLogAnalyticsSettings(
            name="law", workspace_id=WORKSPACE, endpoint="http://127.0.0.1:8080"
        )
