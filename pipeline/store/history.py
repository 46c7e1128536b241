"""The event history: a Parquet dataset partitioned by UTC date and cloud, with its hourly rollup.

Layout under the root folder (``<state_dir>/history``)::

    date=2024-05-01/cloud=aws/<run_id>.parquet
    rollup/date=2024-05-01/cloud=aws/<run_id>.parquet

Each run writes at most one events file per (date, cloud) partition, named after the run, so a
failed run can be rolled back with :meth:`History.delete_run`. Beside each events file it writes
the file's hourly rollup (:func:`detectors.base.rollup_events`) under the same relative path in
``rollup/``, which is what baselines over weeks read. A file is written under a hidden temporary
name, flushed to disk and renamed into place, so readers never see half a file. Every events
file stores all columns of :data:`pipeline.schema.ARROW_SCHEMA`, including ``cloud``; every
rollup file all columns of :data:`ROLLUP_SCHEMA`. The folder names only serve partition pruning,
and the ``date`` key is not a stored column.

An events file without its rollup twin (a history written before rollups existed, or a crash
between the two writes) gets its rollup built on the first read that needs it, and written
unless the folder is read-only. A rollup file without its events twin is ignored.

A rollup file that lacks a column of :data:`ROLLUP_SCHEMA` (written before ``user_agent``
became a key, or by an older version after a downgrade) or cannot be read is rebuilt from its
events twin the same way, on the first read of its date. Checking the schemas costs a footer
read per file, about 0.1 ms.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from detectors.base import ROLLUP_COLUMNS, ROLLUP_KEYS, project_rollup, rollup_events
from pipeline.schema import ARROW_SCHEMA, CLOUDS, COLUMNS, empty_events

__all__ = ["ROLLUP_SCHEMA", "CappedHistoryView", "History"]

logger = logging.getLogger(__name__)

_DATE_DIR: Final = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_CLOUD_DIR: Final = re.compile(r"^cloud=([a-z0-9_]+)$")
_RUN_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TIME_TYPE: Final = pa.timestamp("us", tz="UTC")
_PANDAS_DTYPES: Final = empty_events().dtypes.to_dict()
_ARROW_TO_PANDAS: Final[dict[pa.DataType, Any]] = {
    pa.string(): pd.StringDtype("pyarrow"),
    pa.large_string(): pd.StringDtype("pyarrow"),
    pa.int64(): pd.Int64Dtype(),
}
_ROLLUP_DIR: Final = "rollup"
_HOUR_US: Final = 3_600_000_000
# Rows per Parquet row group of an events file. Rows are in time order, so a read of a few
# hours skips the row groups whose time statistics fall outside it. In benchmarks/detect.py
# (a million events a day), four reads of the hours before the window took 0.27 s instead of
# 1.0 s, when each file was one row group and every read opened the whole day.
_EVENTS_ROW_GROUP: Final = 65_536
# The aggregation :func:`_merge_rows` applies to each value column of the rollup when rows merge.
_MERGE_AGGREGATIONS: Final = (("count", "sum"), ("first_time", "min"), ("last_time", "max"))
# A run's cached history reads stay under this, so a month of rollup rows that one detector
# read does not stay in memory through the others (default of CappedHistoryView.cache_bytes).
_CACHE_BYTES: Final = 512 * 1024 * 1024

ROLLUP_SCHEMA: Final = pa.schema(
    [
        pa.field("hour", _TIME_TYPE),
        *(pa.field(name, ARROW_SCHEMA.field(name).type) for name in ROLLUP_KEYS if name != "hour"),
        pa.field("count", pa.int64()),
        pa.field("first_time", _TIME_TYPE),
        pa.field("last_time", _TIME_TYPE),
    ]
)
"""Declared Parquet schema of the rollup files, in :data:`detectors.base.ROLLUP_COLUMNS` order."""
_ROLLUP_DICTIONARY_SCHEMA: Final = pa.schema(
    [
        pa.field(field.name, pa.dictionary(pa.int32(), pa.string()))
        if field.type == pa.string()
        else field
        for field in ROLLUP_SCHEMA
    ]
)
_DICTIONARY_FORMAT: Final = ds.ParquetFileFormat(
    read_options=ds.ParquetReadOptions(
        dictionary_columns=[field.name for field in ROLLUP_SCHEMA if field.type == pa.string()]
    )
)
_TEXT_KEYS: Final = frozenset(field.name for field in ROLLUP_SCHEMA if field.type == pa.string())
_ROLLUP_DTYPES: Final = {
    **{name: _PANDAS_DTYPES[name] for name in ROLLUP_KEYS if name not in _TEXT_KEYS | {"hour"}},
    "hour": "datetime64[us, UTC]",
    "count": "int64",
    "first_time": "datetime64[us, UTC]",
    "last_time": "datetime64[us, UTC]",
}


class History:
    """Append-only store of normalized events, read back by time range.

    Implements :class:`detectors.base.HistoryView`.

    Args:
        root: the dataset folder; it is created on the first append.
        read_only: build missing rollup files in memory instead of writing them (dry runs).
    """

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only
        # Files already warned about, so a problem is logged once per History, not per read.
        self._warned: set[Path] = set()

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

        frame = events[list(COLUMNS)]
        # Sorting copies every string column, so input already in time order skips it.
        if not frame["time"].is_monotonic_increasing:
            frame = frame.sort_values("time", kind="stable")
        frame = frame.reset_index(drop=True)
        table = pa.Table.from_pandas(frame, schema=ARROW_SCHEMA, preserve_index=False)
        # Drop the pandas metadata so other readers (DuckDB, Spark) see plain Arrow types.
        table = table.replace_schema_metadata(None)
        days = frame["time"].dt.tz_convert("UTC").dt.floor("D")
        groups = frame.groupby([days, frame["cloud"]], sort=True).indices

        rollup = _rollup_table(frame)
        rollup_days = rollup.column("hour").to_pandas().dt.floor("D")
        rollup_clouds = rollup.column("cloud").to_pandas()
        rollup_groups = pd.Series(range(len(rollup))).groupby([rollup_days, rollup_clouds]).indices

        written = 0
        for key, positions in groups.items():
            day, cloud = cast(tuple[pd.Timestamp, str], key)
            relative = Path(f"date={day:%Y-%m-%d}") / f"cloud={cloud}"
            part = _select_rows(table, np.asarray(positions))
            path = _write_atomically(
                part, self.root / relative, run_id, row_group_size=_EVENTS_ROW_GROUP
            )
            # The rollup file takes the events file's name, so the two stay twins even when
            # the run wrote this partition before and the name got a sequence number.
            rollup_part = _select_rows(rollup, np.asarray(rollup_groups[key]))
            _write_atomically(rollup_part, self._rollup_root / relative, run_id, name=path.name)
            written += part.num_rows
            logger.debug(
                "history: wrote %s rows and %s rollup rows to %s",
                part.num_rows,
                rollup_part.num_rows,
                path,
            )
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

    def rollup(
        self,
        since: pd.Timestamp | datetime | None = None,
        until: pd.Timestamp | datetime | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the hourly rollup of the events with ``since <= time < until``.

        Whole hours come from the rollup files, reading only the date partitions in range and
        only the columns needed. An hour cut by ``since`` or ``until`` is rolled up from its raw
        events, so the result equals :func:`detectors.base.rollup_events` over
        :meth:`events` for the same range.

        Args:
            since: inclusive lower bound on event time, or None for no bound.
            until: exclusive upper bound on event time, or None for no bound.
            columns: rollup columns to return, in that order. Rows that share the requested
                key columns are merged (:func:`detectors.base.project_rollup`). None returns
                every column, one row per key and stored file.

        Returns:
            A frame whose text keys are pandas Categorical, with the stored dictionary indices
            as codes. ``hour`` and the two times are UTC timestamps, ``count`` is int64.

        Raises:
            ValueError: ``columns`` names a column outside the rollup.
        """
        return self._rollup(since, until, columns, self._stored_rollup)

    def _rollup(
        self,
        since: pd.Timestamp | datetime | None,
        until: pd.Timestamp | datetime | None,
        columns: Sequence[str] | None,
        stored: Callable[[pd.Timestamp | None, pd.Timestamp | None, list[str]], pd.DataFrame],
    ) -> pd.DataFrame:
        """Implement :meth:`rollup`, reading whole hours through ``stored(start, end, selected)``."""
        selected = list(ROLLUP_COLUMNS) if columns is None else list(columns)
        unknown = [name for name in selected if name not in ROLLUP_COLUMNS]
        if unknown:
            raise ValueError(
                f"unknown rollup columns {unknown}; known: {', '.join(ROLLUP_COLUMNS)}"
            )
        start = _utc(since)
        end = _utc(until)
        whole_start = None if start is None else start.ceil("h")
        whole_end = None if end is None else end.floor("h")
        parts = []
        if whole_start is not None and whole_end is not None and whole_start >= whole_end:
            # The range lies inside one hour or spans no whole hour: raw events only.
            parts.append(self._rollup_from_events(start, end, selected))
        else:
            if start is not None and whole_start is not None and start < whole_start:
                parts.append(self._rollup_from_events(start, whole_start, selected))
            parts.append(stored(whole_start, whole_end, selected))
            if end is not None and whole_end is not None and whole_end < end:
                parts.append(self._rollup_from_events(whole_end, end, selected))
        parts = [part for part in parts if len(part)]
        if not parts:
            return _empty_rollup()[selected]
        frame = parts[0] if len(parts) == 1 else _concat_rollups(parts)
        # The parts cover different hours, so with ``hour`` among the keys no row repeats.
        if columns is not None and len(parts) > 1 and "hour" not in selected:
            frame = project_rollup(frame, selected)
        return frame.reset_index(drop=True)

    def _rollup_from_events(
        self, start: pd.Timestamp | None, end: pd.Timestamp | None, selected: list[str]
    ) -> pd.DataFrame:
        needed = [name for name in ROLLUP_KEYS if name != "hour"] + ["time"]
        rolled = rollup_events(self.events(since=start, until=end, columns=needed))
        return _categorical_keys(project_rollup(rolled, selected))

    def _stored_rollup(
        self, start: pd.Timestamp | None, end: pd.Timestamp | None, selected: list[str]
    ) -> pd.DataFrame:
        """Read whole hours ``start <= hour < end`` from the rollup files, merged over files."""
        table = self._stored_table(start, end, selected)
        if table is None:
            return _empty_rollup()[selected]
        return _rollup_frame(table, selected)

    def _stored_table(
        self, start: pd.Timestamp | None, end: pd.Timestamp | None, selected: list[str]
    ) -> pa.Table | None:
        """Read whole hours ``start <= hour < end`` of the rollup files as one Arrow table.

        Text keys stay dictionary-encoded, with one dictionary per column. Returns None when
        no rollup file or built rollup overlaps the range.
        """
        files: list[str] = []
        built: list[pa.Table] = []
        for day, folder in self._date_folders():
            if _overlaps(day, start, end):
                day_files, day_built = self._rollup_files(folder)
                files += day_files
                built += day_built
        condition = None
        if start is not None:
            condition = ds.field("hour") >= pa.scalar(start.to_pydatetime(), _TIME_TYPE)
        if end is not None:
            upper = ds.field("hour") < pa.scalar(end.to_pydatetime(), _TIME_TYPE)
            condition = upper if condition is None else condition & upper
        # Text keys are read as Arrow dictionaries: Parquet stores them dictionary-encoded, so
        # this skips building millions of strings, and merging works on integer codes.
        tables = []
        if files:
            dataset = ds.dataset(files, schema=_ROLLUP_DICTIONARY_SCHEMA, format=_DICTIONARY_FORMAT)
            tables.append(dataset.to_table(columns=selected, filter=condition))
        for table in built:
            table = table.cast(_ROLLUP_DICTIONARY_SCHEMA)
            tables.append(ds.dataset(table).to_table(columns=selected, filter=condition))
        if not tables:
            return None
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table.unify_dictionaries().combine_chunks()

    def _rollup_files(self, date_folder: Path) -> tuple[list[str], list[pa.Table]]:
        """Return the rollup files of one date partition, building those missing or outdated.

        Returns:
            The paths of the rollup files whose events twin exists, and the rollup tables that
            had to be built but could not be written (a read-only history).
        """
        files: list[str] = []
        built: list[pa.Table] = []
        rebuilt = 0
        for cloud_folder in _cloud_folders(date_folder):
            relative = cloud_folder.relative_to(self.root)
            rollup_folder = self._rollup_root / relative
            for events_file in sorted(cloud_folder.glob("*.parquet")):
                if events_file.name.startswith("."):
                    continue
                twin = rollup_folder / events_file.name
                if twin.is_file() and _has_rollup_schema(twin):
                    files.append(str(twin))
                    continue
                try:
                    table = pq.read_table(events_file, schema=ARROW_SCHEMA)
                except (OSError, pa.ArrowException) as exc:
                    # Its events are lost to every read; the other files still serve.
                    if events_file not in self._warned:
                        self._warned.add(events_file)
                        logger.warning(
                            "history: events file %s cannot be read (%s); its rollup is left "
                            "out of baselines until the file is removed or restored",
                            events_file,
                            exc,
                        )
                    continue
                frame = table.to_pandas(types_mapper=_ARROW_TO_PANDAS.get)
                rollup = _rollup_table(frame.astype(_PANDAS_DTYPES))
                run_id = events_file.name.split(".", 1)[0]
                if self.read_only:
                    built.append(rollup)
                    continue
                try:
                    _write_atomically(rollup, rollup_folder, run_id, name=events_file.name)
                except OSError as exc:
                    if events_file not in self._warned:
                        self._warned.add(events_file)
                        logger.warning(
                            "history: could not write the rollup of %s (%s); it is built on "
                            "each read",
                            events_file,
                            exc,
                        )
                    built.append(rollup)
                    continue
                logger.debug("history: built the rollup of %s", events_file)
                rebuilt += 1
                files.append(str(twin))
        if rebuilt:
            logger.info(
                "history: built %s missing or outdated rollup files of %s",
                rebuilt,
                date_folder.name,
            )
        if built:
            logger.info(
                "history: built %s rollup files of %s in memory (read-only or not writable)",
                len(built),
                date_folder.name,
            )
        return files, built

    @property
    def _rollup_root(self) -> Path:
        return self.root / _ROLLUP_DIR

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
        for day, folder in _date_folders(self._rollup_root):
            if day >= older_than:
                break
            shutil.rmtree(folder)
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
        # Events files go first: a rollup file whose events twin is gone is ignored by readers.
        for _, date_folder in self._date_folders():
            removed += _delete_run_files(date_folder, run_id)
        for _, date_folder in _date_folders(self._rollup_root):
            _delete_run_files(date_folder, run_id)
        _remove_if_empty(self._rollup_root)
        logger.info("history: deleted %s files of run %s", removed, run_id)
        return removed

    def run_ids(self) -> set[str]:
        """Return the ids of the runs that have files in the history, temporary files included."""
        found = set()
        date_folders = self._date_folders() + _date_folders(self._rollup_root)
        for _, date_folder in date_folders:
            for cloud_folder in _cloud_folders(date_folder):
                for path in cloud_folder.iterdir():
                    # "<run_id>.parquet", "<run_id>.<n>.parquet" or ".<run_id>...tmp".
                    run_id = path.name.removeprefix(".").split(".", 1)[0]
                    if _RUN_ID.match(run_id):
                        found.add(run_id)
        return found

    def _date_folders(self) -> list[tuple[date, Path]]:
        """Return the ``date=`` partition folders of the events in date order."""
        return _date_folders(self.root)

    def _time_bounds(self, date_folder: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
        files = [str(path) for path in _parquet_files(date_folder)]
        times = ds.dataset(files, schema=ARROW_SCHEMA, format="parquet").to_table(columns=["time"])
        bounds = pc.min_max(times["time"])
        return pd.Timestamp(bounds["min"].as_py()), pd.Timestamp(bounds["max"].as_py())


def _has_rollup_schema(path: Path) -> bool:
    """Return True when the rollup file at ``path`` can be read and stores every rollup column."""
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException):
        # An unreadable file is rebuilt from its events twin.
        return False
    return set(ROLLUP_SCHEMA.names) <= names


def _date_folders(root: Path) -> list[tuple[date, Path]]:
    """Return the ``date=`` partition folders under ``root`` in date order."""
    if not root.is_dir():
        return []
    folders = []
    for path in root.iterdir():
        match = _DATE_DIR.match(path.name)
        if match and path.is_dir():
            folders.append((date.fromisoformat(match.group(1)), path))
    return sorted(folders)


def _delete_run_files(date_folder: Path, run_id: str) -> int:
    """Delete the files of ``run_id`` in one date partition; return the complete ones deleted."""
    removed = 0
    for cloud_folder in _cloud_folders(date_folder):
        for path in cloud_folder.iterdir():
            if _belongs_to_run(path.name, run_id):
                path.unlink()
                removed += int(not path.name.startswith("."))
        _remove_if_empty(cloud_folder)
    _remove_if_empty(date_folder)
    return removed


def _merge_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    """Merge the rows of ``table`` that share ``keys``: sum ``count``, min/max the times.

    Every key column becomes integer codes (dictionary indices, or factorized values) that
    are combined into one int64 per row, so the grouping is one hash aggregation of integers.
    Nulls form their own group. Groups keep the order of their first rows.
    """
    rows = table.num_rows
    combined = np.zeros(rows, dtype=np.int64)
    span = 1
    for name in keys:
        codes, size = _key_codes(table.column(name))
        if span * size >= 2**62:
            # Renumber the combined key densely before it could overflow int64.
            combined = pd.factorize(combined)[0].astype(np.int64)
            span = int(combined.max()) + 1
        combined = combined * size + codes
        span *= size
    if rows == 0:
        return table
    # One single-threaded Arrow hash aggregation over the int64 key finds the groups and
    # reduces every value column. For the requests of benchmarks/detect.py over 4.5 million
    # rows, it took 0.09 to 0.14 s instead of 0.53 to 0.65 s for the earlier stable sort when
    # a few thousand rows remained, and about as long when most rows were their own group.
    # The minimum row number of each group is its first row.
    names = table.column_names
    inputs: dict[str, Any] = {"group": combined, "row": np.arange(rows, dtype=np.int64)}
    aggregations = [("row", "min")]
    for name, function in _MERGE_AGGREGATIONS:
        if name in names:
            inputs[name] = table.column(name)
            aggregations.append((name, function))
    hours = table.column("hour").cast(pa.int64()).to_numpy() if "hour" in keys else None
    grouped = _aggregate(pa.table(inputs), aggregations, hours)
    if grouped.num_rows == rows:
        # Every row is its own group (the keys left out depend on the keys kept), so the
        # table is already merged.
        return table
    grouped = _order_by_first_row(grouped)
    positions = grouped.column("row_min")
    columns = {name: table.column(name).take(positions) for name in keys}
    for name, function in _MERGE_AGGREGATIONS:
        if name in names:
            columns[name] = grouped.column(f"{name}_{function}")
    return pa.table([columns[name] for name in names], names=names)


def _aggregate(
    inputs: pa.Table, aggregations: list[tuple[str, str]], hours: np.ndarray | None
) -> pa.Table:
    """Group ``inputs`` by its ``group`` column and apply ``aggregations``.

    When ``hours`` (the rows' hours, microseconds) is given because the hour is part of the
    key, no group spans two UTC days. Rows in day order are then aggregated one day at a time:
    a day's hash table stays small enough for the CPU caches. For the 30 days of
    benchmarks/detect.py (4.5 million rows, 3.5 million groups) that took 0.26 s instead of
    0.73 s. Groups still come in the order of their first rows.
    """
    if hours is not None and len(hours):
        days = hours // (24 * _HOUR_US)
        steps = np.diff(days)
        if (steps >= 0).all():
            cuts = [0, *(np.flatnonzero(steps) + 1).tolist(), len(days)]
            return pa.concat_tables(
                inputs.slice(begin, end - begin)
                .group_by("group", use_threads=False)
                .aggregate(aggregations)
                for begin, end in itertools.pairwise(cuts)
            )
    return inputs.group_by("group", use_threads=False).aggregate(aggregations)


def _order_by_first_row(grouped: pa.Table) -> pa.Table:
    """Sort the groups of a hash aggregation by their first row (column ``row_min``).

    Single-threaded Arrow already lists groups in order of first appearance (pyarrow 26), so
    this usually only checks. The order of first rows is the contract of :func:`_merge_rows`,
    so it is restored if a release changes Arrow's order.
    """
    first_rows = grouped.column("row_min").to_numpy()
    if (first_rows[1:] > first_rows[:-1]).all():
        return grouped
    return grouped.take(pa.array(np.argsort(first_rows)))


def _key_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Return non-negative int64 codes of one key column and the number of distinct codes."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        size = len(array.dictionary) + 1
        codes = array.indices.fill_null(size - 1).to_numpy().astype(np.int64)
        return codes, size
    if pa.types.is_timestamp(array.type) and array.null_count == 0 and len(array):
        # Hours are whole multiples of an hour, so their offset from the first is a code.
        micros = array.cast(pa.int64()).to_numpy()
        low = int(micros.min())
        offsets = micros - low
        if not (offsets % _HOUR_US).any():
            codes = offsets // _HOUR_US
            return codes, int(codes.max()) + 1
    codes, uniques = pd.factorize(array.to_pandas(), use_na_sentinel=True)
    return codes.astype(np.int64) + 1, len(uniques) + 1


def _rollup_frame(table: pa.Table, selected: list[str]) -> pd.DataFrame:
    """Merge the rows of a stored rollup table that share the keys of ``selected`` into a frame.

    ``table`` contains the ``selected`` columns, text keys dictionary-encoded. The frame has
    the rollup's pandas dtypes, so its text keys are Arrow-backed strings.
    """
    keys = [name for name in selected if name in ROLLUP_KEYS]
    if len(selected) < len(ROLLUP_COLUMNS) and keys:
        table = _merge_rows(table, keys)
    # Dictionary columns become pandas Categorical without copying a string: the codes are
    # the dictionary indices.
    frame = table.to_pandas(types_mapper=_ARROW_TO_PANDAS.get)
    frame = frame.astype(
        {name: _ROLLUP_DTYPES[name] for name in selected if name in _ROLLUP_DTYPES}
    )
    if not keys and len(frame) > 1:
        frame = project_rollup(frame, selected)
    return frame


def _select_rows(table: pa.Table, positions: np.ndarray) -> pa.Table:
    """Return the rows at the sorted ``positions`` of ``table``, in order.

    A boolean filter copies strings sequentially, which is several times faster than a take
    of the same rows.
    """
    if len(positions) == table.num_rows:
        return table
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[positions] = True
    return table.filter(pa.array(mask))


def _rollup_table(events: pd.DataFrame) -> pa.Table:
    """Roll ``events`` up by hour and return the rows as a table of :data:`ROLLUP_SCHEMA`."""
    rolled = rollup_events(events)[list(ROLLUP_COLUMNS)]
    table = pa.Table.from_pandas(rolled, schema=ROLLUP_SCHEMA, preserve_index=False)
    return table.replace_schema_metadata(None)


def _empty_rollup() -> pd.DataFrame:
    table = _ROLLUP_DICTIONARY_SCHEMA.empty_table()
    return table.to_pandas(types_mapper=_ARROW_TO_PANDAS.get).astype(_ROLLUP_DTYPES)


def _categorical_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with its text key columns as pandas Categorical, as stored reads give.

    The categories are built through Arrow, so their dtype matches that of stored reads and
    :func:`_concat_rollups` can unite them.
    """
    converted = {
        name: pa.array(frame[name], type=pa.string()).dictionary_encode().to_pandas()
        for name in frame.columns
        if name in _TEXT_KEYS and not isinstance(frame[name].dtype, pd.CategoricalDtype)
    }
    if not converted:
        return frame
    return frame.assign(
        **{name: pd.Series(values, index=frame.index) for name, values in converted.items()}
    )


def _str_categories(column: pd.Series) -> pd.Series:
    """Return ``column`` with categories of dtype ``str``.

    Arrow gives an all-null dictionary column object-dtype categories, which
    ``union_categoricals`` refuses to unite with ``str`` ones.
    """
    categories = column.cat.categories
    if categories.dtype == "str":
        return column
    return column.cat.set_categories(categories.astype("str"))


def _concat_rollups(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate rollup frames, uniting the categories of their text keys.

    ``pd.concat`` would turn categorical columns with different categories into objects.
    """
    columns = {}
    for name in parts[0].columns:
        if name in _TEXT_KEYS:
            united = union_categoricals(
                [_str_categories(part[name]) for part in parts], ignore_order=True
            )
            columns[name] = pd.Series(united)
        else:
            columns[name] = pd.concat([part[name] for part in parts], ignore_index=True)
    return pd.DataFrame(columns)


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


def _write_atomically(
    table: pa.Table,
    folder: Path,
    run_id: str,
    *,
    name: str | None = None,
    row_group_size: int | None = None,
) -> Path:
    """Write ``table`` under a temporary name, fsync it and rename it to its final name.

    The final name is ``name`` when given (replacing a file of that name), else the first free
    one of ``<run_id>.parquet``, ``<run_id>.1.parquet``, ... ``row_group_size`` caps the rows
    of a Parquet row group (None: pyarrow's default of about a million).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if name is not None:
        final = folder / name
    else:
        final = folder / f"{run_id}.parquet"
        sequence = 1
        while final.exists():
            final = folder / f"{run_id}.{sequence}.parquet"
            sequence += 1
    # The process id and a random part keep two writers of the same file (a run and an
    # analyst's rebuild of a missing rollup) off each other's temporary file.
    temporary = folder / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=row_group_size)
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


class CappedHistoryView:
    """A :class:`detectors.base.HistoryView` over a :class:`History` that ends at ``until``.

    The engine appends a run's events to the history before its detectors run, so this view
    caps every read at the start of the run's window. A detector reads only the events before
    it, and takes the earlier events of the window from the window itself. ``earliest``
    optionally bounds reads from below (a detector's look-back).

    Reads are cached by (kind, since, until, columns), so detectors that ask for the same span
    and columns read the files once; :meth:`for_lookback` returns a view that shares the cache.
    Whole rollup hours come from one shared Arrow table of every rollup column
    (:class:`_SharedRollup`), so the rollup files are read once per run however many detectors
    ask for different spans or columns. Each request is then cut and merged from that table.
    The cache keeps the ``cache_size`` most recent results, and drops the oldest while they
    take more than ``cache_bytes`` together. A larger result is not kept. Results are shallow
    copies, which pandas' copy-on-write keeps independent of the cached frame.

    Args:
        history: the store to read.
        until: exclusive upper bound of every read (the start of the window).
        earliest: inclusive lower bound of every read, or None.
        cache_size: how many results the shared cache keeps.
        cache_bytes: how many bytes of results (``DataFrame.memory_usage``) it keeps at most.
    """

    def __init__(
        self,
        history: History,
        until: pd.Timestamp,
        *,
        earliest: pd.Timestamp | None = None,
        cache_size: int = 4,
        cache_bytes: int = _CACHE_BYTES,
        _cache: _ReadCache | None = None,
    ) -> None:
        self.history = history
        self.until = _required_utc(until)
        self.earliest = _utc(earliest)
        self._cache = _ReadCache(cache_size, cache_bytes) if _cache is None else _cache

    @property
    def reads(self) -> int:
        """Number of reads that missed the cache, by this view and the views sharing its cache.

        A rollup read that misses is cut from the shared rollup table, which reads only the
        hours it does not contain yet.
        """
        return self._cache.reads

    def for_lookback(self, lookback: timedelta) -> CappedHistoryView:
        """Return a view sharing this cache whose reads start no earlier than ``until - lookback``."""
        return CappedHistoryView(
            self.history,
            self.until,
            earliest=self.until - pd.Timedelta(lookback),
            _cache=self._cache,
        )

    def events(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return raw events in ``[since, until)`` cut to this view's bounds."""
        return self._read("events", since, until, columns)

    def rollup(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the hourly rollup of the events in ``[since, until)`` cut to this view's bounds."""
        return self._read("rollup", since, until, columns)

    def _read(
        self,
        kind: str,
        since: pd.Timestamp | None,
        until: pd.Timestamp | None,
        columns: Sequence[str] | None,
    ) -> pd.DataFrame:
        start = _utc(since)
        if self.earliest is not None and (start is None or start < self.earliest):
            start = self.earliest
        end = _utc(until)
        if end is None or end > self.until:
            end = self.until
        if start is not None and start > end:
            start = end
        key = (kind, start, end, None if columns is None else tuple(columns))
        cached = self._cache.get(key)
        if cached is None:
            if kind == "events":
                cached = self.history.events(since=start, until=end, columns=columns)
            else:
                shared = self._cache.shared_rollup(self.history, self.until)
                cached = self.history._rollup(start, end, columns, shared.frame)
            self._cache.put(key, cached)
        return cached.copy(deep=False)


class _ReadCache:
    """The most recent results of a run's history reads, least recently used first out."""

    def __init__(self, size: int, max_bytes: int = _CACHE_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.reads = 0
        self._frames: OrderedDict[tuple[Any, ...], pd.DataFrame] = OrderedDict()
        self._sizes: dict[tuple[Any, ...], int] = {}
        self._shared: _SharedRollup | None = None

    def shared_rollup(self, history: History, until: pd.Timestamp) -> _SharedRollup:
        """Return the run's shared rollup table, created empty on first use."""
        if self._shared is None:
            self._shared = _SharedRollup(history, until.floor("h"))
        return self._shared

    def get(self, key: tuple[Any, ...]) -> pd.DataFrame | None:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        return frame

    def put(self, key: tuple[Any, ...], frame: pd.DataFrame) -> None:
        self.reads += 1
        # Arrow-backed columns report their buffer sizes, so deep=True costs no string scan.
        size = int(frame.memory_usage(index=False, deep=True).sum())
        if size > self.max_bytes:
            return
        self._frames[key] = frame
        self._sizes[key] = size
        while len(self._frames) > self.size or sum(self._sizes.values()) > self.max_bytes:
            oldest, _ = self._frames.popitem(last=False)
            del self._sizes[oldest]


class _SharedRollup:
    """Whole hours of the stored rollup, every column, read once and cut for each request.

    The table covers the hours ``start <= hour < end``. It grows toward older hours when a
    request starts before ``start``, so a run reads each rollup hour at most once. Text keys
    stay dictionary-encoded with narrow indices: the 30 days of ``benchmarks/detect.py`` (4.5
    million rollup rows) take 239 MiB. Requests get the same rows, values and dtypes as
    :meth:`History._stored_rollup`.

    NOTE: the table is not counted against the read cache's ``cache_bytes``; it lives as long
    as the views of the run.
    """

    def __init__(self, history: History, end: pd.Timestamp) -> None:
        self.history = history
        self.end = end
        # None covers every stored hour before ``end``.
        self.start: pd.Timestamp | None = end
        self.table: pa.Table | None = None
        self._hours = np.empty(0, dtype=np.int64)

    def frame(
        self, start: pd.Timestamp | None, end: pd.Timestamp | None, selected: list[str]
    ) -> pd.DataFrame:
        """Return the whole hours ``start <= hour < end`` merged over ``selected`` columns."""
        if end is None or end > self.end:
            # The capped views never ask past their ``until``; read the files for anything else.
            return self.history._stored_rollup(start, end, selected)
        self._cover(start)
        if self.table is None:
            return _empty_rollup()[selected]
        mask = self._hours < _micros(end)
        if start is not None:
            mask &= self._hours >= _micros(start)
        table = self.table.select(selected)
        if not mask.all():
            table = table.filter(pa.array(mask))
        return _rollup_frame(table, selected)

    def _cover(self, start: pd.Timestamp | None) -> None:
        """Read the hours from ``start`` up to the table's current start, if any are missing."""
        if self.start is None or (start is not None and start >= self.start):
            return
        older = self.history._stored_table(start, self.start, list(ROLLUP_COLUMNS))
        self.start = start
        if older is None:
            return
        if self.table is not None:
            newer = self.table.cast(older.schema)
            older = pa.concat_tables([older, newer]).unify_dictionaries().combine_chunks()
        self.table = _narrow_indices(older)
        self._hours = self.table.column("hour").cast(pa.int64()).to_numpy()


def _narrow_indices(table: pa.Table) -> pa.Table:
    """Store each dictionary column's indices in the smallest integer type that fits them.

    Parquet reads give int32 indices. Most rollup keys have a few thousand values or fewer, so
    int8 or int16 indices save 2 to 3 bytes per row and column. One index value is left free,
    because :func:`_key_codes` gives nulls the code ``len(dictionary)``.
    """
    columns = []
    for column in table.columns:
        if pa.types.is_dictionary(column.type):
            size = len(column.chunk(0).dictionary) if column.num_chunks else 0
            for index_type in (pa.int8(), pa.int16()):
                if size < np.iinfo(index_type.to_pandas_dtype()).max:
                    column = column.cast(pa.dictionary(index_type, column.type.value_type))
                    break
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def _micros(moment: pd.Timestamp) -> int:
    """Return ``moment`` as microseconds since the epoch, the unit of the rollup's times."""
    # ``Timestamp.value`` is nanoseconds whatever the unit.
    return int(moment.value) // 1_000


def _required_utc(moment: pd.Timestamp | datetime) -> pd.Timestamp:
    timestamp = _utc(moment)
    assert timestamp is not None
    return timestamp
