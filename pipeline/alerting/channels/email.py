"""Send a rendered alert email through an SMTP server with the standard library's smtplib.

One call to :meth:`EmailChannel.send` opens one connection, upgrades it to TLS (implicit TLS
or STARTTLS, with certificate checks on by default), logs in when a username is configured,
sends the message and closes the connection. Every failure becomes a :class:`Delivery`:

* ``retry`` for what may go away by itself: SMTP 4xx replies, refused connections,
  timeouts and dropped connections. A connection lost after the DATA command is marked
  ``ambiguous`` because the server may already have queued the message.
* ``failed`` for what needs a person: SMTP 5xx replies, rejected credentials, TLS
  certificate and protocol errors, a server without STARTTLS or AUTH.

The password comes only from an environment variable or a secret file. It is never part of
the settings, a log line, a ``Delivery.detail`` or an exception message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.alerting.channels.base import Delivery
from pipeline.errors import ConfigError

__all__ = [
    "DEFAULT_PASSWORD_ENV",
    "EmailChannel",
    "EmailSettings",
    "port_security_mismatch",
    "port_security_problem",
]

logger = logging.getLogger(__name__)

DEFAULT_PASSWORD_ENV: Final = "KEYTRAIL_SMTP_PASSWORD"
IMPLICIT_TLS_PORT: Final = 465
SUBMISSION_PORT: Final = 587
RELAY_PORT: Final = 25

SmtpSecurity = Literal["starttls", "tls", "none"]


class EmailSettings(BaseModel):
    """Settings of the SMTP email channel.

    Attributes:
        host: SMTP server name or address; with TLS it must match the server certificate.
        port: SMTP server port: usually 587 for ``starttls``, 465 for ``tls``.
        security: ``starttls`` (a plain connection upgraded with STARTTLS), ``tls`` (implicit
            TLS from the first byte) or ``none`` (no encryption). Use ``none`` only for a
            relay on the same host or a trusted network.
        username: login name for SMTP AUTH; no login when empty.
        password_env: environment variable that contains the password.
        password_file: file whose content is the password (for example a Kubernetes or
            Docker secret); takes precedence over ``password_env``.
        ca_file: PEM file of the certificate authorities to trust instead of the system
            ones, for a server with a certificate from a private CA.
        timeout_seconds: timeout of each network operation (connect, each reply), in seconds.
        sender: envelope sender (MAIL FROM) address.
        recipients: envelope recipient (RCPT TO) addresses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(default=SUBMISSION_PORT, ge=1, le=65535)
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password_env: str = Field(default=DEFAULT_PASSWORD_ENV, min_length=1)
    password_file: Path | None = None
    ca_file: Path | None = None
    timeout_seconds: float = Field(default=15.0, gt=0, le=600)
    sender: str
    recipients: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _reject_inline_password(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "password" in data:
            raise ValueError(
                "a password is not accepted in the settings; put it in the environment "
                f"variable named by password_env (default {DEFAULT_PASSWORD_ENV}) or in "
                "a file named by password_file"
            )
        return data

    @field_validator("host", "username")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and _has_control_characters(value):
            raise ValueError("must not contain line breaks or control characters")
        return value

    @field_validator("sender")
    @classmethod
    def _valid_sender(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("recipients")
    @classmethod
    def _valid_recipients(cls, value: list[str]) -> list[str]:
        return [_check_address(address) for address in value]


def _has_control_characters(text: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


def _check_address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"invalid email address {address!r}; expected local-part@domain")
    if _has_control_characters(address) or any(char.isspace() for char in address):
        raise ValueError(f"invalid email address {address!r}; it contains whitespace")
    if "<" in address or ">" in address:
        raise ValueError(f"invalid email address {address!r}; give the bare address")
    return address


def _is_loopback(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TrackedSMTP(smtplib.SMTP):
    """An SMTP client that records whether the DATA command was sent."""

    data_sent = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_sent = True
        return super().data(msg)


class _TrackedSMTPSSL(smtplib.SMTP_SSL):
    """An implicit-TLS SMTP client that records whether the DATA command was sent."""

    data_sent = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_sent = True
        return super().data(msg)


class EmailChannel:
    """Delivers rendered alert emails through one SMTP server.

    Args:
        settings: the channel settings.
        environ: where ``password_env`` is looked up; defaults to ``os.environ``.

    Raises:
        ConfigError: when the port and security mode disagree, when a password would be
            sent without encryption to a host other than loopback, or when the password
            is configured but cannot be read. All problems are listed at once.
    """

    id: Final = "email"

    def __init__(self, settings: EmailSettings, *, environ: Mapping[str, str] | None = None):
        self.settings = settings
        problems = _settings_problems(settings)
        password: str | None = None
        if settings.username:
            password, problem = _read_password(settings, os.environ if environ is None else environ)
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        self._password = password
        self._ssl_context = self._make_ssl_context() if settings.security != "none" else None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, environ: Mapping[str, str] | None = None
    ) -> EmailChannel:
        """Validate a mapping from the config file and build the channel.

        Raises:
            ConfigError: one line per invalid key, with the ``email.`` key path.
        """
        try:
            settings = EmailSettings.model_validate(config)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                path = ".".join(str(part) for part in ("email", *error["loc"]))
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{path}: {message}")
            raise ConfigError(problems) from None
        return cls(settings, environ=environ)

    def __repr__(self) -> str:
        settings = self.settings
        return (
            f"EmailChannel(host={settings.host!r}, port={settings.port}, "
            f"security={settings.security!r}, username={settings.username!r})"
        )

    def _make_ssl_context(self) -> ssl.SSLContext:
        ca_file = self.settings.ca_file
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"email.ca_file: cannot load CA certificates from {ca_file}: {exc}; "
                "give a readable PEM file"
            ) from None

    def send(self, message: EmailMessage) -> Delivery:
        """Send ``message`` to the configured recipients and classify the outcome.

        Every exception raised while connecting or during the SMTP dialogue becomes a
        ``retry`` or ``failed`` result whose detail names the cause and the fix.
        """
        message_id = str(message.get("Message-ID", "")).strip() or None
        header_problem = _header_problem(message)
        if header_problem:
            logger.error("email %s not sent: %s", message_id, header_problem)
            return Delivery("failed", header_problem)

        client: _TrackedSMTP | _TrackedSMTPSSL | None = None
        try:
            client = self._connect()
            refused = self._send_on(client, message)
        except Exception as exc:
            data_sent = client is not None and client.data_sent
            delivery = self._classify(exc, data_sent=data_sent)
            log = logger.warning if delivery.status == "retry" else logger.error
            log("email %s to %s: %s", message_id, self._server, delivery.detail)
            return delivery
        finally:
            if client is not None:
                _close_quietly(client)

        total = len(self.settings.recipients)
        detail = f"accepted by {self._server} for {total - len(refused)} of {total} recipient(s)"
        if refused:
            # NOTE: the accepted recipients already have the message and a retry would send
            # it to them twice, so a partial refusal counts as delivered and is logged.
            detail += f"; refused: {_list_refusals(refused)}"
            logger.error("email %s %s", message_id, detail)
        else:
            logger.debug("email %s %s", message_id, detail)
        return Delivery("delivered", detail, remote_id=message_id)

    @property
    def _server(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _connect(self) -> _TrackedSMTP | _TrackedSMTPSSL:
        settings = self.settings
        if settings.security == "tls":
            return _TrackedSMTPSSL(
                settings.host,
                settings.port,
                timeout=settings.timeout_seconds,
                context=self._ssl_context,
            )
        return _TrackedSMTP(settings.host, settings.port, timeout=settings.timeout_seconds)

    def _send_on(
        self, client: _TrackedSMTP | _TrackedSMTPSSL, message: EmailMessage
    ) -> dict[str, tuple[int, bytes]]:
        """Run the SMTP dialogue and return the refused recipients with their replies."""
        settings = self.settings
        client.ehlo()
        if settings.security == "starttls":
            # starttls() raises SMTPNotSupportedError when the server does not offer it, so
            # the connection never goes on in clear text.
            client.starttls(context=self._ssl_context)
            client.ehlo()
        if settings.username:
            assert self._password is not None
            _login_once(client, settings.username, self._password)
        refused = client.send_message(
            message, from_addr=settings.sender, to_addrs=list(settings.recipients)
        )
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            # The server has already accepted the message: a failed QUIT changes nothing.
            logger.debug("QUIT to %s failed after the message was accepted", self._server)
        return refused

    def _classify(self, exc: BaseException, *, data_sent: bool) -> Delivery:
        delivery = _classify_error(exc, self.settings, data_sent=data_sent)
        if self._password and self._password in delivery.detail:
            delivery = Delivery(
                delivery.status,
                delivery.detail.replace(self._password, "***"),
                retry_after=delivery.retry_after,
                remote_id=delivery.remote_id,
                ambiguous=delivery.ambiguous,
            )
        return delivery


def _login_once(client: smtplib.SMTP, username: str, password: str) -> None:
    """Log in with one mechanism, PLAIN or else LOGIN, whichever the server offers.

    ``smtplib.SMTP.login`` tries every offered mechanism in turn, so a wrong password counts
    as two or three failed logins against lockout and fail2ban limits on the server.
    """
    if not client.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    offered = client.esmtp_features["auth"].upper().split()
    if "PLAIN" in offered:
        client.user, client.password = username, password
        client.auth("PLAIN", client.auth_plain)
    elif "LOGIN" in offered:
        client.user, client.password = username, password
        client.auth("LOGIN", client.auth_login)
    else:
        # Only other mechanisms such as CRAM-MD5: smtplib picks among them.
        client.login(username, password)


def port_security_mismatch(port: int, security: str) -> str | None:
    """Return why ``port`` and ``security`` disagree, or None when they fit.

    Port 465 carries SMTP inside implicit TLS. Ports 587 and 25 start in clear text and
    upgrade with STARTTLS, so a TLS handshake there fails. Other ports are not checked.
    """
    if port == IMPLICIT_TLS_PORT and security != "tls":
        return f"port 465 expects implicit TLS but security is {security!r}"
    if port in (SUBMISSION_PORT, RELAY_PORT) and security == "tls":
        return f"port {port} expects STARTTLS but security is 'tls'"
    return None


def port_security_problem(settings: EmailSettings) -> str | None:
    """Return the ``email.security`` problem line with its fix, or None when they fit."""
    mismatch = port_security_mismatch(settings.port, settings.security)
    if mismatch is None:
        return None
    if settings.port == IMPLICIT_TLS_PORT:
        return f"email.security: {mismatch}; set security: tls, or use port 587 with starttls"
    return f"email.security: {mismatch}; set security: starttls, or use port 465 with tls"


def _settings_problems(settings: EmailSettings) -> list[str]:
    problems = []
    mismatch = port_security_problem(settings)
    if mismatch is not None:
        problems.append(mismatch)
    if settings.username and settings.security == "none" and not _is_loopback(settings.host):
        problems.append(
            f"email.security: a password would be sent in clear text to {settings.host}; "
            "set security: starttls or tls, or remove username"
        )
    if settings.ca_file and settings.security == "none":
        problems.append("email.ca_file: has no effect with security: none; remove it")
    return problems


def _read_password(
    settings: EmailSettings, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """Return ``(password, None)``, or ``(None, problem)`` when it cannot be read."""
    if settings.password_file is not None:
        try:
            password = settings.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return None, (
                f"email.password_file: cannot read {settings.password_file}: {reason}; "
                "mount the secret file or fix the path"
            )
        if not password:
            return None, f"email.password_file: {settings.password_file} is empty"
        return password, None
    password = environ.get(settings.password_env, "")
    if not password:
        return None, (
            f"email.password_env: environment variable {settings.password_env} is not set or "
            f"empty, but username {settings.username!r} needs a password; set it, set "
            "password_file, or remove username"
        )
    return password, None


def _header_problem(message: EmailMessage) -> str | None:
    for name, value in message.items():
        if "\r" in str(value) or "\n" in str(value):
            return (
                f"header {name} contains a line break, which could inject headers; "
                "the message was not sent (build headers from one-line, cleaned values)"
            )
    return None


def _close_quietly(client: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        client.close()


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:300]


def _status(code: int) -> Literal["retry", "failed"]:
    return "retry" if 400 <= code < 500 else "failed"


def _classify_error(exc: BaseException, settings: EmailSettings, *, data_sent: bool) -> Delivery:
    server = f"{settings.host}:{settings.port}"
    if isinstance(exc, smtplib.SMTPException):
        return _classify_smtp_error(exc, settings, server, data_sent=data_sent)
    return _classify_network_error(exc, settings, server, data_sent=data_sent)


def _classify_smtp_error(
    exc: smtplib.SMTPException, settings: EmailSettings, server: str, *, data_sent: bool
) -> Delivery:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _recipients_refused(exc, server)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        reply = _reply_text(exc.smtp_error)
        if 400 <= exc.smtp_code < 500:
            return Delivery("retry", f"{server} rejected login for now: {exc.smtp_code} {reply}")
        return Delivery(
            "failed",
            f"{server} rejected login of {settings.username!r}: {exc.smtp_code} {reply}; "
            f"check {_password_source(settings)} and username",
        )
    if isinstance(exc, smtplib.SMTPSenderRefused):
        reply = _reply_text(exc.smtp_error)
        fix = (
            ""
            if _status(exc.smtp_code) == "retry"
            else ("; use a sender address the server allows for this login")
        )
        return Delivery(
            _status(exc.smtp_code),
            f"{server} refused sender {settings.sender}: {exc.smtp_code} {reply}{fix}",
        )
    if isinstance(exc, smtplib.SMTPDataError):
        reply = _reply_text(exc.smtp_error)
        fix = (
            ""
            if _status(exc.smtp_code) == "retry"
            else ("; the server rejected the content, check its logs for the policy that matched")
        )
        return Delivery(
            _status(exc.smtp_code),
            f"{server} rejected the message data: {exc.smtp_code} {reply}{fix}",
        )
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Delivery("failed", f"{server}: {_not_supported_fix(exc, settings)}")
    if isinstance(exc, smtplib.SMTPResponseException):
        # SMTPConnectError (greeting), SMTPHeloError and other replies with a code.
        reply = _reply_text(exc.smtp_error)
        return Delivery(_status(exc.smtp_code), f"{server} replied {exc.smtp_code} {reply}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return _lost(server, str(exc) or "connection closed", data_sent=data_sent)
    # Any other SMTPException, for example "No suitable authentication method found".
    return Delivery("failed", f"{server}: {_reply_text(str(exc))}")


def _classify_network_error(
    exc: BaseException, settings: EmailSettings, server: str, *, data_sent: bool
) -> Delivery:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Delivery(
            "failed",
            f"TLS certificate of {server} is not trusted: {exc.verify_message}; set ca_file "
            "to the CA that issued it, or make host match a name in the certificate",
        )
    if isinstance(exc, ssl.SSLError):
        return Delivery(
            "failed",
            f"TLS with {server} failed: {exc.reason or exc}; check that security matches the "
            "port (tls for implicit TLS on 465, starttls for 587 or 25)",
        )
    if isinstance(exc, ConnectionRefusedError):
        return Delivery("retry", f"connection to {server} refused; is the SMTP server running?")
    if isinstance(exc, TimeoutError):
        return _lost(server, f"timed out after {settings.timeout_seconds:g} s", data_sent=data_sent)
    if isinstance(exc, OSError):
        return _lost(server, exc.strerror or type(exc).__name__, data_sent=data_sent)
    return Delivery("failed", f"unexpected error sending to {server}: {type(exc).__name__}")


def _lost(server: str, reason: str, *, data_sent: bool) -> Delivery:
    reason = _reply_text(reason)
    if data_sent:
        return Delivery(
            "retry",
            f"connection to {server} lost after DATA ({reason}); the server may have "
            "accepted the message, so a retry may deliver it twice",
            ambiguous=True,
        )
    return Delivery("retry", f"connection to {server} lost before DATA ({reason})")


def _list_refusals(refused: Mapping[str, tuple[int, bytes]]) -> str:
    return ", ".join(
        f"{recipient} ({code} {_reply_text(reply)})" for recipient, (code, reply) in refused.items()
    )


def _recipients_refused(exc: smtplib.SMTPRecipientsRefused, server: str) -> Delivery:
    listed = _list_refusals(exc.recipients)
    if all(400 <= code < 500 for code, _ in exc.recipients.values()):
        return Delivery("retry", f"{server} deferred recipients: {listed}")
    return Delivery(
        "failed",
        f"{server} refused recipients: {listed}; fix the address in email.recipients or "
        "ask the mail admin to allow relaying to it",
    )


def _password_source(settings: EmailSettings) -> str:
    if settings.password_file is not None:
        return f"password_file {settings.password_file}"
    return settings.password_env


def _not_supported_fix(exc: smtplib.SMTPNotSupportedError, settings: EmailSettings) -> str:
    text = str(exc)
    if "STARTTLS" in text.upper():
        return (
            "server does not offer STARTTLS; use security: tls if the port expects implicit "
            "TLS, or a port that offers STARTTLS"
        )
    if "AUTH" in text.upper():
        return (
            "server does not offer AUTH on this connection; remove username for a relay "
            "without login, or use security: starttls/tls if it only offers AUTH over TLS"
        )
    return _reply_text(text)
