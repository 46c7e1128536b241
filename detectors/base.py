"""The detector contract, the findings frame and the detector registry.

A detector is registered under a stable dotted id (``keytrail.off_hours``). It validates its
parameters in the constructor through a pydantic model, so bad config fails at load time with
the key path, and implements one method::

    detect(window, history, now) -> findings frame

``window`` is the events frame of the current run (enriched), ``history`` gives earlier events
for baselines, ``now`` is the run time. Detectors are vectorized pandas: no Python loop per
event. Every finding explains itself with ``evidence`` and the ``baseline`` it was compared to.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Final, Protocol, Self

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipeline.schema import empty_events

__all__ = [
    "FINDING_COLUMNS",
    "ROLLUP_COLUMNS",
    "ROLLUP_KEYS",
    "ROLLUP_VALUES",
    "SEVERITIES",
    "Detector",
    "DetectorParams",
    "FrameHistory",
    "HistoryView",
    "StatisticalDetector",
    "StatisticalParams",
    "build_findings",
    "empty_findings",
    "get_detector",
    "project_rollup",
    "register",
    "registered_detectors",
    "rollup_events",
    "severity_rank",
]

SEVERITIES: Final = ("info", "low", "medium", "high", "critical")

FINDING_COLUMNS: Final = (
    "finding_id",
    "detector",
    "severity",
    "title",
    "principal",
    "principal_type",
    "cloud",
    "account",
    "resources",
    "source_ips",
    "countries",
    "first_seen",
    "last_seen",
    "event_count",
    "event_uids",
    "evidence",
    "baseline",
    "mitre",
    "dedup_key",
    "geoip_build_date",
)
"""Columns of a findings frame. ``resources``, ``source_ips``, ``countries``, ``event_uids`` and
``mitre`` hold lists of strings; ``evidence`` and ``baseline`` hold JSON-ready dicts;
``first_seen`` and ``last_seen`` are UTC times. ``geoip_build_date`` is filled by the engine."""

_LIST_COLUMNS: Final = ("resources", "source_ips", "countries", "event_uids", "mitre")
_DICT_COLUMNS: Final = ("evidence", "baseline")


def severity_rank(severity: str) -> int:
    """Return the position of ``severity`` in :data:`SEVERITIES` (info is 0)."""
    return SEVERITIES.index(severity)


ROLLUP_KEYS: Final = (
    "hour",
    "cloud",
    "account",
    "principal",
    "principal_type",
    "resource",
    "service",
    "operation",
    "action",
    "outcome",
    "invoked_by",
    "source_ip",
    "geo_country",
    "asn",
    "user_agent",
)
"""Key columns of the hourly rollup; ``hour`` is the event time floored to the hour (UTC).
``invoked_by`` is a key so that :func:`detectors._common.read_mask` works on rollup rows, and
``user_agent`` so that a baseline of the agents a principal uses needs no raw events. A
principal rarely changes agents within an hour, so the key adds few rows."""

ROLLUP_VALUES: Final = ("count", "first_time", "last_time")
"""Value columns of the hourly rollup: rows, and the earliest and latest event time."""

ROLLUP_COLUMNS: Final = (*ROLLUP_KEYS, *ROLLUP_VALUES)
"""Every column of the hourly rollup, keys first."""


def rollup_events(events: pd.DataFrame) -> pd.DataFrame:
    """Count events per hour and :data:`ROLLUP_KEYS`.

    Returns one row per distinct key with ``count`` (rows, so a batch read of N secrets counts
    N), ``first_time`` and ``last_time``. Null keys form their own groups. Baselines over weeks
    of history read this instead of the raw events: a workload that reads one secret every
    minute becomes one row per hour.
    """
    keys = list(ROLLUP_KEYS)
    columns = [name for name in keys if name != "hour"]
    if events.empty:
        frame = events[columns].copy()
        frame.insert(0, "hour", pd.Series([], dtype="datetime64[us, UTC]"))
        frame["count"] = pd.Series([], dtype="int64")
        frame["first_time"] = pd.Series([], dtype="datetime64[us, UTC]")
        frame["last_time"] = pd.Series([], dtype="datetime64[us, UTC]")
        return frame.reset_index(drop=True)
    frame = events[[*columns, "time"]].assign(hour=events["time"].dt.floor("h"))
    grouped = frame.groupby(keys, dropna=False, observed=True, sort=False)["time"]
    result = grouped.agg(count="size", first_time="min", last_time="max").reset_index()
    result["count"] = result["count"].astype("int64")
    return result


def project_rollup(rollup: pd.DataFrame, columns: Sequence[str] | None) -> pd.DataFrame:
    """Keep only ``columns`` of rollup rows, merging the rows that then share their keys.

    The key columns among ``columns`` become the group; ``count`` is summed, ``first_time``
    takes the minimum and ``last_time`` the maximum. None keeps every column as it is.

    Raises:
        ValueError: ``columns`` names a column outside :data:`ROLLUP_COLUMNS`.
    """
    if columns is None:
        return rollup
    selected = list(columns)
    unknown = [name for name in selected if name not in ROLLUP_COLUMNS]
    if unknown:
        raise ValueError(f"unknown rollup columns {unknown}; known: {', '.join(ROLLUP_COLUMNS)}")
    keys = [name for name in selected if name in ROLLUP_KEYS]
    values = {"count": "sum", "first_time": "min", "last_time": "max"}
    aggregations = {name: how for name, how in values.items() if name in selected}
    if rollup.empty:
        return rollup[selected].reset_index(drop=True)
    if not keys:
        # No key asked for: one row of totals.
        totals = {name: [getattr(rollup[name], how)()] for name, how in aggregations.items()}
        return pd.DataFrame(totals)[selected]
    grouped = rollup.groupby(keys, dropna=False, observed=True, sort=False)
    if aggregations:
        merged = grouped.agg(aggregations).reset_index()
    else:
        merged = rollup[keys].drop_duplicates().reset_index(drop=True)
    return merged[selected]


class HistoryView(Protocol):
    """Read access to earlier events, for baselines.

    ``events`` returns raw events; ``rollup`` returns hourly counts (see :func:`rollup_events`),
    which is what a baseline over weeks should read. Both bounds compare with event times, so
    an hour cut by ``since`` or ``until`` counts only its events inside the range.
    """

    def rollup(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the hourly rollup of the events with ``since <= time < until``.

        With ``columns``, only those columns are returned and rows that share the requested
        key columns are merged as :func:`project_rollup` does. Without it, rows of one key may
        repeat (one per run that stored events of that hour): group and sum ``count`` (and
        take the min/max of ``first_time``/``last_time``) before use. Text keys are Arrow-backed
        strings or pandas Categorical (the engine's Parquet history gives Categorical, whose
        codes make grouping and factorizing cheap); detectors must accept both.
        """
        ...

    def events(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return events with ``since <= time < until``, only ``columns`` if given."""
        ...


class FrameHistory:
    """A :class:`HistoryView` over an in-memory events frame (tests, notebooks, backtests)."""

    def __init__(self, frame: pd.DataFrame | None = None) -> None:
        self.frame = empty_events() if frame is None else frame

    def events(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the rows in ``[since, until)``, only ``columns`` if given."""
        frame = self.frame
        mask = pd.Series(True, index=frame.index)
        if since is not None:
            mask &= frame["time"] >= since
        if until is not None:
            mask &= frame["time"] < until
        selected = frame[mask]
        if columns is not None:
            selected = selected[list(columns)]
        return selected.reset_index(drop=True)

    def rollup(
        self,
        *,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Return the hourly rollup of the rows in ``[since, until)``, only ``columns`` if given."""
        return project_rollup(rollup_events(self.events(since=since, until=until)), columns)


class DetectorParams(BaseModel):
    """Base of every detector's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Detector(ABC):
    """Base class of every detector.

    Subclasses set :attr:`id`, :attr:`mitre`, :attr:`Params` (a :class:`DetectorParams`
    subclass) and implement :meth:`detect`. The constructor validates the parameters and
    raises ``pydantic.ValidationError`` naming each invalid one.
    """

    id: ClassVar[str]
    mitre: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[DetectorParams]] = DetectorParams

    def __init__(self, **params: Any) -> None:
        self.params = self.Params(**params)

    @property
    def lookback(self) -> timedelta:
        """How much history before the window this detector reads for its baseline."""
        return timedelta(0)

    @abstractmethod
    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return the findings for ``window`` as a frame with :data:`FINDING_COLUMNS`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class StatisticalParams(DetectorParams):
    """Base of the parameter models of statistical detectors."""

    refit_hours: float = Field(default=24.0, gt=0)
    """Fitted state older than this (counted in event time) is fitted again."""


class StatisticalDetector(Detector):
    """A detector that learns from history before it scores, in the scikit-learn shape.

    :meth:`fit` learns from the history before a time and stores what it learned in attributes
    whose names end in ``_``. :meth:`score` returns one number per window row, and a higher
    number is more anomalous. :meth:`get_state` and :meth:`set_state` move the learned
    attributes to and from a JSON-ready dict, so the engine can keep them in the state database
    and skip the fit in the next run. A subclass's :meth:`detect` calls :meth:`ensure_fitted`
    first, so it also works on a detector nothing was fitted on (notebooks, tests).

    The engine refits when the parameters changed (:meth:`params_hash`) or
    :meth:`needs_refit` says the state is too old for the window. The engine's history view
    reads no further back than :attr:`lookback`, so it must cover the span :meth:`fit` reads.
    """

    Params: ClassVar[type[DetectorParams]] = StatisticalParams
    params: StatisticalParams
    fitted_through_: pd.Timestamp | None = None

    @property
    def fitted_through(self) -> pd.Timestamp | None:
        """End (exclusive) of the history the fitted state learned from; None before a fit."""
        return self.fitted_through_

    @abstractmethod
    def fit(self, history: HistoryView, now: pd.Timestamp) -> Self:
        """Learn from the history before ``now`` and set :attr:`fitted_through_` to ``now``."""

    @abstractmethod
    def score(self, window: pd.DataFrame) -> pd.Series:
        """Return one anomaly score per row of ``window`` (same index); higher is more anomalous.

        The subclass documents what a row is: an event, or an aggregate such as a
        principal-hour. Rows the fitted state cannot judge (for example a principal without
        enough history) score NaN.
        """

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Return the fitted attributes as a JSON-ready dict, ``fitted_through`` included."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> Self:
        """Restore the fitted attributes from a dict that :meth:`get_state` returned."""

    def needs_refit(self, until: pd.Timestamp) -> bool:
        """Return True when the state cannot serve a window that starts at ``until``.

        That is when nothing is fitted, when the state learned from events at or after
        ``until`` (a replay of older history), or when it is older than ``refit_hours``.
        """
        fitted = self.fitted_through_
        if fitted is None or fitted > until:
            return True
        return until - fitted > pd.Timedelta(hours=self.params.refit_hours)

    def params_hash(self) -> str:
        """Return a digest of the parameters that shape the fitted state (not ``refit_hours``)."""
        shaping = self.params.model_dump(mode="json", exclude={"refit_hours"})
        return _digest(self.id, json.dumps(shaping, sort_keys=True))

    def ensure_fitted(self, history: HistoryView, until: pd.Timestamp) -> None:
        """Fit on the history before ``until`` unless the current state can serve it."""
        if self.needs_refit(until):
            self.fit(history, until)


_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Register a detector class under its ``id`` (usable as a decorator)."""
    if cls.id in _REGISTRY:
        raise ValueError(f"detector {cls.id!r} is already registered")
    _REGISTRY[cls.id] = cls
    return cls


def registered_detectors() -> dict[str, type[Detector]]:
    """Return the registered detector classes by id, in registration order."""
    return dict(_REGISTRY)


def get_detector(detector_id: str) -> type[Detector]:
    """Return the detector class registered as ``detector_id``."""
    try:
        return _REGISTRY[detector_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown detector {detector_id!r}; known: {known}") from None


def empty_findings() -> pd.DataFrame:
    """Return a findings frame with every column and no rows."""
    frame = pd.DataFrame({name: pd.Series([], dtype=object) for name in FINDING_COLUMNS})
    frame["first_seen"] = pd.Series([], dtype="datetime64[us, UTC]")
    frame["last_seen"] = pd.Series([], dtype="datetime64[us, UTC]")
    frame["event_count"] = pd.Series([], dtype="int64")
    return frame


def build_findings(
    rows: pd.DataFrame | Iterable[dict[str, Any]], *, detector: Detector
) -> pd.DataFrame:
    """Complete per-finding rows into a findings frame.

    ``rows`` needs at least ``severity``, ``title``, ``principal``, ``first_seen``,
    ``last_seen``, ``event_uids``, ``evidence`` and ``baseline``. Missing list columns become
    empty lists, ``event_count`` defaults to the number of distinct event uids, ``mitre`` to
    the detector's techniques, and ``dedup_key`` to detector + principal + sorted resources.
    ``finding_id`` is derived from the detector and the event uids, so re-running on the same
    events gives the same ids.
    """
    frame = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows.copy()
    if frame.empty:
        return empty_findings()
    frame = frame.reset_index(drop=True)
    frame["detector"] = detector.id
    for name in _LIST_COLUMNS:
        if name not in frame.columns:
            frame[name] = [[] for _ in range(len(frame))]
        frame[name] = frame[name].map(_string_list)
    for name in _DICT_COLUMNS:
        if name not in frame.columns:
            frame[name] = pd.Series([{} for _ in range(len(frame))], dtype=object)
    if not any(frame["mitre"].map(len)):
        frame["mitre"] = [list(detector.mitre) for _ in range(len(frame))]
    if "event_count" not in frame.columns:
        frame["event_count"] = frame["event_uids"].map(len)
    for name in ("principal_type", "cloud", "account", "geoip_build_date"):
        if name not in frame.columns:
            frame[name] = None
    bad = sorted(set(frame["severity"]) - set(SEVERITIES))
    if bad:
        raise ValueError(f"detector {detector.id}: invalid severities {bad}; expected {SEVERITIES}")
    # A missing principal (a finding about an address) hashes as "", whether the frame contains
    # None, NaN or pd.NA, because a run and a backtest of the same events must give the same ids.
    principals = [_text_or_empty(principal) for principal in frame["principal"]]
    if "dedup_key" not in frame.columns:
        frame["dedup_key"] = [
            _digest(detector.id, principal, *resources)
            for principal, resources in zip(principals, frame["resources"], strict=True)
        ]
    frame["finding_id"] = [
        _digest(detector.id, principal, *uids)
        for principal, uids in zip(principals, frame["event_uids"], strict=True)
    ]
    # One detector can reach the same events twice (a failure burst keyed by principal and by
    # the one address it came from); identical ids are the same finding, so keep the first.
    frame = frame.drop_duplicates(subset="finding_id", keep="first").reset_index(drop=True)
    for name in ("first_seen", "last_seen"):
        frame[name] = pd.to_datetime(frame[name], utc=True).astype("datetime64[us, UTC]")
    frame["event_count"] = frame["event_count"].astype("int64")
    return frame[list(FINDING_COLUMNS)]


def _string_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    if isinstance(value, str):
        return [value]
    items = []
    for item in value:
        if item is None or (isinstance(item, float) and pd.isna(item)) or item is pd.NA:
            continue
        items.append(str(item))
    return sorted(set(items))


def _text_or_empty(value: Any) -> str:
    """Return ``value`` as text, or "" when it is None, NaN or pd.NA."""
    return (
        ""
        if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value))
        else str(value)
    )


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]
