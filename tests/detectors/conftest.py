"""Fixtures for detector tests: real-shaped events frames built from short row specs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import count
from typing import Any

import pandas as pd
import pytest

from detectors.base import FrameHistory
from pipeline.schema import events_from_rows

# Cities with the coordinates a GeoIP city database returns for them.
CITIES: dict[str, dict[str, Any]] = {
    "berlin": {"geo_country": "DE", "geo_city": "Berlin", "geo_lat": 52.52, "geo_lon": 13.405},
    "frankfurt": {
        "geo_country": "DE",
        "geo_city": "Frankfurt am Main",
        "geo_lat": 50.11,
        "geo_lon": 8.682,
    },
    "tokyo": {"geo_country": "JP", "geo_city": "Tokyo", "geo_lat": 35.6895, "geo_lon": 139.6917},
    "new_york": {
        "geo_country": "US",
        "geo_city": "New York",
        "geo_lat": 40.7128,
        "geo_lon": -74.006,
    },
    "san_francisco": {
        "geo_country": "US",
        "geo_city": "San Francisco",
        "geo_lat": 37.7749,
        "geo_lon": -122.4194,
    },
    "moscow": {"geo_country": "RU", "geo_city": "Moscow", "geo_lat": 55.7558, "geo_lon": 37.6173},
    "sao_paulo": {
        "geo_country": "BR",
        "geo_city": "São Paulo",
        "geo_lat": -23.5505,
        "geo_lon": -46.6333,
    },
}

ALICE = "alice@example.com"
DEPLOY_ROLE = "arn:aws:iam::111122223333:role/ci-deploy"
ACCOUNT = "111122223333"


def aws_read(
    time: str | pd.Timestamp,
    principal: str = ALICE,
    *,
    secret: str = "prod/db/password",
    city: str | None = None,
    ip: str | None = "203.0.113.10",
    **fields: Any,
) -> dict[str, Any]:
    """Return one Secrets Manager GetSecretValue row; ``fields`` override any column."""
    row: dict[str, Any] = {
        "time": time,
        "cloud": "aws",
        "log_format": "cloudtrail",
        "service": "secretsmanager",
        "operation": "GetSecretValue",
        "action": "read",
        "outcome": "success",
        "principal": principal,
        "principal_type": "federated" if "@" in principal else "role",
        "account": ACCOUNT,
        "region": "eu-central-1",
        "resource": f"arn:aws:secretsmanager:eu-central-1:{ACCOUNT}:secret:{secret}",
        "source_ip": ip,
        "source_kind": "public",
        "source_raw": ip,
        "user_agent": "aws-cli/2.15.0",
        "origin": "fixture",
    }
    if city is not None:
        row.update(CITIES[city])
    row.update(fields)
    return row


def aws_denied(time: str | pd.Timestamp, principal: str = ALICE, **fields: Any) -> dict[str, Any]:
    """Return one GetSecretValue row that failed with AccessDeniedException."""
    denied = {
        "outcome": "failure",
        "failure_reason": "denied",
        "error_code": "AccessDeniedException",
        "error_message": "User is not authorized to perform secretsmanager:GetSecretValue",
    }
    return aws_read(time, principal, **(denied | fields))


@pytest.fixture
def make_events() -> Callable[[Iterable[dict[str, Any]]], pd.DataFrame]:
    """Return a builder that turns rows into a typed events frame with unique event uids."""
    serial = count(1)

    def build(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
        completed = []
        for row in rows:
            row = dict(row)
            row.setdefault("event_uid", f"evt-{next(serial):06d}")
            completed.append(row)
        return events_from_rows(completed)

    return build


NOW = pd.Timestamp("2024-06-30T23:59:00Z")


class CategoricalRollupHistory(FrameHistory):
    """A frame history whose rollup has Categorical text keys, as the Parquet store gives."""

    def rollup(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        rolled = super().rollup(since=since, until=until, columns=columns)
        text = [name for name in rolled.columns if rolled[name].dtype == "string"]
        return rolled.astype({name: "category" for name in text})
