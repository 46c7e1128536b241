"""Tests for keytrail.volume_spike: named positive and negative cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.volume import VolumeSpikeDetector, robust_scores
from pipeline.store.history import History
from tests.detectors.conftest import ALICE, DEPLOY_ROLE, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
TODAY = pd.Timestamp("2024-06-30T00:00:00Z")
DB = "prod/db/password"
SECRET_ARN = "arn:aws:secretsmanager:eu-central-1:111122223333:secret:"


def reads_on(
    day: pd.Timestamp, count: int, principal: str = ALICE, secret: str = DB, **fields: Any
) -> list[dict[str, Any]]:
    """Return ``count`` reads of ``secret`` spread over the working hours of ``day``."""
    start = day + pd.Timedelta(hours=9)
    step = pd.Timedelta(hours=8) / max(count, 1)
    return [aws_read(start + n * step, principal, secret=secret, **fields) for n in range(count)]


def daily(
    days: int, per_day: int, principal: str = ALICE, secret: str = DB
) -> list[dict[str, Any]]:
    """Return ``per_day`` reads on each of the ``days`` days before TODAY."""
    rows: list[dict[str, Any]] = []
    for back in range(days, 0, -1):
        rows += reads_on(TODAY - pd.Timedelta(days=back), per_day, principal, secret)
    return rows


def repeated_days(make_events: Build, days: int, per_day: int, principal: str) -> pd.DataFrame:
    """Return ``per_day`` reads on each of the ``days`` days before TODAY, built from one day."""
    one_day = make_events(reads_on(TODAY - pd.Timedelta(days=days), per_day, principal))
    copies = []
    for shift in range(days):
        copy = one_day.copy()
        copy["time"] = copy["time"] + pd.Timedelta(days=shift)
        copy["event_uid"] = copy["event_uid"] + f"-day{shift}"
        copies.append(copy)
    return pd.concat(copies, ignore_index=True)


def run(
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | pd.DataFrame | None = None,
    **params: Any,
) -> tuple[pd.DataFrame, VolumeSpikeDetector]:
    detector = VolumeSpikeDetector(**params)
    if isinstance(history, pd.DataFrame):
        earlier = FrameHistory(history)
    else:
        earlier = FrameHistory(make_events(history)) if history else FrameHistory()
    findings = detector.detect(make_events(window), earlier, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    return findings, detector


def test_jump_from_median_2_to_41_fires(make_events: Build) -> None:
    findings, detector = run(make_events, reads_on(TODAY, 41), daily(30, 2))
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "high"
    assert finding["title"] == f"41 secret reads by {ALICE} on 2024-06-30, 20x the 30-day median"
    assert finding["principal"] == ALICE
    assert finding["cloud"] == "aws"
    assert finding["account"] == "111122223333"
    assert finding["event_count"] == 41
    assert len(finding["event_uids"]) == 41
    assert finding["resources"] == [SECRET_ARN + DB]
    assert finding["mitre"] == ["T1555.006"]
    assert finding["first_seen"] == TODAY + pd.Timedelta(hours=9)
    evidence = finding["evidence"]
    assert evidence["level"] == "principal"
    assert evidence["count"] == 41
    assert evidence["median"] == 2.0
    assert evidence["mad"] == 0.0
    assert evidence["score"] == round(39 / 2**0.5, 2)
    assert evidence["ratio"] == 20.5
    assert evidence["top_secrets"] == {SECRET_ARN + DB: 41}
    assert evidence["bucket_start"] == "2024-06-30T00:00:00Z"
    baseline = finding["baseline"]
    assert baseline["counts"] == [2] * 30
    assert baseline["active_days"] == 30
    assert baseline["summary"] == (
        "30-day median 2 reads/day (MAD 0, 30 active days); on 2024-06-30 41"
    )
    assert detector.report_ == {"skipped_no_history": 0, "skipped_no_history_secrets": 0}


def test_zero_to_two_reads_does_not_fire(make_events: Build) -> None:
    # Seven reads spread over the month give a median of 0; today's 2 reads are 2x nothing.
    history = []
    for back in (28, 24, 20, 16, 12, 8, 4):
        history += reads_on(TODAY - pd.Timedelta(days=back), 1)
    findings, detector = run(make_events, reads_on(TODAY, 2), history)
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 0, "skipped_no_history_secrets": 0}


def test_steady_automation_at_1100_does_not_fire(make_events: Build) -> None:
    findings, _ = run(
        make_events,
        reads_on(TODAY, 1100, DEPLOY_ROLE),
        repeated_days(make_events, 30, 1000, DEPLOY_ROLE),
    )
    assert findings.empty


def test_steady_automation_tripled_fires_low(make_events: Build) -> None:
    findings, _ = run(
        make_events,
        reads_on(TODAY, 3100, DEPLOY_ROLE),
        repeated_days(make_events, 30, 1000, DEPLOY_ROLE),
    )
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "low"
    assert finding["principal"] == DEPLOY_ROLE
    assert finding["event_count"] == 3100
    assert len(finding["event_uids"]) == 1000
    assert finding["evidence"]["event_uids_listed"] == 1000
    assert finding["evidence"]["ratio"] == 3.1


def test_below_min_count_does_not_fire(make_events: Build) -> None:
    # 19 reads against a median of 1 is 19x, but below the absolute floor of 20.
    findings, _ = run(make_events, reads_on(TODAY, 19), daily(30, 1))
    assert findings.empty


def test_short_history_skips_and_reports(make_events: Build) -> None:
    findings, detector = run(make_events, reads_on(TODAY, 41), daily(5, 2))
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 1}


def test_no_history_skips_and_reports(make_events: Build) -> None:
    findings, detector = run(make_events, reads_on(TODAY, 41))
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 1}


def test_secret_spike_under_steady_principal_fires(make_events: Build) -> None:
    # The principal's total rises from 100 to 158 (1.6x); one secret goes from 2 to 60.
    history = daily(30, 98, secret="app/api-key") + daily(30, 2)
    window = reads_on(TODAY, 98, secret="app/api-key") + reads_on(TODAY, 60)
    findings, _ = run(make_events, window, history)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["evidence"]["level"] == "secret"
    assert finding["resources"] == [SECRET_ARN + DB]
    assert finding["event_count"] == 60
    assert finding["severity"] == "high"
    assert finding["title"] == (
        f"60 secret reads of {SECRET_ARN + DB} by {ALICE} on 2024-06-30, 30x the 30-day median"
    )


def test_secret_finding_folded_into_principal(make_events: Build) -> None:
    # Both levels fire for the same day: only the principal's finding is kept.
    findings, _ = run(make_events, reads_on(TODAY, 41), daily(30, 2))
    assert findings["evidence"].map(lambda evidence: evidence["level"]).tolist() == ["principal"]


def test_secret_level_only(make_events: Build) -> None:
    findings, _ = run(make_events, reads_on(TODAY, 41), daily(30, 2), levels=["secret"])
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["level"] == "secret"


def test_quiet_days_count_as_zero(make_events: Build) -> None:
    # Reads on 10 of the last 30 days: the 20 quiet days after the first read are zeros.
    history = []
    for back in range(30, 0, -3):
        history += reads_on(TODAY - pd.Timedelta(days=back), 10)
    findings, _ = run(make_events, reads_on(TODAY, 25), history)
    assert len(findings) == 1
    baseline = findings["baseline"].iloc[0]
    assert baseline["median"] == 0.0
    assert baseline["active_days"] == 10
    assert baseline["counts"] == [10, 0, 0] * 10
    assert findings["severity"].iloc[0] == "high"


def test_month_in_one_run_matches_daily_run(make_events: Build) -> None:
    # A first run over the whole month learns from the window's own earlier days.
    history = daily(30, 2)
    daily_run, _ = run(make_events, reads_on(TODAY, 41), history)
    backfill, _ = run(make_events, history + reads_on(TODAY, 41))
    assert len(backfill) == 1
    assert backfill["evidence"].iloc[0] == daily_run["evidence"].iloc[0]
    assert backfill["baseline"].iloc[0] == daily_run["baseline"].iloc[0]


def test_history_holding_window_counts_once(make_events: Build) -> None:
    window = make_events(reads_on(TODAY, 41))
    history = pd.concat([make_events(daily(30, 2)), window], ignore_index=True)
    findings = VolumeSpikeDetector().detect(window, FrameHistory(history), NOW)
    assert findings["event_count"].tolist() == [41]


def test_reads_earlier_today_in_history_count(make_events: Build) -> None:
    # An hourly run: 30 reads this morning are in the history, 11 more arrive now.
    morning = reads_on(TODAY, 30)
    later = [
        aws_read(TODAY + pd.Timedelta(hours=20, minutes=n), ALICE, secret=DB) for n in range(11)
    ]
    findings, _ = run(make_events, later, daily(30, 2) + morning)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["event_count"] == 41
    assert len(finding["event_uids"]) == 11
    assert finding["first_seen"] == TODAY + pd.Timedelta(hours=9)
    assert finding["last_seen"] == TODAY + pd.Timedelta(hours=20, minutes=10)


def test_other_cloud_has_own_baseline(make_events: Build) -> None:
    # The same name reading in GCP is another identity: AWS history does not make GCP normal.
    history = daily(30, 40)
    window = reads_on(TODAY, 40) + [
        row | {"cloud": "gcp", "account": "shop-prod"} for row in reads_on(TODAY, 41)
    ]
    findings, detector = run(make_events, window, history)
    assert findings.empty
    assert detector.report_["skipped_no_history"] == 1


def test_hourly_buckets(make_events: Build) -> None:
    history = daily(30, 8)
    burst = [
        aws_read(TODAY + pd.Timedelta(hours=3, seconds=n), ALICE, secret=DB) for n in range(30)
    ]
    findings, _ = run(make_events, burst, history, bucket_hours=1)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["title"] == (
        f"30 secret reads by {ALICE} on 2024-06-30 03:00-04:00 UTC, 30x the 30-day median"
    )
    assert finding["baseline"]["summary"].startswith("30-day median 0 reads/hour ")


def test_failed_reads_do_not_count(make_events: Build) -> None:
    window = [
        aws_denied(TODAY + pd.Timedelta(hours=10, seconds=n), ALICE, secret=DB) for n in range(41)
    ]
    findings, _ = run(make_events, window, daily(30, 2))
    assert findings.empty


def test_list_calls_do_not_count(make_events: Build) -> None:
    window = reads_on(TODAY, 41, action="list", operation="ListSecrets")
    findings, detector = run(make_events, window, daily(30, 2))
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 0, "skipped_no_history_secrets": 0}


def test_robust_scores_floor() -> None:
    scores = robust_scores(
        pd.Series([1100.0, 41.0, 5.0]).to_numpy(),
        pd.Series([1000.0, 2.0, 0.0]).to_numpy(),
        pd.Series([0.0, 0.0, 0.0]).to_numpy(),
    )
    assert scores.round(3).tolist() == [3.162, 27.577, 5.0]


def test_bucket_hours_must_divide_day() -> None:
    with pytest.raises(ValidationError) as caught:
        VolumeSpikeDetector(bucket_hours=5)
    assert [error["loc"] for error in caught.value.errors()] == [("bucket_hours",)]
    assert "must divide 24" in str(caught.value)


def test_lookback_covers_baseline() -> None:
    assert VolumeSpikeDetector().lookback == pd.Timedelta(days=31)


def test_history_store_gives_same_finding(make_events: Build, tmp_path: Path) -> None:
    # The Parquet history reads baselines from its stored hourly rollup, not from raw events.
    store = History(tmp_path / "history")
    store.append(make_events(daily(30, 2)), "backfill")
    window = make_events(reads_on(TODAY, 41))
    from_store = VolumeSpikeDetector().detect(window, store, NOW)
    in_memory = VolumeSpikeDetector().detect(window, FrameHistory(make_events(daily(30, 2))), NOW)
    assert len(from_store) == 1
    assert from_store["evidence"].iloc[0] == in_memory["evidence"].iloc[0]
    assert from_store["baseline"].iloc[0] == in_memory["baseline"].iloc[0]


def test_top_secrets_of_equal_counts_go_by_name(make_events: Build) -> None:
    # Six secrets read 7 times each: the five named first win, whatever order they came in.
    names = ["prod/f", "prod/c", "prod/a", "prod/e", "prod/b", "prod/d"]
    window: list[dict[str, Any]] = []
    for name in names:
        window += reads_on(TODAY, 7, secret=name)

    findings, _ = run(make_events, window, daily(30, 2))

    top = findings.iloc[0]["evidence"]["top_secrets"]
    assert list(top) == [
        SECRET_ARN + name for name in ("prod/a", "prod/b", "prod/c", "prod/d", "prod/e")
    ]
    assert set(top.values()) == {7}
