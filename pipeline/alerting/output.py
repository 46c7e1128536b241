"""Write a run's findings and rendered alerts to files, and print them to the console.

``write_outputs`` appends every finding to ``findings.jsonl`` and writes one
``outbox/<alert_id>.slack.json`` and one ``outbox/<alert_id>.eml`` per alert at or above
``min_severity``. Outbox files are written to a temporary name and moved into place with
:func:`os.replace`, so a crash leaves either the old file or the new one, never half a file.
Nothing here sends anything. The engine turns ``outbox`` off here and writes the same files
through the ``outbox-files`` receiver of :mod:`pipeline.alerting.delivery`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, field_validator
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from detectors.base import severity_rank
from pipeline.alerting.alerts import (
    Alert,
    alerts_from_findings,
    finding_records,
    format_time,
    to_jsonable,
)
from pipeline.alerting.escape import clean_line, truncate
from pipeline.alerting.render import Renderer

__all__ = [
    "FINDINGS_FILE",
    "MAX_CONSOLE_ALERTS",
    "OUTBOX_DIR",
    "OutputReport",
    "OutputSettings",
    "findings_to_json_lines",
    "render_console",
    "write_alert_files",
    "write_outputs",
]

logger = logging.getLogger(__name__)

FINDINGS_FILE: Final = "findings.jsonl"
OUTBOX_DIR: Final = "outbox"
MAX_CONSOLE_ALERTS: Final = 50
"""Default maximum number of alerts printed to the console. One closing line counts the rest."""
MAX_CONSOLE_VALUE: Final = 300
"""Maximum characters of one log value (title, principal, secret name) printed to the console."""

_SEVERITY_STYLE: Final = {
    "critical": "bold white on red",
    "high": "bold red",
    "medium": "yellow",
    "low": "cyan",
    "info": "dim",
}


class OutputSettings(BaseModel):
    """The ``output`` section of config.yaml.

    Attributes:
        console: print the run's alerts to the terminal.
        outbox: write rendered Slack and email files to ``<output_dir>/outbox``.
        min_severity: the lowest severity that becomes an alert; every finding still goes to
            ``findings.jsonl``.
        templates_dir: a folder with templates that replace the packaged ones by file name.
        email_from: the ``From`` address of alert emails.
        email_to: the ``To`` addresses of alert emails.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    console: bool = True
    outbox: bool = True
    min_severity: Literal["info", "low", "medium", "high", "critical"] = "low"
    templates_dir: Path | None = None
    email_from: str = "keytrail@localhost"
    email_to: list[str] = ["security@localhost"]

    @field_validator("email_from")
    @classmethod
    def _one_line_sender(cls, value: str) -> str:
        _check_address(value)
        return value

    @field_validator("email_to")
    @classmethod
    def _one_line_recipients(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one address")
        for address in value:
            _check_address(address)
        return value


def _check_address(value: str) -> None:
    if value != clean_line(value) or not value:
        raise ValueError(f"{value!r} is not a single-line email address")
    if "@" not in value:
        raise ValueError(f"{value!r} is not an email address (no '@')")


@dataclass
class OutputReport:
    """Paths written and alerts built by :func:`write_outputs`."""

    findings_path: Path
    findings_written: int = 0
    alerts: list[Alert] = field(default_factory=list)
    below_min_severity: int = 0
    slack_files: list[Path] = field(default_factory=list)
    email_files: list[Path] = field(default_factory=list)


def write_outputs(
    findings: pd.DataFrame,
    output_dir: Path,
    settings: OutputSettings | None = None,
    *,
    console: Console | None = None,
    now: dt.datetime | None = None,
) -> OutputReport:
    """Append ``findings`` to ``findings.jsonl`` and write the alerts' outbox files.

    ``findings.jsonl`` is created even when ``findings`` is empty.

    Args:
        findings: a frame with :data:`detectors.base.FINDING_COLUMNS`.
        output_dir: created if missing.
        settings: output settings; defaults to :class:`OutputSettings()`.
        console: where alerts are printed when ``settings.console`` is true (default: stdout).
        now: the ``Date`` of the emails (default: the current time).

    Returns:
        the paths written and the alerts built.
    """
    settings = settings or OutputSettings()
    output_dir.mkdir(parents=True, exist_ok=True)
    report = OutputReport(findings_path=output_dir / FINDINGS_FILE)

    lines = findings_to_json_lines(findings)
    _append_lines(report.findings_path, lines)
    report.findings_written = len(lines)

    floor = severity_rank(settings.min_severity)
    alerts = alerts_from_findings(findings)
    report.alerts = [alert for alert in alerts if severity_rank(alert.severity) >= floor]
    report.below_min_severity = len(alerts) - len(report.alerts)

    if settings.outbox and report.alerts:
        renderer = Renderer(settings.templates_dir)
        for alert in report.alerts:
            slack_path, email_path = write_alert_files(
                alert, output_dir / OUTBOX_DIR, renderer, settings, now=now
            )
            report.slack_files.append(slack_path)
            report.email_files.append(email_path)

    if settings.console:
        render_console(report.alerts, console or Console(), findings_path=report.findings_path)

    if settings.outbox:
        logger.info(
            "wrote %s findings to %s, and a Slack and an email file for each of the %s at or "
            "above %s to %s",
            report.findings_written,
            report.findings_path,
            len(report.slack_files),
            settings.min_severity,
            output_dir / OUTBOX_DIR,
        )
    else:
        logger.info("wrote %s findings to %s", report.findings_written, report.findings_path)
    return report


def write_alert_files(
    alert: Alert,
    outbox_dir: Path,
    renderer: Renderer,
    settings: OutputSettings,
    *,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Write ``<alert_id>.slack.json`` and ``<alert_id>.eml`` for ``alert`` into ``outbox_dir``.

    Returns:
        The Slack file and the email file, in that order.
    """
    outbox_dir.mkdir(parents=True, exist_ok=True)
    slack = renderer.render_slack(alert)
    slack_path = outbox_dir / f"{alert.alert_id}.slack.json"
    slack_text = json.dumps(slack, ensure_ascii=False, indent=2) + "\n"
    _write_atomic(slack_path, slack_text.encode())

    message = renderer.render_email(
        alert, sender=settings.email_from, recipients=settings.email_to, now=now
    )
    email_path = outbox_dir / f"{alert.alert_id}.eml"
    _write_atomic(email_path, message.as_bytes())
    return slack_path, email_path


def findings_to_json_lines(findings: pd.DataFrame) -> list[bytes]:
    """Serialize each finding as one JSON line (UTF-8, ending in a newline).

    Every column of :data:`detectors.base.FINDING_COLUMNS` is present; times are ISO 8601 UTC
    strings ending in ``Z``; lists and dicts stay JSON arrays and objects.
    """
    lines = []
    for record in finding_records(findings):
        text = json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False)
        lines.append(text.encode() + b"\n")
    return lines


def render_console(
    alerts: Sequence[Alert] | pd.DataFrame,
    console: Console,
    *,
    limit: int = MAX_CONSOLE_ALERTS,
    findings_path: Path | None = None,
) -> None:
    """Print new findings, given as a findings frame or one alert per finding, one block each.

    The heading counts findings, because the console shows them before the allow-list,
    silences and grouping decide which alerts the receivers get.

    Each block starts with a bold ``SEVERITY  detector  principal`` line, followed by indented
    ``title``, ``secrets``, ``where``, ``when`` and ``account`` lines whose values wrap under
    themselves, so the blocks stay readable from 80 columns up. At most ``limit`` alerts are
    printed, the most severe first (alerts of equal severity keep the order given), followed
    by a line that counts the rest and names ``findings_path`` when it is given.

    Log strings are cleaned of control characters, cut to :data:`MAX_CONSOLE_VALUE` characters
    and passed as :class:`rich.text.Text`, which rich does not parse for markup or emoji codes,
    so ``[bold]``, ``:secret:`` or an ANSI escape sequence in a value prints as text.
    """
    if isinstance(alerts, pd.DataFrame):
        alerts = alerts_from_findings(alerts)
    if not alerts:
        console.print("No new findings.")
        return

    # Each block is one finding: routing, the allow-list and silences apply later, to alerts.
    noun = "finding" if len(alerts) == 1 else "findings"
    heading = f"keytrail: {len(alerts)} new {noun}"
    printed = sorted(alerts, key=lambda alert: -severity_rank(alert.severity))[: max(limit, 0)]
    if len(printed) < len(alerts):
        heading += f", the {len(printed)} most severe shown"
    console.print(Text(heading, style="bold"))

    for alert in printed:
        console.print()
        console.print(_alert_heading(alert))
        console.print(Padding(_alert_details(alert), (0, 0, 0, 2), expand=False))

    hidden = len(alerts) - len(printed)
    if hidden:
        place = f"in {findings_path}" if findings_path is not None else "not shown"
        console.print()
        console.print(Text(f"{hidden} more {'finding' if hidden == 1 else 'findings'} {place}"))


def _alert_heading(alert: Alert) -> Table:
    # A grid, not one Text, so a principal too long for the line wraps under the detector
    # instead of starting again at the left margin.
    heading = Table.grid(padding=(0, 2))
    heading.add_column(no_wrap=True, min_width=len("CRITICAL"))
    heading.add_column(overflow="fold")
    heading.add_row(
        Text(alert.severity.upper(), style=_SEVERITY_STYLE.get(alert.severity, "")),
        Text.assemble(
            (_safe_value(alert.detector), "bold"),
            "  ",
            (_safe_value(alert.principal or alert.who), "bold"),
        ),
    )
    return heading


def _alert_details(alert: Alert) -> Table:
    details = Table.grid(padding=(0, 2))
    details.add_column(style="dim", no_wrap=True)
    details.add_column(overflow="fold")
    details.add_row("title", Text(_safe_value(alert.title)))
    details.add_row("secrets", Text("\n".join(_first_and_more(alert.resources, 3))))
    details.add_row("where", Text(_where(alert)))
    details.add_row("when", Text(_when(alert)))
    account = " ".join([*alert.clouds, *alert.accounts])
    if account:
        details.add_row("account", Text(_safe_value(account)))
    return details


def _safe_value(text: str) -> str:
    # One line with no control characters, cut so a huge log value cannot flood the terminal.
    # Callers wrap the result in Text, which is neither markup nor emoji code.
    return truncate(clean_line(text), MAX_CONSOLE_VALUE)


def _first_and_more(values: Sequence[str], limit: int) -> list[str]:
    shown = [_safe_value(value) for value in values[:limit]]
    if len(values) > limit:
        shown.append(f"and {len(values) - limit} more")
    return shown or ["-"]


def _where(alert: Alert) -> str:
    """Return each address with its own place, then countries that no address carries."""
    located = [_safe_value(location.text) for location in alert.locations]
    shown = located[:3]
    if len(located) > 3:
        shown.append(f"and {len(located) - 3} more")
    placed = {location.country for location in alert.locations if location.country}
    shown.extend(_safe_value(country) for country in alert.countries if country not in placed)
    return "; ".join(shown) or "-"


def _when(alert: Alert) -> str:
    if alert.first_seen is None:
        return "-"
    start = format_time(alert.first_seen)
    end = format_time(alert.last_seen or alert.first_seen)
    if end == start:
        text = start
    elif end[:10] == start[:10]:
        # Same UTC day: "2026-10-10 01:12:00 to 02:42:30 UTC".
        text = f"{start.removesuffix(' UTC')} to {end[11:]}"
    else:
        text = f"{start} to {end}"
    events = alert.event_count
    return f"{text}, {events} {'event' if events == 1 else 'events'}" if events else text


def _append_lines(path: Path, lines: Sequence[bytes]) -> None:
    """Append ``lines`` to ``path`` in one write, never changing bytes already in the file.

    If an earlier run crashed in the middle of a line, a newline is written first so the new
    lines start on a line of their own. With no lines the file is only created, so a run
    without findings still leaves a findings file that other commands can read.
    """
    if not lines:
        path.touch(exist_ok=True)
        return
    data = b"".join(lines)
    with path.open("ab") as handle:
        if handle.tell() > 0:
            with path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    logger.warning("%s did not end with a newline; starting a new line", path)
                    data = b"\n" + data
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
