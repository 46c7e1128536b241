"""SlackChannel against a real HTTP server on 127.0.0.1 that responds like Slack."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.alerting.channels.base import Delivery
from pipeline.alerting.channels.slack import SlackChannel, SlackSettings
from pipeline.errors import ConfigError
from tests.peers import HttpPeer, Reply

WEBHOOK_PATH = "/services/T0KT0001/B0KT0002/hooksecretvalue42"
BOT_TOKEN = "xoxb-1111-2222-tokensecretvalue"
CHANNEL_ID = "C0KTALERTS"

PAYLOAD: dict[str, Any] = {
    "text": "High: secret read from a new country",
    "blocks": [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": "Secret read from a new country"},
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "*Who:* `arn:aws:iam::111122223333:user/ci`"},
        },
    ],
}


class FakeSlack(HttpPeer):
    """A local HTTP server that responds like Slack's webhook and Web API endpoints.

    Replies set with ``script`` are used in order, and the last one repeats.
    """

    @property
    def webhook_url(self) -> str:
        return self.url(WEBHOOK_PATH)

    @property
    def api_url(self) -> str:
        return self.url("/api/")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk sends every request through a proxy named in these variables.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def webhook_channel(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> SlackChannel:
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", slack.webhook_url)
    options: dict[str, Any] = {"timeout_seconds": 0.5, "retry_backoff_seconds": 0.01}
    options.update(overrides)
    return SlackChannel(SlackSettings(mode="webhook", **options))


def bot_channel(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> SlackChannel:
    monkeypatch.setenv("KEYTRAIL_SLACK_BOT_TOKEN", BOT_TOKEN)
    options: dict[str, Any] = {
        "channel": CHANNEL_ID,
        "base_url": slack.api_url,
        "timeout_seconds": 0.5,
        "retry_backoff_seconds": 0.01,
    }
    options.update(overrides)
    return SlackChannel(SlackSettings(mode="bot", **options))


def assert_no_secret(delivery: Delivery, caplog: pytest.LogCaptureFixture) -> None:
    for secret in ("hooksecretvalue42", "tokensecretvalue"):
        assert secret not in delivery.detail
        assert secret not in caplog.text


# Webhook mode


def test_webhook_ok_delivered(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery("delivered", "webhook accepted the message (HTTP 200 ok)")
    assert len(slack.requests) == 1
    assert slack.requests[0].path == WEBHOOK_PATH
    assert slack.requests[0].body == PAYLOAD
    assert slack.requests[0].headers["Content-Type"] == "application/json;charset=utf-8"
    assert_no_secret(delivery, caplog_debug)


def test_webhook_thread_ts_in_body(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD, thread_ts="1700000000.000100")

    assert delivery.status == "delivered"
    assert slack.requests[0].body == {**PAYLOAD, "thread_ts": "1700000000.000100"}


def test_webhook_429_then_ok_retries_in_call(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(429, "rate_limited", {"Retry-After": "1"}), Reply(200, "ok"))

    delivery = webhook_channel(slack, monkeypatch, max_retries=1).send(PAYLOAD)

    assert delivery == Delivery("delivered", "webhook accepted the message (HTTP 200 ok)")
    assert len(slack.requests) == 2
    assert slack.requests[1].body == PAYLOAD
    assert_no_secret(delivery, caplog_debug)


def test_webhook_always_429_is_retry(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(429, "rate_limited", {"Retry-After": "1"}))

    delivery = webhook_channel(slack, monkeypatch, max_retries=1).send(PAYLOAD)

    assert delivery == Delivery(
        "retry", "webhook rate limited (HTTP 429), retry after 1.0 s", retry_after=1.0
    )
    assert len(slack.requests) == 2
    assert_no_secret(delivery, caplog_debug)


def test_webhook_long_retry_after_not_waited(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    slack.script(Reply(429, "rate_limited", {"Retry-After": "120"}))

    delivery = webhook_channel(slack, monkeypatch, max_retry_after_seconds=30).send(PAYLOAD)

    assert delivery == Delivery(
        "retry", "webhook rate limited (HTTP 429), retry after 120.0 s", retry_after=120.0
    )
    assert len(slack.requests) == 1


def test_webhook_500_then_ok_delivered(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(500, "internal error"), Reply(200, "ok"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery.status == "delivered"
    assert len(slack.requests) == 2


def test_webhook_always_500_is_retry(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(500, "internal error"))

    delivery = webhook_channel(slack, monkeypatch, max_retries=2).send(PAYLOAD)

    assert delivery == Delivery("retry", "Slack server error (HTTP 500 internal error)")
    assert len(slack.requests) == 3
    assert_no_secret(delivery, caplog_debug)


def test_webhook_502_not_retried_in_call(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk 3.48 retries only 500 and 503 inside the call.
    slack.script(Reply(502, "bad gateway"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery("retry", "Slack server error (HTTP 502 bad gateway)")
    assert len(slack.requests) == 1


def test_webhook_404_no_service_failed(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(404, "no_service"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "HTTP 404 no_service: the webhook was revoked or deleted: create a new one and set "
        "KEYTRAIL_SLACK_WEBHOOK_URL",
    )
    assert len(slack.requests) == 1
    assert_no_secret(delivery, caplog_debug)


def test_webhook_410_failed(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(410, "team_disabled"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "HTTP 410 team_disabled: the webhook was revoked or deleted: create a new one and set "
        "KEYTRAIL_SLACK_WEBHOOK_URL",
    )
    assert len(slack.requests) == 1


def test_webhook_channel_archived_failed(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(410, "channel_is_archived"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "HTTP 410 channel_is_archived: the webhook's channel was deleted or archived: create a "
        "webhook for an active channel and set KEYTRAIL_SLACK_WEBHOOK_URL",
    )


def test_webhook_400_invalid_blocks_failed(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    slack.script(Reply(400, "invalid_blocks"))

    delivery = webhook_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "HTTP 400 invalid_blocks: Slack rejected the message; the rendered payload or the Slack "
        "template needs fixing",
    )
    assert len(slack.requests) == 1


def test_webhook_timeout_is_ambiguous_retry(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(hang=5))

    delivery = webhook_channel(slack, monkeypatch, timeout_seconds=0.5).send(PAYLOAD)

    assert delivery == Delivery(
        "retry",
        "the webhook did not answer in time after the request was sent; Slack may have posted "
        "the message",
        ambiguous=True,
    )
    assert len(slack.requests) == 1
    assert_no_secret(delivery, caplog_debug)


def test_webhook_refused_is_plain_retry(
    monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    fake = FakeSlack()
    fake.server.server_close()  # the port is now closed, so connecting is refused

    delivery = webhook_channel(fake, monkeypatch, max_retries=2).send(PAYLOAD)

    assert delivery == Delivery(
        "retry", "connecting to the webhook failed (ConnectionRefusedError)"
    )
    # slack_sdk logs the request URL when it retries; the filter must redact it.
    assert "Going to retry the same request" in caplog_debug.text
    assert_no_secret(delivery, caplog_debug)


# Bot mode


def test_bot_ok_returns_ts(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(200, json.dumps({"ok": True, "channel": CHANNEL_ID, "ts": "123.456"})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "delivered", f"posted to channel {CHANNEL_ID} as ts 123.456", remote_id="123.456"
    )
    assert len(slack.requests) == 1
    assert slack.requests[0].path == "/api/chat.postMessage"
    assert slack.requests[0].headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert slack.requests[0].body == {**PAYLOAD, "channel": CHANNEL_ID}
    assert_no_secret(delivery, caplog_debug)


def test_bot_thread_ts_sent(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(200, json.dumps({"ok": True, "ts": "124.000"})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD, thread_ts="123.456")

    assert delivery.remote_id == "124.000"
    assert slack.requests[0].body == {**PAYLOAD, "channel": CHANNEL_ID, "thread_ts": "123.456"}


def test_bot_invalid_auth_failed(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    slack.script(Reply(200, json.dumps({"ok": False, "error": "invalid_auth"})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "chat.postMessage returned invalid_auth (HTTP 200): the bot token is invalid or "
        "revoked; reinstall the Slack app and set KEYTRAIL_SLACK_BOT_TOKEN to its bot token",
    )
    assert len(slack.requests) == 1
    assert_no_secret(delivery, caplog_debug)


def test_bot_not_in_channel_failed(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(200, json.dumps({"ok": False, "error": "not_in_channel"})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed",
        "chat.postMessage returned not_in_channel (HTTP 200): the bot is not a member of "
        f"channel {CHANNEL_ID}; invite it with /invite",
    )


def test_bot_unknown_error_failed(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(200, json.dumps({"ok": False, "error": "invalid_blocks"})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery == Delivery(
        "failed", "chat.postMessage returned invalid_blocks (HTTP 200): Slack rejected the message"
    )


def test_bot_ratelimited_is_retry(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    limited = json.dumps({"ok": False, "error": "ratelimited"})
    slack.script(Reply(429, limited, {"Retry-After": "45"}))

    delivery = bot_channel(slack, monkeypatch, max_retry_after_seconds=30).send(PAYLOAD)

    assert delivery == Delivery(
        "retry",
        "chat.postMessage returned ratelimited (HTTP 429), retry after 45.0 s",
        retry_after=45.0,
    )
    assert len(slack.requests) == 1


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("token_revoked", "failed"),
        ("account_inactive", "failed"),
        ("not_authed", "failed"),
        ("channel_not_found", "failed"),
        ("is_archived", "failed"),
        ("missing_scope", "failed"),
        ("internal_error", "retry"),
        ("service_unavailable", "retry"),
    ],
)
def test_bot_error_code_status(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, code: str, status: str
) -> None:
    slack.script(Reply(200, json.dumps({"ok": False, "error": code})))

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery.status == status
    assert delivery.detail.startswith(f"chat.postMessage returned {code} (HTTP 200)")
    assert delivery.remote_id is None
    assert len(slack.requests) == 1


def test_bot_429_then_ok_retries_in_call(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    limited = json.dumps({"ok": False, "error": "ratelimited"})
    slack.script(
        Reply(429, limited, {"Retry-After": "0"}),
        Reply(200, json.dumps({"ok": True, "ts": "125.000"})),
    )

    delivery = bot_channel(slack, monkeypatch).send(PAYLOAD)

    assert delivery.status == "delivered"
    assert delivery.remote_id == "125.000"
    assert len(slack.requests) == 2


def test_bot_server_error_is_retry(slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    slack.script(Reply(503, "<html>unavailable</html>"))

    delivery = bot_channel(slack, monkeypatch, max_retries=1).send(PAYLOAD)

    assert delivery.status == "retry"
    assert delivery.ambiguous is False
    assert len(slack.requests) == 2


# Settings and secrets


def test_missing_webhook_env_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTRAIL_SLACK_WEBHOOK_URL", raising=False)

    with pytest.raises(ConfigError) as raised:
        SlackChannel(SlackSettings(mode="webhook"))

    assert str(raised.value) == (
        "environment variable KEYTRAIL_SLACK_WEBHOOK_URL is not set or empty; set it to the "
        "Slack webhook URL"
    )


def test_missing_token_file_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "slack-token"

    with pytest.raises(ConfigError) as raised:
        SlackChannel(SlackSettings(mode="bot", channel=CHANNEL_ID, token_file=missing))

    assert str(raised.value) == (
        f"cannot read the Slack bot token from secret file {missing}: No such file or "
        "directory; create the file or unset the setting to read KEYTRAIL_SLACK_BOT_TOKEN instead"
    )


def test_webhook_url_from_secret_file(
    slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KEYTRAIL_SLACK_WEBHOOK_URL", raising=False)
    secret = tmp_path / "webhook-url"
    secret.write_text(slack.webhook_url + "\n", encoding="utf-8")

    channel = SlackChannel(SlackSettings(webhook_url_file=secret, timeout_seconds=0.5))
    delivery = channel.send(PAYLOAD)

    assert delivery.status == "delivered"
    assert slack.requests[0].path == WEBHOOK_PATH


def test_non_http_webhook_url_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", "hooks.slack.com/services/hooksecretvalue42")

    with pytest.raises(ConfigError) as raised:
        SlackChannel(SlackSettings())

    assert "hooksecretvalue42" not in str(raised.value)
    assert str(raised.value) == (
        "the Slack webhook URL in KEYTRAIL_SLACK_WEBHOOK_URL is not an http(s) URL; copy it "
        "from the app's Incoming Webhooks page"
    )


def test_settings_reject_unknown_key() -> None:
    with pytest.raises(ValidationError) as raised:
        SlackSettings.model_validate({"mode": "webhook", "webhook_url": "https://example"})

    assert raised.value.errors()[0]["type"] == "extra_forbidden"


def test_settings_bot_requires_channel() -> None:
    with pytest.raises(ValidationError) as raised:
        SlackSettings(mode="bot")

    assert "slack.channel is required when slack.mode is 'bot'" in str(raised.value)


def test_settings_defaults() -> None:
    settings = SlackSettings()

    assert settings.mode == "webhook"
    assert settings.webhook_url_env == "KEYTRAIL_SLACK_WEBHOOK_URL"
    assert settings.token_env == "KEYTRAIL_SLACK_BOT_TOKEN"
    assert settings.timeout_seconds == 10
    assert settings.max_retries == 2
