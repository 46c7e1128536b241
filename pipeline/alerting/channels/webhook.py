"""Generic webhook delivery: one JSON document per alert, POSTed to a URL.

Use it to feed alerts into a SOAR, ticketing system or log pipeline. :func:`build_payload`
builds the document (``schema_version`` 1, described there), and :class:`WebhookChannel`
POSTs it with the standard library (``urllib.request``) and classifies the result into a
:class:`Delivery` for the outbox.

The URL may contain a token and the auth header value is a credential. Both are read from an
environment variable or a secret file, never from config text. They are removed from every
:class:`Delivery` detail and log message this module writes, and no error message contains them.

Each request carries an ``Idempotency-Key`` header equal to the alert id, so a receiver can
drop the copy that an ambiguous retry (a timeout after the request was sent) may produce.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import __version__
from pipeline.alerting.alerts import Alert, to_jsonable
from pipeline.alerting.channels.base import Delivery, NoRedirect, read_secret, retry_after_header
from pipeline.errors import ConfigError

__all__ = ["SCHEMA_VERSION", "WebhookChannel", "WebhookSettings", "build_payload"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
REDACTED: Final = "[redacted]"
USER_AGENT: Final = f"keytrail/{__version__}"

# Status codes worth another attempt: request timeout, too early, rate limited, and server
# errors that usually clear up (RFC 9110, RFC 8470 for 425, RFC 6585 for 429).
_RETRY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_BODY_IN_DETAIL: Final = 120
# An HTTP header field name is an RFC 9110 "token".
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class WebhookSettings(BaseModel):
    """Settings of the generic webhook channel.

    Attributes:
        url_env: environment variable that contains the webhook URL.
        url_file: secret file that contains the webhook URL; used instead of ``url_env``
            when set.
        header_name: name of the auth header sent when ``header_env`` or ``header_file`` is set.
        header_env: environment variable that contains the auth header value, such as
            ``Bearer <token>``; no auth header is sent when neither this nor ``header_file``
            is set.
        header_file: secret file that contains the auth header value; used instead of
            ``header_env`` when set.
        timeout_seconds: socket timeout of one HTTP request, in seconds.
        max_retries: in-call retries in total for connection errors and HTTP 408, 425, 429,
            500, 502, 503 and 504, before the result goes back to the outbox.
        retry_backoff_seconds: backoff factor of the in-call retries; retry ``n`` (from 0)
            waits ``factor * 2**n`` to twice that, in seconds.
        max_retry_after_seconds: maximum ``Retry-After`` wait, in seconds, spent inside the
            call; a longer one returns a ``retry`` delivery at once.
        verify_tls: verify the server certificate and host name of an ``https`` URL.
        ca_file: PEM file of CA certificates to verify the server against, instead of the
            system store.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url_env: str = "KEYTRAIL_WEBHOOK_URL"
    url_file: Path | None = None
    header_name: str = "Authorization"
    header_env: str | None = None
    header_file: Path | None = None
    timeout_seconds: float = Field(default=10, gt=0)
    max_retries: int = Field(default=2, ge=0)
    retry_backoff_seconds: float = Field(default=0.5, ge=0)
    max_retry_after_seconds: float = Field(default=30, ge=0)
    verify_tls: bool = True
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _check_fields(self) -> WebhookSettings:
        if not _HEADER_NAME.match(self.header_name):
            raise ValueError(
                f"webhook.header_name {self.header_name!r} is not a valid HTTP header name; "
                "use letters, digits and hyphens, such as 'Authorization'"
            )
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError(
                "webhook.ca_file is set but webhook.verify_tls is false; remove one of them"
            )
        return self


def build_payload(alert: Alert) -> dict[str, Any]:
    """Build the JSON document that the webhook receives for ``alert``.

    The document is stable within ``schema_version`` 1: keys are only ever added. Fields:

    - ``schema_version`` (int): 1.
    - ``alert_id`` (str): id of the alert, also sent as the ``Idempotency-Key`` header.
    - ``dedup_key`` (str): the same for alerts about the same activity across runs.
    - ``severity``, ``title``, ``detector`` (str): ``detector`` joins detector ids with ``, ``.
    - ``principal`` (str): the principals the findings name, empty when none does.
    - ``who`` (str): the actor as shown to people.
    - ``principals``, ``resources``, ``source_ips``, ``countries``, ``clouds``,
      ``accounts``, ``mitre`` (lists of str, sorted).
    - ``locations`` (list of objects): ``ip``, ``city`` and ``country`` (null where unknown).
    - ``first_seen``, ``last_seen`` (str or null): ISO 8601 UTC with a ``Z`` suffix.
    - ``event_count`` (int): events behind all findings.
    - ``findings`` (list of objects): the full finding records, JSON-converted.
    - ``next_steps`` (list of objects): ``text`` and ``commands`` (list of str).
    - ``top_events`` (list of objects): up to ``alerting.top_events`` events behind the
      alert, most telling first, with the keys of
      :data:`pipeline.alerting.top_events.TOP_EVENT_FIELDS`; ``time`` is ISO 8601 UTC.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "alert_id": alert.alert_id,
        "dedup_key": alert.dedup_key,
        "severity": alert.severity,
        "title": alert.title,
        "detector": alert.detector,
        "principal": alert.principal,
        "who": alert.who,
        "principals": list(alert.principals),
        "resources": list(alert.resources),
        "source_ips": list(alert.source_ips),
        "countries": list(alert.countries),
        "clouds": list(alert.clouds),
        "accounts": list(alert.accounts),
        "mitre": list(alert.mitre),
        "locations": [
            {"ip": place.ip, "city": place.city, "country": place.country}
            for place in alert.locations
        ],
        "first_seen": to_jsonable(alert.first_seen),
        "last_seen": to_jsonable(alert.last_seen),
        "event_count": alert.event_count,
        "findings": to_jsonable(alert.findings),
        "next_steps": [
            {"text": step.text, "commands": list(step.commands)} for step in alert.next_steps
        ],
        "top_events": to_jsonable(alert.top_events),
    }


class WebhookChannel:
    """POST alert documents to a webhook and classify each result as a :class:`Delivery`.

    ``send`` returns a failed delivery as a :class:`Delivery` instead of raising. A missing or invalid secret is a
    :class:`ConfigError` at construction, so a misconfigured channel is reported before any
    alert is sent.

    Args:
        settings: channel settings; the URL and header value are read from the environment
            variables or files they name.

    Raises:
        ConfigError: if the URL or the header value is missing or invalid, or the CA file
            cannot be loaded.
    """

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self._url_source = str(settings.url_file or settings.url_env)
        self._url = read_secret(settings.url_env, settings.url_file, "webhook URL")
        self._secrets = _url_secrets(self._url)

        parts = urllib.parse.urlsplit(self._url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"the webhook URL in {self._url_source} is not an http(s) URL with a host; "
                "set it to the full URL, such as https://soar.example.com/hooks/keytrail"
            )

        self._header_source: str | None = None
        self._header_value: str | None = None
        if settings.header_file is not None or settings.header_env is not None:
            self._header_source = str(settings.header_file or settings.header_env)
            env = settings.header_env or ""
            value = read_secret(env, settings.header_file, f"webhook {settings.header_name} header")
            # http.client sends header values as Latin-1 and raises on other characters.
            if "\n" in value or "\r" in value or not value.isascii():
                raise ConfigError(
                    f"the {settings.header_name} header value in {self._header_source} is "
                    "invalid because it contains a line break or a non-ASCII character; "
                    "put the value on one line in ASCII"
                )
            self._header_value = value
            self._secrets.add(value)

        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._ssl_context()), NoRedirect()
        )

    def _ssl_context(self) -> ssl.SSLContext:
        settings = self.settings
        if not settings.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"cannot load webhook.ca_file {settings.ca_file}: "
                f"{getattr(error, 'strerror', None) or type(error).__name__}; "
                "set it to a PEM file of CA certificates"
            ) from None

    def send(self, payload: Mapping[str, Any]) -> Delivery:
        """POST one document from :func:`build_payload` and classify the result.

        Connection errors and HTTP 408, 425, 429, 500, 502, 503 and 504 are retried inside
        the call, up to ``max_retries`` times. A timeout or broken connection after the
        request was sent is not retried here, because the receiver may have accepted the
        alert. It returns an ambiguous ``retry`` instead.

        Args:
            payload: the alert document; its ``alert_id`` becomes the ``Idempotency-Key``.

        Returns:
            The delivery, with a detail that names the URL's source but never the URL.
        """
        alert_id = str(payload.get("alert_id") or "")
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        retries_left = self.settings.max_retries
        attempt = 0
        while True:
            delivery = self._attempt(body, alert_id)
            wait = self._retry_wait(delivery, attempt)
            if delivery.status != "retry" or wait is None or retries_left == 0:
                break
            logger.info(
                "webhook attempt %s for alert %s will be retried in %.2f s: %s",
                attempt + 1,
                alert_id,
                wait,
                delivery.detail,
            )
            time.sleep(wait)
            retries_left -= 1
            attempt += 1
        self._log(delivery, alert_id)
        return delivery

    def _attempt(self, body: bytes, alert_id: str) -> Delivery:
        """POST ``body`` once and classify the response or the error."""
        request = urllib.request.Request(self._url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json, */*;q=0.5")
        request.add_header("User-Agent", USER_AGENT)
        if alert_id:
            request.add_header("Idempotency-Key", alert_id)
        if self._header_value is not None:
            request.add_header(self.settings.header_name, self._header_value)

        try:
            with self._opener.open(request, timeout=self.settings.timeout_seconds) as response:
                status = int(response.status)
                text = _read_excerpt(response)
        except urllib.error.HTTPError as error:
            with error:
                text = _read_excerpt(error)
                return self._redact(self._classify_status(error.code, text, error.headers))
        except (OSError, http.client.HTTPException) as error:
            return self._redact(self._classify_exception(error))
        return self._redact(self._classify_status(status, text, None))

    def _retry_wait(self, delivery: Delivery, attempt: int) -> float | None:
        """Return the seconds to wait before retrying in the call, or None to stop now.

        An ambiguous result and a ``Retry-After`` above the cap go back to the outbox.
        """
        if delivery.status != "retry" or delivery.ambiguous:
            return None
        if delivery.retry_after is not None:
            if delivery.retry_after > self.settings.max_retry_after_seconds:
                return None
            return delivery.retry_after
        base = self.settings.retry_backoff_seconds * 2**attempt
        return base + random.uniform(0, base)

    def _classify_status(self, status: int, text: str, headers: Any) -> Delivery:
        excerpt = f" {text}" if text else ""
        summary = f"HTTP {status}{excerpt}"
        if 200 <= status < 300:
            return Delivery("delivered", f"webhook accepted the alert ({summary})")
        if status == 429:
            wait = retry_after_header(headers)
            after = f", retry after {wait:g} s" if wait is not None else ""
            return Delivery("retry", f"webhook rate limited ({summary}){after}", retry_after=wait)
        if status in _RETRY_STATUSES or status >= 500:
            return Delivery("retry", f"webhook server error or timeout ({summary})")
        return Delivery("failed", f"{summary}: {self._fix_for(status)}")

    def _fix_for(self, status: int) -> str:
        """Return what to do about a permanent HTTP error."""
        source = self._url_source
        if status in (401, 403):
            if self._header_source is None:
                return (
                    "the receiver rejected the credentials; set webhook.header_env to a "
                    f"variable that contains the {self.settings.header_name} header value"
                )
            return (
                f"the receiver rejected the credentials; check the {self.settings.header_name} "
                f"header value in {self._header_source}"
            )
        if status in (404, 410):
            return f"the endpoint is gone; set {source} to the receiver's current URL"
        if status == 405:
            return f"the endpoint does not accept POST; check the URL in {source}"
        if status == 413:
            return (
                "the payload is too large for the receiver; raise its body size limit or "
                "group fewer findings per alert"
            )
        if status in (400, 422):
            return "the receiver rejected the document; check it accepts schema_version 1"
        if 300 <= status < 400:
            return f"the endpoint redirects; set {source} to the final URL"
        return "the receiver rejected the request"

    def _classify_exception(self, error: Exception) -> Delivery:
        name = type(error).__name__
        if isinstance(error, urllib.error.URLError):
            # urllib wraps errors raised before the request was sent (DNS, refused, connect
            # timeout, TLS handshake), so the receiver cannot have seen the alert.
            reason = error.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                return Delivery(
                    "failed",
                    "the webhook's TLS certificate failed verification "
                    f"({reason.verify_message}); set webhook.ca_file to the CA that issued it",
                )
            if isinstance(reason, TimeoutError):
                return Delivery("retry", "connecting to the webhook timed out")
            reason_name = type(reason).__name__ if isinstance(reason, BaseException) else name
            return Delivery("retry", f"connecting to the webhook failed ({reason_name})")
        if isinstance(error, TimeoutError):
            return Delivery(
                "retry",
                "the webhook did not respond in time after the request was sent; the receiver "
                "may have accepted the alert",
                ambiguous=True,
            )
        return Delivery(
            "retry",
            f"the connection to the webhook broke before a response arrived ({name}); the "
            "receiver may have accepted the alert",
            ambiguous=True,
        )

    def _redact(self, delivery: Delivery) -> Delivery:
        detail = delivery.detail
        for secret in sorted(self._secrets, key=len, reverse=True):
            detail = detail.replace(secret, REDACTED)
        if detail == delivery.detail:
            return delivery
        return Delivery(
            delivery.status,
            detail,
            retry_after=delivery.retry_after,
            remote_id=delivery.remote_id,
            ambiguous=delivery.ambiguous,
        )

    def _log(self, delivery: Delivery, alert_id: str) -> None:
        if delivery.status == "delivered":
            logger.debug("webhook alert %s: %s", alert_id, delivery.detail)
        elif delivery.status == "retry":
            logger.warning("webhook alert %s will be retried: %s", alert_id, delivery.detail)
        else:
            logger.error("webhook alert %s failed: %s", alert_id, delivery.detail)


def _url_secrets(url: str) -> set[str]:
    """Return the parts of ``url`` that may carry a token: the URL, path, query and user info."""
    parts = urllib.parse.urlsplit(url)
    secrets = {url}
    for part in (parts.path, parts.query, parts.fragment, parts.username, parts.password):
        # A bare "/" or a short word is no secret and would garble details if replaced.
        if part and len(part) >= 8:
            secrets.add(part)
    return secrets


def _read_excerpt(response: Any) -> str:
    """Read the start of a response body as one line of text for a delivery detail."""
    try:
        raw = response.read(4096)
    except (OSError, http.client.HTTPException):
        return ""
    text = " ".join(bytes(raw or b"").decode("utf-8", errors="replace").split())
    if len(text) > _MAX_BODY_IN_DETAIL:
        return text[:_MAX_BODY_IN_DETAIL] + "..."
    return text
