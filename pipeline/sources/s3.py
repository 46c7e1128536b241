"""CloudTrail log files in an S3 bucket, read with boto3.

A trail writes ``<prefix>/AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/`` objects named
``<account>_CloudTrail_<region>_<YYYYMMDDTHHmmZ>_<unique>.json.gz``. An organization trail
puts the organization id before the account: ``<prefix>/AWSLogs/<org-id>/<account>/...``. The
date in the key is the delivery time, and a file can contain events from any time before it.

CloudTrail delivers files late, out of key order, and sometimes twice, so a "last key read"
marker would lose files. This source keeps one checkpoint entry per day partition instead
(``<account>/<region>/<YYYY-MM-DD>`` -> the names and ETags of the objects read, plus failed
read attempts of corrupt objects) and lists every partition of the last ``lookback_days`` days
again on each run. The entry ``list_from`` stores the first day the next run lists. It stays on
the oldest day with an object still to be read, so a failed object is retried even after it
falls out of the look-back, and a run after days of downtime lists every day it missed.
Objects are fetched by ``max_concurrency`` threads and read in key order.

Objects named ``CloudTrail-Digest`` are skipped without being read, and digest content is
recognised by the formats package. An object larger than ``max_object_bytes`` as stored, or
``max_uncompressed_bytes`` after gunzip, is quarantined and not read again. Decompression stops
at the limit, so a small gzip bomb costs no more memory than the limit. A gzip that is truncated
or fails its CRC is read again by the next runs and quarantined after
``quarantine_after_attempts`` failed reads.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, Final, Literal

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import Field, field_validator

from pipeline.formats.base import FileResult, Quarantined
from pipeline.formats.reader import BatchReader, merge_results
from pipeline.schema import empty_events
from pipeline.sources._shared import new_aws_session as _new_session
from pipeline.sources._shared import utc_now as _utc_now
from pipeline.sources.base import SourceBatch, SourceError, SourceSettings

__all__ = ["LIST_FROM_KEY", "S3CloudTrailSettings", "S3CloudTrailSource"]

logger = logging.getLogger(__name__)

LIST_FROM_KEY: Final = "list_from"
"""Checkpoint key of the first day (``YYYY-MM-DD``) that the next run lists."""

TOO_LARGE: Final = "too_large"
"""Quarantine reason of an object over one of the size limits."""

_MIB: Final = 1024 * 1024
_CHUNK_BYTES: Final = _MIB
_GZIP_MAGIC: Final = b"\x1f\x8b"
_DIGEST_MARKER: Final = "CloudTrail-Digest"
_ACCOUNT: Final = re.compile(r"^\d{12}$")
_PARTITION_KEY: Final = re.compile(r"^(\d{12})/([a-z0-9-]+)/(\d{4}-\d{2}-\d{2})$")
# Problem lines for objects that could not be read, per run. Further failures share one line.
_MAX_OBJECT_PROBLEMS: Final = 10
_THROTTLING_CODES: Final = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503"}
)
_CREDENTIAL_CODES: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


class S3CloudTrailSettings(SourceSettings):
    """CloudTrail log files under ``AWSLogs/`` in one bucket.

    Empty ``accounts`` or ``regions`` are discovered by listing the bucket. Credentials come
    from the standard AWS chain (environment, shared config and credentials files, SSO,
    container or instance role), never from config.yaml.
    """

    type: Literal["s3_cloudtrail"] = "s3_cloudtrail"
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    prefix: str = Field(default="", max_length=512)
    accounts: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    organization_id: str | None = Field(default=None, pattern=r"^o-[a-z0-9]{10,32}$")
    lookback_days: int = Field(default=2, ge=0, le=30)
    start_date: date | None = None
    max_object_bytes: int = Field(default=64 * _MIB, ge=1024)
    # Up to max_concurrency objects are held at once, so the fetched contents take at most
    # max_concurrency * max_uncompressed_bytes (1 GiB with the defaults). CloudTrail writes a
    # file about every five minutes per account and region; real ones are far smaller.
    max_uncompressed_bytes: int = Field(default=256 * _MIB, ge=1024)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    quarantine_after_attempts: int = Field(default=3, ge=1, le=100)
    max_attempts: int = Field(default=5, ge=1, le=20)
    region_name: str | None = None
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")

    @field_validator("prefix")
    @classmethod
    def _normalize_prefix(cls, value: str) -> str:
        """Store the prefix without slashes around it (``logs/trail``, or empty)."""
        return value.strip("/")

    @field_validator("accounts")
    @classmethod
    def _check_accounts(cls, value: list[str]) -> list[str]:
        bad = [account for account in value if not _ACCOUNT.match(account)]
        if bad:
            raise ValueError(f"an AWS account id is 12 digits; invalid: {', '.join(bad)}")
        return value

    @field_validator("regions")
    @classmethod
    def _check_regions(cls, value: list[str]) -> list[str]:
        bad = [region for region in value if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d+$", region)]
        if bad:
            raise ValueError(f"expected region names such as eu-west-1; invalid: {', '.join(bad)}")
        return value


@dataclass(frozen=True)
class _Partition:
    """One day folder of one account and region."""

    account: str
    region: str
    day: date

    @property
    def key(self) -> str:
        return f"{self.account}/{self.region}/{self.day.isoformat()}"


@dataclass
class _PartitionState:
    """The checkpoint value of one partition: object name -> ETag, and failed read attempts."""

    objects: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, value: Any) -> _PartitionState:
        if not isinstance(value, dict):
            return cls()
        objects = value.get("objects")
        attempts = value.get("attempts")
        try:
            return cls(
                {str(k): str(v) for k, v in objects.items()} if isinstance(objects, dict) else {},
                {str(k): int(v) for k, v in attempts.items()} if isinstance(attempts, dict) else {},
            )
        except (TypeError, ValueError):
            # A damaged entry reads its partition again; the engine drops the repeated events.
            return cls()

    def to_checkpoint(self) -> dict[str, Any]:
        return {"objects": dict(sorted(self.objects.items())), "attempts": self.attempts}


@dataclass(frozen=True)
class _Object:
    key: str
    etag: str
    size: int

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Job:
    """An object to fetch, with the partition and the new checkpoint value it belongs to."""

    partition: _Partition
    obj: _Object
    state: _PartitionState
    origin: str


class _TooLarge(Exception):
    pass


class _Corrupt(Exception):
    pass


@dataclass
class _RunCounts:
    """Counts, quarantine entries and unfinished days of one read, besides the reader's events."""

    extra: FileResult = field(default_factory=lambda: FileResult(events=empty_events()))
    failed_objects: int = 0
    unfinished_days: set[date] = field(default_factory=set)


class S3CloudTrailSource:
    """Read new CloudTrail log files from S3, day partition by day partition.

    Args:
        settings: the validated source settings.
        clock: returns the current time (UTC); the partitions listed end on its day.
    """

    type: ClassVar[str] = "s3_cloudtrail"

    def __init__(
        self, settings: S3CloudTrailSettings, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._clock = clock
        base = f"{settings.prefix}/AWSLogs/" if settings.prefix else "AWSLogs/"
        if settings.organization_id:
            base += f"{settings.organization_id}/"
        self._base = base

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Read the objects not yet read in the partitions of the look-back (or of a window).

        Args:
            checkpoints: this source's stored checkpoints; an empty mapping starts at
                ``start_date``, or ``lookback_days`` before today.
            since: the start of a backfill window. Every object of the window's days, plus the
                day after it (files delivered after midnight contain events from before), is
                read whatever the checkpoints contain, and no checkpoint changes.
            until: the end of the backfill window (default: now).

        Raises:
            SourceError: listing the bucket failed (throttled, server error, access denied,
                no credentials).
        """
        batch = SourceBatch(self.name)
        today = self._clock().astimezone(UTC).date()
        backfill = since is not None or until is not None
        days = self._days(checkpoints, today, since, until)
        client = self._client()
        reader = BatchReader()
        counts = _RunCounts()
        states: dict[_Partition, tuple[_PartitionState, _PartitionState]] = {}

        # Objects are fetched by a thread pool while the main thread lists the next partitions,
        # and their results are taken in listing order, so events keep the order of the keys.
        concurrency = self.settings.max_concurrency
        with ThreadPoolExecutor(concurrency, thread_name_prefix="keytrail-s3") as pool:
            jobs = self._plan(client, days, checkpoints, backfill, states, counts, batch)
            fetch = functools.partial(self._fetch, client)
            for job, fetched in _in_order(pool, jobs, fetch, concurrency):
                self._finish(job, fetched, backfill, reader, counts, batch)

        new_states = {partition: new for partition, (old, new) in states.items() if new != old}
        batch.result = merge_results([reader.finish(), counts.extra])
        if counts.failed_objects > _MAX_OBJECT_PROBLEMS:
            hidden = counts.failed_objects - _MAX_OBJECT_PROBLEMS
            batch.problems.append(f"{hidden} more objects could not be read; see the log")
        if not backfill:
            self._set_checkpoints(batch, checkpoints, new_states, counts, today)
        logger.info(
            "source %s: %s objects listed in %s days, %s already read, %s read",
            self.name,
            batch.files_listed,
            len(days),
            batch.files_unchanged,
            batch.result.files,
        )
        return batch

    def _days(
        self,
        checkpoints: Mapping[str, Any],
        today: date,
        since: datetime | None,
        until: datetime | None,
    ) -> list[date]:
        """Return the days to list, oldest first."""
        if since is not None or until is not None:
            end = (until or self._clock()).astimezone(UTC)
            # The window ends before ``until``. The day after it contains the files delivered
            # after midnight, which contain events from before it.
            last = min((end - timedelta(microseconds=1)).date() + timedelta(days=1), today)
            first = since.astimezone(UTC).date() if since is not None else last
            return _day_range(first, last)

        first = today - timedelta(days=self.settings.lookback_days)
        stored = _parse_day(checkpoints.get(LIST_FROM_KEY))
        if stored is not None:
            first = min(first, stored)
        elif self.settings.start_date is not None:
            first = min(self.settings.start_date, today)
        return _day_range(first, today)

    def _client(self) -> Any:
        config = Config(
            retries={"mode": "standard", "total_max_attempts": self.settings.max_attempts},
            max_pool_connections=self.settings.max_concurrency,
            connect_timeout=10,
            read_timeout=60,
            user_agent_extra="keytrail",
        )
        try:
            return _new_session().client(
                "s3",
                region_name=self.settings.region_name,
                endpoint_url=self.settings.endpoint_url,
                config=config,
            )
        except (BotoCoreError, ValueError) as exc:
            # An invalid region name or endpoint URL, or an unreadable AWS config file.
            raise SourceError(
                self.name,
                f"creating the S3 client failed: {type(exc).__name__}: {exc}",
                "check region_name and endpoint_url, and the AWS config file",
            ) from exc

    def _partitions(
        self, client: Any, days: list[date], batch: SourceBatch
    ) -> Iterator[_Partition]:
        """Yield every (account, region, day) partition to list, discovering what is not set."""
        accounts = self.settings.accounts or self._discover_accounts(client, batch)
        for account in accounts:
            regions = self.settings.regions or self._list_folders(
                client, f"{self._base}{account}/CloudTrail/"
            )
            for region in regions:
                for day in days:
                    yield _Partition(account, region, day)

    def _discover_accounts(self, client: Any, batch: SourceBatch) -> list[str]:
        folders = self._list_folders(client, self._base)
        accounts = [folder for folder in folders if _ACCOUNT.match(folder)]
        organizations = [folder for folder in folders if folder.startswith("o-")]
        if not accounts:
            where = f"s3://{self.settings.bucket}/{self._base}"
            note = f"no account folders found under {where}"
            if organizations and not self.settings.organization_id:
                note += (
                    f"; it contains organization trail folders ({', '.join(organizations)}): "
                    "set organization_id to read them"
                )
            batch.notes.append(note)
        return accounts

    def _list_folders(self, client: Any, prefix: str) -> list[str]:
        """Return the names of the folders directly under ``prefix``."""
        folders = []
        for page in self._pages(client, prefix, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                folders.append(common["Prefix"][len(prefix) :].rstrip("/"))
        return folders

    def _list_objects(self, client: Any, partition: _Partition) -> list[_Object]:
        prefix = (
            f"{self._base}{partition.account}/CloudTrail/{partition.region}/"
            f"{partition.day:%Y/%m/%d}/"
        )
        objects = []
        for page in self._pages(client, prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    etag = str(item.get("ETag", "")).strip('"')
                    objects.append(_Object(item["Key"], etag, int(item.get("Size", 0))))
        return objects

    def _pages(self, client: Any, prefix: str, delimiter: str | None = None) -> Iterator[Any]:
        """Yield the ListObjectsV2 pages under ``prefix``.

        Raises:
            SourceError: the listing failed after botocore's retries.
        """
        arguments = {"Bucket": self.settings.bucket, "Prefix": prefix}
        if delimiter:
            arguments["Delimiter"] = delimiter
        try:
            yield from client.get_paginator("list_objects_v2").paginate(**arguments)
        except (ClientError, BotoCoreError) as exc:
            raise self._listing_error(prefix, exc) from exc

    def _listing_error(self, prefix: str, exc: ClientError | BotoCoreError) -> SourceError:
        bucket = self.settings.bucket
        where = f"s3://{bucket}/{prefix}"
        if isinstance(exc, NoCredentialsError):
            return SourceError(
                self.name,
                f"listing {where} failed: no AWS credentials found",
                "set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run with an "
                "instance, task or pod role",
            )
        if isinstance(exc, BotoCoreError):
            return SourceError(
                self.name,
                f"listing {where} failed: {type(exc).__name__}: {exc}",
                "check network access to S3 (and endpoint_url if set); the next run reads "
                "from the same checkpoints",
            )
        code, status = _error_code(exc)
        reason = f"ListObjectsV2 on {where} failed: {code} (HTTP {status})"
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            hint = (
                f"grant s3:ListBucket on arn:aws:s3:::{bucket} with an s3:prefix condition "
                f"that allows '{self._base}*'"
            )
        elif code == "NoSuchBucket":
            hint = f"bucket {bucket} does not exist: check sources[].bucket"
        elif code in _CREDENTIAL_CODES:
            hint = "the AWS credentials are invalid or expired; refresh them"
        elif code in _THROTTLING_CODES or status >= 500:
            hint = (
                f"S3 throttled or failed the request {self.settings.max_attempts} times; "
                "the next run reads from the same checkpoints"
            )
        else:
            hint = ""
        return SourceError(self.name, reason, hint)

    def _plan(
        self,
        client: Any,
        days: list[date],
        checkpoints: Mapping[str, Any],
        backfill: bool,
        states: dict[_Partition, tuple[_PartitionState, _PartitionState]],
        counts: _RunCounts,
        batch: SourceBatch,
    ) -> Iterator[_Job]:
        """List every partition and yield the objects to fetch.

        Digest objects and objects over ``max_object_bytes`` are settled here without a GET.
        ``states`` receives each partition's stored and new checkpoint value. The new value
        keeps only the names still listed, so it shrinks when a lifecycle rule deletes objects.

        Raises:
            SourceError: a listing failed.
        """
        for partition in self._partitions(client, days, batch):
            objects = self._list_objects(client, partition)
            old = _PartitionState.from_checkpoint(checkpoints.get(partition.key))
            listed = {obj.name for obj in objects}
            state = _PartitionState(
                {name: etag for name, etag in old.objects.items() if name in listed},
                {name: count for name, count in old.attempts.items() if name in listed},
            )
            states[partition] = (old, state)
            for obj in objects:
                batch.files_listed += 1
                if not backfill and state.objects.get(obj.name) == obj.etag:
                    batch.files_unchanged += 1
                elif _DIGEST_MARKER in obj.key:
                    counts.extra.skipped["digest"] += 1
                    state.objects[obj.name] = obj.etag
                elif obj.size > self.settings.max_object_bytes:
                    origin = f"s3://{self.settings.bucket}/{obj.key}"
                    self._quarantine_large(origin, f"{obj.size} bytes as stored", counts)
                    state.objects[obj.name] = obj.etag
                else:
                    yield _Job(partition, obj, state, f"s3://{self.settings.bucket}/{obj.key}")

    def _fetch(self, client: Any, job: _Job) -> bytes | Exception:
        """GET one object and return its content, or the error that ended the read.

        Runs on a pool thread: boto3 clients are thread-safe, but nothing else is touched here.
        """
        settings = self.settings
        try:
            response = client.get_object(Bucket=settings.bucket, Key=job.obj.key)
            return _read_body(
                response["Body"].iter_chunks(_CHUNK_BYTES),
                settings.max_object_bytes,
                settings.max_uncompressed_bytes,
            )
        except (_TooLarge, _Corrupt, ClientError, BotoCoreError) as exc:
            return exc

    def _finish(
        self,
        job: _Job,
        fetched: bytes | Exception,
        backfill: bool,
        reader: BatchReader,
        counts: _RunCounts,
        batch: SourceBatch,
    ) -> None:
        """Add a fetched object to ``reader``, or record why it was not read."""
        if isinstance(fetched, bytes):
            reader.add(fetched, job.origin)
            done = True
        elif isinstance(fetched, _TooLarge):
            self._quarantine_large(job.origin, str(fetched), counts)
            done = True
        elif isinstance(fetched, _Corrupt):
            done = self._corrupt(job, str(fetched), backfill, counts, batch)
        else:
            self._get_failed(job.origin, fetched, counts, batch)
            done = False
        if done:
            job.state.objects[job.obj.name] = job.obj.etag
            job.state.attempts.pop(job.obj.name, None)
        else:
            counts.unfinished_days.add(job.partition.day)

    def _quarantine_large(self, origin: str, size: str, counts: _RunCounts) -> None:
        detail = (
            f"object is over the size limit ({size}; max_object_bytes "
            f"{self.settings.max_object_bytes}, max_uncompressed_bytes "
            f"{self.settings.max_uncompressed_bytes}); it is not read again"
        )
        logger.warning("source %s: quarantined %s: %s", self.name, origin, detail)
        counts.extra.files += 1
        counts.extra.quarantined.append(Quarantined(origin, TOO_LARGE, detail))

    def _corrupt(
        self, job: _Job, reason: str, backfill: bool, counts: _RunCounts, batch: SourceBatch
    ) -> bool:
        """Count a failed read of a corrupt gzip; True once it is quarantined."""
        origin = job.origin
        limit = self.settings.quarantine_after_attempts
        attempts = job.state.attempts.get(job.obj.name, 0) + 1
        if backfill or attempts < limit:
            if not backfill:
                job.state.attempts[job.obj.name] = attempts
            batch.problems.append(
                f"{origin}: {reason} (attempt {attempts} of {limit}); read again next run"
            )
            logger.warning("source %s: %s: %s, attempt %s", self.name, origin, reason, attempts)
            return False
        detail = f"{reason}; quarantined after {attempts} failed reads"
        logger.warning("source %s: quarantined %s: %s", self.name, origin, detail)
        counts.extra.files += 1
        counts.extra.quarantined.append(Quarantined(origin, "unreadable_file", detail))
        return True

    def _get_failed(
        self, origin: str, exc: Exception, counts: _RunCounts, batch: SourceBatch
    ) -> None:
        if isinstance(exc, ClientError):
            code, status = _error_code(exc)
            reason = f"GetObject failed: {code} (HTTP {status})"
            if code == "AccessDenied" or status == 403:
                reason += (
                    f"; grant s3:GetObject on arn:aws:s3:::{self.settings.bucket}/"
                    f"{self._base}*, and kms:Decrypt on the trail's KMS key if the bucket "
                    "uses SSE-KMS"
                )
        else:
            reason = f"GetObject failed: {type(exc).__name__}: {exc}"
        logger.warning("source %s: cannot read %s: %s", self.name, origin, reason)
        counts.failed_objects += 1
        if counts.failed_objects <= _MAX_OBJECT_PROBLEMS:
            batch.problems.append(f"{origin}: {reason}; read again next run")

    def _set_checkpoints(
        self,
        batch: SourceBatch,
        checkpoints: Mapping[str, Any],
        new_states: Mapping[_Partition, _PartitionState],
        counts: _RunCounts,
        today: date,
    ) -> None:
        """Fill the batch's checkpoint changes after a run that was not a backfill."""
        list_from = min(
            [today - timedelta(days=self.settings.lookback_days), *counts.unfinished_days]
        )
        if checkpoints.get(LIST_FROM_KEY) != list_from.isoformat():
            batch.checkpoints[LIST_FROM_KEY] = list_from.isoformat()
        for partition, state in new_states.items():
            if partition.day >= list_from:
                batch.checkpoints[partition.key] = state.to_checkpoint()
        for key in checkpoints:
            match = _PARTITION_KEY.match(key)
            if match is not None and date.fromisoformat(match.group(3)) < list_from:
                batch.checkpoints_removed.append(key)


def _in_order(
    pool: ThreadPoolExecutor,
    jobs: Iterable[_Job],
    work: Callable[[_Job], bytes | Exception],
    window: int,
) -> Iterator[tuple[_Job, bytes | Exception]]:
    """Run ``work`` on the jobs in ``pool`` and yield the results in job order.

    At most ``window`` jobs are submitted ahead of the one being yielded, which bounds the
    object contents held in memory at once.
    """
    pending: deque[tuple[_Job, Future[bytes | Exception]]] = deque()
    for job in jobs:
        pending.append((job, pool.submit(work, job)))
        if len(pending) >= window:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def _read_body(chunks: Iterable[bytes], max_stored: int, max_uncompressed: int) -> bytes:
    """Return an object's content, gunzipped when it starts with the gzip magic bytes.

    Raises:
        _TooLarge: the stored or decompressed size is over its limit.
        _Corrupt: the gzip stream is truncated or invalid.
    """
    iterator = iter(chunks)
    stored = 0
    first = b""
    for chunk in iterator:
        stored += len(chunk)
        first = chunk
        if chunk:
            break
    if first[:2] != _GZIP_MAGIC:
        limit = min(max_stored, max_uncompressed)
        parts = [first]
        for chunk in iterator:
            stored += len(chunk)
            if stored > limit:
                break
            parts.append(chunk)
        if stored > limit:
            raise _TooLarge(f"more than {limit} bytes, not compressed")
        return b"".join(parts)

    def counted() -> Iterator[bytes]:
        nonlocal stored
        yield first
        for chunk in iterator:
            stored += len(chunk)
            if stored > max_stored:
                raise _TooLarge(f"more than {max_stored} bytes as stored")
            yield chunk

    return _gunzip_capped(counted(), max_uncompressed)


def _gunzip_capped(chunks: Iterable[bytes], limit: int) -> bytes:
    """Decompress every gzip member in ``chunks``, stopping as soon as the output passes ``limit``.

    ``max_length`` bounds each step's output, so the memory used stays near ``limit`` whatever
    the compression ratio. The CRC-32 and size in each member's trailer are checked by zlib.

    Raises:
        _TooLarge: the content decompresses to more than ``limit`` bytes.
        _Corrupt: the stream is not gzip, is cut off, or fails its check.
    """
    output = bytearray()
    decompressor = zlib.decompressobj(wbits=31)
    started = False
    try:
        for chunk in chunks:
            data = chunk
            while data:
                if decompressor.eof:
                    # Zero bytes after a member are padding, which gzip(1) and Python's gzip
                    # module skip as well.
                    data = data.lstrip(b"\x00")
                    if not data:
                        break
                    # Another gzip member follows; CloudTrail writes one, but gzip allows several.
                    decompressor = zlib.decompressobj(wbits=31)
                started = True
                output += decompressor.decompress(data, limit + 1 - len(output))
                if len(output) > limit:
                    raise _TooLarge(f"more than {limit} bytes after gunzip")
                data = (
                    decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
                )
    except zlib.error as exc:
        raise _Corrupt(f"invalid gzip data: {exc}") from exc
    if not started or not decompressor.eof:
        raise _Corrupt(f"truncated gzip: the stream ends after {len(output)} decompressed bytes")
    return bytes(output)


def _error_code(exc: ClientError) -> tuple[str, int]:
    """Return the AWS error code and HTTP status of a failed call."""
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code") or status or "unknown"), status


def _day_range(first: date, last: date) -> list[date]:
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def _parse_day(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None
