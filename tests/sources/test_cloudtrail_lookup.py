"""Tests of the LookupEvents source against a local CloudTrail JSON 1.1 server on 127.0.0.1."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import settings_from_mapping
from pipeline.engine import run_once
from pipeline.sources import SourceError
from pipeline.sources.cloudtrail_lookup import CloudTrailLookupSettings, CloudTrailLookupSource
from pipeline.store.state import State
from tests.sources.aws_cloudtrail_server import (
    LookupRequest,
    LookupServer,
    lookup_event,
    lookup_server,
)
from tests.sources.aws_records import kms_decrypt, parameter_read, secret_read
from tests.sources.moto_server import aws_env_fixture  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("aws_env")

NOW = datetime(2026, 10, 6, 12, 0, tzinfo=UTC)
SECRETS = "secretsmanager.amazonaws.com"
SSM = "ssm.amazonaws.com"
KMS = "kms.amazonaws.com"


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def secret_event(number: int, moment: datetime) -> dict[str, Any]:
    return lookup_event(secret_read(number, time=iso(moment)), moment)


def uid(number: int) -> str:
    return f"7d3e0000-0000-4000-8000-{number:012d}"


def account_events(region: str = "eu-west-1") -> list[dict[str, Any]]:
    """Five Secrets Manager reads, one SSM read, one KMS decrypt and one EC2 call."""
    events = [secret_event(n, NOW - timedelta(hours=n)) for n in range(1, 6)]
    events.append(
        lookup_event(
            parameter_read(6, time=iso(NOW - timedelta(minutes=30)), region=region),
            NOW - timedelta(minutes=30),
        )
    )
    events.append(
        lookup_event(
            kms_decrypt(7, time=iso(NOW - timedelta(minutes=45)), region=region),
            NOW - timedelta(minutes=45),
        )
    )
    ec2 = secret_read(8, time=iso(NOW - timedelta(minutes=10)))
    ec2["eventSource"] = "ec2.amazonaws.com"
    ec2["eventName"] = "DescribeInstances"
    events.append(lookup_event(ec2, NOW - timedelta(minutes=10)))
    return events


def make_source(url: str, fake: FakeTime, **settings: Any) -> CloudTrailLookupSource:
    values: dict[str, Any] = {
        "name": "lookup",
        "regions": ["eu-west-1"],
        "endpoint_url": url,
        **settings,
    }
    return CloudTrailLookupSource(
        CloudTrailLookupSettings(**values),
        clock=lambda: NOW,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
    )


def uids(batch: Any) -> list[str]:
    return sorted(set(batch.result.events["event_uid"].tolist()))


# Settings


def test_settings_reject_rate_above_api_limit() -> None:
    with pytest.raises(ValidationError) as caught:
        CloudTrailLookupSettings(name="lookup", regions=["eu-west-1"], requests_per_second=5)
    assert "requests_per_second" in str(caught.value)
    assert "less than or equal to 2" in str(caught.value)


def test_settings_reject_bad_region() -> None:
    with pytest.raises(ValidationError) as caught:
        CloudTrailLookupSettings(name="lookup", regions=["eu-west-1", "Frankfurt"])
    assert "expected region names such as eu-west-1; invalid: Frankfurt" in str(caught.value)


def test_settings_default_event_sources() -> None:
    settings = CloudTrailLookupSettings(name="lookup", regions=["eu-west-1"])
    assert settings.event_sources == [SECRETS, SSM, KMS]


# Reading


def test_pages_followed_to_end() -> None:
    fake = FakeTime()
    server = LookupServer({"eu-west-1": account_events()}, page_size=2)

    with lookup_server(server):
        batch = make_source(server.url, fake).read({})

    assert batch.problems == []
    assert batch.files_listed == 5
    assert uids(batch) == [uid(n) for n in range(1, 8)]
    assert batch.result.records == 7
    assert [(r.event_source, r.token is not None) for r in server.requests] == [
        (SECRETS, False),
        (SECRETS, True),
        (SECRETS, True),
        (SSM, False),
        (KMS, False),
    ]
    assert {r.attributes for r in server.requests} == {1}
    assert {r.region for r in server.requests} == {"eu-west-1"}
    assert {r.start for r in server.requests} == {(NOW - timedelta(days=1)).timestamp()}
    assert {r.end for r in server.requests} == {NOW.timestamp()}
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-10-06T11:30:00Z"}}


def test_rate_limit_spaces_calls() -> None:
    fake = FakeTime()
    call_times: list[float] = []

    def record_time(number: int, request: LookupRequest) -> str | None:
        call_times.append(fake.now)
        return None

    server = LookupServer({"eu-west-1": account_events()}, page_size=2, error=record_time)
    with lookup_server(server):
        make_source(server.url, fake).read({})

    gaps = [later - earlier for earlier, later in itertools.pairwise(call_times)]
    assert gaps == [0.5, 0.5, 0.5, 0.5]


def test_lower_rate_setting_spaces_more() -> None:
    fake = FakeTime()
    call_times: list[float] = []

    def record_time(number: int, request: LookupRequest) -> str | None:
        call_times.append(fake.now)
        return None

    server = LookupServer({"eu-west-1": account_events()}, error=record_time)
    with lookup_server(server):
        make_source(server.url, fake, requests_per_second=0.5).read({})

    assert [b - a for a, b in itertools.pairwise(call_times)] == [2.0, 2.0]


def test_throttling_retried_with_backoff() -> None:
    fake = FakeTime()

    def throttle_second_and_third(number: int, request: LookupRequest) -> str | None:
        return "ThrottlingException" if number in (2, 3) else None

    server = LookupServer(
        {"eu-west-1": account_events()}, page_size=2, error=throttle_second_and_third
    )
    with lookup_server(server):
        batch = make_source(server.url, fake).read({})

    assert batch.problems == []
    assert len(server.requests) == 7
    assert uids(batch) == [uid(n) for n in range(1, 8)]
    backoffs = [s for s in fake.sleeps if s != 0.5]
    assert len(backoffs) == 2
    assert 0.5 <= backoffs[0] <= 1.0
    assert 1.0 <= backoffs[1] <= 2.0
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-10-06T11:30:00Z"}}


def test_throttled_region_keeps_checkpoint() -> None:
    fake = FakeTime()

    def throttle_us(number: int, request: LookupRequest) -> str | None:
        return "ThrottlingException" if request.region == "us-east-1" else None

    server = LookupServer(
        {
            "eu-west-1": [secret_event(1, NOW - timedelta(hours=1))],
            "us-east-1": [secret_event(2, NOW - timedelta(hours=2))],
        },
        error=throttle_us,
    )
    checkpoints = {"us-east-1": {"newest_event_time": "2026-10-06T08:00:00Z"}}
    with lookup_server(server):
        batch = make_source(
            server.url, fake, regions=["eu-west-1", "us-east-1"], max_attempts=3
        ).read(checkpoints)

    assert uids(batch) == [uid(1)]
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-10-06T11:00:00Z"}}
    assert batch.problems == [
        "region us-east-1: LookupEvents in us-east-1 failed: ThrottlingException (HTTP 400) "
        "after 3 attempts; the region is throttled or unavailable; the next run reads from the "
        "same checkpoint (lower requests_per_second if other tools share the limit)"
    ]
    assert len([r for r in server.requests if r.region == "us-east-1"]) == 3


def test_region_cut_short_returns_no_events() -> None:
    fake = FakeTime()

    def fail_third_page(number: int, request: LookupRequest) -> str | None:
        return "InternalFailure" if number == 3 else None

    server = LookupServer(
        {
            "eu-west-1": [secret_event(n, NOW - timedelta(hours=n)) for n in range(1, 6)],
            "us-east-1": [secret_event(9, NOW - timedelta(hours=1))],
        },
        page_size=2,
        error=fail_third_page,
    )
    with lookup_server(server):
        batch = make_source(
            server.url,
            fake,
            regions=["eu-west-1", "us-east-1"],
            max_attempts=1,
            event_sources=[SECRETS],
        ).read({})

    assert uids(batch) == [uid(9)]
    assert list(batch.checkpoints) == ["us-east-1"]
    assert batch.problems == [
        "region eu-west-1: LookupEvents in eu-west-1 failed: InternalFailure (HTTP 500); the "
        "region is throttled or unavailable; the next run reads from the same checkpoint "
        "(lower requests_per_second if other tools share the limit)"
    ]


def test_every_region_failing_raises() -> None:
    fake = FakeTime()
    server = LookupServer({}, error=lambda number, request: "AccessDeniedException")

    with lookup_server(server), pytest.raises(SourceError) as caught:
        make_source(server.url, fake).read({})

    assert caught.value.source == "lookup"
    assert (
        caught.value.reason == "LookupEvents in eu-west-1 failed: AccessDeniedException (HTTP 400)"
    )
    assert (
        caught.value.hint == "grant cloudtrail:LookupEvents (resource *) to keytrail's role or user"
    )
    assert len(server.requests) == 1


def test_start_is_checkpoint_minus_lookback() -> None:
    fake = FakeTime()
    events = [
        secret_event(1, NOW - timedelta(minutes=90)),
        secret_event(2, NOW - timedelta(minutes=70)),
        secret_event(3, NOW - timedelta(minutes=30)),
    ]
    server = LookupServer({"eu-west-1": events})
    checkpoints = {"eu-west-1": {"newest_event_time": "2026-10-06T11:00:00Z"}}

    with lookup_server(server):
        batch = make_source(server.url, fake, event_sources=[SECRETS]).read(checkpoints)

    assert [r.start for r in server.requests] == [
        datetime(2026, 10, 6, 10, 40, tzinfo=UTC).timestamp()
    ]
    assert uids(batch) == [uid(2), uid(3)]
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-10-06T11:30:00Z"}}


def test_no_newer_event_keeps_checkpoint() -> None:
    fake = FakeTime()
    server = LookupServer({"eu-west-1": [secret_event(1, NOW - timedelta(minutes=50))]})
    checkpoints = {"eu-west-1": {"newest_event_time": "2026-10-06T11:10:00Z"}}

    with lookup_server(server):
        batch = make_source(server.url, fake, event_sources=[SECRETS]).read(checkpoints)

    assert uids(batch) == [uid(1)]
    assert batch.checkpoints == {}


def test_backfill_capped_at_retention() -> None:
    fake = FakeTime()
    server = LookupServer({"eu-west-1": [secret_event(1, NOW - timedelta(days=3))]})

    with lookup_server(server):
        batch = make_source(server.url, fake, event_sources=[SECRETS]).read(
            {"eu-west-1": {"newest_event_time": "2026-10-06T11:00:00Z"}},
            since=NOW - timedelta(days=100),
            until=NOW - timedelta(days=2),
        )

    assert [r.start for r in server.requests] == [(NOW - timedelta(days=90)).timestamp()]
    assert [r.end for r in server.requests] == [(NOW - timedelta(days=2)).timestamp()]
    assert uids(batch) == [uid(1)]
    assert batch.checkpoints == {}
    assert batch.notes == [
        "region eu-west-1: LookupEvents keeps 90 days of events; events before "
        "2026-07-08T12:00:00Z cannot be read"
    ]


def test_invalid_cloudtrail_event_quarantined() -> None:
    fake = FakeTime()
    broken = secret_event(1, NOW - timedelta(hours=1))
    broken["CloudTrailEvent"] = '{"eventVersion": "1.09", '
    server = LookupServer({"eu-west-1": [broken, secret_event(2, NOW - timedelta(hours=2))]})

    with lookup_server(server):
        batch = make_source(server.url, fake, event_sources=[SECRETS]).read({})

    assert uids(batch) == [uid(2)]
    assert [(q.origin, q.reason) for q in batch.result.quarantined] == [
        (f"cloudtrail:LookupEvents eu-west-1 {SECRETS} page 1 Events[1]", "invalid_json")
    ]


# Through the engine


def test_run_once_stores_events_and_checkpoint(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    events = [secret_event(n, now - timedelta(minutes=10 * n)) for n in range(1, 4)]
    server = LookupServer({"eu-west-1": events}, page_size=2)

    with lookup_server(server):
        data: dict[str, Any] = {
            "state_dir": "state",
            "output_dir": "out",
            "sources": [
                {
                    "name": "lookup",
                    "type": "cloudtrail_lookup",
                    "regions": ["eu-west-1"],
                    "event_sources": [SECRETS],
                    "endpoint_url": server.url,
                }
            ],
            "enrich": {"geoip": {"enabled": False}},
            "detectors": {},
            "alerting": {"console": False, "outbox": False},
        }
        settings = settings_from_mapping(data, base_dir=tmp_path)
        summary = run_once(settings)

    assert summary.problems == []
    assert [(s.name, s.files_listed, s.records, s.events) for s in summary.sources] == [
        ("lookup", 2, 3, 3)
    ]
    assert summary.events_new == 3
    assert summary.history_rows_written == 3
    with State(settings.state_dir / "state.db") as state:
        assert state.checkpoints("lookup") == {
            "eu-west-1": {"newest_event_time": iso(now - timedelta(minutes=10))}
        }
