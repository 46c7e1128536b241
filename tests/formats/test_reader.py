"""Tests of the file reader: compression, JSON shapes, wrappers, quarantine and de-duplication."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.formats import read_bytes, read_paths
from pipeline.formats.reader import MAX_FUTURE_SKEW, MAX_RAW_CHARS, BatchReader, _duplicated_keys
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
    assert first.detail == "expected a JSON object, found number"
    assert first.raw == "42"
    assert second.detail == "expected a JSON object, found string"


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
    assert (
        result.quarantined[0].raw
        == orjson.dumps(secret_read("bad") | {"eventTime": "soon"}).decode()
    )


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


def test_duplicate_check_distinct_hashes() -> None:
    result = read_bytes(lines(secret_read("d1"), secret_read("d2"), secret_read("d3")), "d.jsonl")
    distinct = np.array([30, 10, 20], dtype=np.uint64)
    assert _duplicated_keys(result.events, distinct).tolist() == [False, False, False]


def test_duplicates_across_batch_and_record_path() -> None:
    reader = BatchReader()
    reader.add(orjson.dumps({"Records": [secret_read("x1"), secret_read("x2")]}), "a.json")
    reader.add(lines(secret_read("x2"), secret_read("x3")), "b.jsonl")
    reader.add(orjson.dumps({"Records": [secret_read("x3")]}), "c.json")
    result = reader.finish()
    assert result.events["origin"].tolist() == [
        "a.json Records[1]",
        "a.json Records[2]",
        "b.jsonl line 2",
    ]
    assert result.skipped == Counter({"duplicate": 2})
    assert result.records == 5
    assert result.files == 3


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


# --- encodings and files that are not JSON ---------------------------------------------------


def test_utf8_bom_single_line_records_file() -> None:
    data = b"\xef\xbb\xbf" + orjson.dumps({"Records": [secret_read("bom1")]})
    result = read_bytes(data, "bom.json")
    assert result.events["event_uid"].tolist() == ["bom1"]
    assert result.quarantined == []
    assert result.skipped == Counter()


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("utf-16", b""),
        ("utf-16-le", b""),
        ("utf-16-be", b""),
        ("utf-32", b""),
        ("utf-32-le", b""),
        ("utf-32-be", b""),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
    ],
    ids=["utf16_bom", "utf16le", "utf16be", "utf32_bom", "utf32le", "utf32be", "le_bom", "be_bom"],
)
def test_utf16_and_utf32_decoded(encoding: str, bom: bytes) -> None:
    text = orjson.dumps({"Records": [secret_read("wide1", secret="café/key")]}).decode()
    result = read_bytes(bom + text.encode(encoding), "wide.json")
    assert result.quarantined == []
    assert result.events["event_uid"].tolist() == ["wide1"]
    assert result.events["resource"].tolist() == ["café/key"]


def test_latin1_byte_in_document_quarantined() -> None:
    data = orjson.dumps({"Records": [secret_read("l1", secret="caf")]}).replace(b"caf", b"caf\xe9")
    result = read_bytes(data, "latin.json")
    assert result.records == 1
    assert len(result.events) == 0
    assert result.skipped == Counter()
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == "latin.json line 1"
    assert entry.reason == "invalid_encoding"
    offset = data.index(b"\xe9")
    assert (
        entry.detail == f"line 1 is not valid UTF-8: byte 0xe9 at byte offset {offset} of the file"
    )


def test_latin1_byte_in_json_line_quarantined() -> None:
    bad = orjson.dumps(secret_read("l2", secret="caf")).replace(b"caf", b"caf\xe9") + b"\n"
    data = lines(secret_read("l1")) + bad + lines(secret_read("l3"))
    result = read_bytes(data, "latin.jsonl")
    assert result.records == 3
    assert result.events["event_uid"].tolist() == ["l1", "l3"]
    assert reasons(result) == Counter({"invalid_encoding": 1})
    entry = result.quarantined[0]
    assert entry.origin == "latin.jsonl line 2"
    offset = data.index(b"\xe9")
    assert (
        entry.detail == f"line 2 is not valid UTF-8: byte 0xe9 at byte offset {offset} of the file"
    )


def test_invalid_utf16_quarantined() -> None:
    # A lone high surrogate (D800) followed by ASCII is not valid UTF-16.
    data = b"\xff\xfe" + '{"Records": []}'.encode("utf-16-le")[:4] + b"\x00\xd8A\x00"
    result = read_bytes(data, "wide.json")
    assert [(q.reason, q.detail) for q in result.quarantined] == [
        (
            "invalid_encoding",
            "file looks like UTF-16 but byte offset 6 is invalid: illegal UTF-16 surrogate",
        )
    ]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_literal_single_line_invalid_json(literal: bytes) -> None:
    data = b'{"Records": [{"eventTime": ' + literal + b"}]}"
    result = read_bytes(data, "nan.json")
    assert result.skipped == Counter()
    assert result.records == 1
    assert reasons(result) == Counter({"invalid_json": 1})
    entry = result.quarantined[0]
    assert entry.origin == "nan.json line 1"
    assert entry.raw == data.decode()


def test_nan_in_last_json_line_not_skipped() -> None:
    data = lines(secret_read("n1")) + b'{"eventID": "n2", "eventTime": NaN}'
    result = read_bytes(data, "nan.jsonl")
    assert result.skipped == Counter()
    assert reasons(result) == Counter({"invalid_json": 1})
    assert result.quarantined[0].origin == "nan.jsonl line 2"


def test_zip_file_not_json() -> None:
    data = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(200)) * 3
    result = read_bytes(data, "logs.zip")
    assert result.files == 1
    assert result.records == 0
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == "logs.zip"
    assert entry.reason == "not_json"
    assert entry.detail == (
        "file is not JSON or JSON Lines: it starts with "
        "'PK\\x03\\x04\\x14\\x00\\x00\\x00\\x08\\x00\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07"
        "\\x08\\t\\n\\x0b\\x0c\\r'"
    )


def test_markdown_beside_logs_quarantined_once(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# Logs\n\n" + "Some notes.\n" * 60)
    (tmp_path / "a.json").write_bytes(lines(secret_read("md1")))
    result = read_paths([tmp_path])
    assert result.files == 2
    assert result.records == 1
    assert result.events["event_uid"].tolist() == ["md1"]
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        (str(tmp_path / "README.md"), "not_json")
    ]
    assert result.quarantined[0].detail == (
        "file is not JSON or JSON Lines: it starts with '# Logs\\n\\nSome notes.\\nSome'"
    )


def test_whitespace_only_file_empty() -> None:
    result = read_bytes(b" \n\t\n", "blank.json")
    assert result.records == 0
    assert result.quarantined == []


def test_deeply_nested_json_invalid_json() -> None:
    data = b"[" * 100_000 + b"]" * 100_000
    result = read_bytes(data, "deep.json")
    assert result.records == 1
    assert result.skipped == Counter()
    assert reasons(result) == Counter({"invalid_json": 1})
    entry = result.quarantined[0]
    assert entry.detail.startswith("line 1 is not valid JSON: depth limit exceeded")
    assert entry.raw == "[" * MAX_RAW_CHARS + "…"


def test_nested_arrays_beyond_limit_quarantined() -> None:
    data = b"[" * 10 + orjson.dumps(secret_read("deep")) + b"]" * 10
    result = read_bytes(data, "deep.json")
    assert result.records == 1
    assert len(result.events) == 0
    assert reasons(result) == Counter({"invalid_record": 1})
    entry = result.quarantined[0]
    assert entry.origin == "deep.json record 1 item 1 item 1 item 1 item 1"
    assert entry.detail == "records nested in more than 4 arrays or wrappers"


def test_single_cut_records_file_quarantined() -> None:
    data = orjson.dumps({"Records": [secret_read("c1"), secret_read("c2")]})[:-40]
    result = read_bytes(data, "cut.json")
    assert result.skipped == Counter()
    assert result.records == 1
    assert reasons(result) == Counter({"invalid_json": 1})
    assert result.quarantined[0].raw == data.decode()


def test_single_cut_json_line_skipped() -> None:
    # The first record of an appended blob (Azure PT1H.json) while it is being written.
    data = orjson.dumps(secret_read("a1"))[:-30]
    result = read_bytes(data, "PT1H.json")
    assert result.records == 0
    assert result.quarantined == []
    assert result.skipped == Counter({"incomplete_last_line": 1})


# --- records that vanish or lose their raw text -------------------------------------------------


def test_null_and_scalars_in_records_counted() -> None:
    result = read_bytes(b'{"Records": [1, "x", null]}', "nulls.json")
    assert result.records == 3
    assert len(result.quarantined) == 3
    assert [(q.origin, q.detail, q.raw) for q in result.quarantined] == [
        ("nulls.json Records[1]", "expected a JSON object, found number", "1"),
        ("nulls.json Records[2]", "expected a JSON object, found string", '"x"'),
        ("nulls.json Records[3]", "expected a JSON object, found null", "null"),
    ]


def test_null_lookup_event_counted() -> None:
    result = read_bytes(b'{"Events": [null]}', "lookup.json")
    assert result.records == 1
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        ("lookup.json Events[1]", "invalid_record")
    ]


def test_invalid_time_keeps_raw() -> None:
    record = secret_read("raw1") | {"eventTime": "yesterday"}
    result = read_bytes(lines(secret_read("ok1"), record), "t.jsonl")
    assert result.events["event_uid"].tolist() == ["ok1"]
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == "t.jsonl line 2"
    assert entry.reason == "invalid_time"
    assert entry.raw == orjson.dumps(record).decode()


def test_invalid_time_batch_read_once_per_record() -> None:
    batch = secret_read("b1") | {
        "eventName": "BatchGetSecretValue",
        "requestParameters": {"secretIdList": ["one", "two"]},
        "eventTime": "later",
    }
    result = read_bytes(lines(batch), "t.jsonl")
    assert len(result.events) == 0
    assert reasons(result) == Counter({"invalid_time": 1})


# --- implausible event times --------------------------------------------------------------------


@pytest.mark.parametrize(
    "time", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2005-12-31T23:59:59Z"]
)
@pytest.mark.parametrize("shape", ["json_lines", "records_file"])
def test_implausible_time_quarantined(time: str, shape: str) -> None:
    good = secret_read("ok1")
    bad = secret_read("far1") | {"eventTime": time}
    if shape == "json_lines":
        data, origin = lines(good, bad), "t.json line 2"
    else:
        data, origin = orjson.dumps({"Records": [good, bad]}), "t.json Records[2]"
    result = read_bytes(data, "t.json")
    assert result.records == 2
    assert result.events["event_uid"].tolist() == ["ok1"]
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == origin
    assert entry.reason == "invalid_time"
    assert entry.detail == (
        f"event time {time!r} is outside the plausible range: before 2006-01-01 or more than "
        "1 days 00:00:00 after this host's clock"
    )
    assert entry.raw == orjson.dumps(bad).decode()


def test_time_shortly_ahead_accepted() -> None:
    ahead = pd.Timestamp.now(tz="UTC") + MAX_FUTURE_SKEW - pd.Timedelta(hours=1)
    record = secret_read("soon1") | {"eventTime": ahead.strftime("%Y-%m-%dT%H:%M:%SZ")}
    result = read_bytes(lines(record), "t.jsonl")
    assert result.quarantined == []
    assert result.events["event_uid"].tolist() == ["soon1"]


def test_earliest_time_accepted() -> None:
    record = secret_read("old1") | {"eventTime": "2006-01-01T00:00:00Z"}
    result = read_bytes(lines(record), "t.jsonl")
    assert result.quarantined == []


# --- fast path set aside ------------------------------------------------------------------------


def test_fast_path_record_error_uses_record_path() -> None:
    bad = secret_read("x1") | {"userIdentity": IDENTITY | {"userName": 7}}
    result = read_bytes(orjson.dumps({"Records": [secret_read("ok1"), bad]}), "t.json")
    assert result.events["event_uid"].tolist() == ["ok1"]
    assert [(q.origin, q.reason, q.detail) for q in result.quarantined] == [
        (
            "t.json Records[2]",
            "invalid_record",
            "cloudtrail: field userIdentity.userName: expected a string, found number",
        )
    ]


# --- batches across files -----------------------------------------------------------------------


def test_batch_reader_keeps_file_order_and_counts() -> None:
    # Every file size goes to the fast path, so fast-path frames and record-path batches mix.
    reader = BatchReader(batch_rows=2, fast_path_min_bytes=0)
    reader.add(lines(secret_read("r1"), secret_read("r2"), secret_read("r3")), "one.jsonl")
    reader.add(orjson.dumps({"Records": [secret_read("f1")]}), "two.json")
    reader.add(lines(secret_read("r4")) + b"{bad\n", "three.jsonl")
    reader.add(lines(secret_read("r5") | {"eventTime": "never"}), "four.jsonl")
    reader.add_unreadable("five.json", "cannot read five.json: Permission denied")
    reader.add(lines(secret_read("r1")), "six.jsonl")
    result = reader.finish()
    assert result.files == 6
    assert result.records == 8
    assert result.events["event_uid"].tolist() == ["r1", "r2", "r3", "f1", "r4"]
    assert result.events["origin"].tolist() == [
        "one.jsonl line 1",
        "one.jsonl line 2",
        "one.jsonl line 3",
        "two.json Records[1]",
        "three.jsonl line 1",
    ]
    assert reasons(result) == Counter({"invalid_json": 1, "invalid_time": 1, "unreadable_file": 1})
    assert result.skipped == Counter({"duplicate": 1})
    assert result.formats == Counter({"cloudtrail": 7})
    assert check_events(result.events) == []


def test_read_paths_equals_per_file_reads(tmp_path: Path) -> None:
    contents = {
        "a.jsonl": lines(secret_read("p1"), secret_read("p2")),
        "b.json": orjson.dumps({"Records": [secret_read("p3")]}),
        "c.jsonl": lines(secret_read("p4"), secret_read("p2")),
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    result = read_paths([tmp_path])
    expected = pd.concat(
        [read_bytes(data, str(tmp_path / name)).events for name, data in contents.items()],
        ignore_index=True,
    ).drop_duplicates(["event_uid", "resource"], ignore_index=True)
    pd.testing.assert_frame_equal(result.events, expected)
    assert result.records == 5
    assert result.skipped == Counter({"duplicate": 1})


def test_parser_bug_quarantines_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.formats.gcp_audit import GcpAuditFormat

    def broken(self: GcpAuditFormat, record: Any, origin: str) -> Any:
        raise KeyError("resourceName")

    monkeypatch.setattr(GcpAuditFormat, "normalize", broken)
    entry = {
        "insertId": "a1",
        "timestamp": "2026-10-01T00:00:00Z",
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": "secretmanager.googleapis.com",
            "methodName": "google.cloud.secretmanager.v1.SecretManagerService.AccessSecretVersion",
        },
    }
    data = orjson.dumps(entry) + b"\n" + orjson.dumps(entry | {"insertId": "a2"}) + b"\n"

    result = read_bytes(data, "sink.json")

    assert result.records == 2
    assert len(result.events) == 0
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        ("sink.json line 1", "parser_error"),
        ("sink.json line 2", "parser_error"),
    ]
    assert result.quarantined[0].detail == "gcp_audit failed: KeyError: 'resourceName'"
    assert "log format gcp_audit failed on the record at sink.json line 1" in caplog.text


def test_fast_path_bug_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from pipeline.formats.cloudtrail import CloudTrailFormat

    def broken(self: CloudTrailFormat, data: bytes, origin: str) -> Any:
        raise IndexError("bug in the fast path")

    event = {
        "eventVersion": "1.09",
        "eventID": "e-1",
        "eventTime": "2026-10-01T10:00:00Z",
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "198.51.100.7",
        "userIdentity": {"type": "IAMUser", "userName": "alice", "accountId": "111122223333"},
        "requestParameters": {"secretId": "prod/db"},
        "recipientAccountId": "111122223333",
    }
    path = tmp_path / "trail.json.gz"
    path.write_bytes(gzip.compress(orjson.dumps({"Records": [event] * 200})))
    monkeypatch.setattr(CloudTrailFormat, "read_fast", broken)
    monkeypatch.setattr(CloudTrailFormat, "fast_batch", lambda self: None)

    result = read_paths([path])

    assert result.records == 200
    assert result.events["event_uid"].tolist() == ["e-1"]
    assert result.skipped["duplicate"] == 199
    assert "failed on" in caplog.text
    assert "IndexError: bug in the fast path" in caplog.text


def test_fast_batch_bug_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import pipeline.formats.cloudtrail as cloudtrail

    def broken(parts: Any) -> Any:
        raise IndexError("bug in the batch build")

    events = [
        {
            "eventVersion": "1.09",
            "eventID": f"e-{index}",
            "eventTime": "2026-10-01T10:00:00Z",
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "GetSecretValue",
            "sourceIPAddress": "198.51.100.7",
            "userIdentity": {"type": "IAMUser", "userName": "alice", "accountId": "111122223333"},
            "requestParameters": {"secretId": "prod/db"},
        }
        for index in range(3)
    ]
    for index, event in enumerate(events):
        (tmp_path / f"trail-{index}.json").write_bytes(orjson.dumps({"Records": [event]}))
    monkeypatch.setattr(cloudtrail, "_build_batch", broken)

    result = read_paths([tmp_path])

    assert result.files == 3
    assert result.records == 3
    assert sorted(result.events["event_uid"]) == ["e-0", "e-1", "e-2"]
    assert result.quarantined == []
    assert "IndexError: bug in the batch build" in caplog.text
