"""Tests for the detector helpers in detectors._common."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from detectors._common import (
    IN_WINDOW,
    count_in_range,
    distinct_lists,
    load_context,
    read_mask,
    utc_micros,
)
from detectors.base import Detector, FrameHistory, HistoryView, build_findings, empty_findings
from tests.detectors.conftest import aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]


def test_count_in_range_counts_rows() -> None:
    codes = np.array([0, 0, 0, 1], dtype=np.int64)
    times = np.array([10, 20, 30, 20], dtype=np.int64)
    counts = count_in_range(
        codes,
        times,
        np.array([0, 0, 1, 2], dtype=np.int64),
        np.array([10, 15, 0, 0], dtype=np.int64),
        np.array([30, 31, 100, 100], dtype=np.int64),
    )
    assert counts.tolist() == [2, 2, 1, 0]


def test_count_in_range_sums_weights() -> None:
    codes = np.array([1, 0, 0, 0], dtype=np.int64)
    times = np.array([20, 30, 10, 20], dtype=np.int64)
    weights = np.array([7, 5, 2, 3], dtype=np.int64)
    sums = count_in_range(
        codes,
        times,
        np.array([0, 0, 1], dtype=np.int64),
        np.array([10, 15, 0], dtype=np.int64),
        np.array([30, 31, 100], dtype=np.int64),
        weights=weights,
    )
    assert sums.tolist() == [5, 8, 7]


def test_load_context_drops_repeated_window_rows(make_events: Build) -> None:
    rows = [
        aws_read("2024-06-20T09:00:00Z", event_uid="old"),
        aws_read("2024-06-20T10:00:00Z", event_uid="same"),
    ]
    history = FrameHistory(make_events(rows))
    window = make_events([aws_read("2024-06-20T10:00:00Z", event_uid="same")])

    context = load_context(window, history, pd.Timedelta(hours=2), ["principal"])

    assert context["event_uid"].tolist() == ["old", "same"]
    assert context[IN_WINDOW].tolist() == [False, True]


def test_read_mask_on_arrow_strings(make_events: Build) -> None:
    frame = make_events(
        [
            aws_read("2024-06-20T09:00:00Z"),
            aws_read("2024-06-20T09:01:00Z", action="decrypt"),
            aws_read("2024-06-20T09:02:00Z", action="decrypt", invoked_by="secretsmanager"),
            aws_read("2024-06-20T09:03:00Z", action="list"),
            aws_read("2024-06-20T09:04:00Z", action=None),
        ]
    )
    assert read_mask(frame).tolist() == [True, True, False, False, False]


def test_distinct_lists_keep_first_appearance() -> None:
    groups = np.array([1, 0, 1, 1, 0, 1], dtype=np.int64)
    values = pd.Series(["b", "x", None, "a", "x", "b"], dtype="string[pyarrow]")
    # Group 2 has no value; nulls are left out.
    assert distinct_lists(groups, values, 3) == [["x"], ["b", "a"], []]


def test_distinct_lists_of_categories_and_numbers() -> None:
    groups = np.array([0, 0, 1], dtype=np.int64)
    categories = pd.Series(pd.Categorical(["z", "y", "z"]))
    numbers = pd.Series([7, 7, 3])
    assert distinct_lists(groups, categories, 2) == [["z", "y"], ["z"]]
    found = distinct_lists(groups, numbers, 2)
    assert found == [[7], [3]]
    assert type(found[0][0]) is int


def test_distinct_lists_without_values() -> None:
    empty = pd.Series([], dtype="string[pyarrow]")
    assert distinct_lists(np.zeros(0, dtype=np.int64), empty, 2) == [[], []]


@pytest.mark.parametrize("missing", [None, float("nan"), pd.NA], ids=["none", "nan", "na"])
def test_missing_principal_finding_id_stable(missing: Any) -> None:
    # A run builds findings from Arrow strings (pd.NA or NaN), a backtest from objects (None).
    class AddressDetector(Detector):
        id = "tests.address"

        def detect(
            self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp
        ) -> pd.DataFrame:
            return empty_findings()

    row = {
        "severity": "medium",
        "title": "failures from 198.51.100.7",
        "principal": missing,
        "resources": ["prod/db"],
        "first_seen": pd.Timestamp("2026-10-01T00:00:00Z"),
        "last_seen": pd.Timestamp("2026-10-01T00:05:00Z"),
        "event_uids": ["e1", "e2"],
    }
    found = build_findings([row], detector=AddressDetector())
    named = build_findings([{**row, "principal": "alice"}], detector=AddressDetector())

    expected = hashlib.sha256("\x1f".join(["tests.address", "", "e1", "e2"]).encode())
    assert found["finding_id"].tolist() == [expected.hexdigest()[:20]]
    assert found["finding_id"].tolist() != named["finding_id"].tolist()


def test_utc_micros_counts_from_epoch() -> None:
    times = pd.Series(
        pd.to_datetime(["1970-01-01T00:00:01Z", "2024-06-20T00:00:00.500Z"], format="ISO8601")
    )
    assert utc_micros(times).tolist() == [1_000_000, 1_718_841_600_500_000]


def test_utc_micros_of_no_times_is_empty() -> None:
    empty = pd.Series([], dtype="datetime64[us, UTC]")
    assert utc_micros(empty).tolist() == []


def test_utc_micros_of_zoned_times() -> None:
    utc = pd.Series(pd.to_datetime(["1970-01-01T00:00:01Z", "2024-06-01T00:00:00Z"]))
    times = utc.dt.tz_convert("Europe/Berlin")
    assert utc_micros(times).tolist() == [1_000_000, 1_717_200_000_000_000]
