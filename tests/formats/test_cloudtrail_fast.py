"""Tests of the CloudTrail fast path's shared columns and cross-file caches."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.formats import cloudtrail, read_bytes, read_paths
from pipeline.formats.base import RecordError
from pipeline.formats.cloudtrail import CloudTrailFormat, _shared_column
from pipeline.formats.ip import classify_address
from pipeline.schema import check_events

ACCOUNT = "210987654321"
BUCKET_SECRET = f"arn:aws:secretsmanager:ap-southeast-2:{ACCOUNT}:secret:ledger/db-9xY8zW"
CALLER = {
    "type": "AssumedRole",
    "principalId": "AROATESTFAST0001:nightly-export",
    "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/exporter/nightly-export",
    "accountId": ACCOUNT,
    "sessionContext": {
        "sessionIssuer": {
            "type": "Role",
            "principalId": "AROATESTFAST0001",
            "arn": f"arn:aws:iam::{ACCOUNT}:role/exporter",
            "accountId": ACCOUNT,
            "userName": "exporter",
        }
    },
}
ADDRESSES = ("198.51.100.23", "10.20.30.40", "2001:db8::17", "AWS Internal", "kms.amazonaws.com")


def call(index: int, **fields: Any) -> dict[str, Any]:
    """Build one GetSecretValue call; keyword arguments override its fields."""
    event: dict[str, Any] = {
        "eventVersion": "1.10",
        "userIdentity": CALLER,
        "eventTime": f"2025-06-11T03:{index // 60 % 60:02d}:{index % 60:02d}Z",
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "ap-southeast-2",
        "sourceIPAddress": ADDRESSES[index % len(ADDRESSES)],
        "userAgent": "Boto3/1.35.0 md/Botocore#1.35.0 os/linux",
        "requestParameters": {"secretId": BUCKET_SECRET},
        "responseElements": None,
        "requestID": f"rq-{index:05d}",
        "eventID": f"ev-{index:05d}",
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }
    event.update(fields)
    return event


def records_file(count: int, start: int = 0) -> bytes:
    return gzip.compress(orjson.dumps({"Records": [call(start + n) for n in range(count)]}))


def read_record_path(data: bytes, origin: str, monkeypatch: pytest.MonkeyPatch) -> pd.DataFrame:
    with monkeypatch.context() as patched:
        patched.setattr(CloudTrailFormat, "read_fast", lambda self, data, origin: None)
        return read_bytes(data, origin).events


def first_chunk(frame: pd.DataFrame, column: str) -> pa.Array:
    return frame[column].array._pa_array.chunk(0)


@pytest.fixture(autouse=True)
def empty_caches() -> None:
    cloudtrail._WHO_CACHE.clear()
    cloudtrail._TARGET_CACHE.clear()
    cloudtrail._ADDRESS_CACHE.clear()


def test_constant_columns_shared_between_files() -> None:
    first = read_bytes(records_file(5), "a.json.gz").events
    second = read_bytes(records_file(7, start=5), "b.json.gz").events
    for column in ("cloud", "log_format", "geo_country", "geo_city", "as_org"):
        one, other = first_chunk(first, column), first_chunk(second, column)
        assert one.buffers()[1].address == other.buffers()[1].address, column
    assert first["cloud"].tolist() == ["aws"] * 5
    assert second["log_format"].tolist() == ["cloudtrail"] * 7
    assert second["geo_country"].isna().all()
    assert str(second["cloud"].dtype) == "string"


def test_shared_columns_equal_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = records_file(12)
    fast = read_bytes(data, "trail.json.gz").events
    slow = read_record_path(data, "trail.json.gz", monkeypatch)
    pd.testing.assert_frame_equal(fast, slow)
    assert check_events(fast) == []


def test_shared_column_write_leaves_other_frame() -> None:
    first = read_bytes(records_file(3), "a.json.gz").events
    second = read_bytes(records_file(3, start=3), "b.json.gz").events
    first.loc[0, "cloud"] = "gcp"
    first.loc[1, "geo_country"] = "AU"
    assert first["cloud"].tolist() == ["gcp", "aws", "aws"]
    assert second["cloud"].tolist() == ["aws", "aws", "aws"]
    assert second["geo_country"].isna().all()


def test_shared_column_grows() -> None:
    small = _shared_column("grow-test", pa.large_string(), 3)
    large = _shared_column("grow-test", pa.large_string(), 40_000)
    assert small.to_pylist() == ["grow-test"] * 3
    assert len(large) == 40_000
    assert large[39_999].as_py() == "grow-test"
    assert small.to_pylist() == ["grow-test"] * 3


def test_shared_null_column_types() -> None:
    strings = _shared_column(None, pa.large_string(), 4)
    numbers = _shared_column(None, pa.float64(), 4)
    assert strings.type == pa.large_string()
    assert strings.null_count == 4
    assert numbers.type == pa.float64()
    assert numbers.null_count == 4


def test_address_cache_matches_classifier() -> None:
    read_bytes(records_file(len(ADDRESSES)), "a.json.gz")
    assert set(cloudtrail._ADDRESS_CACHE) == set(ADDRESSES)
    for raw, cached in cloudtrail._ADDRESS_CACHE.items():
        assert cached == classify_address(raw)


def test_cache_eviction_keeps_newer_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudtrail, "_MAX_CACHED", 4)
    cache = {name: index for index, name in enumerate("abcdef")}
    cloudtrail._evict_older_half(cache)
    assert list(cache) == ["d", "e", "f"]
    cloudtrail._evict_older_half(cache)
    assert list(cache) == ["d", "e", "f"]


def test_small_caches_equal_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudtrail, "_MAX_CACHED", 2)
    read_bytes(records_file(len(ADDRESSES)), "a.json.gz")
    assert len(cloudtrail._ADDRESS_CACHE) == len(ADDRESSES)
    data = records_file(4, start=1)
    fast = read_bytes(data, "b.json.gz").events
    # Before the second file, the five cached addresses lost their older half (two entries).
    # The file's four addresses are the newest three plus one that is cached again.
    assert list(cloudtrail._ADDRESS_CACHE) == [*ADDRESSES[2:], ADDRESSES[1]]
    pd.testing.assert_frame_equal(fast, read_record_path(data, "b.json.gz", monkeypatch))


def test_files_with_warm_caches_equal_record_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for number in range(3):
        (tmp_path / f"trail-{number}.json.gz").write_bytes(records_file(30, start=30 * number))
    fast = read_paths([tmp_path])
    with monkeypatch.context() as patched:
        patched.setattr(CloudTrailFormat, "read_fast", lambda self, data, origin: None)
        slow = read_paths([tmp_path])
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert len(fast.events) == 90
    assert fast.events["origin"].iloc[-1] == f"{tmp_path / 'trail-2.json.gz'} Records[30]"


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"userIdentity": "arn:aws:iam::1:user/x"}, "field userIdentity: expected an object"),
        ({"requestParameters": ["ledger"]}, "field requestParameters: expected an object"),
        ({"responseElements": 7}, "field responseElements: expected an object"),
        ({"additionalEventData": "x"}, "field additionalEventData: expected an object"),
        ({"resources": {"ARN": BUCKET_SECRET}}, "field resources: expected an array"),
    ],
    ids=["identity_string", "request_array", "response_number", "additional_string", "resources"],
)
def test_wrong_nested_type_uses_record_path(fields: dict[str, Any], detail: str) -> None:
    data = orjson.dumps({"Records": [call(0), call(1, **fields)]})
    with pytest.raises(RecordError, match=detail):
        CloudTrailFormat().read_fast(data, "odd.json")
    result = read_bytes(data, "odd.json")
    assert len(result.events) == 1
    assert [entry.reason for entry in result.quarantined] == ["invalid_record"]
    assert result.quarantined[0].origin == "odd.json Records[2]"
    assert result.quarantined[0].detail.startswith(f"cloudtrail: {detail}")
