"""The analyst's library: events, history, findings and explanations as pandas frames.

Every function here is re-exported from :mod:`pipeline`::

    import pipeline

    config = pipeline.load_config()                 # the shipped defaults, or a config.yaml
    events = pipeline.read_logs("sample_logs")      # files or folders -> events frame
    past = pipeline.history(config)                 # the Parquet history of keytrail runs
    reads = past.events(since="2026-10-01", where="action = 'read'")
    top = past.sql("SELECT principal, count(*) AS n FROM events GROUP BY ALL ORDER BY n DESC")
    found = pipeline.findings(config)               # what the runs found
    pipeline.explain(found.iloc[0], config)         # the events and baseline behind a finding
    pipeline.export(found, "findings.xlsx")         # CSV, Excel or Parquet, formula-safe

Times are UTC everywhere: frames hold ``datetime64[us, UTC]`` and DuckDB returns TIMESTAMPTZ
in a session whose time zone is UTC. Naive times passed in are taken as UTC.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, overload

import duckdb
import pandas as pd
import pyarrow as pa

from detectors.base import (
    FINDING_COLUMNS,
    ROLLUP_KEYS,
    FrameHistory,
    HistoryView,
    get_detector,
    project_rollup,
)
from pipeline.alerting.output import FINDINGS_FILE
from pipeline.config import Settings, embedded_defaults
from pipeline.config import load_config as _load_config_file
from pipeline.enrich import GeoIPSettings, enrich_events
from pipeline.errors import InputError
from pipeline.evaluate import load_findings
from pipeline.formats.reader import iter_files, read_paths
from pipeline.schema import ARROW_SCHEMA, COLUMNS, empty_events
from pipeline.sources import FilesSourceSettings, SourceSettings, build_source
from pipeline.store.state import State

__all__ = [
    "BASELINE_DAYS",
    "Explanation",
    "HistoryQuery",
    "explain",
    "findings",
    "history",
    "load_config",
    "read_logs",
]

logger = logging.getLogger(__name__)

BASELINE_DAYS: Final = 30
"""Days of a principal's earlier events that :func:`explain` shows when the finding's detector
declares no look-back of its own."""

QUARANTINE_COLUMNS: Final = ("origin", "reason", "detail", "raw")

# Event columns that an Explanation's text and HTML forms show.
_SHOWN_COLUMNS: Final = (
    "time",
    "operation",
    "resource",
    "outcome",
    "source_ip",
    "geo_country",
    "geo_city",
    "asn",
    "as_org",
)
# Statement types that HistoryQuery.sql runs. Every other type (COPY, CREATE, SET, ATTACH,
# INSTALL, ...) could write files or change the session, so it is rejected.
_READ_STATEMENTS: Final = frozenset({"SELECT", "EXPLAIN"})
_PANDAS_DTYPES: Final = empty_events().dtypes.to_dict()
_ARROW_STRING_TYPES: Final = (pa.string(), pa.large_string(), pa.string_view())

ConfigLike = Settings | str | os.PathLike[str] | None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> Settings:
    """Load a config file, or the shipped defaults when ``path`` is None.

    Args:
        path: a config.yaml; its relative paths resolve against its folder.
        base_dir: the folder the defaults' relative paths (``sample_logs/...``, ``.keytrail``)
            resolve against when ``path`` is None; default: the current folder.
        state_dir: use this state folder instead of the configured one (a notebook's own
            temporary state, for example).
        output_dir: use this output folder instead of the configured one.

    Raises:
        ConfigError: the file is missing or invalid; the error lists every problem.
    """
    if path is None:
        settings = embedded_defaults(None if base_dir is None else Path(base_dir))
    else:
        settings = _load_config_file(Path(path))
    update: dict[str, Path] = {}
    if state_dir is not None:
        update["state_dir"] = Path(state_dir).expanduser().resolve()
    if output_dir is not None:
        update["output_dir"] = Path(output_dir).expanduser().resolve()
    return settings.model_copy(update=update) if update else settings


# read_logs


@overload
def read_logs(
    paths_or_source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | SourceSettings,
    *,
    config: ConfigLike = None,
    geoip: bool | GeoIPSettings = True,
    progress: bool | None = None,
    since: pd.Timestamp | datetime | str | None = None,
    until: pd.Timestamp | datetime | str | None = None,
    return_quarantine: Literal[False] = False,
) -> pd.DataFrame: ...


@overload
def read_logs(
    paths_or_source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | SourceSettings,
    *,
    config: ConfigLike = None,
    geoip: bool | GeoIPSettings = True,
    progress: bool | None = None,
    since: pd.Timestamp | datetime | str | None = None,
    until: pd.Timestamp | datetime | str | None = None,
    return_quarantine: Literal[True],
) -> tuple[pd.DataFrame, pd.DataFrame]: ...


def read_logs(
    paths_or_source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | SourceSettings,
    *,
    config: ConfigLike = None,
    geoip: bool | GeoIPSettings = True,
    progress: bool | None = None,
    since: pd.Timestamp | datetime | str | None = None,
    until: pd.Timestamp | datetime | str | None = None,
    return_quarantine: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Read audit logs into an events frame sorted by time, enriched with GeoIP.

    Nothing is stored: no state, no checkpoints, no history. Events that appear in two files
    are kept once.

    Args:
        paths_or_source: files or folders, read recursively (gzip or plain, any mix of
            clouds). It may also be the name of a source in ``config``, or a source's settings
            (for example :class:`pipeline.sources.s3.S3CloudTrailSettings`), read without
            checkpoints.
            A string that names a source of ``config`` is read from that source, so pass a
            ``Path`` to read a folder of the same name.
        config: settings, a config file, or None. It supplies the named sources and the GeoIP
            settings.
        geoip: False to skip enrichment, or the GeoIP settings to use (default: the config's,
            else the embedded database).
        progress: show a progress bar over the files. None shows one in a terminal, or in a
            notebook when ipywidgets is installed, once a read takes more than a second. True
            always shows one, False never. Sources other than local files show none.
        since: keep only events at or after this time; a remote source also reads from here.
        until: keep only events before this time.
        return_quarantine: also return the records that could not be read, as a frame with
            ``origin``, ``reason``, ``detail`` and ``raw`` (the record's text).

    Returns:
        The events frame, or ``(events, quarantined)`` when ``return_quarantine`` is true.

    Raises:
        InputError: a path does not exist and is not a source name.
        SourceError: a remote source could not be read.
        ConfigError: a GeoIP database file is missing or invalid.
    """
    settings = _settings_or_none(config)
    start, end = _utc_or_none(since), _utc_or_none(until)
    target = _read_target(paths_or_source, settings)
    if isinstance(target, SourceSettings):
        source = build_source(target)
        batch = source.read(
            {},
            since=start.to_pydatetime() if start is not None else None,
            until=end.to_pydatetime() if end is not None else None,
        )
        result = batch.result
        for problem in batch.problems:
            logger.warning("source %s: %s", target.name, problem)
    else:
        result = read_paths(_with_progress(list(iter_files(target)), progress))

    counts = result.summary()
    logger.info(
        "read %s files: %s records, %s events, %s quarantined %s, skipped %s",
        counts["files"],
        counts["records"],
        counts["events"],
        counts["quarantined"],
        counts["quarantined_by_reason"],
        counts["skipped_by_kind"],
    )
    events = result.events
    if start is not None or end is not None:
        events = events[_time_mask(events["time"], start, end)]
    events = events.sort_values("time", kind="stable").reset_index(drop=True)
    geoip_settings = _geoip_settings(geoip, settings)
    if geoip_settings is not None and len(events):
        events, _ = enrich_events(events, geoip_settings)

    if not return_quarantine:
        return events
    quarantined = pd.DataFrame(
        [dataclasses.astuple(item) for item in result.quarantined],
        columns=list(QUARANTINE_COLUMNS),
        dtype=object,
    )
    return events, quarantined


def _read_target(
    value: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | SourceSettings,
    settings: Settings | None,
) -> SourceSettings | list[Path]:
    """Return the source settings or the local paths that ``value`` names."""
    if isinstance(value, SourceSettings):
        return _files_or_source(value)
    if isinstance(value, str) and settings is not None:
        named = {source.name: source for source in settings.sources}
        if value in named:
            return _files_or_source(named[value])
        if not Path(value).exists():
            listed = ", ".join(sorted(named)) or "none"
            raise InputError(
                f"{value!r} is neither an existing path nor a source of the config "
                f"(sources: {listed})"
            )
    if isinstance(value, str | os.PathLike):
        return [Path(value)]
    return [Path(item) for item in value]


def _files_or_source(settings: SourceSettings) -> SourceSettings | list[Path]:
    """Read a files source as its paths, so that the progress bar can count its files."""
    if isinstance(settings, FilesSourceSettings):
        return list(settings.paths)
    return settings


def _with_progress(files: list[Path], progress: bool | None) -> Iterable[Path]:
    if progress is False:
        return files
    # Imported here, because tqdm.auto looks for a notebook kernel when it is imported. Its
    # notebook bar needs ipywidgets, and without it tqdm.auto warns, so the text bar is used.
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    # disable=None lets tqdm turn itself off when its output is not a terminal or a notebook.
    disable = None if progress is None else False
    return tqdm(files, desc="reading logs", unit="file", disable=disable, delay=1.0)


def _geoip_settings(geoip: bool | GeoIPSettings, settings: Settings | None) -> GeoIPSettings | None:
    if isinstance(geoip, GeoIPSettings):
        return geoip if geoip.enabled else None
    if not geoip:
        return None
    chosen = settings.enrich.geoip if settings is not None else GeoIPSettings()
    return chosen if chosen.enabled else None


# history


def history(config: ConfigLike = None) -> HistoryQuery:
    """Open the Parquet history of ``config``'s state folder for reading.

    Args:
        config: settings, a config file, or None for the shipped defaults (state in
            ``.keytrail`` under the current folder).
    """
    settings = _settings(config)
    return HistoryQuery(settings.state_dir / "history")


class HistoryQuery:
    """Read-only queries over the history, through DuckDB.

    The history is the Parquet dataset that runs append to (``date=YYYY-MM-DD/cloud=<cloud>/``
    partitions). :meth:`sql` queries it as the view ``events``: every schema column, plus ``date``
    from the partition folder, which makes DuckDB skip the folders of other days. The view
    ``rollup`` counts events per hour and the keys of :data:`detectors.base.ROLLUP_KEYS`, with
    ``count``, ``first_time`` and ``last_time``. Times are TIMESTAMPTZ in a session whose time
    zone is UTC. Files that runs add later are seen by the next query.

    Only SELECT (including WITH, DESCRIBE, SUMMARIZE) and EXPLAIN statements run, so a query
    cannot write files or change the session. The object also implements
    :class:`detectors.base.HistoryView`, so it can be handed to :func:`detectors.run`.

    Args:
        root: the history folder, normally ``<state_dir>/history``. It need not exist yet.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._connection: duckdb.DuckDBPyConnection | None = None
        self._has_files: bool | None = None

    def __repr__(self) -> str:
        return f"HistoryQuery({str(self.root)!r})"

    def close(self) -> None:
        """Close the DuckDB connection; a later query opens a new one."""
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._has_files = None

    def __enter__(self) -> HistoryQuery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sql(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> pd.DataFrame:
        """Run one read-only DuckDB query over the views ``events`` and ``rollup``.

        Args:
            query: one SELECT or EXPLAIN statement.
            params: values for ``?``/``$1`` placeholders (a sequence) or ``$name`` ones (a
                mapping). Pass values this way rather than formatting them into the text.

        Returns:
            The result; text columns are Arrow-backed strings and times are UTC.

        Raises:
            ValueError: the text is not exactly one SELECT or EXPLAIN statement.
            duckdb.Error: DuckDB could not run the query (for example, an unknown column).
        """
        _check_read_only(query)
        table = self._connect().sql(query, params=params).to_arrow_table()
        return table.to_pandas(types_mapper=_arrow_strings)

    def events(
        self,
        *,
        since: pd.Timestamp | datetime | str | None = None,
        until: pd.Timestamp | datetime | str | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Return the events with ``since <= time < until`` sorted by time, in schema dtypes.

        Args:
            since: inclusive lower bound, or None.
            until: exclusive upper bound, or None.
            columns: schema columns to return, in that order (default: all).
            where: a DuckDB condition over the schema columns, such as
                ``"action = 'read' AND principal = $who"``.
            params: values of the ``$name`` placeholders in ``where``. Pass values from logs
                this way rather than formatting them into ``where``.

        Raises:
            ValueError: ``columns`` names a column outside the schema, or ``where`` is not a
                condition.
        """
        selected = list(COLUMNS) if columns is None else list(columns)
        unknown = [name for name in selected if name not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown history columns {unknown}; known: {', '.join(COLUMNS)}")
        start, end = _utc_or_none(since), _utc_or_none(until)
        conditions, bounds = _time_conditions(start, end, "time", with_date=True)
        if where is not None:
            conditions.append(f"({where})")
        query = (
            f"SELECT {', '.join(_quoted(name) for name in selected)} FROM events"
            f" WHERE {' AND '.join(conditions) or 'true'}"
            " ORDER BY time, event_uid, resource"
        )
        try:
            _check_read_only(query)
        except ValueError:
            raise ValueError(f"where must be one condition, found {where!r}") from None
        clashes = sorted(set(params or {}) & set(bounds))
        if clashes:
            raise ValueError(f"params names reserved for the time bounds: {', '.join(clashes)}")
        values = {**bounds, **dict(params or {})}
        table = self._connect().sql(query, params=values).to_arrow_table()
        frame = table.to_pandas(types_mapper=_schema_types)
        return frame.astype({name: _PANDAS_DTYPES[name] for name in selected})

    def rollup(
        self,
        *,
        since: pd.Timestamp | datetime | str | None = None,
        until: pd.Timestamp | datetime | str | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the hourly rollup of the events with ``since <= time < until``.

        One row per hour and key of :data:`detectors.base.ROLLUP_KEYS`, sorted by them. With
        ``columns``, rows that share the requested keys are merged as
        :func:`detectors.base.project_rollup` does.

        Raises:
            ValueError: ``columns`` names a column outside the rollup.
        """
        start, end = _utc_or_none(since), _utc_or_none(until)
        conditions, bounds = _time_conditions(start, end, "time", with_date=True)
        query = (
            f"SELECT {_ROLLUP_SELECT} FROM events WHERE {' AND '.join(conditions) or 'true'}"
            f" GROUP BY ALL ORDER BY {', '.join(_quoted(name) for name in ROLLUP_KEYS)}"
        )
        table = self._connect().sql(query, params=bounds).to_arrow_table()
        frame = table.to_pandas(types_mapper=_schema_types).astype(_ROLLUP_DTYPES)
        return project_rollup(frame, columns)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Return the connection, with views that match the files now on disk."""
        if self._connection is None:
            self._connection = duckdb.connect(":memory:")
            self._connection.execute("SET TimeZone = 'UTC'")
        has_files = next(iter(self._files_glob()), None) is not None
        if has_files != self._has_files:
            self._create_views(self._connection, has_files)
            self._has_files = has_files
        return self._connection

    def _files_glob(self) -> Iterable[Path]:
        return self.root.glob("date=*/cloud=*/*.parquet")

    def _create_views(self, connection: duckdb.DuckDBPyConnection, has_files: bool) -> None:
        if has_files:
            # NOTE: a history folder whose path contains a glob character ([, *, ?) is not
            # supported, because DuckDB expands the pattern.
            pattern = (self.root / "date=*" / "cloud=*" / "*.parquet").as_posix().replace("'", "''")
            source = (
                f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, "
                "hive_types = {'date': DATE, 'cloud': VARCHAR})"
            )
        else:
            empty = ARROW_SCHEMA.empty_table()
            connection.register("keytrail_empty_events", empty)
            source = "SELECT *, CAST(NULL AS DATE) AS date FROM keytrail_empty_events"
        connection.execute(f"CREATE OR REPLACE VIEW events AS {source}")
        connection.execute(
            f"CREATE OR REPLACE VIEW rollup AS SELECT {_ROLLUP_SELECT} FROM events GROUP BY ALL"
        )


# The rollup's columns as a SELECT list over the events view: the UTC hour, the keys, and the
# count and first and last time of each group.
_ROLLUP_SELECT: Final = ", ".join(
    [
        "date_trunc('hour', time) AS hour",
        *('"' + name + '"' for name in ROLLUP_KEYS if name != "hour"),
        "count(*) AS count",
        "min(time) AS first_time",
        "max(time) AS last_time",
    ]
)
_ROLLUP_DTYPES: Final = {
    "hour": "datetime64[us, UTC]",
    **{name: _PANDAS_DTYPES[name] for name in ROLLUP_KEYS if name != "hour"},
    "count": "int64",
    "first_time": "datetime64[us, UTC]",
    "last_time": "datetime64[us, UTC]",
}


def _check_read_only(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"invalid SQL: {exc}") from None
    if len(statements) != 1:
        raise ValueError(f"expected one SQL statement, found {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_STATEMENTS:
        raise ValueError(
            f"the history is read-only: expected a SELECT or EXPLAIN statement, found {kind}"
        )


def _time_conditions(
    start: pd.Timestamp | None, end: pd.Timestamp | None, column: str, *, with_date: bool
) -> tuple[list[str], dict[str, Any]]:
    """Return SQL conditions and their named parameters for ``start <= column < end``.

    The ``date`` conditions repeat the bounds on the partition key, so DuckDB opens only the
    folders of the days in the range.
    """
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if start is not None:
        conditions.append(f"{column} >= $keytrail_since")
        params["keytrail_since"] = start.to_pydatetime()
        if with_date:
            conditions.append("date >= $keytrail_since_date")
            params["keytrail_since_date"] = start.date()
    if end is not None:
        conditions.append(f"{column} < $keytrail_until")
        params["keytrail_until"] = end.to_pydatetime()
        if with_date:
            conditions.append("date <= $keytrail_until_date")
            params["keytrail_until_date"] = end.date()
    return conditions, params


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _arrow_strings(data_type: pa.DataType) -> Any:
    return pd.StringDtype("pyarrow") if data_type in _ARROW_STRING_TYPES else None


def _schema_types(data_type: pa.DataType) -> Any:
    if data_type in _ARROW_STRING_TYPES:
        return pd.StringDtype("pyarrow")
    if data_type == pa.int64():
        return pd.Int64Dtype()
    return None


# findings


def findings(
    config: ConfigLike = None,
    *,
    since: pd.Timestamp | datetime | str | None = None,
    until: pd.Timestamp | datetime | str | None = None,
) -> pd.DataFrame:
    """Return the findings that runs committed, sorted by ``first_seen``.

    That is every finding in ``<output_dir>/findings.jsonl`` plus those committed to the state
    database but not written out yet (a run that failed after its commit). Each finding appears
    once, even when a crash made findings.jsonl contain it twice.

    Args:
        config: settings, a config file, or None for the shipped defaults.
        since: keep findings whose ``last_seen`` is at or after this time.
        until: keep findings whose ``first_seen`` is before this time.

    Returns:
        A frame with :data:`detectors.base.FINDING_COLUMNS` (and any extra keys the file
        holds); ``first_seen`` and ``last_seen`` are UTC times.
    """
    settings = _settings(config)
    records: list[dict[str, Any]] = []
    path = settings.output_dir / FINDINGS_FILE
    if path.exists():
        records.extend(load_findings(path))
    state_file = settings.state_dir / "state.db"
    if state_file.exists():
        with State(state_file, read_only=True) as state:
            records.extend(json.loads(text) for _, text in state.pending_outputs())

    extra = sorted({key for record in records for key in record} - set(FINDING_COLUMNS))
    frame = pd.DataFrame(records, columns=[*FINDING_COLUMNS, *extra])
    frame = frame.drop_duplicates(subset="finding_id", keep="first")
    for name in ("first_seen", "last_seen"):
        frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601").astype(
            "datetime64[us, UTC]"
        )
    frame["event_count"] = frame["event_count"].astype("int64")
    start, end = _utc_or_none(since), _utc_or_none(until)
    if start is not None:
        frame = frame[(frame["last_seen"] >= start).to_numpy(dtype=bool)]
    if end is not None:
        frame = frame[(frame["first_seen"] < end).to_numpy(dtype=bool)]
    return frame.sort_values(["first_seen", "finding_id"], kind="stable").reset_index(drop=True)


# explain


@dataclasses.dataclass
class Explanation:
    """The events behind a finding and the baseline it was compared with.

    Attributes:
        finding: the finding's fields.
        events: the events the finding names (``event_uids``), sorted by time. Empty when the
            history no longer has them (retention) or never had them (a dry run).
        evidence: what the detector measured.
        baseline: what the detector compared the evidence with, as it reported it.
        baseline_events: the principal's events in the detector's look-back before
            ``first_seen`` (:data:`BASELINE_DAYS` for detectors without one): the raw
            material for hour-of-week or location plots. The detector itself may have seen
            more, because a run's window is part of its baseline.
        lookback: the period ``baseline_events`` covers.
    """

    finding: dict[str, Any]
    events: pd.DataFrame
    evidence: dict[str, Any]
    baseline: dict[str, Any]
    baseline_events: pd.DataFrame
    lookback: timedelta

    def summary_lines(self) -> list[str]:
        """Return the finding as plain-text lines: title, who, when, evidence and baseline."""
        finding = self.finding
        lines = [
            f"{finding.get('severity', '?')} {finding.get('detector', '?')}: "
            f"{finding.get('title', '')}",
            f"principal: {finding.get('principal')} ({finding.get('principal_type')}), "
            f"{finding.get('cloud')} account {finding.get('account')}",
            f"when: {finding.get('first_seen')} to {finding.get('last_seen')}, "
            f"{finding.get('event_count')} events",
            "evidence:",
            *(f"  {key}: {_text(value)}" for key, value in self.evidence.items()),
            "baseline:",
            *(f"  {key}: {_text(value)}" for key, value in self.baseline.items()),
            f"events found in history: {len(self.events)}; principal's events in the "
            f"{_days(self.lookback)} before: {len(self.baseline_events)}",
        ]
        return lines

    def __repr__(self) -> str:
        shown = [name for name in _SHOWN_COLUMNS if name in self.events.columns]
        table = self.events[shown].head(20).to_string(index=False) if len(self.events) else ""
        return "\n".join([*self.summary_lines(), table]).rstrip()

    def _repr_html_(self) -> str:
        finding = self.finding
        title = html.escape(str(finding.get("title", "")))
        rows = [
            ("severity", finding.get("severity")),
            ("detector", finding.get("detector")),
            ("principal", f"{finding.get('principal')} ({finding.get('principal_type')})"),
            ("account", f"{finding.get('cloud')} {finding.get('account')}"),
            ("when", f"{finding.get('first_seen')} to {finding.get('last_seen')}"),
            *((f"evidence: {key}", _text(value)) for key, value in self.evidence.items()),
            *((f"baseline: {key}", _text(value)) for key, value in self.baseline.items()),
        ]
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(key))}</th>"
            f"<td style='text-align:left'>{html.escape(str(value))}</td></tr>"
            for key, value in rows
        )
        shown = [name for name in _SHOWN_COLUMNS if name in self.events.columns]
        events = (
            self.events[shown].head(50).to_html(index=False, escape=True)
            if len(self.events)
            else "<p>The history has none of the finding's events.</p>"
        )
        return (
            f"<div><h4>{title}</h4><table>{cells}</table>"
            f"<p>{len(self.events)} events; {len(self.baseline_events)} events of the principal "
            f"in the {html.escape(_days(self.lookback))} before</p>{events}</div>"
        )


def explain(
    finding: pd.Series | Mapping[str, Any] | str,
    config: ConfigLike = None,
    *,
    history: HistoryView | pd.DataFrame | None = None,
) -> Explanation:
    """Return the events behind ``finding`` and the baseline it was compared with.

    Args:
        finding: a row of :func:`findings` or :func:`detectors.run`, a finding as a dict, or a
            ``finding_id`` (looked up with :func:`findings` in ``config``).
        config: settings, a config file, or None for the shipped defaults. It supplies the
            history (unless ``history`` is given) and the detector's parameters.
        history: where to look the events up: a :class:`HistoryQuery`, another history view,
            or an events frame (for findings of :func:`detectors.run` on a frame).

    Raises:
        KeyError: ``finding`` is an id that no committed finding has.
    """
    settings = _settings(config) if config is not None or history is None else None
    record = _finding_record(finding, settings)
    view: HistoryView
    if isinstance(history, pd.DataFrame):
        view = FrameHistory(history)
    elif history is not None:
        view = history
    else:
        assert settings is not None
        view = HistoryQuery(settings.state_dir / "history")

    first = pd.Timestamp(record["first_seen"])
    last = pd.Timestamp(record["last_seen"])
    uids = {str(uid) for uid in record.get("event_uids") or []}
    window = view.events(since=first, until=last + pd.Timedelta(microseconds=1))
    events = window[window["event_uid"].isin(uids).to_numpy(dtype=bool)].reset_index(drop=True)

    lookback = _lookback(str(record.get("detector", "")), settings)
    principal = str(record.get("principal") or "")
    if isinstance(view, HistoryQuery):
        earlier = view.events(
            since=first - lookback,
            until=first,
            where="principal = $principal",
            params={"principal": principal},
        )
    else:
        earlier = view.events(since=first - lookback, until=first)
        earlier = earlier[(earlier["principal"] == principal).fillna(False).to_numpy(dtype=bool)]
    return Explanation(
        finding=record,
        events=events,
        evidence=dict(record.get("evidence") or {}),
        baseline=dict(record.get("baseline") or {}),
        baseline_events=earlier.reset_index(drop=True),
        lookback=lookback,
    )


def _finding_record(
    finding: pd.Series | Mapping[str, Any] | str, settings: Settings | None
) -> dict[str, Any]:
    if isinstance(finding, str):
        frame = findings(settings)
        match = frame[frame["finding_id"] == finding]
        if match.empty:
            raise KeyError(f"finding {finding!r} not found in the committed findings")
        return {str(key): value for key, value in match.iloc[0].items()}
    if isinstance(finding, pd.Series):
        return {str(key): value for key, value in finding.items()}
    return dict(finding)


def _lookback(detector_id: str, settings: Settings | None) -> timedelta:
    """Return the detector's configured look-back, or :data:`BASELINE_DAYS` without one."""
    try:
        cls = get_detector(detector_id)
    except KeyError:
        return timedelta(days=BASELINE_DAYS)
    entry = settings.detectors.get(detector_id) if settings is not None else None
    try:
        lookback = cls(**(entry.params if entry is not None else {})).lookback
    except (TypeError, ValueError):
        # Parameters without defaults, or config written for another version of the detector.
        return timedelta(days=BASELINE_DAYS)
    return lookback if lookback > timedelta(0) else timedelta(days=BASELINE_DAYS)


# shared helpers


def _settings(config: ConfigLike) -> Settings:
    if isinstance(config, Settings):
        return config
    return load_config(config)


def _settings_or_none(config: ConfigLike) -> Settings | None:
    return None if config is None else _settings(config)


def _utc_or_none(moment: pd.Timestamp | datetime | str | None) -> pd.Timestamp | None:
    if moment is None:
        return None
    timestamp = pd.Timestamp(moment)
    if timestamp.tzinfo is None:
        return timestamp.tz_localize("UTC")
    return timestamp.tz_convert("UTC")


def _time_mask(times: pd.Series, start: pd.Timestamp | None, end: pd.Timestamp | None) -> Any:
    mask = pd.Series(True, index=times.index)
    if start is not None:
        mask &= times >= start
    if end is not None:
        mask &= times < end
    return mask.to_numpy(dtype=bool)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _days(period: timedelta) -> str:
    days = period / timedelta(days=1)
    return f"{days:g} days" if days != 1 else "1 day"
