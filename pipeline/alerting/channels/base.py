"""What one delivery attempt to a channel produced, in the terms the outbox needs.

The outbox retries a ``retry`` result with backoff, dead-letters a ``failed`` one at once (a
revoked webhook or a rejected recipient will not start working by itself), and marks a
``delivered`` one done. Channels never raise for a failed delivery: they classify it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

__all__ = [
    "Delivery",
    "DeliveryStatus",
    "NoRedirect",
    "parse_retry_after",
    "read_secret",
    "retry_after_header",
]

DeliveryStatus = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True)
class Delivery:
    """The result of one attempt to send one alert to one receiver.

    Attributes:
        status: ``delivered``; ``retry`` for a transient failure (timeout, connection error,
            429, 5xx, SMTP 4xx); ``failed`` for a permanent one (404/410 webhook, invalid
            payload, SMTP 5xx, bad credentials).
        detail: what happened, for the run summary and logs; never contains a secret such
            as a webhook URL, token or password.
        retry_after: seconds the server asked to wait before the next attempt, if it did.
        remote_id: the receiver's id for the message (Slack ``ts``, SMTP Message-ID), used
            to thread updates.
        ambiguous: True when the server may have accepted the message although the attempt
            failed (a timeout after the request was sent), so a retry may duplicate it.
    """

    status: DeliveryStatus
    detail: str
    retry_after: float | None = None
    remote_id: str | None = None
    ambiguous: bool = False


def read_secret(env_name: str, file: Path | None, secret_name: str) -> str:
    """Read a secret from ``file`` when given, else from the environment variable ``env_name``.

    ``secret_name`` names the secret in messages, such as ``Slack webhook URL``.

    Raises:
        ConfigError: if the file cannot be read, or the variable is unset or empty. The
            message names the variable or file, never the value.
    """
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ConfigError(
                f"cannot read the {secret_name} from secret file {file}: {reason}; "
                f"create the file or unset the setting to read {env_name} instead"
            ) from None
        if not value:
            raise ConfigError(f"secret file {file} for the {secret_name} is empty")
        return value
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise ConfigError(
            f"environment variable {env_name} is not set or empty; set it to the {secret_name}"
        )
    return value


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Return the wait in seconds that a ``Retry-After`` value requests, or None if invalid.

    HTTP allows a number of seconds or an HTTP date. A number may have a fraction here, a
    negative one counts as 0, an infinite or NaN one is invalid, and a date in the past gives
    0. ``now`` (default: the current time) is what a date is counted from.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # float() also reads "inf" and "nan", which no server means as a wait.
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    moment = now or dt.datetime.now(dt.UTC)
    return max((when - moment).total_seconds(), 0.0)


def retry_after_header(
    headers: Mapping[str, Any] | Any, *, now: dt.datetime | None = None
) -> float | None:
    """Return the ``Retry-After`` wait in seconds from response headers, or None.

    ``headers`` may be an :class:`email.message.Message` (urllib), a dict of strings, or a
    dict of lists of strings (slack_sdk). The name is matched case-insensitively. Of a list,
    the first value counts.
    """
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else []
    for name, value in items:
        if str(name).lower() != "retry-after":
            continue
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return parse_retry_after(None if value is None else str(value), now=now)
    return None


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A urllib handler that turns every redirect into an ``HTTPError`` with its status.

    urllib would repeat a POST redirected with 301/302/303 as a GET without a body, to
    wherever the redirect points and with the request's ``Authorization`` header (a Slack bot
    token), and the caller would report that other host's response as the receiver's.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        """Return None, so urllib raises the redirect as an error instead of following it."""
        return None
