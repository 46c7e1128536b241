"""Replay a window of the stored history through the detectors, one UTC day at a time.

Each day's events are the detectors' window, and the history before the day's first event is
their baseline, as in a ``keytrail run`` that reads one day of logs. A finding already found
on an earlier day of the replay is dropped, as the findings ledger of the state drops it in
daily runs. Statistical detectors start unfitted every day, so they fit on the history before
the day, as a run does when its stored state is older than ``refit_hours`` (24 by default).

A backtest reads the history and the silences and writes nothing: no state, no history, no
outputs, no messages. Alerts are counted as the findings that ``alerting.min_severity``, the
allow-list and the silences active at the end of each day leave.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from detectors.api import build
from detectors.base import FINDING_COLUMNS, empty_findings, severity_rank
from pipeline.alerting.output import findings_to_json_lines
from pipeline.alerting.routing import ALLOWED_BY, apply_allow_list
from pipeline.alerting.silences import SILENCED_BY, Silence, apply_silences
from pipeline.config import Settings
from pipeline.errors import DetectorError, InputError
from pipeline.evaluate import read_silences
from pipeline.store.history import CappedHistoryView, History

__all__ = ["BacktestDay", "BacktestReport", "backtest", "write_findings"]

logger = logging.getLogger(__name__)

_DAY = dt.timedelta(days=1)


@dataclass
class BacktestDay:
    """Counts of one replayed day, per detector."""

    day: dt.date
    events: int = 0
    findings: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready counts."""
        return {
            "day": self.day.isoformat(),
            "events": self.events,
            "findings": dict(self.findings),
            "alerts": dict(self.alerts),
        }


@dataclass
class BacktestReport:
    """The replayed days, every finding, and what the alerting filters removed."""

    since: dt.datetime
    until: dt.datetime
    detectors: list[str]
    days: list[BacktestDay] = field(default_factory=list)
    findings: pd.DataFrame = field(default_factory=empty_findings)
    allowed_by: Counter[str] = field(default_factory=Counter)
    silenced_by: Counter[str] = field(default_factory=Counter)
    below_min_severity: int = 0
    seconds: float = 0.0

    def totals(self, kind: str) -> dict[str, int]:
        """Return findings (``kind="findings"``) or alerts per detector over all days."""
        total: Counter[str] = Counter()
        for day in self.days:
            total.update(day.findings if kind == "findings" else day.alerts)
        return {detector: int(total.get(detector, 0)) for detector in self.detectors}

    def to_json(self) -> dict[str, Any]:
        """Return the window, the totals and the days as one JSON-ready object."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "detectors": list(self.detectors),
            "findings": self.totals("findings"),
            "alerts": self.totals("alerts"),
            "below_min_severity": self.below_min_severity,
            "allowed_by": dict(self.allowed_by),
            "silenced_by": dict(self.silenced_by),
            "seconds": self.seconds,
            "days": [day.to_json() for day in self.days],
        }

    def to_table(self) -> str:
        """Return a plain-text table: per detector, findings and alerts in total and per day."""
        count = max(len(self.days), 1)
        findings, alerts = self.totals("findings"), self.totals("alerts")
        header = f"{'detector':<26} {'findings':>8} {'alerts':>6} {'alerts/day':>10} {'max/day':>7}"
        lines = [
            f"backtest {self.since:%Y-%m-%d %H:%M} to {self.until:%Y-%m-%d %H:%M} UTC: "
            f"{len(self.days)} days, {sum(day.events for day in self.days)} events, "
            f"{self.seconds:.1f} s",
            header,
            "-" * len(header),
        ]
        for detector in self.detectors:
            busiest = max((day.alerts.get(detector, 0) for day in self.days), default=0)
            lines.append(
                f"{detector:<26} {findings[detector]:>8} {alerts[detector]:>6} "
                f"{alerts[detector] / count:>10.2f} {busiest:>7}"
            )
        lines.append("alerts per day: " + _per_day(self.days))
        for reason, removed in sorted(self.allowed_by.items()):
            lines.append(f"removed by allow-list {reason}: {removed}")
        for silence, removed in sorted(self.silenced_by.items()):
            lines.append(f"removed by silence {silence}: {removed}")
        if self.below_min_severity:
            lines.append(f"below min_severity: {self.below_min_severity}")
        return "\n".join(lines)


def _per_day(days: list[BacktestDay]) -> str:
    return ", ".join(f"{day.day:%m-%d} {sum(day.alerts.values())}" for day in days) or "none"


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _day_windows(since: dt.datetime, until: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
    """Cut ``[since, until)`` at UTC midnights."""
    windows = []
    start = since
    while start < until:
        midnight = dt.datetime.combine(start.date(), dt.time(0), tzinfo=dt.UTC) + _DAY
        end = min(midnight, until)
        windows.append((start, end))
        start = end
    return windows


def backtest(
    settings: Settings,
    since: dt.datetime,
    until: dt.datetime,
    detectors: Sequence[str] | None = None,
    *,
    silences: Sequence[Silence] | None = None,
) -> BacktestReport:
    """Replay the history in ``[since, until)`` through the detectors, one UTC day at a time.

    Args:
        settings: The config; its ``state_dir`` contains the history, its detector entries give
            the parameters, and its ``alerting`` section the filters.
        since: Start of the window (inclusive); a time without a zone is UTC.
        until: End of the window (exclusive).
        detectors: Detector ids to run (default: the enabled ones, in config order).
        silences: Silences to apply (default: those in ``<state_dir>/state.db``, read-only).

    Returns:
        The days, all findings in time order, and the filters' removals.

    Raises:
        ValueError: ``since`` is not before ``until``.
        InputError: the state directory has no history.
        ConfigError: an unknown detector id.
        DetectorError: a detector raised an exception.
    """
    start, end = _utc(since), _utc(until)
    if start >= end:
        raise ValueError(
            f"the backtest window is empty: since {start.isoformat()} is not before "
            f"until {end.isoformat()}"
        )
    root = settings.state_dir / "history"
    if not root.is_dir():
        raise InputError(
            f"no history in {root}; run `keytrail run` (with --since for a backfill) first"
        )
    # A backtest writes nothing and takes no lock: rollups it lacks are built in memory.
    history = History(root, read_only=True)
    chosen = list(detectors) if detectors is not None else list(settings.enabled_detectors)
    if silences is None:
        silences = read_silences(settings.state_dir / "state.db")
    report = BacktestReport(since=start, until=end, detectors=chosen)
    clock = time.perf_counter()
    seen: set[str] = set()
    frames = []
    for window_start, window_end in _day_windows(start, end):
        found, day = _replay_day(settings, history, chosen, window_start, window_end)
        if len(found):
            found = found[~found["finding_id"].isin(seen)].reset_index(drop=True)
            seen.update(found["finding_id"])
        day.findings = _count(found, chosen)
        day.alerts = _count(_alerts(found, settings, silences, window_end, report), chosen)
        report.days.append(day)
        if len(found):
            frames.append(found)
    report.seconds = round(time.perf_counter() - clock, 3)
    if frames:
        report.findings = pd.concat(frames, ignore_index=True)
    logger.info(
        "backtest %s to %s: %s days, %s findings in %.1f s",
        start.isoformat(),
        end.isoformat(),
        len(report.days),
        len(report.findings),
        report.seconds,
    )
    return report


def _replay_day(
    settings: Settings,
    history: History,
    chosen: list[str],
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> tuple[pd.DataFrame, BacktestDay]:
    """Run fresh detectors on one day of history, with the history before it as baseline."""
    day = BacktestDay(day=window_start.date())
    window = history.events(since=pd.Timestamp(window_start), until=pd.Timestamp(window_end))
    day.events = len(window)
    if window.empty:
        return empty_findings(), day
    window = window.sort_values("time", kind="stable").reset_index(drop=True)
    baseline = CappedHistoryView(history, window["time"].min())
    now = pd.Timestamp(window_end)
    results = []
    for detector in build(chosen, config=settings):
        view = baseline.for_lookback(detector.lookback)
        try:
            found = detector.detect(window, view, now)
        except Exception as exc:
            # Detectors are plugin code: whatever they raise is reported with their id.
            raise DetectorError(detector.id, f"{type(exc).__name__}: {exc}") from exc
        if len(found):
            results.append(found[list(FINDING_COLUMNS)])
    if not results:
        return empty_findings(), day
    findings = pd.concat(results, ignore_index=True).drop_duplicates(subset="finding_id")
    return findings.reset_index(drop=True), day


def _count(findings: pd.DataFrame, chosen: list[str]) -> dict[str, int]:
    counts = findings["detector"].value_counts() if len(findings) else pd.Series(dtype=int)
    return {detector: int(counts.get(detector, 0)) for detector in chosen}


def _alerts(
    findings: pd.DataFrame,
    settings: Settings,
    silences: Sequence[Silence],
    now: dt.datetime,
    report: BacktestReport,
) -> pd.DataFrame:
    """Return the findings left by min_severity, the allow-list and silences; count removals."""
    if findings.empty:
        return findings
    floor = severity_rank(settings.alerting.min_severity)
    above = findings["severity"].map(severity_rank) >= floor
    report.below_min_severity += int((~above).sum())
    kept = findings[above.to_numpy(dtype=bool)].reset_index(drop=True)
    kept, allowed = apply_allow_list(kept, settings.alerting.allow_list, now=now)
    report.allowed_by.update(str(reason) for reason in allowed.get(ALLOWED_BY, []))
    kept, silenced = apply_silences(kept, silences, now)
    report.silenced_by.update(str(silence) for silence in silenced.get(SILENCED_BY, []))
    return kept


def write_findings(path: Path, findings: pd.DataFrame) -> int:
    """Write findings to ``path`` in the findings.jsonl format and return how many."""
    path.write_bytes(b"".join(findings_to_json_lines(findings)))
    return len(findings)
