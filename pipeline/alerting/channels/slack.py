"""Slack delivery through an incoming webhook or the Web API ``chat.postMessage`` method.

The webhook URL and the bot token are secrets. They are read from an environment variable or
a secret file, never from config text. They do not appear in a :class:`Delivery` detail or a
:class:`ConfigError` message, and the logger this module passes to the slack_sdk clients
redacts them from the SDK's log records.

In-call retries use slack_sdk's retry handlers (slack_sdk 3.48): connection errors before the
request is sent, HTTP 429 (waiting for ``Retry-After``) and HTTP 500/503. What is still failing
after ``max_retries`` is classified into a :class:`Delivery` for the outbox. Redirects are not
followed.
"""

from __future__ import annotations

import http.client
import logging
import random
import re
import time
import urllib.request
from http.client import HTTPResponse
from pathlib import Path
from typing import Any, Literal
from urllib.error import URLError
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.webhook import WebhookClient, WebhookResponse

from pipeline.alerting.channels.base import Delivery, NoRedirect, read_secret, retry_after_header
from pipeline.errors import ConfigError

__all__ = ["SlackChannel", "SlackSettings"]

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"

# Webhook error codes that mean the webhook itself no longer exists or works.
_REVOKED_WEBHOOK_CODES = frozenset(
    {"no_service", "no_service_id", "no_team", "team_disabled", "invalid_token"}
)
_CHANNEL_GONE_CODES = frozenset({"channel_not_found", "channel_is_archived", "is_archived"})
_BAD_TOKEN_CODES = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
)
# Web API error codes that Slack documents as transient.
_TRANSIENT_API_CODES = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
_MAX_BODY_IN_DETAIL = 120
# Bytes of a successful response that are read. Slack's responses are a few kilobytes, and a
# longer one is cut so that a broken or hostile server cannot fill the memory.
_MAX_RESPONSE_BYTES = 1024 * 1024
# Exceptions from urllib and slack_sdk when a request cannot be completed. Others are bugs.
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, SlackRequestError)


class SlackSettings(BaseModel):
    """Settings of the Slack channel.

    Attributes:
        mode: ``webhook`` posts to an incoming webhook, ``bot`` calls ``chat.postMessage`` with
            a bot token and returns the message ``ts`` so that updates can be threaded.
        webhook_url_env: environment variable that contains the webhook URL.
        webhook_url_file: secret file that contains the webhook URL; used instead of
            ``webhook_url_env`` when set.
        token_env: environment variable that contains the bot token (``xoxb-...``).
        token_file: secret file that contains the bot token; used instead of ``token_env``
            when set.
        channel: channel id (``C0123ABCD``) that bot mode posts to.
        timeout_seconds: socket timeout of one HTTP request, in seconds.
        max_retries: in-call retries in total for connection errors, HTTP 429 and HTTP
            500/503, before the result goes back to the outbox.
        retry_backoff_seconds: backoff factor of the in-call retries after connection and
            server errors; retry ``n`` (from 0) waits ``factor * 2**n`` to twice that, in seconds.
        max_retry_after_seconds: longest ``Retry-After`` wait, in seconds, spent inside the
            call; a longer one returns a ``retry`` delivery at once.
        base_url: Web API base URL for bot mode (default ``https://slack.com/api/``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["webhook", "bot"] = "webhook"
    webhook_url_env: str = "KEYTRAIL_SLACK_WEBHOOK_URL"
    webhook_url_file: Path | None = None
    token_env: str = "KEYTRAIL_SLACK_BOT_TOKEN"
    token_file: Path | None = None
    channel: str | None = None
    timeout_seconds: float = Field(default=10, gt=0)
    max_retries: int = Field(default=2, ge=0)
    retry_backoff_seconds: float = Field(default=0.5, ge=0)
    max_retry_after_seconds: float = Field(default=30, ge=0)
    base_url: str | None = None

    @model_validator(mode="after")
    def _check_mode_fields(self) -> SlackSettings:
        if self.mode == "bot" and not self.channel:
            raise ValueError("slack.channel is required when slack.mode is 'bot'")
        if self.mode == "webhook" and self.base_url is not None:
            raise ValueError(
                "slack.base_url applies only to slack.mode 'bot'; in webhook mode the URL is "
                f"read from {self.webhook_url_env}"
            )
        return self


class _SecretRedactor(logging.Filter):
    """Logging filter that replaces every registered secret in a record's message."""

    _PATTERNS = (
        re.compile(r"https://hooks\.slack\.com/\S+"),
        re.compile(r"xox[a-z]-[A-Za-z0-9-]+"),
    )

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        for pattern in self._PATTERNS:
            text = pattern.sub(REDACTED, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None
        return True


_redactor = _SecretRedactor()
# slack_sdk logs request URLs at INFO when it retries, so the clients get this logger.
_sdk_logger = logging.getLogger(f"{__name__}.sdk")
_sdk_logger.addFilter(_redactor)


class _ProportionalJitter(Jitter):
    """Add up to 100% of the wait at random.

    slack_sdk's ``RandomJitter`` adds up to one whole second whatever the backoff factor.
    """

    def recalculate(self, duration: float) -> float:
        return duration + random.uniform(0, duration)


class _RateLimitRetryHandler(RateLimitErrorRetryHandler):
    """Retry HTTP 429 inside the call when ``Retry-After`` is short enough.

    slack_sdk's handler always waits, and raises ``ValueError`` on a non-integer
    ``Retry-After``. This one parses the header leniently and leaves long waits to the outbox.
    """

    def __init__(self, max_retry_count: int, max_wait_seconds: float) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.max_wait_seconds = max_wait_seconds

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is None or response.status_code != 429:
            return False
        wait = retry_after_header(response.headers)
        return wait is None or wait <= self.max_wait_seconds

    def prepare_for_next_attempt(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        wait = retry_after_header(response.headers) if response is not None else None
        state.next_attempt_requested = True
        # Without a Retry-After header, wait one second, as slack_sdk's own handler does.
        time.sleep(1.0 if wait is None else wait)
        state.increment_current_attempt()


def _open(req: urllib.request.Request, ssl_context: Any, proxy: str | None, timeout: Any) -> Any:
    """Open ``req`` as slack_sdk would, but without following redirects."""
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.HTTPSHandler(context=ssl_context),
        NoRedirect(),
    ]
    if proxy is not None:
        handlers.insert(0, urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    return urllib.request.build_opener(*handlers).open(req, timeout=timeout)


# NOTE: the two clients below override private methods of slack_sdk 3.48, the only hook
# through which the urllib opener can be chosen. Check them when upgrading slack_sdk.
class _WebhookClient(WebhookClient):
    """slack_sdk's webhook client with redirects turned into errors."""

    def _perform_http_request_internal(self, url: str, req: urllib.request.Request) -> Any:
        response: HTTPResponse = _open(req, self.ssl, self.proxy, self.timeout)
        charset = response.headers.get_content_charset() or "utf-8"
        return WebhookResponse(
            url=url,
            status_code=response.status,
            body=response.read(_MAX_RESPONSE_BYTES).decode(charset, errors="replace"),
            headers=response.headers,  # type: ignore[arg-type]
        )


class _WebClient(WebClient):
    """slack_sdk's Web API client with redirects turned into errors."""

    def _perform_urllib_http_request_internal(
        self, url: str, req: urllib.request.Request
    ) -> dict[str, Any]:
        response: HTTPResponse = _open(req, self.ssl, self.proxy, self.timeout)
        charset = response.headers.get_content_charset() or "utf-8"
        body = response.read(_MAX_RESPONSE_BYTES).decode(charset, errors="replace")
        return {"status": response.status, "headers": response.headers, "body": body}


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MAX_BODY_IN_DETAIL:
        return text[:_MAX_BODY_IN_DETAIL] + "..."
    return text


class SlackChannel:
    """Send rendered Block Kit payloads to Slack and classify the result as a :class:`Delivery`.

    ``send`` never raises for a failed delivery. A missing secret is a :class:`ConfigError`
    at construction, so a misconfigured channel is reported before any alert is sent.

    Args:
        settings: channel settings; the secret is read from the environment or file they name.

    Raises:
        ConfigError: if the webhook URL or bot token is missing or invalid.
    """

    def __init__(self, settings: SlackSettings) -> None:
        self.settings = settings
        handlers = self._retry_handlers()
        timeout = settings.timeout_seconds
        if settings.mode == "webhook":
            url = read_secret(
                settings.webhook_url_env, settings.webhook_url_file, "Slack webhook URL"
            )
            _redactor.add(url)
            # The path is the webhook's secret, and a proxy error page or a broken server may
            # echo it without the host.
            for part in (urlsplit(url).path, urlsplit(url).query):
                if len(part) >= 8:
                    _redactor.add(part)
            if not url.lower().startswith(("https://", "http://")):
                source = settings.webhook_url_file or settings.webhook_url_env
                raise ConfigError(
                    f"the Slack webhook URL in {source} is not an http(s) URL; copy it from "
                    "the app's Incoming Webhooks page"
                )
            self._secret_source = str(settings.webhook_url_file or settings.webhook_url_env)
            # slack_sdk declares timeout as int, but passes it to urlopen, which accepts a float.
            self._webhook: WebhookClient | None = _WebhookClient(
                url,
                timeout=timeout,  # type: ignore[arg-type]
                logger=_sdk_logger,
                retry_handlers=handlers,
            )
            self._web: WebClient | None = None
        else:
            token = read_secret(settings.token_env, settings.token_file, "Slack bot token")
            _redactor.add(token)
            self._secret_source = str(settings.token_file or settings.token_env)
            base_url = settings.base_url or WebClient.BASE_URL
            if not base_url.endswith("/"):
                base_url += "/"
            self._webhook = None
            self._web = _WebClient(
                token=token,
                base_url=base_url,
                timeout=timeout,  # type: ignore[arg-type]
                logger=_sdk_logger,
                retry_handlers=handlers,
            )

    def _retry_handlers(self) -> list[RetryHandler]:
        retries = self.settings.max_retries
        backoff = BackoffRetryIntervalCalculator(
            backoff_factor=self.settings.retry_backoff_seconds, jitter=_ProportionalJitter()
        )
        # Only URLError is retried inside the call: urllib raises it for failures before the
        # request is sent. A reset or disconnect while waiting for the response comes after
        # Slack may have posted the message, so it goes back to the outbox as ambiguous
        # instead of being sent again up to max_retries times at once.
        connection = ConnectionErrorRetryHandler(
            max_retry_count=retries, interval_calculator=backoff, error_types=[URLError]
        )
        return [
            connection,
            _RateLimitRetryHandler(retries, self.settings.max_retry_after_seconds),
            ServerErrorRetryHandler(max_retry_count=retries, interval_calculator=backoff),
        ]

    def send(self, payload: dict[str, Any], *, thread_ts: str | None = None) -> Delivery:
        """Send one rendered payload (``text`` and ``blocks``) and classify the result.

        Args:
            payload: a Block Kit message as returned by ``Renderer.render_slack``.
            thread_ts: ``ts`` of an earlier message to reply to in its thread.

        Returns:
            The delivery; in bot mode a delivered message has ``remote_id`` set to its ``ts``.
        """
        if self._webhook is not None:
            delivery = self._send_webhook(self._webhook, payload, thread_ts)
        else:
            assert self._web is not None
            delivery = self._send_bot(self._web, payload, thread_ts)
        delivery = Delivery(
            status=delivery.status,
            detail=_redactor.redact(delivery.detail),
            retry_after=delivery.retry_after,
            remote_id=delivery.remote_id,
            ambiguous=delivery.ambiguous,
        )
        self._log(delivery)
        return delivery

    def _log(self, delivery: Delivery) -> None:
        mode = self.settings.mode
        if delivery.status == "delivered":
            logger.debug("slack %s: %s", mode, delivery.detail)
        elif delivery.status == "retry":
            logger.warning("slack %s delivery will be retried: %s", mode, delivery.detail)
        else:
            logger.error("slack %s delivery failed: %s", mode, delivery.detail)

    def _send_webhook(
        self, client: WebhookClient, payload: dict[str, Any], thread_ts: str | None
    ) -> Delivery:
        body = dict(payload)
        if thread_ts is not None:
            # NOTE: incoming webhooks accept thread_ts, but return no ts of their own, so
            # only bot mode can start a thread.
            body["thread_ts"] = thread_ts
        try:
            response = client.send_dict(body)
        except _TRANSPORT_ERRORS as error:
            return _classify_exception(error, "the webhook")
        return self._classify_webhook_response(
            response.status_code, response.body or "", response.headers
        )

    def _classify_webhook_response(self, status: int, body: str, headers: Any) -> Delivery:
        code = body.strip()
        body_excerpt = _shorten(code)
        if 200 <= status < 300:
            return Delivery(
                "delivered", f"webhook accepted the message (HTTP {status} {body_excerpt})"
            )
        if status == 429:
            wait = retry_after_header(headers)
            return Delivery(
                "retry", f"webhook rate limited (HTTP 429), retry after {wait} s", retry_after=wait
            )
        if status >= 500:
            return Delivery("retry", f"Slack server error (HTTP {status} {body_excerpt})")
        env = self.settings.webhook_url_env
        if 300 <= status < 400:
            return Delivery(
                "failed",
                f"HTTP {status}: the webhook URL redirects, and redirects are not followed; "
                f"set {self._secret_source} to the webhook URL from the app's Incoming Webhooks page",
            )
        if code in _REVOKED_WEBHOOK_CODES or (
            status in (404, 410) and code not in _CHANNEL_GONE_CODES
        ):
            return Delivery(
                "failed",
                f"HTTP {status} {body_excerpt}: the webhook was revoked or deleted: create a new one "
                f"and set {env}",
            )
        if code in _CHANNEL_GONE_CODES:
            return Delivery(
                "failed",
                f"HTTP {status} {body_excerpt}: the webhook's channel was deleted or archived: create "
                f"a webhook for an active channel and set {env}",
            )
        if status == 403:
            return Delivery(
                "failed",
                f"HTTP 403 {body_excerpt}: the workspace does not allow this webhook to post to its "
                "channel; ask a Slack admin or pick another channel",
            )
        return Delivery(
            "failed",
            f"HTTP {status} {body_excerpt}: Slack rejected the message; the rendered payload or the "
            "Slack template needs fixing",
        )

    def _send_bot(
        self, client: WebClient, payload: dict[str, Any], thread_ts: str | None
    ) -> Delivery:
        channel = self.settings.channel
        arguments = dict(payload)
        arguments["channel"] = channel
        if thread_ts is not None:
            arguments["thread_ts"] = thread_ts
        try:
            response = client.api_call("chat.postMessage", json=arguments)
        except SlackApiError as error:
            return self._classify_api_error(error)
        except _TRANSPORT_ERRORS as error:
            return _classify_exception(error, "the Slack Web API")
        ts = response.get("ts")
        remote_id = str(ts) if ts is not None else None
        return Delivery(
            "delivered", f"posted to channel {channel} as ts {remote_id}", remote_id=remote_id
        )

    def _classify_api_error(self, error: SlackApiError) -> Delivery:
        response = error.response
        status = int(getattr(response, "status_code", 0) or 0)
        data = getattr(response, "data", None)
        code = (
            _shorten(str(data.get("error", "unknown_error")))
            if isinstance(data, dict)
            else "unknown_error"
        )
        channel = self.settings.channel
        summary = f"chat.postMessage returned {code} (HTTP {status})"

        if status == 429 or code == "ratelimited":
            wait = retry_after_header(getattr(response, "headers", None))
            return Delivery("retry", f"{summary}, retry after {wait} s", retry_after=wait)
        if status >= 500 or code in _TRANSIENT_API_CODES:
            return Delivery("retry", summary)
        if 300 <= status < 400:
            return Delivery(
                "failed",
                f"chat.postMessage returned a redirect (HTTP {status}), which is not "
                "followed; set slack.base_url to the Web API URL, such as https://slack.com/api/",
            )

        if code in _BAD_TOKEN_CODES:
            return Delivery(
                "failed",
                f"{summary}: the bot token is invalid or revoked; reinstall the Slack app and set "
                f"{self._secret_source} to its bot token",
            )
        if code == "channel_not_found":
            return Delivery(
                "failed",
                f"{summary}: channel {channel} does not exist or the bot cannot see it; set "
                "slack.channel to a channel id (C...) and invite the bot",
            )
        if code == "not_in_channel":
            return Delivery(
                "failed",
                f"{summary}: the bot is not a member of channel {channel}; invite it with /invite",
            )
        if code == "is_archived":
            return Delivery(
                "failed", f"{summary}: channel {channel} is archived; unarchive it or pick another"
            )
        if code == "missing_scope":
            return Delivery(
                "failed", f"{summary}: add the chat:write scope to the Slack app and reinstall it"
            )
        return Delivery("failed", f"{summary}: Slack rejected the message")


def _classify_exception(error: Exception, peer: str) -> Delivery:
    """Classify an exception raised by a slack_sdk client after its in-call retries."""
    name = type(error).__name__
    if isinstance(error, URLError):
        # urllib wraps errors that happen before the request is sent (DNS, refused, connect
        # timeout), so the server cannot have seen the message.
        reason = error.reason
        if isinstance(reason, TimeoutError):
            return Delivery("retry", f"connecting to {peer} timed out")
        reason_name = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
        return Delivery("retry", f"connecting to {peer} failed ({reason_name})")
    if isinstance(error, TimeoutError):
        return Delivery(
            "retry",
            f"{peer} did not answer in time after the request was sent; Slack may have posted "
            "the message",
            ambiguous=True,
        )
    if isinstance(error, (ConnectionError, http.client.HTTPException)):
        return Delivery(
            "retry",
            f"the connection to {peer} broke before a response arrived ({name}); Slack may have "
            "posted the message",
            ambiguous=True,
        )
    if isinstance(error, SlackRequestError):
        return Delivery("failed", f"slack_sdk rejected the request to {peer} ({name})")
    return Delivery("retry", f"sending to {peer} failed ({name})")
