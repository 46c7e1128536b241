"""The delivery outbox: one SQLite row per (alert, receiver, channel) until the channel has it.

The engine enqueues rows with :func:`enqueue` in the same transaction that records its alerts,
so an alert is either recorded and queued for every channel of every receiver, or neither.
:func:`deliver_due` then sends the rows whose time has come and records each result with
:meth:`Outbox.record` (or, for the channels of a :class:`BatchSender` that sends all due rows
of one receiver and channel at once, one result for all of them with
:meth:`Outbox.record_many`):

* ``delivered``: the row is done and keeps the receiver's message id (``remote_id``).
* ``retry``: the row waits ``max(retry_after, backoff)`` seconds, where the backoff grows
  exponentially per attempt with full jitter. After ``max_attempts`` attempts it is dead.
* ``failed``: the row is dead at once, because a permanent error (a revoked webhook, a
  rejected recipient) does not go away by sending again.

Dead rows stay in the table with their last error until :meth:`Outbox.retry_dead` queues them
again.

``keytrail outbox list`` and ``keytrail outbox retry`` list and requeue rows.

Because each channel has its own row, a receiver whose Slack message was delivered and whose
email failed retries only the email. A row whose ``channel`` is :data:`WHOLE_RECEIVER` is sent
through every channel of its receiver as one delivery. Tables of outbox schema version 1,
which had one row per (alert, receiver), are migrated to such rows.

Delivery is at-least-once per (alert, receiver, channel). There is no ``sending`` state: a
process that dies after a sender returned and before :meth:`Outbox.record` committed leaves the
row pending, and the next run sends it again. That duplicate, and the one after an
``ambiguous`` retry (a timeout after the server accepted the message), are the only duplicates
the outbox produces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.alerting.alerts import Alert, to_jsonable
from pipeline.alerting.channels.base import Delivery
from pipeline.errors import StateError

__all__ = [
    "OUTBOX_SCHEMA_VERSION",
    "OUTBOX_STATUSES",
    "WHOLE_RECEIVER",
    "BatchSender",
    "DeadLetter",
    "DeliveryReport",
    "Outbox",
    "OutboxRow",
    "OutboxSettings",
    "OutboxStatus",
    "ReceiverCounts",
    "Sender",
    "alert_payload",
    "create_tables",
    "deliver_due",
    "enqueue",
    "retry_time_text",
]

logger = logging.getLogger(__name__)

OutboxStatus = Literal["pending", "delivered", "dead"]
OUTBOX_STATUSES: Final[tuple[OutboxStatus, ...]] = ("pending", "delivered", "dead")

WHOLE_RECEIVER: Final = "*"
"""``channel`` of a row that is sent through every channel of its receiver as one delivery."""

OUTBOX_SCHEMA_VERSION: Final = 2
"""Version of the outbox table layout. Version 1 (state schema 3) had one row per (alert,
receiver) and no ``channel`` column. Version 2 has one row per (alert, receiver, channel)."""

# These tables are created here on first use, rather than in the schema migration of
# pipeline.store.state, so the outbox also works on a database of its own. The outbox keeps its
# own version number in outbox_schema because PRAGMA user_version belongs to the state schema.
_OUTBOX_TABLE: Final = """
    CREATE TABLE {name} (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id TEXT NOT NULL,
        receiver TEXT NOT NULL,
        channel TEXT NOT NULL DEFAULT '*',
        dedup_key TEXT NOT NULL,
        payload_json TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        remote_id TEXT,
        created_at TEXT NOT NULL,
        delivered_at TEXT,
        UNIQUE (alert_id, receiver, channel)
    )
"""
_DUE_INDEX: Final = (
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at) WHERE status = 'pending'"
)
_VERSION_TABLE: Final = "CREATE TABLE IF NOT EXISTS outbox_schema (version INTEGER NOT NULL)"

# The columns both layouts share, copied unchanged by the migration from version 1.
_V1_COLUMNS: Final = (
    "id, alert_id, receiver, dedup_key, payload_json, status, attempts, next_attempt_at, "
    "last_error, remote_id, created_at, delivered_at"
)
_COLUMNS: Final = (
    "id, alert_id, receiver, channel, dedup_key, payload_json, status, attempts, "
    "next_attempt_at, last_error, remote_id, created_at, delivered_at"
)


class OutboxSettings(BaseModel):
    """Retry policy of the outbox.

    Attributes:
        max_attempts: delivery attempts per (alert, receiver, channel) before the row is dead.
        backoff_base_seconds: upper bound of the wait after the first failed attempt; the
            bound doubles with each further attempt.
        backoff_cap_seconds: the largest upper bound of the wait, in seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=8, ge=1)
    backoff_base_seconds: float = Field(default=30, gt=0)
    backoff_cap_seconds: float = Field(default=3600, gt=0)

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> OutboxSettings:
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            raise ValueError(
                f"backoff_cap_seconds ({self.backoff_cap_seconds:g}) is less than "
                f"backoff_base_seconds ({self.backoff_base_seconds:g}); raise the cap or lower "
                "the base"
            )
        return self


@dataclass(frozen=True)
class OutboxRow:
    """One (alert, receiver, channel) delivery as stored in the outbox table.

    Times are timezone-aware UTC datetimes. ``attempts`` counts the attempts recorded so far.
    ``channel`` is a channel name of the receiver (``slack``, ``email``, ``webhook``, ``file``)
    or :data:`WHOLE_RECEIVER`.
    """

    id: int
    alert_id: str
    receiver: str
    channel: str
    dedup_key: str
    payload_json: str
    status: OutboxStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    remote_id: str | None
    created_at: datetime
    delivered_at: datetime | None

    @property
    def payload(self) -> dict[str, Any]:
        """The decoded payload: the alert as :func:`alert_payload` stored it."""
        value: dict[str, Any] = json.loads(self.payload_json)
        return value


Sender = Callable[[OutboxRow], Delivery]
"""A callable that sends one outbox row to its receiver and classifies the result.

Channels return a ``retry`` or ``failed`` :class:`Delivery` instead of raising. If a sender
raises anyway, :func:`deliver_due` records the exception as a ``retry``.
"""


@runtime_checkable
class BatchSender(Protocol):
    """A sender that sends all due rows of some of its channels in one message.

    For a channel in :attr:`batch_channels`, :func:`deliver_due` calls :meth:`send_batch` with
    every due row of the receiver on that channel, oldest first, and records the one result on
    every row, so the rows are delivered, retried or dead together. The email channel uses this
    to send one digest per receiver per run.
    """

    batch_channels: frozenset[str]

    def __call__(self, row: OutboxRow) -> Delivery:
        """Send one row."""
        ...

    def send_batch(self, rows: list[OutboxRow]) -> Delivery:
        """Send ``rows`` (at least one, all of the same receiver and channel) as one message."""
        ...


@dataclass
class ReceiverCounts:
    """Row counts of one receiver after one :func:`deliver_due` pass.

    Attributes:
        sent: rows delivered in this pass.
        retry: rows that failed transiently and are scheduled again.
        dead: rows that became dead in this pass.
        pending: rows of this receiver still pending after the pass (due later, deferred, or
            scheduled again).
        deferred: due rows not attempted in this pass because an earlier row of the same
            receiver and channel asked for a retry, or because no sender is configured for the
            receiver.
    """

    sent: int = 0
    retry: int = 0
    dead: int = 0
    pending: int = 0
    deferred: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A row that became dead in a :func:`deliver_due` pass, for the run summary."""

    row_id: int
    alert_id: str
    receiver: str
    channel: str
    detail: str


@dataclass
class DeliveryReport:
    """The result of one :func:`deliver_due` pass.

    Attributes:
        receivers: receiver name -> counts, for every receiver with a due or pending row.
        dead: the rows that became dead in this pass.
        unknown_receivers: receivers with due rows but no sender; their rows stay pending.
    """

    receivers: dict[str, ReceiverCounts] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    unknown_receivers: list[str] = field(default_factory=list)

    def counts(self, receiver: str) -> ReceiverCounts:
        """Return the counts of ``receiver``, adding zero counts for a new name."""
        return self.receivers.setdefault(receiver, ReceiverCounts())

    def summary(self) -> dict[str, Any]:
        """Return the report as JSON-ready data for the run summary."""
        return {
            "receivers": {
                name: dataclasses.asdict(counts) for name, counts in sorted(self.receivers.items())
            },
            "dead": [dataclasses.asdict(letter) for letter in self.dead],
            "unknown_receivers": list(self.unknown_receivers),
        }


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the outbox tables if they do not exist, and migrate a version 1 outbox table.

    The statements run one by one with :meth:`sqlite3.Connection.execute`, never
    ``executescript`` (which commits first), so calling this inside a caller's transaction
    keeps that transaction open. Outside a transaction, a migration runs in one of its own.

    Raises:
        StateError: the outbox table was made by a newer keytrail.
    """
    version = _schema_version(conn)
    if version == OUTBOX_SCHEMA_VERSION:
        return
    if version > OUTBOX_SCHEMA_VERSION:
        raise StateError(
            f"the outbox table has schema version {version}, newer than the version "
            f"{OUTBOX_SCHEMA_VERSION} this keytrail supports; upgrade keytrail"
        )
    own_transaction = not conn.in_transaction
    if own_transaction:
        conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_VERSION_TABLE)
        if _table_exists(conn, "outbox"):
            _migrate_from_v1(conn)
        else:
            conn.execute(_OUTBOX_TABLE.format(name="outbox"))
        conn.execute(_DUE_INDEX)
        conn.execute("DELETE FROM outbox_schema")
        conn.execute("INSERT INTO outbox_schema (version) VALUES (?)", (OUTBOX_SCHEMA_VERSION,))
    except BaseException:
        if own_transaction and conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if own_transaction:
        conn.execute("COMMIT")


def _schema_version(conn: sqlite3.Connection) -> int:
    """Return the outbox schema version: 0 without an outbox table, 1 for the old layout."""
    if _table_exists(conn, "outbox_schema"):
        row = conn.execute("SELECT max(version) FROM outbox_schema").fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
    return 1 if _table_exists(conn, "outbox") else 0


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return found is not None


def _migrate_from_v1(conn: sqlite3.Connection) -> None:
    """Rebuild a version 1 outbox table with a ``channel`` column, keeping every row and id.

    SQLite cannot change a UNIQUE constraint in place, so the rows move to a new table. Each
    old row covered every channel of its receiver, so it becomes a :data:`WHOLE_RECEIVER` row.
    """
    rows = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    conn.execute(_OUTBOX_TABLE.format(name="outbox_v2"))
    conn.execute(
        f"INSERT INTO outbox_v2 ({_V1_COLUMNS}, channel) "
        f"SELECT {_V1_COLUMNS}, '{WHOLE_RECEIVER}' FROM outbox"
    )
    conn.execute("DROP TABLE outbox")
    conn.execute("ALTER TABLE outbox_v2 RENAME TO outbox")
    logger.info(
        "outbox: migrated %s rows to schema version %s (one row per channel)",
        rows,
        OUTBOX_SCHEMA_VERSION,
    )


def alert_payload(alert: Alert) -> dict[str, Any]:
    """Convert ``alert`` to the JSON-ready dict stored in ``payload_json``.

    :func:`pipeline.alerting.delivery.alert_from_payload` rebuilds the alert. Times in the dict
    are ISO 8601 strings, which it parses back first.
    """
    data: dict[str, Any] = to_jsonable(dataclasses.asdict(alert))
    return data


def enqueue(
    conn: sqlite3.Connection,
    alert: Alert,
    receivers: Iterable[str],
    *,
    now: datetime,
    channels: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Queue ``alert`` for each channel of each receiver on ``conn``, in the caller's transaction.

    ``channels`` maps a receiver to its channel names. A receiver it does not list (or lists
    with no channels) gets one :data:`WHOLE_RECEIVER` row.

    This function neither begins nor commits a transaction. The engine calls it between its
    own ``BEGIN IMMEDIATE`` and ``COMMIT`` that record the alerts, so a rollback removes the
    queued rows with the alerts. On a connection in autocommit mode with no open transaction,
    each row commits by itself; use :meth:`Outbox.enqueue` for a transaction of its own.

    Enqueueing is idempotent: a row for an (alert id, receiver, channel) that already exists is
    left as it is, whatever its status.

    Returns:
        The number of rows added.
    """
    create_tables(conn)
    payload = json.dumps(alert_payload(alert), sort_keys=True)
    stamp = _utc_text(now)
    channels = channels or {}
    added = 0
    for receiver in dict.fromkeys(receivers):
        for channel in dict.fromkeys(channels.get(receiver) or [WHOLE_RECEIVER]):
            cursor = conn.execute(
                "INSERT OR IGNORE INTO outbox (alert_id, receiver, channel, dedup_key, "
                "payload_json, status, attempts, next_attempt_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (alert.alert_id, receiver, channel, alert.dedup_key, payload, stamp, stamp),
            )
            added += cursor.rowcount
    return added


class Outbox:
    """The outbox table in the state database.

    Args:
        database: the state database file (normally ``<state_dir>/state.db``), opened in WAL
            mode like :class:`pipeline.store.state.State` does, or an open connection to share
            with the caller. A shared connection must be in autocommit mode
            (``isolation_level=None``) because the outbox issues its own ``BEGIN IMMEDIATE``,
            and it is not closed by :meth:`close`.
        settings: the retry policy.
        rng: the source of backoff jitter; pass a seeded :class:`random.Random` for
            reproducible schedules.

    Raises:
        StateError: the file cannot be opened as a SQLite database.
        ValueError: a shared connection is not in autocommit mode.
    """

    def __init__(
        self,
        database: Path | sqlite3.Connection,
        *,
        settings: OutboxSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or OutboxSettings()
        self._rng = rng or random.Random()
        if isinstance(database, sqlite3.Connection):
            if database.isolation_level is not None:
                raise ValueError(
                    "the outbox needs a connection in autocommit mode; open it with "
                    "sqlite3.connect(path, isolation_level=None)"
                )
            self.path: Path | None = None
            self._conn = database
            self._owns_connection = False
        else:
            self.path = Path(database)
            self._conn = self._connect(self.path)
            self._owns_connection = True
        create_tables(self._conn)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"cannot open state database {path} for the outbox: {exc}; move the file away "
                "to start with an empty state"
            ) from None
        return conn

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection the outbox uses, for callers that enqueue in their own transaction."""
        return self._conn

    def close(self) -> None:
        """Close the connection if the outbox opened it."""
        if self._owns_connection:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Writes

    def enqueue(
        self,
        alert: Alert,
        receivers: Iterable[str],
        *,
        now: datetime,
        channels: Mapping[str, Sequence[str]] | None = None,
    ) -> int:
        """Queue ``alert`` for each receiver in a transaction of its own (see :func:`enqueue`).

        Returns:
            The number of rows added; existing (alert id, receiver, channel) rows are kept as
            they are.
        """
        with self._transaction("enqueue alert " + alert.alert_id):
            return enqueue(self._conn, alert, receivers, now=now, channels=channels)

    def record(self, row_id: int, delivery: Delivery, now: datetime) -> OutboxRow:
        """Store the result of one delivery attempt of a pending row and return the new row.

        Raises:
            StateError: the row does not exist or is not pending.
        """
        with self._transaction(f"record delivery of outbox row {row_id}"):
            return self._record(row_id, delivery, now, wait=None)

    def record_many(
        self, row_ids: Iterable[int], delivery: Delivery, now: datetime
    ) -> list[OutboxRow]:
        """Store one delivery result on several pending rows in one transaction.

        A ``retry`` schedules every row for the same time: the backoff is drawn once, for the
        highest attempt count among the rows, so the rows stay due together.

        Returns:
            The new rows, in the order of ``row_ids``.

        Raises:
            StateError: a row does not exist or is not pending; then no row is changed.
        """
        ids = list(dict.fromkeys(int(row_id) for row_id in row_ids))
        with self._transaction(f"record delivery of outbox rows {ids}"):
            wait = None
            if delivery.status == "retry":
                attempts = max((self._get(row_id).attempts + 1 for row_id in ids), default=1)
                wait = self.retry_delay(attempts, delivery.retry_after)
            return [self._record(row_id, delivery, now, wait=wait) for row_id in ids]

    def _record(
        self, row_id: int, delivery: Delivery, now: datetime, *, wait: float | None
    ) -> OutboxRow:
        """Record ``delivery`` on one row inside an open transaction (see :meth:`record`)."""
        row = self._get(row_id)
        if row.status != "pending":
            raise StateError(
                f"outbox row {row_id} is {row.status}, not pending; a result can only be "
                "recorded for a pending row"
            )
        attempts = row.attempts + 1
        if delivery.status == "delivered":
            self._conn.execute(
                "UPDATE outbox SET status = 'delivered', attempts = ?, remote_id = ?, "
                "delivered_at = ? WHERE id = ?",
                (attempts, delivery.remote_id, _utc_text(now), row_id),
            )
        elif delivery.status == "failed":
            self._mark_dead(row_id, attempts, delivery.detail)
        elif attempts >= self.settings.max_attempts:
            error = f"gave up after {attempts} attempts: {delivery.detail}"
            self._mark_dead(row_id, attempts, error)
        else:
            if wait is None:
                wait = self.retry_delay(attempts, delivery.retry_after)
            error = delivery.detail
            if delivery.ambiguous:
                error += " (ambiguous: the receiver may already have the message)"
            self._conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                (attempts, _utc_text(now + timedelta(seconds=wait)), error, row_id),
            )
        return self._get(row_id)

    def retry_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Return the seconds to wait after failed attempt number ``attempts`` (from 1).

        The backoff is drawn uniformly from ``[0, min(cap, base * 2 ** (attempts - 1))]`` (full
        jitter, so receivers that failed together do not retry together). A ``retry_after``
        the server asked for wins when it is longer, up to ``backoff_cap_seconds``: a server
        that asks for days or years would otherwise park the row (or overflow the datetime).
        """
        cap = self.settings.backoff_cap_seconds
        bound = min(cap, self.settings.backoff_base_seconds * 2 ** (attempts - 1))
        backoff = self._rng.uniform(0, bound)
        requested = 0.0
        if retry_after is not None and not math.isnan(retry_after):
            requested = min(retry_after, cap)
        return max(requested, backoff)

    def retry_dead(
        self,
        ids: Iterable[int] | None = None,
        *,
        now: datetime,
        receiver: str | None = None,
        channel: str | None = None,
    ) -> int:
        """Queue dead rows again, due at ``now`` with their attempts reset to zero.

        Args:
            ids: the row ids to queue again; None queues every dead row. Ids of rows that are
                not dead are ignored.
            now: when the rows become due.
            receiver: queue only rows of this receiver.
            channel: queue only rows of this channel (``slack``, ``email``, ...).

        Returns:
            The number of rows queued again.
        """
        where = "status = 'dead'"
        filters: list[Any] = []
        if receiver is not None:
            where += " AND receiver = ?"
            filters.append(receiver)
        if channel is not None:
            where += " AND channel = ?"
            filters.append(channel)
        update = "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ? WHERE "
        stamp = _utc_text(now)
        with self._transaction("queue dead outbox rows again"):
            if ids is None:
                changed = self._conn.execute(update + where, (stamp, *filters)).rowcount
            else:
                changed = 0
                for row_id in dict.fromkeys(ids):
                    cursor = self._conn.execute(
                        update + where + " AND id = ?", (stamp, *filters, int(row_id))
                    )
                    changed += cursor.rowcount
        logger.info("queued %s dead outbox %s again", changed, "row" if changed == 1 else "rows")
        return changed

    # Reads

    def due(self, now: datetime) -> list[OutboxRow]:
        """Return the pending rows whose next attempt is at or before ``now``, oldest first."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE status = 'pending' AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id",
            (_utc_text(now),),
        ).fetchall()
        return [_row(values) for values in rows]

    def list_rows(
        self, status: OutboxStatus | None = None, *, channel: str | None = None
    ) -> list[OutboxRow]:
        """Return the rows with ``status`` and ``channel`` (None: any), in the order queued.

        Raises:
            ValueError: ``status`` is not one of :data:`OUTBOX_STATUSES`.
        """
        if status is not None and status not in OUTBOX_STATUSES:
            raise ValueError(f"invalid outbox status {status!r}; expected one of {OUTBOX_STATUSES}")
        where = "WHERE 1 = 1"
        filters: list[str] = []
        if status is not None:
            where += " AND status = ?"
            filters.append(status)
        if channel is not None:
            where += " AND channel = ?"
            filters.append(channel)
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM outbox {where} ORDER BY id", filters
        ).fetchall()
        return [_row(values) for values in rows]

    def rows_by_id(self, ids: Iterable[int]) -> dict[int, OutboxRow]:
        """Return the rows with these ids; ids not in the outbox are left out."""
        found = {}
        for row_id in dict.fromkeys(ids):
            values = self._conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (int(row_id),)
            ).fetchone()
            if values is not None:
                found[int(row_id)] = _row(values)
        return found

    def counts(self) -> dict[str, int]:
        """Return the number of rows per status, with every status present."""
        found: dict[str, int] = dict.fromkeys(OUTBOX_STATUSES, 0)
        for status, count in self._conn.execute(
            "SELECT status, count(*) FROM outbox GROUP BY status"
        ):
            found[str(status)] = int(count)
        return found

    def pending_by_receiver(self) -> dict[str, int]:
        """Return the number of pending rows per receiver."""
        rows = self._conn.execute(
            "SELECT receiver, count(*) FROM outbox WHERE status = 'pending' GROUP BY receiver"
        ).fetchall()
        return {str(receiver): int(count) for receiver, count in rows}

    # Helpers

    def _get(self, row_id: int) -> OutboxRow:
        values = self._conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (int(row_id),)
        ).fetchone()
        if values is None:
            raise StateError(f"outbox row {row_id} not found in {self._where()}")
        return _row(values)

    def _mark_dead(self, row_id: int, attempts: int, error: str) -> None:
        self._conn.execute(
            "UPDATE outbox SET status = 'dead', attempts = ?, last_error = ? WHERE id = ?",
            (attempts, error, row_id),
        )

    def _transaction(self, action: str) -> _Transaction:
        return _Transaction(self._conn, action, self._where())

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "the shared state connection"


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

    SQLite errors become :class:`StateError` naming the action; other exceptions propagate
    unchanged after the rollback.
    """

    def __init__(self, conn: sqlite3.Connection, action: str, where: str) -> None:
        self._conn = conn
        self._action = action
        self._where = where

    def __enter__(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"could not {self._action} in {self._where}: {exc}") from exc

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                exc = commit_error
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StateError(
                f"could not {self._action} in {self._where}: {exc}; nothing was changed"
            ) from exc


def deliver_due(outbox: Outbox, senders: Mapping[str, Sender], now: datetime) -> DeliveryReport:
    """Send every due row with its receiver's sender and record each result.

    Only rows that are due are sent, so a channel that delivered is not sent its alert again
    when another channel or receiver of the same alert failed. After a ``retry`` result, the
    other due rows of the same receiver and channel wait for the next pass (counted as
    ``deferred``), so an unreachable or rate-limiting channel costs one attempt per pass
    instead of one per row, and does not hold back the receiver's other channels.

    A sender that raises breaks the channel contract. The exception is recorded as a
    ``retry`` with its type and message in ``last_error``, so it cannot stop the other
    receivers.

    For a channel in a :class:`BatchSender`'s ``batch_channels``, all due rows of the receiver
    on that channel go in one :meth:`BatchSender.send_batch` call, and the one result is
    recorded on every row.

    Rows whose receiver has no sender stay pending and are listed in ``unknown_receivers``.
    So a receiver removed from the configuration keeps its rows until the configuration
    names it again.
    """
    report = DeliveryReport()
    # A lane is one (receiver, channel): retries and batches never cross lanes.
    held_back: set[tuple[str, str]] = set()
    batched: set[tuple[str, str]] = set()
    due = outbox.due(now)
    for row in due:
        counts = report.counts(row.receiver)
        lane = (row.receiver, row.channel)
        sender = senders.get(row.receiver)
        if sender is None:
            if row.receiver not in report.unknown_receivers:
                report.unknown_receivers.append(row.receiver)
            counts.deferred += 1
            continue
        if lane in batched:
            continue
        if lane in held_back:
            counts.deferred += 1
            continue
        if isinstance(sender, BatchSender) and row.channel in sender.batch_channels:
            batched.add(lane)
            rows = [other for other in due if (other.receiver, other.channel) == lane]
            delivery = _attempt_batch(sender, rows)
            stored_rows = outbox.record_many([other.id for other in rows], delivery, now)
            for other, stored in zip(rows, stored_rows, strict=True):
                _count(report, counts, other, stored, delivery, now, log=len(rows) == 1)
            if len(rows) > 1:
                _log_batch(rows, stored_rows, delivery, now)
            continue
        delivery = _attempt(sender, row)
        stored = outbox.record(row.id, delivery, now)
        if _count(report, counts, row, stored, delivery, now, log=True) == "retry":
            held_back.add(lane)

    for receiver, pending in outbox.pending_by_receiver().items():
        report.counts(receiver).pending = pending
    if report.unknown_receivers:
        logger.warning(
            "no channel configured for receivers %s; their outbox rows stay pending",
            ", ".join(sorted(report.unknown_receivers)),
        )
    return report


def _count(
    report: DeliveryReport,
    counts: ReceiverCounts,
    row: OutboxRow,
    stored: OutboxRow,
    delivery: Delivery,
    now: datetime,
    *,
    log: bool,
) -> str:
    """Count the stored result of one row, and log it when ``log`` is true.

    Returns:
        ``sent``, ``dead`` or ``retry``.
    """
    if stored.status == "delivered":
        counts.sent += 1
        logger.debug("delivered alert %s to %s/%s", row.alert_id, row.receiver, row.channel)
        return "sent"
    if stored.status == "dead":
        counts.dead += 1
        detail = stored.last_error or delivery.detail
        report.dead.append(DeadLetter(row.id, row.alert_id, row.receiver, row.channel, detail))
        if log:
            logger.error(
                "delivery of alert %s to %s/%s failed after %s attempts and row %s is dead: %s",
                row.alert_id,
                row.receiver,
                row.channel,
                stored.attempts,
                row.id,
                detail,
            )
        return "dead"
    counts.retry += 1
    if log:
        logger.warning(
            "delivery of alert %s to %s/%s failed (attempt %s), next attempt %s: %s",
            row.alert_id,
            row.receiver,
            row.channel,
            stored.attempts,
            retry_time_text(stored.next_attempt_at, now),
            stored.last_error,
        )
    return "retry"


def _log_batch(
    rows: list[OutboxRow], stored_rows: list[OutboxRow], delivery: Delivery, now: datetime
) -> None:
    """Log the failure of one batch (an email digest) in one line with its alert count."""
    receiver, channel = rows[0].receiver, rows[0].channel
    dead = [stored for stored in stored_rows if stored.status == "dead"]
    waiting = [stored for stored in stored_rows if stored.status not in ("dead", "delivered")]
    detail = delivery.detail
    if dead:
        logger.error(
            "delivery of a digest of %s alerts to %s/%s failed and %s outbox rows are dead "
            "(ids %s): %s",
            len(rows),
            receiver,
            channel,
            len(dead),
            ", ".join(str(stored.id) for stored in dead),
            stored_rows[0].last_error or detail,
        )
    if waiting:
        attempts = max(stored.attempts for stored in waiting)
        next_attempt = min(stored.next_attempt_at for stored in waiting)
        logger.warning(
            "delivery of a digest of %s alerts to %s/%s failed (attempt %s), next attempt %s: %s",
            len(rows),
            receiver,
            channel,
            attempts,
            retry_time_text(next_attempt, now),
            waiting[0].last_error or detail,
        )


def retry_time_text(next_attempt: datetime, now: datetime) -> str:
    """Format when a row is tried again as ``at 2026-10-10 08:00:30 UTC (in 30 s)``.

    A time before ``now`` (possible after a clock change) is shown as ``now``, because the
    next pass sends the row at once.
    """
    moment = max(next_attempt.astimezone(UTC), now.astimezone(UTC))
    seconds = round((moment - now).total_seconds())
    return f"at {moment:%Y-%m-%d %H:%M:%S} UTC (in {seconds} s)"


def _attempt_batch(sender: BatchSender, rows: list[OutboxRow]) -> Delivery:
    try:
        return sender.send_batch(rows)
    except Exception as exc:
        logger.exception(
            "batch sender for %s/%s raised on %s outbox rows",
            rows[0].receiver,
            rows[0].channel,
            len(rows),
        )
        return Delivery("retry", f"sender raised {type(exc).__name__}: {exc}")


def _attempt(sender: Sender, row: OutboxRow) -> Delivery:
    try:
        return sender(row)
    except Exception as exc:
        # Channels classify failures instead of raising, so this is a bug in the sender. Its
        # message goes into last_error, so a channel must not put secrets into exceptions.
        logger.exception("sender for %s raised on outbox row %s", row.receiver, row.id)
        return Delivery("retry", f"sender raised {type(exc).__name__}: {exc}")


def _row(values: tuple[Any, ...]) -> OutboxRow:
    (
        row_id,
        alert_id,
        receiver,
        channel,
        dedup_key,
        payload_json,
        status,
        attempts,
        next_attempt_at,
        last_error,
        remote_id,
        created_at,
        delivered_at,
    ) = values
    return OutboxRow(
        id=int(row_id),
        alert_id=str(alert_id),
        receiver=str(receiver),
        channel=str(channel),
        dedup_key=str(dedup_key),
        payload_json=str(payload_json),
        status=status,
        attempts=int(attempts),
        next_attempt_at=_parse_utc(next_attempt_at),
        last_error=last_error,
        remote_id=remote_id,
        created_at=_parse_utc(created_at),
        delivered_at=_parse_utc(delivered_at) if delivered_at else None,
    )


def _utc_text(moment: datetime) -> str:
    """Format a time as fixed-width ISO 8601 UTC text, so text order is time order."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
