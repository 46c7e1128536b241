"""Delivery channels: each module sends one rendered alert to one receiver."""

from pipeline.alerting.channels.base import Delivery, DeliveryStatus

__all__ = ["Delivery", "DeliveryStatus"]
