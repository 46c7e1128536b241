"""WebhookChannel against a real HTTP server on 127.0.0.1 that responds from a script."""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline import __version__
from pipeline.alerting.alerts import Alert, alerts_from_findings
from pipeline.alerting.channels.base import Delivery
from pipeline.alerting.channels.webhook import WebhookChannel, WebhookSettings, build_payload
from pipeline.errors import ConfigError
from tests import peers
from tests.alerting.conftest import burst_row, travel_row

URL_TOKEN = "urltokensecret77"
HOOK_PATH = f"/hooks/keytrail/{URL_TOKEN}"
HEADER_VALUE = "Bearer headertokensecret88"


@dataclass
class Reply(peers.Reply):
    """A scripted HTTP response whose body is empty unless a test sets one."""

    body: str = ""


class Receiver(peers.HttpPeer):
    """A local HTTP server that records POST requests and responds from a script.

    Replies are used in order; the last one repeats for every later request.
    """

    def __init__(self) -> None:
        super().__init__()
        self.script(Reply())

    @property
    def hook_url(self) -> str:
        return self.url(HOOK_PATH)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib sends requests through a proxy named in these variables.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
def travel_alert(make_findings: Callable[..., pd.DataFrame]) -> Alert:
    return alerts_from_findings(make_findings(travel_row()))[0]


def make_channel(
    url: str, monkeypatch: pytest.MonkeyPatch, *, header: bool = True, **overrides: Any
) -> WebhookChannel:
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_URL", url)
    options: dict[str, Any] = {"timeout_seconds": 0.5, "retry_backoff_seconds": 0.01}
    if header:
        monkeypatch.setenv("KEYTRAIL_WEBHOOK_AUTH", HEADER_VALUE)
        options["header_env"] = "KEYTRAIL_WEBHOOK_AUTH"
    options.update(overrides)
    return WebhookChannel(WebhookSettings(**options))


def assert_no_secret(delivery: Delivery, caplog: pytest.LogCaptureFixture) -> None:
    for secret in (URL_TOKEN, "headertokensecret88"):
        assert secret not in delivery.detail
        assert secret not in caplog.text


# Payload


def test_payload_travel_alert_fields(travel_alert: Alert) -> None:
    payload = build_payload(travel_alert)

    assert payload["schema_version"] == 1
    assert payload["alert_id"] == travel_alert.alert_id
    assert len(payload["alert_id"]) == 20
    assert payload["dedup_key"] == travel_alert.dedup_key
    assert payload["severity"] == "high"
    assert payload["title"] == "alice read prod/db from Berlin and New York 1.5 hours apart"
    assert payload["detector"] == "keytrail.impossible_travel"
    assert payload["principal"] == "arn:aws:sts::123456789012:assumed-role/Admin/alice"
    assert payload["who"] == "arn:aws:sts::123456789012:assumed-role/Admin/alice"
    assert payload["resources"] == [
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf"
    ]
    assert payload["source_ips"] == ["198.51.100.7", "203.0.113.9"]
    assert payload["countries"] == ["DE", "US"]
    assert payload["clouds"] == ["aws"]
    assert payload["accounts"] == ["123456789012"]
    assert payload["mitre"] == ["T1078.004"]
    assert payload["locations"] == [
        {"ip": "198.51.100.7", "city": "Berlin", "country": "DE"},
        {"ip": "203.0.113.9", "city": "New York", "country": "US"},
    ]
    assert payload["first_seen"] == "2026-10-10T01:12:00Z"
    assert payload["last_seen"] == "2026-10-10T02:42:30.250000Z"
    assert payload["event_count"] == 2


def test_payload_findings_and_steps(travel_alert: Alert) -> None:
    payload = build_payload(travel_alert)

    assert len(payload["findings"]) == 1
    finding = payload["findings"][0]
    assert finding["finding_id"] == travel_alert.findings[0]["finding_id"]
    assert finding["event_uids"] == ["ev-1", "ev-2"]
    assert finding["first_seen"] == "2026-10-10T01:12:00Z"
    assert finding["evidence"]["speed_kmh"] == 4257
    assert finding["evidence"]["from"] == {"city": "Berlin", "country": "DE", "ip": "198.51.100.7"}
    assert finding["baseline"]["summary"] == "30-day: read only from DE"
    assert payload["next_steps"] == [
        {"text": step.text, "commands": list(step.commands)} for step in travel_alert.next_steps
    ]
    assert len(payload["next_steps"]) >= 1


def test_payload_is_json_and_stable(travel_alert: Alert) -> None:
    first = json.dumps(build_payload(travel_alert), sort_keys=True)
    second = json.dumps(build_payload(travel_alert), sort_keys=True)

    assert first == second
    assert json.loads(first)["schema_version"] == 1


def test_payload_burst_without_principal(make_findings: Callable[..., pd.DataFrame]) -> None:
    alert = alerts_from_findings(make_findings(burst_row(), detector="burst"))[0]

    payload = build_payload(alert)

    assert payload["principal"] == ""
    assert payload["who"] == "3 principals from 203.0.113.66"
    assert payload["principals"] == ["mi-batch", "mi-web", "svc-reports"]
    assert payload["locations"] == [{"ip": "203.0.113.66", "city": "Amsterdam", "country": "NL"}]
    assert payload["event_count"] == 12


# Delivered


@pytest.mark.parametrize("status", [200, 201, 204])
def test_send_2xx_delivered(
    status: int,
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    body = "" if status == 204 else "accepted"
    receiver.script(Reply(status, body))
    payload = build_payload(travel_alert)

    delivery = make_channel(receiver.hook_url, monkeypatch).send(payload)

    excerpt = "" if status == 204 else " accepted"
    assert delivery == Delivery("delivered", f"webhook accepted the alert (HTTP {status}{excerpt})")
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.method == "POST"
    assert request.path == HOOK_PATH
    assert request.body == json.loads(json.dumps(payload))
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"keytrail/{__version__}"
    assert request.headers["Idempotency-Key"] == travel_alert.alert_id
    assert request.headers["Authorization"] == HEADER_VALUE
    assert_no_secret(delivery, caplog_debug)


def test_send_without_header_setting(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery = make_channel(receiver.hook_url, monkeypatch, header=False).send(
        build_payload(travel_alert)
    )

    assert delivery.status == "delivered"
    assert "Authorization" not in receiver.requests[0].headers


def test_send_custom_header_name_from_file(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("tokenfromfile99\n", encoding="utf-8")

    channel = make_channel(
        receiver.hook_url,
        monkeypatch,
        header=False,
        header_name="X-Api-Key",
        header_file=secret_file,
    )
    delivery = channel.send(build_payload(travel_alert))

    assert delivery.status == "delivered"
    assert receiver.requests[0].headers["X-Api-Key"] == "tokenfromfile99"


def test_send_url_from_file(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(receiver.hook_url + "\n", encoding="utf-8")
    monkeypatch.delenv("KEYTRAIL_WEBHOOK_URL", raising=False)

    channel = WebhookChannel(WebhookSettings(url_file=url_file, timeout_seconds=0.5))
    delivery = channel.send(build_payload(travel_alert))

    assert delivery.status == "delivered"
    assert receiver.requests[0].path == HOOK_PATH


# Retry


def test_send_429_then_ok_retries_in_call(
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(429, "slow down", {"Retry-After": "0.2"}), Reply(200, "ok"))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery == Delivery("delivered", "webhook accepted the alert (HTTP 200 ok)")
    assert len(receiver.requests) == 2
    keys = [request.headers["Idempotency-Key"] for request in receiver.requests]
    assert keys == [travel_alert.alert_id, travel_alert.alert_id]
    assert "will be retried in 0.20 s" in caplog_debug.text
    assert_no_secret(delivery, caplog_debug)


def test_send_429_long_wait_returns_to_outbox(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.script(Reply(429, "", {"Retry-After": "120"}))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery == Delivery(
        "retry", "webhook rate limited (HTTP 429), retry after 120 s", retry_after=120.0
    )
    assert len(receiver.requests) == 1


def test_send_always_503_exhausts_retries(
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(503, "maintenance"))

    delivery = make_channel(receiver.hook_url, monkeypatch, max_retries=2).send(
        build_payload(travel_alert)
    )

    assert delivery == Delivery("retry", "webhook server error or timeout (HTTP 503 maintenance)")
    assert len(receiver.requests) == 3
    assert "webhook alert" in caplog_debug.text
    assert_no_secret(delivery, caplog_debug)


def test_send_503_no_retries_configured(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.script(Reply(503, ""))

    delivery = make_channel(receiver.hook_url, monkeypatch, max_retries=0).send(
        build_payload(travel_alert)
    )

    assert delivery == Delivery("retry", "webhook server error or timeout (HTTP 503)")
    assert len(receiver.requests) == 1


def test_send_hang_is_ambiguous_retry(
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(hang=5))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery == Delivery(
        "retry",
        "the webhook did not respond in time after the request was sent; the receiver may have "
        "accepted the alert",
        ambiguous=True,
    )
    # Not retried in the call: the receiver may already have the alert.
    assert len(receiver.requests) == 1
    assert_no_secret(delivery, caplog_debug)


def test_send_refused_port_retries(
    travel_alert: Alert, monkeypatch: pytest.MonkeyPatch, caplog_debug: pytest.LogCaptureFixture
) -> None:
    # Bind a port and close it, so nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}{HOOK_PATH}"

    delivery = make_channel(url, monkeypatch, max_retries=1).send(build_payload(travel_alert))

    assert delivery == Delivery(
        "retry", "connecting to the webhook failed (ConnectionRefusedError)"
    )
    assert caplog_debug.text.count("will be retried in") == 1
    assert_no_secret(delivery, caplog_debug)


# Failed


@pytest.mark.parametrize(
    ("status", "fix"),
    [
        (
            401,
            "the receiver rejected the credentials; check the Authorization header value in "
            "KEYTRAIL_WEBHOOK_AUTH",
        ),
        (
            403,
            "the receiver rejected the credentials; check the Authorization header value in "
            "KEYTRAIL_WEBHOOK_AUTH",
        ),
        (404, "the endpoint is gone; set KEYTRAIL_WEBHOOK_URL to the receiver's current URL"),
        (410, "the endpoint is gone; set KEYTRAIL_WEBHOOK_URL to the receiver's current URL"),
        (405, "the endpoint does not accept POST; check the URL in KEYTRAIL_WEBHOOK_URL"),
        (
            413,
            "the payload is too large for the receiver; raise its body size limit or group "
            "fewer findings per alert",
        ),
        (400, "the receiver rejected the document; check it accepts schema_version 1"),
        (422, "the receiver rejected the document; check it accepts schema_version 1"),
    ],
)
def test_send_4xx_failed_with_fix(
    status: int,
    fix: str,
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(status, "nope"))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery == Delivery("failed", f"HTTP {status} nope: {fix}")
    assert len(receiver.requests) == 1
    assert_no_secret(delivery, caplog_debug)


def test_send_401_without_header_names_setting(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.script(Reply(401, ""))

    delivery = make_channel(receiver.hook_url, monkeypatch, header=False).send(
        build_payload(travel_alert)
    )

    assert delivery == Delivery(
        "failed",
        "HTTP 401: the receiver rejected the credentials; set webhook.header_env to a variable "
        "that contains the Authorization header value",
    )


def test_send_redirect_not_followed(
    receiver: Receiver, travel_alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.script(Reply(302, "", {"Location": "http://127.0.0.1:9/elsewhere"}))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery == Delivery(
        "failed", "HTTP 302: the endpoint redirects; set KEYTRAIL_WEBHOOK_URL to the final URL"
    )
    assert len(receiver.requests) == 1


def test_send_body_echoing_token_redacted(
    receiver: Receiver,
    travel_alert: Alert,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver.script(Reply(400, f"bad request to {HOOK_PATH} with {HEADER_VALUE}"))

    delivery = make_channel(receiver.hook_url, monkeypatch).send(build_payload(travel_alert))

    assert delivery.status == "failed"
    assert delivery.detail.startswith("HTTP 400 bad request to [redacted] with [redacted]:")
    assert_no_secret(delivery, caplog_debug)


# Settings and secrets


def test_settings_reject_unknown_key() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        WebhookSettings.model_validate({"url": "https://example.com/hook"})


def test_settings_reject_bad_header_name() -> None:
    with pytest.raises(ValidationError, match="is not a valid HTTP header name"):
        WebhookSettings(header_name="Bad Header:")


def test_settings_reject_ca_file_without_verify(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match=re.escape("webhook.ca_file is set but webhook.verify_tls")
    ):
        WebhookSettings(verify_tls=False, ca_file=tmp_path / "ca.pem")


def test_settings_defaults() -> None:
    settings = WebhookSettings()

    assert settings.url_env == "KEYTRAIL_WEBHOOK_URL"
    assert settings.timeout_seconds == 10
    assert settings.max_retries == 2
    assert settings.verify_tls is True
    assert settings.header_env is None


def test_missing_url_env_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTRAIL_WEBHOOK_URL", raising=False)

    with pytest.raises(ConfigError, match="environment variable KEYTRAIL_WEBHOOK_URL is not set"):
        WebhookChannel(WebhookSettings())


def test_missing_header_env_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_URL", "https://example.com/hook")
    monkeypatch.delenv("KEYTRAIL_WEBHOOK_AUTH", raising=False)

    with pytest.raises(ConfigError, match="KEYTRAIL_WEBHOOK_AUTH is not set or empty"):
        WebhookChannel(WebhookSettings(header_env="KEYTRAIL_WEBHOOK_AUTH"))


def test_missing_url_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent"

    with pytest.raises(ConfigError, match="cannot read the webhook URL from secret file"):
        WebhookChannel(WebhookSettings(url_file=missing))


def test_non_http_url_is_config_error_without_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_URL", f"ftp://127.0.0.1/{URL_TOKEN}")

    with pytest.raises(ConfigError) as raised:
        WebhookChannel(WebhookSettings())

    assert "is not an http(s) URL" in str(raised.value)
    assert URL_TOKEN not in str(raised.value)


def test_bad_ca_file_is_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_URL", "https://example.com/hook")

    with pytest.raises(ConfigError, match=re.escape("cannot load webhook.ca_file")):
        WebhookChannel(WebhookSettings(ca_file=tmp_path / "absent.pem"))


def test_header_value_line_break_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_URL", "https://example.com/hook")
    monkeypatch.setenv("KEYTRAIL_WEBHOOK_AUTH", "Bearer abc\nX-Injected: 1")

    with pytest.raises(ConfigError) as raised:
        WebhookChannel(WebhookSettings(header_env="KEYTRAIL_WEBHOOK_AUTH"))

    assert "header value in KEYTRAIL_WEBHOOK_AUTH is invalid" in str(raised.value)
    assert "X-Injected" not in str(raised.value)
