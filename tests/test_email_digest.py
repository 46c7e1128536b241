"""Email digests: one email per run for an email-only receiver, against aiosmtpd on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.alerting.alerts import Alert
from pipeline.alerting.delivery import AlertingSettings, build_senders
from pipeline.alerting.outbox import BatchSender, Outbox, OutboxSettings, deliver_due
from pipeline.alerting.render import Renderer, digest_subject

NOW = dt.datetime(2026, 10, 5, 9, 0, tzinfo=dt.UTC)
SENDER = "keytrail@example.com"
RECIPIENTS = ["secops@example.com"]


class _LocalController(Controller):
    """A Controller on a port the OS picks, read back before aiosmtpd connects to it."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.base_events.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Inbox:
    """Stores each accepted message, or replies to DATA with ``data_reply`` when it is set."""

    data_reply: str | None = None
    received: list[EmailMessage] = field(default_factory=list)
    data_commands: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.data_reply:
            return self.data_reply
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(parsed)
        return "250 OK queued"


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    controller = _LocalController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield handler, int(controller.port)
    controller.stop()


def make_alert(number: int, severity: str) -> Alert:
    finding: dict[str, Any] = {
        "finding_id": f"finding-{number}",
        "detector": "tests.every_read",
        "severity": severity,
        "title": f"bob read payments/key-{number} at night",
        "principal": "bob",
        "principal_type": "user",
        "cloud": "aws",
        "account": "111122223333",
        "resources": [f"payments/key-{number}"],
        "source_ips": ["192.0.2.10"],
        "countries": [],
        "first_seen": NOW - dt.timedelta(hours=1),
        "last_seen": NOW - dt.timedelta(hours=1),
        "event_count": 1,
        "dedup_key": f"digest-test-{number}",
        "mitre": [],
        "evidence": {"summary": f"read number {number} outside working hours"},
    }
    return Alert.from_findings([finding])


ALERTS = [make_alert(1, "high"), make_alert(2, "medium"), make_alert(3, "medium")]


def settings_for(receiver: dict[str, Any]) -> AlertingSettings:
    return AlertingSettings.model_validate(
        {
            "console": False,
            "receivers": {"team": receiver},
            "routing": {"default_receiver": "team", "group_by": ["..."]},
        }
    )


def email_only(port: int) -> dict[str, Any]:
    return {
        "email": {
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "sender": SENDER,
            "recipients": RECIPIENTS,
            "timeout_seconds": 2,
        }
    }


def queue(tmp_path: Path, alerts: list[Alert]) -> Outbox:
    outbox = Outbox(tmp_path / "state.db", settings=OutboxSettings(max_attempts=5))
    for alert in alerts:
        outbox.enqueue(alert, ["team"], now=NOW)
    return outbox


def text_and_html(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


# Rendering ------------------------------------------------------------------------------------


def test_digest_subject_counts_severities_most_severe_first() -> None:
    assert digest_subject(ALERTS) == "[keytrail] 3 alerts: 1 high, 2 medium"


def test_digest_subject_of_one_alert_is_singular() -> None:
    assert digest_subject(ALERTS[1:2]) == "[keytrail] 1 alert: 1 medium"


def test_render_digest_lists_every_alert_in_both_parts() -> None:
    message = Renderer().render_email_digest(ALERTS, sender=SENDER, recipients=RECIPIENTS, now=NOW)
    assert message["Subject"] == "[keytrail] 3 alerts: 1 high, 2 medium"
    assert message.get_all("X-Keytrail-Alert") == [
        "digest-test-1",
        "digest-test-2",
        "digest-test-3",
    ]
    assert str(message["Message-ID"]).startswith("<digest.")
    assert str(message["Message-ID"]).endswith("@example.com>")
    text, html = text_and_html(message)
    for alert in ALERTS:
        assert text.count(alert.title) == 1
        assert f"{alert.severity.upper()}: {alert.title}\n" in text
        assert alert.title in html
    assert "==== Alert 3 of 3 ====" in text
    assert html.count("<!DOCTYPE html>") == 1
    assert html.count("What to do next") == 3


def test_render_digest_escapes_html_and_flattens_subject() -> None:
    hostile = dataclasses.replace(
        make_alert(4, "low"), title="<script>x</script>\r\nBcc: evil@example.org"
    )
    message = Renderer().render_email_digest(
        [hostile, ALERTS[0]], sender=SENDER, recipients=RECIPIENTS, now=NOW
    )
    _, html = text_and_html(message)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "\n" not in str(message["Subject"])
    assert message["Bcc"] is None


def test_render_digest_without_alerts_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one alert"):
        Renderer().render_email_digest([], sender=SENDER, recipients=RECIPIENTS, now=NOW)


# Delivery through the outbox ------------------------------------------------------------------


def test_email_only_receiver_gets_one_digest(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    assert isinstance(senders["team"], BatchSender)
    with queue(tmp_path, ALERTS) as outbox:
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()
    assert len(handler.received) == 1
    message = handler.received[0]
    assert message.get_all("X-Keytrail-Alert") == [
        "digest-test-1",
        "digest-test-2",
        "digest-test-3",
    ]
    assert message["Subject"] == "[keytrail] 3 alerts: 1 high, 2 medium"
    text, html = text_and_html(message)
    for alert in ALERTS:
        assert alert.title in text
        assert alert.title in html
    assert report.receivers["team"].sent == 3
    assert [row.status for row in rows] == ["delivered"] * 3
    assert {row.remote_id for row in rows} == {str(message["Message-ID"])}


def test_single_alert_sent_plainly(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS[:1]) as outbox:
        deliver_due(outbox, senders, NOW)
    assert len(handler.received) == 1
    assert handler.received[0]["Subject"] == f"[keytrail] HIGH: {ALERTS[0].title}"
    assert handler.received[0].get_all("X-Keytrail-Alert") == ["digest-test-1"]


def test_temporary_smtp_error_retries_all_rows_together(
    tmp_path: Path, inbox: tuple[Inbox, int]
) -> None:
    handler, port = inbox
    handler.data_reply = "451 4.3.0 try again later"
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS) as outbox:
        first = deliver_due(outbox, senders, NOW)
        waiting = outbox.list_rows()
        assert handler.data_commands == 1
        assert first.receivers["team"].retry == 3
        assert [row.status for row in waiting] == ["pending"] * 3
        assert [row.attempts for row in waiting] == [1, 1, 1]
        assert len({row.next_attempt_at for row in waiting}) == 1
        assert "451" in (waiting[0].last_error or "")

        handler.data_reply = None
        later = waiting[0].next_attempt_at + dt.timedelta(seconds=1)
        second = deliver_due(outbox, senders, later)
        done = outbox.list_rows()
    assert len(handler.received) == 1
    assert len(handler.received[0].get_all("X-Keytrail-Alert") or []) == 3
    assert second.receivers["team"].sent == 3
    assert [row.status for row in done] == ["delivered"] * 3


def test_permanent_smtp_error_makes_all_rows_dead(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    handler.data_reply = "550 5.7.1 rejected"
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS) as outbox:
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()
    assert handler.data_commands == 1
    assert handler.received == []
    assert report.receivers["team"].dead == 3
    assert [letter.alert_id for letter in report.dead] == [row.alert_id for row in rows]
    assert [row.status for row in rows] == ["dead"] * 3
    assert all("550" in (row.last_error or "") for row in rows)


def test_mixed_receiver_sends_per_alert(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    receiver = {**email_only(port), "file": {}}
    senders = build_senders(settings_for(receiver), tmp_path, NOW)
    assert not isinstance(senders["team"], BatchSender)
    with queue(tmp_path, ALERTS) as outbox:
        report = deliver_due(outbox, senders, NOW)
    assert len(handler.received) == 3
    assert [m.get_all("X-Keytrail-Alert") for m in handler.received] == [
        ["digest-test-1"],
        ["digest-test-2"],
        ["digest-test-3"],
    ]
    assert report.receivers["team"].sent == 3
