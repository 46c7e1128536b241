"""Email digests: one email per receiver per run, against aiosmtpd on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.alerts import Alert
from pipeline.alerting.delivery import AlertingSettings, build_senders
from pipeline.alerting.outbox import (
    BatchSender,
    Outbox,
    OutboxSettings,
    deliver_due,
    retry_time_text,
)
from pipeline.alerting.render import (
    DIGEST_MAX_FULL_ALERTS,
    DIGEST_MAX_HTML_CHARS,
    Renderer,
    digest_subject,
)
from tests.peers import HttpPeer, SmtpPeer, smtp_server

NOW = dt.datetime(2026, 10, 5, 9, 0, tzinfo=dt.UTC)
SENDER = "keytrail@example.com"
RECIPIENTS = ["secops@example.com"]
HOOK_ENV = "KEYTRAIL_TEST_DIGEST_HOOK_URL"


@pytest.fixture
def inbox() -> Iterator[tuple[SmtpPeer, int]]:
    with smtp_server() as (handler, port):
        yield handler, port


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


def queue(tmp_path: Path, alerts: list[Alert], channels: list[str] | None = None) -> Outbox:
    outbox = Outbox(tmp_path / "state.db", settings=OutboxSettings(max_attempts=5))
    for alert in alerts:
        outbox.enqueue(alert, ["team"], now=NOW, channels={"team": channels or ["email"]})
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


def test_email_only_receiver_gets_one_digest(tmp_path: Path, inbox: tuple[SmtpPeer, int]) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    assert isinstance(senders["team"], BatchSender)
    with queue(tmp_path, ALERTS) as outbox:
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()
    assert len(handler.messages) == 1
    message = handler.messages[0]
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


def test_single_alert_sent_plainly(tmp_path: Path, inbox: tuple[SmtpPeer, int]) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS[:1]) as outbox:
        deliver_due(outbox, senders, NOW)
    assert len(handler.messages) == 1
    assert handler.messages[0]["Subject"] == f"[keytrail] HIGH: {ALERTS[0].title}"
    assert handler.messages[0].get_all("X-Keytrail-Alert") == ["digest-test-1"]


def test_temporary_smtp_error_retries_all_rows_together(
    tmp_path: Path, inbox: tuple[SmtpPeer, int]
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
    assert len(handler.messages) == 1
    assert len(handler.messages[0].get_all("X-Keytrail-Alert") or []) == 3
    assert second.receivers["team"].sent == 3
    assert [row.status for row in done] == ["delivered"] * 3


def closed_port() -> int:
    """Return a 127.0.0.1 port that nothing listens on, so a connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_refused_digest_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    senders = build_senders(settings_for(email_only(closed_port())), tmp_path, NOW)
    with queue(tmp_path, ALERTS) as outbox, caplog.at_level("WARNING", "pipeline.alerting.outbox"):
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()

    assert report.receivers["team"].retry == 3
    outbox_lines = [r for r in caplog.records if r.name == "pipeline.alerting.outbox"]
    assert len(outbox_lines) == 1
    message = outbox_lines[0].getMessage()
    wait = round((rows[0].next_attempt_at - NOW).total_seconds())
    expected_time = f"{rows[0].next_attempt_at:%Y-%m-%d %H:%M:%S} UTC (in {wait} s)"
    assert message.startswith(
        f"delivery of a digest of 3 alerts to team/email failed (attempt 1), next attempt at "
        f"{expected_time}: "
    )
    assert wait > 0


def test_retry_time_never_before_now() -> None:
    earlier = NOW - dt.timedelta(minutes=5)
    assert retry_time_text(earlier, NOW) == "at 2026-10-05 09:00:00 UTC (in 0 s)"
    later = NOW + dt.timedelta(seconds=90)
    assert retry_time_text(later, NOW) == "at 2026-10-05 09:01:30 UTC (in 90 s)"


def test_retry_time_converts_to_utc() -> None:
    berlin = dt.timezone(dt.timedelta(hours=2))
    later = dt.datetime(2026, 10, 5, 11, 0, 30, tzinfo=berlin)
    assert retry_time_text(later, NOW) == "at 2026-10-05 09:00:30 UTC (in 30 s)"


def test_permanent_smtp_error_makes_all_rows_dead(
    tmp_path: Path, inbox: tuple[SmtpPeer, int]
) -> None:
    handler, port = inbox
    handler.data_reply = "550 5.7.1 rejected"
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS) as outbox:
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()
    assert handler.data_commands == 1
    assert handler.messages == []
    assert report.receivers["team"].dead == 3
    assert [letter.alert_id for letter in report.dead] == [row.alert_id for row in rows]
    assert [row.status for row in rows] == ["dead"] * 3
    assert all("550" in (row.last_error or "") for row in rows)


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpPeer]:
    with HttpPeer() as peer:
        monkeypatch.setenv(HOOK_ENV, peer.url("/hook"))
        yield peer


def email_and_webhook(port: int) -> dict[str, Any]:
    return {**email_only(port), "webhook": {"url_env": HOOK_ENV, "max_retries": 0}}


def test_mixed_receiver_digest_and_per_alert_posts(
    tmp_path: Path, inbox: tuple[SmtpPeer, int], hook: HttpPeer
) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_and_webhook(port)), tmp_path, NOW)
    sender = senders["team"]
    assert isinstance(sender, BatchSender)
    assert sender.batch_channels == frozenset({"email"})
    with queue(tmp_path, ALERTS, ["email", "webhook"]) as outbox:
        report = deliver_due(outbox, senders, NOW)
        rows = outbox.list_rows()
    assert len(handler.messages) == 1
    assert len(handler.messages[0].get_all("X-Keytrail-Alert") or []) == 3
    assert [body["dedup_key"] for body in hook.bodies] == [
        "digest-test-1",
        "digest-test-2",
        "digest-test-3",
    ]
    assert report.receivers["team"].sent == 6
    assert [(row.channel, row.status) for row in rows] == [
        ("email", "delivered"),
        ("webhook", "delivered"),
    ] * 3


def test_half_failed_receiver_retries_only_email(
    tmp_path: Path, inbox: tuple[SmtpPeer, int], hook: HttpPeer
) -> None:
    handler, port = inbox
    handler.data_reply = "451 4.3.0 try again later"
    senders = build_senders(settings_for(email_and_webhook(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS, ["email", "webhook"]) as outbox:
        first = deliver_due(outbox, senders, NOW)
        waiting = outbox.list_rows(channel="email")
        assert first.receivers["team"].sent == 3
        assert first.receivers["team"].retry == 3
        assert len(hook.requests) == 3
        assert [row.status for row in waiting] == ["pending"] * 3

        handler.data_reply = None
        later = waiting[0].next_attempt_at + dt.timedelta(seconds=1)
        second = deliver_due(outbox, senders, later)
        rows = outbox.list_rows()
    assert len(hook.requests) == 3
    assert handler.data_commands == 2
    assert len(handler.messages) == 1
    assert len(handler.messages[0].get_all("X-Keytrail-Alert") or []) == 3
    assert second.receivers["team"].sent == 3
    assert {row.status for row in rows} == {"delivered"}


def test_whole_receiver_row_sends_every_channel(
    tmp_path: Path, inbox: tuple[SmtpPeer, int], hook: HttpPeer
) -> None:
    handler, port = inbox
    senders = build_senders(settings_for(email_and_webhook(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS[:2], ["*"]) as outbox:
        report = deliver_due(outbox, senders, NOW)
    assert [m.get_all("X-Keytrail-Alert") for m in handler.messages] == [
        ["digest-test-1"],
        ["digest-test-2"],
    ]
    assert len(hook.requests) == 2
    assert report.receivers["team"].sent == 2


def test_removed_channel_row_is_dead_with_fix(tmp_path: Path, inbox: tuple[SmtpPeer, int]) -> None:
    _, port = inbox
    senders = build_senders(settings_for(email_only(port)), tmp_path, NOW)
    with queue(tmp_path, ALERTS[:1], ["webhook"]) as outbox:
        report = deliver_due(outbox, senders, NOW)
        (row,) = outbox.list_rows()
    assert row.status == "dead"
    assert report.dead[0].channel == "webhook"
    assert row.last_error == (
        f"receiver team has no webhook channel in the config any more; add it back and run "
        f"`keytrail outbox retry {row.id}`, or leave the row dead"
    )


# Digest size cap ------------------------------------------------------------------------------


def many_alerts(count: int) -> list[Alert]:
    alerts = []
    for number in range(count):
        alert = make_alert(number, "high" if number % 10 == 0 else "medium")
        alerts.append(dataclasses.replace(alert, title=f"{alert.title} " + "w" * 200))
    return alerts


def test_digest_of_500_alerts_is_capped() -> None:
    alerts = many_alerts(500)

    message = Renderer().render_email_digest(alerts, sender=SENDER, recipients=RECIPIENTS, now=NOW)

    text, html = text_and_html(message)
    size = len(message.as_bytes())
    assert size < 1_000_000
    assert len(html) <= DIGEST_MAX_HTML_CHARS
    assert message["Subject"] == "[keytrail] 500 alerts: 50 high, 450 medium"
    assert message["X-Keytrail-Alert-Count"] == "500"
    assert len(message.get_all("X-Keytrail-Alert") or []) == DIGEST_MAX_FULL_ALERTS
    assert html.count("What to do next") == DIGEST_MAX_FULL_ALERTS
    assert text.count("What to do next:") == DIGEST_MAX_FULL_ALERTS
    more = 500 - DIGEST_MAX_FULL_ALERTS
    assert f"<h2>{more} more alerts</h2>" in html
    assert f"==== {more} more alerts ====" in text
    for alert in alerts:
        assert alert.alert_id in text
        assert alert.alert_id in html
    last = alerts[-1]
    assert f"alert {last.alert_id}, findings {last.findings[0]['finding_id']}\n" in text
    assert "findings.jsonl in its output folder; ask them by finding id" in text
    assert "Their findings are in findings.jsonl" not in html
    assert f"==== Alert {DIGEST_MAX_FULL_ALERTS} of 500 ====" in text
    assert "500 alerts: 50 high, 450 medium" in html


def test_digest_shows_fewer_when_alerts_are_large() -> None:
    big = [dataclasses.replace(alert, silence_hint="s" * 60_000) for alert in many_alerts(30)]

    message = Renderer().render_email_digest(big, sender=SENDER, recipients=RECIPIENTS, now=NOW)

    _, html = text_and_html(message)
    shown = len(message.get_all("X-Keytrail-Alert") or [])
    assert len(html) <= DIGEST_MAX_HTML_CHARS
    assert shown == 5
    assert f"<h2>{30 - shown} more alerts</h2>" in html


def test_small_digest_shows_every_alert_in_full() -> None:
    message = Renderer().render_email_digest(ALERTS, sender=SENDER, recipients=RECIPIENTS, now=NOW)

    text, html = text_and_html(message)
    assert "more alerts" not in html
    assert "more alerts" not in text
    assert message["X-Keytrail-Alert-Count"] == "3"
