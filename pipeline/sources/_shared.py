"""Small helpers the cloud sources share: UTC times in the forms the APIs speak, and boto3
sessions that reuse one copy of botocore's service models."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.session
import pandas as pd
from botocore.loaders import Loader

__all__ = [
    "as_utc",
    "checkpoint_time",
    "new_aws_session",
    "parse_rfc3339",
    "query_window",
    "rfc3339",
    "utc_now",
]


def utc_now() -> datetime:
    """Return the current time, UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; a naive value counts as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def rfc3339(value: datetime | pd.Timestamp) -> str:
    """Write a time as RFC 3339 in UTC with a ``Z``, keeping a Timestamp's nanoseconds.

    Cloud Logging filters and KQL's ``datetime()`` both read this form.
    """
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def parse_rfc3339(value: Any) -> pd.Timestamp | None:
    """Parse an RFC 3339 time with up to nine fractional digits; None unless it has a zone."""
    if not isinstance(value, str):
        return None
    try:
        stamp = pd.Timestamp(value)
    except ValueError:
        return None
    return None if stamp.tzinfo is None else stamp.tz_convert(UTC)


def checkpoint_time(value: Any) -> datetime | None:
    """Return the time of a ``{"timestamp": RFC 3339}`` checkpoint, or None if it is invalid."""
    stamp = parse_rfc3339(value.get("timestamp")) if isinstance(value, Mapping) else None
    return None if stamp is None else stamp.to_pydatetime(warn=False)


def query_window(
    last: datetime | None,
    now: datetime,
    since: datetime | None,
    until: datetime | None,
    *,
    initial: timedelta,
    lookback: timedelta,
) -> tuple[datetime, datetime]:
    """Return the [start, end) window of a time-cursor query.

    A backfill (``since``, ``until``) reads its window. Otherwise the query starts ``lookback``
    before the last checkpoint ``last`` (entries arrive late), or ``initial`` before the end
    when there is no checkpoint yet.
    """
    end = as_utc(until) if until is not None else now
    if since is not None:
        return as_utc(since), end
    if last is None:
        return end - initial, end
    return last - lookback, end


@functools.cache
def _data_loader() -> Loader:
    """Return one botocore data loader shared by every session.

    The loader caches the service models and endpoint rules, which take about 0.3 s to parse
    per session.
    """
    loader: Loader = botocore.session.get_session().get_component("data_loader")
    return loader


def new_aws_session() -> boto3.session.Session:
    """Return a new boto3 session that shares the cached service models.

    Each read builds a new session, so credentials are resolved again and a rotated key or a
    renewed SSO login is used by the next run.
    """
    core = botocore.session.Session()
    core.register_component("data_loader", _data_loader())
    return boto3.session.Session(botocore_session=core)
