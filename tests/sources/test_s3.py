"""Tests of the S3 CloudTrail source against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import ValidationError

from pipeline.config import settings_from_mapping
from pipeline.engine import run_once
from pipeline.sources import SourceBatch, SourceError
from pipeline.sources.s3 import (
    LIST_FROM_KEY,
    S3CloudTrailSettings,
    S3CloudTrailSource,
    _Corrupt,
    _gunzip_capped,
    _TooLarge,
)
from pipeline.store.state import State
from tests.sources.aws_proxy import fault_proxy, s3_error
from tests.sources.aws_records import (
    ACCOUNT,
    ORG_ID,
    OTHER_ACCOUNT,
    REGION,
    digest_document,
    digest_key,
    secret_read,
    trail_file,
    trail_key,
)
from tests.sources.moto_server import (  # noqa: F401 (fixtures)
    aws_env_fixture,
    moto_endpoint_fixture,
    moto_server_fixture,
)

BUCKET = "trail-bucket"
# The fixed clock of the tests that call the source directly.
NOW = datetime(2026, 10, 6, 12, 0, tzinfo=UTC)
TODAY = NOW.date()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def put(client: Any, key: str, body: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=body)


def source(endpoint: str, **settings: Any) -> S3CloudTrailSource:
    values: dict[str, Any] = {
        "name": "trail",
        "bucket": BUCKET,
        "endpoint_url": endpoint,
        "max_attempts": 1,
        **settings,
    }
    return S3CloudTrailSource(S3CloudTrailSettings(**values), clock=lambda: NOW)


def commit(checkpoints: Mapping[str, Any], batch: SourceBatch) -> dict[str, Any]:
    """Apply a batch's checkpoint changes as the engine's commit does."""
    updated = {**checkpoints, **batch.checkpoints}
    for key in batch.checkpoints_removed:
        updated.pop(key, None)
    return updated


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def event_time(day: date, hour: int) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00Z"


def uids(batch: SourceBatch) -> list[str]:
    return sorted(batch.result.events["event_uid"].tolist())


def uid(number: int) -> str:
    return f"7d3e0000-0000-4000-8000-{number:012d}"


# Settings


def test_settings_reject_bad_account() -> None:
    with pytest.raises(ValidationError) as caught:
        S3CloudTrailSettings(name="trail", bucket=BUCKET, accounts=["12345"])
    assert "an AWS account id is 12 digits; invalid: 12345" in str(caught.value)


def test_settings_reject_bad_region() -> None:
    with pytest.raises(ValidationError) as caught:
        S3CloudTrailSettings(name="trail", bucket=BUCKET, regions=["Ireland"])
    assert "expected region names such as eu-west-1; invalid: Ireland" in str(caught.value)


def test_settings_strip_prefix_slashes() -> None:
    settings = S3CloudTrailSettings(name="trail", bucket=BUCKET, prefix="/logs/trail/")
    assert settings.prefix == "logs/trail"


# Reading and checkpoints


def test_first_run_reads_lookback_days(s3: Any, moto_endpoint: str) -> None:
    for offset, number in ((0, 1), (2, 2), (3, 3)):
        day = TODAY - timedelta(days=offset)
        put(
            s3,
            trail_key(at(day, 10), f"A{number}"),
            trail_file(secret_read(number, time=event_time(day, 9))),
        )

    batch = source(moto_endpoint).read({})

    assert batch.problems == []
    assert batch.files_listed == 2
    assert batch.files_unchanged == 0
    assert uids(batch) == [uid(1), uid(2)]
    assert batch.checkpoints[LIST_FROM_KEY] == "2026-10-04"
    key = f"{ACCOUNT}/{REGION}/2026-10-06"
    name = trail_key(at(TODAY, 10), "A1").rsplit("/", 1)[1]
    assert list(batch.checkpoints[key]["objects"]) == [name]
    assert batch.checkpoints[key]["attempts"] == {}
    assert batch.checkpoints_removed == []


def test_start_date_reads_from_that_day(s3: Any, moto_endpoint: str) -> None:
    day = TODAY - timedelta(days=5)
    put(s3, trail_key(at(day, 10), "A1"), trail_file(secret_read(1, time=event_time(day, 9))))

    batch = source(moto_endpoint, start_date=day.isoformat()).read({})

    assert uids(batch) == [uid(1)]
    assert batch.checkpoints[LIST_FROM_KEY] == "2026-10-04"
    # The day read is older than the look-back, so no entry is kept for it.
    assert f"{ACCOUNT}/{REGION}/{day.isoformat()}" not in batch.checkpoints


def test_second_run_reads_nothing_new(s3: Any, moto_endpoint: str) -> None:
    put(s3, trail_key(at(TODAY, 10), "A1"), trail_file(secret_read(1, time=event_time(TODAY, 9))))
    trail = source(moto_endpoint)
    first = trail.read({})

    second = trail.read(commit({}, first))

    assert second.files_listed == 1
    assert second.files_unchanged == 1
    assert second.result.records == 0
    assert second.checkpoints == {}
    assert second.checkpoints_removed == []


def test_late_file_sorting_first_is_read(s3: Any, moto_endpoint: str) -> None:
    put(
        s3,
        trail_key(at(TODAY, 11, 5), "B1"),
        trail_file(secret_read(1, time=event_time(TODAY, 11))),
    )
    put(
        s3,
        trail_key(at(TODAY, 11, 10), "B2"),
        trail_file(secret_read(2, time=event_time(TODAY, 11))),
    )
    trail = source(moto_endpoint)
    checkpoints = commit({}, trail.read({}))
    # Delivered three hours late: its key names 08:05, so it sorts before both keys read.
    late_key = trail_key(at(TODAY, 8, 5), "A1")
    put(s3, late_key, trail_file(secret_read(3, time=event_time(TODAY, 8))))

    second = trail.read(checkpoints)

    assert second.files_listed == 3
    assert second.files_unchanged == 2
    assert uids(second) == [uid(3)]
    objects = second.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]
    assert len(objects) == 3
    assert late_key.rsplit("/", 1)[1] in objects


def test_many_objects_read_in_key_order(s3: Any, moto_endpoint: str) -> None:
    keys = [trail_key(at(TODAY, 10, number), f"A{number}") for number in range(1, 21)]
    for number, key in enumerate(keys, start=1):
        put(s3, key, trail_file(secret_read(number, time=event_time(TODAY, 9))))

    batch = source(moto_endpoint, max_concurrency=3).read({})

    assert batch.files_listed == 20
    assert batch.result.records == 20
    origins = [origin.split(" ", 1)[0] for origin in batch.result.events["origin"].tolist()]
    assert origins == [f"s3://{BUCKET}/{key}" for key in sorted(keys)]


def test_replaced_object_read_again(s3: Any, moto_endpoint: str) -> None:
    key = trail_key(at(TODAY, 10), "A1")
    put(s3, key, trail_file(secret_read(1, time=event_time(TODAY, 9))))
    trail = source(moto_endpoint)
    checkpoints = commit({}, trail.read({}))
    put(
        s3,
        key,
        trail_file(
            secret_read(1, time=event_time(TODAY, 9)), secret_read(2, time=event_time(TODAY, 9))
        ),
    )

    second = trail.read(checkpoints)

    assert second.files_unchanged == 0
    assert uids(second) == [uid(1), uid(2)]


def test_old_entries_removed_after_lookback(s3: Any, moto_endpoint: str) -> None:
    old_key = f"{ACCOUNT}/{REGION}/2026-10-01"
    kept_key = f"{ACCOUNT}/{REGION}/2026-10-04"
    checkpoints = {
        LIST_FROM_KEY: "2026-10-04",
        old_key: {"objects": {"x.json.gz": "abc"}, "attempts": {}},
        kept_key: {"objects": {}, "attempts": {}},
    }

    batch = source(moto_endpoint).read(checkpoints)

    assert batch.checkpoints_removed == [old_key]
    assert batch.checkpoints == {}


def test_downtime_gap_listed(s3: Any, moto_endpoint: str) -> None:
    day = TODAY - timedelta(days=6)
    put(s3, trail_key(at(day, 10), "A1"), trail_file(secret_read(1, time=event_time(day, 9))))
    # The last run was eight days ago: it stored list_from as its today minus two days.
    checkpoints = {LIST_FROM_KEY: (TODAY - timedelta(days=10)).isoformat()}

    batch = source(moto_endpoint).read(checkpoints)

    assert uids(batch) == [uid(1)]
    assert batch.checkpoints[LIST_FROM_KEY] == "2026-10-04"


def test_backfill_lists_window_days(s3: Any, moto_endpoint: str) -> None:
    for offset in range(1, 6):
        day = TODAY - timedelta(days=offset)
        put(
            s3,
            trail_key(at(day, 10), f"A{offset}"),
            trail_file(secret_read(offset, time=event_time(day, 9))),
        )
    trail = source(moto_endpoint)
    checkpoints = commit({}, trail.read({}))

    batch = trail.read(
        checkpoints, since=at(TODAY - timedelta(days=5), 0), until=at(TODAY - timedelta(days=3), 0)
    )

    # The window covers days -5 and -4; day -3 is listed for files delivered after midnight.
    assert batch.files_listed == 3
    assert batch.files_unchanged == 0
    assert uids(batch) == [uid(3), uid(4), uid(5)]
    assert batch.checkpoints == {}
    assert batch.checkpoints_removed == []


def test_prefix_and_configured_lists(s3: Any, moto_endpoint: str) -> None:
    put(
        s3,
        trail_key(at(TODAY, 10), "A1", prefix="logs/org"),
        trail_file(secret_read(1, time=event_time(TODAY, 9))),
    )
    put(
        s3,
        trail_key(at(TODAY, 10), "A2", prefix="logs/org", region="us-east-1"),
        trail_file(secret_read(2, time=event_time(TODAY, 9), region="us-east-1")),
    )

    batch = source(moto_endpoint, prefix="logs/org/", accounts=[ACCOUNT], regions=[REGION]).read({})

    assert uids(batch) == [uid(1)]
    assert batch.files_listed == 1


def test_accounts_and_regions_discovered(s3: Any, moto_endpoint: str) -> None:
    put(s3, trail_key(at(TODAY, 10), "A1"), trail_file(secret_read(1, time=event_time(TODAY, 9))))
    put(
        s3,
        trail_key(at(TODAY, 10), "A2", region="us-east-1"),
        trail_file(secret_read(2, time=event_time(TODAY, 9), region="us-east-1")),
    )
    put(
        s3,
        trail_key(at(TODAY, 10), "A3", account=OTHER_ACCOUNT),
        trail_file(secret_read(3, time=event_time(TODAY, 9), account=OTHER_ACCOUNT)),
    )

    batch = source(moto_endpoint).read({})

    assert uids(batch) == [uid(1), uid(2), uid(3)]
    assert sorted(key for key in batch.checkpoints if key != LIST_FROM_KEY) == [
        f"{ACCOUNT}/{REGION}/2026-10-06",
        f"{ACCOUNT}/us-east-1/2026-10-06",
        f"{OTHER_ACCOUNT}/{REGION}/2026-10-06",
    ]


def test_org_trail_layout_read(s3: Any, moto_endpoint: str) -> None:
    put(
        s3,
        trail_key(at(TODAY, 10), "A1", org_id=ORG_ID),
        trail_file(secret_read(1, time=event_time(TODAY, 9))),
    )
    put(
        s3,
        trail_key(at(TODAY, 10), "A2", org_id=ORG_ID, account=OTHER_ACCOUNT),
        trail_file(secret_read(2, time=event_time(TODAY, 9), account=OTHER_ACCOUNT)),
    )

    batch = source(moto_endpoint, organization_id=ORG_ID).read({})

    assert batch.problems == []
    assert batch.notes == []
    assert uids(batch) == [uid(1), uid(2)]
    assert sorted(batch.result.events["account"].tolist()) == [ACCOUNT, OTHER_ACCOUNT]
    assert batch.result.events["origin"].str.startswith(f"s3://{BUCKET}/AWSLogs/{ORG_ID}/").all()


def test_org_folders_without_setting_noted(s3: Any, moto_endpoint: str) -> None:
    put(
        s3,
        trail_key(at(TODAY, 10), "A1", org_id=ORG_ID),
        trail_file(secret_read(1, time=event_time(TODAY, 9))),
    )

    batch = source(moto_endpoint).read({})

    assert batch.files_listed == 0
    assert batch.notes == [
        f"no account folders found under s3://{BUCKET}/AWSLogs/; it contains organization "
        f"trail folders ({ORG_ID}): set organization_id to read them"
    ]


# Digests, broken and oversized objects


def test_digest_skipped_by_key_and_content(s3: Any, moto_endpoint: str) -> None:
    put(s3, trail_key(at(TODAY, 10), "A1"), trail_file(secret_read(1, time=event_time(TODAY, 9))))
    put(s3, digest_key(at(TODAY, 11)), digest_document(TODAY))
    # Digest content under a log file name is recognised by the formats package.
    put(s3, trail_key(at(TODAY, 11), "A2"), digest_document(TODAY))

    with fault_proxy(moto_endpoint) as proxy:
        trail = source(proxy.url)
        batch = trail.read({})

    assert batch.files_listed == 3
    assert uids(batch) == [uid(1)]
    assert batch.result.records == 2
    assert dict(batch.result.skipped) == {"digest": 2}
    gets = [path for method, path in proxy.requests if method == "GET" and "list-type" not in path]
    assert len(gets) == 2
    assert not any("CloudTrail-Digest" in path for path in gets)
    assert len(batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]) == 3


def test_truncated_gzip_quarantined_after_attempts(s3: Any, moto_endpoint: str) -> None:
    broken_key = trail_key(at(TODAY, 9), "A0")
    whole = trail_file(secret_read(1, time=event_time(TODAY, 8)))
    put(s3, broken_key, whole[: len(whole) // 2])
    trail = source(moto_endpoint, quarantine_after_attempts=3)
    checkpoints: dict[str, Any] = {}
    origin = f"s3://{BUCKET}/{broken_key}"
    partition = f"{ACCOUNT}/{REGION}/2026-10-06"

    for attempt in (1, 2):
        put(
            s3,
            trail_key(at(TODAY, 10, attempt), f"B{attempt}"),
            trail_file(secret_read(10 + attempt, time=event_time(TODAY, 9))),
        )
        batch = trail.read(checkpoints)
        assert uids(batch) == [uid(10 + attempt)]
        assert batch.result.quarantined == []
        assert len(batch.problems) == 1
        assert batch.problems[0].startswith(f"{origin}: truncated gzip: the stream ends after ")
        assert batch.problems[0].endswith(f"(attempt {attempt} of 3); read again next run")
        assert batch.checkpoints[partition]["attempts"] == {broken_key.rsplit("/", 1)[1]: attempt}
        checkpoints = commit(checkpoints, batch)

    third = trail.read(checkpoints)
    assert third.problems == []
    assert len(third.result.quarantined) == 1
    quarantined = third.result.quarantined[0]
    assert quarantined.origin == origin
    assert quarantined.reason == "unreadable_file"
    assert quarantined.detail.endswith("; quarantined after 3 failed reads")
    assert third.checkpoints[partition]["attempts"] == {}
    checkpoints = commit(checkpoints, third)

    fourth = trail.read(checkpoints)
    assert fourth.files_listed == 3
    assert fourth.files_unchanged == 3
    assert fourth.result.quarantined == []


def test_unfinished_day_kept_past_lookback(s3: Any, moto_endpoint: str) -> None:
    day = TODAY - timedelta(days=2)
    broken_key = trail_key(at(day, 9), "A0")
    put(s3, broken_key, trail_file(secret_read(1, time=event_time(day, 8)))[:40])
    first = source(moto_endpoint, quarantine_after_attempts=2).read({})
    checkpoints = commit({}, first)
    assert checkpoints[LIST_FROM_KEY] == "2026-10-04"

    # Three days later the day is out of the look-back but still has an object to finish.
    later = S3CloudTrailSource(
        S3CloudTrailSettings(
            name="trail",
            bucket=BUCKET,
            endpoint_url=moto_endpoint,
            max_attempts=1,
            quarantine_after_attempts=2,
        ),
        clock=lambda: NOW + timedelta(days=3),
    )
    second = later.read(checkpoints)

    assert [item.origin for item in second.result.quarantined] == [f"s3://{BUCKET}/{broken_key}"]
    assert second.checkpoints[LIST_FROM_KEY] == "2026-10-07"
    assert second.checkpoints_removed == [f"{ACCOUNT}/{REGION}/2026-10-04"]


def test_oversize_object_quarantined(s3: Any, moto_endpoint: str) -> None:
    records = [secret_read(n, time=event_time(TODAY, 9)) for n in range(1, 40)]
    large_key = trail_key(at(TODAY, 10), "A1")
    put(s3, large_key, json.dumps({"Records": records}).encode())
    put(s3, trail_key(at(TODAY, 10), "A2"), trail_file(secret_read(99, time=event_time(TODAY, 9))))
    trail = source(moto_endpoint, max_object_bytes=4096)

    batch = trail.read({})

    assert uids(batch) == [uid(99)]
    assert [(item.origin, item.reason) for item in batch.result.quarantined] == [
        (f"s3://{BUCKET}/{large_key}", "too_large")
    ]
    assert re.match(
        r"object is over the size limit \(\d+ bytes as stored;", batch.result.quarantined[0].detail
    )
    assert len(batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]) == 2


def test_gzip_bomb_quarantined(s3: Any, moto_endpoint: str) -> None:
    bomb_key = trail_key(at(TODAY, 10), "A1")
    bomb = gzip.compress(b'{"Records": [' + b" " * 5_000_000 + b"]}")
    put(s3, bomb_key, bomb)

    batch = source(moto_endpoint, max_uncompressed_bytes=65_536).read({})

    assert len(bomb) < 10_000
    assert len(batch.result.quarantined) == 1
    assert batch.result.quarantined[0].reason == "too_large"
    assert "more than 65536 bytes after gunzip" in batch.result.quarantined[0].detail
    assert batch.result.records == 0


def test_gunzip_reads_every_member() -> None:
    data = gzip.compress(b'{"a": 1}') + gzip.compress(b'{"b": 2}')
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]

    assert _gunzip_capped(chunks, 1024) == b'{"a": 1}{"b": 2}'


def test_gunzip_rejects_bad_check() -> None:
    data = bytearray(gzip.compress(b"x" * 100))
    data[-8] ^= 0xFF

    with pytest.raises(_Corrupt) as caught:
        _gunzip_capped([bytes(data)], 1024)
    assert str(caught.value).startswith("invalid gzip data: ")


def test_gunzip_limit_exact() -> None:
    data = gzip.compress(b"y" * 1000)

    assert len(_gunzip_capped([data], 1000)) == 1000
    with pytest.raises(_TooLarge):
        _gunzip_capped([data], 999)


def test_gunzip_raw_deflate_rejected() -> None:
    with pytest.raises(_Corrupt):
        _gunzip_capped([zlib.compress(b"z" * 10)], 1024)


# Failures


def test_get_failure_leaves_object_unread(s3: Any, moto_endpoint: str) -> None:
    denied_key = trail_key(at(TODAY, 10), "A1")
    put(s3, denied_key, trail_file(secret_read(1, time=event_time(TODAY, 9))))
    put(s3, trail_key(at(TODAY, 10), "A2"), trail_file(secret_read(2, time=event_time(TODAY, 9))))

    def deny(method: str, path: str) -> Any:
        if method == "GET" and path.startswith(f"/{BUCKET}/{denied_key}"):
            return s3_error(403, "AccessDenied", "Access Denied")
        return None

    with fault_proxy(moto_endpoint, deny) as proxy:
        batch = source(proxy.url).read({})

    assert uids(batch) == [uid(2)]
    assert batch.problems == [
        f"s3://{BUCKET}/{denied_key}: GetObject failed: AccessDenied (HTTP 403); grant "
        f"s3:GetObject on arn:aws:s3:::{BUCKET}/AWSLogs/*, and kms:Decrypt on the trail's KMS "
        "key if the bucket uses SSE-KMS; read again next run"
    ]
    assert list(batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]) == [
        trail_key(at(TODAY, 10), "A2").rsplit("/", 1)[1]
    ]
    # The failed object keeps today's partition in the look-back; nothing moves earlier.
    assert batch.checkpoints[LIST_FROM_KEY] == "2026-10-04"


def test_failed_gets_share_one_line_after_ten(s3: Any, moto_endpoint: str) -> None:
    for number in range(1, 13):
        put(
            s3,
            trail_key(at(TODAY, 10, number), f"A{number}"),
            trail_file(secret_read(number, time=event_time(TODAY, 9))),
        )

    def fail_gets(method: str, path: str) -> Any:
        if method == "GET" and "list-type" not in path:
            return s3_error(403, "AccessDenied", "Access Denied")
        return None

    with fault_proxy(moto_endpoint, fail_gets) as proxy:
        batch = source(proxy.url).read({})

    assert len(proxy.faults) == 12
    assert len(batch.problems) == 11
    assert batch.problems[-1] == "2 more objects could not be read; see the log"
    assert batch.result.records == 0
    assert f"{ACCOUNT}/{REGION}/2026-10-06" not in batch.checkpoints


def test_listing_denied_names_permission(s3: Any, moto_endpoint: str) -> None:
    def deny(method: str, path: str) -> Any:
        return s3_error(403, "AccessDenied", "Access Denied") if "list-type=2" in path else None

    with fault_proxy(moto_endpoint, deny) as proxy, pytest.raises(SourceError) as caught:
        source(proxy.url, accounts=[ACCOUNT], regions=[REGION]).read({})

    assert caught.value.source == "trail"
    assert caught.value.reason == (
        f"ListObjectsV2 on s3://{BUCKET}/AWSLogs/{ACCOUNT}/CloudTrail/{REGION}/2026/10/04/ "
        "failed: AccessDenied (HTTP 403)"
    )
    assert caught.value.hint == (
        f"grant s3:ListBucket on arn:aws:s3:::{BUCKET} with an s3:prefix condition that allows "
        "'AWSLogs/*'"
    )


def test_listing_throttled_retried_then_raises(s3: Any, moto_endpoint: str) -> None:
    def slow_down(method: str, path: str) -> Any:
        return (
            s3_error(503, "SlowDown", "Please reduce your request rate.")
            if "list-type=2" in path
            else None
        )

    with fault_proxy(moto_endpoint, slow_down) as proxy, pytest.raises(SourceError) as caught:
        source(proxy.url, max_attempts=2).read({})

    assert caught.value.reason == (
        f"ListObjectsV2 on s3://{BUCKET}/AWSLogs/ failed: SlowDown (HTTP 503)"
    )
    assert caught.value.hint == (
        "S3 throttled or failed the request 2 times; the next run reads from the same checkpoints"
    )
    assert len(proxy.faults) == 2


# Through the engine


def run_settings(tmp_path: Path, sources: list[dict[str, Any]]) -> Any:
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": sources,
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {},
        "alerting": {"console": False, "outbox": False},
    }
    return settings_from_mapping(data, base_dir=tmp_path)


def s3_entry(name: str, endpoint: str, **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "s3_cloudtrail",
        "bucket": BUCKET,
        "endpoint_url": endpoint,
        "max_attempts": 2,
        **settings,
    }


def test_duplicate_event_stored_once(tmp_path: Path, s3: Any, moto_endpoint: str) -> None:
    today = datetime.now(UTC).date()
    shared = secret_read(1, time=event_time(today, 0))
    # One account trail delivers the event twice; the organization trail delivers it again.
    put(
        s3,
        trail_key(at(today, 0, 5), "A1"),
        trail_file(shared, secret_read(2, time=event_time(today, 0))),
    )
    put(s3, trail_key(at(today, 0, 10), "A2"), trail_file(shared))
    put(
        s3,
        trail_key(at(today, 0, 5), "A3", org_id=ORG_ID),
        trail_file(shared, secret_read(3, time=event_time(today, 0))),
    )
    settings = run_settings(
        tmp_path,
        [
            s3_entry("account-trail", moto_endpoint),
            s3_entry("org-trail", moto_endpoint, organization_id=ORG_ID),
        ],
    )

    summary = run_once(settings)

    assert summary.problems == []
    assert [(s.name, s.files_read, s.records, s.events) for s in summary.sources] == [
        ("account-trail", 2, 3, 2),
        ("org-trail", 1, 2, 2),
    ]
    assert summary.sources[0].skipped_by_kind == {"duplicate": 1}
    assert summary.events_read == 3
    assert summary.events_new == 3
    assert summary.history_rows_written == 3

    again = run_once(settings)

    assert [(s.name, s.files_listed, s.files_read, s.records) for s in again.sources] == [
        ("account-trail", 2, 0, 0),
        ("org-trail", 1, 0, 0),
    ]
    assert again.events_new == 0


def test_throttled_source_keeps_checkpoint_others_go_on(
    tmp_path: Path, s3: Any, moto_endpoint: str
) -> None:
    today = datetime.now(UTC).date()
    put(s3, trail_key(at(today, 0, 5), "A1"), trail_file(secret_read(1, time=event_time(today, 0))))
    logs = tmp_path / "logs"
    logs.mkdir()
    throttled = False

    def slow_down(method: str, path: str) -> Any:
        if throttled and "list-type=2" in path:
            return s3_error(503, "SlowDown", "Please reduce your request rate.")
        return None

    with fault_proxy(moto_endpoint, slow_down) as proxy:
        settings = run_settings(
            tmp_path,
            [
                s3_entry("trail", proxy.url),
                {"name": "local", "type": "files", "paths": ["logs"]},
            ],
        )
        first = run_once(settings)
        assert first.events_new == 1
        with State(settings.state_dir / "state.db") as state:
            before = state.checkpoints("trail")

        put(
            s3,
            trail_key(at(today, 0, 10), "A2"),
            trail_file(secret_read(2, time=event_time(today, 0))),
        )
        (logs / "local.json").write_text(
            json.dumps({"Records": [secret_read(3, time=event_time(today, 0))]}), encoding="utf-8"
        )
        throttled = True
        second = run_once(settings)

    assert second.status == "completed_with_problems"
    trail, local = second.sources
    assert trail.error is not None
    assert "SlowDown (HTTP 503)" in trail.error
    assert trail.events == 0
    assert local.error is None
    assert local.events == 1
    assert second.events_new == 1
    assert len(proxy.faults) == 2
    with State(settings.state_dir / "state.db") as state:
        assert state.checkpoints("trail") == before
        assert len(state.checkpoints("local")) == 1
