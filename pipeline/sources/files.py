"""The files source: log files and folders on the local disk.

Each run lists every file under the configured paths and reads the ones that are new or whose
size or modification time changed since the run that last read them. The checkpoint is one
entry per file (absolute path -> size and ``st_mtime_ns``). Reading a file again is harmless
because the engine drops events whose ``event_uid`` was already seen. So a file that grows, such
as an Azure ``PT1H.json`` blob being appended to, is simply read whole again.

Only regular files are read (symbolic links are followed). A FIFO, socket or device under a
source path is counted as skipped with kind ``not_a_regular_file`` and never opened, because
opening a FIFO for reading blocks until a writer appears. A path that cannot be examined, such
as a symbolic link loop, is quarantined as ``unreadable_file`` with the reason.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.formats.base import FileResult, Quarantined
from pipeline.formats.reader import BatchReader, iter_files, merge_results
from pipeline.sources.base import SourceBatch, SourceSettings

__all__ = ["NOT_A_REGULAR_FILE", "FilesSource", "FilesSourceSettings"]

NOT_A_REGULAR_FILE = "not_a_regular_file"
"""Skip kind counted for a FIFO, socket or device found under a source path."""

logger = logging.getLogger(__name__)


class FilesSourceSettings(SourceSettings):
    """A source that reads log files and folders on the local disk (recursively)."""

    type: Literal["files"] = "files"
    paths: list[Path] = Field(min_length=1)


class FilesSource:
    """Read new and changed log files under a list of paths.

    Args:
        name: the source name that checkpoints are kept under.
        paths: files and folders; folders are walked recursively, hidden entries skipped.
    """

    type: ClassVar[str] = "files"

    def __init__(self, name: str, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.name = name
        self.paths = [Path(path) for path in paths]

    @classmethod
    def from_settings(cls, settings: FilesSourceSettings) -> FilesSource:
        """Build the source from its validated settings."""
        return cls(settings.name, settings.paths)

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        """Read the files that changed since ``checkpoints``.

        Args:
            checkpoints: this source's stored checkpoints (absolute path -> ``{"size",
                "mtime_ns"}``); an empty mapping reads everything.
            since: the start of a backfill window. Every file is read regardless of its
                checkpoint, because a file's name and times do not show which events it
                contains. The engine keeps only the events inside the window.
            until: the end of the backfill window.

        Raises:
            InputError: a configured path does not exist.
        """
        batch = SourceBatch(self.name)
        backfill = since is not None or until is not None
        # Files are read through one BatchReader, which builds frames for many files at once;
        # files that cannot be read at all are counted in small results merged at the end.
        reader = BatchReader()
        results = []
        for path in self._list():
            batch.files_listed += 1
            try:
                info = path.stat()
                if not stat.S_ISREG(info.st_mode):
                    results.append(_not_regular(path, info))
                    continue
                key = str(path.resolve())
            except (OSError, RuntimeError) as exc:
                # Path.resolve() raises RuntimeError for a symlink loop on Python 3.11 and 3.12.
                results.append(_unreadable(path, exc))
                continue
            marker = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
            if not backfill and checkpoints.get(key) == marker:
                batch.files_unchanged += 1
                continue
            try:
                opened = _read_regular(path)
            except OSError as exc:
                results.append(_unreadable(path, exc))
                continue
            if isinstance(opened, FileResult):
                results.append(opened)
                continue
            # The marker is taken when the file is opened, before reading, so a file that
            # changes while it is read is read again by the next run.
            info, data = opened
            reader.add(data, str(path))
            batch.checkpoints[key] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        batch.result = merge_results([reader.finish(), *results])
        logger.debug(
            "source %s: %s files listed, %s unchanged, %s read",
            self.name,
            batch.files_listed,
            batch.files_unchanged,
            len(batch.checkpoints),
        )
        return batch

    def _list(self) -> Iterator[Path]:
        """Yield every file under the source's paths, including non-regular ones.

        A configured path that exists but is neither a folder nor a regular file (a FIFO, a
        symlink loop) is yielded as it is, so :meth:`read` counts it instead of reporting it as
        not found.

        Raises:
            InputError: a configured path does not exist.
        """
        for path in self.paths:
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                mode = None  # iter_files raises the "log path not found" error.
            except OSError:
                yield path  # A symlink loop or a path without permission: read() reports it.
                continue
            if mode is None or stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                yield from iter_files([path])
            else:
                yield path


def _read_regular(path: Path) -> tuple[os.stat_result, bytes] | FileResult:
    """Open ``path`` without blocking and read it whole if it is still a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once when ``path`` was replaced by one after
    it was listed. The file type is checked again on the open descriptor.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags)
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return _not_regular(path, info)
        return info, handle.read()


def _not_regular(path: Path, info: os.stat_result) -> FileResult:
    kind = _file_kind(info.st_mode)
    logger.warning("skipped %s: a %s, not a regular file", path, kind)
    result = FileResult()
    result.skipped[NOT_A_REGULAR_FILE] += 1
    return result


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def _unreadable(path: Path, exc: OSError | RuntimeError) -> FileResult:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    logger.warning("cannot read %s: %s", path, reason)
    result = FileResult(files=1)
    result.quarantined.append(
        Quarantined(str(path), "unreadable_file", f"cannot read {path}: {reason}")
    )
    return result
