"""A principal idle for the whole look-back that returns: the carried principal directory.

``keytrail.first_seen`` and ``keytrail.risk`` learn when each principal was first and last
seen, and carry that from run to run, so a dormant identity that comes back is not treated as
brand new.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from detectors.base import FrameHistory
from detectors.first_seen import (
    FirstSeenDetector,
    activity_extents,
    directory_from_state,
    directory_state,
    empty_directory,
    merge_directory,
    principal_activity,
)
from detectors.risk import RiskDetector
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.store.state import State
from tests.detectors.conftest import ACCOUNT, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]

SYNC_ROLE = "arn:aws:iam::111122223333:role/legacy-sync"
NEWCOMER = "new.engineer@example.com"
DAY0 = pd.Timestamp("2024-03-01T00:00:00Z")
NOW = DAY0 + pd.Timedelta(days=70)


def at(day: int, hour: int = 9) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=day, hours=hour)


def sync_reads(days: range) -> list[dict[str, Any]]:
    """Return the sync role's one read of its token per day at 09:00, from Frankfurt."""
    return [
        aws_read(at(day), SYNC_ROLE, secret="prod/sync/token", city="frankfurt") for day in days
    ]


def returned_reads() -> list[dict[str, Any]]:
    """Return the sync role's reads on day 65, 46 days after its last read on day 19."""
    return [
        aws_read(at(65), SYNC_ROLE, secret="prod/db/password", city="frankfurt"),
        aws_read(at(65) + pd.Timedelta(minutes=1), SYNC_ROLE, secret="prod/sync/token"),
    ]


def learned_first_seen(make_events: Build) -> FirstSeenDetector:
    """Return a first_seen detector that saw days 0-19, restored from its JSON state."""
    detector = FirstSeenDetector()
    detector.detect(make_events(sync_reads(range(20))), FrameHistory(), at(20))
    state = json.loads(json.dumps(detector.get_state()))
    return FirstSeenDetector().set_state(state)


def learned_risk(make_events: Build) -> RiskDetector:
    """Return a risk detector that saw days 0-19, restored from its JSON state."""
    detector = RiskDetector()
    detector.detect(make_events(sync_reads(range(20))), FrameHistory(), at(20))
    state = json.loads(json.dumps(detector.get_state()))
    return RiskDetector().set_state(state)


def signal_kinds(detector: RiskDetector, principal: str) -> list[str]:
    entry = detector.get_state()["principals"].get(principal, {"signals": []})
    return [signal["kind"] for signal in entry["signals"]]


# Positive cases


def test_dormant_principal_fires_first_seen(make_events: Build) -> None:
    detector = learned_first_seen(make_events)
    history = FrameHistory(make_events(sync_reads(range(20))))
    findings = detector.detect(make_events(returned_reads()), history, NOW)

    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["principal"] == SYNC_ROLE
    assert finding["title"] == (
        f"{SYNC_ROLE} read 2 secrets for the first time in 30 days, back after 46 idle days"
    )
    assert finding["baseline"]["returned_after_idle"] is True
    assert finding["baseline"]["idle_days"] == 46.0
    assert finding["baseline"]["principal_first_seen"] == "2024-03-01T09:00:00Z"
    assert finding["baseline"]["summary"].endswith(f"; {SYNC_ROLE} returned after 46 idle days")
    assert detector.report_ == {"skipped_no_history": 0, "skipped_no_history_secrets": 0}


def test_dormant_principal_risk_signal(make_events: Build) -> None:
    detector = learned_risk(make_events)
    history = FrameHistory(make_events(sync_reads(range(20))))
    detector.detect(make_events(returned_reads()), history, NOW)

    signals = detector.get_state()["principals"][SYNC_ROLE]["signals"]
    dormant = [signal for signal in signals if signal["kind"] == "dormant_return"]
    assert len(dormant) == 1
    assert dormant[0]["detail"] == "returned after 46 idle days"
    assert dormant[0]["weight"] == 2.0
    assert dormant[0]["time"] == "2024-05-05T09:00:00.000000+00:00"
    assert "first_seen_secret" in signal_kinds(detector, SYNC_ROLE)
    assert detector.report_["skipped_no_history"] == 0


def test_dormant_return_weight_from_params(make_events: Build) -> None:
    detector = RiskDetector(weights={"dormant_return": 5.5})
    detector.set_state(learned_risk(make_events).get_state())
    detector.detect(make_events(returned_reads()), FrameHistory(), NOW)

    signals = detector.get_state()["principals"][SYNC_ROLE]["signals"]
    weights = [signal["weight"] for signal in signals if signal["kind"] == "dormant_return"]
    assert weights == [5.5]


def test_dormant_return_weight_zero_is_off(make_events: Build) -> None:
    detector = RiskDetector(weights={"dormant_return": 0})
    detector.set_state(learned_risk(make_events).get_state())
    detector.detect(make_events(returned_reads()), FrameHistory(), NOW)
    assert "dormant_return" not in signal_kinds(detector, SYNC_ROLE)


def test_idle_unknown_after_later_run(make_events: Build) -> None:
    # The directory also saw day 70, after the replayed window: the idle time before the
    # window is unknown, but the principal is known and had nothing in the look-back.
    detector = FirstSeenDetector()
    detector.detect(make_events(sync_reads(range(20))), FrameHistory(), at(20))
    detector.detect(make_events(sync_reads(range(70, 71))), FrameHistory(), at(71))
    findings = detector.detect(make_events(returned_reads()), FrameHistory(), NOW)

    assert findings["title"].tolist() == [
        f"{SYNC_ROLE} read 2 secrets for the first time in 30 days, back after at least 30 "
        "idle days"
    ]
    assert findings.iloc[0]["baseline"]["idle_days"] is None


# Negative cases


def test_dormant_principal_without_state_learns(make_events: Build) -> None:
    history = FrameHistory(make_events(sync_reads(range(20))))
    detector = FirstSeenDetector()
    findings = detector.detect(make_events(returned_reads()), history, NOW)

    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 2}


def test_dormant_principal_without_state_no_risk_signal(make_events: Build) -> None:
    history = FrameHistory(make_events(sync_reads(range(20))))
    detector = RiskDetector()
    detector.detect(make_events(returned_reads()), history, NOW)
    assert "dormant_return" not in signal_kinds(detector, SYNC_ROLE)
    assert detector.report_["skipped_no_history"] == 1


def test_new_principal_with_state_learns(make_events: Build) -> None:
    detector = learned_first_seen(make_events)
    window = [aws_read(at(65), NEWCOMER, secret="prod/db/password", city="berlin")]
    findings = detector.detect(make_events(window), FrameHistory(), NOW)

    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 1}


def test_new_principal_with_state_no_risk_signal(make_events: Build) -> None:
    detector = learned_risk(make_events)
    window = [aws_read(at(65), NEWCOMER, secret="prod/db/password", city="berlin")]
    detector.detect(make_events(window), FrameHistory(), NOW)
    assert signal_kinds(detector, NEWCOMER) == []


def test_active_principal_not_returned(make_events: Build) -> None:
    # Reads on days 40-64 are in the look-back, so day 65 is no return.
    detector = learned_first_seen(make_events)
    history = FrameHistory(make_events(sync_reads(range(20)) + sync_reads(range(40, 65))))
    findings = detector.detect(make_events(returned_reads()), history, NOW)

    assert len(findings) == 1
    assert findings.iloc[0]["title"] == f"First read of prod/db/password by {SYNC_ROLE} in 30 days"
    assert "returned_after_idle" not in findings.iloc[0]["baseline"]


def test_replay_ignores_later_directory(make_events: Build) -> None:
    # The directory first saw the role on day 40. A replay of day 10 must not use that.
    detector = FirstSeenDetector()
    detector.detect(make_events(sync_reads(range(40, 60))), FrameHistory(), at(60))
    window = [aws_read(at(10), SYNC_ROLE, secret="prod/db/password")]
    findings = detector.detect(make_events(window), FrameHistory(), at(11))

    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 1}


# State


def test_first_seen_state_round_trip(make_events: Build) -> None:
    detector = FirstSeenDetector()
    detector.detect(make_events(sync_reads(range(20))), FrameHistory(), at(20))
    state = json.loads(json.dumps(detector.get_state()))

    assert state == {
        "version": 1,
        "fitted_through": "2024-03-20T09:00:00.000001+00:00",
        "directory": {
            "principals": [SYNC_ROLE],
            "first_seen": [int(at(0).value // 1000)],
            "last_seen": [int(at(19).value // 1000)],
        },
    }
    restored = FirstSeenDetector().set_state(state)
    assert restored.fitted_through == detector.fitted_through
    assert restored.get_state() == state


def test_risk_state_round_trip(make_events: Build) -> None:
    detector = RiskDetector()
    detector.detect(make_events(sync_reads(range(20))), FrameHistory(), at(20))
    state = json.loads(json.dumps(detector.get_state()))

    assert state["fitted_through"] == "2024-03-20T09:00:00.000001+00:00"
    assert state["directory"]["principals"] == [SYNC_ROLE]
    restored = RiskDetector().set_state(state)
    assert restored.fitted_through == detector.fitted_through
    assert restored.get_state() == state


def test_risk_state_without_directory(make_events: Build) -> None:
    # A state written before the directory existed restores an empty one.
    restored = RiskDetector().set_state({"version": 1, "principals": {}})
    assert restored.fitted_through is None
    assert restored.get_state()["directory"] == {
        "principals": [],
        "first_seen": [],
        "last_seen": [],
    }


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ([], "principal directory: expected an object, found list"),
        ({"principals": ["a"], "first_seen": [1]}, "principal directory: invalid lists: KeyError"),
        (
            {"principals": ["a", "b"], "first_seen": [1], "last_seen": [2]},
            "principal directory: expected lists of one length, found 2 principals, 1 first "
            "and 1 last times",
        ),
        (
            {"principals": [1], "first_seen": [1], "last_seen": [2]},
            "principal directory: 'principals' is not a list of strings",
        ),
        (
            {"principals": ["a"], "first_seen": [3], "last_seen": [2]},
            "principal directory: a first_seen time is after its last_seen time",
        ),
        (
            {"principals": ["a", "a"], "first_seen": [1, 1], "last_seen": [2, 2]},
            "principal directory: a principal appears twice",
        ),
    ],
)
def test_invalid_directory_rejected(directory: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        directory_from_state(directory)
    assert str(caught.value).startswith(message)


def test_first_seen_wrong_version_rejected() -> None:
    with pytest.raises(ValueError) as caught:
        FirstSeenDetector().set_state({"version": 9})
    assert str(caught.value) == "keytrail.first_seen state: expected version 1, found 9"


def test_first_seen_params_keep_state() -> None:
    changed = FirstSeenDetector(severity="medium", sensitive_resources=["*prod*"])
    assert changed.params_hash() == FirstSeenDetector().params_hash()


def test_risk_params_hash_follows_scores() -> None:
    assert RiskDetector(weights={"new_asn": 1}).params_hash() == RiskDetector().params_hash()
    assert RiskDetector(threshold=12).params_hash() != RiskDetector().params_hash()
    assert RiskDetector(half_life_hours=12).params_hash() != RiskDetector().params_hash()


# Helpers


def test_merge_directory_keeps_extremes(make_events: Build) -> None:
    early = activity_extents(make_events(sync_reads(range(3, 5))), "time", "time")
    late = activity_extents(make_events(sync_reads(range(1, 9))), "time", "time")
    merged = merge_directory(early, late, early)

    assert merged.index.tolist() == [SYNC_ROLE]
    assert merged.loc[SYNC_ROLE, "first_seen"] == at(1)
    assert merged.loc[SYNC_ROLE, "last_seen"] == at(8)
    assert merge_directory(empty_directory()).empty


def test_directory_state_is_compact(make_events: Build) -> None:
    extents = activity_extents(make_events(sync_reads(range(2))), "time", "time")
    state = directory_state(extents)
    assert state == {
        "principals": [SYNC_ROLE],
        "first_seen": [1709283600000000],
        "last_seen": [1709370000000000],
    }
    assert directory_from_state(state).equals(extents)


def test_principal_activity_without_directory(make_events: Build) -> None:
    prior = make_events(sync_reads(range(40, 45))).assign(first_time=lambda f: f["time"])
    prior = activity_extents(prior.assign(last_time=prior["time"]))
    window = activity_extents(make_events(returned_reads()), "time", "time")
    activity = principal_activity(empty_directory(), prior, window, at(65), pd.Timedelta(days=30))

    assert activity.loc[SYNC_ROLE, "since"] == at(40)
    assert not activity.loc[SYNC_ROLE, "returned"]
    assert activity["idle"].isna().all()


# Engine runs


def cloudtrail_read(number: int, time: pd.Timestamp, role: str, secret: str) -> dict[str, Any]:
    """Return one CloudTrail GetSecretValue record made by an assumed role session."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "AssumedRole",
            "principalId": f"AROAEXAMPLE{number:08d}:worker",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/worker",
            "accountId": ACCOUNT,
            "sessionContext": {
                "sessionIssuer": {
                    "type": "Role",
                    "principalId": "AROAEXAMPLE00000000",
                    "arn": f"arn:aws:iam::{ACCOUNT}:role/{role}",
                    "accountId": ACCOUNT,
                    "userName": role,
                },
                "attributes": {"creationDate": "2024-03-01T08:00:00Z", "mfaAuthenticated": "false"},
            },
        },
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "eu-central-1",
        "sourceIPAddress": "203.0.113.10",
        "userAgent": "aws-sdk-go/1.44.0",
        "requestParameters": {"secretId": secret},
        "responseElements": None,
        "eventID": f"33333333-0000-4000-8000-{number:012d}",
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }


def write_log(root: Path, name: str, records: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in records)
    (root / f"{name}.jsonl").write_text(text, encoding="utf-8")


def engine_settings(tmp_path: Path) -> Settings:
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"keytrail.first_seen": {}, "keytrail.risk": {}},
        "alerting": {"console": False, "outbox": False},
    }
    return settings_from_mapping(data, base_dir=tmp_path)


def stored_directory(tmp_path: Path, detector: str) -> dict[str, Any]:
    with State(tmp_path / "state" / "state.db", read_only=True) as state:
        stored = state.detector_state(detector)
    assert stored is not None, f"no state stored for {detector}"
    return dict(stored.state["directory"])


def test_engine_carries_directory(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    config = engine_settings(tmp_path)
    now = datetime(2024, 5, 10, tzinfo=UTC)
    sync = f"arn:aws:iam::{ACCOUNT}:role/legacy-sync"
    batch = f"arn:aws:iam::{ACCOUNT}:role/nightly-batch"

    # Run 1: the sync role reads its token every day for 20 days.
    write_log(
        logs,
        "run1",
        [cloudtrail_read(n, at(n), "legacy-sync", "prod/sync/token") for n in range(20)],
    )
    run_once(config, now=now)
    first = stored_directory(tmp_path, "keytrail.first_seen")
    assert first["principals"] == [sync]

    # Run 2, weeks later: only the batch role is active. The sync role stays in the directory,
    # although the look-back of this run no longer contains it.
    write_log(
        logs,
        "run2",
        [
            cloudtrail_read(100 + n, at(40 + n), "nightly-batch", "prod/batch/key")
            for n in range(20)
        ],
    )
    run_once(config, now=now)
    for detector in ("keytrail.first_seen", "keytrail.risk"):
        second = stored_directory(tmp_path, detector)
        assert second["principals"] == [sync, batch]
        assert second["first_seen"][0] == first["first_seen"][0]
        assert second["last_seen"][0] == first["last_seen"][0]

    # Run 3: the sync role returns on day 65 and reads a secret it never read.
    write_log(logs, "run3", [cloudtrail_read(200, at(65), "legacy-sync", "prod/db/password")])
    summary = run_once(config, now=now)
    counts = {entry.id: entry.findings for entry in summary.detectors}
    assert counts["keytrail.first_seen"] == 1
    findings = [
        json.loads(line)
        for line in (tmp_path / "out" / "findings.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    titles = [item["title"] for item in findings if item["detector"] == "keytrail.first_seen"]
    assert titles == [
        f"First read of prod/db/password by {sync} in 30 days, back after 46 idle days"
    ]
    with State(tmp_path / "state" / "state.db", read_only=True) as state:
        risk = state.detector_state("keytrail.risk")
    assert risk is not None
    kinds = [signal["kind"] for signal in risk.state["principals"][sync]["signals"]]
    assert "dormant_return" in kinds
