"""Tests for keytrail.mass_retrieval: named positive and negative cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.mass_retrieval import MassRetrievalDetector, distinct_in_window
from pipeline.store.history import History
from tests.detectors.conftest import ALICE, DEPLOY_ROLE, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
START = pd.Timestamp("2024-06-30T10:00:00Z")
BOB = "bob@example.com"
GCP_METHOD = "google.cloud.secretmanager.v1.SecretManagerService."
VAULT = "https://shop-prod.vault.azure.net"


def at(seconds: float) -> pd.Timestamp:
    return START + pd.Timedelta(seconds=seconds)


def spread(
    count: int, every_seconds: float, principal: str = ALICE, **fields: Any
) -> list[dict[str, Any]]:
    """Return reads of ``count`` distinct secrets, one every ``every_seconds`` from START."""
    return [
        aws_read(at(n * every_seconds), principal, secret=f"app/secret-{n:03d}", **fields)
        for n in range(count)
    ]


def aws_list(time: pd.Timestamp, principal: str = ALICE) -> dict[str, Any]:
    return aws_read(time, principal, operation="ListSecrets", action="list", resource=None)


def ssm_describe(time: pd.Timestamp, principal: str = ALICE) -> dict[str, Any]:
    return aws_read(
        time,
        principal,
        service="ssm",
        operation="DescribeParameters",
        action="list",
        resource=None,
    )


def ssm_read(time: pd.Timestamp, n: int, principal: str = ALICE) -> dict[str, Any]:
    return aws_read(
        time,
        principal,
        service="ssm",
        operation="GetParameter",
        resource=f"arn:aws:ssm:eu-central-1:111122223333:parameter/app/param-{n}",
    )


def gcp_row(time: pd.Timestamp, method: str, action: str, resource: str | None) -> dict[str, Any]:
    return {
        "time": time,
        "cloud": "gcp",
        "log_format": "gcp_audit",
        "service": "secretmanager",
        "operation": GCP_METHOD + method,
        "action": action,
        "outcome": "success",
        "principal": ALICE,
        "principal_type": "user",
        "account": "shop-prod",
        "resource": resource,
        "source_ip": "198.51.100.20",
        "source_kind": "public",
    }


def azure_row(
    time: pd.Timestamp, operation: str, action: str, resource: str | None
) -> dict[str, Any]:
    return {
        "time": time,
        "cloud": "azure",
        "log_format": "azure_keyvault",
        "service": "keyvault",
        "operation": operation,
        "action": action,
        "outcome": "success",
        "principal": ALICE,
        "principal_type": "user",
        "account": "00000000-1111-2222-3333-444444444444",
        "resource": resource,
        "source_ip": "198.51.100.21",
        "source_kind": "public",
    }


def sequence_in(cloud: str, reads: int) -> list[dict[str, Any]]:
    """Return one enumeration at START followed by ``reads`` distinct reads a minute apart."""
    times = [at(60 * (n + 1)) for n in range(reads)]
    if cloud == "aws":
        return [aws_list(START)] + [
            aws_read(time, secret=f"app/secret-{n}") for n, time in enumerate(times)
        ]
    if cloud == "aws-ssm":
        return [ssm_describe(START)] + [ssm_read(time, n) for n, time in enumerate(times)]
    if cloud.startswith("gcp"):
        method = "ListSecretVersions" if cloud == "gcp-versions" else "ListSecrets"
        return [gcp_row(START, method, "list", None)] + [
            gcp_row(time, "AccessSecretVersion", "read", f"projects/shop-prod/secrets/s{n}")
            for n, time in enumerate(times)
        ]
    operation = "SecretListVersions" if cloud == "azure-versions" else "SecretList"
    return [azure_row(START, operation, "list", None)] + [
        azure_row(time, "SecretGet", "read", f"{VAULT}/secrets/s{n}")
        for n, time in enumerate(times)
    ]


def run(
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
    **params: Any,
) -> tuple[pd.DataFrame, MassRetrievalDetector]:
    detector = MassRetrievalDetector(**params)
    earlier = FrameHistory(make_events(history)) if history else FrameHistory()
    findings = detector.detect(make_events(window), earlier, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    return findings, detector


def test_thirty_distinct_in_five_minutes_fires(make_events: Build) -> None:
    findings, detector = run(make_events, spread(30, 10))
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "medium"
    assert finding["title"] == f"{ALICE} read 30 distinct secrets in 5 min"
    assert finding["principal"] == ALICE
    assert finding["cloud"] == "aws"
    assert finding["event_count"] == 30
    assert len(finding["resources"]) == 30
    assert finding["mitre"] == ["T1555.006"]
    assert finding["first_seen"] == START
    assert finding["last_seen"] == at(290)
    evidence = finding["evidence"]
    assert evidence["kind"] == "burst"
    assert evidence["distinct_secrets"] == 30
    assert evidence["reads"] == 30
    assert evidence["span_seconds"] == 290.0
    assert evidence["max_distinct"] == {"10 min": 30, "60 min": 30}
    assert evidence["read_operations"] == {"GetSecretValue": 30}
    assert finding["baseline"]["summary"] == (
        "30-day max 0 distinct secrets in one clock hour, 0 days with 20 or more; "
        "this burst 30 in 5 min"
    )
    assert detector.report_ == {"usual": 0}


def test_thirty_distinct_over_a_day_does_not_fire(make_events: Build) -> None:
    findings, _ = run(make_events, spread(30, 48 * 60))
    assert findings.empty


def test_nineteen_in_ten_minutes_does_not_fire(make_events: Build) -> None:
    findings, _ = run(make_events, spread(19, 30))
    assert findings.empty


def test_twenty_six_in_an_hour_fires(make_events: Build) -> None:
    # Two minutes apart: at most 5 distinct in any 10 minutes, 26 within 50 minutes.
    findings, _ = run(make_events, spread(26, 120))
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["max_distinct"] == {"10 min": 5, "60 min": 26}


def test_twenty_five_in_an_hour_does_not_fire(make_events: Build) -> None:
    findings, _ = run(make_events, spread(25, 120))
    assert findings.empty


def test_one_secret_read_often_does_not_fire(make_events: Build) -> None:
    window = [aws_read(at(n), secret="app/one") for n in range(200)]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_sixty_distinct_is_high(make_events: Build) -> None:
    findings, _ = run(make_events, spread(60, 5))
    assert findings["severity"].tolist() == ["high"]


def test_failed_reads_do_not_count(make_events: Build) -> None:
    window = [aws_denied(at(n * 10), secret=f"app/secret-{n}") for n in range(30)]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_two_principals_do_not_add_up(make_events: Build) -> None:
    window = spread(15, 10) + spread(15, 10, BOB)
    findings, _ = run(make_events, window)
    assert findings.empty


def test_two_bursts_give_two_findings(make_events: Build) -> None:
    later = [aws_read(at(7200 + n * 10), ALICE, secret=f"app/other-{n:03d}") for n in range(25)]
    findings, _ = run(make_events, spread(25, 10) + later)
    assert findings["event_count"].tolist() == [25, 25]
    assert findings["first_seen"].tolist() == [START, at(7200)]


def test_burst_only_in_history_is_not_reported(make_events: Build) -> None:
    findings, _ = run(make_events, [aws_read(at(4000), secret="app/late")], spread(30, 10))
    assert findings.empty


def test_burst_across_runs_fires_with_history_reads(make_events: Build) -> None:
    rows = spread(30, 10)
    findings, _ = run(make_events, rows[15:], rows[:15])
    assert len(findings) == 1
    assert findings["event_count"].iloc[0] == 30
    assert findings["first_seen"].iloc[0] == START


@pytest.mark.parametrize(
    ("cloud", "list_operation"),
    [
        ("aws", "ListSecrets"),
        ("aws-ssm", "DescribeParameters"),
        ("gcp", GCP_METHOD + "ListSecrets"),
        ("gcp-versions", GCP_METHOD + "ListSecretVersions"),
        ("azure", "SecretList"),
        ("azure-versions", "SecretListVersions"),
    ],
)
def test_list_then_six_reads_fires(make_events: Build, cloud: str, list_operation: str) -> None:
    findings, _ = run(make_events, sequence_in(cloud, 6))
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "high"
    assert finding["title"] == f"{ALICE} listed secrets, then read 6 distinct secrets within 6 min"
    assert finding["mitre"] == ["T1526", "T1555.006"]
    assert finding["event_count"] == 7
    assert finding["cloud"] == cloud.split("-")[0]
    evidence = finding["evidence"]
    assert evidence["kind"] == "sequence"
    assert evidence["list_calls"] == 1
    assert evidence["list_operations"] == {list_operation: 1}
    assert evidence["distinct_secrets"] == 6
    assert evidence["first_list"] == "2024-06-30T10:00:00Z"
    assert evidence["last_read"] == "2024-06-30T10:06:00Z"


@pytest.mark.parametrize("cloud", ["aws", "aws-ssm", "gcp", "azure"])
def test_list_then_two_reads_does_not_fire(make_events: Build, cloud: str) -> None:
    findings, _ = run(make_events, sequence_in(cloud, 2))
    assert findings.empty


def test_reads_after_sequence_window_do_not_count(make_events: Build) -> None:
    window = [aws_list(START)] + [
        aws_read(at(16 * 60 + n), secret=f"app/secret-{n}") for n in range(6)
    ]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_reads_before_list_do_not_count(make_events: Build) -> None:
    window = [aws_read(at(-60 + n), secret=f"app/secret-{n}") for n in range(6)]
    findings, _ = run(make_events, [*window, aws_list(START)])
    assert findings.empty


def test_other_principal_reads_do_not_count(make_events: Build) -> None:
    window = [aws_list(START, BOB)] + [
        aws_read(at(60 + n), ALICE, secret=f"app/secret-{n}") for n in range(6)
    ]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_paginated_lists_give_one_finding(make_events: Build) -> None:
    lists = [aws_list(at(n * 30)) for n in range(3)]
    reads = [aws_read(at(120 + n * 10), secret=f"app/secret-{n}") for n in range(8)]
    findings, _ = run(make_events, lists + reads)
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["list_calls"] == 3
    assert findings["event_count"].iloc[0] == 11


def test_sequence_absorbs_burst(make_events: Build) -> None:
    reads = [aws_read(at(30 + n * 4), secret=f"app/secret-{n:03d}") for n in range(25)]
    findings, _ = run(make_events, [aws_list(START), *reads])
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["kind"] == "sequence"
    assert findings["evidence"].iloc[0]["distinct_secrets"] == 25


def test_sequence_off_leaves_burst(make_events: Build) -> None:
    reads = [aws_read(at(30 + n * 4), secret=f"app/secret-{n:03d}") for n in range(25)]
    findings, _ = run(make_events, [aws_list(START), *reads], sequence=False)
    assert findings["evidence"].map(lambda evidence: evidence["kind"]).tolist() == ["burst"]


def test_get_parameters_by_path_counts_as_enumeration(make_events: Build) -> None:
    by_path = aws_read(
        START,
        service="ssm",
        operation="GetParametersByPath",
        resource="arn:aws:ssm:eu-central-1:111122223333:parameter/app",
    )
    window = [by_path] + [ssm_read(at(60 * (n + 1)), n) for n in range(5)]
    findings, _ = run(make_events, window)
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["list_operations"] == {"GetParametersByPath": 1}


def nightly_deploys(days: int) -> list[dict[str, Any]]:
    rows = []
    for back in range(days, 0, -1):
        night = START.floor("D") - pd.Timedelta(days=back) + pd.Timedelta(hours=2)
        rows += [
            aws_read(night + pd.Timedelta(seconds=n), DEPLOY_ROLE, secret=f"ci/secret-{n:03d}")
            for n in range(25)
        ]
    return rows


def tonight_deploy() -> list[dict[str, Any]]:
    night = START.floor("D") + pd.Timedelta(hours=2)
    return [
        aws_read(night + pd.Timedelta(seconds=n), DEPLOY_ROLE, secret=f"ci/secret-{n:03d}")
        for n in range(25)
    ]


def test_usual_nightly_deploy_does_not_fire(make_events: Build) -> None:
    findings, detector = run(make_events, tonight_deploy(), nightly_deploys(5))
    assert findings.empty
    assert detector.report_ == {"usual": 1}


def test_two_earlier_deploys_are_not_yet_usual(make_events: Build) -> None:
    findings, _ = run(make_events, tonight_deploy(), nightly_deploys(2))
    assert len(findings) == 1
    baseline = findings["baseline"].iloc[0]
    assert baseline["usual_days"] == 2
    assert baseline["max_hourly_distinct"] == 25


def test_learning_off_fires_on_usual_deploy(make_events: Build) -> None:
    findings, detector = run(make_events, tonight_deploy(), nightly_deploys(5), usual_days=0)
    assert len(findings) == 1
    assert detector.report_ == {"usual": 0}


def test_month_run_learns_own_days(make_events: Build) -> None:
    findings, detector = run(make_events, nightly_deploys(5) + tonight_deploy())
    # The first three nights fire; from the fourth on, three earlier nights make it usual.
    assert findings["first_seen"].dt.day.tolist() == [25, 26, 27]
    assert detector.report_ == {"usual": 3}


def test_distinct_in_window_counts() -> None:
    minute = 60_000_000
    codes = np.array([0, 0, 0, 0, 1], dtype=np.int64)
    pairs = np.array([0, 1, 0, 2, 3], dtype=np.int64)
    times = np.array([0, 1, 2, 12, 3], dtype=np.int64) * minute
    queries = np.array([0, 0, 0, 0, 1], dtype=np.int64)
    query_times = np.array([1, 2, 10, 12, 3], dtype=np.int64) * minute
    counts = distinct_in_window(codes, pairs, times, 10 * minute, queries, query_times)
    # At minute 10 the window (0, 10] still contains secret 0 through its second read.
    # At minute 12 the window (2, 12] contains only secret 2.
    assert counts.tolist() == [2, 2, 2, 1, 1]


def test_empty_windows_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        MassRetrievalDetector(windows=[])
    assert [error["loc"] for error in caught.value.errors()] == [("windows",)]


def test_rule_needs_two_secrets() -> None:
    with pytest.raises(ValidationError) as caught:
        MassRetrievalDetector(windows=[{"minutes": 10, "min_distinct": 1}])
    assert [error["loc"] for error in caught.value.errors()] == [("windows", 0, "min_distinct")]


def test_usual_deploy_learned_from_history_store(make_events: Build, tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(make_events(nightly_deploys(5)), "backfill")
    detector = MassRetrievalDetector()
    findings = detector.detect(make_events(tonight_deploy()), store, NOW)
    assert findings.empty
    assert detector.report_ == {"usual": 1}


def test_lookback_covers_learning_days() -> None:
    assert MassRetrievalDetector().lookback == pd.Timedelta(days=30, hours=2)
