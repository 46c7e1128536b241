"""Delivery cases end to end: engine runs against local Slack, webhook and SMTP peers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

import pipeline.engine
from pipeline.alerting.outbox import Outbox
from pipeline.alerting.silences import Matcher, Silence, SilenceStore
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.summary import EXIT_DELIVERY
from tests.test_engine import NOW, cloudtrail_record

HOOK_ENV = "KEYTRAIL_TEST_CASES_HOOK_URL"
PASSWORD_ENV = "KEYTRAIL_TEST_CASES_SMTP_PASSWORD"
CANARY = "kt-canary-7f3e9a1c5d"
LATER = NOW + timedelta(minutes=5)


class HookPeer(BaseHTTPRequestHandler):
    """HTTP peer that records each POST (body, headers, arrival time) and sends the next reply.

    A queued reply is ``(status, headers)``. With ``hang`` set, the handler sleeps that many
    seconds after recording and sends no reply.
    """

    replies: ClassVar[list[tuple[int, dict[str, str]]]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []
    headers_seen: ClassVar[list[dict[str, str]]] = []
    arrivals: ClassVar[list[float]] = []
    hang: ClassVar[float] = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        peer = type(self)
        peer.arrivals.append(time.monotonic())
        peer.headers_seen.append(dict(self.headers.items()))
        peer.bodies.append(json.loads(self.rfile.read(length)))
        if peer.hang:
            time.sleep(peer.hang)
            return
        status, extra = peer.replies.pop(0) if peer.replies else (200, {})
        body = b"ok" if status == 200 else b"error"
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HookPeer]]:
    HookPeer.replies = []
    HookPeer.bodies = []
    HookPeer.headers_seen = []
    HookPeer.arrivals = []
    HookPeer.hang = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), HookPeer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(HOOK_ENV, f"http://127.0.0.1:{server.server_address[1]}/hook/{CANARY}")
    yield HookPeer
    server.shutdown()
    server.server_close()


class _LocalController(Controller):
    """A Controller on a port chosen by the OS, read back before aiosmtpd's own first connect."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.base_events.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class MailPeer:
    """SMTP handler that records raw messages, or replies ``data_reply`` to DATA when set."""

    data_reply: str | None = None
    received: list[bytes] = field(default_factory=list)
    data_commands: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.data_reply:
            return self.data_reply
        content = envelope.original_content or b""
        self.received.append(content)
        return "250 OK queued"


@pytest.fixture
def mail() -> Iterator[tuple[MailPeer, int]]:
    handler = MailPeer()
    controller = _LocalController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield handler, int(controller.port)
    controller.stop()


def write_records(root: Path, records: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records]
    (root / "trail.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def one_read(tmp_path: Path) -> None:
    write_records(tmp_path / "logs", [cloudtrail_record(1, time="2026-10-05T08:00:00Z")])


def slack_receiver(**overrides: Any) -> dict[str, Any]:
    slack: dict[str, Any] = {
        "webhook_url_env": HOOK_ENV,
        "max_retries": 0,
        "retry_backoff_seconds": 0,
        "timeout_seconds": 2,
    }
    slack.update(overrides)
    return {"slack": slack}


def email_receiver(port: int, **overrides: Any) -> dict[str, Any]:
    email: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "sender": "keytrail@example.com",
        "recipients": ["secops@example.com"],
        "timeout_seconds": 2,
    }
    email.update(overrides)
    return {"email": email}


def make_settings(tmp_path: Path, receivers: dict[str, Any], **alerting: Any) -> Settings:
    routing = alerting.pop("routing", {"default_receiver": "team", "group_by": ["..."]})
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"tests.every_read": {}},
        "alerting": {
            "console": False,
            "receivers": receivers,
            "routing": routing,
            "delivery": {"backoff_base_seconds": 1, "backoff_cap_seconds": 1, "max_attempts": 5},
            **alerting,
        },
    }
    return settings_from_mapping(data, base_dir=tmp_path)


def block_texts(value: Any) -> list[str]:
    """Return every ``text`` string found anywhere in a Slack payload."""
    if isinstance(value, dict):
        found = [value["text"]] if isinstance(value.get("text"), str) else []
        for item in value.values():
            found.extend(block_texts(item))
        return found
    if isinstance(value, list):
        return [text for item in value for text in block_texts(item)]
    return []


def test_server_errors_then_success_delivers_once(tmp_path: Path, hook: type[HookPeer]) -> None:
    one_read(tmp_path)
    hook.replies = [(500, {}), (500, {}), (200, {})]
    settings = make_settings(tmp_path, {"team": slack_receiver(max_retries=2)})
    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert summary.delivery["receivers"]["team"]["pending"] == 0
    assert len(hook.bodies) == 3
    assert hook.bodies[0] == hook.bodies[1] == hook.bodies[2]
    assert "prod/db-1" in json.dumps(hook.bodies[2])
    assert summary.exit_code() == 0


def test_rate_limit_waits_for_retry_after(tmp_path: Path, hook: type[HookPeer]) -> None:
    one_read(tmp_path)
    hook.replies = [(429, {"Retry-After": "1"}), (200, {})]
    settings = make_settings(tmp_path, {"team": slack_receiver(max_retries=1)})
    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.arrivals) == 2
    # Lower bound only: the sender must not come back before the peer's Retry-After.
    assert hook.arrivals[1] - hook.arrivals[0] >= 1.0


def test_hanging_server_resent_next_run(tmp_path: Path, hook: type[HookPeer]) -> None:
    one_read(tmp_path)
    hook.hang = 1.5
    settings = make_settings(tmp_path, {"team": slack_receiver(timeout_seconds=0.3)})
    first = run_once(settings, now=NOW)

    assert first.delivery["receivers"]["team"]["sent"] == 0
    assert first.delivery["receivers"]["team"]["pending"] == 1
    hook.hang = 0.0
    second = run_once(settings, now=LATER)

    assert second.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 2
    assert hook.bodies[0]["text"] == hook.bodies[1]["text"]
    assert json.dumps(hook.bodies[0]["blocks"]) == json.dumps(hook.bodies[1]["blocks"])


def test_smtp_recovery_sends_only_email(
    tmp_path: Path, hook: type[HookPeer], mail: tuple[MailPeer, int]
) -> None:
    one_read(tmp_path)
    smtp, port = mail
    smtp.data_reply = "451 4.3.0 Try again later"
    settings = make_settings(
        tmp_path,
        {"chat": slack_receiver(), "mail": email_receiver(port)},
        routing={
            "routes": [{"receiver": "chat", "continue": True}, {"receiver": "mail"}],
            "default_receiver": "mail",
            "group_by": ["..."],
        },
    )
    first = run_once(settings, now=NOW)

    assert first.delivery["receivers"]["chat"]["sent"] == 1
    assert first.delivery["receivers"]["mail"]["retry"] == 1
    assert first.exit_code() == EXIT_DELIVERY
    assert len(hook.bodies) == 1
    assert smtp.received == []

    smtp.data_reply = None
    second = run_once(settings, now=LATER)

    assert second.delivery["receivers"]["mail"]["sent"] == 1
    assert "chat" not in second.delivery["receivers"]
    assert len(hook.bodies) == 1
    assert len(smtp.received) == 1
    assert second.exit_code() == 0


def test_large_group_fits_slack_limits(tmp_path: Path, hook: type[HookPeer]) -> None:
    records = [
        cloudtrail_record(number, time=f"2026-10-05T08:{number // 60:02d}:{number % 60:02d}Z")
        for number in range(1, 201)
    ]
    write_records(tmp_path / "logs", records)
    settings = make_settings(
        tmp_path,
        {"team": slack_receiver()},
        routing={"default_receiver": "team", "group_by": ["detector", "principal"]},
    )
    summary = run_once(settings, now=NOW)

    assert summary.findings_new == 200
    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 1
    message = hook.bodies[0]
    assert len(message["blocks"]) <= 50
    texts = block_texts(message)
    assert all(len(text) <= 3000 for text in texts)
    more = [text for text in texts if "more findings are not shown" in text]
    assert len(more) == 1
    hidden = int(more[0].split(" ", 1)[0])
    assert 0 < hidden < 200


def test_expired_silence_stops_applying(tmp_path: Path, hook: type[HookPeer]) -> None:
    one_read(tmp_path)
    store = SilenceStore(tmp_path / "state" / "state.db")
    store.add(
        Silence(
            matchers=[Matcher(label="detector", value="tests.every_read")],
            starts_at=NOW - timedelta(hours=2),
            ends_at=NOW - timedelta(hours=1),
            owner="oncall@example.com",
            reason="finished maintenance",
        ),
        now=NOW - timedelta(hours=2),
    )
    summary = run_once(make_settings(tmp_path, {"team": slack_receiver()}), now=NOW)

    assert summary.alerting["silenced"] == 0
    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 1


def test_active_silence_still_applies(tmp_path: Path, hook: type[HookPeer]) -> None:
    one_read(tmp_path)
    store = SilenceStore(tmp_path / "state" / "state.db")
    store.add(
        Silence(
            matchers=[Matcher(label="detector", value="tests.every_read")],
            starts_at=NOW - timedelta(hours=2),
            ends_at=NOW + timedelta(hours=1),
            owner="oncall@example.com",
            reason="ongoing maintenance",
        ),
        now=NOW - timedelta(hours=2),
    )
    summary = run_once(make_settings(tmp_path, {"team": slack_receiver()}), now=NOW)

    assert summary.alerting["silenced"] == 1
    assert hook.bodies == []


def test_killed_run_delivers_next_run(
    tmp_path: Path, hook: type[HookPeer], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [cloudtrail_record(n, time=f"2026-10-05T08:0{n}:00Z") for n in range(1, 4)]
    write_records(tmp_path / "logs", records)
    settings = make_settings(tmp_path, {"team": slack_receiver()})

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(pipeline.engine, "_deliver", killed)
        run_once(settings, now=NOW)
    assert hook.bodies == []
    with Outbox(tmp_path / "state" / "state.db") as outbox:
        assert outbox.counts() == {"pending": 3, "delivered": 0, "dead": 0}

    second = run_once(settings, now=LATER)
    third = run_once(settings, now=LATER + timedelta(minutes=5))

    assert second.findings_new == 0
    assert second.delivery["receivers"]["team"]["sent"] == 3
    assert third.delivery["receivers"] == {}
    assert len(hook.bodies) == 3
    assert len({json.dumps(body, sort_keys=True) for body in hook.bodies}) == 3


def test_hostile_log_fields_arrive_inert(
    tmp_path: Path, hook: type[HookPeer], mail: tuple[MailPeer, int]
) -> None:
    smtp, port = mail
    record = cloudtrail_record(1, time="2026-10-05T08:00:00Z", user="<!channel></script>")
    record["userAgent"] = "<https://evil.example|Console>"
    record["requestParameters"] = {
        "secretId": "db<https://evil.example|Console>\r\nBcc: x@evil.example"
    }
    write_records(tmp_path / "logs", [record])
    settings = make_settings(tmp_path, {"team": {**slack_receiver(), **email_receiver(port)}})
    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 1
    slack_json = json.dumps(hook.bodies[0])
    assert "&lt;!channel&gt;" in slack_json
    assert "<!channel>" not in slack_json
    assert "<https://evil.example|" not in slack_json
    assert len(smtp.received) == 1
    raw = smtp.received[0]
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Bcc"] is None
    assert b"\nBcc:" not in raw
    subject_line = next(line for line in raw.split(b"\r\n") if line.startswith(b"Subject:"))
    assert b"\r" not in subject_line
    assert b"\n" not in subject_line
    assert "\r" not in str(message["Subject"])
    assert "\n" not in str(message["Subject"])
    html = message.get_body(preferencelist=("html",))
    assert html is not None
    assert "&lt;/script&gt;" in html.get_content()
    assert "</script>" not in html.get_content()


def test_canary_secret_never_written(
    tmp_path: Path,
    hook: type[HookPeer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one_read(tmp_path)
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    hook.replies = [(500, {})]
    closed_port = _free_port()
    settings = make_settings(
        tmp_path,
        {
            "team": {
                **slack_receiver(),
                "webhook": {"url_env": HOOK_ENV, "max_retries": 0, "timeout_seconds": 2},
                **email_receiver(
                    closed_port,
                    security="starttls",
                    username="keytrail",
                    password_env=PASSWORD_ENV,
                ),
            }
        },
    )
    caplog.set_level(logging.DEBUG)
    first = run_once(settings, now=NOW)
    second = run_once(settings, now=LATER)

    assert first.exit_code() == EXIT_DELIVERY
    assert CANARY not in caplog.text
    for record in caplog.records:
        if record.exc_info and record.exc_info[1] is not None:
            assert CANARY not in str(record.exc_info[1])
    for summary in (first, second):
        assert CANARY not in json.dumps(summary.to_dict(), default=str)
        assert all(CANARY not in problem for problem in summary.problems)
    files = [path for root in ("state", "out") for path in (tmp_path / root).rglob("*")]
    assert any(path.name == "state.db" for path in files)
    leaked = [path for path in files if path.is_file() and CANARY.encode() in path.read_bytes()]
    assert leaked == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
