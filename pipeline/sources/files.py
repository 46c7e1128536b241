"""The files source: log files and folders on the local disk.

Each run lists every file under the configured paths and reads the ones that are new or whose
size or modification time changed since the run that last read them. The checkpoint is one
entry per file (absolute path -> size and ``st_mtime_ns``). Reading a file again is harmless
because the engine drops events whose ``event_uid`` was already seen. So a file that grows, such
as an Azure ``PT1H.json`` blob being appended to, is simply read whole again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.formats.base import FileResult, Quarantined
from pipeline.formats.reader import iter_files, merge_results, read_bytes

__all__ = ["FilesSource", "SourceBatch"]

logger = logging.getLogger(__name__)


@dataclass
class SourceBatch:
    """What one source produced in one run.

    Attributes:
        name: the source's configured name.
        result: the events, record counts, quarantined records and skip counts.
        checkpoints: checkpoint entries to store when the run commits, for the files that were
            read successfully.
        files_listed: files found under the source's paths.
        files_unchanged: files not read because their checkpoint matched.
    """

    name: str
    result: FileResult = field(default_factory=FileResult)
    checkpoints: dict[str, Any] = field(default_factory=dict)
    files_listed: int = 0
    files_unchanged: int = 0


class FilesSource:
    """Read new and changed log files under a list of paths.

    Args:
        name: the source name that checkpoints are kept under.
        paths: files and folders; folders are walked recursively, hidden entries skipped.
    """

    type = "files"

    def __init__(self, name: str, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.name = name
        self.paths = [Path(path) for path in paths]

    def read(self, checkpoints: Mapping[str, Any]) -> SourceBatch:
        """Read the files that changed since ``checkpoints``.

        Args:
            checkpoints: this source's stored checkpoints (absolute path -> ``{"size",
                "mtime_ns"}``); an empty mapping reads everything.

        Raises:
            InputError: a configured path does not exist.
        """
        batch = SourceBatch(self.name)
        results = []
        for path in iter_files(self.paths):
            batch.files_listed += 1
            key = str(path.resolve())
            try:
                stat = path.stat()
            except OSError as exc:
                results.append(_unreadable(path, exc))
                continue
            marker = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if checkpoints.get(key) == marker:
                batch.files_unchanged += 1
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                results.append(_unreadable(path, exc))
                continue
            # The marker is taken before reading, so a file that changes while it is read is
            # read again by the next run.
            results.append(read_bytes(data, str(path)))
            batch.checkpoints[key] = marker
        batch.result = merge_results(results)
        logger.debug(
            "source %s: %s files listed, %s unchanged, %s read",
            self.name,
            batch.files_listed,
            batch.files_unchanged,
            len(batch.checkpoints),
        )
        return batch


def _unreadable(path: Path, exc: OSError) -> FileResult:
    logger.warning("cannot read %s: %s", path, exc.strerror)
    result = FileResult(files=1)
    result.quarantined.append(
        Quarantined(str(path), "unreadable_file", f"cannot read {path}: {exc.strerror}")
    )
    return result
