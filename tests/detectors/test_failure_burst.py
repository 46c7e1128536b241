"""Tests for keytrail.failure_burst: named positive and negative cases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.failure_burst import FailureBurstDetector, _epoch_days, _present, _single
from tests.detectors.conftest import ALICE, NOW, CategoricalRollupHistory, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
START = pd.Timestamp("2024-06-20T10:00:00Z")
ATTACKER_IP = "192.0.2.66"


def denials(
    count: int,
    every: pd.Timedelta,
    principal: str = ALICE,
    start: pd.Timestamp = START,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Return ``count`` AccessDenied failures ``every`` apart from ``start``."""
    fields.setdefault("ip", ATTACKER_IP)
    return [aws_denied(start + n * every, principal, **fields) for n in range(count)]


def run(
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
    **params: Any,
) -> pd.DataFrame:
    earlier = FrameHistory(make_events(history)) if history else FrameHistory()
    findings = FailureBurstDetector(**params).detect(make_events(window), earlier, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    return findings


def test_twelve_denials_in_five_minutes_fires(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25))
    findings = run(make_events, window, keys=["principal"])
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "medium"
    assert finding["principal"] == ALICE
    assert finding["title"] == f"12 failed secret accesses by {ALICE} in 5 min"
    assert finding["event_count"] == 12
    assert finding["mitre"] == ["T1110", "T1555.006"]
    assert finding["first_seen"] == START
    assert finding["last_seen"] == START + pd.Timedelta(seconds=275)
    evidence = finding["evidence"]
    assert evidence["key"] == "principal"
    assert evidence["failures"] == 12
    assert evidence["distinct_secrets"] == 1
    assert evidence["reasons"] == {"denied": 12}
    assert evidence["operations"] == {"GetSecretValue": 12}
    assert evidence["span_seconds"] == 275.0
    assert evidence["success_after"] is None
    assert finding["baseline"]["daily_failures"] == [0, 0, 0, 0, 0, 0, 0]
    assert finding["baseline"]["summary"] == "7-day median 0 failures/day; this burst 12"


def test_one_principal_one_address_gives_one_finding(make_events: Build) -> None:
    # Keyed by principal and by source IP, the same 12 events make the same finding: it is
    # reported once, under the principal key.
    findings = run(make_events, denials(12, pd.Timedelta(seconds=25)))
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["key"] == "principal"
    assert findings["principal"].iloc[0] == ALICE


def test_source_ip_key_alone_names_address(make_events: Build) -> None:
    findings = run(make_events, denials(12, pd.Timedelta(seconds=25)), keys=["source_ip"])
    assert len(findings) == 1
    assert findings["title"].iloc[0] == (
        f"12 failed secret accesses by source IP {ATTACKER_IP} in 5 min"
    )
    assert findings["principal"].iloc[0] == ALICE


def test_twelve_denials_over_two_hours_does_not_fire(make_events: Build) -> None:
    assert run(make_events, denials(12, pd.Timedelta(minutes=10))).empty


def test_nine_denials_below_threshold(make_events: Build) -> None:
    assert run(make_events, denials(9, pd.Timedelta(seconds=10))).empty


def test_burst_then_success_is_high(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25))
    success_time = START + pd.Timedelta(minutes=20)
    window.append(aws_read(success_time, secret="prod/payments/key", event_uid="win"))
    findings = run(make_events, window, keys=["principal"])
    assert findings["severity"].tolist() == ["high"]
    success = findings["evidence"].iloc[0]["success_after"]
    assert success["event_uid"] == "win"
    assert success["time"] == "2024-06-20T10:20:00Z"
    assert success["minutes_after_burst"] == 15.4
    assert success["resource"].endswith(":secret:prod/payments/key")


def test_success_after_limit_stays_medium(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25))
    window.append(aws_read(START + pd.Timedelta(minutes=40)))
    findings = run(make_events, window, keys=["principal"])
    assert findings["severity"].tolist() == ["medium"]


def test_success_by_other_principal_stays_medium(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25))
    window.append(aws_read(START + pd.Timedelta(minutes=6), "bob@example.com"))
    findings = run(make_events, window, keys=["principal"])
    assert findings["severity"].tolist() == ["medium"]


def test_ip_burst_other_ip_success_medium(make_events: Build) -> None:
    # Three principals fail from one address; one of them then reads a secret from a private
    # address. That success is not the failing caller, so the address burst is not escalated.
    window = []
    for number, name in enumerate(("alice", "bob", "carol")):
        start = START + pd.Timedelta(seconds=10 * number)
        window += denials(4, pd.Timedelta(minutes=1), f"{name}@example.com", start)
    success_time = START + pd.Timedelta(minutes=5)
    window.append(aws_read(success_time, "bob@example.com", ip="10.1.2.3", source_kind="private"))
    findings = run(make_events, window, keys=["source_ip"])
    assert findings["severity"].tolist() == ["medium"]
    assert findings["evidence"].iloc[0]["success_after"] is None


def test_ip_burst_same_ip_success_high(make_events: Build) -> None:
    window = []
    for number, name in enumerate(("alice", "bob", "carol")):
        start = START + pd.Timedelta(seconds=10 * number)
        window += denials(4, pd.Timedelta(minutes=1), f"{name}@example.com", start)
    success_time = START + pd.Timedelta(minutes=5)
    window.append(aws_read(success_time, "bob@example.com", ip=ATTACKER_IP, event_uid="win"))
    findings = run(make_events, window, keys=["source_ip"])
    assert findings["severity"].tolist() == ["high"]
    success = findings["evidence"].iloc[0]["success_after"]
    assert success["event_uid"] == "win"
    assert success["principal"] == "bob@example.com"
    assert success["source_ip"] == ATTACKER_IP


def test_principal_burst_any_ip_success_high(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25))
    window.append(aws_read(START + pd.Timedelta(minutes=6), ip="10.1.2.3", source_kind="private"))
    findings = run(make_events, window, keys=["principal"])
    assert findings["severity"].tolist() == ["high"]
    assert findings["evidence"].iloc[0]["success_after"]["source_ip"] == "10.1.2.3"


def test_burst_lists_locations_per_address(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=25), city="tokyo")
    findings = run(make_events, window, keys=["principal"])
    assert findings["evidence"].iloc[0]["locations"] == [
        {"ip": ATTACKER_IP, "city": "Tokyo", "country": "JP"}
    ]


def test_many_distinct_secrets_is_high(make_events: Build) -> None:
    window = [
        aws_denied(START + pd.Timedelta(seconds=20 * n), secret=f"prod/guess{n % 6}")
        for n in range(12)
    ]
    findings = run(make_events, window, keys=["principal"])
    assert findings["severity"].tolist() == ["high"]
    assert findings["evidence"].iloc[0]["distinct_secrets"] == 6


def test_one_ip_across_three_principals_fires(make_events: Build) -> None:
    window = []
    for number, name in enumerate(("alice", "bob", "carol")):
        start = START + pd.Timedelta(seconds=10 * number)
        window += denials(4, pd.Timedelta(minutes=1), f"{name}@example.com", start)
    findings = run(make_events, window)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["principal"] is None
    assert finding["title"] == f"12 failed secret accesses by source IP {ATTACKER_IP} in 3 min"
    assert finding["evidence"]["key"] == "source_ip"
    assert finding["evidence"]["key_value"] == ATTACKER_IP
    assert finding["evidence"]["principals"] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    assert finding["event_count"] == 12


def test_private_ip_is_not_a_key(make_events: Build) -> None:
    window = []
    for name in ("alice", "bob", "carol"):
        window += denials(
            4, pd.Timedelta(minutes=1), f"{name}@example.com", ip="10.0.0.5", source_kind="private"
        )
    assert run(make_events, window).empty


def test_two_bursts_split_by_gap(make_events: Build) -> None:
    window = denials(10, pd.Timedelta(seconds=30))
    window += denials(10, pd.Timedelta(seconds=30), start=START + pd.Timedelta(hours=1))
    findings = run(make_events, window, keys=["principal"]).sort_values("first_seen")
    assert findings["event_count"].tolist() == [10, 10]
    assert findings["dedup_key"].nunique() == 2


def test_slow_failures_outside_window_are_not_in_burst(make_events: Build) -> None:
    early = aws_denied(START - pd.Timedelta(minutes=30), ip=ATTACKER_IP, event_uid="early")
    window = [early, *denials(10, pd.Timedelta(seconds=30))]
    findings = run(make_events, window, keys=["principal"])
    assert findings["event_count"].tolist() == [10]
    assert "early" not in findings["event_uids"].iloc[0]


def test_throttled_not_counted_by_default(make_events: Build) -> None:
    window = denials(12, pd.Timedelta(seconds=20), failure_reason="throttled")
    assert run(make_events, window).empty
    findings = run(make_events, window, keys=["principal"], reasons=["throttled"])
    assert findings["evidence"].iloc[0]["reasons"] == {"throttled": 12}


def test_burst_straddling_history_includes_both(make_events: Build) -> None:
    rows = denials(12, pd.Timedelta(seconds=25))
    findings = run(make_events, rows[6:], rows[:6], keys=["principal"])
    assert findings["event_count"].tolist() == [12]
    assert findings["first_seen"].tolist() == [START]


def test_burst_chained_far_into_history(make_events: Build) -> None:
    # 80 failures a minute apart: the burst starts 70 minutes before the window, beyond the
    # first 20 minutes of raw history that the detector reads.
    rows = denials(80, pd.Timedelta(minutes=1), start=START - pd.Timedelta(minutes=70))
    findings = run(make_events, rows[70:], rows[:70], keys=["principal"])
    assert findings["event_count"].tolist() == [80]
    assert findings["first_seen"].tolist() == [START - pd.Timedelta(minutes=70)]


def test_burst_only_in_history_not_emitted(make_events: Build) -> None:
    history = denials(12, pd.Timedelta(seconds=25))
    window = [aws_read(START + pd.Timedelta(hours=3))]
    assert run(make_events, window, history).empty


def test_baseline_median_from_previous_week(make_events: Build) -> None:
    history = []
    for days_back in range(1, 8):
        day = START - pd.Timedelta(days=days_back)
        history += denials(days_back % 3, pd.Timedelta(hours=1), start=day)
    findings = run(make_events, denials(12, pd.Timedelta(seconds=25)), history, keys=["principal"])
    baseline = findings["baseline"].iloc[0]
    assert baseline["daily_failures"] == [1, 0, 2, 1, 0, 2, 1]
    assert baseline["median_per_day"] == 1.0


def test_batch_failure_counts_once(make_events: Build) -> None:
    window = []
    for n in range(9):
        window.append(aws_denied(START + pd.Timedelta(seconds=20 * n), ip=ATTACKER_IP))
    window += [
        aws_denied(START + pd.Timedelta(minutes=4), ip=ATTACKER_IP, event_uid="batch", secret=name)
        for name in ("x", "y", "z")
    ]
    findings = run(make_events, window, keys=["principal"])
    assert findings["event_count"].tolist() == [10]
    assert findings["evidence"].iloc[0]["distinct_secrets"] == 4


def test_baseline_from_categorical_rollup(make_events: Build) -> None:
    history = []
    for days_back in range(1, 8):
        day = START - pd.Timedelta(days=days_back)
        history += denials(days_back % 3, pd.Timedelta(hours=1), start=day)
        history += denials(1, pd.Timedelta(hours=1), principal="bob@example.com", start=day)
    view = CategoricalRollupHistory(make_events(history))
    assert view.rollup(columns=["principal", "count"])["principal"].dtype == "category"
    window = make_events(denials(12, pd.Timedelta(seconds=25)))
    findings = FailureBurstDetector().detect(window, view, NOW)
    assert findings["title"].tolist() == [f"12 failed secret accesses by {ALICE} in 5 min"]
    baseline = findings["baseline"].iloc[0]
    assert baseline["daily_failures"] == [1, 0, 2, 1, 0, 2, 1]
    assert baseline["summary"] == "7-day median 1 failures/day; this burst 12"


def test_present_drops_nulls_keeps_order() -> None:
    values = np.array(["b", None, "a", "b", np.nan, "c"], dtype=object)
    assert _present(values) == ["b", "a", "c"]


def test_present_of_only_nulls_is_empty() -> None:
    assert _present(np.array([None, np.nan], dtype=object)) == []


def test_single_returns_the_one_value() -> None:
    assert _single(np.array(["aws", None, "aws"], dtype=object)) == "aws"


def test_single_of_several_or_none_is_none() -> None:
    assert _single(np.array(["aws", "gcp"], dtype=object)) is None
    assert _single(np.array([None], dtype=object)) is None


def test_epoch_days_floor_to_utc_day() -> None:
    times = pd.Series(
        pd.to_datetime(
            ["1970-01-01T23:59:59Z", "1970-01-02T00:00:00Z", "1969-12-31T12:00:00Z"],
            format="ISO8601",
        )
    )
    assert _epoch_days(times).tolist() == [0, 1, -1]


def test_epoch_days_of_no_times_is_empty() -> None:
    assert _epoch_days(pd.Series([], dtype="datetime64[us, UTC]")).tolist() == []


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"min_failures": 1}, ("min_failures",)),
        ({"window_minutes": 0}, ("window_minutes",)),
        ({"reasons": ["forbidden"]}, ("reasons",)),
        ({"reasons": []}, ("reasons",)),
        ({"keys": ["account"]}, ("keys", 0)),
        ({"keys": []}, ("keys",)),
        ({"success_within_minutes": -1}, ("success_within_minutes",)),
    ],
)
def test_invalid_params_name_the_field(params: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        FailureBurstDetector(**params)
    assert [error["loc"] for error in caught.value.errors()] == [loc]
