"""Tests of silences: matchers, expiry parsing, the SQLite store and applying them to findings."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.alerting.silences import (
    SILENCED_BY,
    InvalidSilenceError,
    Matcher,
    Silence,
    SilenceNotFoundError,
    SilenceStore,
    apply_silences,
    format_duration,
    parse_duration,
    parse_expiry,
    parse_matcher,
)
from pipeline.store.state import State

NOW = dt.datetime(2026, 11, 3, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def finding(finding_id: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "finding_id": finding_id,
        "detector": "keytrail.off_hours",
        "severity": "medium",
        "principal": "alice@example.com",
        "cloud": "aws",
        "account": "123456789012",
        "resources": ["arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"],
        "source_ips": ["203.0.113.7"],
    }
    row.update(fields)
    return row


def findings_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def make_silence(*matchers: str, silence_id: str = "0000000a", **fields: Any) -> Silence:
    values: dict[str, Any] = {
        "id": silence_id,
        "matchers": [parse_matcher(text) for text in matchers],
        "owner": "alice@example.com",
        "reason": "deploy window",
        "starts_at": NOW - HOUR,
        "ends_at": NOW + 4 * HOUR,
        "created_at": NOW - HOUR,
    }
    values.update(fields)
    return Silence(**values)


def silenced_ids(frame: pd.DataFrame, *silences: Silence) -> list[str]:
    _, silenced = apply_silences(frame, silences, NOW)
    return list(silenced["finding_id"])


# --- matchers ----------------------------------------------------------------------------------


def test_parse_matcher_exact() -> None:
    assert parse_matcher("detector=keytrail.off_hours") == Matcher(
        label="detector", value="keytrail.off_hours", regex=False
    )


def test_parse_matcher_regex() -> None:
    matcher = parse_matcher("principal=~ci-.*")

    assert matcher == Matcher(label="principal", value="ci-.*", regex=True)
    assert str(matcher) == "principal=~ci-.*"


def test_parse_matcher_value_with_equals_sign() -> None:
    assert parse_matcher("resource=a=b").value == "a=b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "detector",
            "invalid matcher 'detector': expected LABEL=VALUE or LABEL=~REGEX, for example "
            "detector=keytrail.off_hours",
        ),
        (
            "=x",
            "invalid matcher '=x': expected LABEL=VALUE or LABEL=~REGEX, for example "
            "detector=keytrail.off_hours",
        ),
        (
            "user=bob",
            "invalid matcher 'user=bob': unknown label; expected one of detector, principal, "
            "cloud, account, severity, resource, source_ip",
        ),
        ("principal=", "invalid matcher 'principal=': the value is empty"),
        ("principal=~", "invalid matcher 'principal=~': the value is empty"),
        (
            "principal!=bob",
            "invalid matcher 'principal!=bob': negative matchers (!= and !~) are not supported",
        ),
        (
            "principal=~ci-(",
            "invalid matcher 'principal=~ci-(': invalid regular expression 'ci-(' for label "
            "principal: missing ), unterminated subpattern at position 3",
        ),
    ],
)
def test_parse_matcher_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidSilenceError) as caught:
        parse_matcher(text)

    assert str(caught.value) == message


# --- durations and expiry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", dt.timedelta(seconds=45)),
        ("90m", dt.timedelta(minutes=90)),
        ("2h", dt.timedelta(hours=2)),
        ("3d", dt.timedelta(days=3)),
        ("1w", dt.timedelta(weeks=1)),
        ("1d12h", dt.timedelta(days=1, hours=12)),
        (" 4H ", dt.timedelta(hours=4)),
    ],
)
def test_parse_duration(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "4", "h", "4x", "-4h", "4h ago", "0h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidSilenceError):
        parse_duration(text)


def test_parse_expiry_duration() -> None:
    assert parse_expiry("4h", NOW) == dt.datetime(2026, 11, 3, 16, 0, tzinfo=dt.UTC)


def test_parse_expiry_iso_with_zone() -> None:
    expected = dt.datetime(2026, 11, 3, 16, 30, tzinfo=dt.UTC)

    assert parse_expiry("2026-11-03T18:30:00+02:00", NOW) == expected


def test_parse_expiry_iso_without_zone_is_utc() -> None:
    assert parse_expiry("2026-11-04T08:00:00", NOW) == dt.datetime(2026, 11, 4, 8, tzinfo=dt.UTC)


def test_parse_expiry_rejects_text() -> None:
    with pytest.raises(InvalidSilenceError) as caught:
        parse_expiry("tomorrow", NOW)

    assert str(caught.value) == (
        "invalid expiry 'tomorrow': expected a duration such as 4h, 3d or 1w, or an ISO 8601 "
        "time such as 2026-12-31T18:00:00Z"
    )


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (dt.timedelta(seconds=45), "45s"),
        (dt.timedelta(minutes=5), "5m"),
        (dt.timedelta(hours=2, minutes=5, seconds=9), "2h 5m"),
        (dt.timedelta(hours=3), "3h"),
        (dt.timedelta(days=3, hours=4, minutes=1), "3d 4h"),
        (dt.timedelta(days=30), "30d"),
    ],
)
def test_format_duration(delta: dt.timedelta, text: str) -> None:
    assert format_duration(delta) == text


# --- the model ---------------------------------------------------------------------------------


def test_silence_generates_short_id() -> None:
    silence = Silence(
        matchers=[parse_matcher("cloud=aws")],
        owner="a",
        reason="b",
        starts_at=NOW,
        ends_at=NOW + HOUR,
    )

    assert re.fullmatch(r"[0-9a-f]{8}", silence.id) is not None


def test_silence_rejects_unknown_field() -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        make_silence("cloud=aws", comment="x")


def test_silence_rejects_blank_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        make_silence("cloud=aws", reason="   ")


def test_silence_requires_matcher() -> None:
    with pytest.raises(ValueError, match="matchers"):
        make_silence()


def test_silence_requires_ends_at() -> None:
    with pytest.raises(ValueError, match="ends_at"):
        Silence(matchers=[parse_matcher("cloud=aws")], owner="a", reason="b")  # type: ignore[call-arg]


def test_silence_status_over_time() -> None:
    silence = make_silence("cloud=aws", starts_at=NOW, ends_at=NOW + HOUR)

    assert silence.status(NOW - HOUR) == "pending"
    assert silence.status(NOW) == "active"
    assert silence.status(NOW + HOUR) == "expired"
    assert silence.is_active(NOW + HOUR / 2)
    assert not silence.is_active(NOW + HOUR)


# --- the store ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> SilenceStore:
    return SilenceStore(tmp_path / "state" / "state.db")


def test_store_round_trip(store: SilenceStore) -> None:
    silence = make_silence("detector=keytrail.off_hours", "principal=~ci-.*")

    silence_id = store.add(silence, now=NOW)

    assert silence_id == "0000000a"
    assert store.list(active_only=True, now=NOW) == [silence]
    assert store.active(NOW) == [silence]
    assert store.get("0000000a") == silence


def test_store_expire_ends_silence_now(store: SilenceStore) -> None:
    store.add(make_silence("cloud=aws"), now=NOW)
    later = NOW + HOUR

    expired = store.expire("0000000a", later)

    assert expired.ends_at == later
    assert store.get("0000000a").ends_at == later
    assert store.active(later) == []
    assert [item.id for item in store.list(active_only=False, now=later)] == ["0000000a"]


def test_store_expire_pending_silence(store: SilenceStore) -> None:
    store.add(make_silence("cloud=aws", starts_at=NOW + HOUR, ends_at=NOW + 2 * HOUR), now=NOW)

    expired = store.expire("0000000a", NOW)

    assert expired.starts_at == NOW
    assert expired.ends_at == NOW
    assert expired.status(NOW) == "expired"


def test_store_expire_unknown_id(store: SilenceStore) -> None:
    with pytest.raises(SilenceNotFoundError) as caught:
        store.expire("deadbeef", NOW)

    assert str(caught.value) == (
        f"silence 'deadbeef' not found in {store.path}; "
        "`keytrail silence list --all` shows every id"
    )


def test_store_expire_twice(store: SilenceStore) -> None:
    store.add(make_silence("cloud=aws"), now=NOW)
    store.expire("0000000a", NOW)

    with pytest.raises(InvalidSilenceError) as caught:
        store.expire("0000000a", NOW + HOUR)

    assert str(caught.value) == "silence 0000000a already expired at 2026-11-03T12:00:00+00:00"


def test_store_list_active_only_and_all(store: SilenceStore) -> None:
    store.add(make_silence("cloud=aws", silence_id="0000000a"), now=NOW)
    store.add(make_silence("cloud=gcp", silence_id="0000000b", ends_at=NOW + HOUR), now=NOW)
    later = NOW + 2 * HOUR

    assert [item.id for item in store.list(active_only=True, now=later)] == ["0000000a"]
    assert [item.id for item in store.list(active_only=False, now=later)] == [
        "0000000b",
        "0000000a",
    ]


def test_store_rejects_past_expiry(store: SilenceStore) -> None:
    with pytest.raises(InvalidSilenceError) as caught:
        store.add(make_silence("cloud=aws", ends_at=NOW - HOUR / 2), now=NOW)

    assert str(caught.value) == (
        "expiry 2026-11-03T11:30:00+00:00 is not in the future (now 2026-11-03T12:00:00+00:00); "
        "give a duration such as 4h or a later time"
    )
    assert store.list(active_only=False) == []


def test_store_rejects_too_long(store: SilenceStore) -> None:
    with pytest.raises(InvalidSilenceError) as caught:
        store.add(make_silence("cloud=aws", ends_at=NOW + dt.timedelta(days=31)), now=NOW)

    assert str(caught.value) == (
        "silence would last 31d, longer than the maximum 30d; choose an earlier expiry"
    )


def test_store_accepts_configured_max_duration(store: SilenceStore) -> None:
    silence = make_silence("cloud=aws", ends_at=NOW + dt.timedelta(days=60))

    assert store.add(silence, now=NOW, max_duration=dt.timedelta(days=90)) == "0000000a"


def test_store_rejects_duplicate_id(store: SilenceStore) -> None:
    store.add(make_silence("cloud=aws"), now=NOW)

    with pytest.raises(InvalidSilenceError, match="a silence with id 0000000a exists"):
        store.add(make_silence("cloud=gcp"), now=NOW)


def test_store_shares_file_with_run_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SilenceStore(path).add(make_silence("cloud=aws"), now=NOW)

    with State(path) as state:
        assert state.seen_count() == 0
    with sqlite3.connect(path) as conn:
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}

    assert journal == "wal"
    assert {"silences", "seen_events", "checkpoints"} <= tables
    assert [item.id for item in SilenceStore(path).active(NOW)] == ["0000000a"]


# --- applying ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matcher", "matching", "other"),
    [
        ("detector=keytrail.off_hours", {}, {"detector": "keytrail.new_country"}),
        ("principal=alice@example.com", {}, {"principal": "bob@example.com"}),
        ("cloud=aws", {}, {"cloud": "gcp"}),
        ("account=123456789012", {}, {"account": "210987654321"}),
        ("severity=medium", {}, {"severity": "high"}),
        (
            "resource=projects/p/secrets/api-key",
            {"resources": ["projects/p/secrets/db", "projects/p/secrets/api-key"]},
            {"resources": ["projects/p/secrets/db"]},
        ),
        (
            "source_ip=198.51.100.4",
            {"source_ips": ["203.0.113.7", "198.51.100.4"]},
            {"source_ips": ["203.0.113.7"]},
        ),
    ],
)
def test_apply_matches_each_label(
    matcher: str, matching: dict[str, Any], other: dict[str, Any]
) -> None:
    frame = findings_frame(finding("f-match", **matching), finding("f-other", **other))

    kept, silenced = apply_silences(frame, [make_silence(matcher)], NOW)

    assert list(silenced["finding_id"]) == ["f-match"]
    assert list(silenced[SILENCED_BY]) == ["0000000a"]
    assert list(kept["finding_id"]) == ["f-other"]
    assert SILENCED_BY not in kept.columns


def test_apply_regex_is_anchored() -> None:
    frame = findings_frame(
        finding("f-ci", principal="ci-deploy"),
        finding("f-prefix", principal="xci-deploy"),
        finding("f-suffix", principal="ci"),
    )

    assert silenced_ids(frame, make_silence("principal=~ci-.*")) == ["f-ci"]
    assert silenced_ids(frame, make_silence("principal=~ci")) == ["f-suffix"]


def test_apply_regex_over_resources() -> None:
    frame = findings_frame(
        finding("f-prod", resources=["projects/p/secrets/dev-db", "projects/p/secrets/prod-db"]),
        finding("f-dev", resources=["projects/p/secrets/dev-db"]),
        finding("f-none", resources=[]),
    )

    assert silenced_ids(frame, make_silence("resource=~.*/prod-.*")) == ["f-prod"]


def test_apply_exact_is_not_a_pattern() -> None:
    frame = findings_frame(
        finding("f-literal", principal="ci-.*"), finding("f-ci", principal="ci-a")
    )

    assert silenced_ids(frame, make_silence("principal=ci-.*")) == ["f-literal"]


def test_apply_missing_principal_never_matches() -> None:
    frame = findings_frame(finding("f-none", principal=None))

    assert silenced_ids(frame, make_silence("principal=~.*")) == []


def test_apply_matchers_are_anded() -> None:
    frame = findings_frame(
        finding("f-both", principal="ci-deploy"),
        finding("f-detector-only", principal="alice@example.com"),
        finding("f-principal-only", principal="ci-deploy", detector="keytrail.new_country"),
    )
    silence = make_silence("detector=keytrail.off_hours", "principal=~ci-.*")

    assert silenced_ids(frame, silence) == ["f-both"]


def test_apply_expired_silence_no_longer_applies() -> None:
    frame = findings_frame(finding("f-1"))
    expired = make_silence("cloud=aws", starts_at=NOW - 3 * HOUR, ends_at=NOW - HOUR)

    kept, silenced = apply_silences(frame, [expired], NOW)

    assert list(kept["finding_id"]) == ["f-1"]
    assert len(silenced) == 0
    assert list(silenced.columns) == [*frame.columns, SILENCED_BY]


def test_apply_ends_at_is_exclusive() -> None:
    frame = findings_frame(finding("f-1"))
    silence = make_silence("cloud=aws", ends_at=NOW)

    assert silenced_ids(frame, silence) == []


def test_apply_pending_silence_does_not_apply() -> None:
    frame = findings_frame(finding("f-1"))
    pending = make_silence("cloud=aws", starts_at=NOW + HOUR, ends_at=NOW + 2 * HOUR)

    assert silenced_ids(frame, pending) == []


def test_apply_credits_first_matching_silence() -> None:
    frame = findings_frame(finding("f-1"), finding("f-2", cloud="gcp"))
    first = make_silence("cloud=aws", silence_id="0000000a")
    second = make_silence("severity=medium", silence_id="0000000b")

    _, silenced = apply_silences(frame, [first, second], NOW)

    assert list(silenced["finding_id"]) == ["f-1", "f-2"]
    assert list(silenced[SILENCED_BY]) == ["0000000a", "0000000b"]


def test_apply_empty_findings() -> None:
    frame = findings_frame(finding("f-1")).iloc[0:0]

    kept, silenced = apply_silences(frame, [make_silence("cloud=aws")], NOW)

    assert len(kept) == 0
    assert len(silenced) == 0


def test_apply_keeps_index_fresh() -> None:
    frame = findings_frame(finding("f-1"), finding("f-2", cloud="gcp"))
    frame.index = [10, 20]

    kept, silenced = apply_silences(frame, [make_silence("cloud=gcp")], NOW)

    assert list(kept.index) == [0]
    assert list(silenced.index) == [0]
    assert list(silenced["finding_id"]) == ["f-2"]
