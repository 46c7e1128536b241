"""The log-format contract and registry.

A format module turns one provider record (a parsed JSON object) into rows of the event schema.
The reader in :mod:`pipeline.formats.reader` does everything else once: reading and
decompressing files, splitting JSON lines, unwrapping containers, routing each record to the
first format whose :meth:`LogFormat.matches` accepts it, quarantining and counting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.schema import empty_events

__all__ = [
    "BatchResult",
    "FastBatch",
    "FileResult",
    "LogFormat",
    "Quarantined",
    "RecordError",
    "Row",
    "Skip",
    "get_format",
    "register",
    "registered_formats",
]

Row = dict[str, Any]
"""One event-schema row. ``time`` may be the provider's raw timestamp string."""


class RecordError(Exception):
    """Raised by a format when a record it matched cannot be normalized.

    The reader turns it into a quarantine entry naming the origin, the field and the reason.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"field {field}: {message}")


@dataclass(frozen=True)
class Skip:
    """A record a format recognised and deliberately does not turn into events.

    ``kind`` is a short stable name counted in the run summary: ``digest``, ``insight``,
    ``not_secret_activity``, ``incomplete_last_line``.
    """

    kind: str


@dataclass(frozen=True)
class Quarantined:
    """A record (or whole file) that could not be ingested.

    Attributes:
        origin: file or object key plus ``line N`` or ``record N``.
        reason: short stable category counted in the summary, such as ``invalid_json``,
            ``unknown_format``, ``invalid_record``, ``invalid_time``, ``unreadable_file``.
        detail: the full message: what was wrong, in which field, what was found.
        raw: the record's text, truncated, so it can be inspected and replayed.
    """

    origin: str
    reason: str
    detail: str
    raw: str | None = None


@cache
def _empty_events_template() -> pd.DataFrame:
    return empty_events()


def _new_empty_events() -> pd.DataFrame:
    # Building the 32 typed columns takes about 3 ms, and a deep copy of a built frame about
    # 0.1 ms. The reader creates at least one result per file.
    return _empty_events_template().copy()


@dataclass
class FileResult:
    """What reading one or more files produced."""

    events: pd.DataFrame = field(default_factory=_new_empty_events)
    records: int = 0
    quarantined: list[Quarantined] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    files: int = 0
    formats: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """Return the counts for the run summary, as plain JSON-ready values."""
        return {
            "files": self.files,
            "records": self.records,
            "events": len(self.events),
            "quarantined": len(self.quarantined),
            "quarantined_by_reason": dict(Counter(q.reason for q in self.quarantined)),
            "skipped_by_kind": dict(self.skipped),
            "records_by_format": dict(self.formats),
        }


class LogFormat(ABC):
    """One provider log format.

    Subclasses set :attr:`id` (a stable dotted-free name also used in ``log_format``) and
    :attr:`cloud`, and implement :meth:`matches` and :meth:`normalize`.
    """

    id: ClassVar[str]
    cloud: ClassVar[str]

    @abstractmethod
    def matches(self, record: Mapping[str, Any]) -> bool:
        """Return True when ``record`` is of this format. Must be cheap: a few key lookups."""

    @abstractmethod
    def normalize(self, record: Mapping[str, Any], origin: str) -> list[Row] | Skip:
        """Turn one record into event rows (one per secret touched), or a :class:`Skip`.

        Raises:
            RecordError: the record is of this format but cannot be normalized.
        """

    def read_fast(self, data: bytes, origin: str) -> FileResult | None:
        """Optionally read a whole decompressed file column-wise.

        Returns None when the file is not in a shape the fast path handles, and the reader
        falls back to record-by-record parsing. The result must equal what the record path
        produces for the same file.
        """
        return None

    def fast_batch(self) -> FastBatch | None:
        """Optionally return a new collector that reads many files with one fast-path frame.

        A format that returns one should produce, for each file it accepts, the same result as
        :meth:`read_fast`. The reader then uses the collector instead of :meth:`read_fast`.
        """
        return None


@dataclass
class BatchResult:
    """The frame and per-file counts that a :class:`FastBatch` built from its files."""

    files: list[FileResult | None]
    """One result per added file, in order, with counts only (their ``events`` are empty).
    None marks a file the fast path declined: the reader reads it record by record."""
    events: pd.DataFrame
    """The rows of the accepted files, in file order."""
    row_files: np.ndarray
    """For each row of ``events``, the index in ``files`` of the file it came from."""


class FastBatch(ABC):
    """Files collected for one format's fast path, so that their frame is built once."""

    @property
    @abstractmethod
    def records(self) -> int:
        """Records added since the last :meth:`finish`."""

    @abstractmethod
    def add(self, data: bytes, origin: str) -> bool:
        """Decode one decompressed UTF-8 file; False when it is not in a shape the batch reads.

        Raises:
            RecordError: as :meth:`LogFormat.read_fast`; the reader reads the file record by
                record.
            ValueError: as :meth:`LogFormat.read_fast`.
        """

    @abstractmethod
    def finish(self) -> BatchResult:
        """Build the frame of every file added since the last call, and start a new batch."""


_REGISTRY: dict[str, LogFormat] = {}


def register(fmt: type[LogFormat]) -> type[LogFormat]:
    """Register a format class (usable as a decorator). Duplicate ids are rejected."""
    if fmt.id in _REGISTRY:
        raise ValueError(f"log format {fmt.id!r} is already registered")
    _REGISTRY[fmt.id] = fmt()
    return fmt


def registered_formats() -> list[LogFormat]:
    """Return the registered formats in routing order (registration order)."""
    return list(_REGISTRY.values())


def get_format(format_id: str) -> LogFormat:
    """Return the format registered as ``format_id``."""
    try:
        return _REGISTRY[format_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown log format {format_id!r}; known: {known}") from None
