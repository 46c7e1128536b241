"""Tests of the CloudTrail fast path's shared columns and cross-file caches."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.formats import cloudtrail, read_bytes, read_paths
from pipeline.formats.base import FileResult, RecordError
from pipeline.formats.cloudtrail import CloudTrailFormat, _shared_column
from pipeline.formats.ip import classify_address
from pipeline.formats.reader import BatchReader
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
        patched.setattr(CloudTrailFormat, "fast_batch", lambda self: None)
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


# --- one frame for several files ----------------------------------------------------------------


def read_files(reader: BatchReader, contents: dict[str, bytes]) -> FileResult:
    for origin, data in contents.items():
        reader.add(data, origin)
    return reader.finish()


def read_files_record_path(
    contents: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> FileResult:
    with monkeypatch.context() as patched:
        patched.setattr(CloudTrailFormat, "read_fast", lambda self, data, origin: None)
        patched.setattr(CloudTrailFormat, "fast_batch", lambda self: None)
        return read_files(BatchReader(), contents)


def kms_call(index: int) -> dict[str, Any]:
    """A KMS GenerateDataKey for an S3 object: not secret activity, so it is skipped."""
    return call(
        index,
        eventSource="kms.amazonaws.com",
        eventName="GenerateDataKey",
        requestParameters={"encryptionContext": {"aws:s3:arn": "arn:aws:s3:::reports/q3.csv"}},
    )


def test_batch_finish_counts_each_file() -> None:
    batch = CloudTrailFormat().fast_batch()
    assert batch.add(orjson.dumps({"Records": [call(0), kms_call(1), kms_call(2)]}), "a.json")
    assert batch.add(orjson.dumps({"Records": []}), "b.json")
    assert batch.add(orjson.dumps({"Records": [kms_call(3), call(4), call(5)]}), "c.json")
    assert batch.records == 6
    built = batch.finish()
    assert batch.records == 0
    assert [result.records for result in built.files if result] == [3, 0, 3]
    assert [dict(result.skipped) for result in built.files if result] == [
        {"not_secret_activity": 2},
        {},
        {"not_secret_activity": 1},
    ]
    assert [dict(result.formats) for result in built.files if result] == [
        {"cloudtrail": 3},
        {"cloudtrail": 0},
        {"cloudtrail": 3},
    ]
    assert built.row_files.tolist() == [0, 2, 2]
    assert built.events["origin"].tolist() == [
        "a.json Records[1]",
        "c.json Records[2]",
        "c.json Records[3]",
    ]
    assert built.events["event_uid"].tolist() == ["ev-00000", "ev-00004", "ev-00005"]


def test_batch_add_rejects_other_shapes() -> None:
    batch = CloudTrailFormat().fast_batch()
    assert not batch.add(lines_of(call(0)), "trail.jsonl")
    assert not batch.add(orjson.dumps({"Records": [call(0), {"eventVersion": "1.10"}]}), "gap.json")
    assert batch.records == 0


def lines_of(*events: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


def test_batched_files_equal_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    contents = {f"trail-{n}.json.gz": records_file(40, start=40 * n) for n in range(4)}
    contents["kms.json"] = orjson.dumps({"Records": [kms_call(n) for n in range(5)] + [call(3)]})
    fast = read_files(BatchReader(fast_path_min_bytes=0, fast_batch_records=100), contents)
    slow = read_files_record_path(contents, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert fast.records == 166
    assert fast.skipped == Counter({"not_secret_activity": 5, "duplicate": 1})
    assert fast.events["origin"].iloc[40] == "trail-1.json.gz Records[1]"
    assert check_events(fast.events) == []


def test_batch_declines_only_bad_file(monkeypatch: pytest.MonkeyPatch) -> None:
    contents = {
        "one.json": orjson.dumps({"Records": [call(0), call(1)]}),
        "two.json": orjson.dumps({"Records": [call(2), call(3, userIdentity="root")]}),
        "three.json": orjson.dumps({"Records": [call(4)]}),
    }
    fast = read_files(BatchReader(fast_path_min_bytes=0), contents)
    slow = read_files_record_path(contents, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert fast.events["origin"].tolist() == [
        "one.json Records[1]",
        "one.json Records[2]",
        "two.json Records[1]",
        "three.json Records[1]",
    ]
    assert [entry.origin for entry in fast.quarantined] == ["two.json Records[2]"]
    assert fast.quarantined[0].reason == "invalid_record"


def test_batch_declines_file_with_implausible_time() -> None:
    contents = {
        "one.json": orjson.dumps({"Records": [call(0)]}),
        "two.json": orjson.dumps({"Records": [call(1), call(2, eventTime="1999-12-31T23:59:59Z")]}),
        "three.json": orjson.dumps({"Records": [call(3)]}),
    }
    fast = read_files(BatchReader(fast_path_min_bytes=0), contents)
    assert fast.events["origin"].tolist() == [
        "one.json Records[1]",
        "two.json Records[1]",
        "three.json Records[1]",
    ]
    assert [(entry.origin, entry.reason) for entry in fast.quarantined] == [
        ("two.json Records[2]", "invalid_time")
    ]
    assert fast.records == 4
    assert fast.files == 3


def test_batch_keeps_order_around_record_path_file() -> None:
    contents = {
        "one.json": orjson.dumps({"Records": [call(0)]}),
        "two.jsonl": lines_of(call(1), call(2)),
        "three.json": orjson.dumps({"Records": [call(3)]}),
        "four.json": b"not json",
        "five.json": orjson.dumps({"Records": [call(4), call(5)]}),
    }
    fast = read_files(BatchReader(fast_path_min_bytes=0, fast_batch_records=2), contents)
    assert fast.events["origin"].tolist() == [
        "one.json Records[1]",
        "two.jsonl line 1",
        "two.jsonl line 2",
        "three.json Records[1]",
        "five.json Records[1]",
        "five.json Records[2]",
    ]
    assert [entry.reason for entry in fast.quarantined] == ["not_json"]
    assert fast.records == 6
    assert fast.files == 5


def test_small_files_join_batch() -> None:
    # Far below FAST_PATH_MIN_BYTES. Only the batch builds "cloud" from the shared array.
    contents = {f"tiny-{n}.json": orjson.dumps({"Records": [call(n)]}) for n in range(3)}
    result = read_files(BatchReader(), contents)
    assert result.events["origin"].tolist() == [
        "tiny-0.json Records[1]",
        "tiny-1.json Records[1]",
        "tiny-2.json Records[1]",
    ]
    shared = _shared_column("aws", pa.large_string(), 3)
    assert first_chunk(result.events, "cloud").buffers()[1].address == shared.buffers()[1].address
    assert result.files == 3
    assert result.records == 3


def test_per_file_fast_path_without_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    contents = {f"trail-{n}.json.gz": records_file(20, start=20 * n) for n in range(3)}
    batched = read_files(BatchReader(fast_path_min_bytes=0), contents)
    with monkeypatch.context() as patched:
        patched.setattr(CloudTrailFormat, "fast_batch", lambda self: None)
        per_file = read_files(BatchReader(fast_path_min_bytes=0), contents)
    pd.testing.assert_frame_equal(batched.events, per_file.events)
    assert batched.summary() == per_file.summary()
    assert len(batched.events) == 60


@pytest.mark.parametrize(
    "event_time",
    ["2026-02-29T00:00:00Z", "2026-04-31T10:00:00Z", "2026-06-30T23:59:60Z"],
    ids=["february 29 of a common year", "april 31", "second 60"],
)
def test_impossible_time_quarantined_like_record_path(event_time: str, tmp_path: Path) -> None:
    # Arrow's strptime rolls these forward to a real time; the record path rejects them.
    path = tmp_path / "trail.json"
    path.write_bytes(orjson.dumps({"Records": [call(0), call(1, eventTime=event_time)]}))

    result = read_paths([path])

    assert result.events["event_uid"].tolist() == ["ev-00000"]
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        (f"{path} Records[2]", "invalid_time")
    ]


def test_invalid_utf8_in_unread_field_uses_record_path(tmp_path: Path) -> None:
    # msgspec skips tlsDetails without checking its bytes; the record path rejects the line.
    text = orjson.dumps({"Records": [call(0, tlsDetails={"x": "PLACEHOLDER"})]})
    path = tmp_path / "trail.json"
    path.write_bytes(text.replace(b"PLACEHOLDER", b"\xff"))

    result = read_paths([path])

    assert len(result.events) == 0
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        (f"{path} line 1", "invalid_encoding")
    ]
