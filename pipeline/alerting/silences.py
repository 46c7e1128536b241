"""Silences: temporary, owned mutes of findings, in the style of Prometheus Alertmanager.

A silence has matchers, an owner, a reason and a mandatory end time. While it is active
(``starts_at <= now < ends_at``) it silences every finding that all of its matchers match. Once
``ends_at`` has passed it stops applying by itself, so no cleanup job is needed.

A matcher compares one label of a finding with a value, exactly or as a regular expression
that must match the whole value (Python ``re.fullmatch``)::

    detector=keytrail.off_hours       the finding's detector is exactly this id
    principal=~ci-.*                  the finding's principal matches the whole pattern
    resource=~.*/prod/.*              any one of the finding's resources matches
    source_ip=203.0.113.7             any one of the finding's caller addresses is this one

Silences live in the ``silences`` table of ``<state_dir>/state.db``.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import logging
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Final, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import KeytrailError, StateError
from pipeline.store.state import SCHEMA_VERSION

__all__ = [
    "DEFAULT_MAX_DURATION",
    "SILENCED_BY",
    "SILENCE_LABELS",
    "InvalidSilenceError",
    "Matcher",
    "Silence",
    "SilenceNotFoundError",
    "SilenceStore",
    "apply_silences",
    "format_duration",
    "parse_duration",
    "parse_expiry",
    "parse_matcher",
]

logger = logging.getLogger(__name__)

SILENCED_BY: Final = "silenced_by"
"""Column added to silenced findings: the id of the first active silence that matched."""

SilenceLabel = Literal[
    "detector", "principal", "cloud", "account", "severity", "resource", "source_ip"
]
SILENCE_LABELS: Final[tuple[str, ...]] = get_args(SilenceLabel)

# Labels that compare one finding column, and labels that match when any item of a list
# column matches.
_SCALAR_COLUMNS: Final = {
    "detector": "detector",
    "principal": "principal",
    "cloud": "cloud",
    "account": "account",
    "severity": "severity",
}
_LIST_COLUMNS: Final = {"resource": "resources", "source_ip": "source_ips"}

DEFAULT_MAX_DURATION: Final = dt.timedelta(days=30)
"""Maximum duration of a new silence unless the caller passes a larger ``max_duration``."""

_ID_BYTES: Final = 4
_DURATION_PART: Final = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS: Final = {
    "s": dt.timedelta(seconds=1),
    "m": dt.timedelta(minutes=1),
    "h": dt.timedelta(hours=1),
    "d": dt.timedelta(days=1),
    "w": dt.timedelta(weeks=1),
}

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class InvalidSilenceError(KeytrailError):
    """An invalid silence, matcher or expiry. The message names the value and the fix."""


class SilenceNotFoundError(KeytrailError):
    """No stored silence has the requested id."""


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_id() -> str:
    return secrets.token_hex(_ID_BYTES)


class Matcher(BaseModel):
    """One condition of a silence: ``label`` equals ``value``, or fully matches it as a regex."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: SilenceLabel
    value: NonEmptyText
    regex: bool = False

    @model_validator(mode="after")
    def _compile_regex(self) -> Matcher:
        if self.regex:
            try:
                re.compile(self.value)
            except re.error as error:
                raise ValueError(
                    f"invalid regular expression {self.value!r} for label {self.label}: {error}"
                ) from None
        return self

    def __str__(self) -> str:
        return f"{self.label}{'=~' if self.regex else '='}{self.value}"

    def value_matcher(self) -> re.Pattern[str] | str:
        """Return the compiled pattern for a regex matcher, else the exact value."""
        return re.compile(self.value) if self.regex else self.value


class Silence(BaseModel):
    """A silence: findings that every matcher matches are muted from ``starts_at`` to ``ends_at``.

    Times without a zone count as UTC. ``id`` is 8 hex digits, generated when not given.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=_new_id, pattern=r"^[0-9a-f]{8}$")
    matchers: list[Matcher] = Field(min_length=1)
    owner: NonEmptyText
    reason: NonEmptyText
    starts_at: dt.datetime = Field(default_factory=_now)
    ends_at: dt.datetime
    created_at: dt.datetime = Field(default_factory=_now)

    @field_validator("starts_at", "ends_at", "created_at")
    @classmethod
    def _to_utc(cls, value: dt.datetime) -> dt.datetime:
        return _utc(value)

    @model_validator(mode="after")
    def _ends_after_start(self) -> Silence:
        # Equal times are allowed: expiring a silence that has not started sets both to now.
        if self.ends_at < self.starts_at:
            raise ValueError(
                f"ends_at {self.ends_at.isoformat()} is before starts_at "
                f"{self.starts_at.isoformat()}"
            )
        return self

    def is_active(self, now: dt.datetime) -> bool:
        """Return whether the silence applies at ``now`` (a naive ``now`` counts as UTC)."""
        moment = _utc(now)
        return self.starts_at <= moment < self.ends_at

    def status(self, now: dt.datetime) -> Literal["pending", "active", "expired"]:
        """Return ``pending`` (not started), ``active`` (applies) or ``expired``."""
        moment = _utc(now)
        if moment >= self.ends_at:
            return "expired"
        if moment < self.starts_at:
            return "pending"
        return "active"


# --- parsing -----------------------------------------------------------------------------------


def parse_matcher(text: str) -> Matcher:
    """Parse ``label=value`` (exact) or ``label=~pattern`` (anchored regex) into a matcher.

    Raises:
        InvalidSilenceError: the text has no ``=``, names an unknown label, has an empty value
            or an invalid regular expression.
    """
    label, sep, rest = text.partition("=")
    label = label.strip()
    if not sep or not label:
        raise InvalidSilenceError(
            f"invalid matcher {text!r}: expected LABEL=VALUE or LABEL=~REGEX, for example "
            "detector=keytrail.off_hours"
        )
    if label.endswith("!"):
        raise InvalidSilenceError(
            f"invalid matcher {text!r}: negative matchers (!= and !~) are not supported"
        )
    regex = rest.startswith("~")
    value = rest[1:] if regex else rest
    try:
        return Matcher.model_validate({"label": label, "value": value, "regex": regex})
    except ValidationError as error:
        raise InvalidSilenceError(f"invalid matcher {text!r}: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    message = str(problem["msg"]).removeprefix("Value error, ")
    if where == "label":
        return f"unknown label; expected one of {', '.join(SILENCE_LABELS)}"
    if where == "value":
        return "the value is empty"
    return f"{where}: {message}" if where else message


def parse_duration(text: str) -> dt.timedelta:
    """Parse a duration such as ``90m``, ``4h``, ``3d``, ``1w`` or ``1d12h``.

    Units: ``s`` seconds, ``m`` minutes, ``h`` hours, ``d`` days, ``w`` weeks.

    Raises:
        InvalidSilenceError: the text is not a positive duration in these units.
    """
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise InvalidSilenceError(
            f"invalid duration {text!r}: expected a number and a unit (s, m, h, d, w) such as "
            "4h, 3d or 1d12h"
        )
    total = sum((int(number) * _DURATION_UNITS[unit] for number, unit in parts), dt.timedelta())
    if total <= dt.timedelta():
        raise InvalidSilenceError(f"invalid duration {text!r}: it must be longer than zero")
    return total


def parse_expiry(text: str, now: dt.datetime) -> dt.datetime:
    """Parse an end time: a duration from ``now`` (``4h``) or an ISO 8601 time (UTC if no zone).

    Raises:
        InvalidSilenceError: the text is neither a duration nor an ISO 8601 time.
    """
    stripped = text.strip()
    try:
        return _utc(now) + parse_duration(stripped)
    except InvalidSilenceError:
        pass
    try:
        return _utc(dt.datetime.fromisoformat(stripped))
    except ValueError:
        raise InvalidSilenceError(
            f"invalid expiry {text!r}: expected a duration such as 4h, 3d or 1w, or an ISO 8601 "
            "time such as 2026-12-31T18:00:00Z"
        ) from None


def format_duration(delta: dt.timedelta) -> str:
    """Format a duration for people: ``3d 4h``, ``2h 5m``, or ``45s`` below one minute."""
    seconds = int(abs(delta).total_seconds())
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


# --- storage -----------------------------------------------------------------------------------

# NOTE: this table moves into the state schema migration of pipeline/store/state.py once the
# engine applies silences; until then SilenceStore creates it itself.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY,
    matchers_json TEXT NOT NULL,
    owner TEXT NOT NULL,
    reason TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS silences_ends_at ON silences (ends_at);
"""

# Fixed-width UTC text, so that SQL string comparison orders times correctly.
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_COLUMNS: Final = "id, matchers_json, owner, reason, starts_at, ends_at, created_at"


def _to_text(value: dt.datetime) -> str:
    return _utc(value).strftime(_TIME_FORMAT)


def _from_text(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=dt.UTC)


class SilenceStore:
    """The silences of one state directory, in the ``silences`` table of its ``state.db``.

    Each call opens its own short connection with the settings of the run state (WAL,
    ``synchronous=NORMAL``, 30 s busy timeout), so a silence can be added while a run holds the
    state lock, because SQLite serializes the writes.

    Args:
        path: the database file, normally ``<state_dir>/state.db``; created with its folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} has schema version {version}, newer than this "
                    f"keytrail supports ({SCHEMA_VERSION}); upgrade keytrail"
                )
            yield conn
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"cannot use state database {self.path}: {exc}; move the file away to start "
                "with an empty state"
            ) from None
        finally:
            conn.close()

    def add(
        self,
        silence: Silence,
        *,
        now: dt.datetime | None = None,
        max_duration: dt.timedelta = DEFAULT_MAX_DURATION,
    ) -> str:
        """Store a new silence and return its id.

        Raises:
            InvalidSilenceError: ``ends_at`` is not after ``now`` and ``starts_at``, the silence
                would last longer than ``max_duration`` from ``now`` (or from a later start),
                or a silence with the same id exists.
        """
        moment = _utc(now) if now is not None else _now()
        if silence.ends_at <= moment:
            raise InvalidSilenceError(
                f"expiry {silence.ends_at.isoformat()} is not in the future (now "
                f"{moment.isoformat()}); give a duration such as 4h or a later time"
            )
        if silence.ends_at <= silence.starts_at:
            raise InvalidSilenceError(
                f"expiry {silence.ends_at.isoformat()} is not after the start "
                f"{silence.starts_at.isoformat()}"
            )
        length = silence.ends_at - max(silence.starts_at, moment)
        if length > max_duration:
            raise InvalidSilenceError(
                f"silence would last {format_duration(length)}, longer than the maximum "
                f"{format_duration(max_duration)}; choose an earlier expiry"
            )
        matchers = json.dumps([matcher.model_dump() for matcher in silence.matchers])
        row = (
            silence.id,
            matchers,
            silence.owner,
            silence.reason,
            _to_text(silence.starts_at),
            _to_text(silence.ends_at),
            _to_text(silence.created_at),
        )
        with self._connect() as conn:
            try:
                conn.execute(f"INSERT INTO silences ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise InvalidSilenceError(f"a silence with id {silence.id} exists") from None
        logger.info(
            "added silence %s (%s) by %s until %s",
            silence.id,
            ", ".join(str(matcher) for matcher in silence.matchers),
            silence.owner,
            _to_text(silence.ends_at),
        )
        return silence.id

    def get(self, silence_id: str) -> Silence:
        """Return the stored silence with this id.

        Raises:
            SilenceNotFoundError: no silence has this id.
        """
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM silences WHERE id = ?", (silence_id,)
            ).fetchone()
        if row is None:
            raise SilenceNotFoundError(
                f"silence {silence_id!r} not found in {self.path}; "
                "`keytrail silence list --all` shows every id"
            )
        return _silence_from_row(row)

    def list(self, *, active_only: bool = True, now: dt.datetime | None = None) -> list[Silence]:
        """Return the silences, by end time then id: active ones only, or all of them."""
        with self._connect() as conn:
            if active_only:
                moment = _to_text(_utc(now) if now is not None else _now())
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM silences WHERE starts_at <= ? AND ends_at > ? "
                    "ORDER BY ends_at, id",
                    (moment, moment),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM silences ORDER BY ends_at, id"
                ).fetchall()
        return [_silence_from_row(row) for row in rows]

    def active(self, now: dt.datetime | None = None) -> builtins.list[Silence]:
        """Return the silences that apply at ``now``."""
        return self.list(active_only=True, now=now)

    def expire(self, silence_id: str, now: dt.datetime | None = None) -> Silence:
        """End a silence at ``now`` and return it as stored.

        A silence that has not started yet gets ``starts_at = ends_at = now``.

        Raises:
            SilenceNotFoundError: no silence has this id.
            InvalidSilenceError: the silence has already expired.
        """
        moment = _utc(now) if now is not None else _now()
        silence = self.get(silence_id)
        if silence.ends_at <= moment:
            raise InvalidSilenceError(
                f"silence {silence_id} already expired at {silence.ends_at.isoformat()}"
            )
        starts_at = min(silence.starts_at, moment)
        with self._connect() as conn:
            conn.execute(
                "UPDATE silences SET starts_at = ?, ends_at = ? WHERE id = ?",
                (_to_text(starts_at), _to_text(moment), silence_id),
            )
        logger.info("expired silence %s", silence_id)
        return silence.model_copy(update={"starts_at": starts_at, "ends_at": moment})


def _silence_from_row(row: Sequence[str]) -> Silence:
    silence_id, matchers, owner, reason, starts_at, ends_at, created_at = row
    return Silence(
        id=silence_id,
        matchers=[Matcher.model_validate(item) for item in json.loads(matchers)],
        owner=owner,
        reason=reason,
        starts_at=_from_text(starts_at),
        ends_at=_from_text(ends_at),
        created_at=_from_text(created_at),
    )


# --- applying ----------------------------------------------------------------------------------


def apply_silences(
    findings: pd.DataFrame, silences: Sequence[Silence], now: dt.datetime
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split findings into those kept and those an active silence mutes.

    Silences that are not active at ``now`` are skipped. A finding that several silences match
    is credited to the first of them in ``silences``.

    Returns:
        ``(kept, silenced)``, both with a fresh index. ``silenced`` has the extra column
        :data:`SILENCED_BY` with the silence id.
    """
    frame = findings.reset_index(drop=True)
    credit = pd.Series(None, index=frame.index, dtype=object)
    active = [silence for silence in silences if silence.is_active(now)]
    for silence in active:
        if frame.empty:
            break
        mask = pd.Series(True, index=frame.index)
        for matcher in silence.matchers:
            mask &= _matcher_mask(frame, matcher)
        credit[mask & credit.isna()] = silence.id

    silenced_mask = credit.notna()
    kept = frame[~silenced_mask].reset_index(drop=True)
    silenced = frame[silenced_mask].copy()
    silenced[SILENCED_BY] = credit[silenced_mask].astype(object)
    silenced = silenced.reset_index(drop=True)
    logger.info(
        "silences muted %s of %s findings (%s active silences)",
        len(silenced),
        len(frame),
        len(active),
    )
    return kept, silenced


def _matcher_mask(frame: pd.DataFrame, matcher: Matcher) -> pd.Series:
    if matcher.label in _SCALAR_COLUMNS:
        return _values_mask(frame[_SCALAR_COLUMNS[matcher.label]], matcher)
    items = frame[_LIST_COLUMNS[matcher.label]].explode()
    item_mask = _values_mask(items, matcher)
    matched = item_mask.groupby(level=0).any()
    return matched.reindex(frame.index, fill_value=False).astype(bool)


def _values_mask(values: pd.Series, matcher: Matcher) -> pd.Series:
    """Match each value in Python, with ``re`` for regexes, never pandas' Arrow regex engine.

    On Arrow-backed strings pandas runs regexes with pyarrow's RE2 kernels, whose syntax differs from the ``re`` syntax that
    :class:`Matcher` validates.
    """
    present = values.notna().to_numpy(dtype=bool)
    hits = np.zeros(len(values), dtype=bool)
    if present.any():
        texts = [str(value) for value in values.to_numpy(dtype=object)[present]]
        expected = matcher.value_matcher()
        if isinstance(expected, str):
            found = [text == expected for text in texts]
        else:
            outcome = {text: expected.fullmatch(text) is not None for text in set(texts)}
            found = [outcome[text] for text in texts]
        hits[present] = found
    return pd.Series(hits, index=values.index)
