"""Findings for the alerting tests, written from the findings-frame contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from detectors.base import Detector, HistoryView, build_findings


class _FakeTravel(Detector):
    id = "keytrail.impossible_travel"
    mitre = ("T1078.004",)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        raise NotImplementedError


class _FakeOffHours(Detector):
    id = "keytrail.off_hours"
    mitre = ("T1555.006",)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        raise NotImplementedError


class _FakeBurst(Detector):
    id = "keytrail.failure_burst"
    mitre = ("T1110", "T1555.006")

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        raise NotImplementedError


DETECTORS = {"travel": _FakeTravel(), "off_hours": _FakeOffHours(), "burst": _FakeBurst()}


def travel_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "severity": "high",
        "title": "alice read prod/db from Berlin and New York 1.5 hours apart",
        "principal": "arn:aws:sts::123456789012:assumed-role/Admin/alice",
        "principal_type": "role",
        "cloud": "aws",
        "account": "123456789012",
        "resources": ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf"],
        "source_ips": ["198.51.100.7", "203.0.113.9"],
        "countries": ["DE", "US"],
        "first_seen": pd.Timestamp("2026-10-10T01:12:00Z"),
        "last_seen": pd.Timestamp("2026-10-10T02:42:30.250Z"),
        "event_uids": ["ev-1", "ev-2"],
        "evidence": {
            "from": {"city": "Berlin", "country": "DE", "ip": "198.51.100.7"},
            "to": {"city": "New York", "country": "US", "ip": "203.0.113.9"},
            "distance_km": 6385,
            "hours": 1.5,
            "speed_kmh": 4257,
        },
        "baseline": {"countries_30d": ["DE"], "summary": "30-day: read only from DE"},
        "geoip_build_date": "2026-09-01",
    }
    row.update(overrides)
    return row


def off_hours_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "severity": "medium",
        "title": "bob read 3 secrets at 03:12 local time",
        "principal": "bob@example.com",
        "principal_type": "user",
        "cloud": "gcp",
        "account": "shop-prod",
        "resources": ["projects/shop-prod/secrets/db-password"],
        "source_ips": ["192.0.2.10"],
        "countries": ["DE"],
        "first_seen": pd.Timestamp("2026-10-10T01:12:00Z"),
        "last_seen": pd.Timestamp("2026-10-10T01:20:00Z"),
        "event_uids": ["g-1", "g-2", "g-3"],
        "evidence": {
            "local_time": "2026-10-10 03:12 Europe/Berlin",
            "business_hours": "08:00-19:00 Mon-Fri",
            "reads": 3,
        },
        "baseline": {"summary": "30-day: read on 22 days, all between 08:00 and 18:00 local"},
    }
    row.update(overrides)
    return row


def burst_row(**overrides: Any) -> dict[str, Any]:
    """Return a failure burst from one address across three Azure principals (no principal)."""
    row: dict[str, Any] = {
        "severity": "high",
        "title": "12 failed secret accesses by source IP 203.0.113.66 in 5 min",
        "principal": None,
        "principal_type": None,
        "cloud": "azure",
        "account": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        "resources": ["https://kv-pay.vault.azure.net/secrets/ledger-key"],
        "source_ips": ["203.0.113.66"],
        "countries": ["NL"],
        "first_seen": pd.Timestamp("2026-10-29T21:40:00Z"),
        "last_seen": pd.Timestamp("2026-10-29T21:45:00Z"),
        "event_uids": [f"b-{n}" for n in range(12)],
        "evidence": {
            "key": "source_ip",
            "key_value": "203.0.113.66",
            "failures": 12,
            "principals": ["mi-batch", "mi-web", "svc-reports"],
            "success_after": None,
            "locations": [{"ip": "203.0.113.66", "city": "Amsterdam", "country": "NL"}],
        },
        "baseline": {"summary": "7-day median 0 failures/day; this burst 12"},
    }
    row.update(overrides)
    return row


@pytest.fixture
def make_findings() -> Callable[..., pd.DataFrame]:
    """Return a builder: ``make_findings(row, ..., detector="travel")`` -> findings frame."""

    def build(*rows: dict[str, Any], detector: str = "travel") -> pd.DataFrame:
        return build_findings(list(rows), detector=DETECTORS[detector])

    return build
