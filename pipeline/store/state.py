"""Run state in one SQLite file: seen events, checkpoints, the findings ledger, the output
queue, the runs and the fitted state of statistical detectors.

The file is ``<state_dir>/state.db`` in WAL mode. A run writes to it in three places:

1. :meth:`State.record_started_run` stores a ``started`` run row before the run writes any
   history file, so a run killed before its commit can be found and its files deleted.
2. :meth:`State.commit_run` stores, in one transaction, the seen event ids, the findings ledger,
   one pending output row per new finding (with the finding as JSON), the checkpoints, the
   detectors' fitted state and the finished run row. Either all of them are stored or none is.
3. :meth:`State.mark_outputs_written` marks pending output rows written once the outputs exist.

A run that fails before the commit leaves the state as it was (apart from its run row), so the
next run reads the same input again. Outputs still pending after a crash are written by the
next run.

:func:`state_lock` keeps two runs from using one state directory at the same time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import pandas as pd

from pipeline.errors import StateError

__all__ = [
    "COMMITTED_STATUSES",
    "SCHEMA_VERSION",
    "DetectorState",
    "State",
    "StateLockedError",
    "alert_thread",
    "record_alert_thread",
    "state_lock",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS seen_events (
    event_uid TEXT PRIMARY KEY,
    time TEXT NOT NULL,
    first_run TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_events_time ON seen_events (time);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    status TEXT NOT NULL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS findings_ledger (
    finding_id TEXT PRIMARY KEY,
    dedup_key TEXT,
    detector TEXT NOT NULL,
    first_written TEXT NOT NULL,
    run_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_outputs (
    finding_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    finding_json TEXT NOT NULL,
    queued TEXT NOT NULL,
    written TEXT
);
CREATE INDEX IF NOT EXISTS pending_outputs_unwritten ON pending_outputs (queued)
    WHERE written IS NULL;
CREATE TABLE IF NOT EXISTS alert_ledger (
    receiver TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    last_sent TEXT NOT NULL,
    severity TEXT NOT NULL,
    resources_json TEXT NOT NULL,
    source_ips_json TEXT NOT NULL,
    PRIMARY KEY (receiver, dedup_key)
);
"""
# Version 3 added alert_ledger. Every statement is CREATE ... IF NOT EXISTS, so opening an older
# database runs the whole schema again and upgrades it in place.

COMMITTED_STATUSES: Final = ("completed", "completed_with_problems")
"""Run statuses stored by :meth:`State.commit_run`; any other status means the run never
committed, so its history files are not part of the history."""

# Rows per executemany batch and per temporary-table probe.
_BATCH = 50_000


@dataclass(frozen=True)
class DetectorState:
    """The fitted state of one statistical detector, as the state database keeps it.

    ``state`` is the JSON-ready dict of ``StatisticalDetector.get_state``; ``params_hash``
    identifies the parameters it was fitted with; ``fitted_through`` is the end (exclusive)
    of the history it learned from.
    """

    detector: str
    params_hash: str
    fitted_through: datetime
    state: dict[str, Any]


# Fitted state of statistical detectors, one row per detector. Like alert_threads below, the
# table is created on first write, so adding it needs no schema version change; a read before
# the first write finds no table and means "no state".
_DETECTOR_STATE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS detector_state (
    detector TEXT PRIMARY KEY,
    params_hash TEXT NOT NULL,
    fitted_through TEXT NOT NULL,
    saved TEXT NOT NULL,
    run_id TEXT NOT NULL,
    state_json TEXT NOT NULL
)
"""


class StateLockedError(StateError):
    """Another process holds the lock on the state directory."""


@contextmanager
def state_lock(state_dir: Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``<state_dir>/lock`` for the ``with`` block.

    The lock is an ``fcntl.flock`` on an open file, so the kernel releases it when the holding
    process exits, even after a crash. The file keeps the holder's pid for the error message.

    Raises:
        StateLockedError: another process holds the lock.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    handle = path.open("a+", encoding="ascii")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            raise StateLockedError(
                f"another keytrail run holds the lock on {state_dir} (pid {holder}); wait for it "
                "to finish or use a different --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


class State:
    """The SQLite state of one state directory.

    Args:
        path: the database file, normally ``<state_dir>/state.db``. It is created with its
            folder unless ``read_only`` is set.
        read_only: open an existing file without writing (dry runs). A missing file then reads
            as an empty state.

    Raises:
        StateError: the file is not a keytrail state database, or was written by a newer
            version of keytrail.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.read_only:
                if not self.path.exists():
                    conn = sqlite3.connect(":memory:", isolation_level=None)
                    conn.executescript(_SCHEMA)
                    return conn
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None)
                self._check_version(conn)
                return conn
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = self._check_version(conn)
            if version < SCHEMA_VERSION:
                conn.executescript(
                    f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
                )
            return conn
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"cannot open state database {self.path}: {exc}; move the file away to start "
                "with an empty state (every input is then read again)"
            ) from None

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema version {version}, newer than this "
                f"keytrail supports ({SCHEMA_VERSION}); upgrade keytrail"
            )
        return version

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Reads

    def filter_new_events(self, events: pd.DataFrame) -> pd.DataFrame:
        """Return the rows of ``events`` whose ``event_uid`` has not been seen by an earlier run."""
        if events.empty:
            return events
        seen = self._existing("seen_events", "event_uid", events["event_uid"].dropna().unique())
        if not seen:
            return events
        keep = ~events["event_uid"].isin(seen)
        return events[keep.to_numpy(dtype=bool)].reset_index(drop=True)

    def filter_new_findings(self, findings: pd.DataFrame) -> pd.DataFrame:
        """Return the findings whose ``finding_id`` is not in the ledger yet."""
        if findings.empty:
            return findings
        known = self._existing("findings_ledger", "finding_id", findings["finding_id"].unique())
        if not known:
            return findings
        return findings[~findings["finding_id"].isin(known)].reset_index(drop=True)

    def checkpoints(self, source: str) -> dict[str, Any]:
        """Return the checkpoints of ``source`` as key -> decoded JSON value."""
        rows = self._conn.execute(
            "SELECT key, value FROM checkpoints WHERE source = ?", (source,)
        ).fetchall()
        return {key: json.loads(value) for key, value in rows}

    def seen_count(self) -> int:
        """Return the number of event ids kept for deduplication."""
        return int(self._conn.execute("SELECT count(*) FROM seen_events").fetchone()[0])

    def ledger_count(self) -> int:
        """Return the number of findings in the ledger."""
        return int(self._conn.execute("SELECT count(*) FROM findings_ledger").fetchone()[0])

    def pending_outputs(self) -> list[tuple[str, str]]:
        """Return ``(finding_id, finding_json)`` of committed findings not yet written out.

        The order is the order in which the findings were committed.
        """
        rows = self._conn.execute(
            "SELECT finding_id, finding_json FROM pending_outputs WHERE written IS NULL "
            "ORDER BY queued, rowid"
        ).fetchall()
        return [(str(finding_id), str(text)) for finding_id, text in rows]

    def uncommitted_runs(self) -> set[str]:
        """Return the ids of recorded runs that never committed (started, failed, interrupted)."""
        marks = ", ".join("?" for _ in COMMITTED_STATUSES)
        rows = self._conn.execute(
            f"SELECT run_id FROM runs WHERE status NOT IN ({marks})", COMMITTED_STATUSES
        ).fetchall()
        return {str(row[0]) for row in rows}

    def runs(self) -> list[dict[str, Any]]:
        """Return the recorded runs, oldest first, with their decoded summaries."""
        rows = self._conn.execute(
            "SELECT run_id, started, finished, status, summary_json FROM runs ORDER BY started"
        ).fetchall()
        return [
            {
                "run_id": run_id,
                "started": started,
                "finished": finished,
                "status": status,
                "summary": json.loads(summary) if summary else None,
            }
            for run_id, started, finished, status, summary in rows
        ]

    def detector_state(self, detector: str) -> DetectorState | None:
        """Return the stored fitted state of ``detector``, or None when there is none.

        A database that never stored a detector state has no ``detector_state`` table, and
        reads as having no state.
        """
        try:
            row = self._conn.execute(
                "SELECT params_hash, fitted_through, state_json FROM detector_state "
                "WHERE detector = ?",
                (detector,),
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return None
        if row is None:
            return None
        params_hash, fitted_through, text = row
        return DetectorState(
            detector=detector,
            params_hash=str(params_hash),
            fitted_through=datetime.strptime(fitted_through, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=UTC
            ),
            state=json.loads(text),
        )

    def _existing(self, table: str, column: str, values: Iterable[Any]) -> set[str]:
        """Return the subset of ``values`` present in ``table.column``."""
        found: set[str] = set()
        batch: list[tuple[str]] = []
        self._conn.execute("CREATE TEMP TABLE IF NOT EXISTS probe (value TEXT PRIMARY KEY)")
        try:
            for value in values:
                batch.append((str(value),))
                if len(batch) >= _BATCH:
                    found |= self._probe(table, column, batch)
                    batch = []
            if batch:
                found |= self._probe(table, column, batch)
        finally:
            self._conn.execute("DELETE FROM temp.probe")
        return found

    def _probe(self, table: str, column: str, batch: list[tuple[str]]) -> set[str]:
        self._conn.execute("DELETE FROM temp.probe")
        self._conn.executemany("INSERT OR IGNORE INTO temp.probe (value) VALUES (?)", batch)
        rows = self._conn.execute(
            f"SELECT p.value FROM temp.probe p JOIN {table} t ON t.{column} = p.value"
        ).fetchall()
        return {row[0] for row in rows}

    # Writes

    def commit_run(
        self,
        run_id: str,
        *,
        started: datetime,
        events: pd.DataFrame,
        findings: pd.DataFrame,
        checkpoints: Mapping[str, Mapping[str, Any]],
        summary: Mapping[str, Any],
        checkpoints_removed: Mapping[str, Iterable[str]] | None = None,
        status: str = "completed",
        pending_outputs: Mapping[str, str] | None = None,
        in_transaction: Callable[[sqlite3.Connection], None] | None = None,
        detector_states: Iterable[DetectorState] = (),
    ) -> None:
        """Store everything a run produced in one transaction.

        Args:
            run_id: the run's id.
            started: when the run started (UTC).
            events: the run's new events; their ``event_uid``s become seen.
            findings: the findings written by the run; they enter the ledger.
            checkpoints: source name -> key -> JSON-ready value, upserted.
            checkpoints_removed: source name -> checkpoint keys to delete.
            summary: the run summary, stored as JSON with the run row.
            status: the run's status, one of :data:`COMMITTED_STATUSES`.
            pending_outputs: finding id -> the finding as one JSON text, queued as pending
                until :meth:`mark_outputs_written`. None queues nothing.
            in_transaction: called with the connection inside the transaction, after the
                findings ledger is written (the engine queues alerts for delivery there).
            detector_states: fitted states to keep, one per detector; each replaces the
                detector's stored state.

        Raises:
            StateError: the transaction failed; nothing of it was stored.
        """
        self._require_writable()
        if status not in COMMITTED_STATUSES:
            raise ValueError(
                f"invalid commit status {status!r}; expected one of {COMMITTED_STATUSES}"
            )
        now = _utc_text(datetime.now(UTC))
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._insert_seen(run_id, events)
            self._insert_ledger(run_id, findings, now)
            self._insert_pending(run_id, pending_outputs or {}, now)
            self._save_detector_states(run_id, detector_states, now)
            if in_transaction is not None:
                in_transaction(self._conn)
            for source, values in checkpoints.items():
                self._conn.executemany(
                    "INSERT INTO checkpoints (source, key, value, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (source, key) DO UPDATE SET value = excluded.value, "
                    "updated = excluded.updated",
                    [(source, key, json.dumps(value), now) for key, value in values.items()],
                )
            for source, keys in (checkpoints_removed or {}).items():
                self._conn.executemany(
                    "DELETE FROM checkpoints WHERE source = ? AND key = ?",
                    [(source, key) for key in keys],
                )
            self._conn.execute(
                "INSERT OR REPLACE INTO runs (run_id, started, finished, status, summary_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, _utc_text(started), now, status, json.dumps(dict(summary))),
            )
            self._conn.execute("COMMIT")
        except (sqlite3.Error, TypeError, ValueError) as exc:
            self._conn.execute("ROLLBACK")
            raise StateError(
                f"could not commit run {run_id} to {self.path}: {exc}; nothing was stored, so "
                "the next run reads the same input again"
            ) from exc
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        logger.debug("committed run %s: %s events, %s findings", run_id, len(events), len(findings))

    def record_started_run(self, run_id: str, *, started: datetime) -> None:
        """Record a run as ``started`` before it writes history files.

        A run killed before :meth:`commit_run` keeps this status, so the next run finds its id in
        :meth:`uncommitted_runs` and deletes its history files.
        """
        self._require_writable()
        self._conn.execute(
            "INSERT OR REPLACE INTO runs (run_id, started, finished, status, summary_json) "
            "VALUES (?, ?, NULL, 'started', NULL)",
            (run_id, _utc_text(started)),
        )

    def mark_runs_interrupted(self, run_ids: Iterable[str]) -> int:
        """Set the status of runs still ``started`` to ``interrupted`` (they never finished).

        Returns:
            The number of runs changed.
        """
        self._require_writable()
        now = _utc_text(datetime.now(UTC))
        cursor = self._conn.executemany(
            "UPDATE runs SET status = 'interrupted', finished = ? "
            "WHERE run_id = ? AND status = 'started'",
            [(now, run_id) for run_id in run_ids],
        )
        return int(cursor.rowcount)

    def mark_outputs_written(self, finding_ids: Iterable[str]) -> int:
        """Mark pending outputs as written, in one transaction.

        Returns:
            The number of rows that were pending and are now marked written.
        """
        self._require_writable()
        now = _utc_text(datetime.now(UTC))
        rows = [(now, str(finding_id)) for finding_id in finding_ids]
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            cursor = self._conn.executemany(
                "UPDATE pending_outputs SET written = ? WHERE finding_id = ? AND written IS NULL",
                rows,
            )
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.execute("ROLLBACK")
            raise StateError(
                f"could not mark {len(rows)} outputs written in {self.path}: {exc}; the next run "
                "writes them again"
            ) from exc
        return int(cursor.rowcount)

    def update_run(self, run_id: str, *, status: str, summary: Mapping[str, Any]) -> None:
        """Replace the status and summary of a committed run (after its outputs were written)."""
        self._require_writable()
        self._conn.execute(
            "UPDATE runs SET status = ?, summary_json = ?, finished = ? WHERE run_id = ?",
            (status, json.dumps(dict(summary)), _utc_text(datetime.now(UTC)), run_id),
        )

    def record_failed_run(self, run_id: str, *, started: datetime, error: str) -> None:
        """Record a run that ended before its commit, for the runs listing."""
        self._require_writable()
        self._conn.execute(
            "INSERT OR REPLACE INTO runs (run_id, started, finished, status, summary_json) "
            "VALUES (?, ?, ?, 'failed', ?)",
            (
                run_id,
                _utc_text(started),
                _utc_text(datetime.now(UTC)),
                json.dumps({"error": error}),
            ),
        )

    def expire_seen(self, older_than: datetime) -> int:
        """Forget seen event ids whose event time and first run are both before ``older_than``.

        Keying on the run start as well keeps the ids of a backfill of old events for the full
        retention, counted from when they were read.

        Returns:
            The number of ids removed.
        """
        self._require_writable()
        cutoff = _utc_text(older_than)
        cursor = self._conn.execute(
            "DELETE FROM seen_events WHERE time < ? AND first_run IN "
            "(SELECT run_id FROM runs WHERE started < ?)",
            (cutoff, cutoff),
        )
        return int(cursor.rowcount)

    def _insert_seen(self, run_id: str, events: pd.DataFrame) -> None:
        if events.empty:
            return
        unique = events.drop_duplicates("event_uid")
        times = unique["time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows = list(
            zip(unique["event_uid"].astype(str), times, [run_id] * len(unique), strict=True)
        )
        for start in range(0, len(rows), _BATCH):
            self._conn.executemany(
                "INSERT OR IGNORE INTO seen_events (event_uid, time, first_run) VALUES (?, ?, ?)",
                rows[start : start + _BATCH],
            )

    def _insert_ledger(self, run_id: str, findings: pd.DataFrame, now: str) -> None:
        if findings.empty:
            return
        rows = [
            (str(finding_id), None if pd.isna(dedup_key) else str(dedup_key), str(det), now, run_id)
            for finding_id, dedup_key, det in zip(
                findings["finding_id"], findings["dedup_key"], findings["detector"], strict=True
            )
        ]
        self._conn.executemany(
            "INSERT OR IGNORE INTO findings_ledger "
            "(finding_id, dedup_key, detector, first_written, run_id) VALUES (?, ?, ?, ?, ?)",
            rows,
        )

    def _insert_pending(self, run_id: str, outputs: Mapping[str, str], now: str) -> None:
        if not outputs:
            return
        # OR IGNORE keeps the first queued copy when a caller queues a finding id twice.
        self._conn.executemany(
            "INSERT OR IGNORE INTO pending_outputs (finding_id, run_id, finding_json, queued) "
            "VALUES (?, ?, ?, ?)",
            [(str(finding_id), run_id, text, now) for finding_id, text in outputs.items()],
        )

    def save_detector_states(self, run_id: str, states: Iterable[DetectorState]) -> None:
        """Store fitted detector states in a transaction of their own (outside a run commit)."""
        self._require_writable()
        now = _utc_text(datetime.now(UTC))
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._save_detector_states(run_id, states, now)
            self._conn.execute("COMMIT")
        except (sqlite3.Error, TypeError, ValueError) as exc:
            self._conn.execute("ROLLBACK")
            raise StateError(f"could not store detector states in {self.path}: {exc}") from exc

    def _save_detector_states(self, run_id: str, states: Iterable[DetectorState], now: str) -> None:
        rows = [
            (
                item.detector,
                item.params_hash,
                _utc_text(item.fitted_through),
                now,
                run_id,
                json.dumps(item.state, allow_nan=False),
            )
            for item in states
        ]
        if rows:
            self._conn.execute(_DETECTOR_STATE_TABLE)
            self._conn.executemany(
                "INSERT OR REPLACE INTO detector_state "
                "(detector, params_hash, fitted_through, saved, run_id, state_json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _require_writable(self) -> None:
        if self.read_only:
            raise StateError(f"state database {self.path} is open read-only (dry run)")


# The receiver's id of the first message of an alert (a Slack ``ts``), so that updates of the
# alert within repeat_interval can reply in its thread. It is a table of its own, created on
# first use like the outbox table, so adding it needs no schema version change.
_THREADS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS alert_threads (
    receiver TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    recorded TEXT NOT NULL,
    PRIMARY KEY (receiver, dedup_key)
)
"""


def _lock_holder(handle: IO[str]) -> str:
    """Return the pid in a lock file held by another process, or "unknown".

    The holder writes its pid just after it takes the lock. A process that lost the race by a
    moment can find the file still empty, so it reads again for up to 0.2 s.
    """
    for _ in range(20):
        handle.seek(0)
        holder = handle.read().strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "unknown"


def record_alert_thread(
    conn: sqlite3.Connection,
    receiver: str,
    dedup_key: str,
    remote_id: str,
    *,
    alert_id: str,
    now: datetime,
) -> None:
    """Store ``remote_id`` as the first message of ``dedup_key`` at ``receiver``.

    A later first message (sent again after ``repeat_interval``) replaces the stored one, so
    updates reply to the newest thread. The statement runs on ``conn`` without a transaction
    of its own.
    """
    conn.execute(_THREADS_TABLE)
    conn.execute(
        "INSERT INTO alert_threads (receiver, dedup_key, remote_id, alert_id, recorded) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (receiver, dedup_key) DO UPDATE SET "
        "remote_id = excluded.remote_id, alert_id = excluded.alert_id, "
        "recorded = excluded.recorded",
        (receiver, dedup_key, remote_id, alert_id, _utc_text(now)),
    )


def alert_thread(conn: sqlite3.Connection, receiver: str, dedup_key: str) -> str | None:
    """Return the stored first-message id of ``dedup_key`` at ``receiver``, or None."""
    conn.execute(_THREADS_TABLE)
    row = conn.execute(
        "SELECT remote_id FROM alert_threads WHERE receiver = ? AND dedup_key = ?",
        (receiver, dedup_key),
    ).fetchone()
    return None if row is None else str(row[0])


def _utc_text(moment: datetime) -> str:
    """Format a time as fixed-width ISO 8601 UTC text, so text order is time order."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
