"""The run summary: what one run read, dropped, found and wrote, and what went wrong.

:class:`RunSummary` is filled by :func:`pipeline.engine.run_once`, stored with the run row in the
state database, written as one JSON object by ``keytrail run --summary-json`` and printed with
rich at the end of ``keytrail run``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.alerting.escape import clean_line

__all__ = [
    "EXIT_DELIVERY",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "DetectorSummary",
    "RunSummary",
    "SourceSummary",
    "print_summary",
    "write_summary_json",
]

EXIT_OK = 0
EXIT_PROBLEMS = 3
EXIT_DELIVERY = 5


@dataclass
class SourceSummary:
    """Counts of one source in one run.

    ``error`` is set when the source could not be read at all (its checkpoints stayed where
    they were); ``problems`` lists what a source that was read in part could not read; ``notes``
    are facts the operator should know, such as a project with no Data Access entries.
    """

    name: str
    files_listed: int = 0
    files_unchanged: int = 0
    files_read: int = 0
    records: int = 0
    events: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    records_by_format: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        """Total quarantined records and files."""
        return sum(self.quarantined_by_reason.values())

    @property
    def behind(self) -> bool:
        """True when part or all of the source's new input was not read this run."""
        return self.error is not None or bool(self.problems)

    def behind_reason(self) -> str:
        """Return why the source is behind: its error, else its problems joined by ``; ``."""
        return self.error if self.error is not None else "; ".join(self.problems)


@dataclass
class DetectorSummary:
    """Outcome of one detector in one run. ``error`` is set when the detector raised."""

    id: str
    findings: int = 0
    new_findings: int = 0
    seconds: float = 0.0
    error: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Everything a run reports about itself.

    ``status`` is ``running`` until the run ends, then ``completed``,
    ``completed_with_problems`` (see ``problems``) or ``failed``. ``findings_pending_written``
    counts findings that earlier runs committed but did not write out, written by this run.

    ``since`` and ``until`` bound a backfill window (``None`` outside a backfill), and
    ``events_outside_window`` counts the events read but dropped because they lie outside it.
    ``findings_late`` counts new findings whose events all lie well before ``max_event_time``,
    the newest event time processed by earlier runs. ``replayed`` describes, one line per
    detector, the events it missed in earlier failed runs and checked in this one.
    """

    run_id: str
    started: datetime
    dry_run: bool = False
    status: str = "running"
    finished: datetime | None = None
    duration_seconds: float = 0.0
    sources: list[SourceSummary] = field(default_factory=list)
    events_read: int = 0
    events_new: int = 0
    events_already_seen: int = 0
    history_rows_written: int = 0
    detectors: list[DetectorSummary] = field(default_factory=list)
    findings_new: int = 0
    findings_already_written: int = 0
    findings_pending_written: int = 0
    since: datetime | None = None
    until: datetime | None = None
    events_outside_window: int = 0
    findings_late: int = 0
    max_event_time: datetime | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    alerting: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    geoip: dict[str, Any] = field(default_factory=dict)
    quarantine_file: str | None = None
    replayed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        """Quarantined records and files over all sources."""
        return sum(source.quarantined for source in self.sources)

    def quarantined_by_reason(self) -> dict[str, int]:
        """Return quarantined counts by reason over all sources."""
        totals: dict[str, int] = {}
        for source in self.sources:
            for reason, count in source.quarantined_by_reason.items():
                totals[reason] = totals.get(reason, 0) + count
        return dict(sorted(totals.items()))

    def skipped_by_kind(self) -> dict[str, int]:
        """Return skipped-record counts by kind over all sources."""
        totals: dict[str, int] = {}
        for source in self.sources:
            for kind, count in source.skipped_by_kind.items():
                totals[kind] = totals.get(kind, 0) + count
        return dict(sorted(totals.items()))

    def findings_by_detector(self) -> dict[str, int]:
        """Return new findings per detector id."""
        return {detector.id: detector.new_findings for detector in self.detectors}

    def behind(self) -> list[dict[str, str]]:
        """Return ``{"source", "reason"}`` for each source that is behind after this run.

        A source is behind when it could not be read (its checkpoints stayed where they were)
        or was read only in part (checkpoints advanced only for what was read). The next run
        reads the rest from the checkpoints.
        """
        return [
            {"source": source.name, "reason": source.behind_reason()}
            for source in self.sources
            if source.behind
        ]

    def one_line(self) -> str:
        """Return the run's outcome as one log line: status, counts, sources behind, time."""
        parts = [
            f"run {self.run_id} {self.status}",
            f"{self.events_new} events new",
            f"{self.findings_new} findings new",
        ]
        if self.findings_late:
            parts.append(f"{self.findings_late} late")
        if self.quarantined:
            parts.append(f"{self.quarantined} quarantined")
        if self.events_outside_window:
            parts.append(f"{self.events_outside_window} outside the window")
        behind = [entry["source"] for entry in self.behind()]
        if behind:
            parts.append(f"sources behind: {', '.join(behind)}")
        if self.problems:
            parts.append(f"{len(self.problems)} problems")
        parts.append(f"{self.duration_seconds:.2f} s")
        return ", ".join(parts)

    def exit_code(self, *, fail_on_quarantine: bool = False) -> int:
        """Return the process exit code: 0, 3 when a person should look, 5 when delivery failed.

        Quarantined records alone give 0 unless ``fail_on_quarantine`` is set, because they are
        kept and counted rather than lost.
        """
        if self.problems:
            return EXIT_PROBLEMS
        if fail_on_quarantine and self.quarantined:
            return EXIT_PROBLEMS
        if self.delivery_failed:
            return EXIT_DELIVERY
        return EXIT_OK

    @property
    def delivery_failed(self) -> bool:
        """True when a delivery became dead in this run or a retry is still pending."""
        if self.delivery.get("dead"):
            return True
        receivers = self.delivery.get("receivers", {})
        return any(counts.get("retry") or counts.get("deferred") for counts in receivers.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready values, with the totals spelled out."""
        data = asdict(self)
        data["started"] = _iso(self.started)
        data["finished"] = _iso(self.finished)
        data["since"] = _iso(self.since)
        data["until"] = _iso(self.until)
        data["max_event_time"] = _iso(self.max_event_time)
        data["behind"] = self.behind()
        data["records_read"] = sum(source.records for source in self.sources)
        data["quarantined"] = self.quarantined
        data["quarantined_by_reason"] = self.quarantined_by_reason()
        data["skipped_by_kind"] = self.skipped_by_kind()
        data["findings_by_detector"] = self.findings_by_detector()
        return data


def write_summary_json(summary: RunSummary, path: Path) -> None:
    """Write the summary as one JSON object, replacing ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def print_summary(summary: RunSummary, console: Console) -> None:
    """Print the summary as aligned ``key  value`` lines that wrap under their values.

    The sections are: one block of counts per source (quarantine reasons and skip kinds one
    per line), the detectors' findings, then the backfill window, events, findings, GeoIP,
    outputs, the quarantine file, problems, the sources that are behind and the run's status
    and duration. A failed source or detector is marked ``failed`` in its counts and its error
    is printed as a problem; a source read in part is marked ``partly read``. Values from configs and logs are
    printed as :class:`rich.text.Text`, so markup and emoji codes in them print as typed.
    """
    title = f"keytrail run {summary.run_id}" + (" (dry run)" if summary.dry_run else "")
    console.print()
    console.print(Text(clean_line(title), style="bold"))

    for source in summary.sources:
        console.print()
        console.print(_source_counts(source))
    if summary.detectors:
        console.print()
        console.print(_detector_counts(summary.detectors))

    console.print()
    console.print(_run_details(summary))


def _source_counts(source: SourceSummary) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    mark: Text | str = ""
    if source.error:
        mark = Text("failed", style="red")
    elif source.problems:
        mark = Text("partly read", style="yellow")
    grid.add_row(Text(f"source {clean_line(source.name)}", style="bold"), mark)
    rows = [
        ("files read", source.files_read),
        ("files unchanged", source.files_unchanged),
        ("records", source.records),
        ("events", source.events),
    ]
    for label, count in rows:
        grid.add_row(f"  {label}", str(count))
    for label, counts in (
        ("quarantined", source.quarantined_by_reason),
        ("skipped", source.skipped_by_kind),
    ):
        grid.add_row(f"  {label}", str(sum(counts.values())))
        for name, count in sorted(counts.items()):
            grid.add_row(Text(f"    {clean_line(name)}"), str(count))
    return grid


def _detector_counts(detectors: list[DetectorSummary]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    # A detector does not judge a principal whose history is too short. The last column counts
    # those principals, so that a quiet detector is not mistaken for a clean result.
    grid.add_row(Text("detectors", style="bold"), "findings", "new", "too little history")
    for detector in detectors:
        name = Text(f"  {clean_line(detector.id)}")
        skipped = detector.report.get("skipped_no_history")
        learning = str(skipped) if isinstance(skipped, int) else "-"
        if detector.error:
            grid.add_row(name, Text("failed", style="red"), "-", "-")
        else:
            grid.add_row(name, str(detector.findings), str(detector.new_findings), learning)
    return grid


def _run_details(summary: RunSummary) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")

    if summary.since is not None:
        grid.add_row("window", f"{_iso(summary.since)} to {_iso(summary.until)} (backfill)")
    events = (
        f"{summary.events_read} read, {summary.events_new} new, "
        f"{summary.events_already_seen} already seen"
    )
    if summary.since is not None:
        events += f", {summary.events_outside_window} outside the window"
    grid.add_row("events", events)
    findings = f"{summary.findings_new} new, {summary.findings_already_written} already written"
    if summary.findings_late:
        findings += f", {summary.findings_late} late"
    grid.add_row("findings", findings)
    _add_geoip(grid, summary.geoip)
    _add_outputs(grid, summary)
    if summary.quarantine_file:
        records = plural(summary.quarantined, "record")
        grid.add_row("quarantine", Text(f"{records} kept in {clean_line(summary.quarantine_file)}"))
    for replay in summary.replayed:
        grid.add_row("replayed", Text(clean_line(replay)))
    for problem in _problems(summary):
        grid.add_row(Text("problem", style="bold red"), Text(clean_line(problem)))
    for entry in summary.behind():
        grid.add_row(
            Text("behind", style="bold red"),
            Text(
                f"source {clean_line(entry['source'])}: {clean_line(entry['reason'])}; "
                "the next run reads the rest from its checkpoints"
            ),
        )

    style = "green" if summary.status == "completed" else "red"
    if summary.status == "running":
        style = ""
    status = Text.assemble((summary.status, style), f" in {summary.duration_seconds:.2f} s")
    grid.add_row("status", status)
    return grid


def _problems(summary: RunSummary) -> list[str]:
    """Return the run's problems, plus source and detector errors that none of them mentions.

    The engine records each such error in ``problems`` too, so normally nothing is added and
    no error prints twice.
    """
    problems = list(summary.problems)
    errors = [(f"source {source.name}", source.error) for source in summary.sources]
    errors += [(f"detector {detector.id}", detector.error) for detector in summary.detectors]
    for name, error in errors:
        if error and not any(error in problem for problem in summary.problems):
            problems.append(f"{name}: {error}")
    return problems


def _add_geoip(grid: Table, geoip: dict[str, Any]) -> None:
    if not geoip:
        return
    source = geoip.get("geoip_source")
    if not source:
        grid.add_row("GeoIP", "no database used")
    else:
        grid.add_row("GeoIP", Text(clean_line(str(source))))
        built = geoip.get("geoip_build_date") or "unknown"
        age = Text(f"built {built}, ")
        age.append(
            "stale" if geoip.get("stale") else "current", "yellow" if geoip.get("stale") else ""
        )
        looked_up = int(geoip.get("addresses_looked_up") or 0)
        found = int(geoip.get("addresses_found") or 0)
        age.append(f"; {found} of {plural(looked_up, 'address', 'addresses')} found")
        grid.add_row("", age)
    for warning in geoip.get("warnings") or []:
        grid.add_row(Text("warning", style="bold yellow"), Text(clean_line(str(warning))))


def _add_outputs(grid: Table, summary: RunSummary) -> None:
    outputs = summary.outputs
    if summary.findings_pending_written:
        pending = plural(summary.findings_pending_written, "finding")
        grid.add_row("pending", f"{pending} of earlier runs written")
    if not outputs:
        grid.add_row("outputs", "none (dry run)" if summary.dry_run else "none written")
        return
    findings = plural(int(outputs.get("findings_written") or 0), "finding")
    grid.add_row(
        "outputs", Text(f"{findings} appended to {clean_line(str(outputs.get('findings_file')))}")
    )
    below = int(outputs.get("below_min_severity") or 0)
    if below:
        grid.add_row("", f"{plural(below, 'finding')} below min_severity, not alerted")
    alerting = summary.alerting
    if alerting.get("allowed") or alerting.get("silenced"):
        allowed = plural(int(alerting.get("allowed") or 0), "finding")
        silenced = plural(int(alerting.get("silenced") or 0), "finding")
        grid.add_row("", f"{allowed} removed by the allow-list, {silenced} silenced")
    _add_alerts(grid, alerting)
    slack_files = int(outputs.get("slack_files") or 0)
    email_files = int(outputs.get("email_files") or 0)
    if slack_files or email_files:
        slack = plural(slack_files, "Slack file")
        emails = plural(email_files, "email file")
        grid.add_row("files", f"{slack} and {emails} written to the outbox folder")
    for name, counts in sorted(summary.delivery.get("receivers", {}).items()):
        grid.add_row(
            "delivery",
            f"{clean_line(name)}: {counts.get('sent', 0)} sent, {counts.get('retry', 0)} retry, "
            f"{counts.get('dead', 0)} dead, {counts.get('pending', 0)} pending",
        )


def _add_alerts(grid: Table, alerting: dict[str, Any]) -> None:
    """Add one line per receiver: alerts routed, queued, and held back by repeat_interval."""
    routed = alerting.get("alerts") or {}
    queued = alerting.get("queued") or {}
    for name in sorted(set(routed) | set(queued)):
        counts = queued.get(name) or {}
        line = f"{clean_line(name)}: {plural(int(routed.get(name) or 0), 'alert')} routed"
        if name in queued:
            line += f", {int(counts.get('queued') or 0)} queued"
            updates = int(counts.get("updates") or 0)
            if updates:
                line += f" ({plural(updates, 'update')})"
            held_back = int(counts.get("repeats_skipped") or 0)
            line += f", {held_back} held back by repeat_interval"
        grid.add_row("alerts", line)


def plural(count: int, noun: str, many: str | None = None) -> str:
    """Return ``count`` with ``noun``, or with ``many`` (default ``noun`` + "s") unless it is 1."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
