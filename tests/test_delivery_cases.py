"""Delivery cases end to end: engine runs against local Slack, webhook and SMTP peers."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import pipeline.engine
from pipeline.alerting.outbox import Outbox
from pipeline.alerting.silences import Matcher, Silence, SilenceStore
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.summary import EXIT_DELIVERY
from tests.peers import HttpPeer, Reply, SmtpPeer, smtp_server
from tests.test_engine import NOW, cloudtrail_record

HOOK_ENV = "KEYTRAIL_TEST_CASES_HOOK_URL"
PASSWORD_ENV = "KEYTRAIL_TEST_CASES_SMTP_PASSWORD"
CANARY = "kt-canary-7f3e9a1c5d"
LATER = NOW + timedelta(minutes=5)


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpPeer]:
    with HttpPeer() as peer:
        monkeypatch.setenv(HOOK_ENV, peer.url(f"/hook/{CANARY}"))
        yield peer


@pytest.fixture
def mail() -> Iterator[tuple[SmtpPeer, int]]:
    with smtp_server() as (handler, port):
        yield handler, port


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


def test_server_errors_then_success_delivers_once(tmp_path: Path, hook: HttpPeer) -> None:
    one_read(tmp_path)
    hook.script(Reply(500), Reply(500), Reply(200))
    settings = make_settings(tmp_path, {"team": slack_receiver(max_retries=2)})
    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["team"]["sent"] == 1
    assert summary.delivery["receivers"]["team"]["pending"] == 0
    assert len(hook.bodies) == 3
    assert hook.bodies[0] == hook.bodies[1] == hook.bodies[2]
    assert "prod/db-1" in json.dumps(hook.bodies[2])
    assert summary.exit_code() == 0


def test_rate_limit_waits_for_retry_after(tmp_path: Path, hook: HttpPeer) -> None:
    one_read(tmp_path)
    hook.script(Reply(429, headers={"Retry-After": "1"}), Reply(200))
    settings = make_settings(tmp_path, {"team": slack_receiver(max_retries=1)})
    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["team"]["sent"] == 1
    arrivals = [request.arrived for request in hook.requests]
    assert len(arrivals) == 2
    # Lower bound only: the sender must not come back before the peer's Retry-After.
    assert arrivals[1] - arrivals[0] >= 1.0


def test_hanging_server_resent_next_run(tmp_path: Path, hook: HttpPeer) -> None:
    one_read(tmp_path)
    hook.script(Reply(hang=1.5), Reply(200))
    settings = make_settings(tmp_path, {"team": slack_receiver(timeout_seconds=0.3)})
    first = run_once(settings, now=NOW)

    assert first.delivery["receivers"]["team"]["sent"] == 0
    assert first.delivery["receivers"]["team"]["pending"] == 1
    second = run_once(settings, now=LATER)

    assert second.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 2
    assert hook.bodies[0]["text"] == hook.bodies[1]["text"]
    assert json.dumps(hook.bodies[0]["blocks"]) == json.dumps(hook.bodies[1]["blocks"])


def test_smtp_recovery_sends_only_email(
    tmp_path: Path, hook: HttpPeer, mail: tuple[SmtpPeer, int]
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
    assert smtp.raw == []

    smtp.data_reply = None
    second = run_once(settings, now=LATER)

    assert second.delivery["receivers"]["mail"]["sent"] == 1
    assert "chat" not in second.delivery["receivers"]
    assert len(hook.bodies) == 1
    assert len(smtp.raw) == 1
    assert second.exit_code() == 0


def test_large_group_fits_slack_limits(tmp_path: Path, hook: HttpPeer) -> None:
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


def test_expired_silence_stops_applying(tmp_path: Path, hook: HttpPeer) -> None:
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


def test_active_silence_still_applies(tmp_path: Path, hook: HttpPeer) -> None:
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
    tmp_path: Path, hook: HttpPeer, monkeypatch: pytest.MonkeyPatch
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
    tmp_path: Path, hook: HttpPeer, mail: tuple[SmtpPeer, int]
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

    assert summary.delivery["receivers"]["team"]["sent"] == 2
    assert len(hook.bodies) == 1
    slack_json = json.dumps(hook.bodies[0])
    assert "&lt;!channel&gt;" in slack_json
    assert "<!channel>" not in slack_json
    assert "<https://evil.example|" not in slack_json
    # The user agent appears only in the top events.
    assert "agent `&lt;https://evil.example|Console&gt;`" in slack_json
    assert len(smtp.raw) == 1
    raw = smtp.raw[0]
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
    hook: HttpPeer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one_read(tmp_path)
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    hook.script(Reply(500), Reply(200))
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


def test_half_failed_receiver_retries_only_email(
    tmp_path: Path, hook: HttpPeer, mail: tuple[SmtpPeer, int]
) -> None:
    one_read(tmp_path)
    smtp, port = mail
    smtp.data_reply = "451 4.3.0 Try again later"
    settings = make_settings(tmp_path, {"team": {**slack_receiver(), **email_receiver(port)}})
    first = run_once(settings, now=NOW)

    assert first.delivery["receivers"]["team"]["sent"] == 1
    assert first.delivery["receivers"]["team"]["retry"] == 1
    assert first.exit_code() == EXIT_DELIVERY
    assert len(hook.bodies) == 1
    with Outbox(tmp_path / "state" / "state.db") as outbox:
        rows = {row.channel: row.status for row in outbox.list_rows()}
    assert rows == {"slack": "delivered", "email": "pending"}

    smtp.data_reply = None
    second = run_once(settings, now=LATER)

    assert second.delivery["receivers"]["team"]["sent"] == 1
    assert len(hook.bodies) == 1
    assert smtp.data_commands == 2
    assert len(smtp.raw) == 1
    assert second.exit_code() == 0


def failing_read(number: int, *, time: str, address: str) -> dict[str, Any]:
    record = cloudtrail_record(number, time=time)
    record["errorCode"] = "AccessDenied"
    record["errorMessage"] = "User is not authorized to perform secretsmanager:GetSecretValue"
    record["sourceIPAddress"] = address
    return record


def test_top_events_reach_every_channel(
    tmp_path: Path, hook: HttpPeer, mail: tuple[SmtpPeer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    smtp, port = mail
    repeat = cloudtrail_record(2, time="2026-10-05T08:01:00Z")
    repeat["requestParameters"] = {"secretId": "prod/db-1"}
    records = [
        cloudtrail_record(1, time="2026-10-05T08:00:00Z"),
        repeat,
        cloudtrail_record(3, time="2026-10-05T08:02:00Z"),
        failing_read(4, time="2026-10-05T08:03:00Z", address="203.0.113.9"),
        cloudtrail_record(5, time="2026-10-05T08:04:00Z"),
        cloudtrail_record(6, time="2026-10-05T08:05:00Z"),
        cloudtrail_record(7, time="2026-10-05T08:06:00Z"),
    ]
    write_records(tmp_path / "logs", records)
    with HttpPeer() as siem:
        monkeypatch.setenv("KEYTRAIL_TEST_CASES_SIEM_URL", siem.url("/siem"))
        receiver = {
            **slack_receiver(),
            **email_receiver(port),
            "webhook": {"url_env": "KEYTRAIL_TEST_CASES_SIEM_URL", "max_retries": 0},
            "file": {},
        }
        settings = make_settings(
            tmp_path,
            {"team": receiver},
            routing={"default_receiver": "team", "group_by": ["detector", "principal"]},
        )
        summary = run_once(settings, now=NOW)
        (document,) = siem.bodies

    assert summary.delivery["receivers"]["team"]["sent"] == 4
    # The failure first, then new secrets and addresses; the repeat of prod/db-1 is left out.
    expected = ["prod/db-4", "prod/db-1", "prod/db-3", "prod/db-5", "prod/db-6"]
    events = document["top_events"]
    assert [item["resource"] for item in events] == expected
    assert events[0]["outcome"] == "failure"
    assert events[0]["error_code"] == "AccessDenied"
    assert events[0]["source_ip"] == "203.0.113.9"
    assert events[0]["time"] == "2026-10-05T08:03:00Z"
    assert events[0]["user_agent"] == "aws-cli/2.15.0"

    slack_text = json.dumps(hook.bodies[0], ensure_ascii=False)
    assert "*Top events* (5 of 7)" in slack_text
    assert slack_text.index("prod/db-4` from `203.0.113.9`") < slack_text.index(
        "prod/db-6` from `10.1.2.3`"
    )
    message = message_from_bytes(smtp.raw[0], policy=policy.default)
    assert isinstance(message, EmailMessage)
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    assert (
        "  - 2026-10-05 08:03:00 UTC: GetSecretValue on prod/db-4 from 203.0.113.9, "
        "failure AccessDenied, agent aws-cli/2.15.0\n"
    ) in str(text.get_content()).replace("\r\n", "\n")
    outbox_dir = tmp_path / "out" / "outbox"
    (slack_file,) = outbox_dir.glob("*.slack.json")
    assert "*Top events* (5 of 7)" in slack_file.read_text(encoding="utf-8")
    (eml_file,) = outbox_dir.glob("*.eml")
    assert b"Top events (5 of 7)" in eml_file.read_bytes()
