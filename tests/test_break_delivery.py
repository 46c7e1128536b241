"""Hostile and broken receivers against the delivery channels and the outbox.

Every peer is started here on 127.0.0.1: a Slack stand-in that redirects, a second host that
must never be reached, and servers that respond 429 with absurd ``Retry-After`` values.
"""

from __future__ import annotations

import base64
import json
import logging
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from detectors.base import build_findings
from pipeline.alerting.alerts import Alert, alerts_from_findings
from pipeline.alerting.channels.base import Delivery, parse_retry_after
from pipeline.alerting.channels.slack import SlackChannel, SlackSettings
from pipeline.alerting.outbox import Outbox, OutboxRow, deliver_due
from pipeline.engine import run_once
from pipeline.summary import EXIT_DELIVERY
from tests.alerting.conftest import DETECTORS, travel_row
from tests.peers import HttpPeer, Reply
from tests.test_delivery_cases import (
    CANARY,
    HOOK_ENV,
    LATER,
    PASSWORD_ENV,
    block_texts,
    email_receiver,
    make_settings,
    slack_receiver,
    write_records,
)
from tests.test_engine import NOW as RUN_NOW
from tests.test_engine import cloudtrail_record

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
WEBHOOK_PATH = "/services/T0KT0001/B0KT0002/canaryhooksecret"
BOT_TOKEN = "xoxb-1111-2222-canarytokensecret"
PAYLOAD: dict[str, Any] = {
    "text": "High: secret read from a new country",
    "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*Who:* `ci`"}}],
}


class RecordingHost:
    """An HTTP server that records every GET and POST and responds with 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                host.requests.append((self.command, self.path, dict(self.headers.items())))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = b'{"ok": true, "ts": "1.2"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self) -> RecordingHost:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def other_host() -> Iterator[RecordingHost]:
    with RecordingHost() as host:
        yield host


@pytest.fixture
def slack() -> Iterator[HttpPeer]:
    with HttpPeer() as peer:
        yield peer


@pytest.fixture
def alert() -> Alert:
    findings = build_findings([travel_row()], detector=DETECTORS["travel"])
    return alerts_from_findings(findings)[0]


def webhook_channel(monkeypatch: pytest.MonkeyPatch, url: str) -> SlackChannel:
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", url)
    return SlackChannel(SlackSettings(timeout_seconds=5, max_retries=0))


def bot_channel(monkeypatch: pytest.MonkeyPatch, base_url: str) -> SlackChannel:
    monkeypatch.setenv("KEYTRAIL_SLACK_BOT_TOKEN", BOT_TOKEN)
    settings = SlackSettings(
        mode="bot", channel="C0KTALERTS", base_url=base_url, timeout_seconds=5, max_retries=0
    )
    return SlackChannel(settings)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_slack_webhook_redirect_not_followed(
    monkeypatch: pytest.MonkeyPatch, slack: HttpPeer, other_host: RecordingHost, status: int
) -> None:
    slack.script(Reply(status, body="", headers={"Location": other_host.url("/collect")}))
    channel = webhook_channel(monkeypatch, slack.url(WEBHOOK_PATH))

    delivery = channel.send(PAYLOAD)

    assert delivery.status == "failed"
    assert delivery.detail == (
        f"HTTP {status}: the webhook URL redirects, and redirects are not followed; set "
        "KEYTRAIL_SLACK_WEBHOOK_URL to the webhook URL from the app's Incoming Webhooks page"
    )
    assert len(slack.requests) == 1
    assert other_host.requests == []


@pytest.mark.parametrize("status", [302, 307])
def test_slack_bot_redirect_keeps_token_home(
    monkeypatch: pytest.MonkeyPatch, slack: HttpPeer, other_host: RecordingHost, status: int
) -> None:
    slack.script(Reply(status, body="", headers={"Location": other_host.url("/api/steal")}))
    channel = bot_channel(monkeypatch, slack.url("/api/"))

    delivery = channel.send(PAYLOAD)

    assert delivery.status == "failed"
    assert delivery.detail == (
        f"chat.postMessage returned a redirect (HTTP {status}), which is not followed; "
        "set slack.base_url to the Web API URL, such as https://slack.com/api/"
    )
    assert len(slack.requests) == 1
    assert slack.requests[0].headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert other_host.requests == []


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "NaN"])
def test_retry_after_non_finite_invalid(value: str) -> None:
    assert parse_retry_after(value) is None


def test_retry_after_huge_number_kept() -> None:
    assert parse_retry_after("1e20") == 1e20


@pytest.mark.parametrize("value", ["inf", "nan", "1e20", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_slack_absurd_retry_after_scheduled_at_cap(
    monkeypatch: pytest.MonkeyPatch, slack: HttpPeer, tmp_path: Path, alert: Alert, value: str
) -> None:
    slack.script(Reply(429, body="rate_limited", headers={"Retry-After": value}))
    channel = webhook_channel(monkeypatch, slack.url(WEBHOOK_PATH))
    delivery = channel.send(PAYLOAD)
    assert delivery.status == "retry"

    with Outbox(tmp_path / "state.db") as box:
        box.enqueue(alert, ["slack"], now=NOW)
        row_id = box.list_rows()[0].id
        row = box.record(row_id, delivery, NOW)

    assert row.status == "pending"
    assert row.attempts == 1
    # An infinite or NaN value falls back to the backoff, at most 30 s for the first attempt.
    # A finite huge value is cut to backoff_cap_seconds (3600 s).
    if delivery.retry_after is None:
        assert NOW <= row.next_attempt_at <= NOW + timedelta(seconds=30)
    else:
        assert row.next_attempt_at == NOW + timedelta(seconds=3600)


@pytest.mark.parametrize("retry_after", [float("inf"), float("nan"), 1e300])
def test_outbox_retry_delay_bounded(tmp_path: Path, retry_after: float) -> None:
    with Outbox(tmp_path / "state.db") as box:
        delay = box.retry_delay(1, retry_after)

    if retry_after != retry_after:  # NaN
        assert 0 <= delay <= 30
    else:
        assert delay == 3600


def test_outbox_record_nan_retry_after(tmp_path: Path, alert: Alert) -> None:
    with Outbox(tmp_path / "state.db") as box:
        box.enqueue(alert, ["slack"], now=NOW)
        row_id = box.list_rows()[0].id
        row = box.record(row_id, Delivery("retry", "HTTP 429", retry_after=float("nan")), NOW)

    assert row.status == "pending"
    assert NOW <= row.next_attempt_at <= NOW + timedelta(seconds=30)


def test_slack_webhook_drop_after_request_sent_once(
    monkeypatch: pytest.MonkeyPatch, slack: HttpPeer
) -> None:
    # The peer records the request, then closes the connection without a response.
    slack.script(Reply(hang=0.01), then=Reply(200))
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", slack.url(WEBHOOK_PATH))
    channel = SlackChannel(SlackSettings(timeout_seconds=5, max_retries=2, retry_backoff_seconds=0))

    delivery = channel.send(PAYLOAD)

    assert len(slack.requests) == 1
    assert delivery.status == "retry"
    assert delivery.ambiguous is True
    assert delivery.detail == (
        "the connection to the webhook broke before a response arrived (RemoteDisconnected); "
        "Slack may have posted the message"
    )


def test_slack_bot_drop_after_request_sent_once(
    monkeypatch: pytest.MonkeyPatch, slack: HttpPeer
) -> None:
    slack.script(Reply(hang=0.01), then=Reply(200, body='{"ok": true, "ts": "1.2"}'))
    monkeypatch.setenv("KEYTRAIL_SLACK_BOT_TOKEN", BOT_TOKEN)
    settings = SlackSettings(
        mode="bot",
        channel="C0KTALERTS",
        base_url=slack.url("/api/"),
        timeout_seconds=5,
        max_retries=2,
        retry_backoff_seconds=0,
    )

    delivery = SlackChannel(settings).send(PAYLOAD)

    assert len(slack.requests) == 1
    assert delivery.status == "retry"
    assert delivery.ambiguous is True


def test_slack_refused_connection_not_ambiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed port fails before the request is sent, so Slack cannot have the message.
    with HttpPeer() as peer:
        closed_url = peer.url(WEBHOOK_PATH)
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", closed_url)
    channel = SlackChannel(SlackSettings(timeout_seconds=5, max_retries=2, retry_backoff_seconds=0))

    delivery = channel.send(PAYLOAD)

    assert delivery.status == "retry"
    assert delivery.ambiguous is False
    assert delivery.detail == "connecting to the webhook failed (ConnectionRefusedError)"


# A full run with hostile log fields, a canary in every secret, and receivers that echo them


class EchoingSmtp:
    """A raw SMTP server that offers AUTH, then rejects it quoting the decoded credentials."""

    def __init__(self) -> None:
        self.auth_attempts = 0
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 mail.example ESMTP\r\n")
                for raw in self.rfile:
                    command = raw.decode("ascii", errors="replace").strip()
                    verb = command.split(" ", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        self.wfile.write(b"250-mail.example\r\n250 AUTH PLAIN LOGIN\r\n")
                    elif verb == "AUTH":
                        server.auth_attempts += 1
                        encoded = command.split(" ")[-1]
                        decoded = base64.b64decode(encoded + "==").decode("utf-8", "replace")
                        quoted = decoded.replace("\x00", " ")
                        self.wfile.write(f"535 5.7.8 rejected: {quoted}\r\n".encode())
                    elif verb == "QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"503 5.5.1 bad sequence\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> EchoingSmtp:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def hostile_record(number: int) -> dict[str, Any]:
    rtl = "\u202egnp.exe"
    record = cloudtrail_record(number, time="2026-10-05T08:00:00Z", user=f"<!channel>{rtl}")
    record["userAgent"] = "<https://evil.example|Console>\x00" + "A" * 100_000 + rtl
    record["sourceIPAddress"] = "<script>alert(1)</script>"
    record["requestParameters"] = {"secretId": "db`\r\nBcc: x@evil.example\r\n<b>bold</b>"}
    record["errorMessage"] = "<@U0ADMIN> *urgent* <!here>"
    return record


def test_hostile_run_leaks_no_canary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_records(tmp_path / "logs", [hostile_record(1)])
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    with HttpPeer() as slack, EchoingSmtp() as smtp:
        monkeypatch.setenv(HOOK_ENV, slack.url(f"/hook/{CANARY}"))
        # The first response echoes the request path, as some proxies' error pages do.
        slack.script(Reply(500, body=f"upstream failed for /hook/{CANARY}"), Reply(200))
        email = email_receiver(smtp.port, username="keytrail", password_env=PASSWORD_ENV)
        settings = make_settings(tmp_path, {"team": {**slack_receiver(), **email}})
        caplog.set_level(logging.DEBUG)

        first = run_once(settings, now=RUN_NOW)
        second = run_once(settings, now=LATER)

    assert first.exit_code() == EXIT_DELIVERY
    # 535 is permanent, so the email row is dead after one attempt and the second run only
    # sends the Slack retry.
    assert smtp.auth_attempts == 1
    assert len(slack.requests) == 2
    with Outbox(tmp_path / "state" / "state.db") as box:
        rows = {row.channel: (row.status, row.last_error) for row in box.list_rows()}
    assert rows["slack"] == (
        "delivered",
        "Slack server error (HTTP 500 upstream failed for [redacted])",
    )
    assert rows["email"][0] == "dead"
    assert "535 5.7.8 rejected: keytrail ***" in str(rows["email"][1])
    assert CANARY not in caplog.text
    for summary in (first, second):
        assert CANARY not in json.dumps(summary.to_dict(), default=str)
    files = [path for root in ("state", "out") for path in (tmp_path / root).rglob("*")]
    leaked = [path for path in files if path.is_file() and CANARY.encode() in path.read_bytes()]
    assert leaked == []

    sent = json.dumps(slack.bodies[1], ensure_ascii=False)
    for text in ("<!channel>", "<!here>", "<@U0ADMIN>", "<https://evil.example|", "<script>"):
        assert text not in sent
    for character in ("\u202e", "\x00", "\r"):
        assert character not in sent
    assert max(len(text) for text in block_texts(slack.bodies[1])) <= 3000


def test_concurrent_retry_and_delivery(tmp_path: Path, alert: Alert) -> None:
    path = tmp_path / "state.db"
    receivers = [f"team-{number:02d}" for number in range(30)]
    with Outbox(path) as box:
        box.enqueue(alert, receivers, now=NOW)
        for row in box.list_rows():
            box.record(row.id, Delivery("failed", "HTTP 404 no_service"), NOW)
    sends: list[str] = []
    lock = threading.Lock()

    def deliver(row: OutboxRow) -> Delivery:
        with lock:
            sends.append(row.receiver)
        return Delivery("delivered", "HTTP 200 ok")

    changed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def retry_all() -> None:
        try:
            with Outbox(path) as other:
                start.wait()
                changed.append(other.retry_dead(now=NOW))
        except BaseException as error:  # reported by the asserts below
            errors.append(error)

    workers = [threading.Thread(target=retry_all) for _ in range(2)]
    for worker in workers:
        worker.start()
    with Outbox(path) as box:
        start.wait()
        first = deliver_due(box, dict.fromkeys(receivers, deliver), NOW)
        for worker in workers:
            worker.join(30)
        second = deliver_due(box, dict.fromkeys(receivers, deliver), NOW)
        statuses = {row.status for row in box.list_rows()}

    assert errors == []
    assert sum(changed) == 30
    sent = sum(counts.sent for counts in first.receivers.values())
    sent += sum(counts.sent for counts in second.receivers.values())
    assert sent == 30
    assert sorted(sends) == receivers
    assert statuses == {"delivered"}


def test_slack_huge_response_delivered(monkeypatch: pytest.MonkeyPatch, slack: HttpPeer) -> None:
    slack.script(Reply(200, body="ok" + "x" * (8 * 1024 * 1024)))
    channel = webhook_channel(monkeypatch, slack.url(WEBHOOK_PATH))

    delivery = channel.send(PAYLOAD)

    assert delivery.status == "delivered"
    assert delivery.detail == f"webhook accepted the message (HTTP 200 ok{'x' * 118}...)"
