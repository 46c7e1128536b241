"""SMTP email channel against real aiosmtpd servers on 127.0.0.1 (plain, STARTTLS, implicit TLS)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from pipeline.alerting.alerts import alerts_from_findings
from pipeline.alerting.channels.base import Delivery, DeliveryStatus
from pipeline.alerting.channels.email import EmailChannel, EmailSettings
from pipeline.alerting.render import Renderer
from pipeline.errors import ConfigError
from tests.alerting.conftest import travel_row
from tests.peers import SmtpPeer, start_smtp

SENDER = "keytrail@example.com"
RECIPIENTS = ["secops@example.com", "oncall@example.com"]
USERNAME = "keytrail-bot"
PASSWORD = "Zq7-never-log-this-Pa55"
PASSWORD_ENV = {"KEYTRAIL_SMTP_PASSWORD": PASSWORD}
CHANNEL_LOGGER = "pipeline.alerting.channels.email"


@dataclass
class Authenticator:
    """Accepts one login and password, records every login attempted."""

    logins: list[str] = field(default_factory=list)

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = data.login.decode()
        self.logins.append(login)
        ok = login == USERNAME and data.password.decode() == PASSWORD
        # handled=False makes aiosmtpd send its own 535 reply on failure.
        return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def start_server() -> Iterator[Callable[..., Controller]]:
    started: list[Controller] = []

    def start(handler: Any, **kwargs: Any) -> Controller:
        controller = start_smtp(handler, server_hostname="localhost", **kwargs)
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def message(make_findings: Callable[..., pd.DataFrame]) -> EmailMessage:
    alerts = alerts_from_findings(make_findings(travel_row()))
    return Renderer().render_email(
        alerts[0],
        sender=SENDER,
        recipients=RECIPIENTS,
        now=dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.UTC),
    )


def _settings(port: int, **overrides: Any) -> EmailSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "sender": SENDER,
        "recipients": RECIPIENTS,
        "timeout_seconds": 2,
    }
    values.update(overrides)
    return EmailSettings(**values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- delivery ---------------------------------------------------------------------------------


def test_plain_delivery_records_envelope(
    start_server: Callable[..., Controller], message: EmailMessage
) -> None:
    handler = SmtpPeer()
    server = start_server(handler)

    delivery = EmailChannel(_settings(server.port)).send(message)

    assert delivery == Delivery(
        "delivered",
        f"accepted by 127.0.0.1:{server.port} for 2 of 2 recipient(s)",
        remote_id=message["Message-ID"],
    )
    assert len(handler.received) == 1
    envelope = handler.received[0]
    assert envelope.mail_from == SENDER
    assert envelope.rcpt_tos == RECIPIENTS
    assert isinstance(envelope.content, bytes)
    arrived = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert arrived["Message-ID"] == message["Message-ID"]
    assert arrived["Subject"] == message["Subject"]


def test_starttls_with_auth_delivers_both_parts(
    start_server: Callable[..., Controller],
    server_tls: ssl.SSLContext,
    ca_file: Path,
    message: EmailMessage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=CHANNEL_LOGGER)
    handler = SmtpPeer()
    authenticator = Authenticator()
    server = start_server(
        handler,
        tls_context=server_tls,
        require_starttls=True,
        auth_require_tls=True,
        auth_required=True,
        authenticator=authenticator,
    )
    settings = _settings(server.port, security="starttls", username=USERNAME, ca_file=ca_file)

    delivery = EmailChannel(settings, environ=PASSWORD_ENV).send(message)

    assert delivery.status == "delivered"
    assert delivery.remote_id == message["Message-ID"]
    assert authenticator.logins == [USERNAME]
    assert len(handler.received) == 1
    content = handler.received[0].content
    assert isinstance(content, bytes)
    arrived = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(arrived, EmailMessage)
    assert arrived.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in arrived.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert arrived["X-Keytrail-Alert"] == message["X-Keytrail-Alert"]
    assert PASSWORD not in caplog.text


def test_implicit_tls_with_auth(
    start_server: Callable[..., Controller],
    server_tls: ssl.SSLContext,
    ca_file: Path,
    message: EmailMessage,
) -> None:
    handler = SmtpPeer()
    authenticator = Authenticator()
    # aiosmtpd 1.4.6 counts only STARTTLS as TLS for auth_require_tls, so AUTH over implicit
    # TLS needs that option off. The connection is still encrypted from the first byte.
    server = start_server(
        handler, ssl_context=server_tls, auth_require_tls=False, authenticator=authenticator
    )
    settings = _settings(server.port, security="tls", username=USERNAME, ca_file=ca_file)

    delivery = EmailChannel(settings, environ=PASSWORD_ENV).send(message)

    assert delivery.status == "delivered"
    assert delivery.remote_id == message["Message-ID"]
    assert authenticator.logins == [USERNAME]
    assert len(handler.received) == 1


# --- SMTP replies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status", "detail"),
    [
        (
            "421 4.3.2 Service shutting down",
            "retry",
            "deferred recipients: secops@example.com (421 4.3.2 Service shutting down)",
        ),
        (
            "451 4.7.1 Greylisted, try later",
            "retry",
            "deferred recipients: secops@example.com (451 4.7.1 Greylisted, try later), "
            "oncall@example.com (451 4.7.1 Greylisted, try later)",
        ),
        (
            "550 5.1.1 No such user",
            "failed",
            "refused recipients: secops@example.com (550 5.1.1 No such user), "
            "oncall@example.com (550 5.1.1 No such user); fix the address in "
            "email.recipients or ask the mail admin to allow relaying to it",
        ),
    ],
)
def test_rcpt_reply_classified(
    start_server: Callable[..., Controller],
    message: EmailMessage,
    reply: str,
    status: DeliveryStatus,
    detail: str,
) -> None:
    handler = SmtpPeer(rcpt_reply=reply)
    server = start_server(handler)

    delivery = EmailChannel(_settings(server.port)).send(message)

    # smtplib stops at the first recipient when the server replies 421 and closes.
    assert delivery == Delivery(status, f"127.0.0.1:{server.port} {detail}")
    assert handler.received == []


@pytest.mark.parametrize(
    ("reply", "status", "fix"),
    [
        ("421 4.3.2 Service shutting down", "retry", ""),
        ("451 4.3.0 Local error in processing", "retry", ""),
        (
            "550 5.7.1 Relaying denied",
            "failed",
            "; the server rejected the content, check its logs for the policy that matched",
        ),
        (
            "554 5.7.1 Message rejected as spam",
            "failed",
            "; the server rejected the content, check its logs for the policy that matched",
        ),
    ],
)
def test_data_reply_classified(
    start_server: Callable[..., Controller],
    message: EmailMessage,
    reply: str,
    status: DeliveryStatus,
    fix: str,
) -> None:
    server = start_server(SmtpPeer(data_reply=reply))

    delivery = EmailChannel(_settings(server.port)).send(message)

    expected = f"127.0.0.1:{server.port} rejected the message data: {reply}{fix}"
    assert delivery == Delivery(status, expected)


def test_partial_refusal_counts_as_delivered(
    start_server: Callable[..., Controller],
    message: EmailMessage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = SmtpPeer(rcpt_replies={"oncall@example.com": "550 5.1.1 No such user"})
    server = start_server(handler)

    delivery = EmailChannel(_settings(server.port)).send(message)

    detail = (
        f"accepted by 127.0.0.1:{server.port} for 1 of 2 recipient(s); refused: "
        "oncall@example.com (550 5.1.1 No such user)"
    )
    assert delivery == Delivery("delivered", detail, remote_id=message["Message-ID"])
    assert [envelope.rcpt_tos for envelope in handler.received] == [["secops@example.com"]]
    assert [record.levelname for record in caplog.records if record.name == CHANNEL_LOGGER] == [
        "ERROR"
    ]


def test_silent_server_times_out_before_data(message: EmailMessage) -> None:
    # A listening socket that is never accepted: the TCP connect succeeds in the backlog,
    # then the greeting never comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        delivery = EmailChannel(_settings(port, timeout_seconds=0.3)).send(message)

    assert delivery == Delivery(
        "retry",
        f"connection to 127.0.0.1:{port} lost before DATA (Connection unexpectedly closed: "
        "timed out)",
    )


def test_drop_after_data_is_ambiguous(
    start_server: Callable[..., Controller], message: EmailMessage
) -> None:
    server = start_server(SmtpPeer(drop_after_data=True))

    delivery = EmailChannel(_settings(server.port)).send(message)

    assert delivery.status == "retry"
    assert delivery.ambiguous is True
    assert delivery.detail.startswith(f"connection to 127.0.0.1:{server.port} lost after DATA (")
    assert delivery.detail.endswith(
        "); the server may have accepted the message, so a retry may deliver it twice"
    )


def test_timeout_after_data_is_ambiguous(
    start_server: Callable[..., Controller], message: EmailMessage
) -> None:
    server = start_server(SmtpPeer(hang_after_data=True))

    delivery = EmailChannel(_settings(server.port, timeout_seconds=0.5)).send(message)

    assert delivery == Delivery(
        "retry",
        f"connection to 127.0.0.1:{server.port} lost after DATA (Connection unexpectedly "
        "closed: timed out); the server may have accepted the message, so a retry may "
        "deliver it twice",
        ambiguous=True,
    )


def test_connection_refused_retries(message: EmailMessage) -> None:
    port = _free_port()

    delivery = EmailChannel(_settings(port)).send(message)

    assert delivery == Delivery(
        "retry", f"connection to 127.0.0.1:{port} refused; is the SMTP server running?"
    )


def test_wrong_password_fails(
    start_server: Callable[..., Controller],
    server_tls: ssl.SSLContext,
    ca_file: Path,
    message: EmailMessage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=CHANNEL_LOGGER)
    authenticator = Authenticator()
    server = start_server(
        SmtpPeer(),
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticator,
    )
    wrong = "wrong-" + PASSWORD
    settings = _settings(server.port, security="starttls", username=USERNAME, ca_file=ca_file)

    delivery = EmailChannel(settings, environ={"KEYTRAIL_SMTP_PASSWORD": wrong}).send(message)

    assert delivery == Delivery(
        "failed",
        f"127.0.0.1:{server.port} rejected login of 'keytrail-bot': 535 5.7.8 "
        "Authentication credentials invalid; check KEYTRAIL_SMTP_PASSWORD and username",
    )
    assert authenticator.logins == [USERNAME]
    assert wrong not in delivery.detail
    assert wrong not in caplog.text


def test_untrusted_certificate_fails(
    start_server: Callable[..., Controller],
    server_tls: ssl.SSLContext,
    message: EmailMessage,
    tmp_path: Path,
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    handler = SmtpPeer()
    server = start_server(handler, tls_context=server_tls, require_starttls=True)
    settings = _settings(server.port, security="starttls", ca_file=other_ca)

    delivery = EmailChannel(settings).send(message)

    assert delivery == Delivery(
        "failed",
        f"TLS certificate of 127.0.0.1:{server.port} is not trusted: unable to get local "
        "issuer certificate; set ca_file to the CA that issued it, or make host match a "
        "name in the certificate",
    )
    assert handler.received == []


def test_implicit_tls_to_plain_port_fails(
    start_server: Callable[..., Controller], ca_file: Path, message: EmailMessage
) -> None:
    server = start_server(SmtpPeer())
    settings = _settings(server.port, security="tls", ca_file=ca_file)

    delivery = EmailChannel(settings).send(message)

    assert delivery.status == "failed"
    assert delivery.detail.startswith(f"TLS with 127.0.0.1:{server.port} failed: ")
    assert delivery.detail.endswith(
        "; check that security matches the port (tls for implicit TLS on 465, starttls for "
        "587 or 25)"
    )


def test_starttls_not_offered_fails(
    start_server: Callable[..., Controller], ca_file: Path, message: EmailMessage
) -> None:
    server = start_server(SmtpPeer())
    settings = _settings(server.port, security="starttls", ca_file=ca_file)

    delivery = EmailChannel(settings).send(message)

    assert delivery == Delivery(
        "failed",
        f"127.0.0.1:{server.port}: server does not offer STARTTLS; use security: tls if the "
        "port expects implicit TLS, or a port that offers STARTTLS",
    )


def test_header_line_break_not_sent(start_server: Callable[..., Controller]) -> None:
    handler = SmtpPeer()
    server = start_server(handler)
    # The compat32 policy stores a header value as given, line breaks included.
    injected = EmailMessage(policy=email.policy.compat32)
    injected["Subject"] = "alert\r\nBcc: attacker@example.net"
    injected.set_payload("body")

    delivery = EmailChannel(_settings(server.port)).send(injected)

    assert delivery == Delivery(
        "failed",
        "header Subject contains a line break, which could inject headers; the message was "
        "not sent (build headers from one-line, cleaned values)",
    )
    assert handler.received == []


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "security", "problem"),
    [
        (
            465,
            "starttls",
            "email.security: port 465 expects implicit TLS but security is 'starttls'; set "
            "security: tls, or use port 587 with starttls",
        ),
        (
            465,
            "none",
            "email.security: port 465 expects implicit TLS but security is 'none'; set "
            "security: tls, or use port 587 with starttls",
        ),
        (
            587,
            "tls",
            "email.security: port 587 expects STARTTLS but security is 'tls'; set security: "
            "starttls, or use port 465 with tls",
        ),
    ],
)
def test_port_and_mode_mismatch(port: int, security: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EmailChannel(_settings(port, host="smtp.example.com", security=security))

    assert caught.value.problems == [problem]


def test_auth_in_clear_text_rejected() -> None:
    settings = _settings(25, host="smtp.example.com", username=USERNAME)

    with pytest.raises(ConfigError) as caught:
        EmailChannel(settings, environ=PASSWORD_ENV)

    assert caught.value.problems == [
        "email.security: a password would be sent in clear text to smtp.example.com; set "
        "security: starttls or tls, or remove username"
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_auth_in_clear_text_on_loopback_allowed(host: str) -> None:
    channel = EmailChannel(_settings(25, host=host, username=USERNAME), environ=PASSWORD_ENV)

    assert channel.settings.host == host
    assert PASSWORD not in repr(channel)


def test_missing_password_env_rejected() -> None:
    settings = _settings(587, host="smtp.example.com", security="starttls", username=USERNAME)

    with pytest.raises(ConfigError) as caught:
        EmailChannel(settings, environ={})

    assert caught.value.problems == [
        "email.password_env: environment variable KEYTRAIL_SMTP_PASSWORD is not set or empty, "
        "but username 'keytrail-bot' needs a password; set it, set password_file, or remove "
        "username"
    ]


def test_password_file_read(tmp_path: Path) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    settings = _settings(
        587, host="smtp.example.com", security="starttls", username=USERNAME, password_file=secret
    )

    channel = EmailChannel(settings, environ={})

    assert channel._password == PASSWORD


def test_missing_password_file_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    settings = _settings(
        587, host="smtp.example.com", security="starttls", username=USERNAME, password_file=missing
    )

    with pytest.raises(ConfigError) as caught:
        EmailChannel(settings, environ=PASSWORD_ENV)

    assert caught.value.problems == [
        f"email.password_file: cannot read {missing}: No such file or directory; mount the "
        "secret file or fix the path"
    ]


def test_inline_password_rejected() -> None:
    config = {
        "host": "smtp.example.com",
        "sender": SENDER,
        "recipients": RECIPIENTS,
        "password": PASSWORD,
    }

    with pytest.raises(ConfigError) as caught:
        EmailChannel.from_config(config)

    assert caught.value.problems == [
        "email: a password is not accepted in the settings; put it in the environment "
        "variable named by password_env (default KEYTRAIL_SMTP_PASSWORD) or in a file named "
        "by password_file"
    ]
    assert PASSWORD not in str(caught.value)


def test_invalid_config_keys_listed() -> None:
    config = {
        "host": "smtp.example.com",
        "security": "ssl",
        "sender": "keytrail",
        "recipients": ["ops@example.com", "x\r\nBcc: y@example.net"],
    }

    with pytest.raises(ConfigError) as caught:
        EmailChannel.from_config(config)

    assert caught.value.problems == [
        "email.security: Input should be 'starttls', 'tls' or 'none'",
        "email.sender: invalid email address 'keytrail'; expected local-part@domain",
        "email.recipients: invalid email address 'x\\r\\nBcc: y@example.net'; it contains "
        "whitespace",
    ]


def test_defaults() -> None:
    settings = EmailSettings(host="smtp.example.com", sender=SENDER, recipients=RECIPIENTS)

    assert settings.port == 587
    assert settings.security == "starttls"
    assert settings.password_env == "KEYTRAIL_SMTP_PASSWORD"
    assert settings.timeout_seconds == 15.0
    assert settings.username is None
