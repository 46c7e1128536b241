"""Updates of an alert as Slack thread replies, against a local chat.postMessage server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.alerts import Alert
from pipeline.alerting.delivery import (
    AlertingSettings,
    AlertPlan,
    build_senders,
    enqueue_alerts,
)
from pipeline.alerting.outbox import DeliveryReport, Outbox, deliver_due
from pipeline.store.state import State, alert_thread, record_alert_thread
from tests.peers import HttpPeer, Reply, Request

TOKEN_ENV = "KEYTRAIL_TEST_SLACK_BOT_TOKEN"
WEBHOOK_ENV = "KEYTRAIL_TEST_SLACK_THREAD_WEBHOOK_URL"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DEDUP_KEY = "tests.every_read|alice|db/password"


def slack_reply(request: Request, number: int) -> Reply:
    """Return Slack's reply: ts ``1700000000.<request number>`` for chat.postMessage, else ``ok``."""
    if request.path == "/api/chat.postMessage":
        ts = f"1700000000.{number:06d}"
        return Reply(
            200, json.dumps({"ok": True, "channel": request.body.get("channel"), "ts": ts})
        )
    return Reply(200, "ok")


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    with HttpPeer(slack_reply) as server:
        yield server


@pytest.fixture
def peer_url(peer: HttpPeer, monkeypatch: pytest.MonkeyPatch) -> str:
    url = peer.url("").rstrip("/")
    monkeypatch.setenv(TOKEN_ENV, "xoxb-test-token")
    monkeypatch.setenv(WEBHOOK_ENV, f"{url}/hook")
    return url


def requests_of(peer: HttpPeer) -> list[tuple[str, dict[str, Any]]]:
    return [(request.path, request.body) for request in peer.requests]


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "state.db"
    State(path).close()
    return path


def bot_settings(peer_url: str) -> AlertingSettings:
    slack = {
        "mode": "bot",
        "channel": "C0TESTCHAN",
        "token_env": TOKEN_ENV,
        "base_url": f"{peer_url}/api/",
        "max_retries": 0,
    }
    return AlertingSettings.model_validate(
        {
            "console": False,
            "receivers": {"team": {"slack": slack}},
            "routing": {"default_receiver": "team", "group_by": ["..."]},
        }
    )


def webhook_settings() -> AlertingSettings:
    slack = {"webhook_url_env": WEBHOOK_ENV, "max_retries": 0}
    return AlertingSettings.model_validate(
        {
            "console": False,
            "receivers": {"team": {"slack": slack}},
            "routing": {"default_receiver": "team", "group_by": ["..."]},
        }
    )


def finding(finding_id: str, ips: list[str]) -> dict[str, Any]:
    return {
        "finding_id": finding_id,
        "detector": "tests.every_read",
        "severity": "medium",
        "title": "read of db/password",
        "principal": "alice",
        "principal_type": "user",
        "cloud": "aws",
        "account": "111122223333",
        "resources": ["db/password"],
        "source_ips": ips,
        "first_seen": START,
        "last_seen": START,
        "event_count": 1,
        "dedup_key": DEDUP_KEY,
    }


def run(
    state_path: Path,
    settings: AlertingSettings,
    item: dict[str, Any],
    now: datetime,
    output_dir: Path,
) -> DeliveryReport:
    """Queue one alert in a transaction and deliver the due rows, as a committed engine run does."""
    plan = AlertPlan(
        alerts=[("team", [Alert.from_findings([item])])],
        channels={"team": settings.receiver("team").channels()},
    )
    conn = sqlite3.connect(state_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        enqueue_alerts(conn, plan, settings.repeat_interval, now)
        conn.execute("COMMIT")
    finally:
        conn.close()
    with Outbox(state_path, settings=settings.delivery) as outbox:
        senders = build_senders(settings, output_dir, now, ledger=outbox.connection)
        return deliver_due(outbox, senders, now)


def remote_ids(state_path: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(state_path) as conn:
        rows = conn.execute("SELECT status, remote_id FROM outbox ORDER BY id").fetchall()
    return [(str(status), remote_id) for status, remote_id in rows]


def test_bot_update_replies_in_thread(
    peer: HttpPeer, peer_url: str, state_path: Path, tmp_path: Path
) -> None:
    settings = bot_settings(peer_url)

    first = run(state_path, settings, finding("f1", ["198.51.100.7"]), START, tmp_path)
    grown = finding("f2", ["198.51.100.7", "203.0.113.9"])
    update = run(state_path, settings, grown, START + timedelta(minutes=30), tmp_path)

    assert first.receivers["team"].sent == 1
    assert update.receivers["team"].sent == 1
    assert len(requests_of(peer)) == 2
    (first_path, first_body), (reply_path, reply_body) = requests_of(peer)
    assert first_path == reply_path == "/api/chat.postMessage"
    assert first_body["channel"] == reply_body["channel"] == "C0TESTCHAN"
    assert "thread_ts" not in first_body
    assert reply_body["thread_ts"] == "1700000000.000001"
    assert "Update: read of db/password" in reply_body["text"]
    assert "Update:" not in first_body["text"]
    assert remote_ids(state_path) == [
        ("delivered", "1700000000.000001"),
        ("delivered", "1700000000.000002"),
    ]


def test_bot_thread_keeps_first_message(
    peer: HttpPeer, peer_url: str, state_path: Path, tmp_path: Path
) -> None:
    settings = bot_settings(peer_url)

    run(state_path, settings, finding("f1", ["198.51.100.7"]), START, tmp_path)
    second = finding("f2", ["198.51.100.7", "203.0.113.9"])
    run(state_path, settings, second, START + timedelta(minutes=30), tmp_path)
    third = finding("f3", ["198.51.100.7", "203.0.113.9", "192.0.2.44"])
    run(state_path, settings, third, START + timedelta(minutes=60), tmp_path)

    threads = [body.get("thread_ts") for _, body in requests_of(peer)]
    assert threads == [None, "1700000000.000001", "1700000000.000001"]


def test_bot_resend_starts_new_thread(
    peer: HttpPeer, peer_url: str, state_path: Path, tmp_path: Path
) -> None:
    settings = bot_settings(peer_url)
    later = START + settings.repeat_interval + timedelta(minutes=1)

    run(state_path, settings, finding("f1", ["198.51.100.7"]), START, tmp_path)
    run(state_path, settings, finding("f2", ["198.51.100.7"]), later, tmp_path)
    grown = finding("f3", ["198.51.100.7", "203.0.113.9"])
    run(state_path, settings, grown, later + timedelta(minutes=10), tmp_path)

    threads = [body.get("thread_ts") for _, body in requests_of(peer)]
    assert threads == [None, None, "1700000000.000002"]


def test_bot_unchanged_repeat_sends_nothing(
    peer: HttpPeer, peer_url: str, state_path: Path, tmp_path: Path
) -> None:
    settings = bot_settings(peer_url)

    run(state_path, settings, finding("f1", ["198.51.100.7"]), START, tmp_path)
    repeat = run(
        state_path,
        settings,
        finding("f2", ["198.51.100.7"]),
        START + timedelta(minutes=30),
        tmp_path,
    )

    assert len(requests_of(peer)) == 1
    assert repeat.receivers == {}


def test_webhook_update_is_new_message(
    peer: HttpPeer, peer_url: str, state_path: Path, tmp_path: Path
) -> None:
    settings = webhook_settings()

    run(state_path, settings, finding("f1", ["198.51.100.7"]), START, tmp_path)
    grown = finding("f2", ["198.51.100.7", "203.0.113.9"])
    run(state_path, settings, grown, START + timedelta(minutes=30), tmp_path)

    assert [path for path, _ in requests_of(peer)] == ["/hook", "/hook"]
    bodies = [body for _, body in requests_of(peer)]
    assert "thread_ts" not in bodies[0]
    assert "thread_ts" not in bodies[1]
    assert "Update: read of db/password" in bodies[1]["text"]
    assert remote_ids(state_path) == [("delivered", None), ("delivered", None)]
    with sqlite3.connect(state_path) as conn:
        assert alert_thread(conn, "team", DEDUP_KEY) is None


def test_alert_thread_missing_is_none(state_path: Path) -> None:
    with sqlite3.connect(state_path) as conn:
        assert alert_thread(conn, "team", DEDUP_KEY) is None


def test_record_alert_thread_replaces(state_path: Path) -> None:
    with sqlite3.connect(state_path, isolation_level=None) as conn:
        record_alert_thread(conn, "team", DEDUP_KEY, "1.000001", alert_id="a1", now=START)
        record_alert_thread(conn, "team", DEDUP_KEY, "2.000002", alert_id="a2", now=START)
        record_alert_thread(conn, "other", DEDUP_KEY, "3.000003", alert_id="a1", now=START)

        assert alert_thread(conn, "team", DEDUP_KEY) == "2.000002"
        assert alert_thread(conn, "other", DEDUP_KEY) == "3.000003"
        assert alert_thread(conn, "team", "another|key") is None
