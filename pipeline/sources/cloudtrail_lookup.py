"""CloudTrail management events through the LookupEvents API, for accounts without a trail bucket.

LookupEvents returns the last 90 days of management events of one region, newest first, at
most 50 per page, and takes at most one lookup attribute per call. So this source makes one
paginated query per region and per secret-store event source (Secrets Manager, Systems Manager
Parameter Store, KMS by default). The API allows 2 requests per second per account and region:
a client-side rate limiter spaces the calls of each region, and a throttled or failed call is
retried with exponential backoff.

The checkpoint of a region is the newest ``EventTime`` read there. The next run starts
``lookback_minutes`` before it, because events appear in LookupEvents minutes after they happen.
AWS states no bound for that delay; 5 to 15 minutes is typical. The engine drops the events
read twice by their ``event_uid``.
A region is checkpointed and its events returned only when every page of every event source
was read, because a query cut short has read the newest events and missed older ones.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, Literal

import orjson
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import Field, field_validator

from pipeline.formats.reader import BatchReader
from pipeline.sources._shared import new_aws_session as _new_session
from pipeline.sources._shared import utc_now as _utc_now
from pipeline.sources.base import SourceBatch, SourceError, SourceSettings

__all__ = [
    "DEFAULT_EVENT_SOURCES",
    "RETENTION",
    "CloudTrailLookupSettings",
    "CloudTrailLookupSource",
]

logger = logging.getLogger(__name__)

DEFAULT_EVENT_SOURCES: Final = (
    "secretsmanager.amazonaws.com",
    "ssm.amazonaws.com",
    "kms.amazonaws.com",
)
RETENTION: Final = timedelta(days=90)
"""How far back LookupEvents returns events."""

_PAGE_SIZE: Final = 50  # the maximum MaxResults LookupEvents accepts
_BACKOFF_BASE_SECONDS: Final = 1.0
_BACKOFF_CAP_SECONDS: Final = 20.0
_RETRYABLE_CODES: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalFailure",
    }
)
_CREDENTIAL_CODES: Final = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"}
)


class CloudTrailLookupSettings(SourceSettings):
    """Secret-store management events of one account through the LookupEvents API."""

    type: Literal["cloudtrail_lookup"] = "cloudtrail_lookup"
    regions: list[str] = Field(min_length=1)
    event_sources: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVENT_SOURCES), min_length=1
    )
    lookback_minutes: int = Field(default=20, ge=0, le=1440)
    initial_days: int = Field(default=1, ge=0, le=90)
    requests_per_second: float = Field(default=2.0, gt=0, le=2.0)
    max_attempts: int = Field(default=5, ge=1, le=20)
    # The maximum pages per region and event source in one run. At 50 events a page and 2
    # requests per second, 10,000 pages are 500,000 events and about 83 minutes.
    max_pages: int = Field(default=10_000, ge=1)
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")

    @field_validator("regions")
    @classmethod
    def _check_regions(cls, value: list[str]) -> list[str]:
        bad = [region for region in value if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d+$", region)]
        if bad:
            raise ValueError(f"expected region names such as eu-west-1; invalid: {', '.join(bad)}")
        return value


class _RegionFailed(Exception):
    """A region's query failed after its retries."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class _RateLimiter:
    """Space calls at least ``1 / rate`` seconds apart."""

    def __init__(
        self, rate: float, monotonic: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._interval = 1.0 / rate
        self._monotonic = monotonic
        self._sleep = sleep
        self._last: float | None = None

    def wait(self) -> None:
        if self._last is not None:
            delay = self._last + self._interval - self._monotonic()
            if delay > 0:
                self._sleep(delay)
        self._last = self._monotonic()


class CloudTrailLookupSource:
    """Read secret-store management events of several regions through LookupEvents.

    Args:
        settings: the validated source settings.
        clock: returns the current time (UTC), the end of each query.
        monotonic: the clock the rate limiter measures intervals with.
        sleep: waits between calls and before retries.
    """

    type: ClassVar[str] = "cloudtrail_lookup"

    def __init__(
        self,
        settings: CloudTrailLookupSettings,
        *,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Read the events since each region's checkpoint (or in a backfill window).

        Args:
            checkpoints: region -> ``{"newest_event_time": ISO time}``; a region without one
                starts ``initial_days`` before now.
            since: the start of a backfill window; no checkpoint changes. LookupEvents keeps
                90 days, so an older start is moved up and a note reports it.
            until: the end of the backfill window (default: now).

        Raises:
            SourceError: no region could be read.
        """
        batch = SourceBatch(self.name)
        now = self._clock().astimezone(UTC)
        backfill = since is not None or until is not None
        end = min(until.astimezone(UTC), now) if until is not None else now
        reader = BatchReader()
        failures: list[_RegionFailed] = []

        for region in self.settings.regions:
            stored = _stored_time(checkpoints.get(region))
            start = self._start(region, stored, since, now, batch)
            try:
                pages, newest = self._read_region(region, start, end, batch)
            except _RegionFailed as exc:
                failures.append(exc)
                batch.problems.append(f"region {region}: {exc.reason}; {exc.hint}")
                logger.warning("source %s: region %s not read: %s", self.name, region, exc.reason)
                continue
            for data, origin in pages:
                reader.add(data, origin)
            if not backfill and newest is not None and (stored is None or newest > stored):
                batch.checkpoints[region] = {"newest_event_time": _iso(newest)}

        if len(failures) == len(self.settings.regions):
            raise SourceError(self.name, failures[0].reason, failures[0].hint)
        batch.result = reader.finish()
        logger.info(
            "source %s: %s pages, %s records from %s regions",
            self.name,
            batch.files_listed,
            batch.result.records,
            len(self.settings.regions) - len(failures),
        )
        return batch

    def _start(
        self,
        region: str,
        stored: datetime | None,
        since: datetime | None,
        now: datetime,
        batch: SourceBatch,
    ) -> datetime:
        """Return the StartTime of a region's queries, no older than LookupEvents keeps."""
        if since is not None:
            start = since.astimezone(UTC)
        elif stored is not None:
            start = stored - timedelta(minutes=self.settings.lookback_minutes)
        else:
            start = now - timedelta(days=self.settings.initial_days)
        oldest = now - RETENTION
        if start < oldest:
            if since is not None or stored is not None:
                batch.notes.append(
                    f"region {region}: LookupEvents keeps 90 days of events; events before "
                    f"{_iso(oldest)} cannot be read"
                )
            start = oldest
        return start

    def _client(self, region: str) -> Any:
        # Retries happen in _call, so that the rate limiter also spaces them.
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=60,
            user_agent_extra="keytrail",
        )
        return _new_session().client(
            "cloudtrail",
            region_name=region,
            endpoint_url=self.settings.endpoint_url,
            config=config,
        )

    def _read_region(
        self, region: str, start: datetime, end: datetime, batch: SourceBatch
    ) -> tuple[list[tuple[bytes, str]], datetime | None]:
        """Read every page of every event source; return the pages and the newest event time.

        Raises:
            _RegionFailed: a call failed after its retries, or the pagination did not end.
        """
        try:
            client = self._client(region)
        except (BotoCoreError, ValueError) as exc:
            # An invalid region name or endpoint URL, or an unreadable AWS config file.
            raise _RegionFailed(
                f"creating the CloudTrail client failed: {type(exc).__name__}: {exc}",
                "check regions and endpoint_url, and the AWS config file",
            ) from exc
        limiter = _RateLimiter(self.settings.requests_per_second, self._monotonic, self._sleep)
        pages: list[tuple[bytes, str]] = []
        newest: datetime | None = None
        for event_source in self.settings.event_sources:
            arguments: dict[str, Any] = {
                "LookupAttributes": [
                    {"AttributeKey": "EventSource", "AttributeValue": event_source}
                ],
                "StartTime": start,
                "EndTime": end,
                "MaxResults": _PAGE_SIZE,
            }
            tokens: set[str] = set()
            page = 0
            while True:
                response = self._call(client, limiter, region, arguments)
                page += 1
                batch.files_listed += 1
                events = response.get("Events") or []
                if events:
                    origin = f"cloudtrail:LookupEvents {region} {event_source} page {page}"
                    pages.append((_page_document(events), origin))
                    times = [
                        _as_utc(event["EventTime"]) for event in events if "EventTime" in event
                    ]
                    if times and (newest is None or max(times) > newest):
                        newest = max(times)
                token = response.get("NextToken")
                if not token:
                    break
                if token in tokens:
                    raise _RegionFailed(
                        f"LookupEvents returned the NextToken of an earlier page for "
                        f"{event_source}",
                        "the next run queries the region again",
                    )
                tokens.add(token)
                if page >= self.settings.max_pages:
                    raise _RegionFailed(
                        f"LookupEvents had more than {page} pages for {event_source}",
                        "raise max_pages, or lower initial_days or lookback_minutes; the next "
                        "run queries the region again",
                    )
                arguments["NextToken"] = token
        # The API returns events only up to EndTime. A later EventTime would move the
        # checkpoint past every event still to come.
        if newest is not None and newest > end:
            newest = end
        return pages, newest

    def _call(
        self, client: Any, limiter: _RateLimiter, region: str, arguments: dict[str, Any]
    ) -> Any:
        """Call LookupEvents, retrying throttling and server errors with backoff.

        Raises:
            _RegionFailed: the call failed with an error that is not retried, or
                ``max_attempts`` calls failed.
        """
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            limiter.wait()
            try:
                return client.lookup_events(**arguments)
            except ClientError as exc:
                code, status = _error_code(exc)
                retryable = code in _RETRYABLE_CODES or status >= 500
                if not retryable or attempt == attempts:
                    raise self._failure(region, code, status, attempt) from exc
            except NoCredentialsError as exc:
                raise _RegionFailed(
                    "LookupEvents failed: no AWS credentials found",
                    "set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run "
                    "with an instance, task or pod role",
                ) from exc
            except BotoCoreError as exc:
                code, status = type(exc).__name__, 0
                if attempt == attempts:
                    raise self._failure(region, code, status, attempt) from exc
            except (ValueError, TypeError, AttributeError) as exc:
                # botocore's response parser raises these, not a BotoCoreError, for a response
                # that does not fit the API's shapes (an EventTime that is not a time, an
                # object where the Events list belongs).
                raise _RegionFailed(
                    f"LookupEvents in {region} returned a response that could not be parsed: {exc}",
                    "check endpoint_url; the next run queries the region again",
                ) from exc
            delay = _backoff(attempt)
            logger.warning(
                "source %s: LookupEvents in %s failed with %s (attempt %s of %s); "
                "retrying in %.1f s",
                self.name,
                region,
                code,
                attempt,
                attempts,
                delay,
            )
            self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failure(self, region: str, code: str, status: int, attempts: int) -> _RegionFailed:
        where = f"LookupEvents in {region} failed: {code}"
        reason = f"{where} (HTTP {status})" if status else where
        if attempts > 1:
            reason += f" after {attempts} attempts"
        if code in ("AccessDeniedException", "AccessDenied") or status == 403:
            hint = "grant cloudtrail:LookupEvents (resource *) to keytrail's role or user"
        elif code in _CREDENTIAL_CODES:
            hint = "the AWS credentials are invalid or expired; refresh them"
        elif code in _RETRYABLE_CODES or status >= 500:
            hint = (
                "the region is throttled or unavailable; the next run reads from the same "
                "checkpoint (lower requests_per_second if other tools share the limit)"
            )
        else:
            hint = "check network access to CloudTrail (and endpoint_url if set)"
        return _RegionFailed(reason, hint)


def _page_document(events: list[dict[str, Any]]) -> bytes:
    """Return a page as a LookupEvents ``{"Events": [...]}`` document for the formats reader."""
    items = []
    for event in events:
        item = dict(event)
        if isinstance(item.get("EventTime"), datetime):
            item["EventTime"] = _iso(_as_utc(item["EventTime"]))
        items.append(item)
    return orjson.dumps({"Events": items}, default=str)


def _backoff(attempt: int) -> float:
    """Return the wait before retry ``attempt``: exponential, capped, half of it random."""
    ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code") or status or "unknown"), status


def _as_utc(value: Any) -> datetime:
    """Return a datetime or ISO text as an aware UTC datetime (naive values are UTC)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _stored_time(value: Any) -> datetime | None:
    if not isinstance(value, dict):
        return None
    text = value.get("newest_event_time")
    if not isinstance(text, str):
        return None
    try:
        return _as_utc(text)
    except ValueError:
        return None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
