"""End-to-end delivery: runs of the engine against a local HTTP server acting as a Slack webhook."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest

from detectors.base import FINDING_COLUMNS
from pipeline.alerting.alerts import Alert
from pipeline.alerting.delivery import (
    AlertingSettings,
    AlertPlan,
    alert_from_payload,
    enqueue_alerts,
)
from pipeline.alerting.outbox import Outbox, alert_payload
from pipeline.alerting.routing import RoutingSettings, route_alerts
from pipeline.alerting.silences import Matcher, Silence, SilenceStore
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.errors import ConfigError
from pipeline.store.state import SCHEMA_VERSION, State
from pipeline.summary import EXIT_DELIVERY
from tests.peers import HttpPeer, Reply, Request
from tests.test_engine import NOW, write_logs

WEBHOOK_ENV = "KEYTRAIL_TEST_SLACK_WEBHOOK_URL"


class SlackPeer:
    """The requests the Slack webhook peer of :func:`slack_peer` received, and its replies.

    Each POST gets the next status in ``statuses`` (200 once it is empty), and its JSON body
    is appended to ``bodies``. tests/test_cli.py uses this class and fixture too.
    """

    statuses: ClassVar[list[int]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def reply(cls, request: Request, number: int) -> Reply:
        cls.bodies.append(request.body)
        status = cls.statuses.pop(0) if cls.statuses else 200
        return Reply(status, "ok" if status == 200 else "no_service")


@pytest.fixture
def slack_peer(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[SlackPeer]]:
    SlackPeer.statuses = []
    SlackPeer.bodies = []
    with HttpPeer(SlackPeer.reply) as peer:
        monkeypatch.setenv(WEBHOOK_ENV, peer.url("/hook"))
        yield SlackPeer


def make_settings(tmp_path: Path, **alerting: Any) -> Settings:
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"tests.every_read": {}},
        "alerting": {
            "console": False,
            "receivers": {
                "team": {"slack": {"webhook_url_env": WEBHOOK_ENV, "max_retries": 0}},
            },
            "routing": {"default_receiver": "team", "group_by": ["..."]},
            "delivery": {"backoff_base_seconds": 1, "backoff_cap_seconds": 1, "max_attempts": 3},
            **alerting,
        },
    }
    return settings_from_mapping(data, base_dir=tmp_path)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return write_logs(tmp_path / "logs")


def test_first_run_delivers_each_alert(
    tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]
) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert summary.findings_new == 4
    assert len(slack_peer.bodies) == 4
    assert summary.delivery["receivers"]["team"]["sent"] == 4
    assert summary.delivery["receivers"]["team"]["pending"] == 0
    assert summary.alerting["queued"] == {"team": {"queued": 4, "updates": 0, "repeats_skipped": 0}}
    assert summary.exit_code() == 0


def test_second_run_sends_nothing(tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    second = run_once(settings, now=NOW + timedelta(minutes=5))

    assert len(slack_peer.bodies) == 4
    assert second.findings_new == 0
    assert second.delivery["receivers"] == {}
    assert second.exit_code() == 0


def test_server_error_retried_next_run(
    tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]
) -> None:
    settings = make_settings(tmp_path)
    slack_peer.statuses = [500]
    first = run_once(settings, now=NOW)

    assert len(slack_peer.bodies) == 1
    assert first.delivery["receivers"]["team"]["retry"] == 1
    assert first.delivery["receivers"]["team"]["pending"] == 4
    assert first.exit_code() == EXIT_DELIVERY

    second = run_once(settings, now=NOW + timedelta(minutes=5))

    assert len(slack_peer.bodies) == 5
    assert second.delivery["receivers"]["team"]["sent"] == 4
    assert second.delivery["receivers"]["team"]["pending"] == 0
    assert second.exit_code() == 0


def test_not_found_dead_letters(tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]) -> None:
    slack_peer.statuses = [404]
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert len(summary.delivery["dead"]) == 1
    assert summary.delivery["receivers"]["team"]["sent"] == 3
    assert summary.delivery["receivers"]["team"]["dead"] == 1
    assert summary.exit_code() == EXIT_DELIVERY
    with Outbox(tmp_path / "state" / "state.db") as outbox:
        assert outbox.counts() == {"pending": 0, "delivered": 3, "dead": 1}


def test_allow_list_removes_findings(
    tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]
) -> None:
    settings = make_settings(
        tmp_path,
        allow_list=[
            {"detectors": ["tests.every_read"], "principals": ["*"], "reason": "expected reads"}
        ],
    )
    summary = run_once(settings, now=NOW)

    assert summary.alerting["allowed"] == 4
    assert summary.alerting["allowed_by"] == {"entry 0: expected reads": 4}
    assert slack_peer.bodies == []
    assert summary.findings_new == 4


def test_silence_mutes_findings(tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]) -> None:
    store = SilenceStore(tmp_path / "state" / "state.db")
    silence = Silence(
        matchers=[Matcher(label="detector", value="tests.every_read")],
        starts_at=NOW - timedelta(hours=1),
        ends_at=NOW + timedelta(hours=1),
        owner="oncall@example.com",
        reason="maintenance window",
    )
    silence_id = store.add(silence, now=NOW - timedelta(hours=1))
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert summary.alerting["silenced"] == 4
    assert summary.alerting["silenced_by"] == {silence_id: 4}
    assert slack_peer.bodies == []


def test_dry_run_enqueues_nothing(tmp_path: Path, logs: Path, slack_peer: type[SlackPeer]) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW, dry_run=True)

    assert summary.delivery == {}
    assert slack_peer.bodies == []
    assert not (tmp_path / "state" / "state.db").exists()


def test_default_receiver_writes_outbox_files(tmp_path: Path, logs: Path) -> None:
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"tests.every_read": {}},
        "alerting": {"console": False},
    }
    summary = run_once(settings_from_mapping(data, base_dir=tmp_path), now=NOW)

    assert summary.delivery["receivers"]["outbox-files"]["sent"] == 4
    assert len(list((tmp_path / "out" / "outbox").glob("*.slack.json"))) == 4
    assert len(list((tmp_path / "out" / "outbox").glob("*.eml"))) == 4
    assert summary.outputs["slack_files"] == 4


def test_unknown_receiver_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(tmp_path, routing={"default_receiver": "nobody"})

    assert "routing names unknown receivers nobody" in str(caught.value)


def test_repeat_interval_parsed() -> None:
    settings = AlertingSettings(repeat_interval="90m")  # type: ignore[arg-type]

    assert settings.repeat_interval == timedelta(minutes=90)


def test_state_upgrade_adds_alert_ledger(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=2")

    with State(path):
        pass
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert "alert_ledger" in tables
    assert version == SCHEMA_VERSION == 3


def finding(
    finding_id: str, *, severity: str = "medium", ips: list[str] | None = None
) -> dict[str, Any]:
    return {
        "finding_id": finding_id,
        "detector": "tests.every_read",
        "severity": severity,
        "title": "read of db/password",
        "principal": "alice",
        "cloud": "aws",
        "account": "111122223333",
        "resources": ["db/password"],
        "source_ips": ips or ["198.51.100.7"],
        "first_seen": NOW,
        "last_seen": NOW,
        "event_count": 1,
        "dedup_key": "tests.every_read|alice|db/password",
    }


def enqueue_one(conn: sqlite3.Connection, item: dict[str, Any], minutes: int) -> dict[str, int]:
    plan = AlertPlan(alerts=[("team", [Alert.from_findings([item])])])
    counts = enqueue_alerts(conn, plan, timedelta(hours=4), NOW + timedelta(minutes=minutes))
    return counts["team"]


@pytest.fixture
def state_conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    path = tmp_path / "state.db"
    State(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    yield conn
    conn.close()


def test_repeat_within_interval_skipped(state_conn: sqlite3.Connection) -> None:
    first = enqueue_one(state_conn, finding("f1"), 0)
    repeat = enqueue_one(state_conn, finding("f2"), 60)

    assert first == {"queued": 1, "updates": 0, "repeats_skipped": 0}
    assert repeat == {"queued": 0, "updates": 0, "repeats_skipped": 1}


def test_repeat_held_back_logged_with_keys(
    state_conn: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue_one(state_conn, finding("f1"), 0)
    with caplog.at_level("INFO", logger="pipeline.alerting.delivery"):
        enqueue_one(state_conn, finding("f2"), 60)
    assert caplog.messages == [
        "receiver team: 1 alert held back by repeat_interval (4:00:00), because an earlier "
        "run sent the same dedup key with nothing new; dedup keys: "
        "tests.every_read|alice|db/password"
    ]


def test_same_run_same_key_merged_not_held(state_conn: sqlite3.Connection) -> None:
    # Two findings of one run with one dedup key become one queued alert, never one sent
    # and one held back as a repeat.
    rows = [finding("f1"), finding("f2", ips=["203.0.113.9"])]
    frame = pd.DataFrame(rows).reindex(columns=list(FINDING_COLUMNS))
    routing = RoutingSettings(default_receiver="team", group_by=["..."])
    plan = AlertPlan(alerts=route_alerts(frame, routing))
    counts = enqueue_alerts(state_conn, plan, timedelta(hours=4), NOW)

    assert counts == {"team": {"queued": 1, "updates": 0, "repeats_skipped": 0}}
    [payload] = [
        json.loads(row[0]) for row in state_conn.execute("SELECT payload_json FROM outbox")
    ]
    assert sorted(item["finding_id"] for item in payload["findings"]) == ["f1", "f2"]


def test_repeat_after_interval_sent(state_conn: sqlite3.Connection) -> None:
    enqueue_one(state_conn, finding("f1"), 0)
    later = enqueue_one(state_conn, finding("f2"), 5 * 60)

    assert later == {"queued": 1, "updates": 0, "repeats_skipped": 0}


def test_grown_alert_sent_as_update(state_conn: sqlite3.Connection) -> None:
    enqueue_one(state_conn, finding("f1"), 0)
    new_ip = enqueue_one(state_conn, finding("f2", ips=["203.0.113.9"]), 30)
    higher = enqueue_one(state_conn, finding("f3", severity="high", ips=["203.0.113.9"]), 60)

    assert new_ip == {"queued": 1, "updates": 1, "repeats_skipped": 0}
    assert higher == {"queued": 1, "updates": 1, "repeats_skipped": 0}
    titles = [
        json.loads(row[0])["title"]
        for row in state_conn.execute("SELECT payload_json FROM outbox ORDER BY id")
    ]
    assert titles == [
        "read of db/password",
        "Update: read of db/password",
        "Update: read of db/password",
    ]


def test_payload_rebuilds_same_alert() -> None:
    alert = Alert.from_findings([finding("f1")])
    rebuilt = alert_from_payload(alert_payload(alert))

    assert rebuilt.alert_id == alert.alert_id
    assert rebuilt.first_seen == NOW
    assert rebuilt.title == alert.title
