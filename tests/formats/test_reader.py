"""Tests of the file reader: compression, JSON shapes, wrappers, quarantine and de-duplication."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.errors import InputError
from pipeline.formats import read_bytes, read_paths
from pipeline.formats.reader import _duplicated_keys
from pipeline.schema import check_events

ACCOUNT = "777788889999"
IDENTITY = {
    "type": "IAMUser",
    "principalId": "AIDAREADERTEST1",
    "arn": f"arn:aws:iam::{ACCOUNT}:user/ci-runner",
    "accountId": ACCOUNT,
    "userName": "ci-runner",
}


def secret_read(event_id: str, secret: str = "payments/api-key") -> dict[str, Any]:
    """Build a successful CloudTrail GetSecretValue event."""
    return {
        "eventVersion": "1.09",
        "userIdentity": IDENTITY,
        "eventTime": "2025-05-06T07:08:09Z",
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "us-east-2",
        "sourceIPAddress": "198.51.100.23",
        "userAgent": "Boto3/1.34.0",
        "requestParameters": {"secretId": secret},
        "responseElements": None,
        "requestID": f"req-{event_id}",
        "eventID": event_id,
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }


def lines(*values: Any) -> bytes:
    return b"".join(orjson.dumps(value) + b"\n" for value in values)


def reasons(result: Any) -> Counter[str]:
    return Counter(entry.reason for entry in result.quarantined)


# --- compression ---------------------------------------------------------------------------


def test_gzip_detected_by_magic_bytes(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_bytes(gzip.compress(lines(secret_read("g1"), secret_read("g2"))))
    result = read_paths([path])
    assert result.files == 1
    assert result.records == 2
    assert result.events["event_uid"].tolist() == ["g1", "g2"]
    assert result.quarantined == []


def test_plain_file_named_gz(tmp_path: Path) -> None:
    path = tmp_path / "plain.json.gz"
    path.write_bytes(orjson.dumps({"Records": [secret_read("p1")]}))
    result = read_paths([path])
    assert result.events["event_uid"].tolist() == ["p1"]
    assert result.quarantined == []


def test_gzip_several_members() -> None:
    first = gzip.compress(lines(secret_read("m1")))
    second = gzip.compress(lines(secret_read("m2"), secret_read("m3")))
    result = read_bytes(first + second, "joined.jsonl.gz")
    assert result.records == 3
    assert result.events["event_uid"].tolist() == ["m1", "m2", "m3"]
    assert result.quarantined == []


def test_gzip_empty_content() -> None:
    result = read_bytes(gzip.compress(b""), "empty.json.gz")
    assert result.records == 0
    assert result.quarantined == []


def test_truncated_gzip_quarantined() -> None:
    data = gzip.compress(orjson.dumps({"Records": [secret_read("t1")] * 50}))
    result = read_bytes(data[: len(data) // 2], "cut.json.gz")
    assert result.files == 1
    assert result.records == 0
    assert len(result.events) == 0
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == "cut.json.gz"
    assert entry.reason == "unreadable_file"
    assert entry.detail.startswith("invalid or truncated gzip: ")


# --- JSON Lines ----------------------------------------------------------------------------


def test_json_lines_bad_line_number() -> None:
    data = (
        lines(secret_read("l1")) + b'{"eventName": "GetSecretValue",\n' + lines(secret_read("l3"))
    )
    result = read_bytes(data, "trail.jsonl")
    assert result.records == 3
    assert result.events["event_uid"].tolist() == ["l1", "l3"]
    assert result.events["origin"].tolist() == ["trail.jsonl line 1", "trail.jsonl line 3"]
    assert reasons(result) == Counter({"invalid_json": 1})
    entry = result.quarantined[0]
    assert entry.origin == "trail.jsonl line 2"
    assert entry.detail.startswith("line 2 is not valid JSON: ")
    assert entry.raw == '{"eventName": "GetSecretValue",'


def test_json_lines_incomplete_last_line_skipped() -> None:
    data = lines(secret_read("i1"), secret_read("i2")) + b'{"eventID": "i3", "eventTi'
    result = read_bytes(data, "PT1H.json")
    assert result.records == 2
    assert result.events["event_uid"].tolist() == ["i1", "i2"]
    assert result.quarantined == []
    assert result.skipped == Counter({"incomplete_last_line": 1})


def test_json_lines_complete_bad_last_line_quarantined() -> None:
    data = lines(secret_read("c1")) + b"{oops\n"
    result = read_bytes(data, "x.jsonl")
    assert result.skipped == Counter()
    assert reasons(result) == Counter({"invalid_json": 1})
    assert result.quarantined[0].origin == "x.jsonl line 2"


def test_json_lines_blank_lines_ignored() -> None:
    data = b"\n" + lines(secret_read("b1")) + b"   \n\n" + lines(secret_read("b2"))
    result = read_bytes(data, "x.jsonl")
    assert result.records == 2
    assert result.events["origin"].tolist() == ["x.jsonl line 2", "x.jsonl line 5"]


# --- wrappers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "first_origin"),
    [
        ({"Records": [secret_read("w1"), secret_read("w2")]}, "w.json Records[1]"),
        (
            {"Records": [secret_read("w1"), secret_read("w2")], "nextToken": "n"},
            "w.json Records[1]",
        ),
        ({"records": [secret_read("w1"), secret_read("w2")]}, "w.json records[1]"),
        ({"value": [secret_read("w1"), secret_read("w2")]}, "w.json value[1]"),
        (
            {
                "Events": [
                    {"EventId": "w1", "CloudTrailEvent": orjson.dumps(secret_read("w1")).decode()},
                    {"EventId": "w2", "CloudTrailEvent": secret_read("w2")},
                ],
                "NextToken": "abc",
            },
            "w.json Events[1]",
        ),
        ({"entries": [secret_read("w1"), secret_read("w2")]}, "w.json entries[1]"),
        ([secret_read("w1"), secret_read("w2")], "w.json record 1"),
    ],
    ids=["Records", "Records_next_token", "records", "value", "Events", "entries", "array"],
)
def test_wrappers_unwrapped(document: Any, first_origin: str) -> None:
    result = read_bytes(orjson.dumps(document), "w.json")
    assert result.records == 2
    assert result.quarantined == []
    assert result.events["event_uid"].tolist() == ["w1", "w2"]
    assert result.events["origin"].iloc[0] == first_origin
    assert result.formats == Counter({"cloudtrail": 2})
    assert check_events(result.events) == []


def test_lookup_event_invalid_string_quarantined() -> None:
    document = {"Events": [{"EventId": "x", "CloudTrailEvent": "{not json"}]}
    result = read_bytes(orjson.dumps(document), "lookup.json")
    assert result.records == 1
    assert reasons(result) == Counter({"invalid_json": 1})
    entry = result.quarantined[0]
    assert entry.origin == "lookup.json Events[1]"
    assert entry.detail.startswith("field CloudTrailEvent is not a JSON object: ")


def test_wrapper_key_with_other_keys_is_record() -> None:
    # A record that merely has a "records" list among other fields is not a wrapper.
    record = {"time": "2025-05-06T07:08:09Z", "category": "Other", "records": []}
    result = read_bytes(orjson.dumps(record), "odd.json")
    assert result.records == 1
    assert reasons(result) == Counter({"unknown_format": 1})


# --- records that cannot be ingested ------------------------------------------------------


def test_non_object_record_quarantined() -> None:
    result = read_bytes(orjson.dumps([secret_read("n1"), 42, "text"]), "mixed.json")
    assert result.records == 3
    assert result.events["event_uid"].tolist() == ["n1"]
    assert reasons(result) == Counter({"invalid_record": 2})
    first, second = result.quarantined
    assert first.origin == "mixed.json record 2"
    assert first.detail == "expected a JSON object, found int"
    assert first.raw == "42"
    assert second.detail == "expected a JSON object, found str"


def test_unknown_format_names_keys() -> None:
    data = lines({"zeta": 1, "alpha": {"x": 1}, "mid": None}, secret_read("u2"))
    result = read_bytes(data, "other.jsonl")
    assert result.records == 2
    assert result.events["event_uid"].tolist() == ["u2"]
    assert reasons(result) == Counter({"unknown_format": 1})
    entry = result.quarantined[0]
    assert entry.origin == "other.jsonl line 1"
    assert entry.detail == "no log format recognised this record (top-level keys: alpha, mid, zeta)"
    assert entry.raw == '{"zeta":1,"alpha":{"x":1},"mid":null}'


def test_invalid_time_quarantined() -> None:
    result = read_bytes(lines(secret_read("bad") | {"eventTime": "soon"}), "t.jsonl")
    assert len(result.events) == 0
    assert reasons(result) == Counter({"invalid_time": 1})
    assert result.quarantined[0].detail == "event time missing or not a timestamp: 'soon'"


# --- several files -------------------------------------------------------------------------


def test_duplicates_across_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(
        orjson.dumps({"Records": [secret_read("d1"), secret_read("d2")]})
    )
    (tmp_path / "b.json.gz").write_bytes(
        gzip.compress(orjson.dumps({"Records": [secret_read("d2"), secret_read("d3")]}))
    )
    result = read_paths([tmp_path])
    assert result.files == 2
    assert result.records == 4
    assert result.events["event_uid"].tolist() == ["d1", "d2", "d3"]
    assert result.events["origin"].tolist() == [
        f"{tmp_path / 'a.json'} Records[1]",
        f"{tmp_path / 'a.json'} Records[2]",
        f"{tmp_path / 'b.json.gz'} Records[2]",
    ]
    assert result.skipped == Counter({"duplicate": 1})
    assert list(result.events.index) == [0, 1, 2]


def test_same_event_other_secret_kept(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(lines(secret_read("s1", secret="one")))
    (tmp_path / "b.json").write_bytes(lines(secret_read("s1", secret="two")))
    result = read_paths([tmp_path])
    assert result.events["resource"].tolist() == ["one", "two"]
    assert result.skipped == Counter()


def test_duplicates_without_resource(tmp_path: Path) -> None:
    listing = secret_read("l1") | {"eventName": "ListSecrets", "requestParameters": None}
    (tmp_path / "a.json").write_bytes(lines(listing, secret_read("l2")))
    (tmp_path / "b.json").write_bytes(lines(listing))
    result = read_paths([tmp_path])
    assert result.events["event_uid"].tolist() == ["l1", "l2"]
    assert result.events["resource"].isna().tolist() == [True, False]
    assert result.skipped == Counter({"duplicate": 1})


def test_duplicate_check_survives_hash_collisions() -> None:
    events = read_bytes(
        lines(secret_read("c1"), secret_read("c2"), secret_read("c1"), secret_read("c3")), "c.jsonl"
    ).events
    # Every row gets the same hash, so only the comparison by value can tell rows apart.
    colliding = np.zeros(len(events), dtype=np.uint64)
    assert _duplicated_keys(events, colliding).tolist() == [False, False, True, False]


def test_hidden_files_ignored(tmp_path: Path) -> None:
    (tmp_path / ".partial.json").write_bytes(lines(secret_read("h0")))
    (tmp_path / "a.json").write_bytes(lines(secret_read("h1")))
    result = read_paths([tmp_path])
    assert result.files == 1
    assert result.events["event_uid"].tolist() == ["h1"]


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as raised:
        read_paths([missing])
    assert str(raised.value) == (
        f"log path not found: {missing} (check --source or sources[].paths)"
    )


def test_empty_folder(tmp_path: Path) -> None:
    result = read_paths([tmp_path])
    assert result.files == 0
    assert result.records == 0
    assert len(result.events) == 0
    assert check_events(result.events) == []
