"""What one delivery attempt to a channel produced, in the terms the outbox needs.

The outbox retries a ``retry`` result with backoff, dead-letters a ``failed`` one at once (a
revoked webhook or a rejected recipient will not start working by itself), and marks a
``delivered`` one done. Channels never raise for a failed delivery: they classify it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Delivery", "DeliveryStatus"]

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
