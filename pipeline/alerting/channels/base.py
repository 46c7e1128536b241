"""What one delivery attempt to a channel produced, in the terms the outbox needs.

The outbox retries a ``retry`` result with backoff, dead-letters a ``failed`` one at once (a
revoked webhook or a rejected recipient will not start working by itself), and marks a
``delivered`` one done. Channels never raise for a failed delivery: they classify it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError

__all__ = ["Delivery", "DeliveryStatus", "read_secret"]

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
