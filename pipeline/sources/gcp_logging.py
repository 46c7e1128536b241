"""Google Cloud audit log entries read through the Cloud Logging API (``entries.list``).

Each run requests, from every configured project, the Admin Activity and Data Access audit
entries of the configured services (Secret Manager by default) in ascending timestamp order,
from the project's checkpoint minus a look-back until the run's start. The checkpoint of a
project is the newest entry timestamp read from it. Entries that Cloud Logging ingests late, up
to the look-back, are read on the next run, and the overlap is harmless because the engine
drops events whose ``event_uid`` it has already stored.

Data Access audit logs are off by default for Secret Manager, so a project that returns no Data
Access entries over a window gets a note in the run summary: secret reads there are probably
not logged.

The client uses the HTTP transport. Entries are passed to the formats package as the JSON
objects ``entries.list`` returns, because the ``LogEntry`` objects of google-cloud-logging 3.17
cut timestamps to microseconds (which changes ``event_uid``), drop ``receiveTimestamp`` and
raise KeyError on an entry without ``logName``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

import orjson
import pandas as pd
from pydantic import Field, field_validator

from pipeline.formats.reader import BatchReader
from pipeline.sources._shared import checkpoint_time as _checkpoint_time
from pipeline.sources._shared import parse_rfc3339 as _entry_time
from pipeline.sources._shared import query_window
from pipeline.sources._shared import rfc3339 as _rfc3339
from pipeline.sources._shared import utc_now as _utc_now
from pipeline.sources.base import SourceBatch, SourceError, SourceSettings

__all__ = ["GcpLoggingSettings", "GcpLoggingSource", "build_filter"]

logger = logging.getLogger(__name__)

SECRET_MANAGER: Final = "secretmanager.googleapis.com"
# Log ids of the two audit logs read, URL-encoded as they appear in a LogEntry's logName.
ACTIVITY_LOG: Final = "cloudaudit.googleapis.com%2Factivity"
DATA_ACCESS_LOG: Final = "cloudaudit.googleapis.com%2Fdata_access"
# Hosts for which api_endpoint is a local test server that takes anonymous requests.
_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})

_REQUEST_PREFIX: Final = re.compile(r"^[A-Z]+ https?://\S+: ")

_FilterWord = Annotated[str, Field(pattern=r'^[^"\\\s]{1,100}$')]

_PERMISSION_HINT: Final = (
    "grant the reading identity roles/logging.privateLogViewer on the project (Data Access "
    "entries need it), or a custom role with logging.logEntries.list and "
    "logging.privateLogEntries.list"
)


class GcpLoggingSettings(SourceSettings):
    """Secret Manager audit log entries of one or more Google Cloud projects."""

    type: Literal["gcp_logging"] = "gcp_logging"
    # Project ids and service names are quoted into the Logging filter, so quotes, backslashes
    # and whitespace are rejected.
    projects: list[_FilterWord] = Field(min_length=1, max_length=100)
    services: list[_FilterWord] = Field(default_factory=lambda: [SECRET_MANAGER], min_length=1)
    api_endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="Logging API base URL; None uses https://logging.googleapis.com.",
    )
    lookback_minutes: int = Field(default=15, ge=0, le=24 * 60)
    initial_hours: int = Field(default=24, ge=1, le=30 * 24)
    page_size: int = Field(default=1000, ge=1, le=1000)
    max_entries_per_project: int = Field(default=200_000, ge=1)
    # The API may return pages without entries that still carry a page token, so the entry
    # cap alone would not end a query that keeps doing so.
    max_pages_per_project: int = Field(default=2_000, ge=1)
    # NOTE: requests applies this to the connect and to each socket read, not to the whole
    # response, so a server that sends a byte now and then can hold a page request longer.
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)

    @field_validator("projects")
    @classmethod
    def _unique(cls, projects: list[str]) -> list[str]:
        duplicates = sorted({name for name in projects if projects.count(name) > 1})
        if duplicates:
            raise ValueError(f"each project may be listed once; repeated: {', '.join(duplicates)}")
        return projects


@dataclass
class _ProjectRead:
    """The pages, counts, newest timestamp and error of one project in one run."""

    pages: int = 0
    entries: int = 0
    data_access_entries: int = 0
    newest: pd.Timestamp | None = None
    newest_text: str | None = None
    truncated: bool = False
    error: SourceError | None = None
    page_data: list[tuple[bytes, str]] = field(default_factory=list)


def build_filter(project: str, services: list[str], start: datetime, end: datetime) -> str:
    """Return the Logging query for one project's audit entries of ``services`` in a window.

    ``start`` is inclusive and ``end`` exclusive, both written as RFC 3339 UTC times.
    """
    service_terms = " OR ".join(f'protoPayload.serviceName="{name}"' for name in services)
    log_terms = " OR ".join(
        f'logName="projects/{project}/logs/{log_id}"' for log_id in (ACTIVITY_LOG, DATA_ACCESS_LOG)
    )
    return (
        f"({service_terms})\n"
        f"AND ({log_terms})\n"
        f'AND timestamp>="{_rfc3339(start)}"\n'
        f'AND timestamp<"{_rfc3339(end)}"'
    )


class GcpLoggingSource:
    """Read Secret Manager audit entries of several projects through Cloud Logging.

    Args:
        settings: the validated source settings.
        clock: returns the current time (UTC); the end of each window.
    """

    type: ClassVar[str] = "gcp_logging"

    def __init__(
        self, settings: GcpLoggingSettings, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._clock = clock

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Read each project's entries since its checkpoint (or within ``since``..``until``).

        Checkpoints are keyed ``projects/<id>`` with the value ``{"timestamp": RFC 3339}``.
        A backfill (``since`` or ``until`` given) stores no checkpoints, because its window may
        lie after entries that were never read.

        Raises:
            SourceError: no project could be read (credentials, quota, server errors).
        """
        batch = SourceBatch(self.name)
        now = self._clock()
        backfill = since is not None or until is not None
        client = self._client()
        reader = BatchReader()
        failures: list[SourceError] = []
        with closing(client):
            for project in self.settings.projects:
                key = f"projects/{project}"
                start, end = self._window(checkpoints.get(key), now, since, until)
                read = self._read_project(client, project, start, end)
                batch.files_listed += read.pages
                for data, origin in read.page_data:
                    reader.add(data, origin)
                if read.error is not None:
                    failures.append(read.error)
                    batch.problems.append(f"{read.error.reason}; {read.error.hint}")
                    continue
                if read.newest is not None and read.newest > end:
                    # The filter ends at ``end``. A later timestamp would move the checkpoint
                    # past every entry still to come.
                    read.newest, read.newest_text = pd.Timestamp(end), _rfc3339(end)
                if not backfill and _is_newer(read, checkpoints.get(key)):
                    batch.checkpoints[key] = {"timestamp": read.newest_text}
                batch.notes.extend(self._notes(project, read, start, end))
                self._log_read(project, read, start, end)
        batch.result = reader.finish()
        if failures and len(failures) == len(self.settings.projects):
            if len(failures) == 1:
                raise failures[0]
            reasons = "; ".join(failure.reason for failure in failures)
            raise SourceError(self.name, reasons, failures[0].hint)
        return batch

    def _log_read(self, project: str, read: _ProjectRead, start: datetime, end: datetime) -> None:
        logger.info(
            "source %s: project %s: %s entries in %s pages, %s Data Access, from %s to %s",
            self.name,
            project,
            read.entries,
            read.pages,
            read.data_access_entries,
            _rfc3339(start),
            _rfc3339(end),
        )

    def _client(self) -> Any:
        """Build a Cloud Logging client with the HTTP transport.

        Raises:
            SourceError: no credentials were found in the application default chain.
        """
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud.logging import Client

        endpoint = self.settings.api_endpoint
        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        # A local test server takes anonymous requests. Every other endpoint gets credentials
        # from the application default chain (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata).
        credentials = AnonymousCredentials() if endpoint and _is_local(endpoint) else None
        try:
            return Client(
                project=self.settings.projects[0],
                credentials=credentials,
                client_options=options,
                _use_grpc=False,
            )
        except DefaultCredentialsError as exc:
            raise SourceError(
                self.name,
                f"no Google Cloud credentials found: {exc}",
                "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run "
                "`gcloud auth application-default login`, or run on a workload with an "
                "attached service account",
            ) from None

    def _window(
        self,
        checkpoint: Any,
        now: datetime,
        since: datetime | None,
        until: datetime | None,
    ) -> tuple[datetime, datetime]:
        """Return the [start, end) window of one project's request."""
        last = _checkpoint_time(checkpoint)
        if since is None and last is None and checkpoint is not None:
            logger.warning(
                "source %s: ignored an invalid checkpoint %r; reading the last %s hours",
                self.name,
                checkpoint,
                self.settings.initial_hours,
            )
        return query_window(
            last,
            now,
            since,
            until,
            initial=timedelta(hours=self.settings.initial_hours),
            lookback=timedelta(minutes=self.settings.lookback_minutes),
        )

    def _read_project(
        self, client: Any, project: str, start: datetime, end: datetime
    ) -> _ProjectRead:
        """Follow the page tokens of one project's query to the end, or to an error."""
        from google.api_core.exceptions import GoogleAPICallError
        from google.auth.exceptions import GoogleAuthError
        from requests import RequestException

        read = _ProjectRead()
        body: dict[str, Any] = {
            "resourceNames": [f"projects/{project}"],
            "filter": build_filter(project, self.settings.services, start, end),
            "orderBy": "timestamp asc",
            "pageSize": self.settings.page_size,
        }
        tokens: set[str] = set()
        while True:
            try:
                # NOTE: Client.list_entries() would turn each entry into a LogEntry object, which
                # loses data (module docstring), so the client's HTTP connection is called
                # directly with the same request that list_entries sends.
                response = client._connection.api_request(
                    method="POST",
                    path="/entries:list",
                    data=body,
                    timeout=self.settings.timeout_seconds,
                )
            except GoogleAPICallError as exc:
                read.error = self._api_error(project, exc)
                return read
            except (GoogleAuthError, RequestException) as exc:
                read.error = SourceError(
                    self.name,
                    f"project {project}: request to Cloud Logging failed: "
                    f"{type(exc).__name__}: {exc}",
                    "check the network path to the Logging API and the credentials; the next "
                    "run reads from the same checkpoint",
                )
                return read
            if not isinstance(response, dict):
                read.error = SourceError(
                    self.name,
                    f"project {project}: Cloud Logging returned a JSON {type(response).__name__} "
                    "where an entries.list response object was expected",
                    "check that api_endpoint points at the Cloud Logging API",
                )
                return read
            read.pages += 1
            entries = response.get("entries") or []
            if entries:
                self._add_page(read, project, entries)
            token = response.get("nextPageToken")
            if not token:
                return read
            if not isinstance(token, str) or token in tokens:
                read.error = SourceError(
                    self.name,
                    f"project {project}: Cloud Logging returned the page token of an earlier "
                    f"page (or an invalid one) on page {read.pages}",
                    "the next run reads from the same checkpoint",
                )
                return read
            tokens.add(token)
            if (
                read.entries >= self.settings.max_entries_per_project
                or read.pages >= self.settings.max_pages_per_project
            ):
                read.truncated = True
                return read
            body["pageToken"] = token

    def _add_page(self, read: _ProjectRead, project: str, entries: list[Any]) -> None:
        """Keep one page for the reader and update the project's counts and newest time."""
        origin = f"gcp_logging:projects/{project} page {read.pages}"
        read.page_data.append((orjson.dumps({"entries": entries}), origin))
        read.entries += len(entries)
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # The reader quarantines it with its origin.
            log_name = entry.get("logName")
            if isinstance(log_name, str) and log_name.endswith(DATA_ACCESS_LOG):
                read.data_access_entries += 1
            stamp = _entry_time(entry.get("timestamp"))
            if stamp is not None and (read.newest is None or stamp > read.newest):
                read.newest = stamp
                read.newest_text = _rfc3339(stamp)

    def _notes(self, project: str, read: _ProjectRead, start: datetime, end: datetime) -> list[str]:
        notes = []
        if read.data_access_entries == 0:
            services = ", ".join(self.settings.services)
            notes.append(
                f"project {project} returned no Data Access audit entries for {services} "
                f"from {_rfc3339(start)} to {_rfc3339(end)}. Data Access audit logs are off by "
                "default, so secret reads in this project are probably not logged. Turn on "
                "the DATA_READ log type (and ADMIN_READ for listings and metadata reads) for "
                "Secret Manager in the project's audit config "
                "(IAM & Admin > Audit Logs, or an auditConfigs entry set with "
                "`gcloud projects set-iam-policy`)"
            )
        if read.truncated:
            resume = (
                f" at {read.newest_text}; the next run continues from there"
                if read.newest_text
                else "; the next run reads from the same checkpoint"
            )
            notes.append(
                f"project {project}: stopped after {read.entries} entries in {read.pages} "
                f"pages (max_entries_per_project or max_pages_per_project){resume}"
            )
        return notes

    def _api_error(self, project: str, exc: Any) -> SourceError:
        """Turn an HTTP error of the Logging API into a SourceError with a hint."""
        code = exc.code
        # google-api-core starts the message with the request method and URL.
        message = _REQUEST_PREFIX.sub("", str(exc.message))
        reason = f"project {project}: Cloud Logging returned HTTP {code}: {message}"
        if code == 429:
            hint = (
                "the Logging API read quota is used up; the next run reads from the same "
                "checkpoint. Run less often, raise page_size, or ask for a higher quota"
            )
        elif code in (401, 403):
            hint = _PERMISSION_HINT
        elif code == 404:
            hint = f"check that project {project} exists and the project id is spelled right"
        elif code is not None and code >= 500:
            hint = "the Logging API failed on its side; the next run reads from the same checkpoint"
        else:
            hint = "check the source's projects and services settings"
        logger.warning("source %s: %s", self.name, reason)
        return SourceError(self.name, reason, hint)


def _is_newer(read: _ProjectRead, checkpoint: Any) -> bool:
    """Return True when ``read`` found an entry newer than the stored checkpoint."""
    if read.newest is None:
        return False
    last = _entry_time(checkpoint.get("timestamp")) if isinstance(checkpoint, Mapping) else None
    return last is None or read.newest > last


def _is_local(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    return parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS
