"""Azure Key Vault audit rows read from a Log Analytics workspace (azure-monitor-query).

Teams whose vault diagnostic settings send AuditEvent logs to a workspace query one or both
tables: ``AZKVAuditLogs`` (resource-specific mode) and ``AzureDiagnostics`` (the older shared
table, filtered to Key Vault AuditEvent rows). Each run queries each table from its checkpoint
minus a look-back until the run's start, sorted by ``TimeGenerated``. The checkpoint of a table
is the newest ``TimeGenerated`` read. Rows that the workspace ingests late, up to the look-back,
are read on the next run, and the engine drops the events it has already stored by
``event_uid``.

Rows are passed to the formats package as JSON objects keyed by column name, with the values
as the query API returns them (times as RFC 3339 text with 100 ns ticks, dynamic columns such as
``Identity`` as JSON text).

azure-monitor-query and azure-identity are optional dependencies (``keytrail[azure]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, Literal

import orjson
import pandas as pd
from pydantic import Field, field_validator

from pipeline.formats.reader import BatchReader
from pipeline.sources._shared import checkpoint_time as _checkpoint_time
from pipeline.sources._shared import parse_rfc3339 as _parse_time
from pipeline.sources._shared import query_window
from pipeline.sources._shared import rfc3339 as _kql_time
from pipeline.sources._shared import utc_now as _utc_now
from pipeline.sources.base import SourceBatch, SourceError, SourceSettings

__all__ = ["AzureLogAnalyticsSettings", "AzureLogAnalyticsSource", "build_query"]

logger = logging.getLogger(__name__)

# Rows of the shared AzureDiagnostics table that are Key Vault audit events.
_DIAGNOSTICS_FILTER: Final = 'ResourceProvider == "MICROSOFT.KEYVAULT" and Category == "AuditEvent"'
_INSTALL_HINT: Final = "install the Azure extra: pip install 'keytrail[azure]'"
_READER_HINT: Final = (
    "grant the reading identity the Log Analytics Reader role on the workspace (or a custom "
    "role with Microsoft.OperationalInsights/workspaces/query/read)"
)
# The service returns at most 500,000 rows for one query.
MAX_ROWS_LIMIT: Final = 500_000

Table = Literal["AZKVAuditLogs", "AzureDiagnostics"]


def _default_tables() -> list[Table]:
    return ["AZKVAuditLogs"]


class AzureLogAnalyticsSettings(SourceSettings):
    """Key Vault audit tables of one Log Analytics workspace.

    Credentials come from azure-identity's DefaultAzureCredential chain (environment, workload
    identity, managed identity, Azure CLI).
    """

    type: Literal["azure_log_analytics"] = "azure_log_analytics"
    workspace_id: str = Field(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )
    tables: list[Table] = Field(default_factory=_default_tables, min_length=1)
    endpoint: str = Field(
        default="https://api.loganalytics.io", pattern=r"^https://[^\s/]+(/[^\s]*)?$"
    )
    lookback_minutes: int = Field(default=15, ge=0, le=24 * 60)
    initial_hours: int = Field(default=24, ge=1, le=31 * 24)
    max_rows: int = Field(default=100_000, ge=1, le=MAX_ROWS_LIMIT)
    server_timeout_seconds: int = Field(default=180, ge=1, le=600)
    retries: int = Field(default=3, ge=0, le=10)

    @field_validator("tables")
    @classmethod
    def _unique(cls, tables: list[str]) -> list[str]:
        if len(set(tables)) != len(tables):
            raise ValueError("each table may be listed once")
        return tables


@dataclass
class _TableRead:
    """The rows, newest time and error of one table in one run."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    newest: pd.Timestamp | None = None
    partial_error: str | None = None


def build_query(table: Table, start: datetime, end: datetime, max_rows: int) -> str:
    """Return the KQL query for one table's Key Vault audit rows in [start, end)."""
    lines: list[str] = [table]
    if table == "AzureDiagnostics":
        lines.append(f"| where {_DIAGNOSTICS_FILTER}")
    lines.append(
        f"| where TimeGenerated >= datetime({_kql_time(start)}) "
        f"and TimeGenerated < datetime({_kql_time(end)})"
    )
    lines.append(f"| top {max_rows} by TimeGenerated asc")
    return "\n".join(lines)


class AzureLogAnalyticsSource:
    """Read Key Vault audit rows of a Log Analytics workspace.

    Args:
        settings: the validated source settings.
        credential: an azure-core TokenCredential; None builds DefaultAzureCredential.
        clock: returns the current time (UTC), the end of each query window.
    """

    type: ClassVar[str] = "azure_log_analytics"

    def __init__(
        self,
        settings: AzureLogAnalyticsSettings,
        credential: Any = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._credential = credential
        self._clock = clock

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Query each table for rows since its checkpoint (or within ``since``..``until``).

        Checkpoints are keyed ``<workspace id>/<table>`` with the value
        ``{"timestamp": RFC 3339}``. A backfill stores no checkpoints.

        Raises:
            SourceError: azure-monitor-query is missing, or no table could be queried.
        """
        batch = SourceBatch(self.name)
        now = self._clock()
        backfill = since is not None or until is not None
        reader = BatchReader()
        failures: list[SourceError] = []
        client = self._client()
        with client:
            for table in self.settings.tables:
                key = f"{self.settings.workspace_id}/{table}"
                start, end = self._window(checkpoints.get(key), now, since, until)
                batch.files_listed += 1
                try:
                    read = self._query(client, table, start, end)
                except SourceError as exc:
                    failures.append(exc)
                    batch.problems.append(f"{exc.reason}; {exc.hint}")
                    continue
                if read.rows:
                    origin = f"log_analytics:{self.settings.workspace_id}/{table}"
                    reader.add(orjson.dumps(read.rows), origin)
                if read.partial_error is not None:
                    # Rows after a partial failure may be missing, so the checkpoint stays.
                    batch.problems.append(
                        f"table {table}: the query returned partial results: "
                        f"{read.partial_error}; the next run queries the same window again"
                    )
                    continue
                if read.newest is not None and not backfill:
                    batch.checkpoints[key] = {"timestamp": _kql_time(read.newest)}
                if len(read.rows) >= self.settings.max_rows:
                    batch.notes.append(
                        f"table {table}: stopped at max_rows ({self.settings.max_rows}) rows, "
                        f"at {_kql_time(read.newest or end)}; the next run continues from there"
                    )
                logger.info(
                    "source %s: table %s: %s rows from %s to %s",
                    self.name,
                    table,
                    len(read.rows),
                    _kql_time(start),
                    _kql_time(end),
                )
        batch.result = reader.finish()
        if failures and len(failures) == len(self.settings.tables):
            if len(failures) == 1:
                raise failures[0]
            raise SourceError(
                self.name, "; ".join(failure.reason for failure in failures), failures[0].hint
            )
        return batch

    def _client(self) -> Any:
        """Build a LogsQueryClient with the given credential or DefaultAzureCredential.

        Raises:
            SourceError: azure-monitor-query or azure-identity is not installed.
        """
        try:
            from azure.monitor.query import LogsQueryClient
        except ImportError as exc:
            raise SourceError(
                self.name, f"azure-monitor-query is not installed ({exc})", _INSTALL_HINT
            ) from None
        credential = self._credential
        if credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:
                raise SourceError(
                    self.name, f"azure-identity is not installed ({exc})", _INSTALL_HINT
                ) from None
            credential = DefaultAzureCredential()
        return LogsQueryClient(
            credential, endpoint=self.settings.endpoint, retry_total=self.settings.retries
        )

    def _window(
        self,
        checkpoint: Any,
        now: datetime,
        since: datetime | None,
        until: datetime | None,
    ) -> tuple[datetime, datetime]:
        """Return the [start, end) window of one table's query."""
        return query_window(
            _checkpoint_time(checkpoint),
            now,
            since,
            until,
            initial=timedelta(hours=self.settings.initial_hours),
            lookback=timedelta(minutes=self.settings.lookback_minutes),
        )

    def _query(self, client: Any, table: Table, start: datetime, end: datetime) -> _TableRead:
        """Run one table's query and return its rows as dictionaries of raw column values.

        Raises:
            SourceError: the query failed (credentials, permission, throttling, server error).
        """
        from azure.core.exceptions import AzureError, ClientAuthenticationError
        from azure.core.rest import HttpRequest

        body = {
            "query": build_query(table, start, end, self.settings.max_rows),
            "timespan": f"{_kql_time(start)}/{_kql_time(end)}",
        }
        # LogsQueryClient.query_workspace() parses datetime columns to Python datetimes, which
        # drops the last digit of TimeGenerated's 100 ns ticks and so changes event_uid. The
        # client's send_request() runs the same request through the same pipeline (credential,
        # retries) and returns the service's JSON as it is.
        request = HttpRequest(
            "POST",
            f"/workspaces/{self.settings.workspace_id}/query",
            json=body,
            headers={"Prefer": f"wait={self.settings.server_timeout_seconds}"},
        )
        try:
            response = client.send_request(request)
            response.raise_for_status()
            document = response.json()
        except ClientAuthenticationError as exc:
            raise SourceError(
                self.name,
                f"table {table}: no Azure credentials could get a token: {_first_line(exc)}",
                "sign in with a managed identity, workload identity, AZURE_CLIENT_ID/"
                "AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or `az login`",
            ) from None
        except AzureError as exc:
            raise self._query_error(table, exc, _service_message(exc)) from None
        except ValueError as exc:
            raise SourceError(
                self.name,
                f"table {table}: the query response is not JSON: {exc}",
                "check that endpoint is the Log Analytics query endpoint",
            ) from None
        return _table_rows(document, table)

    def _query_error(self, table: Table, exc: Any, message: str) -> SourceError:
        """Turn an azure-core exception into a SourceError with a hint."""
        status = getattr(exc, "status_code", None)
        detail = f"HTTP {status}" if status else type(exc).__name__
        reason = f"table {table}: query of workspace {self.settings.workspace_id} failed: "
        reason += f"{detail}: {message}"
        if status in (401, 403):
            hint = _READER_HINT
        elif status == 429:
            hint = "the workspace throttled the query; the next run queries the same window again"
        elif status == 400:
            hint = f"check that table {table} exists in the workspace"
        elif status is None:
            hint = "check the network path to the Log Analytics endpoint; the next run retries"
        else:
            hint = "the Log Analytics service failed on its side; the next run retries"
        logger.warning("source %s: %s", self.name, reason)
        return SourceError(self.name, reason, hint)


def _table_rows(document: Any, table: Table) -> _TableRead:
    """Turn a query response (``{"tables": [{"columns", "rows"}], "error"?}``) into rows."""
    read = _TableRead()
    if not isinstance(document, dict):
        read.partial_error = "the response is not a JSON object"
        return read
    error = document.get("error")
    if isinstance(error, dict):
        # The service returns rows together with an error when the query succeeded in part.
        read.partial_error = str(error.get("message") or error.get("code") or error)
    for data in document.get("tables") or []:
        names = [str(column.get("name")) for column in data.get("columns") or []]
        for values in data.get("rows") or []:
            record = dict(zip(names, values, strict=False))
            record.setdefault("Type", table)
            read.rows.append(record)
            stamp = _parse_time(record.get("TimeGenerated"))
            if stamp is not None and (read.newest is None or stamp > read.newest):
                read.newest = stamp
    return read


def _service_message(exc: Any) -> str:
    """Return the ``error.message`` of a failed response, or the exception's first line."""
    response = getattr(exc, "response", None)
    try:
        error = response.json().get("error") if response is not None else None
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        code = error.get("code")
        return f"{code}: {error['message']}" if code else str(error["message"])
    return _first_line(exc)


def _first_line(value: Any) -> str:
    message = getattr(value, "message", None) or str(value)
    lines = str(message).splitlines()
    return lines[0] if lines else ""
