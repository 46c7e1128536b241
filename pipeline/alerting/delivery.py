"""Delivery glue: alerting settings, the repeat-interval ledger, and senders per receiver.

The engine uses this module in three steps:

1. :func:`plan_alerts` filters a run's new findings (``min_severity``, allow-list, active
   silences), routes and groups them into alerts per receiver.
2. :func:`enqueue_alerts` runs inside the run's commit transaction. It drops alerts whose
   ``dedup_key`` the receiver was sent within ``repeat_interval``, unless the alert grew (new
   resources, new source addresses or a higher severity; then it is sent as an update), and
   queues one outbox row per (alert, receiver).
3. :func:`build_senders` turns each receiver's channels into an outbox sender, and
   :func:`pipeline.alerting.outbox.deliver_due` sends the due rows.

The built-in receiver ``outbox-files`` (:data:`FILE_RECEIVER`) writes the rendered Slack and
email files to ``<output_dir>/outbox``, which is what keytrail did before delivery existed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from detectors.base import severity_rank
from pipeline.alerting.alerts import Alert
from pipeline.alerting.channels import (
    Delivery,
    DeliveryStatus,
    EmailChannel,
    EmailSettings,
    SlackChannel,
    SlackSettings,
    WebhookChannel,
    WebhookSettings,
    build_payload,
)
from pipeline.alerting.outbox import OutboxRow, OutboxSettings, Sender, enqueue
from pipeline.alerting.output import OUTBOX_DIR, OutputSettings, write_alert_files
from pipeline.alerting.render import Renderer
from pipeline.alerting.routing import AllowEntry, RoutingSettings, apply_allow_list, route_alerts
from pipeline.alerting.silences import (
    InvalidSilenceError,
    Silence,
    apply_silences,
    parse_duration,
)
from pipeline.errors import KeytrailError

__all__ = [
    "FILE_RECEIVER",
    "AlertPlan",
    "AlertingSettings",
    "FileSettings",
    "ReceiverSettings",
    "alert_from_payload",
    "build_senders",
    "channel_senders",
    "enqueue_alerts",
    "plan_alerts",
    "sample_alert",
]

logger = logging.getLogger(__name__)

FILE_RECEIVER: Final = "outbox-files"
"""Name of the built-in receiver that writes rendered alerts to ``<output_dir>/outbox``."""

UPDATE_PREFIX: Final = "Update: "
"""Title prefix of an alert sent again within ``repeat_interval`` because it grew."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSettings(_Strict):
    """The file channel: rendered Slack JSON and email files in ``<output_dir>/outbox``."""


class ReceiverSettings(_Strict):
    """One receiver: one or more channels that each get every alert routed to it."""

    # TODO: secret and CA file paths of channels are not resolved against the config folder
    # as other paths are, so a relative path counts from the current folder.

    slack: SlackSettings | None = None
    email: EmailSettings | None = None
    webhook: WebhookSettings | None = None
    file: FileSettings | None = None

    @model_validator(mode="after")
    def _needs_channel(self) -> ReceiverSettings:
        if not self.channels():
            raise ValueError("a receiver needs at least one channel: slack, email, webhook or file")
        return self

    def channels(self) -> list[str]:
        """Return the names of the configured channels, in a fixed order."""
        names = ("slack", "email", "webhook", "file")
        return [name for name in names if getattr(self, name) is not None]


def _default_routing() -> RoutingSettings:
    # One alert per finding, as keytrail wrote outbox files before routing existed.
    return RoutingSettings(default_receiver=FILE_RECEIVER, group_by=["..."])


class AlertingSettings(OutputSettings):
    """The ``alerting`` section of config.yaml.

    The keys of :class:`~pipeline.alerting.output.OutputSettings` keep their meaning:
    ``outbox`` is still the switch for the rendered files of the built-in ``outbox-files``
    receiver. The retry policy of the delivery outbox table is ``delivery``.

    Attributes:
        receivers: receiver name -> channels. ``outbox-files`` exists without being listed.
        routing: which receiver gets which findings, and how they are grouped into alerts.
        allow_list: entries that remove expected findings before routing.
        repeat_interval: how long a receiver is not sent an alert with the same dedup key
            again, unless the alert grew.
        delivery: retry policy of the outbox table.
    """

    receivers: dict[str, ReceiverSettings] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=_default_routing)
    allow_list: list[AllowEntry] = Field(default_factory=list)
    repeat_interval: dt.timedelta = dt.timedelta(hours=4)
    delivery: OutboxSettings = Field(default_factory=OutboxSettings)

    @field_validator("repeat_interval", mode="before")
    @classmethod
    def _parse_interval(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except InvalidSilenceError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _known_receivers(self) -> AlertingSettings:
        known = set(self.receiver_names())
        named = [self.routing.default_receiver] + [item.receiver for item in self.routing.routes]
        unknown = sorted({name for name in named if name not in known})
        if unknown:
            raise ValueError(
                f"routing names unknown receivers {', '.join(unknown)}; define them under "
                f"alerting.receivers (known: {', '.join(sorted(known))})"
            )
        return self

    def receiver_names(self) -> list[str]:
        """Return every receiver name, including the built-in ``outbox-files``."""
        return sorted(set(self.receivers) | {FILE_RECEIVER})

    def receiver(self, name: str) -> ReceiverSettings:
        """Return the settings of receiver ``name``.

        Raises:
            KeyError: no receiver has that name.
        """
        if name in self.receivers:
            return self.receivers[name]
        if name == FILE_RECEIVER:
            return ReceiverSettings(file=FileSettings())
        raise KeyError(name)


# --- planning ----------------------------------------------------------------------------------


@dataclass
class AlertPlan:
    """The alerts of one run per receiver, and what the filters removed.

    Attributes:
        alerts: ``(receiver, alerts)`` pairs in routing order.
        below_min_severity: findings below ``min_severity``.
        allowed: findings removed by the allow-list.
        allowed_by: allow-list entry (``entry <index>: <reason>``) -> findings removed.
        silenced: findings muted by active silences.
        silenced_by: silence id -> findings muted.
    """

    alerts: list[tuple[str, list[Alert]]] = field(default_factory=list)
    below_min_severity: int = 0
    allowed: int = 0
    allowed_by: dict[str, int] = field(default_factory=dict)
    silenced: int = 0
    silenced_by: dict[str, int] = field(default_factory=dict)


def plan_alerts(
    findings: pd.DataFrame,
    settings: AlertingSettings,
    silences: list[Silence],
    now: dt.datetime,
) -> AlertPlan:
    """Filter findings by ``min_severity``, the allow-list and silences, then route and group."""
    plan = AlertPlan()
    if findings.empty:
        return plan
    floor = severity_rank(settings.min_severity)
    above = findings["severity"].map(severity_rank) >= floor
    plan.below_min_severity = int((~above).sum())
    frame = findings[above.to_numpy(dtype=bool)].reset_index(drop=True)

    frame, allowed = apply_allow_list(frame, settings.allow_list, now=now)
    plan.allowed = len(allowed)
    if len(allowed):
        plan.allowed_by = {str(k): int(v) for k, v in allowed["allowed_by"].value_counts().items()}

    frame, silenced = apply_silences(frame, silences, now)
    plan.silenced = len(silenced)
    if len(silenced):
        counts = silenced["silenced_by"].value_counts().items()
        plan.silenced_by = {str(k): int(v) for k, v in counts}

    if not frame.empty:
        plan.alerts = route_alerts(frame, settings.routing)
    return plan


# --- repeat interval and enqueueing ------------------------------------------------------------


def enqueue_alerts(
    conn: sqlite3.Connection,
    plan: AlertPlan,
    repeat_interval: dt.timedelta,
    now: dt.datetime,
) -> dict[str, dict[str, int]]:
    """Queue the plan's alerts on ``conn`` inside the caller's transaction.

    An alert whose ``dedup_key`` its receiver was sent less than ``repeat_interval`` ago is
    skipped, unless it names a resource or source address the last one did not, or has a
    higher severity. Then it is queued with the title prefix :data:`UPDATE_PREFIX`.

    Returns:
        Receiver name -> ``{"queued", "updates", "repeats_skipped"}`` counts.
    """
    counts: dict[str, dict[str, int]] = {}
    for receiver, alerts in plan.alerts:
        entry = counts.setdefault(receiver, {"queued": 0, "updates": 0, "repeats_skipped": 0})
        for alert in alerts:
            decision = _repeat_decision(conn, receiver, alert, repeat_interval, now)
            if decision == "skip":
                entry["repeats_skipped"] += 1
                continue
            queued = alert
            if decision == "update":
                queued = dataclasses.replace(alert, title=UPDATE_PREFIX + alert.title)
                entry["updates"] += 1
            entry["queued"] += enqueue(conn, queued, [receiver], now=now)
            _record_notified(conn, receiver, alert, now)
    return counts


def _repeat_decision(
    conn: sqlite3.Connection,
    receiver: str,
    alert: Alert,
    repeat_interval: dt.timedelta,
    now: dt.datetime,
) -> str:
    """Return ``send``, ``update`` or ``skip`` for ``alert`` and ``receiver``."""
    row = conn.execute(
        "SELECT last_sent, severity, resources_json, source_ips_json FROM alert_ledger "
        "WHERE receiver = ? AND dedup_key = ?",
        (receiver, alert.dedup_key),
    ).fetchone()
    if row is None:
        return "send"
    last_sent = dt.datetime.fromisoformat(str(row[0]))
    if now - last_sent >= repeat_interval:
        return "send"
    grew = (
        severity_rank(alert.severity) > severity_rank(str(row[1]))
        or not set(alert.resources) <= set(json.loads(row[2]))
        or not set(alert.source_ips) <= set(json.loads(row[3]))
    )
    return "update" if grew else "skip"


def _record_notified(
    conn: sqlite3.Connection, receiver: str, alert: Alert, now: dt.datetime
) -> None:
    conn.execute(
        "INSERT INTO alert_ledger (receiver, dedup_key, last_sent, severity, resources_json, "
        "source_ips_json) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (receiver, dedup_key) DO UPDATE "
        "SET last_sent = excluded.last_sent, severity = excluded.severity, "
        "resources_json = excluded.resources_json, source_ips_json = excluded.source_ips_json",
        (
            receiver,
            alert.dedup_key,
            now.astimezone(dt.UTC).isoformat(),
            alert.severity,
            json.dumps(sorted(alert.resources)),
            json.dumps(sorted(alert.source_ips)),
        ),
    )


# --- senders -----------------------------------------------------------------------------------


def alert_from_payload(payload: Mapping[str, Any]) -> Alert:
    """Rebuild an :class:`Alert` from the dict :func:`outbox.alert_payload` stored.

    The alert is built again from its findings, with their times parsed back, and keeps the
    stored title (which carries the update prefix).
    """
    findings = []
    for item in payload["findings"]:
        finding = dict(item)
        for name in ("first_seen", "last_seen"):
            if finding.get(name):
                finding[name] = pd.Timestamp(finding[name]).to_pydatetime()
        findings.append(finding)
    alert = Alert.from_findings(findings)
    return dataclasses.replace(alert, title=str(payload.get("title") or alert.title))


ChannelSend = Callable[[Alert], Delivery]


def build_senders(
    settings: AlertingSettings, output_dir: Path, now: dt.datetime
) -> dict[str, Sender]:
    """Return receiver name -> outbox sender for every receiver, ``outbox-files`` included.

    A channel whose secret is missing is reported as a ``failed`` delivery when it is used,
    so the other receivers still deliver.
    """
    renderer = Renderer(settings.templates_dir)
    return {
        name: _receiver_sender(name, settings.receiver(name), settings, renderer, output_dir, now)
        for name in settings.receiver_names()
    }


def channel_senders(
    receiver: ReceiverSettings,
    settings: AlertingSettings,
    renderer: Renderer,
    output_dir: Path,
    now: dt.datetime,
) -> dict[str, ChannelSend]:
    """Return channel name -> a function that sends one alert through that channel."""
    sends: dict[str, ChannelSend] = {}
    if receiver.slack is not None:
        slack = receiver.slack
        sends["slack"] = _guarded(
            lambda alert: SlackChannel(slack).send(renderer.render_slack(alert))
        )
    if receiver.email is not None:
        mail = receiver.email

        def send_email(alert: Alert) -> Delivery:
            message = renderer.render_email(
                alert, sender=mail.sender, recipients=mail.recipients, now=now
            )
            return EmailChannel(mail).send(message)

        sends["email"] = _guarded(send_email)
    if receiver.webhook is not None:
        hook = receiver.webhook
        sends["webhook"] = _guarded(lambda alert: WebhookChannel(hook).send(build_payload(alert)))
    if receiver.file is not None:

        def write_files(alert: Alert) -> Delivery:
            if not settings.outbox:
                return Delivery("delivered", "files disabled by alerting.outbox: false")
            slack_path, _ = write_alert_files(
                alert, output_dir / OUTBOX_DIR, renderer, settings, now=now
            )
            return Delivery("delivered", f"wrote {slack_path.name} and its .eml file")

        sends["file"] = _guarded(write_files)
    return sends


def _guarded(send: ChannelSend) -> ChannelSend:
    """Turn a missing secret or an unwritable file into a ``failed`` or ``retry`` delivery."""

    def guarded(alert: Alert) -> Delivery:
        try:
            return send(alert)
        except KeytrailError as exc:
            return Delivery("failed", str(exc))
        except OSError as exc:
            return Delivery("retry", f"{type(exc).__name__}: {exc}")

    return guarded


def _receiver_sender(
    name: str,
    receiver: ReceiverSettings,
    settings: AlertingSettings,
    renderer: Renderer,
    output_dir: Path,
    now: dt.datetime,
) -> Sender:
    sends = channel_senders(receiver, settings, renderer, output_dir, now)

    def send(row: OutboxRow) -> Delivery:
        # NOTE: a receiver with several channels is one outbox row, so a retry after one
        # channel failed sends the alert again through the channels that had delivered.
        alert = alert_from_payload(row.payload)
        results = {channel: deliver(alert) for channel, deliver in sends.items()}
        return _combine(name, results)

    return send


def _combine(receiver: str, results: Mapping[str, Delivery]) -> Delivery:
    """Return one delivery for a receiver: failed if any channel failed, else retry, else delivered."""
    statuses: tuple[DeliveryStatus, ...] = ("failed", "retry")
    for status in statuses:
        bad = {channel: result for channel, result in results.items() if result.status == status}
        if bad:
            detail = "; ".join(f"{channel}: {result.detail}" for channel, result in bad.items())
            retry_after = max((r.retry_after or 0.0 for r in bad.values()), default=0.0)
            return Delivery(status, detail, retry_after=retry_after or None)
    remote = next((r.remote_id for r in results.values() if r.remote_id), None)
    detail = "; ".join(f"{channel}: {result.detail}" for channel, result in results.items())
    return Delivery("delivered", detail or f"{receiver}: no channels", remote_id=remote)


def sample_alert(now: dt.datetime) -> Alert:
    """Return a made-up alert for ``keytrail test-alert``, titled as a test that needs no action."""
    finding = {
        "finding_id": "test-alert",
        "detector": "keytrail.test_alert",
        "severity": "low",
        "title": "keytrail test alert: delivery check, no action needed",
        "principal": "keytrail-test",
        "principal_type": "user",
        "cloud": "aws",
        "account": "000000000000",
        "resources": ["test/secret"],
        "source_ips": ["192.0.2.1"],
        "countries": [],
        "first_seen": now,
        "last_seen": now,
        "event_count": 1,
        "dedup_key": f"test-alert-{now:%Y%m%dT%H%M%S}",
        "mitre": [],
        "evidence": {},
    }
    return Alert.from_findings([finding])
