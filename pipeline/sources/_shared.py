"""Small helpers the cloud sources share: UTC times in the forms the APIs speak, and boto3
sessions that reuse one copy of botocore's service models."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.session
import pandas as pd
from botocore.loaders import Loader

__all__ = ["as_utc", "new_aws_session", "parse_rfc3339", "rfc3339", "utc_now"]


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
