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
from rich.markup import escape
from rich.table import Table

__all__ = [
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


@dataclass
class SourceSummary:
    """Counts of one source in one run. ``error`` is set when the source could not be read."""

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

    @property
    def quarantined(self) -> int:
        """Total quarantined records and files."""
        return sum(self.quarantined_by_reason.values())


@dataclass
class DetectorSummary:
    """Outcome of one detector in one run. ``error`` is set when the detector raised."""

    id: str
    findings: int = 0
    new_findings: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunSummary:
    """Everything a run reports about itself.

    ``status`` is ``running`` until the run ends, then ``completed``,
    ``completed_with_problems`` (see ``problems``) or ``failed``.
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
    outputs: dict[str, Any] = field(default_factory=dict)
    geoip: dict[str, Any] = field(default_factory=dict)
    quarantine_file: str | None = None
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

    def exit_code(self, *, fail_on_quarantine: bool = False) -> int:
        """Return the process exit code this run calls for: 0, or 3 when a person should look.

        Quarantined records alone give 0 unless ``fail_on_quarantine`` is set, because they are
        kept and counted rather than lost.
        """
        if self.problems:
            return EXIT_PROBLEMS
        if fail_on_quarantine and self.quarantined:
            return EXIT_PROBLEMS
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready values, with the totals spelled out."""
        data = asdict(self)
        data["started"] = _iso(self.started)
        data["finished"] = _iso(self.finished)
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
    """Print the summary as tables: sources, detectors, then totals and problems."""
    title = f"keytrail run {summary.run_id}" + (" (dry run)" if summary.dry_run else "")
    sources = Table(title=title, title_justify="left")
    for name in (
        "source",
        "files read",
        "unchanged",
        "records",
        "events",
        "quarantined",
        "skipped",
    ):
        sources.add_column(name, justify="left" if name == "source" else "right")
    for source in summary.sources:
        sources.add_row(
            escape(source.name),
            str(source.files_read),
            str(source.files_unchanged),
            str(source.records),
            str(source.events),
            _counts(source.quarantined_by_reason),
            _counts(source.skipped_by_kind),
        )
    console.print(sources)

    detectors = Table(title="detectors", title_justify="left")
    for name in ("detector", "findings", "new", "error"):
        detectors.add_column(name, justify="right" if name in ("findings", "new") else "left")
    for detector in summary.detectors:
        error = f"[red]{escape(detector.error)}[/red]" if detector.error else ""
        detectors.add_row(
            escape(detector.id), str(detector.findings), str(detector.new_findings), error
        )
    console.print(detectors)

    console.print(
        f"events: {summary.events_read} read, {summary.events_new} new, "
        f"{summary.events_already_seen} already seen; findings: {summary.findings_new} new, "
        f"{summary.findings_already_written} already written; "
        f"{summary.duration_seconds:.2f} s"
    )
    if summary.geoip:
        stale = " [yellow](stale)[/yellow]" if summary.geoip.get("stale") else ""
        console.print(
            f"GeoIP: {escape(str(summary.geoip.get('geoip_source')))}, built "
            f"{summary.geoip.get('geoip_build_date')}{stale}"
        )
        for warning in summary.geoip.get("warnings") or []:
            console.print(f"[yellow]warning:[/yellow] {escape(str(warning))}")
    if summary.outputs:
        console.print(f"outputs: {escape(json.dumps(summary.outputs, default=str))}")
    if summary.quarantine_file:
        console.print(f"quarantined records kept in {escape(summary.quarantine_file)}")
    for problem in summary.problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "0"
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
