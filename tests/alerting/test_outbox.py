"""Tests of the delivery outbox on a real SQLite file, with small senders as receivers."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pydantic
import pytest

from pipeline.alerting import outbox as outbox_module
from pipeline.alerting.alerts import Alert, alerts_from_findings
from pipeline.alerting.channels.base import Delivery
from pipeline.alerting.outbox import (
    WHOLE_RECEIVER,
    DeadLetter,
    Outbox,
    OutboxRow,
    OutboxSettings,
    deliver_due,
    enqueue,
)
from pipeline.errors import StateError
from pipeline.store.state import SCHEMA_VERSION, State
from tests.alerting.conftest import off_hours_row, travel_row

NOW = datetime(2026, 10, 10, 3, 0, tzinfo=UTC)
SEED = 20261010


@pytest.fixture
def alerts(make_findings: Callable[..., pd.DataFrame]) -> list[Alert]:
    travel = alerts_from_findings(make_findings(travel_row(), detector="travel"))
    night = alerts_from_findings(make_findings(off_hours_row(), detector="off_hours"))
    return [*travel, *night]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "state.db", rng=random.Random(SEED)) as outbox:
        yield outbox


class Receiver:
    """A sender that returns the queued results in order and records every row it was sent."""

    def __init__(self, *results: Delivery) -> None:
        self.results = list(results)
        self.sent: list[str] = []

    def __call__(self, row: OutboxRow) -> Delivery:
        self.sent.append(row.alert_id)
        if len(self.results) > 1:
            return self.results.pop(0)
        return self.results[0]


def delivered(remote_id: str = "1700000000.000100") -> Delivery:
    return Delivery("delivered", "sent", remote_id=remote_id)


def expected_backoff(attempts: int, base: float = 30, cap: float = 3600) -> list[float]:
    """Draw the waits a fresh Random(SEED) gives for attempts 1..attempts."""
    rng = random.Random(SEED)
    return [rng.uniform(0, min(cap, base * 2 ** (n - 1))) for n in range(1, attempts + 1)]


# Enqueue


def test_enqueue_adds_one_pending_row_per_receiver(box: Outbox, alerts: list[Alert]) -> None:
    added = box.enqueue(alerts[0], ["slack", "email"], now=NOW)

    rows = box.list_rows()
    assert added == 2
    assert [row.receiver for row in rows] == ["slack", "email"]
    assert {row.status for row in rows} == {"pending"}
    assert {row.attempts for row in rows} == {0}
    assert {row.next_attempt_at for row in rows} == {NOW}
    assert {row.created_at for row in rows} == {NOW}
    assert rows[0].alert_id == alerts[0].alert_id
    assert rows[0].dedup_key == alerts[0].dedup_key
    assert rows[0].payload["title"] == alerts[0].title
    assert rows[0].payload["first_seen"] == "2026-10-10T01:12:00Z"


def test_enqueue_again_is_idempotent(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    box.record(box.list_rows()[0].id, delivered(), NOW)

    added = box.enqueue(alerts[0], ["slack", "slack"], now=NOW + timedelta(hours=1))

    assert added == 0
    assert box.counts() == {"pending": 0, "delivered": 1, "dead": 0}


def test_enqueue_rolled_back_with_caller(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE alerts (alert_id TEXT PRIMARY KEY)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO alerts VALUES (?)", (alerts[0].alert_id,))
    added = enqueue(conn, alerts[0], ["slack", "email"], now=NOW)
    conn.execute("ROLLBACK")

    assert added == 2
    with Outbox(conn) as outbox:
        assert outbox.list_rows() == []
        assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
    conn.close()


def test_enqueue_committed_with_caller(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    enqueue(conn, alerts[0], ["slack"], now=NOW)
    conn.execute("COMMIT")
    conn.close()

    with Outbox(path) as outbox:
        assert [row.receiver for row in outbox.list_rows("pending")] == ["slack"]


def test_shared_connection_needs_autocommit(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    with pytest.raises(ValueError, match="autocommit mode"):
        Outbox(conn)
    conn.close()


def test_outbox_opens_file_in_wal_mode(box: Outbox) -> None:
    assert box.connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_outbox_shares_state_database(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    with State(path) as state:
        assert state.ledger_count() == 0

    with Outbox(path) as outbox:
        outbox.enqueue(alerts[0], ["slack"], now=NOW)

    with State(path) as state:
        assert state.ledger_count() == 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    conn.close()


# Record


def test_record_delivered_keeps_remote_id(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    row_id = box.list_rows()[0].id

    row = box.record(row_id, delivered("1700000000.000100"), NOW + timedelta(seconds=2))

    assert row.status == "delivered"
    assert row.remote_id == "1700000000.000100"
    assert row.attempts == 1
    assert row.delivered_at == NOW + timedelta(seconds=2)
    assert box.due(NOW + timedelta(days=1)) == []


def test_record_retry_uses_seeded_backoff(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    row_id = box.list_rows()[0].id
    waits = expected_backoff(3)

    first = box.record(row_id, Delivery("retry", "HTTP 503"), NOW)
    second = box.record(row_id, Delivery("retry", "HTTP 503"), NOW)
    third = box.record(row_id, Delivery("retry", "timed out"), NOW)

    assert first.attempts == 1
    assert first.status == "pending"
    assert first.next_attempt_at == NOW + timedelta(seconds=waits[0])
    assert second.next_attempt_at == NOW + timedelta(seconds=waits[1])
    assert third.next_attempt_at == NOW + timedelta(seconds=waits[2])
    assert third.last_error == "timed out"
    assert 0 <= waits[0] <= 30
    assert 0 <= waits[2] <= 120


def test_record_retry_honours_longer_retry_after(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    row_id = box.list_rows()[0].id

    row = box.record(row_id, Delivery("retry", "HTTP 429", retry_after=90.0), NOW)

    assert expected_backoff(1)[0] < 90
    assert row.next_attempt_at == NOW + timedelta(seconds=90)
    assert row.last_error == "HTTP 429"


def test_record_retry_notes_ambiguous_failure(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["webhook"], now=NOW)
    row_id = box.list_rows()[0].id

    row = box.record(row_id, Delivery("retry", "read timed out", ambiguous=True), NOW)

    assert row.last_error == "read timed out (ambiguous: the receiver may already have the message)"


def test_retry_delay_is_capped(tmp_path: Path) -> None:
    settings = OutboxSettings(backoff_base_seconds=30, backoff_cap_seconds=100)
    rng = random.Random(SEED)
    with Outbox(tmp_path / "state.db", settings=settings, rng=random.Random(SEED)) as outbox:
        delay = outbox.retry_delay(10)

    assert delay == rng.uniform(0, 100)


def test_record_dead_after_max_attempts(tmp_path: Path, alerts: list[Alert]) -> None:
    settings = OutboxSettings(max_attempts=3)
    with Outbox(tmp_path / "state.db", settings=settings, rng=random.Random(SEED)) as outbox:
        outbox.enqueue(alerts[0], ["slack"], now=NOW)
        row_id = outbox.list_rows()[0].id
        statuses = [
            outbox.record(row_id, Delivery("retry", f"HTTP 50{n}"), NOW).status for n in range(3)
        ]
        row = outbox.list_rows()[0]

    assert statuses == ["pending", "pending", "dead"]
    assert row.attempts == 3
    assert row.last_error == "gave up after 3 attempts: HTTP 502"


def test_record_failed_is_dead_at_once(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["webhook"], now=NOW)
    row_id = box.list_rows()[0].id

    row = box.record(row_id, Delivery("failed", "HTTP 410 Gone: webhook removed"), NOW)

    assert row.status == "dead"
    assert row.attempts == 1
    assert row.last_error == "HTTP 410 Gone: webhook removed"
    assert box.due(NOW + timedelta(days=30)) == []


def test_record_rejects_row_not_pending(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    row_id = box.list_rows()[0].id
    box.record(row_id, delivered(), NOW)

    with pytest.raises(StateError, match=f"outbox row {row_id} is delivered, not pending"):
        box.record(row_id, Delivery("retry", "late"), NOW)
    assert box.list_rows()[0].attempts == 1


def test_record_rejects_unknown_row(box: Outbox) -> None:
    with pytest.raises(StateError, match="outbox row 99 not found"):
        box.record(99, delivered(), NOW)


# Due and deliver_due


def test_due_returns_only_rows_whose_time_came(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    box.enqueue(alerts[1], ["slack"], now=NOW + timedelta(minutes=5))

    assert [row.alert_id for row in box.due(NOW)] == [alerts[0].alert_id]
    assert len(box.due(NOW + timedelta(minutes=5))) == 2


def test_deliver_due_sends_only_due_rows(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    box.enqueue(alerts[1], ["slack"], now=NOW + timedelta(minutes=5))
    slack = Receiver(delivered())

    report = deliver_due(box, {"slack": slack}, NOW)

    assert slack.sent == [alerts[0].alert_id]
    assert report.receivers["slack"].sent == 1
    assert report.receivers["slack"].pending == 1
    assert box.counts() == {"pending": 1, "delivered": 1, "dead": 0}


def test_deliver_due_retries_only_failed_receiver(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack", "email"], now=NOW)
    slack = Receiver(delivered())
    email = Receiver(Delivery("retry", "SMTP 451 try again later"), delivered("<a@example.com>"))
    senders = {"slack": slack, "email": email}

    first = deliver_due(box, senders, NOW)
    second = deliver_due(box, senders, NOW + timedelta(hours=2))

    assert slack.sent == [alerts[0].alert_id]
    assert email.sent == [alerts[0].alert_id, alerts[0].alert_id]
    assert first.receivers["slack"].sent == 1
    assert first.receivers["email"].retry == 1
    assert first.receivers["email"].pending == 1
    assert second.receivers["email"].sent == 1
    assert "slack" not in second.receivers
    assert box.counts() == {"pending": 0, "delivered": 2, "dead": 0}
    email_row = box.list_rows()[1]
    assert email_row.remote_id == "<a@example.com>"
    assert email_row.attempts == 2


def test_deliver_due_defers_rest_after_retry(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)
    box.enqueue(alerts[1], ["slack"], now=NOW)
    slack = Receiver(Delivery("retry", "HTTP 429", retry_after=30.0))

    report = deliver_due(box, {"slack": slack}, NOW)

    assert slack.sent == [alerts[0].alert_id]
    assert report.receivers["slack"].retry == 1
    assert report.receivers["slack"].deferred == 1
    assert report.receivers["slack"].pending == 2
    assert box.list_rows()[1].attempts == 0


def test_deliver_due_reports_dead_rows(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["webhook"], now=NOW)
    webhook = Receiver(Delivery("failed", "HTTP 404 Not Found"))

    report = deliver_due(box, {"webhook": webhook}, NOW)

    row_id = box.list_rows()[0].id
    assert report.dead == [
        DeadLetter(row_id, alerts[0].alert_id, "webhook", WHOLE_RECEIVER, "HTTP 404 Not Found")
    ]
    assert report.receivers["webhook"].dead == 1
    assert report.summary() == {
        "receivers": {"webhook": {"sent": 0, "retry": 0, "dead": 1, "pending": 0, "deferred": 0}},
        "dead": [
            {
                "row_id": row_id,
                "alert_id": alerts[0].alert_id,
                "receiver": "webhook",
                "channel": WHOLE_RECEIVER,
                "detail": "HTTP 404 Not Found",
            }
        ],
        "unknown_receivers": [],
    }


def test_deliver_due_records_raising_sender(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["slack"], now=NOW)

    def broken(row: OutboxRow) -> Delivery:
        raise RuntimeError("template slack.json.j2 missing")

    report = deliver_due(box, {"slack": broken}, NOW)

    row = box.list_rows()[0]
    assert report.receivers["slack"].retry == 1
    assert row.status == "pending"
    assert row.attempts == 1
    assert row.last_error == "sender raised RuntimeError: template slack.json.j2 missing"


def test_deliver_due_keeps_unknown_receiver_pending(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["pagerduty"], now=NOW)

    report = deliver_due(box, {}, NOW)

    assert report.unknown_receivers == ["pagerduty"]
    assert report.receivers["pagerduty"].deferred == 1
    assert report.receivers["pagerduty"].pending == 1
    assert box.list_rows()[0].attempts == 0


def test_crash_before_record_sends_again(tmp_path: Path, alerts: list[Alert]) -> None:
    """A process killed between send and record leaves the row pending: one duplicate."""
    path = tmp_path / "state.db"
    sent: list[str] = []

    def send_then_die(row: OutboxRow) -> Delivery:
        sent.append(row.alert_id)
        raise SystemExit(137)

    with Outbox(path) as first_run:
        first_run.enqueue(alerts[0], ["slack"], now=NOW)
        with pytest.raises(SystemExit):
            deliver_due(first_run, {"slack": send_then_die}, NOW)

    slack = Receiver(delivered())
    with Outbox(path) as next_run:
        assert next_run.list_rows()[0].status == "pending"
        assert next_run.list_rows()[0].attempts == 0
        deliver_due(next_run, {"slack": slack}, NOW + timedelta(minutes=10))
        assert next_run.counts() == {"pending": 0, "delivered": 1, "dead": 0}

    assert sent + slack.sent == [alerts[0].alert_id, alerts[0].alert_id]


# Dead rows, listing and counts


def test_retry_dead_requeues_selected_rows(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["webhook"], now=NOW)
    box.enqueue(alerts[1], ["webhook"], now=NOW)
    webhook = Receiver(Delivery("failed", "HTTP 401 Unauthorized"))
    deliver_due(box, {"webhook": webhook}, NOW)
    first, second = box.list_rows("dead")
    later = NOW + timedelta(hours=1)

    changed = box.retry_dead([first.id, 12345], now=later)

    assert changed == 1
    requeued = box.list_rows("pending")
    assert [row.id for row in requeued] == [first.id]
    assert requeued[0].attempts == 0
    assert requeued[0].next_attempt_at == later
    assert requeued[0].last_error == "HTTP 401 Unauthorized"
    assert [row.id for row in box.list_rows("dead")] == [second.id]


def test_retry_dead_requeues_all(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["webhook", "email"], now=NOW)
    box.enqueue(alerts[1], ["slack"], now=NOW)
    for row in box.list_rows():
        if row.receiver != "slack":
            box.record(row.id, Delivery("failed", "rejected"), NOW)

    changed = box.retry_dead(now=NOW)

    assert changed == 2
    assert box.counts() == {"pending": 3, "delivered": 0, "dead": 0}
    assert len(box.due(NOW)) == 3


def test_counts_lists_every_status(box: Outbox) -> None:
    assert box.counts() == {"pending": 0, "delivered": 0, "dead": 0}


def test_list_rows_rejects_invalid_status(box: Outbox) -> None:
    with pytest.raises(ValueError, match="invalid outbox status 'sending'"):
        box.list_rows("sending")  # type: ignore[arg-type]


# Settings


def test_settings_defaults() -> None:
    settings = OutboxSettings()

    assert settings.max_attempts == 8
    assert settings.backoff_base_seconds == 30
    assert settings.backoff_cap_seconds == 3600


def test_settings_reject_unknown_key() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_retries"):
        OutboxSettings.model_validate({"max_retries": 3})


def test_settings_reject_cap_below_base() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"backoff_cap_seconds \(10\) is less"):
        OutboxSettings(backoff_base_seconds=30, backoff_cap_seconds=10)


def test_public_api() -> None:
    assert set(outbox_module.__all__) == {
        "OUTBOX_SCHEMA_VERSION",
        "OUTBOX_STATUSES",
        "WHOLE_RECEIVER",
        "BatchSender",
        "DeadLetter",
        "DeliveryReport",
        "Outbox",
        "OutboxRow",
        "OutboxSettings",
        "OutboxStatus",
        "ReceiverCounts",
        "Sender",
        "alert_payload",
        "create_tables",
        "deliver_due",
        "enqueue",
        "retry_time_text",
    }


# One row per channel


class ChannelReceiver:
    """A sender that returns queued results per channel and records (channel, alert id) pairs."""

    def __init__(self, results: dict[str, list[Delivery]]) -> None:
        self.results = results
        self.sent: list[tuple[str, str]] = []

    def __call__(self, row: OutboxRow) -> Delivery:
        self.sent.append((row.channel, row.alert_id))
        queued = self.results[row.channel]
        return queued.pop(0) if len(queued) > 1 else queued[0]


def test_enqueue_adds_one_row_per_channel(box: Outbox, alerts: list[Alert]) -> None:
    added = box.enqueue(alerts[0], ["team", "siem"], now=NOW, channels={"team": ["slack", "email"]})

    rows = box.list_rows()
    assert added == 3
    assert [(row.receiver, row.channel) for row in rows] == [
        ("team", "slack"),
        ("team", "email"),
        ("siem", WHOLE_RECEIVER),
    ]
    again = box.enqueue(alerts[0], ["team"], now=NOW, channels={"team": ["email", "slack"]})
    assert again == 0


def test_deliver_due_retries_only_failed_channel(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["team"], now=NOW, channels={"team": ["slack", "email"]})
    box.enqueue(alerts[1], ["team"], now=NOW, channels={"team": ["slack", "email"]})
    team = ChannelReceiver(
        {"slack": [delivered()], "email": [Delivery("retry", "SMTP 451"), delivered()]}
    )

    first = deliver_due(box, {"team": team}, NOW)
    second = deliver_due(box, {"team": team}, NOW + timedelta(hours=2))

    # The email retry defers the second email row but not the second Slack row. The next
    # pass sends due rows oldest due time first, so the deferred row goes before the retry.
    assert team.sent == [
        ("slack", alerts[0].alert_id),
        ("email", alerts[0].alert_id),
        ("slack", alerts[1].alert_id),
        ("email", alerts[1].alert_id),
        ("email", alerts[0].alert_id),
    ]
    assert first.receivers["team"].sent == 2
    assert first.receivers["team"].retry == 1
    assert first.receivers["team"].deferred == 1
    assert second.receivers["team"].sent == 2
    assert box.counts() == {"pending": 0, "delivered": 4, "dead": 0}


def test_list_and_retry_dead_by_channel(box: Outbox, alerts: list[Alert]) -> None:
    box.enqueue(alerts[0], ["team"], now=NOW, channels={"team": ["slack", "email"]})
    team = ChannelReceiver(
        {"slack": [Delivery("failed", "404")], "email": [Delivery("failed", "550")]}
    )
    deliver_due(box, {"team": team}, NOW)

    assert [row.channel for row in box.list_rows("dead", channel="email")] == ["email"]
    assert box.retry_dead(now=NOW, channel="email") == 1
    assert box.retry_dead(now=NOW, receiver="other") == 0
    assert [(row.channel, row.status) for row in box.list_rows()] == [
        ("slack", "dead"),
        ("email", "pending"),
    ]
    slack_id = box.list_rows(channel="slack")[0].id
    assert box.retry_dead([slack_id], now=NOW, channel="email") == 0
    assert box.retry_dead([slack_id], now=NOW, channel="slack") == 1


# Migration of a version 1 outbox table (state schema 3: one row per alert and receiver)

V1_TABLE = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    receiver TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    remote_id TEXT,
    created_at TEXT NOT NULL,
    delivered_at TEXT,
    UNIQUE (alert_id, receiver)
)
"""
V1_INDEX = "CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending'"
STAMP = "2026-10-10T03:00:00.000000Z"


def v1_state(path: Path, alerts: list[Alert]) -> None:
    """Write a state database as keytrail with state schema 3 left it, with two outbox rows."""
    State(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(V1_TABLE)
    conn.execute(V1_INDEX)
    payload = json.dumps(outbox_module.alert_payload(alerts[0]))
    conn.execute(
        "INSERT INTO outbox (id, alert_id, receiver, dedup_key, payload_json, status, attempts, "
        "next_attempt_at, last_error, created_at) VALUES (7, ?, 'team', ?, ?, 'pending', 2, ?, "
        "'HTTP 500', ?)",
        (alerts[0].alert_id, alerts[0].dedup_key, payload, STAMP, STAMP),
    )
    conn.execute(
        "INSERT INTO outbox (id, alert_id, receiver, dedup_key, payload_json, status, attempts, "
        "next_attempt_at, remote_id, created_at, delivered_at) VALUES (8, ?, 'team', ?, ?, "
        "'delivered', 1, ?, '1700000000.000100', ?, ?)",
        (alerts[1].alert_id, alerts[1].dedup_key, payload, STAMP, STAMP, STAMP),
    )
    conn.close()


def test_v1_outbox_migrated_on_open(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    v1_state(path, alerts)

    with Outbox(path) as outbox:
        rows = outbox.list_rows()
        added = outbox.enqueue(alerts[0], ["team"], now=NOW, channels={"team": ["slack"]})
        after = outbox.list_rows()

    assert [(row.id, row.channel, row.status, row.attempts) for row in rows] == [
        (7, WHOLE_RECEIVER, "pending", 2),
        (8, WHOLE_RECEIVER, "delivered", 1),
    ]
    assert rows[0].last_error == "HTTP 500"
    assert rows[1].remote_id == "1700000000.000100"
    assert added == 1
    assert [(row.id, row.channel) for row in after][-1] == (9, "slack")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM outbox_schema").fetchall() == [
        (outbox_module.OUTBOX_SCHEMA_VERSION,)
    ]
    assert conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'outbox_due'"
    ).fetchone() == (1,)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


def test_v1_outbox_row_still_delivers(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    v1_state(path, alerts)
    team = Receiver(delivered())

    with Outbox(path) as outbox:
        report = deliver_due(outbox, {"team": team}, NOW)

    assert team.sent == [alerts[0].alert_id]
    assert report.receivers["team"].sent == 1


def test_v1_migration_rolls_back_with_caller(tmp_path: Path, alerts: list[Alert]) -> None:
    path = tmp_path / "state.db"
    v1_state(path, alerts)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    enqueue(conn, alerts[1], ["team"], now=NOW, channels={"team": ["email"]})
    conn.execute("ROLLBACK")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(outbox)")]
    conn.close()

    # The rollback undid the migration with the enqueue: the table is as it was.
    assert "channel" not in columns
    with Outbox(path) as outbox:
        assert [row.id for row in outbox.list_rows()] == [7, 8]


def test_newer_outbox_schema_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Outbox(path):
        pass
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE outbox_schema SET version = 99")
    conn.close()

    with pytest.raises(StateError, match="schema version 99, newer than the version 2"):
        Outbox(path)
