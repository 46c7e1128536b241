"""Tests for keytrail.new_country and keytrail.impossible_travel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.geo import (
    ImpossibleTravelDetector,
    NewCountryDetector,
    _country_codes,
    _distinct_days,
    _first_seen_codes,
    _lookup,
    _previous_in_group,
)
from tests.detectors.conftest import ALICE, NOW, CategoricalRollupHistory, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]


def berlin_days(first: int, last: int) -> list[dict[str, Any]]:
    """Return one Berlin read per day of June 2024 from ``first`` to ``last``."""
    return [
        aws_read(f"2024-06-{day:02d}T09:00:00Z", city="berlin", ip="198.51.100.7")
        for day in range(first, last + 1)
    ]


def run(
    detector: NewCountryDetector | ImpossibleTravelDetector,
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
) -> pd.DataFrame:
    earlier = FrameHistory(make_events(history)) if history else FrameHistory()
    findings = detector.detect(make_events(window), earlier, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    return findings


# keytrail.new_country


def test_new_country_after_learning_fires(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo", ip="200.160.2.3", asn=28571)]
    findings = run(NewCountryDetector(), make_events, window, berlin_days(1, 19))
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "medium"
    assert finding["title"] == f"{ALICE} active from new country BR"
    assert finding["countries"] == ["BR"]
    assert finding["source_ips"] == ["200.160.2.3"]
    assert finding["mitre"] == ["T1078.004"]
    assert finding["evidence"]["cities"] == ["São Paulo"]
    assert finding["evidence"]["asns"] == [28571]
    assert finding["evidence"]["events"] == 1
    assert finding["baseline"]["known_countries"] == {"DE": 19}
    assert finding["baseline"]["summary"] == "30-day countries: DE (19)"


def test_learning_period_suppresses(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo")]
    assert run(NewCountryDetector(), make_events, window, berlin_days(15, 19)).empty


def test_learning_needs_enough_events(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo")]
    detector = NewCountryDetector(min_history_days=3, min_history_events=6)
    assert run(detector, make_events, window, berlin_days(15, 19)).empty
    detector = NewCountryDetector(min_history_days=3, min_history_events=5)
    assert len(run(detector, make_events, window, berlin_days(15, 19))) == 1


def test_known_country_no_finding(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="frankfurt")]
    assert run(NewCountryDetector(), make_events, window, berlin_days(1, 19)).empty


def test_country_older_than_lookback_is_new(make_events: Build) -> None:
    history = [aws_read("2024-05-10T09:00:00Z", city="sao_paulo"), *berlin_days(1, 19)]
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo")]
    findings = run(NewCountryDetector(), make_events, window, history)
    assert findings["countries"].tolist() == [["BR"]]


def test_deny_list_fires_without_history(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="moscow", ip="95.213.0.1")]
    findings = run(NewCountryDetector(deny_countries=["ru"]), make_events, window)
    assert findings["severity"].tolist() == ["high"]
    assert findings["evidence"].iloc[0]["reason"] == "deny-listed country"
    assert findings["baseline"].iloc[0]["known_countries"] == {}
    assert findings["baseline"].iloc[0]["summary"] == "30-day countries: none"


def test_private_ip_never_fires(make_events: Build) -> None:
    window = [
        aws_read(
            "2024-06-20T03:00:00Z",
            city="moscow",
            ip="10.1.2.3",
            source_kind="private",
        )
    ]
    detector = NewCountryDetector(deny_countries=["RU"])
    assert run(detector, make_events, window, berlin_days(1, 19)).empty


def test_one_finding_per_country_per_run(make_events: Build) -> None:
    window = [
        aws_read(f"2024-06-20T03:0{minute}:00Z", city="sao_paulo", ip=f"200.160.2.{minute}")
        for minute in range(3)
    ]
    window.append(aws_read("2024-06-20T03:05:00Z", city="sao_paulo", outcome="failure"))
    findings = run(NewCountryDetector(), make_events, window, berlin_days(1, 19))
    assert len(findings) == 1
    assert findings["event_count"].tolist() == [4]
    assert findings["evidence"].iloc[0]["failures"] == 1
    assert findings["source_ips"].iloc[0] == [
        "200.160.2.0",
        "200.160.2.1",
        "200.160.2.2",
        "203.0.113.10",
    ]


def test_new_country_counts_only_own_operations(make_events: Build) -> None:
    # Two principals in one run, each with a different operation: each finding counts its own
    # operations as ints and names no operation it did not call.
    bob = "bob@example.com"
    history = berlin_days(1, 19) + [
        aws_read(f"2024-06-{day:02d}T09:00:00Z", bob, city="berlin", ip="198.51.100.8")
        for day in range(1, 20)
    ]
    window = [
        aws_read("2024-06-20T03:00:00Z", city="sao_paulo", ip="200.160.2.3"),
        aws_read("2024-06-20T03:10:00Z", city="sao_paulo", ip="200.160.2.3"),
        aws_read("2024-06-20T04:00:00Z", bob, city="tokyo", ip="203.0.113.77", operation="Decrypt"),
    ]
    findings = run(NewCountryDetector(), make_events, window, history).sort_values("principal")
    operations = findings["evidence"].map(lambda evidence: evidence["operations"]).tolist()
    assert operations == [{"GetSecretValue": 2}, {"Decrypt": 1}]
    assert all(type(count) is int for item in operations for count in item.values())
    known = findings["baseline"].map(lambda baseline: baseline["known_countries"]).tolist()
    assert known == [{"DE": 19}, {"DE": 19}]
    assert all(type(count) is int for item in known for count in item.values())


def test_new_country_locations_per_address(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T03:05:00Z", city="sao_paulo", ip="200.160.2.9"),
        aws_read("2024-06-20T03:00:00Z", city="sao_paulo", ip="200.160.2.3"),
        aws_read("2024-06-20T03:10:00Z", city="sao_paulo", ip="200.160.2.3"),
    ]
    findings = run(NewCountryDetector(), make_events, window, berlin_days(1, 19))
    assert findings["evidence"].iloc[0]["locations"] == [
        {"ip": "200.160.2.3", "city": "São Paulo", "country": "BR"},
        {"ip": "200.160.2.9", "city": "São Paulo", "country": "BR"},
    ]


def test_backfill_learns_from_earlier_window_events(make_events: Build) -> None:
    window = [*berlin_days(1, 19), aws_read("2024-06-20T03:00:00Z", city="sao_paulo")]
    findings = run(NewCountryDetector(), make_events, window)
    assert findings["countries"].tolist() == [["BR"]]


def test_unknown_outcome_is_ignored(make_events: Build) -> None:
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo", outcome="unknown")]
    assert run(NewCountryDetector(), make_events, window, berlin_days(1, 19)).empty


def test_new_country_categorical_rollup(make_events: Build) -> None:
    history = make_events(berlin_days(1, 19))
    window = make_events([aws_read("2024-06-20T03:00:00Z", city="sao_paulo", ip="200.160.2.3")])
    view = CategoricalRollupHistory(history)
    assert view.rollup(columns=["principal", "count"])["principal"].dtype == "category"
    findings = NewCountryDetector().detect(window, view, NOW)
    assert findings["title"].tolist() == [f"{ALICE} active from new country BR"]
    assert findings["baseline"].iloc[0]["summary"] == "30-day countries: DE (19)"
    assert findings["event_uids"].tolist() == window["event_uid"].map(lambda uid: [uid]).tolist()


def test_lowercase_history_country_known(make_events: Build) -> None:
    # Rollup and window countries are compared upper-cased: "de" in history makes DE known.
    history = [{**row, "geo_country": "de"} for row in berlin_days(1, 19)]
    window = [aws_read("2024-06-20T03:00:00Z", city="frankfurt")]
    assert run(NewCountryDetector(), make_events, window, history).empty


def test_other_principal_country_not_known(make_events: Build) -> None:
    # Bob's Brazilian history does not make Brazil known for Alice.
    bob = [
        aws_read(f"2024-06-{day:02d}T10:00:00Z", "bob@example.com", city="sao_paulo")
        for day in range(1, 20)
    ]
    window = [aws_read("2024-06-20T03:00:00Z", city="sao_paulo")]
    findings = run(NewCountryDetector(), make_events, window, [*berlin_days(1, 19), *bob])
    assert findings["principal"].tolist() == [ALICE]
    assert findings["baseline"].iloc[0]["known_countries"] == {"DE": 19}


def test_known_country_expires_inside_window(make_events: Build) -> None:
    # The Brazilian read falls out of the look-back between the window's first event and the
    # Brazilian one, so the hourly rollup must not count it as known.
    history = [*berlin_days(1, 19), aws_read("2024-05-21T04:00:00Z", city="sao_paulo")]
    window = [
        aws_read("2024-06-20T03:00:00Z", city="berlin"),
        aws_read("2024-06-20T05:00:00Z", city="sao_paulo"),
    ]
    findings = run(NewCountryDetector(), make_events, window, history)
    assert findings["countries"].tolist() == [["BR"]]
    assert findings["baseline"].iloc[0]["summary"] == "30-day countries: DE (20)"


def test_lookup_appends_missing_marker() -> None:
    names = np.array(["DE", "JP", "US"], dtype=object)
    assert _lookup(names, ["US", "FR", "DE"]).tolist() == [2, -1, 0, -1]


def test_lookup_of_nothing_is_only_missing() -> None:
    assert _lookup(np.array(["DE"], dtype=object), []).tolist() == [-1]


def test_first_seen_codes_follow_row_order() -> None:
    values = pd.Series(["bob", "alice", None, "carol", "alice"], dtype="string")
    codes, names = _first_seen_codes(values, np.array([3, 4, 1, 0]))
    assert codes.tolist() == [0, 1, 1, 2]
    assert names.tolist() == ["carol", "alice", "bob"]


def test_first_seen_codes_of_categorical_column() -> None:
    values = pd.Series(["x", "y", "x"], dtype="category")
    codes, names = _first_seen_codes(values, np.array([1, 2]))
    assert codes.tolist() == [0, 1]
    assert names.tolist() == ["y", "x"]


def test_country_codes_share_sorted_upper_names() -> None:
    window = pd.Series(["jp", "DE", None, "jp"], dtype="string")
    rolled = pd.Series(["us", "de"], dtype="category")
    names, (window_codes, rolled_codes) = _country_codes([window, rolled])
    assert names.tolist() == ["DE", "JP", "US"]
    assert window_codes.tolist() == [1, 0, -1, 1]
    assert rolled_codes.tolist() == [2, 0]


def test_country_codes_of_empty_columns() -> None:
    names, (codes,) = _country_codes([pd.Series([], dtype="string")])
    assert names.tolist() == []
    assert codes.tolist() == []


def test_previous_in_group_pairs_rows_of_one_group() -> None:
    group = np.array([0, 1, 0, 0, 1])
    times = np.array([10, 20, 30, 40, 50])
    previous, has_previous = _previous_in_group(group, times)
    assert has_previous.tolist() == [False, False, True, True, True]
    assert previous[has_previous].tolist() == [10, 30, 20]


def test_previous_in_group_single_rows_have_none() -> None:
    previous, has_previous = _previous_in_group(np.array([0, 1, 2]), np.array([5, 6, 7]))
    assert has_previous.tolist() == [False, False, False]
    assert previous.tolist() == [0, 0, 0]


def test_distinct_days_drops_repeats() -> None:
    codes, days = _distinct_days(np.array([1, 1, 0, 1, 0]), np.array([-2, 5, 5, -2, 5]))
    assert sorted(zip(codes.tolist(), days.tolist(), strict=True)) == [(0, 5), (1, -2), (1, 5)]


def test_distinct_days_of_nothing() -> None:
    codes, days = _distinct_days(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert codes.tolist() == []
    assert days.tolist() == []


def test_new_country_invalid_params() -> None:
    with pytest.raises(ValidationError) as caught:
        NewCountryDetector(deny_countries=["Russia"])
    assert caught.value.errors()[0]["loc"] == ("deny_countries",)
    with pytest.raises(ValidationError) as caught:
        NewCountryDetector(severity="urgent")
    assert caught.value.errors()[0]["loc"] == ("severity",)
    with pytest.raises(ValidationError) as caught:
        NewCountryDetector(lookback_days=0)
    assert caught.value.errors()[0]["loc"] == ("lookback_days",)


# keytrail.impossible_travel


def test_berlin_to_tokyo_in_one_hour_fires(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin", ip="198.51.100.7", event_uid="e-ber"),
        aws_read("2024-06-20T09:00:00Z", city="tokyo", ip="203.0.113.99", event_uid="e-tyo"),
    ]
    findings = run(ImpossibleTravelDetector(), make_events, window)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "high"
    assert finding["title"] == f"{ALICE} impossible travel Berlin, DE → Tokyo, JP (8,916 km/h)"
    assert finding["event_uids"] == ["e-ber", "e-tyo"]
    assert finding["countries"] == ["DE", "JP"]
    evidence = finding["evidence"]
    assert evidence["distance_km"] == pytest.approx(8916.1, abs=0.1)
    assert evidence["hours"] == 1.0
    assert evidence["speed_kmh"] == pytest.approx(8916.1, abs=0.1)
    assert evidence["zero_gap"] is False
    assert evidence["from"] == {
        "ip": "198.51.100.7",
        "city": "Berlin",
        "country": "DE",
        "time": "2024-06-20T08:00:00Z",
        "event_uid": "e-ber",
    }
    assert evidence["to"]["city"] == "Tokyo"
    assert evidence["flagged_pairs"] == 1
    assert finding["baseline"]["max_speed_kmh"] == 900.0


def test_new_york_to_san_francisco_in_8h_does_not_fire(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="new_york"),
        aws_read("2024-06-20T16:00:00Z", city="san_francisco"),
    ]
    assert run(ImpossibleTravelDetector(), make_events, window).empty


def test_previous_event_in_history_counts(make_events: Build) -> None:
    history = [aws_read("2024-06-20T08:00:00Z", city="berlin", event_uid="old")]
    window = [aws_read("2024-06-20T09:00:00Z", city="tokyo", event_uid="new")]
    findings = run(ImpossibleTravelDetector(), make_events, window, history)
    assert findings["event_uids"].tolist() == [["new", "old"]]
    assert findings["first_seen"].tolist() == [pd.Timestamp("2024-06-20T08:00:00Z")]


def test_pair_entirely_in_history_not_emitted(make_events: Build) -> None:
    history = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read("2024-06-20T09:00:00Z", city="tokyo"),
    ]
    window = [aws_read("2024-06-20T23:00:00Z", city="tokyo")]
    assert run(ImpossibleTravelDetector(), make_events, window, history).empty


def test_internal_and_cloud_service_callers_never_fire(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read(
            "2024-06-20T08:10:00Z",
            ip=None,
            source_kind="internal",
            source_raw="AWS Internal",
        ),
        aws_read(
            "2024-06-20T08:20:00Z",
            ip=None,
            source_kind="cloud_service",
            source_raw="secretsmanager.amazonaws.com",
        ),
    ]
    assert run(ImpossibleTravelDetector(), make_events, window).empty


def test_zero_gap_counts_as_infinite_speed(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read("2024-06-20T08:00:00Z", city="new_york"),
    ]
    findings = run(ImpossibleTravelDetector(), make_events, window)
    evidence = findings["evidence"].iloc[0]
    assert evidence["zero_gap"] is True
    assert evidence["speed_kmh"] is None
    assert findings["title"].iloc[0].endswith("(zero time gap)")


def test_same_city_other_coordinates_skipped(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read("2024-06-20T08:05:00Z", city="berlin", geo_lat=47.0, geo_lon=8.0),
    ]
    assert run(ImpossibleTravelDetector(), make_events, window).empty


def test_short_distance_below_minimum_skipped(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read("2024-06-20T08:10:00Z", city="frankfurt"),
    ]
    assert run(ImpossibleTravelDetector(), make_events, window).empty
    detector = ImpossibleTravelDetector(min_distance_km=400)
    assert len(run(detector, make_events, window)) == 1


def test_pairs_in_one_day_collapse(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin"),
        aws_read("2024-06-20T09:00:00Z", city="tokyo"),
        aws_read("2024-06-20T10:00:00Z", city="berlin"),
        aws_read("2024-06-20T10:30:00Z", city="tokyo"),
        aws_read("2024-06-21T10:30:00Z", city="tokyo"),
        aws_read("2024-06-21T11:30:00Z", city="berlin"),
    ]
    findings = run(ImpossibleTravelDetector(), make_events, window).sort_values("first_seen")
    assert len(findings) == 2
    first, second = findings["evidence"].tolist()
    assert first["flagged_pairs"] == 3
    assert first["hours"] == 0.5
    assert len(first["pairs"]) == 3
    assert second["flagged_pairs"] == 1
    assert findings["event_count"].tolist() == [4, 2]


def test_batch_rows_are_one_event(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", city="berlin", event_uid="b", secret=name)
        for name in ("a", "b", "c")
    ]
    window.append(aws_read("2024-06-20T09:00:00Z", city="tokyo", event_uid="t"))
    findings = run(ImpossibleTravelDetector(), make_events, window)
    assert findings["evidence"].iloc[0]["flagged_pairs"] == 1
    assert len(findings["resources"].iloc[0]) == 4


def test_principals_are_not_mixed(make_events: Build) -> None:
    window = [
        aws_read("2024-06-20T08:00:00Z", "alice@example.com", city="berlin"),
        aws_read("2024-06-20T08:30:00Z", "bob@example.com", city="tokyo"),
    ]
    assert run(ImpossibleTravelDetector(), make_events, window).empty


def test_lookback_covers_half_the_earth() -> None:
    assert ImpossibleTravelDetector().lookback == pd.Timedelta(hours=23)
    assert ImpossibleTravelDetector(max_speed_kmh=2000).lookback == pd.Timedelta(hours=11)


def test_impossible_travel_invalid_params() -> None:
    with pytest.raises(ValidationError) as caught:
        ImpossibleTravelDetector(max_speed_kmh=0)
    assert caught.value.errors()[0]["loc"] == ("max_speed_kmh",)
