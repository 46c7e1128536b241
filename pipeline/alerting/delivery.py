"""Delivery glue: alerting settings, the repeat-interval ledger, and senders per receiver.

The engine uses this module in three steps:

1. :func:`plan_alerts` filters a run's new findings (``min_severity``, allow-list, active
   silences), routes and groups them into alerts per receiver, and copies each alert's top
   events from the run's window.
2. :func:`enqueue_alerts` runs inside the run's commit transaction. It drops alerts whose
   ``dedup_key`` the receiver was sent within ``repeat_interval``, unless the alert grew (new
   resources, new source addresses or a higher severity; then it is sent as an update), and
   queues one outbox row per (alert, receiver, channel).
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
from urllib.parse import urlsplit

import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

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
from pipeline.alerting.channels.email import port_security_mismatch, port_security_problem
from pipeline.alerting.outbox import WHOLE_RECEIVER, OutboxRow, OutboxSettings, Sender, enqueue
from pipeline.alerting.output import OUTBOX_DIR, OutputSettings, write_alert_files
from pipeline.alerting.render import Renderer
from pipeline.alerting.routing import (
    AllowEntry,
    Route,
    RoutingSettings,
    apply_allow_list,
    route_alerts,
)
from pipeline.alerting.silences import (
    InvalidSilenceError,
    Silence,
    apply_silences,
    parse_duration,
)
from pipeline.alerting.top_events import (
    DEFAULT_TOP_EVENTS,
    MAX_TOP_EVENTS,
    top_events_from_payload,
    with_top_events,
)
from pipeline.errors import ConfigError, KeytrailError
from pipeline.store.state import alert_thread, record_alert_thread

__all__ = [
    "ENV_EMAIL_RECEIVER",
    "ENV_SLACK_RECEIVER",
    "FILE_RECEIVER",
    "AlertPlan",
    "AlertingSettings",
    "FileSettings",
    "ReceiverSettings",
    "alert_from_payload",
    "build_senders",
    "channel_senders",
    "enqueue_alerts",
    "log_env_receivers",
    "plan_alerts",
    "receivers_from_env",
    "resolve_receiver_paths",
    "sample_alert",
    "secret_variable_warnings",
    "with_env_receivers",
]

logger = logging.getLogger(__name__)

FILE_RECEIVER: Final = "outbox-files"
"""Name of the built-in receiver that writes rendered alerts to ``<output_dir>/outbox``."""

ENV_SLACK_RECEIVER: Final = "slack"
"""Name of the receiver built from ``KEYTRAIL_SLACK_*`` variables when config.yaml has none."""

ENV_EMAIL_RECEIVER: Final = "email"
"""Name of the receiver built from ``KEYTRAIL_SMTP_*`` variables when config.yaml has none."""

UPDATE_PREFIX: Final = "Update: "
"""Title prefix of an alert sent again within ``repeat_interval`` because it grew."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSettings(_Strict):
    """The file channel: rendered Slack JSON and email files in ``<output_dir>/outbox``."""


class ReceiverSettings(_Strict):
    """One receiver: one or more channels that each get every alert routed to it."""

    slack: SlackSettings | None = None
    email: EmailSettings | None = None
    webhook: WebhookSettings | None = None
    file: FileSettings | None = None

    @model_validator(mode="after")
    def _needs_channel(self) -> ReceiverSettings:
        if not self.channels():
            raise ValueError("a receiver needs at least one channel: slack, email, webhook or file")
        # The channel would reject the pair at the first send, so config validation reports it.
        problem = None if self.email is None else port_security_problem(self.email)
        if problem is not None:
            raise ValueError(problem)
        return self

    def unset_secret_variables(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """List ``(setting, variable)`` for each secret variable a channel reads that is unset.

        A secret read from a file instead (``*_file``) is not listed, and neither is the SMTP
        password when the email channel has no ``username``.
        """
        needed: list[tuple[str, str]] = []
        if self.slack is not None and self.slack.mode == "webhook":
            if self.slack.webhook_url_file is None:
                needed.append(("slack.webhook_url_env", self.slack.webhook_url_env))
        elif self.slack is not None and self.slack.token_file is None:
            needed.append(("slack.token_env", self.slack.token_env))
        if self.email is not None and self.email.username and self.email.password_file is None:
            needed.append(("email.password_env", self.email.password_env))
        if self.webhook is not None:
            if self.webhook.url_file is None:
                needed.append(("webhook.url_env", self.webhook.url_env))
            if self.webhook.header_env is not None and self.webhook.header_file is None:
                needed.append(("webhook.header_env", self.webhook.header_env))
        return [(name, variable) for name, variable in needed if not _env(environ, variable)]

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
        top_events: how many of the events behind an alert it lists (0 lists none).
    """

    receivers: dict[str, ReceiverSettings] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=_default_routing)
    allow_list: list[AllowEntry] = Field(default_factory=list)
    repeat_interval: dt.timedelta = dt.timedelta(hours=4)
    delivery: OutboxSettings = Field(default_factory=OutboxSettings)
    top_events: int = Field(default=DEFAULT_TOP_EVENTS, ge=0, le=MAX_TOP_EVENTS)
    # Names of the receivers with_env_receivers added, for log_env_receivers.
    _env_receivers: list[str] = PrivateAttr(default_factory=list)

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


# --- receivers from the environment and path resolution ---------------------------------------

SLACK_WEBHOOK_URL_ENV: Final = "KEYTRAIL_SLACK_WEBHOOK_URL"
SLACK_BOT_TOKEN_ENV: Final = "KEYTRAIL_SLACK_BOT_TOKEN"
SLACK_CHANNEL_ENV: Final = "KEYTRAIL_SLACK_CHANNEL"
SMTP_HOST_ENV: Final = "KEYTRAIL_SMTP_HOST"
SMTP_PASSWORD_ENV: Final = "KEYTRAIL_SMTP_PASSWORD"

# EmailSettings field -> the variable that sets it. The password is not copied into the
# settings: EmailSettings.password_env names KEYTRAIL_SMTP_PASSWORD, read at send time.
_SMTP_FIELD_ENV: Final = {
    "host": SMTP_HOST_ENV,
    "port": "KEYTRAIL_SMTP_PORT",
    "security": "KEYTRAIL_SMTP_SECURITY",
    "username": "KEYTRAIL_SMTP_USERNAME",
    "sender": "KEYTRAIL_SMTP_FROM",
    "recipients": "KEYTRAIL_SMTP_TO",
}


def receivers_from_env(environ: Mapping[str, str]) -> dict[str, ReceiverSettings]:
    """Build the ``slack`` and ``email`` receivers that the environment variables describe.

    ``KEYTRAIL_SLACK_WEBHOOK_URL`` gives a webhook-mode ``slack`` receiver. Without it,
    ``KEYTRAIL_SLACK_BOT_TOKEN`` and ``KEYTRAIL_SLACK_CHANNEL`` together give a bot-mode one.
    ``KEYTRAIL_SMTP_HOST`` gives an ``email`` receiver configured by the other
    ``KEYTRAIL_SMTP_*`` variables. An empty variable counts as unset.

    Raises:
        ConfigError: one line per invalid or missing variable. The lines name the variable,
            never its value.
    """
    problems: list[str] = []
    receivers: dict[str, ReceiverSettings] = {}
    slack = _slack_from_env(environ, problems)
    if slack is not None:
        receivers[ENV_SLACK_RECEIVER] = ReceiverSettings(slack=slack)
    email = _email_from_env(environ, problems)
    if email is not None:
        receivers[ENV_EMAIL_RECEIVER] = ReceiverSettings(email=email)
    if problems:
        raise ConfigError(problems, source="environment")
    return receivers


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _slack_from_env(environ: Mapping[str, str], problems: list[str]) -> SlackSettings | None:
    url = _env(environ, SLACK_WEBHOOK_URL_ENV)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            problems.append(
                f"{SLACK_WEBHOOK_URL_ENV}: invalid URL; expected the https:// URL of a Slack "
                "incoming webhook"
            )
            return None
        return SlackSettings(mode="webhook", webhook_url_env=SLACK_WEBHOOK_URL_ENV)
    token = _env(environ, SLACK_BOT_TOKEN_ENV)
    channel = _env(environ, SLACK_CHANNEL_ENV)
    if token is None and channel is None:
        return None
    if token is None:
        problems.append(
            f"{SLACK_BOT_TOKEN_ENV}: missing; {SLACK_CHANNEL_ENV} is set, and bot mode needs "
            f"both (or set {SLACK_WEBHOOK_URL_ENV} for webhook mode)"
        )
        return None
    if channel is None:
        problems.append(
            f"{SLACK_CHANNEL_ENV}: missing; {SLACK_BOT_TOKEN_ENV} is set, and bot mode needs "
            "the id of the channel to post to (C0123ABCD)"
        )
        return None
    if any(char.isspace() for char in channel):
        problems.append(f"{SLACK_CHANNEL_ENV}: invalid channel id; it contains whitespace")
        return None
    return SlackSettings(mode="bot", token_env=SLACK_BOT_TOKEN_ENV, channel=channel)


def _email_from_env(environ: Mapping[str, str], problems: list[str]) -> EmailSettings | None:
    host = _env(environ, SMTP_HOST_ENV)
    if host is None:
        stray = [name for name in _SMTP_FIELD_ENV.values() if _env(environ, name) is not None]
        if stray:
            problems.append(
                f"{SMTP_HOST_ENV}: missing; set it to send email, or unset {', '.join(stray)}"
            )
        return None
    data: dict[str, Any] = {"host": host, "password_env": SMTP_PASSWORD_ENV}
    port = _env(environ, _SMTP_FIELD_ENV["port"])
    if port is not None:
        if not port.isdigit():
            problems.append(
                f"{_SMTP_FIELD_ENV['port']}: invalid port; expected an integer from 1 to 65535"
            )
            return None
        data["port"] = int(port)
    for name in ("security", "username", "sender"):
        value = _env(environ, _SMTP_FIELD_ENV[name])
        if value is not None:
            data[name] = value
    recipients = _env(environ, _SMTP_FIELD_ENV["recipients"]) or ""
    addresses = [item.strip() for item in recipients.split(",") if item.strip()]
    if addresses:
        data["recipients"] = addresses
    mismatch = _smtp_port_problem(data)
    if mismatch is not None:
        problems.append(mismatch)
        return None
    if "username" in data and _env(environ, SMTP_PASSWORD_ENV) is None:
        problems.append(
            f"{SMTP_PASSWORD_ENV}: missing; {_SMTP_FIELD_ENV['username']} is set, so the SMTP "
            "login needs a password"
        )
        return None
    try:
        return EmailSettings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_email_env_problems(exc))
        return None


def _smtp_port_problem(data: Mapping[str, Any]) -> str | None:
    """Return the problem line when the port and security variables disagree, else None.

    The channel would reject the pair at the first send. Checking here makes
    ``validate-config`` and the start of ``keytrail run`` report it, naming both variables.
    """
    port = int(data.get("port", EmailSettings.model_fields["port"].default))
    security = str(data.get("security", EmailSettings.model_fields["security"].default))
    if security not in ("starttls", "tls", "none"):
        return None  # EmailSettings reports the invalid value itself.
    mismatch = port_security_mismatch(port, security)
    if mismatch is None:
        return None
    port_env = _SMTP_FIELD_ENV["port"]
    security_env = _SMTP_FIELD_ENV["security"]
    if "port" not in data:
        mismatch += f" ({port_env} is unset and defaults to {port})"
    elif "security" not in data:
        mismatch += f" ({security_env} is unset and defaults to {security})"
    if port == 465:
        fix = f"set {security_env}=tls, or {port_env}=587 with {security_env}=starttls"
    else:
        fix = f"set {security_env}=starttls, or {port_env}=465 with {security_env}=tls"
    return f"{port_env}, {security_env}: {mismatch}; {fix}"


def _email_env_problems(exc: ValidationError) -> list[str]:
    """Return one line per invalid ``KEYTRAIL_SMTP_*`` variable, without the value found."""
    problems = []
    for error in exc.errors():
        field_name = str(error["loc"][0]) if error["loc"] else ""
        name = _SMTP_FIELD_ENV.get(field_name, field_name)
        if error["type"] == "missing":
            problems.append(f"{name}: missing; required when {SMTP_HOST_ENV} is set")
        elif field_name == "security":
            problems.append(f"{name}: invalid value; expected starttls, tls or none")
        elif field_name == "port":
            problems.append(f"{name}: invalid port; expected an integer from 1 to 65535")
        elif field_name == "recipients":
            problems.append(
                f"{name}: invalid; expected comma-separated addresses local-part@domain"
            )
        elif field_name == "sender":
            problems.append(f"{name}: invalid email address; expected local-part@domain")
        else:
            problems.append(
                f"{name}: invalid value; it must be one line without control characters"
            )
    return problems


def with_env_receivers(settings: AlertingSettings, environ: Mapping[str, str]) -> AlertingSettings:
    """Add the receivers from :func:`receivers_from_env` when config.yaml defines none.

    Every finding goes to each environment receiver and, as before, to the routes and the
    default receiver of the config. The alerts of each environment receiver are grouped by
    ``routing.group_by``. Settings that define ``receivers`` are returned unchanged, and the
    variables are then not read.

    Raises:
        ConfigError: an environment variable is invalid or missing.
    """
    if settings.receivers:
        return settings
    receivers = receivers_from_env(environ)
    if not receivers:
        return settings
    routing = settings.routing
    # Routes stop a finding from reaching the default receiver once one matched, so the
    # default receiver gets its own catch-all route after the configured ones.
    routes = [Route.model_validate({"receiver": name, "continue": True}) for name in receivers]
    routes += routing.routes
    routes.append(Route(receiver=routing.default_receiver))
    updated = settings.model_copy(
        update={
            "receivers": receivers,
            "routing": routing.model_copy(update={"routes": routes}),
        }
    )
    updated._env_receivers = list(receivers)
    return updated


def secret_variable_warnings(settings: AlertingSettings, environ: Mapping[str, str]) -> list[str]:
    """Return one warning per receiver secret variable that is unset in ``environ``.

    These are warnings, not errors, because the variables may be set only where the job runs.
    """
    warnings = []
    for name, receiver in sorted(settings.receivers.items()):
        for setting, variable in receiver.unset_secret_variables(environ):
            warnings.append(
                f"alerting.receivers.{name}.{setting}: environment variable {variable} is "
                "not set here; the receiver's deliveries fail until it is set where "
                "`keytrail run` runs"
            )
    return warnings


def log_env_receivers(settings: AlertingSettings) -> None:
    """Log at INFO which receivers :func:`with_env_receivers` built, by name only.

    Config loading runs before the CLI sets up logging, so the CLI calls this afterwards.
    """
    if settings._env_receivers:
        logger.info("receivers from environment variables: %s", ", ".join(settings._env_receivers))


def resolve_receiver_paths(receiver: ReceiverSettings, base_dir: Path) -> ReceiverSettings:
    """Resolve the relative secret and CA file paths of ``receiver``'s channels against ``base_dir``.

    The paths are ``webhook_url_file`` and ``token_file`` of Slack, ``password_file`` and
    ``ca_file`` of email, and ``url_file``, ``header_file`` and ``ca_file`` of the webhook.
    ``~`` is expanded first.
    """

    def resolve(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else base_dir / path

    update: dict[str, Any] = {}
    if receiver.slack is not None:
        slack = receiver.slack
        update["slack"] = slack.model_copy(
            update={
                "webhook_url_file": resolve(slack.webhook_url_file),
                "token_file": resolve(slack.token_file),
            }
        )
    if receiver.email is not None:
        email = receiver.email
        update["email"] = email.model_copy(
            update={
                "password_file": resolve(email.password_file),
                "ca_file": resolve(email.ca_file),
            }
        )
    if receiver.webhook is not None:
        hook = receiver.webhook
        update["webhook"] = hook.model_copy(
            update={
                "url_file": resolve(hook.url_file),
                "header_file": resolve(hook.header_file),
                "ca_file": resolve(hook.ca_file),
            }
        )
    return receiver.model_copy(update=update)


# --- planning ----------------------------------------------------------------------------------


@dataclass
class AlertPlan:
    """The alerts of one run per receiver, and what the filters removed.

    Attributes:
        alerts: ``(receiver, alerts)`` pairs in routing order.
        channels: receiver -> its channel names; each gets its own outbox row per alert.
        below_min_severity: findings below ``min_severity``.
        allowed: findings removed by the allow-list.
        allowed_by: allow-list entry (``entry <index>: <reason>``) -> findings removed.
        silenced: findings muted by active silences.
        silenced_by: silence id -> findings muted.
    """

    alerts: list[tuple[str, list[Alert]]] = field(default_factory=list)
    channels: dict[str, list[str]] = field(default_factory=dict)
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
    *,
    events: pd.DataFrame | None = None,
) -> AlertPlan:
    """Filter findings by ``min_severity``, the allow-list and silences, then route and group.

    ``events`` is the run's window (event schema). Each alert gets up to
    ``settings.top_events`` of the events its findings name; without ``events`` it gets none.
    """
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
        routed = route_alerts(frame, settings.routing)
        plan.alerts = with_top_events(routed, events, settings.top_events)
    for receiver, _ in plan.alerts:
        if receiver in settings.receiver_names():
            plan.channels[receiver] = settings.receiver(receiver).channels()
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

    Each alert gets one outbox row per channel in ``plan.channels`` (one row for the whole
    receiver when the plan names none).

    The plan has one alert per dedup key and receiver (:func:`route_alerts` merges the
    others), so only alerts sent by earlier runs hold an alert back. Held-back alerts are
    counted in ``repeats_skipped`` and logged at INFO with their dedup keys.

    Returns:
        Receiver name -> ``{"queued", "updates", "repeats_skipped"}`` counts of alerts.
    """
    counts: dict[str, dict[str, int]] = {}
    for receiver, alerts in plan.alerts:
        entry = counts.setdefault(receiver, {"queued": 0, "updates": 0, "repeats_skipped": 0})
        held_back: list[str] = []
        for alert in alerts:
            decision = _repeat_decision(conn, receiver, alert, repeat_interval, now)
            if decision == "skip":
                entry["repeats_skipped"] += 1
                held_back.append(alert.dedup_key)
                continue
            queued = alert
            if decision == "update":
                queued = dataclasses.replace(alert, title=UPDATE_PREFIX + alert.title)
                entry["updates"] += 1
            if enqueue(conn, queued, [receiver], now=now, channels=plan.channels):
                entry["queued"] += 1
            _record_notified(conn, receiver, alert, now)
        if held_back:
            logger.info(
                "receiver %s: %s held back by repeat_interval (%s), because an earlier run "
                "sent the same dedup key with nothing new; dedup keys: %s",
                receiver,
                _count_noun(len(held_back), "alert"),
                repeat_interval,
                ", ".join(held_back),
            )
    return counts


def _count_noun(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"


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
    stored title (which carries the update prefix) and top events.
    """
    findings = []
    for item in payload["findings"]:
        finding = dict(item)
        for name in ("first_seen", "last_seen"):
            if finding.get(name):
                finding[name] = pd.Timestamp(finding[name]).to_pydatetime()
        findings.append(finding)
    alert = Alert.from_findings(findings)
    return dataclasses.replace(
        alert,
        title=str(payload.get("title") or alert.title),
        top_events=top_events_from_payload(payload.get("top_events") or []),
    )


ChannelSend = Callable[[Alert], Delivery]


def build_senders(
    settings: AlertingSettings,
    output_dir: Path,
    now: dt.datetime,
    *,
    ledger: sqlite3.Connection | None = None,
) -> dict[str, Sender]:
    """Return receiver name -> outbox sender for every receiver, ``outbox-files`` included.

    A channel whose secret is missing is reported as a ``failed`` delivery when it is used,
    so the other receivers still deliver.

    With ``ledger`` (an autocommit connection to the state database), a delivered first
    message stores its ``remote_id`` in the ``alert_threads`` table, and an update of that
    alert is sent by a Slack bot channel as a reply in the first message's thread. Slack
    webhooks return no ``ts``, so there an update is a new message titled ``Update: ...``.
    """
    renderer = Renderer(settings.templates_dir)
    return {
        name: _receiver_sender(
            name, settings.receiver(name), settings, renderer, output_dir, now, ledger
        )
        for name in settings.receiver_names()
    }


def channel_senders(
    receiver: ReceiverSettings,
    settings: AlertingSettings,
    renderer: Renderer,
    output_dir: Path,
    now: dt.datetime,
    *,
    thread_of: Callable[[Alert], str | None] | None = None,
) -> dict[str, ChannelSend]:
    """Return channel name -> a function that sends one alert through that channel.

    ``thread_of`` returns the ``ts`` of the message an alert replies to; only a Slack channel
    in bot mode uses it.
    """
    sends: dict[str, ChannelSend] = {}
    if receiver.slack is not None:
        slack = receiver.slack

        def send_slack(alert: Alert) -> Delivery:
            thread_ts = None
            if slack.mode == "bot" and thread_of is not None:
                thread_ts = thread_of(alert)
            return SlackChannel(slack).send(renderer.render_slack(alert), thread_ts=thread_ts)

        sends["slack"] = _guarded(send_slack)
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
    ledger: sqlite3.Connection | None = None,
) -> Sender:
    def thread_of(alert: Alert) -> str | None:
        if ledger is None or not alert.title.startswith(UPDATE_PREFIX):
            return None
        return alert_thread(ledger, name, alert.dedup_key)

    sends = channel_senders(receiver, settings, renderer, output_dir, now, thread_of=thread_of)
    digest = None
    mail = receiver.email
    if mail is not None:

        def digest(alerts: list[Alert]) -> Delivery:
            message = renderer.render_email_digest(
                alerts, sender=mail.sender, recipients=mail.recipients, now=now
            )
            return EmailChannel(mail).send(message)

    return _ReceiverSender(name, sends, digest, now, ledger)


class _ReceiverSender:
    """The outbox sender of one receiver: each row goes out through the channel it names.

    A row of channel :data:`~pipeline.alerting.outbox.WHOLE_RECEIVER` (migrated from the
    one-row-per-receiver outbox) goes out through every channel, and its result combines
    theirs. A row naming a channel the receiver no longer has fails, so it is dead-lettered
    with the fix instead of waiting forever.

    Email rows are batched: :func:`pipeline.alerting.outbox.deliver_due` passes every due email
    row of the receiver to :meth:`send_batch`. Two or more rows become one digest built by
    :meth:`Renderer.render_email_digest`; a single row is sent as the usual single-alert
    email, so a run with one alert looks as it did before digests.
    """

    def __init__(
        self,
        name: str,
        sends: Mapping[str, ChannelSend],
        digest: Callable[[list[Alert]], Delivery] | None,
        now: dt.datetime,
        ledger: sqlite3.Connection | None,
    ) -> None:
        self._name = name
        self._sends = dict(sends)
        self._digest = digest
        self._now = now
        self._ledger = ledger
        self.channels = frozenset(self._sends)
        self.batch_channels = frozenset({"email"} & self.channels)

    def __call__(self, row: OutboxRow) -> Delivery:
        alert = alert_from_payload(row.payload)
        if row.channel == WHOLE_RECEIVER:
            results = {channel: send(alert) for channel, send in self._sends.items()}
            delivery = _combine(self._name, results)
        elif row.channel in self._sends:
            delivery = self._sends[row.channel](alert)
        else:
            return Delivery(
                "failed",
                f"receiver {self._name} has no {row.channel} channel in the config any more; "
                f"add it back and run `keytrail outbox retry {row.id}`, or leave the row dead",
            )
        first_message = not alert.title.startswith(UPDATE_PREFIX)
        threaded = row.channel in ("slack", WHOLE_RECEIVER)
        if self._ledger is not None and threaded and first_message and delivery.remote_id:
            # Stored before the outbox marks the row delivered; a crash in between sends
            # the row again, and the resent message then becomes the thread.
            record_alert_thread(
                self._ledger,
                self._name,
                row.dedup_key,
                delivery.remote_id,
                alert_id=row.alert_id,
                now=self._now,
            )
        return delivery

    def send_batch(self, rows: list[OutboxRow]) -> Delivery:
        """Send the due email rows of this receiver as one digest (one row: a plain email)."""
        if len(rows) == 1:
            return self(rows[0])
        if self._digest is None:
            # Unreachable through deliver_due: batch_channels is empty without an email channel.
            raise ValueError(f"receiver {self._name} has no email channel to send a digest")
        alerts = [alert_from_payload(row.payload) for row in rows]
        digest = self._digest
        logger.debug("sending %s alerts to %s as one digest email", len(rows), self._name)
        result = _guarded(lambda _: digest(alerts))(alerts[0])
        return _combine(self._name, {"email": result})


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
