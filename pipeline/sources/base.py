"""The contract every log source follows.

A source reads what is new since its checkpoints and returns one :class:`SourceBatch`. It never
writes state itself. The engine upserts ``batch.checkpoints`` and deletes
``batch.checkpoints_removed`` in the SQLite transaction that stores the run's events and
alerts. A run that fails before its commit therefore reads the same input again next time, and
the engine drops the events it already has by ``event_uid``.

A source that cannot be read at all (throttled, server errors, credentials refused) raises
:class:`SourceError`; the engine reports it, keeps that source's checkpoints where they were and
goes on with the other sources. A source that read part of its input returns what it read
completely, with checkpoints only for that part, and names what it could not read in
``batch.problems``.

``since`` and ``until`` ask for a backfill of a time window (``keytrail run --since --until``):
the source reads what lies in the window regardless of its checkpoints. The engine drops events
outside the window, so a source may read a coarser range (whole day partitions, whole files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import KeytrailError
from pipeline.formats.base import FileResult

__all__ = ["Source", "SourceBatch", "SourceError", "SourceSettings"]


class SourceSettings(BaseModel):
    """Settings every source has: a unique name, under which its checkpoints are kept."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=100)
    type: str


class SourceError(KeytrailError):
    """A source could not be read this run; its checkpoints stay where they were.

    Args:
        source: the source's configured name.
        reason: what failed, with the provider's error code where there is one (never a
            credential or a signed URL).
        hint: what the operator can do, or an empty string.
    """

    def __init__(self, source: str, reason: str, hint: str = "") -> None:
        self.source = source
        self.reason = reason
        self.hint = hint
        message = f"source {source}: {reason}"
        super().__init__(f"{message}; {hint}" if hint else message)


@dataclass
class SourceBatch:
    """The output of one source in one run.

    Attributes:
        name: the source's configured name.
        result: the events, record counts, quarantined records and skip counts.
        checkpoints: checkpoint entries (key -> JSON-ready value) to upsert when the run
            commits, for the input that was read completely.
        checkpoints_removed: checkpoint keys to delete when the run commits (entries that
            fell out of the source's look-back).
        files_listed: files, objects or pages found.
        files_unchanged: of those, the ones not read because their checkpoint matched.
        problems: what could not be read this run, one line each; the run summary shows them.
        notes: facts the operator should know that are not errors (for example a GCP project
            that returned no Data Access entries at all).
    """

    name: str
    result: FileResult = field(default_factory=FileResult)
    checkpoints: dict[str, Any] = field(default_factory=dict)
    checkpoints_removed: list[str] = field(default_factory=list)
    files_listed: int = 0
    files_unchanged: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Source(Protocol):
    """A place raw records are read from."""

    type: ClassVar[str]
    name: str

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Read what is new since ``checkpoints`` (or what lies in ``since``..``until``)."""
        ...
