"""Azure Key Vault AuditEvent logs that a diagnostic setting archives to Blob Storage.

Azure Monitor writes one append blob per vault and hour, named
``resourceId=/SUBSCRIPTIONS/<id>/RESOURCEGROUPS/<group>/PROVIDERS/MICROSOFT.KEYVAULT/VAULTS/<vault>/y=YYYY/m=MM/d=DD/h=HH/m=00/PT1H.json``
in the ``insights-logs-auditevent`` container, and appends one JSON record per line while
that hour lasts.

Each run lists the blobs of the hours within the look-back, one listing per vault and day, and
reads each changed blob from the byte offset where the previous run stopped (a range request).
Only complete lines are read, up to the last newline. The last line of an hour that ended
``settle_minutes`` ago is read even without a newline, and the reader quarantines it if it is
cut. The checkpoint of a blob is its offset, ETag, size, creation time and the SHA-256 of the
64 bytes before the offset. A blob that shrank, has another creation time or other bytes before
the offset was replaced, and is read again from byte 0; the engine then drops the events it has
already stored by ``event_uid``. A ``read_until`` entry keeps the end of the last complete run,
so the run after a downtime lists every hour since then.

azure-storage-blob is an optional dependency (``pip install 'keytrail[azure]'``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import Field

from pipeline.formats.reader import BatchReader
from pipeline.sources._shared import as_utc as _as_utc
from pipeline.sources._shared import utc_now as _utc_now
from pipeline.sources.base import SourceBatch, SourceError, SourceSettings

__all__ = ["AzureBlobSettings", "AzureBlobSource", "hour_of_blob"]

logger = logging.getLogger(__name__)

READ_UNTIL: Final = "read_until"
"""Checkpoint key of the end of the last run that read every blob it listed. Blob checkpoints
are keyed ``<container>/<blob name>``, and container names contain no slash, so the keys never
collide."""

# The hour partition of a blob name, as Azure Monitor writes it.
_HOUR_PATH: Final = re.compile(r"(?:^|/)y=(\d{4})/m=(\d{2})/d=(\d{2})/h=(\d{2})/m=(\d{2})/[^/]+$")
# Folder levels walked to find the vault folders that contain y=YYYY partitions; the layout
# above has 9 levels before them.
_MAX_DISCOVERY_DEPTH: Final = 16
# Bytes before a blob's offset that are read again and compared with their SHA-256 in the
# checkpoint, to find a blob replaced by one at least as long.
_TAIL_BYTES: Final = 64
# The signature of a SAS token in a URL or connection string (the ``sig`` parameter).
_SAS_SIGNATURE: Final = re.compile(r"(?i)\b(sig=)[^&;\s'\"]+")
_INSTALL_HINT: Final = "install the Azure extra: pip install 'keytrail[azure]'"
_ROLE_HINT: Final = (
    "grant the reading identity the Storage Blob Data Reader role on the container, or check "
    "the connection string"
)

_ResourceId = Annotated[
    str,
    Field(pattern=r"(?i)^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/[^/]+/.+[^/]$"),
]


class AzureBlobSettings(SourceSettings):
    """The diagnostic-settings container of one storage account.

    Credentials: with ``account_url`` set, azure-identity's DefaultAzureCredential chain
    (environment, workload identity, managed identity, Azure CLI) is used. Without it, the
    connection string in the environment variable named by ``connection_string_env``.
    """

    type: Literal["azure_blob"] = "azure_blob"
    account_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+/?$")
    connection_string_env: str = Field(
        default="AZURE_STORAGE_CONNECTION_STRING", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"
    )
    # Container names: 3 to 63 lower-case letters, digits and single hyphens inside.
    container: str = Field(
        default="insights-logs-auditevent",
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9](?:-?[a-z0-9])+$",
    )
    # Vault resource ids whose folders are read; empty walks the container to find them.
    resource_ids: list[_ResourceId] = Field(default_factory=list)
    lookback_hours: int = Field(default=3, ge=1, le=7 * 24)
    initial_hours: int = Field(default=24, ge=1, le=31 * 24)
    # NOTE: 15 minutes is an estimate of how late Azure Monitor may still append to an hour's
    # blob, not a documented limit.
    settle_minutes: int = Field(default=15, ge=0, le=24 * 60)
    retries: int = Field(default=3, ge=0, le=10)
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)


@dataclass(frozen=True)
class _Blob:
    """One listed blob: its name, hour partition and properties."""

    name: str
    hour: datetime
    etag: str
    size: int
    created: str


def hour_of_blob(name: str) -> datetime | None:
    """Return the UTC hour a ``.../y=/m=/d=/h=/m=/PT1H.json`` blob name covers, or None."""
    match = _HOUR_PATH.search(name)
    if match is None:
        return None
    year, month, day, hour, minute = (int(part) for part in match.groups())
    try:
        return datetime(year, month, day, hour, minute, tzinfo=UTC)
    except ValueError:
        return None


class AzureBlobSource:
    """Read Key Vault AuditEvent records appended to hourly ``PT1H.json`` blobs.

    Args:
        settings: the validated source settings.
        clock: returns the current time (UTC).
    """

    type: ClassVar[str] = "azure_blob"

    def __init__(
        self, settings: AzureBlobSettings, clock: Callable[[], datetime] = _utc_now
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
        """Read what was appended to the blobs of the look-back hours since ``checkpoints``.

        A backfill (``since`` or ``until`` given) reads every blob of the window from byte 0
        and stores and removes no checkpoints.

        Raises:
            SourceError: azure-storage-blob is missing, the credentials are missing or
                refused, or the container cannot be listed.
        """
        batch = SourceBatch(self.name)
        now = self._clock()
        backfill = since is not None or until is not None
        start, end = self._window(checkpoints, now, since, until)
        with ExitStack() as clients:
            container = self._container_client(clients)
            self._read_blobs(batch, container, checkpoints, now, backfill, start, end)
        if not backfill:
            batch.checkpoints_removed = _expired_keys(checkpoints, start)
            if not batch.problems:
                batch.checkpoints[READ_UNTIL] = end.isoformat()
        logger.info(
            "source %s: %s blobs listed from %s to %s, %s unchanged, %s read",
            self.name,
            batch.files_listed,
            start.isoformat(),
            end.isoformat(),
            batch.files_unchanged,
            len(batch.checkpoints) - (READ_UNTIL in batch.checkpoints),
        )
        return batch

    def _read_blobs(
        self,
        batch: SourceBatch,
        container: Any,
        checkpoints: Mapping[str, Any],
        now: datetime,
        backfill: bool,
        start: datetime,
        end: datetime,
    ) -> None:
        """Read the new lines of every blob in the window into ``batch``."""
        blobs = self._list_in_window(container, start, end)
        reader = BatchReader()
        for blob in blobs:
            batch.files_listed += 1
            key = f"{self.settings.container}/{blob.name}"
            previous = None if backfill else checkpoints.get(key)
            settled = blob.hour + timedelta(hours=1, minutes=self.settings.settle_minutes) <= now
            offset = _resume_offset(previous, blob, settled)
            if offset is None:
                batch.files_unchanged += 1
                continue
            tail = previous.get("tail_sha256") if isinstance(previous, Mapping) else None
            try:
                read = self._read_blob(container, blob, offset, settled, tail)
            except SourceError as exc:
                batch.problems.append(f"{exc.reason}; {exc.hint}")
                continue
            if read is None:
                continue
            data, marker = read
            if data:
                origin = f"{self.settings.container}/{blob.name}"
                if offset:
                    origin = f"{origin} from byte {offset}"
                reader.add(data, origin)
            if not backfill:
                batch.checkpoints[key] = marker
        batch.result = reader.finish()

    def _window(
        self,
        checkpoints: Mapping[str, Any],
        now: datetime,
        since: datetime | None,
        until: datetime | None,
    ) -> tuple[datetime, datetime]:
        """Return the hours to list: the look-back before the last complete run, or a backfill."""
        if since is not None or until is not None:
            end = _as_utc(until) if until is not None else now
            start = (
                _as_utc(since)
                if since is not None
                else end - timedelta(hours=self.settings.initial_hours)
            )
            return start, end
        lookback = timedelta(hours=self.settings.lookback_hours)
        last = _parse_time(checkpoints.get(READ_UNTIL))
        if last is None:
            return now - timedelta(hours=self.settings.initial_hours), now
        return min(last, now) - lookback, now

    def _container_client(self, clients: ExitStack) -> Any:
        """Build the container client from the configured credentials; ``clients`` closes it.

        Raises:
            SourceError: azure-storage-blob (or azure-identity) is not installed, or no
                credentials are configured.
        """
        try:
            from azure.storage.blob import BlobServiceClient
        except ImportError as exc:
            raise SourceError(
                self.name, f"azure-storage-blob is not installed ({exc})", _INSTALL_HINT
            ) from None
        options: dict[str, Any] = {
            "retry_total": self.settings.retries,
            "connection_timeout": self.settings.timeout_seconds,
            "read_timeout": self.settings.timeout_seconds,
        }
        if self.settings.account_url:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:
                raise SourceError(
                    self.name, f"azure-identity is not installed ({exc})", _INSTALL_HINT
                ) from None
            credential = clients.enter_context(DefaultAzureCredential())
            service = BlobServiceClient(self.settings.account_url, credential=credential, **options)
            clients.enter_context(service)
            return service.get_container_client(self.settings.container)
        variable = self.settings.connection_string_env
        connection_string = os.environ.get(variable, "").strip()
        if not connection_string:
            raise SourceError(
                self.name,
                f"no storage account configured: environment variable {variable} is not set "
                "and account_url is empty",
                f"set {variable} to the storage account's connection string, or set "
                "account_url and sign in with a managed identity or `az login`",
            )
        try:
            service = BlobServiceClient.from_connection_string(connection_string, **options)
        except ValueError:
            # The SDK's message does not contain the connection string, but it is not shown
            # either, in case a later version quotes it.
            raise SourceError(
                self.name,
                f"the connection string in environment variable {variable} is invalid",
                "copy it again from the storage account's Access keys page",
            ) from None
        clients.enter_context(service)
        return service.get_container_client(self.settings.container)

    def _list_in_window(self, container: Any, start: datetime, end: datetime) -> list[_Blob]:
        """List the blobs whose hour overlaps ``start``..``end``, one request per vault and day.

        Raises:
            SourceError: the container cannot be listed.
        """
        from azure.core.exceptions import AzureError

        try:
            roots = self._vault_folders(container)
            blobs = []
            for root in roots:
                for day in _days(start, end):
                    prefix = f"{root}y={day:%Y}/m={day:%m}/d={day:%d}/"
                    for item in container.list_blobs(name_starts_with=prefix):
                        blob = _listed_blob(item)
                        if (
                            blob is not None
                            and blob.hour + timedelta(hours=1) > start
                            and blob.hour <= end
                        ):
                            blobs.append(blob)
        except AzureError as exc:
            raise self._storage_error("cannot list", exc) from None
        return blobs

    def _vault_folders(self, container: Any) -> list[str]:
        """Return the folders (ending in ``/``) that contain ``y=YYYY`` partitions."""
        if self.settings.resource_ids:
            return [f"resourceId={resource.upper()}/" for resource in self.settings.resource_ids]
        from azure.storage.blob import BlobPrefix

        roots: list[str] = []
        level = [""]
        for _ in range(_MAX_DISCOVERY_DEPTH):
            deeper: list[str] = []
            for prefix in level:
                for item in container.walk_blobs(name_starts_with=prefix or None, delimiter="/"):
                    if not isinstance(item, BlobPrefix):
                        continue
                    if item.name[len(prefix) :].startswith("y="):
                        if prefix not in roots:
                            roots.append(prefix)
                    else:
                        deeper.append(item.name)
            if not deeper:
                break
            level = deeper
        logger.debug("source %s: found %s vault folders", self.name, len(roots))
        return roots

    def _read_blob(
        self, container: Any, blob: _Blob, offset: int, settled: bool, tail_sha256: Any
    ) -> tuple[bytes, dict[str, Any]] | None:
        """Download ``blob`` from ``offset`` and return its complete lines and new checkpoint.

        The last bytes before ``offset`` are downloaded too and compared with the checkpoint's
        ``tail_sha256``. When they differ, the blob was replaced by one at least as long, and it
        is read again from byte 0.

        Returns None when the blob changed between listing and download; the next run reads it.

        Raises:
            SourceError: the download failed.
        """
        from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError

        overlap = min(offset, _TAIL_BYTES) if isinstance(tail_sha256, str) else 0
        try:
            downloader = container.download_blob(blob.name, offset=offset - overlap)
            data: bytes = downloader.readall()
            if overlap and _sha256(data[:overlap]) != tail_sha256:
                logger.info("blob %s was replaced; reading it again from byte 0", blob.name)
                offset, overlap = 0, 0
                downloader = container.download_blob(blob.name)
                data = downloader.readall()
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            # An append that lands between the chunks of a large download makes the SDK's
            # If-Match check fail, and a blob deleted after listing is not found.
            logger.info(
                "source %s: %s changed while it was read (%s); the next run reads it",
                self.name,
                blob.name,
                type(exc).__name__,
            )
            return None
        except AzureError as exc:
            raise self._storage_error(f"cannot read {blob.name} in", exc) from None
        before, data = data[:overlap], data[overlap:]
        end = data.rfind(b"\n") + 1
        complete = data[:end]
        if settled and data[end:].strip():
            # The hour is over, so the last line is complete as written. The newline added
            # makes the reader quarantine that line if it is cut, instead of waiting for more.
            end = len(data)
            complete = data + b"\n"
        marker = {
            "offset": offset + end,
            "etag": _etag(downloader.properties.etag) or blob.etag,
            "size": offset + len(data),
            "created": blob.created,
            "tail_sha256": _sha256((before + data[:end])[-_TAIL_BYTES:]),
        }
        return complete, marker

    def _storage_error(self, action: str, exc: Exception) -> SourceError:
        """Turn an azure-core exception into a SourceError without credentials in it."""
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        detail = f"HTTP {status} {code}" if status else type(exc).__name__
        # The first line of an azure-core message names the error, and later lines contain the
        # request id and time. A connection error quotes the request URL, whose SAS signature
        # is redacted.
        lines = str(getattr(exc, "message", None) or exc).splitlines() or [""]
        message = _SAS_SIGNATURE.sub(r"\1REDACTED", lines[0])
        reason = f"{action} container {self.settings.container}: {detail}: {message}"
        if status in (401, 403):
            hint = _ROLE_HINT
        elif status == 404:
            hint = (
                f"check that container {self.settings.container} exists; Azure Monitor creates "
                "it when the vault's diagnostic setting first archives AuditEvent logs"
            )
        elif status is None:
            hint = "check the network path to the storage account; the next run retries"
        else:
            hint = "the storage service failed on its side; the next run retries"
        logger.warning("source %s: %s", self.name, reason)
        return SourceError(self.name, reason, hint)


def _resume_offset(previous: Any, blob: _Blob, settled: bool) -> int | None:
    """Return the byte offset to read ``blob`` from, or None when it has nothing new."""
    if not blob.size:
        # An empty blob has nothing to read, and a range request on it fails with HTTP 416.
        # A checkpoint from before it was replaced stays, and its creation time differs
        # from the new blob's, so the blob is read from byte 0 once it has data.
        return None
    if not isinstance(previous, Mapping):
        return 0
    offset = previous.get("offset")
    if not isinstance(offset, int) or offset < 0:
        return 0
    if previous.get("created") != blob.created or blob.size < offset:
        logger.info("blob %s was replaced or shrank; reading it again from byte 0", blob.name)
        return 0
    if blob.size == offset:
        return None
    if previous.get("etag") == blob.etag and not settled:
        return None  # Only a cut last line is left, and it has not changed.
    return offset


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listed_blob(item: Any) -> _Blob | None:
    hour = hour_of_blob(item.name)
    if hour is None:
        return None
    created = item.creation_time.isoformat() if item.creation_time else ""
    return _Blob(item.name, hour, _etag(item.etag), int(item.size or 0), created)


def _etag(value: Any) -> str:
    """Return an ETag without the quotes that download responses have and listings lack."""
    return str(value or "").strip('"')


def _days(start: datetime, end: datetime) -> Iterator[datetime]:
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day <= end:
        yield day
        day += timedelta(days=1)


def _expired_keys(checkpoints: Mapping[str, Any], start: datetime) -> list[str]:
    """Return blob checkpoint keys whose hour ended before ``start``."""
    expired = []
    for key in checkpoints:
        hour = hour_of_blob(key)
        if hour is not None and hour + timedelta(hours=1) <= start:
            expired.append(key)
    return sorted(expired)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return _as_utc(parsed)
