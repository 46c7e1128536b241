"""One keytrail run: read new logs, keep new events, detect, commit state, write outputs.

:func:`run_once` is the only entry point the CLI, the scheduler and notebooks use. Its body is
the steps of a run, each a call into the package that owns it. Under the state lock it:

1. deletes history files of earlier runs that never committed (killed or failed), and writes
   the outputs still pending from earlier runs;
2. reads what is new in each source and quarantines what cannot be parsed;
3. drops events already seen, enriches the rest, records the run as started and appends the
   events to the history;
4. runs each enabled detector on the new window with a baseline from the history, then gives
   each detector the events it missed because it failed in earlier runs
   (:data:`MISSED_CHECKPOINTS`), read back from the history;
5. drops findings already in the ledger;
6. filters the new findings for alerting (``min_severity``, allow-list, active silences) and
   routes and groups them into alerts per receiver;
7. commits seen events, the findings ledger, one pending output row per new finding (the finding
   as JSON), one outbox row per (alert, receiver) not sent within ``repeat_interval``,
   checkpoints (with the span of events each detector that failed now did not check) and the
   run row in one transaction;
8. writes findings.jsonl and the console output, then marks them written in a second, small
   transaction;
9. delivers every due outbox row, this run's and those left pending or retrying by earlier runs,
   through the receivers' channels (the built-in ``outbox-files`` receiver writes the rendered
   files to ``output_dir/outbox``);
10. expires old history (counted back from the newest event time in the history, at most the
    run time) and old seen ids (counted back from the run time), and finishes the summary.

Crash safety: a failure before the commit deletes this run's history files and leaves the state
as it was, so the next run reads the same input again and deduplication absorbs the overlap. A
run killed before the commit leaves a ``started`` run row, and step 1 of the next run deletes its
history files. A crash after the commit loses nothing, because step 1 of the next run writes the
pending outputs and its step 9 delivers the queued outbox rows. A crash after the outputs were
written but before they were marked written is the one ambiguous case: the next run writes those
findings again, so findings.jsonl contains at most one duplicate line per finding. Delivery is
at-least-once per (alert, receiver), as :mod:`pipeline.alerting.outbox` describes. The tests kill
a run at each of :data:`CRASH_POINTS` through the ``KEYTRAIL_TEST_CRASH_AT`` environment variable
(:func:`_crash_point`) and check that the next run ends with the same history, findings and
outbox files as one run that was never interrupted.

Backfill: ``since`` and ``until`` ask every source for a time window, and the engine keeps only
events with ``since <= time < until``. A backfill stores no source checkpoints, because a source
may read more than the window (whole files, whole day partitions) and its checkpoints would then
mark input as read whose events outside the window were dropped. The next regular run therefore
reads from the checkpoints as before, and deduplication drops what the backfill stored.

Late events: the ``_engine`` checkpoints keep ``max_event_time``, the newest event time any run
has committed. A new finding whose events all lie more than :data:`LATE_TOLERANCE` before it
is marked late: ``evidence["late"]`` is true and its title ends with ``(late)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from detectors.base import (
    FINDING_COLUMNS,
    FrameHistory,
    HistoryView,
    StatisticalDetector,
    empty_findings,
)
from pipeline.alerting import OutputSettings, findings_to_json_lines, render_console, write_outputs
from pipeline.alerting.delivery import (
    FILE_RECEIVER,
    AlertPlan,
    build_senders,
    enqueue_alerts,
    plan_alerts,
)
from pipeline.alerting.outbox import Outbox, deliver_due
from pipeline.alerting.silences import SilenceStore
from pipeline.config import Settings, build_detectors
from pipeline.enrich import enrich_events
from pipeline.errors import DetectorError, KeytrailError, StateError
from pipeline.formats.base import Quarantined
from pipeline.schema import empty_events
from pipeline.sources import FilesSource, Source, SourceBatch, build_source
from pipeline.store.history import CappedHistoryView, History
from pipeline.store.state import DetectorState, State, state_lock
from pipeline.summary import DetectorSummary, RunSummary, SourceSummary, plural

__all__ = [
    "COMMAND_LINE_SOURCE",
    "CRASH_EXIT_CODE",
    "CRASH_POINTS",
    "CRASH_POINT_VARIABLE",
    "ENGINE_CHECKPOINTS",
    "LATE_TOLERANCE",
    "MISSED_CHECKPOINTS",
    "run_once",
]

logger = logging.getLogger(__name__)

COMMAND_LINE_SOURCE = "command_line"
"""Name under which ``--source`` paths keep their checkpoints."""

ENGINE_CHECKPOINTS = "_engine"
"""Checkpoint source name of the engine's own marks; config rejects source names with ``_``."""

MAX_EVENT_TIME = "max_event_time"
"""Key of the newest committed event time (ISO 8601 UTC) under :data:`ENGINE_CHECKPOINTS`."""

MISSED_CHECKPOINTS = "_missed"
"""Checkpoint source of the events detectors missed: detector id -> ``{"since", "until"}``.

A detector that raises has not checked the run's events, which the run still commits as seen.
The span of those events is kept here, and the next run gives the detector those events again,
read from the history (:func:`_replay_missed`). Spans of several failed runs merge into one.
"""

REPLAY_SPAN = timedelta(days=1)
"""How much of a missed span one run gives a detector. The rest stays queued for later runs: a
detector that failed for a week then does not read a week of raw events in one run."""

LATE_TOLERANCE = timedelta(hours=1)
"""How far before ``max_event_time`` a finding's last event must lie for the finding to be late.

Sources deliver in batches a few minutes apart (CloudTrail about every 5 minutes), so a finding
a few minutes older than the newest event is normal and not marked.
"""

CRASH_POINT_VARIABLE = "KEYTRAIL_TEST_CRASH_AT"
"""Environment variable that names a crash point; only the crash-safety tests set it."""

CRASH_EXIT_CODE = 86
"""Exit code of a process ended at a crash point."""

CRASH_POINTS = (
    "after_pending_outputs",
    "after_read",
    "after_history",
    "before_commit",
    "after_commit",
    "before_mark_written",
    "after_outputs",
    "after_delivery",
    "after_expire",
)
"""The named points of a run, in run order, at which :func:`_crash_point` can end the process."""


def run_once(
    settings: Settings,
    *,
    sources_override: Sequence[str | os.PathLike[str]] | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> RunSummary:
    """Run keytrail once and return its summary.

    Args:
        settings: validated settings, paths resolved.
        sources_override: local files or folders read instead of the configured sources.
        now: the run time detectors and retention use (default: the current time, UTC).
        dry_run: read and detect, print findings to ``console``, but write no outputs, no
            history and no state.
        console: where findings are printed when ``alerting.console`` is on (or in a dry run).
        since: start of a backfill window (inclusive); a time without a zone is UTC.
        until: end of the backfill window (exclusive; default ``now``). Needs ``since``.

    Raises:
        ValueError: ``until`` without ``since``, or ``since`` not before ``until``.
        StateLockedError: another run holds the state directory's lock.
        StateError: the state database cannot be used or the commit failed.
    """
    started = datetime.now(UTC)
    run_now = _utc_timestamp(now if now is not None else started)
    window = _window(since, until, run_now)
    summary = RunSummary(run_id=_new_run_id(started), started=started, dry_run=dry_run)
    if window is not None:
        summary.since, summary.until = window
    sources = _sources(settings, sources_override)
    clock = time.perf_counter()
    logger.info("run %s started: %s sources, dry_run=%s", summary.run_id, len(sources), dry_run)

    state_path = settings.state_dir / "state.db"
    if dry_run:
        with State(state_path, read_only=True) as state:
            _run(settings, sources, state, summary, run_now, console)
    else:
        with state_lock(settings.state_dir), State(state_path) as state:
            _run(settings, sources, state, summary, run_now, console)

    summary.duration_seconds = round(time.perf_counter() - clock, 3)
    logger.info(
        "run finished: %s",
        summary.one_line(),
        extra={
            "run_id": summary.run_id,
            "status": summary.status,
            "events_new": summary.events_new,
            "findings_new": summary.findings_new,
            "sources_behind": [entry["source"] for entry in summary.behind()],
        },
    )
    return summary


def _utc_timestamp(moment: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)


def _window(
    since: datetime | None, until: datetime | None, now: pd.Timestamp
) -> tuple[datetime, datetime] | None:
    """Return the backfill window as UTC datetimes, or None when there is none.

    Raises:
        ValueError: ``until`` without ``since``, or ``since`` not before ``until``.
    """
    if since is None:
        if until is not None:
            raise ValueError("a backfill window needs a start: give since with until")
        return None
    start = _utc_timestamp(since)
    end = _utc_timestamp(until) if until is not None else now
    if start >= end:
        raise ValueError(
            f"the backfill window is empty: since {start.isoformat()} is not before "
            f"until {end.isoformat()}"
        )
    return start.to_pydatetime(), end.to_pydatetime()


def _run(
    settings: Settings,
    sources: list[Source],
    state: State,
    summary: RunSummary,
    now: pd.Timestamp,
    console: Console | None,
) -> None:
    dry_run = summary.dry_run
    history_root = settings.state_dir / "history"
    if not dry_run:
        _remove_uncommitted_history(History(history_root), state)
        _write_pending_outputs(settings, state, summary, console, now)
        _crash_point("after_pending_outputs")

    mark = _max_event_time(state)
    summary.max_event_time = None if mark is None else mark.to_pydatetime()
    batches = _read_sources(sources, state, summary)
    quarantined = [item for batch in batches for item in batch.result.quarantined]
    if quarantined and not dry_run:
        path = _write_quarantine(settings.state_dir, summary.run_id, quarantined)
        summary.quarantine_file = str(path)
    _crash_point("after_read")

    events = _new_events(batches, state, summary)
    events, enrich_info = enrich_events(events, settings.enrich.geoip, now=now)
    summary.geoip = _as_dict(enrich_info)
    logger.info(
        "enrich: %s addresses looked up, %s found, GeoIP %s",
        summary.geoip.get("addresses_looked_up"),
        summary.geoip.get("addresses_found"),
        summary.geoip.get("geoip_source"),
    )

    history = (
        History(history_root, read_only=dry_run) if not dry_run or history_root.exists() else None
    )
    baseline = _baseline(history, events)
    fitted: list[DetectorState] = []
    if dry_run:
        findings = _detect(settings, events, baseline, now, state, summary)
        findings = _fill_geoip_date(findings, enrich_info)
        findings = _mark_late(findings, mark, summary)
        if console is not None:
            render_console(findings, console)
        summary.status = "completed_with_problems" if summary.problems else "completed"
        summary.finished = datetime.now(UTC)
        return

    assert history is not None
    state.record_started_run(summary.run_id, started=summary.started)
    try:
        summary.history_rows_written = history.append(events, summary.run_id) if len(events) else 0
        logger.info("history: %s rows appended", summary.history_rows_written)
        _crash_point("after_history")
        findings = _detect(settings, events, baseline, now, state, summary, fitted)
        missed_spans = state.checkpoints(MISSED_CHECKPOINTS)
        missed, progress = _replay_missed(settings, history, now, state, summary, missed_spans)
        if len(findings) and len(missed):
            findings = pd.concat([findings, missed], ignore_index=True)
            findings = findings.drop_duplicates(subset=["finding_id"]).reset_index(drop=True)
        elif len(missed):
            findings = missed
        findings = _fill_geoip_date(findings, enrich_info)
        findings = _mark_late(findings, mark, summary)
        try:
            pending = _finding_texts(findings)
        except ValueError as exc:
            summary.problems.append(f"outputs: invalid findings: {exc}")
            _roll_back(history, state, summary, f"findings could not be serialized: {exc}")
            return
        plan = _plan_alerts(settings, state_path_of(settings), findings, events, summary, now)
        queued: dict[str, dict[str, int]] = {}

        def enqueue_in_commit(conn: sqlite3.Connection) -> None:
            queued.update(
                enqueue_alerts(conn, plan, settings.alerting.repeat_interval, now.to_pydatetime())
            )

        summary.status = "completed_with_problems" if summary.problems else "completed"
        summary.finished = datetime.now(UTC)
        checkpoints, checkpoints_removed = _checkpoints_to_store(batches, events, mark, summary)
        _add_missed_checkpoints(
            missed_spans, events, summary, progress, checkpoints, checkpoints_removed
        )
        _crash_point("before_commit")
        state.commit_run(
            summary.run_id,
            started=summary.started,
            events=events,
            findings=findings,
            checkpoints=checkpoints,
            checkpoints_removed=checkpoints_removed,
            summary=summary.to_dict(),
            status=summary.status,
            pending_outputs=pending,
            in_transaction=enqueue_in_commit,
            detector_states=fitted,
        )
        summary.alerting["queued"] = queued
        logger.info("state: committed %s events, %s findings", len(events), len(findings))
    except BaseException as exc:
        _roll_back(history, state, summary, f"{type(exc).__name__}: {exc}")
        raise

    # From here on the run is committed: a failure leaves its findings pending for the next run.
    _crash_point("after_commit")
    _write_outputs(settings, state, findings, summary, console, now)
    _crash_point("after_outputs")
    _deliver(settings, summary, now)
    _crash_point("after_delivery")
    _expire(settings, history, state, summary, now)
    _crash_point("after_expire")
    if summary.problems and summary.status == "completed":
        summary.status = "completed_with_problems"
    try:
        state.update_run(summary.run_id, status=summary.status, summary=summary.to_dict())
    except sqlite3.Error as exc:
        logger.error("run %s: could not store the final summary: %s", summary.run_id, exc)


def _remove_uncommitted_history(history: History, state: State) -> None:
    """Delete the history files of runs that never committed, and mark killed runs.

    A run records itself as ``started`` before it appends to the history, so a run killed before
    its commit is found here. Files of run ids the state does not know are kept, because they
    may be all that remains of a state database that was moved away.
    """
    uncommitted = state.uncommitted_runs()
    for run_id in sorted(history.run_ids() & uncommitted):
        removed = history.delete_run(run_id)
        logger.warning(
            "history: deleted %s files of run %s, which ended before its commit", removed, run_id
        )
    interrupted = state.mark_runs_interrupted(uncommitted)
    if interrupted:
        logger.warning("state: %s earlier runs ended before their commit", interrupted)


def _write_pending_outputs(
    settings: Settings,
    state: State,
    summary: RunSummary,
    console: Console | None,
    now: pd.Timestamp,
) -> None:
    """Write the findings that earlier runs committed but did not write out."""
    pending = state.pending_outputs()
    if not pending:
        return
    logger.warning("outputs: %s findings of earlier runs are still pending", len(pending))
    frame = _findings_from_texts([text for _, text in pending])
    try:
        report = write_outputs(
            frame,
            settings.output_dir,
            _without_files(settings),
            console=console,
            now=now.to_pydatetime(),
        )
    except (KeytrailError, OSError, ValueError) as exc:
        summary.problems.append(
            f"outputs: could not write {len(pending)} pending findings to {settings.output_dir}: "
            f"{exc}; they stay pending"
        )
        logger.error("outputs: pending findings could not be written: %s", exc)
        return
    # A crash before the next line is the ambiguous case: these findings are written again.
    state.mark_outputs_written(finding_id for finding_id, _ in pending)
    summary.findings_pending_written = report.findings_written
    logger.info("outputs: %s pending findings of earlier runs written", report.findings_written)


def _sources(settings: Settings, override: Sequence[str | os.PathLike[str]] | None) -> list[Source]:
    if override is not None:
        return [FilesSource(COMMAND_LINE_SOURCE, list(override))]
    return [build_source(source) for source in settings.sources]


def _read_sources(sources: list[Source], state: State, summary: RunSummary) -> list[SourceBatch]:
    """Read each source; a source that cannot be read is reported and the others go on."""
    batches = []
    for source in sources:
        entry = SourceSummary(name=source.name)
        summary.sources.append(entry)
        try:
            batch = source.read(
                state.checkpoints(source.name), since=summary.since, until=summary.until
            )
        except (KeytrailError, OSError) as exc:
            _source_failed(entry, summary, str(exc))
            continue
        except Exception as exc:
            # Source modules call cloud SDKs, which raise their own exception types; any of them
            # makes this source behind, never the whole run.
            logger.debug("source %s raised", source.name, exc_info=exc)
            _source_failed(entry, summary, f"{type(exc).__name__}: {exc}")
            continue
        counts = batch.result.summary()
        entry.files_listed = batch.files_listed
        entry.files_unchanged = batch.files_unchanged
        entry.files_read = batch.files_listed - batch.files_unchanged
        entry.records = counts["records"]
        entry.events = counts["events"]
        entry.quarantined_by_reason = counts["quarantined_by_reason"]
        entry.skipped_by_kind = counts["skipped_by_kind"]
        entry.records_by_format = counts["records_by_format"]
        entry.problems = list(batch.problems)
        entry.notes = list(batch.notes)
        summary.problems.extend(f"source {source.name}: {problem}" for problem in batch.problems)
        for note in batch.notes:
            logger.warning("source %s: %s", source.name, note)
        batches.append(batch)
        logger.info(
            "source %s: %s files read, %s unchanged, %s records, %s events, %s quarantined",
            source.name,
            entry.files_read,
            entry.files_unchanged,
            entry.records,
            entry.events,
            entry.quarantined,
        )
        if entry.quarantined:
            logger.warning(
                "source %s: %s records quarantined by reason %s",
                source.name,
                entry.quarantined,
                entry.quarantined_by_reason,
            )
    return batches


def _source_failed(entry: SourceSummary, summary: RunSummary, reason: str) -> None:
    """Record a source that could not be read; its checkpoints stay where they were."""
    # A SourceError's message already starts with "source <name>: ".
    prefix = f"source {entry.name}: "
    entry.error = reason.removeprefix(prefix)
    summary.problems.append(prefix + entry.error)
    logger.error(
        "source %s could not be read, so it is behind until a run reads it: %s",
        entry.name,
        entry.error,
    )


def _write_quarantine(state_dir: Path, run_id: str, items: list[Quarantined]) -> Path:
    """Keep quarantined records with their origin and reason in ``quarantine/<run_id>.jsonl``."""
    folder = state_dir / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    temporary = folder / f".{run_id}.jsonl.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path


def _new_events(batches: list[SourceBatch], state: State, summary: RunSummary) -> pd.DataFrame:
    """Combine the sources' events and drop those seen by earlier runs."""
    frames = [batch.result.events for batch in batches if len(batch.result.events)]
    if not frames:
        return empty_events()
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    events = events.drop_duplicates(subset=["event_uid", "resource"]).reset_index(drop=True)
    summary.events_read = len(events)
    events = _in_window(events, summary)
    new = state.filter_new_events(events)
    summary.events_new = len(new)
    summary.events_already_seen = len(events) - len(new)
    logger.info("dedup: %s events read, %s new", summary.events_read, summary.events_new)
    return new


def _in_window(events: pd.DataFrame, summary: RunSummary) -> pd.DataFrame:
    """Keep the events with ``since <= time < until`` in a backfill, and count the others."""
    if summary.since is None or summary.until is None or events.empty:
        return events
    times = events["time"]
    inside = ((times >= summary.since) & (times < summary.until)).to_numpy(dtype=bool)
    summary.events_outside_window = int((~inside).sum())
    if summary.events_outside_window:
        logger.info(
            "backfill: %s events outside %s to %s dropped",
            summary.events_outside_window,
            summary.since.isoformat(),
            summary.until.isoformat(),
        )
    return events[inside].reset_index(drop=True)


def _max_event_time(state: State) -> pd.Timestamp | None:
    """Return the newest event time committed by earlier runs, or None before the first."""
    value = state.checkpoints(ENGINE_CHECKPOINTS).get(MAX_EVENT_TIME)
    if not isinstance(value, str):
        return None
    try:
        return _utc_timestamp(pd.Timestamp(value))
    except ValueError:
        logger.warning("state: ignored the invalid %s checkpoint %r", MAX_EVENT_TIME, value)
        return None


def _checkpoints_to_store(
    batches: list[SourceBatch],
    events: pd.DataFrame,
    mark: pd.Timestamp | None,
    summary: RunSummary,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Return the checkpoints to upsert and to delete in the run's commit.

    A backfill stores no source checkpoints (see the module docstring). The engine's
    ``max_event_time`` advances to the newest new event in every run, backfills included.
    """
    upserts: dict[str, dict[str, Any]] = {}
    removed: dict[str, list[str]] = {}
    if summary.since is None:
        upserts = {batch.name: batch.checkpoints for batch in batches}
        removed = {batch.name: batch.checkpoints_removed for batch in batches}
    elif any(batch.checkpoints or batch.checkpoints_removed for batch in batches):
        logger.info("backfill: source checkpoints not stored, so regular runs keep their place")
    if len(events):
        newest = _utc_timestamp(events["time"].max())
        if mark is None or newest > mark:
            upserts[ENGINE_CHECKPOINTS] = {MAX_EVENT_TIME: newest.isoformat()}
    return upserts, removed


def _mark_late(
    findings: pd.DataFrame, mark: pd.Timestamp | None, summary: RunSummary
) -> pd.DataFrame:
    """Mark findings whose events all lie more than LATE_TOLERANCE before ``mark`` as late.

    A late finding gets ``evidence["late"] = True`` and `` (late)`` at the end of its title, so
    the console, findings.jsonl and alerts all show it. Detectors are not involved.
    """
    if mark is None or findings.empty:
        return findings
    last_seen = pd.to_datetime(findings["last_seen"], utc=True)
    late = (last_seen < mark - LATE_TOLERANCE).to_numpy(dtype=bool)
    summary.findings_late = int(late.sum())
    if not late.any():
        return findings
    findings = findings.copy()
    findings.loc[late, "title"] = findings.loc[late, "title"].astype(str) + " (late)"
    marked = [
        {**(evidence or {}), "late": True} if is_late else evidence
        for evidence, is_late in zip(findings["evidence"], late, strict=True)
    ]
    findings["evidence"] = pd.Series(marked, index=findings.index, dtype=object)
    logger.warning(
        "detect: %s findings are late: their events lie more than %s before %s, the newest "
        "event time processed by earlier runs",
        summary.findings_late,
        LATE_TOLERANCE,
        mark.isoformat(),
    )
    return findings


def _crash_point(name: str) -> None:
    """End the process at once when ``KEYTRAIL_TEST_CRASH_AT`` names this point.

    Only the crash-safety tests set the variable. ``os._exit`` runs no ``finally`` blocks,
    flushes nothing and releases the state lock only because the kernel closes the lock file,
    as after SIGKILL.
    """
    if os.environ.get(CRASH_POINT_VARIABLE) == name:
        os._exit(CRASH_EXIT_CODE)


def _baseline(history: History | None, window: pd.DataFrame) -> CappedHistoryView | FrameHistory:
    """Return the history before the window, read lazily and shared by the run's detectors.

    The history already contains this run's events when detectors run, so reads stop at the
    window's first event time.
    """
    if history is None or window.empty:
        return FrameHistory()
    return CappedHistoryView(history, window["time"].min())


def _replay_missed(
    settings: Settings,
    history: History,
    now: pd.Timestamp,
    state: State,
    summary: RunSummary,
    stored: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, dict[str, str] | None]]:
    """Give each enabled detector the events it missed in earlier runs, read from the history.

    Runs after this run's own detection: a detector that failed now keeps its missed span for a
    later run. Each replay covers at most :data:`REPLAY_SPAN` from the start of the span, gets
    the history before it as its baseline, keeps no fitted state, and its new findings join the
    run's. A replay that fails again keeps its span.

    ``stored`` contains the queued spans, the checkpoints of :data:`MISSED_CHECKPOINTS`.

    Returns:
        The new findings of the replays, and per detector replayed the span still queued (None
        when the whole span was checked).
    """
    failed_now = {entry.id for entry in summary.detectors if entry.error}
    entries = {entry.id: entry for entry in summary.detectors}
    frames: list[pd.DataFrame] = []
    progress: dict[str, dict[str, str] | None] = {}
    for detector_id, span in sorted(stored.items()):
        if detector_id not in entries or detector_id in failed_now:
            continue
        since, end = pd.Timestamp(span["since"]), pd.Timestamp(span["until"])
        until = min(end, since + pd.Timedelta(REPLAY_SPAN))
        events = history.events(since=since, until=until)
        detector_settings = settings.model_copy(
            update={"detectors": {detector_id: settings.detectors[detector_id]}}
        )
        scratch = RunSummary(run_id=summary.run_id, started=summary.started)
        found = (
            _detect(detector_settings, events, _baseline(history, events), now, state, scratch)
            if len(events)
            else empty_findings()
        )
        text = f"{_utc_timestamp(since).isoformat()} to {_utc_timestamp(until).isoformat()}"
        error = scratch.detectors[0].error if scratch.detectors else None
        if error:
            summary.problems.append(
                f"detector {detector_id} failed again on the events it missed from {text}; "
                f"they stay queued for the next run ({error})"
            )
            continue
        rest = None if until >= end else {"since": until.isoformat(), "until": end.isoformat()}
        progress[detector_id] = rest
        entries[detector_id].new_findings += len(found)
        summary.findings_new += len(found)
        summary.replayed.append(
            f"{detector_id}: {plural(len(events), 'event')} from {text}, "
            f"{plural(len(found), 'new finding')}"
            + ("" if rest is None else f"; {rest['since']} to {rest['until']} stays queued")
        )
        logger.info(
            "detect: %s checked the %s events it missed from %s: %s new findings",
            detector_id,
            len(events),
            text,
            len(found),
        )
        if len(found):
            frames.append(found)
    missed = pd.concat(frames, ignore_index=True) if frames else empty_findings()
    return missed, progress


def _add_missed_checkpoints(
    stored: dict[str, Any],
    window: pd.DataFrame,
    summary: RunSummary,
    progress: dict[str, dict[str, str] | None],
    upserts: dict[str, dict[str, Any]],
    removed: dict[str, list[str]],
) -> None:
    """Queue the span of this run's events for each detector that failed on them.

    Spans already queued for the detector are widened to include it. ``progress`` (from
    :func:`_replay_missed`) shortens or removes the spans that were replayed. ``stored``
    contains the spans queued before this run. All of it is stored in the run's commit.
    """
    queued: dict[str, Any] = {
        detector_id: rest for detector_id, rest in progress.items() if rest is not None
    }
    if len(window):
        start = _utc_timestamp(window["time"].min())
        end = _utc_timestamp(window["time"].max()) + pd.Timedelta(microseconds=1)
        for entry in summary.detectors:
            if not entry.error:
                continue
            since, until = start, end
            if entry.id in stored:
                since = min(since, pd.Timestamp(stored[entry.id]["since"]))
                until = max(until, pd.Timestamp(stored[entry.id]["until"]))
            queued[entry.id] = {"since": since.isoformat(), "until": until.isoformat()}
            summary.problems.append(
                f"detector {entry.id} did not check the events from {since.isoformat()} to "
                f"{until.isoformat()}; the next run gives them to it again"
            )
    if queued:
        upserts[MISSED_CHECKPOINTS] = queued
    done = [name for name, rest in progress.items() if rest is None and name not in queued]
    if done:
        removed[MISSED_CHECKPOINTS] = done


def _detect(
    settings: Settings,
    window: pd.DataFrame,
    baseline: CappedHistoryView | FrameHistory,
    now: pd.Timestamp,
    state: State,
    summary: RunSummary,
    fitted: list[DetectorState] | None = None,
) -> pd.DataFrame:
    """Run every enabled detector; one that fails is reported and the others go on.

    Each detector reads the history no further back than its ``lookback``. A statistical
    detector gets its stored fitted state. It is fitted again when the state is missing, was
    fitted with other parameters or is older than its ``refit_hours``. New states are appended
    to ``fitted`` for the run's commit, unless ``fitted`` is None (a dry run keeps nothing).
    """
    frames = []
    start = window["time"].min() if len(window) else None
    for detector in build_detectors(settings):
        entry = DetectorSummary(id=detector.id)
        summary.detectors.append(entry)
        if window.empty:
            continue
        assert start is not None
        view: HistoryView = (
            baseline.for_lookback(detector.lookback)
            if isinstance(baseline, CappedHistoryView)
            else baseline
        )
        clock = time.perf_counter()
        try:
            restored = None
            if isinstance(detector, StatisticalDetector):
                restored = _prepare_statistical(detector, view, start, state)
            found = detector.detect(window, view, now)
            if isinstance(detector, StatisticalDetector) and fitted is not None:
                # Saved after detect: a detector that fits again inside a long window (the
                # isolation forest, one fit per UTC day) leaves its last fit.
                _keep_state(detector, restored, fitted)
            missing = [name for name in FINDING_COLUMNS if name not in found.columns]
            if missing:
                raise ValueError(f"findings frame lacks columns {', '.join(missing)}")
        except Exception as exc:
            # A detector is plugin code: any exception it raises is reported, not fatal.
            error = DetectorError(detector.id, f"{type(exc).__name__}: {exc}")
            entry.error = str(error)
            summary.problems.append(str(error))
            logger.error("%s", error, exc_info=exc)
            continue
        finally:
            entry.seconds = round(time.perf_counter() - clock, 3)
            entry.report = _detector_report(detector)
        entry.findings = len(found)
        if len(found):
            frames.append(found[list(FINDING_COLUMNS)])

    findings = pd.concat(frames, ignore_index=True) if frames else empty_findings()
    findings = findings.drop_duplicates(subset=["finding_id"]).reset_index(drop=True)
    new = state.filter_new_findings(findings)
    counts = new["detector"].value_counts().to_dict() if len(new) else {}
    for entry in summary.detectors:
        entry.new_findings = int(counts.get(entry.id, 0))
    summary.findings_new = len(new)
    summary.findings_already_written = len(findings) - len(new)
    logger.info(
        "detect: %s detectors, %s findings, %s new",
        len(summary.detectors),
        len(findings),
        len(new),
    )
    return new


def _prepare_statistical(
    detector: StatisticalDetector,
    view: HistoryView,
    start: pd.Timestamp,
    state: State,
) -> pd.Timestamp | None:
    """Restore the detector's stored state, or fit it on the history before ``start``.

    Returns the ``fitted_through`` of the restored state, or None when nothing was restored.
    """
    params_hash = detector.params_hash()
    stored = state.detector_state(detector.id)
    restored = None
    if stored is not None and stored.params_hash == params_hash:
        try:
            detector.set_state(stored.state)
            restored = detector.fitted_through
        except (KeyError, TypeError, ValueError, StateError) as exc:
            logger.warning("%s: stored state is invalid (%s); fitting again", detector.id, exc)
            detector.fitted_through_ = None
    if not detector.needs_refit(start):
        logger.info("%s: using the state fitted through %s", detector.id, detector.fitted_through)
        return restored
    clock = time.perf_counter()
    detector.fit(view, start)
    logger.info("%s: fitted through %s in %.2f s", detector.id, start, time.perf_counter() - clock)
    return restored


def _keep_state(
    detector: StatisticalDetector,
    restored: pd.Timestamp | None,
    fitted: list[DetectorState],
) -> None:
    """Append the detector's state for the run's commit unless it is the restored one."""
    if detector.fitted_through is None or detector.fitted_through == restored:
        return
    fitted.append(
        DetectorState(
            detector=detector.id,
            params_hash=detector.params_hash(),
            fitted_through=detector.fitted_through.to_pydatetime(),
            state=detector.get_state(),
        )
    )


def _detector_report(detector: Any) -> dict[str, Any]:
    """Return a copy of the detector's ``report_`` dict (counts such as skipped principals)."""
    report = getattr(detector, "report_", None)
    return json.loads(json.dumps(report, default=str)) if isinstance(report, dict) else {}


def _fill_geoip_date(findings: pd.DataFrame, enrich_info: Any) -> pd.DataFrame:
    if findings.empty:
        return findings
    findings = findings.copy()
    findings["geoip_build_date"] = getattr(enrich_info, "geoip_build_date", None)
    return findings


def _finding_texts(findings: pd.DataFrame) -> dict[str, str]:
    """Return finding id -> the finding as one line of JSON, as findings.jsonl stores it.

    Raises:
        ValueError: a finding cannot be serialized (for example, an invalid severity).
    """
    lines = findings_to_json_lines(findings)
    return {
        str(finding_id): line.decode().rstrip("\n")
        for finding_id, line in zip(findings["finding_id"], lines, strict=True)
    }


def _findings_from_texts(texts: list[str]) -> pd.DataFrame:
    """Rebuild a findings frame from the JSON lines stored with pending outputs."""
    frame = pd.DataFrame([json.loads(text) for text in texts], columns=list(FINDING_COLUMNS))
    for name in ("first_seen", "last_seen"):
        frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601")
    return frame


def _write_outputs(
    settings: Settings,
    state: State,
    findings: pd.DataFrame,
    summary: RunSummary,
    console: Console | None,
    now: pd.Timestamp,
) -> None:
    """Append findings.jsonl, fill the outbox, print to the console, then mark them written.

    On failure the findings stay pending and the next run writes them.
    """
    try:
        report = write_outputs(
            findings,
            settings.output_dir,
            _without_files(settings),
            console=console,
            now=now.to_pydatetime(),
        )
    except (KeytrailError, OSError, ValueError) as exc:
        summary.problems.append(
            f"outputs: could not write to {settings.output_dir}: {exc}; the next run writes "
            f"the {len(findings)} findings of this run"
        )
        logger.error("outputs could not be written to %s: %s", settings.output_dir, exc)
        return
    # A crash between writing and the next line is the ambiguous case: the next run writes
    # these findings again, so findings.jsonl may hold one duplicate line per finding.
    _crash_point("before_mark_written")
    try:
        state.mark_outputs_written(str(finding_id) for finding_id in findings["finding_id"])
    except KeytrailError as exc:
        summary.problems.append(f"outputs: {exc}")
        logger.error("%s", exc)
    summary.outputs = {
        "findings_file": str(report.findings_path),
        "findings_written": report.findings_written,
        "below_min_severity": report.below_min_severity,
        "slack_files": len(report.slack_files),
        "email_files": len(report.email_files),
    }
    logger.info("outputs: %s findings written", report.findings_written)


def state_path_of(settings: Settings) -> Path:
    """Return the state database file of ``settings``."""
    return settings.state_dir / "state.db"


def _without_files(settings: Settings) -> OutputSettings:
    """Return the output settings with outbox files off, because the file receiver writes them."""
    return settings.alerting.model_copy(update={"outbox": False})


def _plan_alerts(
    settings: Settings,
    state_path: Path,
    findings: pd.DataFrame,
    events: pd.DataFrame,
    summary: RunSummary,
    now: pd.Timestamp,
) -> AlertPlan:
    """Filter, route and group the new findings, and count what the filters removed.

    ``events`` is the run's window, from which each alert lists its top events.
    """
    silences = SilenceStore(state_path).active(now.to_pydatetime()) if len(findings) else []
    plan = plan_alerts(findings, settings.alerting, silences, now.to_pydatetime(), events=events)
    summary.alerting = {
        "below_min_severity": plan.below_min_severity,
        "allowed": plan.allowed,
        "allowed_by": plan.allowed_by,
        "silenced": plan.silenced,
        "silenced_by": plan.silenced_by,
        "alerts": {receiver: len(alerts) for receiver, alerts in plan.alerts},
    }
    logger.info(
        "alerting: of %s findings, %s below min_severity, %s removed by the allow-list, "
        "%s silenced; the other %s make %s alerts for %s %s",
        len(findings),
        plan.below_min_severity,
        plan.allowed,
        plan.silenced,
        len(findings) - plan.below_min_severity - plan.allowed - plan.silenced,
        sum(len(alerts) for _, alerts in plan.alerts),
        len(plan.alerts),
        "receiver" if len(plan.alerts) == 1 else "receivers",
    )
    return plan


def _deliver(settings: Settings, summary: RunSummary, now: pd.Timestamp) -> None:
    """Send every due outbox row, this run's and those left by earlier runs."""
    moment = now.to_pydatetime()
    try:
        with Outbox(state_path_of(settings), settings=settings.alerting.delivery) as outbox:
            # The outbox connection also stores the first message of each alert, so Slack
            # bot channels can send its updates as thread replies.
            senders = build_senders(
                settings.alerting, settings.output_dir, moment, ledger=outbox.connection
            )
            report = deliver_due(outbox, senders, moment)
    except KeytrailError as exc:
        summary.problems.append(f"delivery: {exc}; the outbox rows stay pending")
        logger.error("delivery failed: %s", exc)
        return
    summary.delivery = report.summary()
    files = report.receivers.get(FILE_RECEIVER)
    if files is not None and settings.alerting.outbox and summary.outputs:
        summary.outputs["slack_files"] = files.sent
        summary.outputs["email_files"] = files.sent


def _roll_back(history: History, state: State, summary: RunSummary, reason: str) -> None:
    """Delete this run's history files and record the run as failed; the state stays as it was."""
    summary.status = "failed"
    summary.problems.append(
        f"run {summary.run_id} rolled back ({reason}); the next run reads the same input again"
    )
    logger.error("run %s rolled back: %s", summary.run_id, reason)
    history.delete_run(summary.run_id)
    try:
        state.record_failed_run(summary.run_id, started=summary.started, error=reason)
    except (KeytrailError, sqlite3.Error) as exc:
        logger.error("run %s: could not record the failed run: %s", summary.run_id, exc)


def _expire(
    settings: Settings, history: History, state: State, summary: RunSummary, now: pd.Timestamp
) -> None:
    """Drop history partitions and seen ids older than their retention.

    History retention counts back from the newest event time in the history, capped at ``now``
    (:func:`_history_cutoff`), so a run over old logs keeps what it appended. Seen-id retention
    counts back from ``now``, and :meth:`State.expire_seen` also keeps ids first read by a run
    that started after the cutoff, so a backfill keeps its ids for the full period.

    NOTE: an unchanged file is not read again (its checkpoint is size and mtime), but a file
    whose size or mtime changes after its ids expired is read again and its old events are
    appended to the history a second time.
    """
    try:
        history_cutoff = _history_cutoff(history, now, settings.history.retention_days)
        partitions = history.expire(history_cutoff) if history_cutoff is not None else 0
        seen_cutoff = (now - timedelta(days=settings.history.seen_retention_days)).to_pydatetime()
        forgotten = state.expire_seen(seen_cutoff)
    except (KeytrailError, OSError) as exc:
        summary.problems.append(f"retention: could not expire old data: {exc}")
        logger.error("retention: could not expire old data: %s", exc)
        return
    logger.info("retention: %s history partitions and %s seen ids expired", partitions, forgotten)


def _history_cutoff(history: History, now: pd.Timestamp, retention_days: int) -> date | None:
    """Return the first history date to keep, or None when the history is empty.

    The reference time is ``min(newest event time in the history, now)``. On a live system the
    newest event is about ``now``, so old partitions expire as the days pass. Over old logs (a
    backfill, the 2025 samples) the newest event is old, so the partitions a run just wrote are
    kept unless they lie more than ``retention_days`` before the newest event. Capping at ``now``
    stops an event time in the future (a skewed clock) from expiring recent days.
    """
    span = history.span()
    if span is None:
        return None
    reference = min(span[1], now)
    return (reference - timedelta(days=retention_days)).date()


def _new_run_id(started: datetime) -> str:
    return f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _as_dict(value: Any) -> dict[str, Any]:
    """Return a report object (dataclass or plain object) as a JSON-ready dict."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = dataclasses.asdict(value)
    elif isinstance(value, dict):
        data = dict(value)
    else:
        data = dict(vars(value))
    return json.loads(json.dumps(data, default=str))
