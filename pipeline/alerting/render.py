"""Render alerts with Jinja2 templates: Slack Block Kit JSON and a multipart email.

Templates are looked up in the user's folder first and in the packaged ``templates/`` folder
second, so a user overrides the wording of one channel by dropping a file with the same name
(``slack.json.j2``, ``email.html.j2``, ``email.txt.j2``) into their folder. The digest email
(``email_digest.html.j2``, ``email_digest.txt.j2``) includes ``email.txt.j2`` and the HTML
fragment ``_email_alert.html.j2`` for each alert, so overriding those changes both emails.

Templates never see raw log strings. The renderer passes a view of the alert in which every
string is already cleaned for the channel: escaped for Slack mrkdwn in ``slack.json.j2``, and
reduced to one line without control characters in the email templates. Every template except
those named ``*.json.j2`` and ``*.txt.j2`` is HTML-autoescaped, whatever its extension.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final

import jinja2

from pipeline.alerting.alerts import Alert, format_time, summary_items
from pipeline.alerting.escape import (
    clean_line,
    escape_mrkdwn,
    escape_mrkdwn_emphasis,
    header_text,
    truncate,
)
from pipeline.errors import ConfigError

__all__ = [
    "DIGEST_MAX_FULL_ALERTS",
    "DIGEST_MAX_HTML_CHARS",
    "MAX_SUBJECT_CHARS",
    "SLACK_MAX_BLOCKS",
    "SLACK_MAX_FIELDS",
    "SLACK_MAX_FIELD_CHARS",
    "SLACK_MAX_HEADER_CHARS",
    "SLACK_MAX_TEXT_CHARS",
    "Renderer",
    "TemplateOutputError",
    "digest_subject",
    "email_subject",
    "enforce_slack_limits",
]

logger = logging.getLogger(__name__)

PACKAGED_TEMPLATES: Final = Path(__file__).parent / "templates"
SLACK_TEMPLATE: Final = "slack.json.j2"
HTML_TEMPLATE: Final = "email.html.j2"
TEXT_TEMPLATE: Final = "email.txt.j2"
DIGEST_HTML_TEMPLATE: Final = "email_digest.html.j2"
DIGEST_TEXT_TEMPLATE: Final = "email_digest.txt.j2"
_SEVERITY_ORDER: Final = ("critical", "high", "medium", "low", "info")

# Slack Block Kit limits: a message has at most 50 blocks and a text object at most 3,000
# characters. A section has at most 10 fields of 2,000 characters each, a header text at most
# 150 characters, and a context block at most 10 elements.
SLACK_MAX_BLOCKS: Final = 50
SLACK_MAX_TEXT_CHARS: Final = 3000
SLACK_MAX_FIELDS: Final = 10
SLACK_MAX_FIELD_CHARS: Final = 2000
SLACK_MAX_HEADER_CHARS: Final = 150
SLACK_MAX_CONTEXT_ELEMENTS: Final = 10

MAX_SUBJECT_CHARS: Final = 180

DIGEST_MAX_FULL_ALERTS: Final = 20
"""Alerts a digest email shows in full; later ones get one line each under "N more alerts"."""
DIGEST_MAX_HTML_CHARS: Final = 500_000
"""Budget for a digest's HTML part, in characters. Fewer alerts are shown in full until the
part fits. The text part is usually smaller, so a digest stays near 1 MB or below, unless
one alert alone passes the budget: the first alert is always shown in full."""

_SEVERITY_EMOJI: Final = {
    "critical": ":red_circle:",
    "high": ":large_orange_circle:",
    "medium": ":large_yellow_circle:",
    "low": ":large_blue_circle:",
    "info": ":white_circle:",
}


class TemplateOutputError(ValueError):
    """A template failed to render, or rendered output that is invalid for its channel."""


def _autoescape(template_name: str | None) -> bool:
    # Default on: only the templates whose output is JSON or plain text are not HTML-escaped.
    if template_name is None:
        return True
    return not template_name.endswith((".json.j2", ".txt.j2"))


class Renderer:
    """Render alerts for Slack and email from Jinja2 templates.

    Args:
        templates_dir: a folder whose templates replace the packaged ones of the same name.

    Raises:
        ConfigError: if ``templates_dir`` is given but is not a folder.
    """

    def __init__(self, templates_dir: Path | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if templates_dir is not None:
            if not templates_dir.is_dir():
                raise ConfigError(
                    f"output.templates_dir: {str(templates_dir)!r} is not a folder; "
                    "set it to a folder with slack.json.j2, email.html.j2 or email.txt.j2, "
                    "or remove the key to use the packaged templates"
                )
            loaders.append(jinja2.FileSystemLoader(templates_dir))
        loaders.append(jinja2.FileSystemLoader(PACKAGED_TEMPLATES))
        self.templates_dir = templates_dir
        self.environment = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=_autoescape,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.environment.filters["no_emphasis"] = escape_mrkdwn_emphasis

    def template_path(self, name: str) -> str:
        """Return the file a template name resolves to (the user's copy or the packaged one)."""
        template = self.environment.get_template(name)
        return template.filename or name

    # Slack --------------------------------------------------------------------------------

    def render_slack(self, alert: Alert) -> dict[str, Any]:
        """Render ``alert`` as a Slack message payload (``text`` and ``blocks``).

        Findings that do not fit in 50 blocks are collapsed into a "N more findings" line, and
        every text object is cut to Slack's limits (see :func:`enforce_slack_limits`).

        Raises:
            TemplateOutputError: if the template does not render a JSON object.
        """
        total = len(alert.findings)
        message = self._slack_message(alert, findings_shown=total)
        if len(message["blocks"]) > SLACK_MAX_BLOCKS and total > 0:
            # Find the largest number of findings that still fits, assuming each finding
            # adds blocks (true for the packaged template and any template with a loop).
            low, high = 0, total - 1
            best = self._slack_message(alert, findings_shown=0)
            while low <= high:
                middle = (low + high) // 2
                candidate = self._slack_message(alert, findings_shown=middle)
                if len(candidate["blocks"]) <= SLACK_MAX_BLOCKS:
                    best, low = candidate, middle + 1
                else:
                    high = middle - 1
            message = best
        return enforce_slack_limits(message)

    def _slack_message(self, alert: Alert, *, findings_shown: int) -> dict[str, Any]:
        view = alert_view(alert, escape_mrkdwn)
        text = self._render(
            SLACK_TEMPLATE,
            alert=view,
            shown_findings=view["findings"][:findings_shown],
            hidden_findings=len(view["findings"]) - findings_shown,
            severity_emoji=_SEVERITY_EMOJI.get(alert.severity, ""),
        )
        try:
            message = json.loads(text)
        except json.JSONDecodeError as error:
            raise TemplateOutputError(
                f"{self.template_path(SLACK_TEMPLATE)} rendered invalid JSON for alert "
                f"{alert.alert_id}: {error.msg} at line {error.lineno} column {error.colno}; "
                "pass every value through the tojson filter"
            ) from None
        if not isinstance(message, dict) or not isinstance(message.get("blocks"), list):
            raise TemplateOutputError(
                f"{self.template_path(SLACK_TEMPLATE)} must render a JSON object with a "
                f"'blocks' list; got {type(message).__name__}"
            )
        return _split_fields(message)

    # Email --------------------------------------------------------------------------------

    def render_html(self, alert: Alert) -> str:
        """Render the HTML body of the alert email (autoescaped)."""
        return self._render(HTML_TEMPLATE, alert=alert_view(alert, clean_line))

    def render_text(self, alert: Alert) -> str:
        """Render the plain-text body of the alert email."""
        return self._render(TEXT_TEMPLATE, alert=alert_view(alert, clean_line))

    def render_email(
        self,
        alert: Alert,
        *,
        sender: str,
        recipients: Sequence[str],
        now: dt.datetime | None = None,
    ) -> EmailMessage:
        """Build a multipart/alternative email (plain text and HTML) for ``alert``.

        The subject is built in Python from one-line, length-capped values. The message has
        ``Date``, ``Message-ID`` and ``X-Keytrail-Alert`` (the alert's dedup key) headers.
        """
        now = now or dt.datetime.now(dt.UTC)
        message = EmailMessage(policy=email.policy.SMTP)
        message["Subject"] = email_subject(alert)
        message["From"] = sender
        message["To"] = ", ".join(recipients)
        message["Date"] = email.utils.format_datetime(now.astimezone(dt.UTC))
        domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or "localhost"
        # Built here rather than with make_msgid, which looks up this host's name when no
        # domain is given and makes lines long enough to be folded.
        message["Message-ID"] = f"<{alert.alert_id}.{secrets.token_hex(8)}@{domain}>"
        message["X-Keytrail-Alert"] = header_text(alert.dedup_key, 200)
        message.set_content(self.render_text(alert))
        message.add_alternative(self.render_html(alert), subtype="html")
        return message

    def render_email_digest(
        self,
        alerts: Sequence[Alert],
        *,
        sender: str,
        recipients: Sequence[str],
        now: dt.datetime | None = None,
    ) -> EmailMessage:
        """Build one multipart/alternative email that lists every alert in ``alerts``.

        Each alert block in the text part comes from ``email.txt.j2`` and in the HTML part
        from ``_email_alert.html.j2``, the templates of the single-alert email, so the wording
        of an alert is written once. The subject counts the alerts per severity (see
        :func:`digest_subject`).

        The first :data:`DIGEST_MAX_FULL_ALERTS` alerts are shown in full, fewer when their
        HTML would pass :data:`DIGEST_MAX_HTML_CHARS`. Each later alert gets one line (severity,
        title, actor, alert id) under a "N more alerts" heading, so no alert is left out.
        There is one ``X-Keytrail-Alert`` header per alert shown in full, in order, and an
        ``X-Keytrail-Alert-Count`` header with the number of all alerts.

        Raises:
            ValueError: ``alerts`` is empty.
        """
        if not alerts:
            raise ValueError("a digest email needs at least one alert")
        now = now or dt.datetime.now(dt.UTC)
        subject = digest_subject(alerts)
        full = min(len(alerts), DIGEST_MAX_FULL_ALERTS)
        context = self._digest_context(alerts, full, subject)
        html = self._render(DIGEST_HTML_TEMPLATE, **context)
        while len(html) > DIGEST_MAX_HTML_CHARS and full > 1:
            full = max(1, full // 2)
            context = self._digest_context(alerts, full, subject)
            html = self._render(DIGEST_HTML_TEMPLATE, **context)
        if full < len(alerts):
            logger.info(
                "digest email shows %s of %s alerts in full and lists the rest", full, len(alerts)
            )
        message = EmailMessage(policy=email.policy.SMTP)
        message["Subject"] = subject
        message["From"] = sender
        message["To"] = ", ".join(recipients)
        message["Date"] = email.utils.format_datetime(now.astimezone(dt.UTC))
        domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or "localhost"
        message["Message-ID"] = f"<digest.{secrets.token_hex(8)}@{domain}>"
        for alert in alerts[:full]:
            message["X-Keytrail-Alert"] = header_text(alert.dedup_key, 200)
        message["X-Keytrail-Alert-Count"] = str(len(alerts))
        message.set_content(self._render(DIGEST_TEXT_TEMPLATE, **context))
        message.add_alternative(html, subtype="html")
        return message

    @staticmethod
    def _digest_context(alerts: Sequence[Alert], full: int, subject: str) -> dict[str, Any]:
        """Return the digest template context with the first ``full`` alerts shown in full."""
        return {
            "alerts": [alert_view(alert, clean_line) for alert in alerts[:full]],
            "more_alerts": [_brief_view(alert) for alert in alerts[full:]],
            "total": len(alerts),
            "subject": subject,
            "severity_summary": _severity_summary(alerts),
        }

    def _render(self, name: str, **context: Any) -> str:
        try:
            template = self.environment.get_template(name)
            return template.render(**context)
        except jinja2.TemplateError as error:
            where, line = _error_location(error, name)
            at = f" line {line}" if line else ""
            raise TemplateOutputError(
                f"template {where}{at} failed to render: {error}; fix the template or remove "
                "it from output.templates_dir to use the packaged one"
            ) from error


def _error_location(error: jinja2.TemplateError, name: str) -> tuple[str, int | None]:
    """Return the template file and line of ``error``.

    Syntax errors carry both. Errors raised while rendering do not, but Jinja rewrites the
    traceback so that its innermost template frame has the template's file name and line.
    """
    filename: str | None = getattr(error, "filename", None)
    line: int | None = getattr(error, "lineno", None)
    if line is not None:
        return filename or name, line
    traceback = error.__traceback__
    while traceback is not None:
        code_file = traceback.tb_frame.f_code.co_filename
        if code_file.endswith(".j2") or code_file.endswith(name):
            filename, line = code_file, traceback.tb_lineno
        traceback = traceback.tb_next
    return filename or name, line


def email_subject(alert: Alert) -> str:
    """Return the email subject: ``[keytrail] HIGH: <title> (<principal>)``, one line.

    The principal is left out when the title already names it or the alert has none.
    """
    subject = f"[keytrail] {alert.severity.upper()}: {alert.title}"
    if alert.principal and alert.principal not in alert.title:
        subject += f" ({alert.principal})"
    return header_text(subject, MAX_SUBJECT_CHARS)


def digest_subject(alerts: Sequence[Alert]) -> str:
    """Return the digest subject: ``[keytrail] 3 alerts: 1 high, 2 medium``, one line."""
    noun = "alert" if len(alerts) == 1 else "alerts"
    subject = f"[keytrail] {len(alerts)} {noun}: {_severity_summary(alerts)}"
    return header_text(subject, MAX_SUBJECT_CHARS)


def _severity_summary(alerts: Sequence[Alert]) -> str:
    """Return the alert count per severity, most severe first, as in ``1 high, 2 medium``."""
    counts: dict[str, int] = {}
    for alert in alerts:
        counts[alert.severity] = counts.get(alert.severity, 0) + 1
    known = [name for name in _SEVERITY_ORDER if name in counts]
    others = sorted(name for name in counts if name not in _SEVERITY_ORDER)
    return ", ".join(f"{counts[name]} {name}" for name in known + others)


def alert_view(alert: Alert, clean: Callable[[str], str]) -> dict[str, Any]:
    """Return the template context for ``alert`` with every string passed through ``clean``.

    Times are formatted with :func:`format_time`, ``evidence`` and ``baseline`` become lists
    of ``{"key", "value"}`` items with ``summary`` first (see :func:`summary_items` for what
    is left out), next steps become ``{"text", "commands"}`` dicts, and locations become
    ``{"place", "ip"}`` dicts whose ``place`` is empty when GeoIP named none. Top events
    keep their keys, with missing values as empty strings.
    """
    findings = []
    for finding in alert.findings:
        item = {key: value for key, value in finding.items() if key not in ("evidence", "baseline")}
        item["first_seen"] = format_time(finding.get("first_seen"))
        item["last_seen"] = format_time(finding.get("last_seen"))
        item["evidence"] = _items(finding.get("evidence") or {})
        item["baseline"] = _items(finding.get("baseline") or {})
        findings.append(item)
    view = {
        "alert_id": alert.alert_id,
        "severity": alert.severity,
        "title": alert.title,
        "detector": alert.detector,
        "principal": alert.principal,
        "who": alert.who or alert.principal,
        "principals": alert.principals,
        "locations": [{"place": loc.place, "ip": loc.ip} for loc in alert.locations],
        # Countries no location names, shown after the addresses so that none is lost.
        "other_countries": [
            country
            for country in alert.countries
            if country not in {loc.country for loc in alert.locations}
        ],
        "dedup_key": alert.dedup_key,
        "resources": alert.resources,
        "source_ips": alert.source_ips,
        "countries": alert.countries,
        "clouds": alert.clouds,
        "accounts": alert.accounts,
        "mitre": alert.mitre,
        "geoip_build_dates": alert.geoip_build_dates,
        "first_seen": format_time(alert.first_seen),
        "last_seen": format_time(alert.last_seen),
        "event_count": alert.event_count,
        "next_steps": [{"text": s.text, "commands": list(s.commands)} for s in alert.next_steps],
        "silence_hint": alert.silence_hint,
        "findings": findings,
        "top_events": [_top_event_view(event) for event in alert.top_events],
    }
    cleaned: dict[str, Any] = _clean_tree(view, clean)
    return cleaned


def _brief_view(alert: Alert) -> dict[str, Any]:
    """Return the one-line view of an alert listed after the full ones in a digest."""
    return {
        "severity": clean_line(alert.severity),
        "title": clean_line(alert.title),
        "who": clean_line(alert.who or alert.principal),
        "first_seen": format_time(alert.first_seen),
        "alert_id": alert.alert_id,
        "finding_ids": [clean_line(str(finding["finding_id"])) for finding in alert.findings],
    }


def _top_event_view(event: dict[str, Any]) -> dict[str, Any]:
    """Return a top event with its time formatted and missing values as empty strings."""
    view = {key: "" if value is None else value for key, value in event.items()}
    time = event.get("time")
    view["time"] = format_time(time) if isinstance(time, dt.datetime) else str(time or "")
    return view


def _items(values: dict[str, Any]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in summary_items(values)]


def _clean_tree(value: Any, clean: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {key: _clean_tree(item, clean) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_tree(item, clean) for item in value]
    return value


# Slack limits ---------------------------------------------------------------------------------


def _split_fields(message: dict[str, Any]) -> dict[str, Any]:
    """Split sections with more than 10 fields into consecutive sections of at most 10."""
    blocks: list[Any] = []
    for block in message["blocks"]:
        fields = block.get("fields") if isinstance(block, dict) else None
        if not isinstance(fields, list) or block.get("type") != "section":
            blocks.append(block)
            continue
        for start in range(0, max(len(fields), 1), SLACK_MAX_FIELDS):
            part = dict(block) if start == 0 else {"type": "section"}
            part["fields"] = fields[start : start + SLACK_MAX_FIELDS]
            blocks.append(part)
    return {**message, "blocks": blocks}


def enforce_slack_limits(message: dict[str, Any]) -> dict[str, Any]:
    """Cut a Block Kit message to Slack's limits.

    Text objects are cut to 3,000 characters (headers 150, section fields 2,000) and end with
    an "… N more characters" marker. Sections with more than 10 fields are split, and context
    blocks keep their first 10 elements. A message with more than 50 blocks keeps 49 and a
    context line that counts the blocks left out. Empty texts become "-" because Slack
    rejects empty text.
    """
    message = _split_fields(message)
    blocks = []
    for block in message["blocks"]:
        if not isinstance(block, dict):
            continue
        block = dict(block)
        kind = block.get("type")
        if kind == "header":
            block["text"] = _limit_text(block.get("text"), SLACK_MAX_HEADER_CHARS)
        elif kind == "section":
            if "text" in block:
                block["text"] = _limit_text(block["text"], SLACK_MAX_TEXT_CHARS)
            if "fields" in block:
                block["fields"] = [_limit_text(f, SLACK_MAX_FIELD_CHARS) for f in block["fields"]]
        elif kind == "context":
            elements = block.get("elements") or []
            block["elements"] = [
                _limit_text(element, SLACK_MAX_TEXT_CHARS)
                for element in elements[:SLACK_MAX_CONTEXT_ELEMENTS]
            ]
        blocks.append(block)
    if len(blocks) > SLACK_MAX_BLOCKS:
        left_out = len(blocks) - (SLACK_MAX_BLOCKS - 1)
        logger.warning("Slack message cut from %s to %s blocks", len(blocks), SLACK_MAX_BLOCKS)
        blocks = blocks[: SLACK_MAX_BLOCKS - 1]
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"{left_out} more blocks left out"}],
            }
        )
    result = {**message, "blocks": blocks}
    if isinstance(result.get("text"), str):
        result["text"] = truncate(result["text"], SLACK_MAX_TEXT_CHARS) or "-"
    return result


def _limit_text(obj: Any, limit: int) -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return obj
    return {**obj, "text": truncate(obj["text"], limit) or "-"}
