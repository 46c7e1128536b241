"""Receivers from KEYTRAIL_SLACK_* and KEYTRAIL_SMTP_* variables, and receiver file paths."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.delivery import (
    FILE_RECEIVER,
    AlertingSettings,
    log_env_receivers,
    receivers_from_env,
    with_env_receivers,
)
from pipeline.cli import EXIT_CONFIG, main
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.errors import ConfigError
from tests.peers import HttpPeer, SmtpPeer, smtp_server
from tests.test_delivery_cases import one_read
from tests.test_engine import NOW

CANARY = "kt-env-canary-4b8d2e"
SMTP_ENV = {
    "KEYTRAIL_SMTP_HOST": "127.0.0.1",
    "KEYTRAIL_SMTP_FROM": "keytrail@example.com",
    "KEYTRAIL_SMTP_TO": "secops@example.com, oncall@example.com",
}


@pytest.fixture
def hook() -> Iterator[HttpPeer]:
    with HttpPeer() as peer:
        yield peer


@pytest.fixture
def hook_url(hook: HttpPeer) -> str:
    return hook.url(f"/hook/{CANARY}")


@pytest.fixture
def smtp_peer() -> Iterator[tuple[SmtpPeer, int]]:
    with smtp_server() as (handler, port):
        yield handler, port


def config_data(**alerting: Any) -> dict[str, Any]:
    return {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"tests.every_read": {}},
        "alerting": {"console": False, **alerting},
    }


def env_settings(tmp_path: Path, environ: dict[str, str], **alerting: Any) -> Settings:
    return settings_from_mapping(config_data(**alerting), base_dir=tmp_path, environ=environ)


def config_error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        receivers_from_env(environ)
    return caught.value


# --- receivers_from_env ------------------------------------------------------------------------


def test_no_variables_no_receivers() -> None:
    assert receivers_from_env({}) == {}


def test_empty_variables_count_as_unset() -> None:
    assert receivers_from_env({"KEYTRAIL_SLACK_WEBHOOK_URL": "", "KEYTRAIL_SMTP_HOST": " "}) == {}


def test_webhook_url_gives_webhook_slack() -> None:
    receivers = receivers_from_env({"KEYTRAIL_SLACK_WEBHOOK_URL": "https://hooks.example.com/x"})

    assert list(receivers) == ["slack"]
    slack = receivers["slack"].slack
    assert slack is not None
    assert slack.mode == "webhook"
    assert slack.webhook_url_env == "KEYTRAIL_SLACK_WEBHOOK_URL"
    assert receivers["slack"].channels() == ["slack"]


def test_token_and_channel_give_bot_slack() -> None:
    receivers = receivers_from_env(
        {"KEYTRAIL_SLACK_BOT_TOKEN": "xoxb-1-2-3", "KEYTRAIL_SLACK_CHANNEL": "C0123ABCD"}
    )

    slack = receivers["slack"].slack
    assert slack is not None
    assert slack.mode == "bot"
    assert slack.channel == "C0123ABCD"
    assert slack.token_env == "KEYTRAIL_SLACK_BOT_TOKEN"


def test_webhook_url_wins_over_bot_token() -> None:
    receivers = receivers_from_env(
        {
            "KEYTRAIL_SLACK_WEBHOOK_URL": "https://hooks.example.com/x",
            "KEYTRAIL_SLACK_BOT_TOKEN": "xoxb-1-2-3",
        }
    )

    slack = receivers["slack"].slack
    assert slack is not None
    assert slack.mode == "webhook"


def test_token_without_channel_rejected() -> None:
    error = config_error({"KEYTRAIL_SLACK_BOT_TOKEN": f"xoxb-{CANARY}"})

    assert error.problems == [
        "KEYTRAIL_SLACK_CHANNEL: missing; KEYTRAIL_SLACK_BOT_TOKEN is set, and bot mode needs "
        "the id of the channel to post to (C0123ABCD)"
    ]
    assert CANARY not in str(error)


def test_channel_without_token_rejected() -> None:
    error = config_error({"KEYTRAIL_SLACK_CHANNEL": "C0123ABCD"})

    assert error.problems == [
        "KEYTRAIL_SLACK_BOT_TOKEN: missing; KEYTRAIL_SLACK_CHANNEL is set, and bot mode needs "
        "both (or set KEYTRAIL_SLACK_WEBHOOK_URL for webhook mode)"
    ]


def test_invalid_webhook_url_rejected() -> None:
    error = config_error({"KEYTRAIL_SLACK_WEBHOOK_URL": f"hooks.slack.com/{CANARY}"})

    assert error.problems == [
        "KEYTRAIL_SLACK_WEBHOOK_URL: invalid URL; expected the https:// URL of a Slack "
        "incoming webhook"
    ]
    assert CANARY not in str(error)
    assert str(error).startswith("environment: ")


def test_smtp_defaults() -> None:
    receivers = receivers_from_env(SMTP_ENV)

    assert list(receivers) == ["email"]
    email = receivers["email"].email
    assert email is not None
    assert email.host == "127.0.0.1"
    assert email.port == 587
    assert email.security == "starttls"
    assert email.username is None
    assert email.password_env == "KEYTRAIL_SMTP_PASSWORD"
    assert email.sender == "keytrail@example.com"
    assert email.recipients == ["secops@example.com", "oncall@example.com"]


def test_smtp_all_variables() -> None:
    environ = {
        **SMTP_ENV,
        "KEYTRAIL_SMTP_PORT": "465",
        "KEYTRAIL_SMTP_SECURITY": "tls",
        "KEYTRAIL_SMTP_USERNAME": "keytrail",
        "KEYTRAIL_SMTP_PASSWORD": CANARY,
    }
    email = receivers_from_env(environ)["email"].email

    assert email is not None
    assert email.port == 465
    assert email.security == "tls"
    assert email.username == "keytrail"
    assert CANARY not in repr(email)


def test_slack_and_smtp_together() -> None:
    environ = {**SMTP_ENV, "KEYTRAIL_SLACK_WEBHOOK_URL": "https://hooks.example.com/x"}

    assert list(receivers_from_env(environ)) == ["slack", "email"]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("KEYTRAIL_SMTP_PORT", "smtp", "invalid port; expected an integer from 1 to 65535"),
        ("KEYTRAIL_SMTP_PORT", "70000", "invalid port; expected an integer from 1 to 65535"),
        ("KEYTRAIL_SMTP_SECURITY", "ssl", "invalid value; expected starttls, tls or none"),
        ("KEYTRAIL_SMTP_FROM", "keytrail", "invalid email address; expected local-part@domain"),
        ("KEYTRAIL_SMTP_TO", "a@example.com, b", "invalid; expected comma-separated addresses"),
        ("KEYTRAIL_SMTP_TO", " , ", "missing; required when KEYTRAIL_SMTP_HOST is set"),
    ],
)
def test_invalid_smtp_variable_rejected(name: str, value: str, problem: str) -> None:
    error = config_error({**SMTP_ENV, name: value})

    assert len(error.problems) == 1
    assert error.problems[0].startswith(f"{name}: {problem}")
    if value.strip(" ,"):
        assert value.strip(" ,") not in str(error)


def test_missing_smtp_from_rejected() -> None:
    environ = {"KEYTRAIL_SMTP_HOST": "mail.example.com", "KEYTRAIL_SMTP_TO": "a@example.com"}

    assert config_error(environ).problems == [
        "KEYTRAIL_SMTP_FROM: missing; required when KEYTRAIL_SMTP_HOST is set"
    ]


def test_username_without_password_rejected() -> None:
    error = config_error({**SMTP_ENV, "KEYTRAIL_SMTP_USERNAME": "keytrail"})

    assert error.problems == [
        "KEYTRAIL_SMTP_PASSWORD: missing; KEYTRAIL_SMTP_USERNAME is set, so the SMTP login "
        "needs a password"
    ]


def test_smtp_variables_without_host_rejected() -> None:
    environ = {"KEYTRAIL_SMTP_FROM": "k@example.com", "KEYTRAIL_SMTP_TO": "a@example.com"}

    assert config_error(environ).problems == [
        "KEYTRAIL_SMTP_HOST: missing; set it to send email, or unset KEYTRAIL_SMTP_FROM, "
        "KEYTRAIL_SMTP_TO"
    ]


def test_slack_and_smtp_problems_reported_together() -> None:
    environ = {"KEYTRAIL_SLACK_CHANNEL": "C0123ABCD", "KEYTRAIL_SMTP_TO": "a@example.com"}

    problems = config_error(environ).problems

    assert len(problems) == 2
    assert problems[0].startswith("KEYTRAIL_SLACK_BOT_TOKEN: missing")
    assert problems[1].startswith("KEYTRAIL_SMTP_HOST: missing")


# --- with_env_receivers and config loading -----------------------------------------------------


def test_no_variables_settings_unchanged() -> None:
    settings = AlertingSettings()

    assert with_env_receivers(settings, {}) is settings


def test_env_receivers_routed_with_file_receiver(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {**SMTP_ENV, "KEYTRAIL_SLACK_WEBHOOK_URL": f"https://hooks.example.com/{CANARY}"}
    with caplog.at_level(logging.INFO, logger="pipeline.alerting.delivery"):
        settings = env_settings(tmp_path, environ)
        logged_while_loading = [record.getMessage() for record in caplog.records]
        log_env_receivers(settings.alerting)

    assert logged_while_loading == []
    alerting = settings.alerting
    assert alerting.receiver_names() == ["email", FILE_RECEIVER, "slack"]
    routes = [(item.receiver, item.continue_, item.match) for item in alerting.routing.routes]
    assert routes == [("slack", True, {}), ("email", True, {}), (FILE_RECEIVER, False, {})]
    assert alerting.routing.default_receiver == FILE_RECEIVER
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["receivers from environment variables: slack, email"]
    assert CANARY not in caplog.text


def test_config_receivers_ignore_variables(tmp_path: Path) -> None:
    receivers: dict[str, Any] = {"team": {"file": {}}}
    routing = {"default_receiver": "team"}
    environ = {"KEYTRAIL_SLACK_BOT_TOKEN": "xoxb-1"}  # invalid alone, but not read

    settings = env_settings(tmp_path, environ, receivers=receivers, routing=routing)

    assert settings.alerting.receiver_names() == [FILE_RECEIVER, "team"]
    assert settings.alerting.routing.routes == []


def test_configured_routes_kept_after_env_routes(tmp_path: Path) -> None:
    routing = {
        "default_receiver": FILE_RECEIVER,
        "group_by": ["detector"],
        "routes": [{"match": {"severity": "high"}, "receiver": FILE_RECEIVER, "group_by": []}],
    }
    environ = {"KEYTRAIL_SLACK_WEBHOOK_URL": "https://hooks.example.com/x"}

    routes = env_settings(tmp_path, environ, routing=routing).alerting.routing.routes

    assert [item.receiver for item in routes] == ["slack", FILE_RECEIVER, FILE_RECEIVER]
    assert routes[0].group_by is None
    assert routes[1].group_by == []
    assert routes[1].match == {"severity": "high"}
    assert routes[2].match == {}


def test_run_delivers_to_env_and_files(
    tmp_path: Path, hook: HttpPeer, hook_url: str, smtp_peer: tuple[SmtpPeer, int]
) -> None:
    one_read(tmp_path)
    smtp, port = smtp_peer
    environ = {
        **SMTP_ENV,
        "KEYTRAIL_SMTP_PORT": str(port),
        "KEYTRAIL_SMTP_SECURITY": "none",
        "KEYTRAIL_SLACK_WEBHOOK_URL": hook_url,
    }
    settings = env_settings(tmp_path, environ)
    # The Slack channel reads the URL from the process environment when it sends.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", hook_url)
        summary = run_once(settings, now=NOW)

    receivers = summary.delivery["receivers"]
    assert receivers["slack"]["sent"] == 1
    assert receivers["email"]["sent"] == 1
    assert receivers[FILE_RECEIVER]["sent"] == 1
    assert len(hook.bodies) == 1
    assert "prod/db-1" in str(hook.bodies[0])
    assert len(smtp.raw) == 1
    assert b"secops@example.com" in smtp.raw[0]
    outbox = tmp_path / "out" / "outbox"
    assert len(list(outbox.glob("*.slack.json"))) == 1
    assert len(list(outbox.glob("*.eml"))) == 1
    assert summary.exit_code() == 0


def test_run_without_variables_writes_files_only(tmp_path: Path) -> None:
    one_read(tmp_path)
    summary = run_once(env_settings(tmp_path, {}), now=NOW)

    assert list(summary.delivery["receivers"]) == [FILE_RECEIVER]
    assert summary.delivery["receivers"][FILE_RECEIVER]["sent"] == 1


def test_cli_invalid_variable_exits_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    one_read(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        "state_dir: state\noutput_dir: out\nsources: []\ndetectors: {}\n", encoding="utf-8"
    )
    monkeypatch.setenv("KEYTRAIL_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("KEYTRAIL_SMTP_FROM", "keytrail@example.com")
    monkeypatch.setenv("KEYTRAIL_SMTP_TO", "secops@example.com")
    monkeypatch.setenv("KEYTRAIL_SMTP_PORT", CANARY)

    result = CliRunner().invoke(main, ["run", "--config", str(config)])

    assert result.exit_code == EXIT_CONFIG
    assert "KEYTRAIL_SMTP_PORT: invalid port; expected an integer from 1 to 65535" in (
        result.stderr
    )
    assert CANARY not in result.stderr
    assert CANARY not in result.stdout


PORT_ENV = "KEYTRAIL_SMTP_PORT"
SECURITY_ENV = "KEYTRAIL_SMTP_SECURITY"
BOTH = f"{PORT_ENV}, {SECURITY_ENV}"
TLS_FIX = f"set {SECURITY_ENV}=tls, or {PORT_ENV}=587 with {SECURITY_ENV}=starttls"
STARTTLS_FIX = f"set {SECURITY_ENV}=starttls, or {PORT_ENV}=465 with {SECURITY_ENV}=tls"


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        (
            {PORT_ENV: "465"},
            f"{BOTH}: port 465 expects implicit TLS but security is 'starttls' "
            f"({SECURITY_ENV} is unset and defaults to starttls); {TLS_FIX}",
        ),
        (
            {PORT_ENV: "465", SECURITY_ENV: "none"},
            f"{BOTH}: port 465 expects implicit TLS but security is 'none'; {TLS_FIX}",
        ),
        (
            {SECURITY_ENV: "tls"},
            f"{BOTH}: port 587 expects STARTTLS but security is 'tls' "
            f"({PORT_ENV} is unset and defaults to 587); {STARTTLS_FIX}",
        ),
        (
            {PORT_ENV: "25", SECURITY_ENV: "tls"},
            f"{BOTH}: port 25 expects STARTTLS but security is 'tls'; {STARTTLS_FIX}",
        ),
    ],
)
def test_smtp_port_security_mismatch_rejected(variables: dict[str, str], problem: str) -> None:
    assert config_error({**SMTP_ENV, **variables}).problems == [problem]


@pytest.mark.parametrize(
    ("port", "security"), [("465", "tls"), ("587", "starttls"), ("25", "none"), ("2525", "tls")]
)
def test_smtp_port_security_match_accepted(port: str, security: str) -> None:
    receivers = receivers_from_env({**SMTP_ENV, PORT_ENV: port, SECURITY_ENV: security})

    email = receivers["email"].email
    assert email is not None
    assert (email.port, email.security) == (int(port), security)


def write_empty_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        "state_dir: state\noutput_dir: out\nsources: []\ndetectors: {}\n", encoding="utf-8"
    )
    return config


@pytest.mark.parametrize("command", ["validate-config", "run"])
def test_cli_port_mismatch_exits_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from click.testing import CliRunner

    config = write_empty_config(tmp_path)
    for name, value in {**SMTP_ENV, PORT_ENV: "465"}.items():
        monkeypatch.setenv(name, value)

    result = CliRunner().invoke(main, [command, "--config", str(config)])

    assert result.exit_code == EXIT_CONFIG
    assert f"{BOTH}: port 465 expects implicit TLS but security is 'starttls'" in result.stderr
    assert not (tmp_path / "state").exists()


def test_cli_run_logs_env_receivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    config = write_empty_config(tmp_path)
    (tmp_path / "logs").mkdir()
    monkeypatch.setenv("KEYTRAIL_SLACK_WEBHOOK_URL", f"https://hooks.example.com/{CANARY}")

    result = CliRunner().invoke(
        main, ["run", "--config", str(config), "--source", str(tmp_path / "logs")]
    )

    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "environment variables" in line]
    assert len(lines) == 1
    assert lines[0].endswith("receivers from environment variables: slack")
    assert CANARY not in result.stderr


# --- receiver file paths -----------------------------------------------------------------------


def test_relative_secret_paths_resolved(tmp_path: Path) -> None:
    receivers = {
        "chat": {"slack": {"webhook_url_file": "secrets/hook", "token_file": "~/token"}},
        "mail": {
            "email": {
                "host": "mail.example.com",
                "sender": "k@example.com",
                "recipients": ["a@example.com"],
                "password_file": "secrets/smtp",
                "ca_file": "/etc/ca.pem",
            }
        },
        "hook": {"webhook": {"url_file": "u", "header_file": "../h", "ca_file": "certs/ca.pem"}},
    }
    routing = {"default_receiver": "chat"}

    alerting = env_settings(tmp_path, {}, receivers=receivers, routing=routing).alerting

    slack = alerting.receivers["chat"].slack
    email = alerting.receivers["mail"].email
    hook = alerting.receivers["hook"].webhook
    assert slack is not None
    assert email is not None
    assert hook is not None
    assert slack.webhook_url_file == tmp_path / "secrets/hook"
    assert slack.token_file == Path.home() / "token"
    assert email.password_file == tmp_path / "secrets/smtp"
    assert email.ca_file == Path("/etc/ca.pem")
    assert hook.url_file == tmp_path / "u"
    assert hook.header_file == tmp_path / "../h"
    assert hook.ca_file == tmp_path / "certs/ca.pem"


def test_unset_secret_paths_stay_unset(tmp_path: Path) -> None:
    receivers: dict[str, Any] = {"chat": {"slack": {}}}

    alerting = env_settings(
        tmp_path, {}, receivers=receivers, routing={"default_receiver": "chat"}
    ).alerting

    slack = alerting.receivers["chat"].slack
    assert slack is not None
    assert slack.webhook_url_file is None
    assert slack.token_file is None


def test_relative_url_file_delivers(
    tmp_path: Path, hook: HttpPeer, hook_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_read(tmp_path)
    (tmp_path / "hook-url").write_text(hook_url + "\n", encoding="utf-8")
    receivers = {"chat": {"slack": {"webhook_url_file": "hook-url", "max_retries": 0}}}
    settings = env_settings(tmp_path, {}, receivers=receivers, routing={"default_receiver": "chat"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    summary = run_once(settings, now=NOW)

    assert summary.delivery["receivers"]["chat"]["sent"] == 1
    assert len(hook.bodies) == 1
