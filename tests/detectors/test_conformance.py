"""Checks every registered detector, with default parameters, on the same awkward inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

import detectors
from detectors.base import (
    FINDING_COLUMNS,
    SEVERITIES,
    Detector,
    FrameHistory,
    StatisticalDetector,
)
from pipeline.schema import empty_events, events_from_rows
from pipeline.store.history import CappedHistoryView, History
from tests.detectors.conftest import CITIES, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
START = pd.Timestamp("2024-06-15T01:00:00Z")
# Only the built-in detectors: other tests register detectors of their own.
DETECTOR_IDS = sorted(i for i in detectors.registered_detectors() if i.startswith("keytrail."))


def gcp_read(time: pd.Timestamp, **fields: Any) -> dict[str, Any]:
    row = {
        "time": time,
        "cloud": "gcp",
        "log_format": "gcp_audit",
        "service": "secretmanager",
        "operation": "google.cloud.secretmanager.v1.SecretManagerService.AccessSecretVersion",
        "action": "read",
        "outcome": "success",
        "principal": "dev@example.org",
        "principal_type": "user",
        "account": "shop-prod",
        "resource": "projects/shop-prod/secrets/stripe-key",
        "source_ip": "198.51.100.20",
        "source_kind": "public",
        **CITIES["tokyo"],
    }
    return row | fields


def azure_read(time: pd.Timestamp, **fields: Any) -> dict[str, Any]:
    row = {
        "time": time,
        "cloud": "azure",
        "log_format": "azure_keyvault",
        "service": "keyvault",
        "operation": "SecretGet",
        "action": "read",
        "outcome": "success",
        "principal": "dev@example.org",
        "principal_type": "user",
        "account": "00000000-1111-2222-3333-444444444444",
        "resource": "https://shop.vault.azure.net/secrets/db",
        "source_ip": "198.51.100.21",
        "source_kind": "public",
        **CITIES["new_york"],
    }
    return row | fields


def minutes(count: int) -> list[pd.Timestamp]:
    return [START + pd.Timedelta(seconds=20 * n) for n in range(count)]


def one_event() -> list[dict[str, Any]]:
    return [aws_read(START, city="berlin")]


def all_failures() -> list[dict[str, Any]]:
    return [aws_denied(time, city="moscow") for time in minutes(15)]


def mixed_clouds() -> list[dict[str, Any]]:
    return [
        aws_read(START, "dev@example.org", city="berlin"),
        gcp_read(START + pd.Timedelta(minutes=5)),
        azure_read(START + pd.Timedelta(minutes=10)),
        aws_denied(START + pd.Timedelta(minutes=11), "dev@example.org"),
    ]


def no_geo() -> list[dict[str, Any]]:
    rows = [aws_read(time) for time in minutes(5)]
    rows += [aws_denied(time) for time in minutes(12)]
    return rows


def nulls_everywhere() -> list[dict[str, Any]]:
    return [{"time": START, "cloud": "aws"}, {"time": START, "principal": "x"}]


CASES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "one_event": one_event,
    "all_failures": all_failures,
    "mixed_clouds": mixed_clouds,
    "no_geo": no_geo,
    "nulls_everywhere": nulls_everywhere,
}


def check_findings(findings: pd.DataFrame) -> None:
    assert list(findings.columns) == list(FINDING_COLUMNS)
    assert set(findings["severity"]) <= set(SEVERITIES)
    assert str(findings["first_seen"].dtype) == "datetime64[us, UTC]"
    assert (findings["event_count"] >= 1).all()
    for evidence, baseline in zip(findings["evidence"], findings["baseline"], strict=True):
        assert isinstance(evidence, dict)
        assert isinstance(baseline, dict)


@pytest.fixture(params=DETECTOR_IDS)
def detector(request: pytest.FixtureRequest) -> Detector:
    return detectors.get_detector(request.param)()


def test_builtin_detectors_registered() -> None:
    expected = {
        "keytrail.off_hours",
        "keytrail.new_country",
        "keytrail.impossible_travel",
        "keytrail.failure_burst",
        "keytrail.isolation_forest",
    }
    assert expected <= set(DETECTOR_IDS)


def test_empty_frame(detector: Detector) -> None:
    findings = detector.detect(empty_events(), FrameHistory(), NOW)
    check_findings(findings)
    assert findings.empty


def test_empty_window_with_history(detector: Detector, make_events: Build) -> None:
    findings = detector.detect(empty_events(), FrameHistory(make_events(all_failures())), NOW)
    check_findings(findings)
    assert findings.empty


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_without_history(detector: Detector, make_events: Build, case: str) -> None:
    check_findings(detector.detect(make_events(CASES[case]()), FrameHistory(), NOW))


@pytest.mark.parametrize("case", sorted(CASES))
def test_history_holding_the_window(detector: Detector, make_events: Build, case: str) -> None:
    # A store may already hold this run's events; the detector must not count them twice.
    window = make_events(CASES[case]())
    alone = detector.detect(window, FrameHistory(), NOW)
    doubled = detector.detect(window, FrameHistory(window), NOW)
    check_findings(doubled)
    assert doubled["finding_id"].tolist() == alone["finding_id"].tolist()


def test_rerun_gives_same_finding_ids(detector: Detector, make_events: Build) -> None:
    window = make_events(all_failures() + mixed_clouds())
    first = detector.detect(window, FrameHistory(), NOW)
    second = detector.detect(window, FrameHistory(), NOW)
    assert first["finding_id"].tolist() == second["finding_id"].tolist()


def test_unknown_param_is_rejected(detector: Detector) -> None:
    with pytest.raises(ValidationError) as caught:
        type(detector)(no_such_param=1)
    assert [error["loc"] for error in caught.value.errors()] == [("no_such_param",)]


def test_lookback_is_a_timedelta(detector: Detector) -> None:
    assert detector.lookback >= pd.Timedelta(0)


@pytest.mark.parametrize(
    ("detector_id", "params", "loc"),
    [
        ("keytrail.off_hours", {"timezone": "Berlin"}, ("timezone",)),
        ("keytrail.off_hours", {"business_days": ["mon", "mon"]}, ("business_days",)),
        ("keytrail.new_country", {"min_history_days": -1}, ("min_history_days",)),
        ("keytrail.new_country", {"deny_countries": ["RUS"]}, ("deny_countries",)),
        ("keytrail.impossible_travel", {"min_distance_km": -5}, ("min_distance_km",)),
        ("keytrail.failure_burst", {"min_failures": "many"}, ("min_failures",)),
    ],
)
def test_param_errors_name_parameter(
    detector_id: str, params: dict[str, Any], loc: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        detectors.get_detector(detector_id)(**params)
    assert [error["loc"] for error in caught.value.errors()] == [loc]


def earlier_days(days: int = 3) -> list[dict[str, Any]]:
    """Return a steady history: two people and a role reading every hour of the day before START."""
    rows = []
    for hour in range(days * 24):
        time = START - pd.Timedelta(hours=hour + 1)
        rows.append(aws_read(time, "dev@example.org", city="berlin"))
        rows.append(aws_read(time, city="frankfurt", secret="prod/app/key"))
        rows.append(
            aws_read(time, "arn:aws:iam::111122223333:role/app", principal_type="role", ip=None)
        )
    return rows


def test_principal_without_history(detector: Detector, make_events: Build) -> None:
    history = FrameHistory(make_events(earlier_days(3)))
    window = make_events([aws_read(START, "newcomer@example.org", city="tokyo")])
    check_findings(detector.detect(window, history, NOW))
    report = getattr(detector, "report_", {})
    assert isinstance(report, dict)
    assert json.loads(json.dumps(report)) == report


STORED_CASES = ("all_failures", "mixed_clouds")


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[History, pd.DataFrame, pd.DataFrame]]:
    """Return, per case, a Parquet history holding the earlier days and then the window."""
    earlier = events_from_rows(
        [row | {"event_uid": f"old-{n}"} for n, row in enumerate(earlier_days())]
    )
    result = {}
    for case in STORED_CASES:
        window = events_from_rows(
            [row | {"event_uid": f"new-{n}"} for n, row in enumerate(CASES[case]())]
        )
        store = History(tmp_path_factory.mktemp(case) / "history")
        store.append(earlier, "run-1")
        store.append(window, "run-2")
        result[case] = (store, earlier, window)
    return result


@pytest.mark.parametrize("case", STORED_CASES)
def test_parquet_history_matches_frame_history(
    detector: Detector,
    case: str,
    stored: dict[str, tuple[History, pd.DataFrame, pd.DataFrame]],
) -> None:
    # The engine's view over Parquet files must give the same findings as the in-memory view.
    store, earlier, window = stored[case]
    view = CappedHistoryView(store, window["time"].min()).for_lookback(detector.lookback)
    from_files = detector.detect(window, view, NOW)
    in_memory = type(detector)().detect(window, FrameHistory(earlier), NOW)
    check_findings(from_files)
    assert from_files["finding_id"].tolist() == in_memory["finding_id"].tolist()


STATISTICAL_IDS = [
    name for name in DETECTOR_IDS if issubclass(detectors.get_detector(name), StatisticalDetector)
]


@pytest.fixture(params=STATISTICAL_IDS)
def statistical(request: pytest.FixtureRequest) -> StatisticalDetector:
    detector = detectors.get_detector(request.param)()
    assert isinstance(detector, StatisticalDetector)
    return detector


def test_statistical_fit_on_empty_history(statistical: StatisticalDetector) -> None:
    assert statistical.fitted_through is None
    assert statistical.fit(FrameHistory(), START) is statistical
    assert statistical.fitted_through == START
    assert statistical.score(empty_events()).empty


def test_statistical_state_round_trip(statistical: StatisticalDetector, make_events: Build) -> None:
    history = FrameHistory(make_events(earlier_days()))
    window = make_events(all_failures() + mixed_clouds())
    statistical.fit(history, START)
    state = json.loads(json.dumps(statistical.get_state()))
    restored = type(statistical)().set_state(state)
    assert restored.fitted_through == statistical.fitted_through
    # Pickled parts may differ byte for byte after a round trip, so compare behaviour.
    assert json.loads(json.dumps(restored.get_state())).keys() == state.keys()
    first = statistical.detect(window, FrameHistory(), NOW)
    second = restored.detect(window, FrameHistory(), NOW)
    assert second["finding_id"].tolist() == first["finding_id"].tolist()


def test_statistical_refit_rules(statistical: StatisticalDetector) -> None:
    assert statistical.needs_refit(START)
    statistical.fit(FrameHistory(), START)
    assert not statistical.needs_refit(START + pd.Timedelta(hours=24))
    assert statistical.needs_refit(START + pd.Timedelta(hours=24, seconds=1))
    assert statistical.needs_refit(START - pd.Timedelta(seconds=1))


def test_statistical_params_hash(statistical: StatisticalDetector) -> None:
    same = type(statistical)(refit_hours=1)
    assert same.params_hash() == statistical.params_hash()
    assert len(statistical.params_hash()) == 20
