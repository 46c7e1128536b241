"""The event history: a Parquet dataset partitioned by UTC date and cloud.

Layout under the root folder (``<state_dir>/history``)::

    date=2024-05-01/cloud=aws/<run_id>.parquet

Each run writes at most one file per (date, cloud) partition, named after the run, so a failed
run can be rolled back with :meth:`History.delete_run`. A file is written under a hidden
temporary name, flushed to disk and renamed into place, so readers never see half a file.
Every file stores all columns of :data:`pipeline.schema.ARROW_SCHEMA`, including ``cloud``.
The folder names only serve partition pruning, and the ``date`` key is not a stored column.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.schema import ARROW_SCHEMA, CLOUDS, COLUMNS, empty_events

__all__ = ["History"]

logger = logging.getLogger(__name__)

_DATE_DIR: Final = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_CLOUD_DIR: Final = re.compile(r"^cloud=([a-z0-9_]+)$")
_RUN_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TIME_TYPE: Final = pa.timestamp("us", tz="UTC")
_PANDAS_DTYPES: Final = empty_events().dtypes.to_dict()
_ARROW_TO_PANDAS: Final[dict[pa.DataType, Any]] = {
    pa.string(): pd.StringDtype("pyarrow"),
    pa.int64(): pd.Int64Dtype(),
}


class History:
    """Append-only store of normalized events, read back by time range.

    Implements :class:`detectors.base.HistoryView`.

    Args:
        root: the dataset folder; it is created on the first append.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def append(self, events: pd.DataFrame, run_id: str) -> int:
        """Write ``events`` as one file per (date, cloud) partition for this run.

        Args:
            events: an events frame with every schema column; other columns are not stored.
            run_id: letters, digits, ``_`` and ``-`` only; it names the files.

        Returns:
            The number of rows written.

        Raises:
            ValueError: invalid ``run_id``, missing schema columns, null times, or a cloud
                outside :data:`pipeline.schema.CLOUDS`.
        """
        _check_run_id(run_id)
        missing = [name for name in COLUMNS if name not in events.columns]
        if missing:
            raise ValueError(f"events frame is missing columns: {', '.join(missing)}")
        if events.empty:
            return 0
        if events["time"].isna().any():
            raise ValueError("events frame has rows with a null time; history needs every time")
        clouds = set(events["cloud"].dropna().unique())
        unknown = sorted(clouds - set(CLOUDS))
        if unknown or events["cloud"].isna().any():
            found = unknown + (["null"] if events["cloud"].isna().any() else [])
            raise ValueError(f"invalid cloud values {found}; expected one of {list(CLOUDS)}")

        frame = events[list(COLUMNS)].sort_values("time", kind="stable").reset_index(drop=True)
        table = pa.Table.from_pandas(frame, schema=ARROW_SCHEMA, preserve_index=False)
        # Drop the pandas metadata so other readers (DuckDB, Spark) see plain Arrow types.
        table = table.replace_schema_metadata(None)
        days = frame["time"].dt.tz_convert("UTC").dt.floor("D")
        groups = frame.groupby([days, frame["cloud"]], sort=True).indices

        written = 0
        for key, positions in groups.items():
            day, cloud = cast(tuple[pd.Timestamp, str], key)
            folder = self.root / f"date={day:%Y-%m-%d}" / f"cloud={cloud}"
            part = table.take(pa.array(positions))
            path = _write_atomically(part, folder, run_id)
            written += part.num_rows
            logger.debug("history: wrote %s rows to %s", part.num_rows, path)
        logger.info(
            "history: run %s appended %s rows in %s partitions", run_id, written, len(groups)
        )
        return written

    def events(
        self,
        since: pd.Timestamp | datetime | None = None,
        until: pd.Timestamp | datetime | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the events with ``since <= time < until``, sorted by time.

        Only the date partitions that overlap the range are opened and only ``columns`` are
        read. Naive timestamps are taken as UTC.

        Args:
            since: inclusive lower bound, or None for no bound.
            until: exclusive upper bound, or None for no bound.
            columns: schema columns to return, in that order; None returns all of them.

        Returns:
            A frame with the events schema's dtypes; empty with the same columns when nothing
            matches.

        Raises:
            ValueError: ``columns`` names a column outside the schema.
        """
        selected = list(COLUMNS) if columns is None else list(columns)
        unknown = [name for name in selected if name not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown history columns {unknown}; known: {', '.join(COLUMNS)}")
        start = _utc(since)
        end = _utc(until)
        files = [
            str(path)
            for day, folder in self._date_folders()
            if _overlaps(day, start, end)
            for path in _parquet_files(folder)
        ]
        if not files:
            return empty_events()[selected]

        dataset = ds.dataset(files, schema=ARROW_SCHEMA, format="parquet")
        condition = None
        if start is not None:
            condition = ds.field("time") >= pa.scalar(start.to_pydatetime(), _TIME_TYPE)
        if end is not None:
            upper = ds.field("time") < pa.scalar(end.to_pydatetime(), _TIME_TYPE)
            condition = upper if condition is None else condition & upper
        read = sorted(set(selected) | {"time"}, key=list(COLUMNS).index)
        table = dataset.to_table(columns=read, filter=condition)
        order = [(name, "ascending") for name in ("time", "event_uid", "resource") if name in read]
        table = table.sort_by(order)
        frame = table.select(selected).to_pandas(types_mapper=_ARROW_TO_PANDAS.get)
        return frame.astype({name: _PANDAS_DTYPES[name] for name in selected})

    def span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        """Return the earliest and latest event time stored, or None when history is empty."""
        folders = [folder for _, folder in self._date_folders() if _parquet_files(folder)]
        if not folders:
            return None
        first = self._time_bounds(folders[0])
        last = self._time_bounds(folders[-1])
        return first[0], last[1]

    def expire(self, older_than: date) -> int:
        """Delete the date partitions before ``older_than`` (retention).

        Returns:
            The number of date partitions deleted.
        """
        removed = 0
        for day, folder in self._date_folders():
            if day >= older_than:
                break
            shutil.rmtree(folder)
            removed += 1
        if removed:
            logger.info("history: expired %s days before %s", removed, older_than.isoformat())
        return removed

    def delete_run(self, run_id: str) -> int:
        """Delete the files ``run_id`` wrote, including temporary files of a crashed write.

        Empty partition folders left behind are removed too.

        Returns:
            The number of complete Parquet files deleted.
        """
        _check_run_id(run_id)
        removed = 0
        for _, date_folder in self._date_folders():
            for cloud_folder in _cloud_folders(date_folder):
                for path in cloud_folder.iterdir():
                    if _belongs_to_run(path.name, run_id):
                        path.unlink()
                        removed += int(not path.name.startswith("."))
                _remove_if_empty(cloud_folder)
            _remove_if_empty(date_folder)
        logger.info("history: deleted %s files of run %s", removed, run_id)
        return removed

    def run_ids(self) -> set[str]:
        """Return the ids of the runs that have files in the history, temporary files included."""
        found = set()
        for _, date_folder in self._date_folders():
            for cloud_folder in _cloud_folders(date_folder):
                for path in cloud_folder.iterdir():
                    # "<run_id>.parquet", "<run_id>.<n>.parquet" or ".<run_id>...tmp".
                    run_id = path.name.removeprefix(".").split(".", 1)[0]
                    if _RUN_ID.match(run_id):
                        found.add(run_id)
        return found

    def _date_folders(self) -> list[tuple[date, Path]]:
        """Return the ``date=`` partition folders in date order."""
        if not self.root.is_dir():
            return []
        folders = []
        for path in self.root.iterdir():
            match = _DATE_DIR.match(path.name)
            if match and path.is_dir():
                folders.append((date.fromisoformat(match.group(1)), path))
        return sorted(folders)

    def _time_bounds(self, date_folder: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
        files = [str(path) for path in _parquet_files(date_folder)]
        times = ds.dataset(files, schema=ARROW_SCHEMA, format="parquet").to_table(columns=["time"])
        bounds = pc.min_max(times["time"])
        return pd.Timestamp(bounds["min"].as_py()), pd.Timestamp(bounds["max"].as_py())


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}; expected 1 to 128 letters, digits, '_' or '-'"
        )


def _utc(moment: pd.Timestamp | datetime | None) -> pd.Timestamp | None:
    if moment is None:
        return None
    timestamp = pd.Timestamp(moment)
    if timestamp.tzinfo is None:
        return timestamp.tz_localize("UTC")
    return timestamp.tz_convert("UTC")


def _overlaps(day: date, start: pd.Timestamp | None, end: pd.Timestamp | None) -> bool:
    """Return True when the UTC day ``day`` has any instant in ``[start, end)``."""
    day_start = pd.Timestamp(day, tz="UTC")
    day_end = day_start + timedelta(days=1)
    if start is not None and day_end <= start:
        return False
    return not (end is not None and day_start >= end)


def _cloud_folders(date_folder: Path) -> Iterator[Path]:
    for path in sorted(date_folder.iterdir()):
        if _CLOUD_DIR.match(path.name) and path.is_dir():
            yield path


def _parquet_files(date_folder: Path) -> list[Path]:
    """Return the complete Parquet files of one date partition (temporary files excluded)."""
    return [
        path
        for cloud_folder in _cloud_folders(date_folder)
        for path in sorted(cloud_folder.glob("*.parquet"))
        if not path.name.startswith(".")
    ]


def _belongs_to_run(name: str, run_id: str) -> bool:
    # Run ids contain no dots, so "<run_id>." cannot be a prefix of another run's file name.
    return name.startswith((f"{run_id}.", f".{run_id}."))


def _write_atomically(table: pa.Table, folder: Path, run_id: str) -> Path:
    """Write ``table`` under a temporary name, fsync it and rename it to its final name."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{run_id}.parquet"
    sequence = 1
    while final.exists():
        final = folder / f"{run_id}.{sequence}.parquet"
        sequence += 1
    temporary = folder / f".{final.name}.tmp"
    try:
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return final


def _fsync_folder(folder: Path) -> None:
    """Persist a rename on POSIX file systems; Windows cannot open folders, so it is skipped."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
