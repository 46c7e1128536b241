"""Tests for the Parquet event history."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detectors.base import ROLLUP_COLUMNS, FrameHistory, HistoryView
from pipeline.schema import ARROW_SCHEMA, COLUMNS, empty_events, events_from_rows
from pipeline.store.history import (
    ROLLUP_SCHEMA,
    CappedHistoryView,
    History,
    _merge_rows,
    _narrow_indices,
    _order_by_first_row,
)


def row(uid: str, time: str, cloud: str, **values: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_uid": uid,
        "time": time,
        "cloud": cloud,
        "log_format": {"aws": "cloudtrail", "gcp": "gcp_audit", "azure": "azure_keyvault"}[cloud],
        "operation": "GetSecretValue",
        "action": "read",
        "outcome": "success",
        "principal": "alice@example.com",
        "resource": f"secret-{uid}",
        "source_ip": "203.0.113.7",
        "source_kind": "public",
        "origin": f"fixture.json:{uid}",
    }
    fields.update(values)
    return fields


@pytest.fixture
def first_run() -> pd.DataFrame:
    return events_from_rows(
        [
            row("a2", "2024-05-01T23:59:59.999999Z", "aws", geo_lat=52.5, asn=64500),
            row("a1", "2024-05-01T08:00:00Z", "aws", geo_country="DE"),
            row("g1", "2024-05-01T09:30:00Z", "gcp"),
            row("a3", "2024-05-02T00:00:00Z", "aws"),
        ]
    )


@pytest.fixture
def second_run() -> pd.DataFrame:
    return events_from_rows(
        [
            row("z1", "2024-05-02T12:00:00Z", "azure"),
            row("a4", "2024-05-03T06:15:00Z", "aws"),
        ]
    )


@pytest.fixture
def history(tmp_path: Path, first_run: pd.DataFrame, second_run: pd.DataFrame) -> History:
    store = History(tmp_path / "history")
    store.append(first_run, "run-1")
    store.append(second_run, "run-2")
    return store


def relative_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.parquet"))


def test_append_writes_one_file_per_partition(tmp_path: Path, first_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")

    written = store.append(first_run, "run-1")

    assert written == 4
    assert relative_files(store.root) == [
        "date=2024-05-01/cloud=aws/run-1.parquet",
        "date=2024-05-01/cloud=gcp/run-1.parquet",
        "date=2024-05-02/cloud=aws/run-1.parquet",
        "rollup/date=2024-05-01/cloud=aws/run-1.parquet",
        "rollup/date=2024-05-01/cloud=gcp/run-1.parquet",
        "rollup/date=2024-05-02/cloud=aws/run-1.parquet",
    ]


def test_append_file_stores_schema(tmp_path: Path, first_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")
    store.append(first_run, "run-1")

    stored = pq.read_table(store.root / "date=2024-05-01/cloud=aws/run-1.parquet")

    assert stored.schema.equals(ARROW_SCHEMA)
    assert stored.schema.metadata is None
    assert stored.column("event_uid").to_pylist() == ["a1", "a2"]


def test_append_same_run_twice_keeps_both(tmp_path: Path, second_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")
    store.append(second_run, "run-2")
    store.append(second_run.iloc[:1], "run-2")

    assert relative_files(store.root) == [
        "date=2024-05-02/cloud=azure/run-2.1.parquet",
        "date=2024-05-02/cloud=azure/run-2.parquet",
        "date=2024-05-03/cloud=aws/run-2.parquet",
        "rollup/date=2024-05-02/cloud=azure/run-2.1.parquet",
        "rollup/date=2024-05-02/cloud=azure/run-2.parquet",
        "rollup/date=2024-05-03/cloud=aws/run-2.parquet",
    ]
    assert store.events()["event_uid"].tolist() == ["z1", "z1", "a4"]


def test_append_empty_frame_writes_nothing(tmp_path: Path) -> None:
    store = History(tmp_path / "history")

    assert store.append(empty_events(), "run-1") == 0
    assert not store.root.exists()


def test_append_rejects_invalid_run_id(tmp_path: Path, first_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")
    for run_id in ("", "../escape", "run.1", "a b"):
        with pytest.raises(ValueError, match=r"^invalid run id "):
            store.append(first_run, run_id)
    assert not store.root.exists()


def test_append_rejects_unknown_cloud(tmp_path: Path) -> None:
    events = events_from_rows([row("x1", "2024-05-01T00:00:00Z", "aws")])
    events["cloud"] = pd.Series(["oci"], dtype=events["cloud"].dtype)
    store = History(tmp_path / "history")

    with pytest.raises(ValueError) as raised:
        store.append(events, "run-1")

    assert (
        str(raised.value) == "invalid cloud values ['oci']; expected one of ['aws', 'gcp', 'azure']"
    )


def test_append_rejects_missing_columns(tmp_path: Path, first_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")
    with pytest.raises(ValueError, match=r"^events frame is missing columns: asn, as_org$"):
        store.append(first_run.drop(columns=["asn", "as_org"]), "run-1")


def test_round_trip_returns_schema_dtypes(history: History) -> None:
    events = history.events()

    assert list(events.columns) == list(COLUMNS)
    assert events.dtypes.to_dict() == empty_events().dtypes.to_dict()
    assert events["event_uid"].tolist() == ["a1", "g1", "a2", "a3", "z1", "a4"]
    assert events["cloud"].tolist() == ["aws", "gcp", "aws", "aws", "azure", "aws"]
    first = events.iloc[0]
    assert first["time"] == pd.Timestamp("2024-05-01T08:00:00Z")
    assert first["geo_country"] == "DE"
    assert first["session_name"] is pd.NA
    last_day_one = events.iloc[2]
    assert last_day_one["time"] == pd.Timestamp("2024-05-01T23:59:59.999999Z")
    assert last_day_one["geo_lat"] == 52.5
    assert last_day_one["asn"] == 64500


def test_round_trip_equals_input(
    history: History, first_run: pd.DataFrame, second_run: pd.DataFrame
) -> None:
    expected = (
        pd.concat([first_run, second_run], ignore_index=True)
        .sort_values("time", kind="stable")
        .reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(history.events(), expected)


def test_events_since_until_bounds(history: History) -> None:
    since = pd.Timestamp("2024-05-01T09:30:00Z")
    until = pd.Timestamp("2024-05-02T12:00:00Z")

    events = history.events(since=since, until=until)

    # since is inclusive (g1 at 09:30), until is exclusive (z1 at 12:00).
    assert events["event_uid"].tolist() == ["g1", "a2", "a3"]


def test_events_day_boundary_partition(history: History) -> None:
    events = history.events(
        since=pd.Timestamp("2024-05-02T00:00:00Z"), until=pd.Timestamp("2024-05-03T00:00:00Z")
    )
    assert events["event_uid"].tolist() == ["a3", "z1"]


def test_events_naive_bounds_are_utc(history: History) -> None:
    events = history.events(since=datetime(2024, 5, 3), until=datetime(2024, 5, 4))
    assert events["event_uid"].tolist() == ["a4"]


def test_events_until_only(history: History) -> None:
    events = history.events(until=datetime(2024, 5, 1, 9, 30, tzinfo=UTC))
    assert events["event_uid"].tolist() == ["a1"]


def test_events_selected_columns(history: History) -> None:
    events = history.events(
        since=pd.Timestamp("2024-05-02T00:00:00Z"), columns=["principal", "event_uid", "asn"]
    )

    assert list(events.columns) == ["principal", "event_uid", "asn"]
    assert events["event_uid"].tolist() == ["a3", "z1", "a4"]
    assert (
        events.dtypes.to_dict()
        == empty_events().dtypes[["principal", "event_uid", "asn"]].to_dict()
    )


def test_events_unknown_column_rejected(history: History) -> None:
    with pytest.raises(ValueError, match=r"^unknown history columns \['country'\]; known: "):
        history.events(columns=["event_uid", "country"])


def test_events_range_without_data(history: History) -> None:
    events = history.events(since=pd.Timestamp("2025-01-01T00:00:00Z"), columns=["time", "cloud"])

    assert len(events) == 0
    assert list(events.columns) == ["time", "cloud"]
    assert events.dtypes.to_dict() == empty_events().dtypes[["time", "cloud"]].to_dict()


def test_empty_history_returns_empty_frame(tmp_path: Path) -> None:
    store = History(tmp_path / "never-written")

    events = store.events()

    assert len(events) == 0
    assert events.dtypes.to_dict() == empty_events().dtypes.to_dict()
    assert store.span() is None


def test_history_is_a_history_view(history: History) -> None:
    view: HistoryView = history
    assert len(view.events(since=pd.Timestamp("2024-05-03T00:00:00Z"))) == 1


def test_span_covers_first_and_last_event(history: History) -> None:
    assert history.span() == (
        pd.Timestamp("2024-05-01T08:00:00Z"),
        pd.Timestamp("2024-05-03T06:15:00Z"),
    )


def test_expire_removes_old_partitions(history: History) -> None:
    removed = history.expire(date(2024, 5, 2))

    assert removed == 1
    assert relative_files(history.root) == [
        "date=2024-05-02/cloud=aws/run-1.parquet",
        "date=2024-05-02/cloud=azure/run-2.parquet",
        "date=2024-05-03/cloud=aws/run-2.parquet",
        "rollup/date=2024-05-02/cloud=aws/run-1.parquet",
        "rollup/date=2024-05-02/cloud=azure/run-2.parquet",
        "rollup/date=2024-05-03/cloud=aws/run-2.parquet",
    ]
    assert history.events()["event_uid"].tolist() == ["a3", "z1", "a4"]
    assert history.span() == (
        pd.Timestamp("2024-05-02T00:00:00Z"),
        pd.Timestamp("2024-05-03T06:15:00Z"),
    )


def test_expire_nothing_old(history: History) -> None:
    assert history.expire(date(2024, 5, 1)) == 0
    assert len(history.events()) == 6


def test_delete_run_removes_its_files(history: History) -> None:
    removed = history.delete_run("run-2")

    assert removed == 2
    assert relative_files(history.root) == [
        "date=2024-05-01/cloud=aws/run-1.parquet",
        "date=2024-05-01/cloud=gcp/run-1.parquet",
        "date=2024-05-02/cloud=aws/run-1.parquet",
        "rollup/date=2024-05-01/cloud=aws/run-1.parquet",
        "rollup/date=2024-05-01/cloud=gcp/run-1.parquet",
        "rollup/date=2024-05-02/cloud=aws/run-1.parquet",
    ]
    # The partitions that only run-2 wrote are gone, not left empty.
    assert not (history.root / "date=2024-05-03").exists()
    assert not (history.root / "date=2024-05-02/cloud=azure").exists()
    assert history.events()["event_uid"].tolist() == ["a1", "g1", "a2", "a3"]


def test_delete_run_removes_temporary_files(history: History) -> None:
    leftover = history.root / "date=2024-05-03/cloud=aws/.run-3.parquet.tmp"
    leftover.write_bytes(b"half a parquet file")

    # A crashed write is invisible to readers.
    assert history.events()["event_uid"].tolist()[-1] == "a4"

    assert history.delete_run("run-3") == 0
    assert not leftover.exists()
    assert len(history.events()) == 6


def test_delete_run_does_not_match_prefix(history: History, second_run: pd.DataFrame) -> None:
    history.append(second_run, "run")

    assert history.delete_run("run") == 2
    assert len(history.events()) == 6


def test_delete_unknown_run(history: History) -> None:
    assert history.delete_run("run-9") == 0
    assert len(history.events()) == 6


def test_run_ids_lists_writers(history: History, second_run: pd.DataFrame) -> None:
    history.append(second_run, "run-2")  # a second file of run-2: "run-2.1.parquet"
    (history.root / "date=2024-05-03/cloud=aws/.run-3.parquet.tmp").write_bytes(b"partial")

    assert history.run_ids() == {"run-1", "run-2", "run-3"}


def test_run_ids_empty_history(tmp_path: Path) -> None:
    assert History(tmp_path / "absent").run_ids() == set()


def hourly_reads() -> pd.DataFrame:
    """Return reads of two principals at :10, :20 and :50 of each hour from 22:00 to 02:00."""
    rows = []
    for hour in pd.date_range("2024-05-01T22:00:00Z", "2024-05-02T02:00:00Z", freq="h"):
        for minute, principal in ((10, "alice"), (20, "alice"), (50, "bob")):
            moment = hour + pd.Timedelta(minutes=minute)
            rows.append(
                row(f"{principal}-{moment:%d%H%M}", moment.isoformat(), "aws", principal=principal)
            )
    return events_from_rows(rows)


def sorted_rollup(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [name for name in frame.columns if name not in ("count", "first_time", "last_time")]
    # Stored reads give categorical text keys, FrameHistory gives strings: compare as strings.
    ordered = frame.astype({name: pd.StringDtype("pyarrow") for name in keys if name != "hour"})
    return ordered.sort_values(keys, kind="stable", na_position="first").reset_index(drop=True)


def test_rollup_file_stores_schema(tmp_path: Path, first_run: pd.DataFrame) -> None:
    store = History(tmp_path / "history")
    store.append(first_run, "run-1")

    stored = pq.read_table(store.root / "rollup/date=2024-05-01/cloud=aws/run-1.parquet")

    assert stored.schema.equals(ROLLUP_SCHEMA)
    assert stored.column_names == list(ROLLUP_COLUMNS)
    assert sorted(stored.column("count").to_pylist()) == [1, 1]


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (None, None),
        ("2024-05-01T23:00:00Z", "2024-05-02T01:00:00Z"),
        ("2024-05-01T22:15:00Z", "2024-05-02T01:15:00Z"),
        ("2024-05-01T23:12:00Z", "2024-05-01T23:55:00Z"),
        ("2024-05-02T00:00:00Z", None),
    ],
)
def test_rollup_equals_rollup_of_events(
    tmp_path: Path, since: str | None, until: str | None
) -> None:
    events = hourly_reads()
    store = History(tmp_path / "history")
    store.append(events, "run-1")
    start = None if since is None else pd.Timestamp(since)
    end = None if until is None else pd.Timestamp(until)

    stored = store.rollup(since=start, until=end)
    expected = FrameHistory(events).rollup(since=start, until=end)

    assert list(stored.columns) == list(ROLLUP_COLUMNS)
    pd.testing.assert_frame_equal(sorted_rollup(stored), sorted_rollup(expected))


def test_rollup_columns_merge_runs(tmp_path: Path) -> None:
    events = hourly_reads()
    store = History(tmp_path / "history")
    store.append(events.iloc[::2], "run-1")
    store.append(events.iloc[1::2], "run-2")

    per_hour = store.rollup(columns=["hour", "principal", "count", "first_time"])

    alice = per_hour[per_hour["principal"] == "alice"].sort_values("hour")
    assert alice["count"].tolist() == [2, 2, 2, 2, 2]
    assert alice["first_time"].dt.minute.tolist() == [10, 10, 10, 10, 10]
    assert str(per_hour["hour"].dtype) == "datetime64[us, UTC]"
    assert str(per_hour["principal"].dtype) == "category"
    assert store.rollup(columns=["count"])["count"].tolist() == [15]


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (None, None),
        ("2024-05-01T22:15:00Z", "2024-05-02T01:15:00Z"),
        ("2024-05-01T23:12:00Z", "2024-05-01T23:55:00Z"),
    ],
)
def test_rollup_text_keys_are_categorical(
    tmp_path: Path, since: str | None, until: str | None
) -> None:
    # Stored hours, hours cut by the bounds (rolled up from raw events) and both together
    # give the same dtypes, so their categories unite instead of falling back to objects.
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    start = None if since is None else pd.Timestamp(since)
    end = None if until is None else pd.Timestamp(until)

    rolled = store.rollup(
        since=start, until=end, columns=["hour", "principal", "resource", "count"]
    )
    empty = store.rollup(since=pd.Timestamp("2030-01-01T00:00:00Z"), columns=["principal", "count"])

    assert [str(rolled[name].dtype) for name in rolled.columns] == [
        "datetime64[us, UTC]",
        "category",
        "category",
        "int64",
    ]
    assert sorted(rolled["principal"].unique().tolist()) == ["alice", "bob"]
    assert str(empty["principal"].dtype) == "category"
    assert len(empty) == 0


def test_rollup_reads_only_partitions_in_range(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    # A broken file in a partition outside the range is never opened.
    (store.root / "rollup/date=2024-05-01/cloud=aws/run-1.parquet").write_bytes(b"not parquet")

    later = store.rollup(since=pd.Timestamp("2024-05-02T00:00:00Z"), columns=["count"])

    assert later["count"].tolist() == [9]


def test_rollup_unknown_column_rejected(history: History) -> None:
    with pytest.raises(ValueError, match=r"unknown rollup columns \['bytes'\]; known: hour, "):
        history.rollup(columns=["bytes"])


def test_missing_rollup_is_built_once(tmp_path: Path) -> None:
    events = hourly_reads()
    store = History(tmp_path / "history")
    store.append(events, "run-1")
    rollup_folder = store.root / "rollup"
    for path in rollup_folder.rglob("*.parquet"):
        path.unlink()

    rebuilt = store.rollup(columns=["principal", "count"])

    assert sorted(zip(rebuilt["principal"], rebuilt["count"], strict=True)) == [
        ("alice", 10),
        ("bob", 5),
    ]
    assert sorted(
        str(path.relative_to(rollup_folder)) for path in rollup_folder.rglob("*.parquet")
    ) == [
        "date=2024-05-01/cloud=aws/run-1.parquet",
        "date=2024-05-02/cloud=aws/run-1.parquet",
    ]


def test_missing_rollup_computed_when_unwritable(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    rollup_folder = store.root / "rollup"
    shutil.rmtree(rollup_folder)
    # A file where the rollup folder belongs makes every rollup write fail, even for root.
    rollup_folder.write_bytes(b"")

    assert store.rollup(columns=["count"])["count"].tolist() == [15]
    assert store.rollup(columns=["count"])["count"].tolist() == [15]
    assert rollup_folder.is_file()


def test_rollup_without_events_twin_ignored(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    (store.root / "date=2024-05-02/cloud=aws/run-1.parquet").unlink()

    assert store.rollup(columns=["count"])["count"].tolist() == [6]


def test_delete_run_removes_rollup_files(history: History) -> None:
    history.delete_run("run-2")

    assert not (history.root / "rollup/date=2024-05-03").exists()
    assert history.rollup(columns=["count"])["count"].tolist() == [4]


def test_rollup_of_empty_history(tmp_path: Path) -> None:
    frame = History(tmp_path / "absent").rollup()
    assert list(frame.columns) == list(ROLLUP_COLUMNS)
    assert frame.empty
    assert str(frame["count"].dtype) == "int64"


def test_capped_view_stops_at_window(tmp_path: Path) -> None:
    events = hourly_reads()
    store = History(tmp_path / "history")
    store.append(events, "run-1")
    view = CappedHistoryView(store, pd.Timestamp("2024-05-02T00:15:00Z"))

    assert view.events(columns=["event_uid"])["event_uid"].tolist()[-1] == "alice-020010"
    assert view.rollup(columns=["count"])["count"].tolist() == [7]
    later = view.rollup(since=pd.Timestamp("2024-05-03T00:00:00Z"), columns=["count"])
    assert later["count"].tolist() == []


def test_capped_view_lookback_and_cache(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    view = CappedHistoryView(store, pd.Timestamp("2024-05-02T03:00:00Z"))
    short = view.for_lookback(pd.Timedelta(hours=2))

    first = short.rollup(columns=["principal", "count"])
    first["count"] = 0
    again = short.rollup(since=pd.Timestamp("2024-05-01T00:00:00Z"), columns=["principal", "count"])

    assert sorted(again["count"].tolist()) == [2, 4]
    assert short.reads == 1
    assert view.rollup(columns=["principal", "count"])["count"].sum() == 15


def test_capped_view_cache_byte_limit(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    tiny = CappedHistoryView(store, pd.Timestamp("2024-05-02T03:00:00Z"), cache_bytes=1)
    roomy = CappedHistoryView(store, pd.Timestamp("2024-05-02T03:00:00Z"))

    for view in (tiny, roomy):
        view.rollup(columns=["principal", "count"])
        view.rollup(columns=["principal", "count"])

    assert tiny.reads == 2
    assert roomy.reads == 1


def test_read_only_history_writes_no_rollup(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    shutil.rmtree(store.root / "rollup")

    reader = History(store.root, read_only=True)

    assert reader.rollup(columns=["count"])["count"].tolist() == [15]
    assert not (store.root / "rollup").exists()


def test_capped_view_rollup_matches_history(tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    until = pd.Timestamp("2024-05-02T02:30:00Z")
    view = CappedHistoryView(store, until)
    requests = [
        ("2024-05-02T00:00:00Z", ["hour", "principal", "count"]),
        ("2024-05-02T00:00:00Z", ["principal", "first_time", "last_time"]),
        ("2024-05-01T22:15:00Z", ["hour", "principal", "outcome", "count", "last_time"]),
        ("2024-05-01T23:00:00Z", ["count"]),
        ("2024-05-01T20:00:00Z", None),
    ]

    for since, columns in requests:
        start = pd.Timestamp(since)
        shared = view.rollup(since=start, columns=columns)
        direct = store.rollup(since=start, until=until, columns=columns)
        pd.testing.assert_frame_equal(shared, direct, check_exact=True)


def test_capped_view_reads_rollup_files_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = History(tmp_path / "history")
    store.append(hourly_reads(), "run-1")
    spans: list[tuple[str, str]] = []
    read_table = History._stored_table

    def counted(self: History, start: Any, end: Any, selected: list[str]) -> Any:
        spans.append((str(start), str(end)))
        return read_table(self, start, end, selected)

    monkeypatch.setattr(History, "_stored_table", counted)
    view = CappedHistoryView(store, pd.Timestamp("2024-05-02T03:00:00Z"))
    day = view.for_lookback(pd.Timedelta(hours=2))

    assert day.rollup(columns=["principal", "count"])["count"].tolist() == [4, 2]
    assert day.rollup(columns=["hour", "count"])["count"].tolist() == [3, 3]
    assert view.rollup(columns=["principal", "count"])["count"].tolist() == [10, 5]
    assert day.rollup(columns=["outcome", "count"])["count"].tolist() == [6]
    assert spans == [
        ("2024-05-02 01:00:00+00:00", "2024-05-02 03:00:00+00:00"),
        ("None", "2024-05-02 01:00:00+00:00"),
    ]


def test_narrow_indices_keeps_values() -> None:
    small = pa.array(["aws", "gcp", None, "aws"]).dictionary_encode()
    large = pa.array([f"principal-{number}" for number in range(300)]).dictionary_encode()
    table = pa.table({"cloud": small, "principal": large[:4], "count": [1, 2, 3, 4]})

    narrowed = _narrow_indices(table)

    assert narrowed.column("cloud").type.index_type == pa.int8()
    assert narrowed.column("principal").type.index_type == pa.int16()
    assert narrowed.column("count").type == pa.int64()
    assert narrowed.column("cloud").to_pylist() == ["aws", "gcp", None, "aws"]
    assert narrowed.column("principal").to_pylist() == [f"principal-{n}" for n in range(4)]


def rollup_like_table(**columns: Any) -> pa.Table:
    """Build a rollup-like table from hours since the epoch and dictionary-encoded text keys."""
    hour_us = 3_600_000_000
    arrays = {}
    for name, values in columns.items():
        if name in ("hour", "first_time", "last_time"):
            arrays[name] = pa.array([value * hour_us for value in values], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            )
        elif name == "count":
            arrays[name] = pa.array(values, pa.int64())
        else:
            arrays[name] = pa.array(values).dictionary_encode()
    return pa.table(arrays)


def test_merge_rows_keeps_first_appearance() -> None:
    table = rollup_like_table(
        hour=[5, 4, 5, 4, 5, 4],
        principal=["bob", "alice", None, "alice", "bob", None],
        count=[1, 2, 3, 4, 5, 6],
        first_time=[5, 4, 5, 4, 5, 4],
        last_time=[6, 5, 7, 8, 9, 5],
    )

    merged = _merge_rows(table, ["hour", "principal"])

    assert merged.column_names == table.column_names
    assert merged.column("principal").to_pylist() == ["bob", "alice", None, None]
    assert [value.hour for value in merged.column("hour").to_pylist()] == [5, 4, 5, 4]
    assert merged.column("count").to_pylist() == [6, 6, 3, 6]
    assert [value.hour for value in merged.column("last_time").to_pylist()] == [9, 8, 7, 5]
    assert merged.schema == table.schema


def test_merge_rows_merges_across_hours() -> None:
    table = rollup_like_table(
        principal=["carol", "alice", "alice", "carol", "alice"],
        count=[2, 1, 1, 3, 4],
        first_time=[1, 1, 2, 3, 3],
        last_time=[2, 2, 3, 4, 4],
    )

    merged = _merge_rows(table, ["principal"])

    assert merged.column("principal").to_pylist() == ["carol", "alice"]
    assert merged.column("count").to_pylist() == [5, 6]
    assert [value.hour for value in merged.column("first_time").to_pylist()] == [1, 1]
    assert [value.hour for value in merged.column("last_time").to_pylist()] == [4, 4]


def test_merge_rows_unique_rows_returns_table() -> None:
    table = rollup_like_table(hour=[1, 1, 2], principal=["alice", "bob", "alice"], count=[1, 1, 1])

    assert _merge_rows(table, ["hour", "principal"]) is table


def test_order_by_first_row_sorts_groups() -> None:
    shuffled = pa.table({"row_min": [7, 0, 3], "count_sum": [70, 0, 30]})
    ordered = pa.table({"row_min": [0, 3, 7], "count_sum": [0, 30, 70]})

    assert _order_by_first_row(shuffled).equals(ordered)
    assert _order_by_first_row(ordered) is ordered


@pytest.mark.parametrize("day_order", [True, False], ids=["days-in-order", "days-mixed"])
def test_merge_rows_by_hour_keeps_first_row_order(day_order: bool) -> None:
    # Rows in day order are merged one day at a time; mixed days take one hash aggregation.
    # Either way the groups, their sums and their order of first rows are the same.
    hours = ["2024-05-01T10", "2024-05-01T10", "2024-05-02T03", "2024-05-01T11", "2024-05-02T03"]
    principals = ["alice", "alice", "bob", "alice", "bob"]
    counts = [1, 2, 3, 4, 5]
    if not day_order:
        # The first bob row moves to the front.
        hours, principals, counts = (
            [column[2], *column[:2], *column[3:]] for column in (hours, principals, counts)
        )
    stamps = pa.array(pd.to_datetime(hours, utc=True).as_unit("us"), pa.timestamp("us", tz="UTC"))
    table = pa.table(
        {
            "hour": stamps,
            "principal": pa.array(principals).dictionary_encode(),
            "count": pa.array(counts, pa.int64()),
            "first_time": stamps,
        }
    )

    merged = _merge_rows(table, ["hour", "principal"])

    rows = list(
        zip(
            merged.column("hour").cast(pa.string()).to_pylist(),
            merged.column("principal").cast(pa.string()).to_pylist(),
            merged.column("count").to_pylist(),
            strict=True,
        )
    )
    alice_10 = ("2024-05-01 10:00:00.000000Z", "alice", 3)
    alice_11 = ("2024-05-01 11:00:00.000000Z", "alice", 4)
    bob = ("2024-05-02 03:00:00.000000Z", "bob", 8)
    assert rows == ([alice_10, bob, alice_11] if day_order else [bob, alice_10, alice_11])


def agent_reads() -> pd.DataFrame:
    """Return two reads by alice with different user agents, on two days."""
    return events_from_rows(
        [
            row("u1", "2024-05-01T10:00:00Z", "aws", user_agent="aws-cli/2.17.1"),
            row("u2", "2024-05-02T10:00:00Z", "aws", user_agent="Boto3/1.35.0"),
        ]
    )


def downgrade_rollups(root: Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Rewrite rollup files as an older version wrote them, without the user_agent column.

    Only files whose path contains one of ``names`` are rewritten; all of them when empty.
    Returns the rewritten paths.
    """
    rewritten = []
    for path in sorted((root / "rollup").rglob("*.parquet")):
        if names and not any(name in str(path) for name in names):
            continue
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["user_agent"]), path)
        rewritten.append(path)
    return rewritten


def test_outdated_rollup_files_are_rebuilt(tmp_path: Path) -> None:
    History(tmp_path / "history").append(agent_reads(), "run-1")
    downgrade_rollups(tmp_path / "history")
    store = History(tmp_path / "history")

    agents = store.rollup(columns=["principal", "user_agent", "count"])

    assert agents["user_agent"].astype(str).tolist() == ["aws-cli/2.17.1", "Boto3/1.35.0"]
    assert agents["count"].tolist() == [1, 1]
    rollup_files = sorted((store.root / "rollup").rglob("*.parquet"))
    assert len(rollup_files) == 2
    assert all("user_agent" in pq.read_schema(path).names for path in rollup_files)


def test_rollup_written_after_a_downgrade_is_rebuilt(tmp_path: Path) -> None:
    # An older version, run on a history the new one had read, wrote one day without the
    # column; the other day stays as it is.
    History(tmp_path / "history").append(agent_reads(), "run-1")
    (older,) = downgrade_rollups(tmp_path / "history", ("date=2024-05-02",))
    untouched = tmp_path / "history/rollup/date=2024-05-01/cloud=aws/run-1.parquet"
    before = untouched.stat().st_mtime_ns

    agents = History(tmp_path / "history").rollup(columns=["user_agent", "count"])

    assert agents["user_agent"].astype(str).tolist() == ["aws-cli/2.17.1", "Boto3/1.35.0"]
    assert "user_agent" in pq.read_schema(older).names
    assert untouched.stat().st_mtime_ns == before


def test_unreadable_rollup_file_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    History(tmp_path / "history").append(agent_reads(), "run-1")
    broken = tmp_path / "history/rollup/date=2024-05-01/cloud=aws/run-1.parquet"
    broken.write_bytes(b"PAR1 cut short")

    with caplog.at_level("INFO", logger="pipeline.store.history"):
        agents = History(tmp_path / "history").rollup(columns=["user_agent", "count"])

    assert agents["count"].tolist() == [1, 1]
    assert pq.read_schema(broken).names[:2] == ["hour", "cloud"]
    assert "built 1 missing or outdated rollup files of date=2024-05-01" in caplog.text


def test_read_only_history_builds_outdated_rollups_in_memory(tmp_path: Path) -> None:
    History(tmp_path / "history").append(agent_reads(), "run-1")
    downgrade_rollups(tmp_path / "history")
    store = History(tmp_path / "history", read_only=True)

    agents = store.rollup(columns=["user_agent", "count"])

    assert agents["user_agent"].astype(str).tolist() == ["aws-cli/2.17.1", "Boto3/1.35.0"]
    rollup_files = sorted((store.root / "rollup").rglob("*.parquet"))
    assert not any("user_agent" in pq.read_schema(path).names for path in rollup_files)


def test_rollup_unites_all_null_and_filled_text_keys(tmp_path: Path) -> None:
    # The stored day has no user agent at all; the raw hour cut by ``until`` has one.
    store = History(tmp_path / "history")
    store.append(
        events_from_rows(
            [
                row("n1", "2024-05-01T10:05:00Z", "aws"),
                row("n2", "2024-05-02T11:05:00Z", "aws", user_agent="aws-cli/2.17.1"),
            ]
        ),
        "run-1",
    )

    agents = store.rollup(
        until=pd.Timestamp("2024-05-02T11:30:00Z"), columns=["hour", "user_agent", "count"]
    )

    assert str(agents["user_agent"].dtype) == "category"
    assert agents["user_agent"].astype(object).where(
        agents["user_agent"].notna(), None
    ).tolist() == [
        None,
        "aws-cli/2.17.1",
    ]


def test_unreadable_events_file_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Day 1's events file is lost and its rollup twin too; day 2 still serves.
    History(tmp_path / "history").append(agent_reads(), "run-1")
    lost = tmp_path / "history/date=2024-05-01/cloud=aws/run-1.parquet"
    lost.write_bytes(b"")
    (tmp_path / "history/rollup/date=2024-05-01/cloud=aws/run-1.parquet").unlink()
    store = History(tmp_path / "history")

    with caplog.at_level("WARNING", logger="pipeline.store.history"):
        first = store.rollup(columns=["user_agent", "count"])
        second = store.rollup(columns=["user_agent", "count"])

    assert first["user_agent"].astype(str).tolist() == ["Boto3/1.35.0"]
    assert second["count"].tolist() == [1]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"history: events file {lost} cannot be read (")
