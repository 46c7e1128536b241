"""Delivery channels: each module sends one rendered alert to one receiver."""

from pipeline.alerting.channels.base import Delivery, DeliveryStatus
from pipeline.alerting.channels.email import EmailChannel, EmailSettings
from pipeline.alerting.channels.slack import SlackChannel, SlackSettings
from pipeline.alerting.channels.webhook import WebhookChannel, WebhookSettings, build_payload

__all__ = [
    "Delivery",
    "DeliveryStatus",
    "EmailChannel",
    "EmailSettings",
    "SlackChannel",
    "SlackSettings",
    "WebhookChannel",
    "WebhookSettings",
    "build_payload",
]
