"""Tests for keytrail.cross_cloud: named positive and negative cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.cross_cloud import CrossCloudDetector, person_identity
from pipeline.store.history import History
from tests.detectors.conftest import ALICE, DEPLOY_ROLE, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
START = pd.Timestamp("2024-06-30T10:00:00Z")
SHARED_IP = "81.2.69.160"
CI_ACCOUNT = "ci-runner@shop-prod.iam.gserviceaccount.com"
SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"


def at(minutes: float, day: pd.Timestamp = START) -> pd.Timestamp:
    return day + pd.Timedelta(minutes=minutes)


def gcp_read(time: pd.Timestamp, principal: str = ALICE, **fields: Any) -> dict[str, Any]:
    row = {
        "time": time,
        "cloud": "gcp",
        "log_format": "gcp_audit",
        "service": "secretmanager",
        "operation": "google.cloud.secretmanager.v1.SecretManagerService.AccessSecretVersion",
        "action": "read",
        "outcome": "success",
        "principal": principal,
        "principal_type": "service_account" if "gserviceaccount" in principal else "user",
        "account": "shop-prod",
        "resource": "projects/shop-prod/secrets/stripe-key",
        "source_ip": "198.51.100.20",
        "source_kind": "public",
        "geo_country": "US",
    }
    return row | fields


def azure_read(time: pd.Timestamp, principal: str = ALICE, **fields: Any) -> dict[str, Any]:
    row = {
        "time": time,
        "cloud": "azure",
        "log_format": "azure_keyvault",
        "service": "keyvault",
        "operation": "SecretGet",
        "action": "read",
        "outcome": "success",
        "principal": principal,
        "principal_type": "user",
        "account": SUBSCRIPTION,
        "resource": "https://shop.vault.azure.net/secrets/db",
        "source_ip": "198.51.100.21",
        "source_kind": "public",
        "geo_country": "US",
    }
    return row | fields


def background() -> list[dict[str, Any]]:
    """Return one unrelated read 20 days before START, so the history covers a learning period."""
    return [
        aws_read(
            START - pd.Timedelta(days=20),
            "arn:aws:iam::111122223333:role/backup",
            ip="10.1.2.3",
            source_kind="private",
        )
    ]


def run(
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
    **params: Any,
) -> tuple[pd.DataFrame, CrossCloudDetector]:
    detector = CrossCloudDetector(**params)
    earlier = FrameHistory(make_events(background() + (history or [])))
    findings = detector.detect(make_events(window), earlier, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    return findings, detector


def workdays_in_aws_and_gcp(days: int) -> list[dict[str, Any]]:
    """Return ``days`` days before START on which Alice reads in AWS at 09:00, GCP at 14:00."""
    rows = []
    for back in range(days, 0, -1):
        day = START.floor("D") - pd.Timedelta(days=back)
        rows.append(aws_read(day + pd.Timedelta(hours=9), ALICE, ip="203.0.113.10"))
        rows.append(gcp_read(day + pd.Timedelta(hours=14)))
    return rows


def test_shared_ip_aws_gcp_fires(make_events: Build) -> None:
    window = [
        aws_read(START, DEPLOY_ROLE, ip=SHARED_IP),
        gcp_read(at(10), CI_ACCOUNT, source_ip=SHARED_IP),
    ]
    findings, detector = run(make_events, window)

    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "medium"
    assert finding["title"] == f"Source IP {SHARED_IP} read secrets in aws and gcp within 10 min"
    assert finding["principal"] is None
    assert finding["cloud"] is None
    assert finding["source_ips"] == [SHARED_IP]
    assert finding["event_count"] == 2
    assert finding["mitre"] == ["T1078.004", "T1555.006"]
    assert finding["first_seen"] == START
    assert finding["last_seen"] == at(10)

    evidence = finding["evidence"]
    assert evidence["key"] == "source_ip"
    assert evidence["identity"] == SHARED_IP
    assert evidence["clouds"] == ["aws", "gcp"]
    assert evidence["principals"] == sorted([DEPLOY_ROLE, CI_ACCOUNT])
    assert evidence["new_pairs"] == ["aws+gcp"]
    assert evidence["per_cloud"]["aws"] == {
        "principals": [DEPLOY_ROLE],
        "accounts": ["111122223333"],
        "source_ips": [SHARED_IP],
        "reads": 1,
        "first": "2024-06-30T10:00:00Z",
        "last": "2024-06-30T10:00:00Z",
    }
    assert evidence["per_cloud"]["gcp"]["principals"] == [CI_ACCOUNT]
    assert evidence["per_cloud"]["gcp"]["accounts"] == ["shop-prod"]

    assert finding["baseline"]["days_seen"] == {"aws+gcp": 0}
    assert finding["baseline"]["summary"] == (
        f"no earlier day in the last 30 days with secret reads by {SHARED_IP} in both aws and gcp"
    )
    assert detector.report_ == {"known": 0, "skipped_no_history": 0}


def test_same_ip_two_hours_apart_does_not_fire(make_events: Build) -> None:
    window = [
        aws_read(START, DEPLOY_ROLE, ip=SHARED_IP),
        gcp_read(at(120), CI_ACCOUNT, source_ip=SHARED_IP),
    ]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_private_address_does_not_fire(make_events: Build) -> None:
    window = [
        aws_read(START, DEPLOY_ROLE, ip="10.0.0.5", source_kind="private"),
        gcp_read(at(5), CI_ACCOUNT, source_ip="10.0.0.5", source_kind="private"),
    ]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_person_in_aws_and_azure_fires(make_events: Build) -> None:
    # The AWS session name and the Entra ID UPN differ only in case.
    window = [aws_read(START, ALICE), azure_read(at(25), "Alice@Example.com")]
    findings, _ = run(make_events, window)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["principal"] == ALICE
    assert finding["title"] == f"{ALICE} read secrets in aws and azure within 25 min"
    assert finding["source_ips"] == ["198.51.100.21", "203.0.113.10"]
    evidence = finding["evidence"]
    assert evidence["key"] == "person"
    assert evidence["principals"] == ["Alice@Example.com", ALICE]
    assert evidence["per_cloud"]["azure"]["accounts"] == [SUBSCRIPTION]


def test_same_person_same_ip_gives_one_finding(make_events: Build) -> None:
    window = [aws_read(START, ALICE, ip=SHARED_IP), gcp_read(at(3), source_ip=SHARED_IP)]
    findings, _ = run(make_events, window)
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["key"] == "person"


def test_address_key_alone(make_events: Build) -> None:
    window = [aws_read(START, ALICE, ip=SHARED_IP), gcp_read(at(3), source_ip=SHARED_IP)]
    findings, _ = run(make_events, window, keys=["source_ip"])
    assert findings["evidence"].map(lambda evidence: evidence["key"]).tolist() == ["source_ip"]
    assert findings["principal"].tolist() == [ALICE]


def test_three_clouds_is_high(make_events: Build) -> None:
    window = [aws_read(START, ALICE), gcp_read(at(10)), azure_read(at(20))]
    findings, _ = run(make_events, window)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "high"
    assert finding["title"] == f"{ALICE} read secrets in aws, azure and gcp within 20 min"
    assert finding["evidence"]["new_pairs"] == ["aws+azure", "aws+gcp", "azure+gcp"]


def test_daily_two_cloud_person_quiet(make_events: Build) -> None:
    window = [aws_read(START, ALICE), gcp_read(at(15))]
    findings, detector = run(make_events, window, workdays_in_aws_and_gcp(21))
    assert findings.empty
    assert detector.report_ == {"known": 1, "skipped_no_history": 0}


def test_known_pair_does_not_cover_new_cloud(make_events: Build) -> None:
    window = [aws_read(START, ALICE), gcp_read(at(5)), azure_read(at(15))]
    findings, _ = run(make_events, window, workdays_in_aws_and_gcp(21))
    assert len(findings) == 1
    baseline = findings["baseline"].iloc[0]
    assert baseline["days_seen"] == {"aws+azure": 0, "aws+gcp": 21, "azure+gcp": 0}
    assert findings["evidence"].iloc[0]["new_pairs"] == ["aws+azure", "azure+gcp"]


def test_pair_older_than_lookback_fires_again(make_events: Build) -> None:
    window = [aws_read(START, ALICE), gcp_read(at(15))]
    findings, _ = run(make_events, window, workdays_in_aws_and_gcp(21), lookback_days=0)
    assert len(findings) == 1


def test_same_day_earlier_reads_make_pair_known(make_events: Build) -> None:
    # Alice read in both clouds this morning, hours apart; the afternoon episode is her habit.
    morning = [aws_read(START.floor("D") + pd.Timedelta(hours=7), ALICE), gcp_read(at(-60))]
    window = [aws_read(at(120), ALICE), gcp_read(at(130))]
    findings, detector = run(make_events, window, morning)
    assert findings.empty
    assert detector.report_ == {"known": 1, "skipped_no_history": 0}


def test_first_day_fires_in_month_run(make_events: Build) -> None:
    rows = []
    for day in range(3):
        base = START + pd.Timedelta(days=day - 3)
        rows += [aws_read(base, ALICE), gcp_read(base + pd.Timedelta(minutes=5))]
    findings, detector = run(make_events, rows)
    assert findings["first_seen"].tolist() == [START - pd.Timedelta(days=3)]
    assert detector.report_ == {"known": 2, "skipped_no_history": 0}


def test_iam_user_name_is_not_a_person(make_events: Build) -> None:
    window = [
        aws_read(START, "tbecker", principal_type="user"),
        gcp_read(at(5), "tbecker@example.com"),
    ]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_failed_reads_do_not_count(make_events: Build) -> None:
    window = [aws_denied(START, ALICE), gcp_read(at(5))]
    findings, _ = run(make_events, window)
    assert findings.empty


def test_episode_only_in_history_is_not_reported(make_events: Build) -> None:
    history = [aws_read(START, ALICE), gcp_read(at(5))]
    # 11:10 is more than an hour after the GCP read at 10:05, so it links to nothing.
    findings, _ = run(make_events, [aws_read(at(70), ALICE)], history)
    assert findings.empty


def test_episode_continued_next_run_keeps_dedup_key(make_events: Build) -> None:
    first_rows = [aws_read(START, ALICE), gcp_read(at(5))]
    first, _ = run(make_events, first_rows)
    second, _ = run(make_events, [aws_read(at(30), ALICE)], first_rows)
    assert second["event_count"].tolist() == [3]
    assert second["dedup_key"].tolist() == first["dedup_key"].tolist()


def test_episode_across_runs_fires(make_events: Build) -> None:
    findings, _ = run(make_events, [gcp_read(at(20))], [aws_read(START, ALICE)])
    assert len(findings) == 1
    assert findings["event_count"].iloc[0] == 2
    assert findings["first_seen"].iloc[0] == START


def test_person_identity_table() -> None:
    principals = pd.Series(
        ["Alice@Example.com", "alice@example.com", "tbecker", "ci@p.iam.gserviceaccount.com", None]
    )
    types = pd.Series(["user", "federated", "user", "service_account", "user"])
    assert person_identity(principals, types).tolist() == [
        "alice@example.com",
        "alice@example.com",
        None,
        None,
        None,
    ]


def test_short_history_skips_and_reports(make_events: Build) -> None:
    # Six days of data: the first meeting of two clouds may not be the first at all.
    history = [aws_read(START - pd.Timedelta(days=6), ALICE)]
    window = [aws_read(START, ALICE), gcp_read(at(5))]
    detector = CrossCloudDetector()
    findings = detector.detect(make_events(window), FrameHistory(make_events(history)), NOW)
    assert findings.empty
    assert detector.report_ == {"known": 0, "skipped_no_history": 1}


def test_no_learning_period_fires_without_history(make_events: Build) -> None:
    window = [aws_read(START, ALICE), gcp_read(at(5))]
    detector = CrossCloudDetector(min_history_days=0)
    findings = detector.detect(make_events(window), FrameHistory(), NOW)
    assert len(findings) == 1


def test_empty_keys_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        CrossCloudDetector(keys=[])
    assert [error["loc"] for error in caught.value.errors()] == [("keys",)]


def test_lookback_covers_learning_days() -> None:
    assert CrossCloudDetector().lookback == pd.Timedelta(days=30, minutes=120)


def test_shared_address_learned_from_history_store(make_events: Build, tmp_path: Path) -> None:
    # The stored rollup keeps no source_kind: the address is classified again on read.
    history = []
    for back in range(10, 0, -1):
        day = START - pd.Timedelta(days=back)
        history += [
            aws_read(day, DEPLOY_ROLE, ip=SHARED_IP),
            gcp_read(day + pd.Timedelta(minutes=2), CI_ACCOUNT, source_ip=SHARED_IP),
        ]
    store = History(tmp_path / "history")
    store.append(make_events(history), "backfill")
    window = [
        aws_read(START, DEPLOY_ROLE, ip=SHARED_IP),
        gcp_read(at(2), CI_ACCOUNT, source_ip=SHARED_IP),
    ]
    detector = CrossCloudDetector()
    findings = detector.detect(make_events(window), store, NOW)
    assert findings.empty
    assert detector.report_ == {"known": 1, "skipped_no_history": 0}
