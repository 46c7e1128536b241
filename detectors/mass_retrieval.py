"""``keytrail.mass_retrieval``: many distinct secrets read at once, or listed and then read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from itertools import pairwise
from typing import Any, ClassVar, Final

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors._common import (
    IN_WINDOW,
    count_in_range,
    load_context,
    located_addresses,
    read_mask,
    stable_key,
    to_counts,
    utc_iso,
    utc_micros,
)
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register

__all__ = [
    "DistinctWindow",
    "MassRetrievalDetector",
    "MassRetrievalParams",
    "distinct_in_window",
]

logger = logging.getLogger(__name__)

_MICROSECONDS_PER_MINUTE: Final = 60_000_000
_COLUMNS: Final = (
    "cloud",
    "operation",
    "action",
    "outcome",
    "invoked_by",
    "principal",
    "principal_type",
    "account",
    "source_ip",
    "geo_country",
    "geo_city",
)
_ROLLUP_COLUMNS: Final = (
    "hour",
    "cloud",
    "principal",
    "resource",
    "action",
    "outcome",
    "operation",
)
BURST_MITRE: Final = ["T1555.006"]
SEQUENCE_MITRE: Final = ["T1555.006", "T1526"]


class DistinctWindow(BaseModel):
    """One sliding-window rule: ``min_distinct`` distinct secrets within ``minutes``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    minutes: float = Field(gt=0, le=24 * 60)
    min_distinct: int = Field(ge=2)


def _default_windows() -> list[DistinctWindow]:
    return [
        DistinctWindow(minutes=10, min_distinct=20),
        DistinctWindow(minutes=60, min_distinct=26),
    ]


class MassRetrievalParams(DetectorParams):
    """Parameters of :class:`MassRetrievalDetector`."""

    windows: list[DistinctWindow] = Field(default_factory=_default_windows)
    high_distinct: int = Field(default=50, ge=2)
    sequence: bool = True
    sequence_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    sequence_min_reads: int = Field(default=5, ge=1)
    list_operations: list[str] = Field(default_factory=lambda: ["GetParametersByPath"])
    usual_days: int = Field(default=3, ge=0)
    lookback_days: int = Field(default=30, ge=1, le=366)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[DistinctWindow]) -> list[DistinctWindow]:
        if not value:
            raise ValueError("windows is empty; expected at least one {minutes, min_distinct} rule")
        return value


def distinct_in_window(
    principal_codes: np.ndarray,
    pair_codes: np.ndarray,
    times: np.ndarray,
    width: int,
    query_codes: np.ndarray,
    query_times: np.ndarray,
) -> np.ndarray:
    """Count, for each query, the distinct secrets its principal read in ``(T - width, T]``.

    The read arrays are aligned: ``pair_codes`` number each (principal, secret) pair and
    ``times`` are int64 microseconds. A read at ``t`` keeps its secret counted for every ``T``
    in ``[t, t + width)``, and overlapping spans of the same pair are merged. The count at
    ``T`` is then the number of merged spans that started at or before ``T`` minus those that
    ended at or before ``T``. That takes two ``searchsorted`` calls per query instead of a
    scan of the window.
    """
    if len(query_codes) == 0 or len(times) == 0:
        return np.zeros(len(query_codes), dtype=np.int64)
    order = np.lexsort((times, pair_codes))
    pairs = pair_codes[order]
    sorted_times = times[order]
    starts_span = np.ones(len(order), dtype=bool)
    starts_span[1:] = (pairs[1:] != pairs[:-1]) | (sorted_times[1:] - sorted_times[:-1] >= width)
    first = np.flatnonzero(starts_span)
    last = np.append(first[1:] - 1, len(order) - 1)
    span_codes = principal_codes[order][first]
    span_starts = sorted_times[first]
    span_ends = sorted_times[last] + width
    low = np.full(len(query_codes), min(int(span_starts.min()), int(query_times.min())))
    high = query_times + 1
    started = count_in_range(span_codes, span_starts, query_codes, low, high)
    ended = count_in_range(span_codes, span_ends, query_codes, low, high)
    return started - ended


@dataclass
class _Candidate:
    """One burst or sequence before it becomes a finding; positions index the context rows."""

    kind: str
    code: int
    reads: np.ndarray
    lists: np.ndarray
    max_distinct: dict[str, int]


@dataclass
class _Activity:
    """Successful reads and enumerations of the context as arrays, ordered by principal and time.

    ``*_rows`` are positions in the context frame; ``*_codes`` number each (cloud, principal)
    key, and ``names`` maps a code back to that key.
    """

    read_rows: np.ndarray
    read_codes: np.ndarray
    read_pairs: np.ndarray
    read_times: np.ndarray
    list_rows: np.ndarray
    list_codes: np.ndarray
    list_times: np.ndarray
    names: list[tuple[str, str]]


@register
class MassRetrievalDetector(Detector):
    """Many distinct secrets read by one principal in minutes, or listed and then read.

    A principal is a ``principal`` in one ``cloud``. Reads are successful reads (see
    ``read_mask``); a secret is a distinct ``resource``.

    Bursts: for each rule in ``windows`` (defaults: 20 distinct secrets within 10 minutes, 26
    within 60 minutes), a read qualifies when the principal read at least ``min_distinct``
    distinct secrets in the ``minutes`` ending at it. Reads inside any qualifying window form a
    burst, one finding per principal and burst. Severity is medium, high from
    ``high_distinct`` (50) distinct secrets.

    Sequences (``sequence``): a successful enumeration followed within ``sequence_minutes``
    (15) by reads of at least ``sequence_min_reads`` (5) distinct secrets by the same
    principal. An enumeration is a row with action ``list`` (ListSecrets, DescribeParameters,
    GCP ListSecrets and ListSecretVersions, Azure SecretList and SecretListVersions) or an
    operation in ``list_operations``. Qualifying enumerations at most ``sequence_minutes``
    apart join one sequence. Severity is high. A burst that shares reads with a sequence is
    dropped in favour of the sequence's finding.

    Learning: a finding is dropped, and counted in ``report_["usual"]``, when the principal
    did the same on at least ``usual_days`` (3) earlier UTC days within ``lookback_days`` (30)
    days. For a burst, "the same" is reading at least the smallest ``min_distinct`` distinct
    secrets within one clock hour. For a sequence, it is an enumeration and at least
    ``sequence_min_reads`` distinct reads in one clock hour. ``usual_days: 0`` turns learning
    off.

    Blind spots: a reader that stays under every rule, and reads spread over several
    principals. Learning counts clock hours, which is coarser than the rules: a burst across
    an hour boundary counts as two smaller hours. The logs do not say which secrets a list call returned, so
    any distinct secrets read after it count.

    ATT&CK: T1555.006 (Cloud Secrets Management Stores); sequences add T1526 (Cloud Service
    Discovery) for the enumeration.
    """

    id: ClassVar[str] = "keytrail.mass_retrieval"
    mitre: ClassVar[tuple[str, ...]] = ("T1555.006", "T1526")
    Params: ClassVar[type[DetectorParams]] = MassRetrievalParams
    params: MassRetrievalParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report_: dict[str, int] = {}

    @property
    def lookback(self) -> timedelta:
        """The learning days plus the longest rule window, plus one hour for rounding to hours."""
        return timedelta(days=self.params.lookback_days, hours=1) + self._raw_span()

    def _raw_span(self) -> timedelta:
        longest = max(rule.minutes for rule in self.params.windows)
        return timedelta(minutes=max(longest, self.params.sequence_minutes))

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per burst and per sequence that reaches into ``window``."""
        params = self.params
        self.report_ = {"usual": 0}
        if window.empty:
            return build_findings([], detector=self)
        boundary = (window["time"].min() - self._raw_span()).floor("h")
        context = load_context(window, history, window["time"].min() - boundary, _COLUMNS)
        activity = self._activity(context)

        sequences = self._sequences(activity) if params.sequence else []
        in_sequence = np.concatenate(
            [np.zeros(0, dtype=np.int64), *(candidate.reads for candidate in sequences)]
        )
        bursts = [
            burst for burst in self._bursts(activity) if not np.isin(burst.reads, in_sequence).any()
        ]
        in_window = context[IN_WINDOW].to_numpy(dtype=bool)
        candidates = [
            item
            for item in [*sequences, *bursts]
            if in_window[item.reads].any() or in_window[item.lists].any()
        ]
        if not candidates:
            return build_findings([], detector=self)

        keys = {activity.names[candidate.code] for candidate in candidates}
        usual = self._usual_days(history, context, boundary, keys) if params.usual_days else {}
        times = utc_micros(context["time"])
        rows = []
        for candidate in candidates:
            key = activity.names[candidate.code]
            row = self._finding_row(candidate, context, times, key, usual.get(key))
            if row is None:
                self.report_["usual"] += 1
                continue
            rows.append(row)
        logger.debug("%s: %s findings, report %s", self.id, len(rows), self.report_)
        return build_findings(rows, detector=self)

    def _activity(self, context: pd.DataFrame) -> _Activity:
        """Encode the context's successful reads and enumerations as sorted integer arrays."""
        principal_codes, principals = pd.factorize(context["principal"])
        cloud_codes, clouds = pd.factorize(context["cloud"], use_na_sentinel=False)
        resource_codes, resources = pd.factorize(context["resource"])
        codes = cloud_codes.astype(np.int64) * max(len(principals), 1) + principal_codes
        named = principal_codes >= 0
        succeeded = (context["outcome"] == "success").fillna(False).to_numpy(dtype=bool) & named
        is_read = read_mask(context).to_numpy(dtype=bool) & succeeded & (resource_codes >= 0)
        is_list = self._list_mask(context) & succeeded
        times = utc_micros(context["time"])

        read_rows = np.flatnonzero(is_read)
        read_rows = read_rows[np.lexsort((times[read_rows], codes[read_rows]))]
        list_rows = np.flatnonzero(is_list)
        list_rows = list_rows[np.lexsort((times[list_rows], codes[list_rows]))]
        # Renumber the keys densely, in the order the sorted rows use them.
        used, dense = np.unique(
            np.concatenate([codes[read_rows], codes[list_rows]]), return_inverse=True
        )
        names = [
            (
                _text(clouds[int(code) // max(len(principals), 1)]) or "",
                str(principals[int(code) % max(len(principals), 1)]),
            )
            for code in used
        ]
        read_codes = dense[: len(read_rows)].astype(np.int64)
        return _Activity(
            read_rows=read_rows,
            read_codes=read_codes,
            read_pairs=read_codes * max(len(resources), 1) + resource_codes[read_rows],
            read_times=times[read_rows],
            list_rows=list_rows,
            list_codes=dense[len(read_rows) :].astype(np.int64),
            list_times=times[list_rows],
            names=names,
        )

    def _list_mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Return True for enumerations: action ``list`` or an operation in ``list_operations``.

        The operation is compared by its last dotted part, so GCP's full method names match.
        """
        codes, operations = pd.factorize(frame["operation"])
        listed_operations = np.array(
            [str(name).rsplit(".", 1)[-1] in self.params.list_operations for name in operations]
            + [False],
            dtype=bool,
        )
        by_operation = listed_operations[codes]
        return (frame["action"] == "list").fillna(False).to_numpy(dtype=bool) | by_operation

    def _bursts(self, activity: _Activity) -> list[_Candidate]:
        """Return the bursts: runs of reads that lie inside a qualifying window of some rule."""
        params = self.params
        codes = activity.read_codes
        read_times = activity.read_times
        if len(codes) == 0:
            return []

        origin = int(read_times.min())
        longest = int(max(rule.minutes for rule in params.windows) * _MICROSECONDS_PER_MINUTE)
        span = int(read_times.max()) - origin + longest + 1
        axis = codes * span + (read_times - origin)
        marks = np.zeros(len(codes) + 1, dtype=np.int64)
        distinct_by_rule: dict[str, np.ndarray] = {}
        for rule in params.windows:
            width = int(rule.minutes * _MICROSECONDS_PER_MINUTE)
            distinct = distinct_in_window(
                codes, activity.read_pairs, read_times, width, codes, read_times
            )
            distinct_by_rule[_rule_name(rule)] = distinct
            qualifying = np.flatnonzero(distinct >= rule.min_distinct)
            if len(qualifying) == 0:
                continue
            # Mark the window (T - width, T] of each qualifying read at T. A later read at the
            # same T has the same window, so it qualifies and marks itself.
            first = np.searchsorted(axis, axis[qualifying] - width, side="right")
            np.add.at(marks, first, 1)
            np.add.at(marks, qualifying + 1, -1)

        covered = np.cumsum(marks[:-1]) > 0
        if not covered.any():
            return []
        # A burst is a run of covered reads of one principal without a gap over the longest
        # window: two such runs never share a window.
        positions = np.flatnonzero(covered)
        gap = np.diff(read_times[positions]) > longest
        new = np.ones(len(positions), dtype=bool)
        new[1:] = (np.diff(positions) > 1) | (np.diff(codes[positions]) != 0) | gap
        bounds = np.append(np.flatnonzero(new), len(positions))

        candidates = []
        for begin, end in pairwise(bounds):
            members = positions[begin:end]
            candidates.append(
                _Candidate(
                    kind="burst",
                    code=int(codes[members[0]]),
                    reads=activity.read_rows[members],
                    lists=np.zeros(0, dtype=np.int64),
                    max_distinct={
                        name: int(values[members].max())
                        for name, values in distinct_by_rule.items()
                    },
                )
            )
        return candidates

    def _sequences(self, activity: _Activity) -> list[_Candidate]:
        """Return the enumerations followed by enough distinct reads, joined per principal."""
        params = self.params
        if len(activity.list_rows) == 0 or len(activity.read_rows) == 0:
            return []
        width = int(params.sequence_minutes * _MICROSECONDS_PER_MINUTE)
        list_codes = activity.list_codes
        list_times = activity.list_times
        distinct = distinct_in_window(
            activity.read_codes,
            activity.read_pairs,
            activity.read_times,
            width,
            list_codes,
            list_times + width,
        )
        qualifying = np.flatnonzero(distinct >= params.sequence_min_reads)
        if len(qualifying) == 0:
            return []
        new = np.ones(len(qualifying), dtype=bool)
        new[1:] = (np.diff(list_codes[qualifying]) != 0) | (np.diff(list_times[qualifying]) > width)
        bounds = np.append(np.flatnonzero(new), len(qualifying))

        # Reads and enumerations on one sorted axis each, so a sequence's rows are two slices.
        origin = int(min(activity.read_times.min(), list_times.min()))
        span = int(max(activity.read_times.max(), list_times.max())) - origin + width + 1
        read_axis = activity.read_codes * span + (activity.read_times - origin)
        list_axis = list_codes * span + (list_times - origin)
        candidates = []
        for begin, end in pairwise(bounds):
            members = qualifying[begin:end]
            code = int(list_codes[members[0]])
            start = code * span + int(list_times[members[0]]) - origin
            stop = code * span + int(list_times[members[-1]]) - origin
            list_slice = slice(
                np.searchsorted(list_axis, start, side="left"),
                np.searchsorted(list_axis, stop, side="right"),
            )
            read_slice = slice(
                np.searchsorted(read_axis, start, side="right"),
                np.searchsorted(read_axis, stop + width, side="right"),
            )
            candidates.append(
                _Candidate(
                    kind="sequence",
                    code=code,
                    reads=activity.read_rows[read_slice],
                    lists=activity.list_rows[list_slice],
                    max_distinct={"sequence": int(distinct[members].max())},
                )
            )
        return candidates

    def _usual_days(
        self,
        history: HistoryView,
        context: pd.DataFrame,
        boundary: pd.Timestamp,
        keys: set[tuple[str, str]],
    ) -> dict[tuple[str, str], pd.DataFrame]:
        """Return, per (cloud, principal) in ``keys``, which UTC days held a burst or sequence hour.

        Each frame has one row per day with ``burst`` and ``sequence`` flags and
        ``max_distinct``, the most distinct secrets read in one clock hour that day. History
        before ``boundary`` comes from the hourly rollup; from ``boundary`` on, from the raw
        events of ``context``.
        """
        params = self.params
        principals = sorted({principal for _, principal in keys})
        rolled = history.rollup(
            since=boundary - pd.Timedelta(days=params.lookback_days),
            until=boundary,
            columns=list(_ROLLUP_COLUMNS),
        )
        rolled = rolled[rolled["principal"].isin(principals).fillna(False).to_numpy(dtype=bool)]
        raw = context[context["principal"].isin(principals).fillna(False).to_numpy(dtype=bool)]
        raw = raw.assign(hour=raw["time"].dt.floor("h"))
        columns = ["cloud", "principal", "hour", "resource", "action", "outcome", "operation"]
        hours = pd.concat([rolled[columns], raw[columns]], ignore_index=True)
        hours["cloud"] = hours["cloud"].astype(object).where(hours["cloud"].notna(), "")
        succeeded = (hours["outcome"] == "success").fillna(False).to_numpy(dtype=bool)
        is_read = (hours["action"] == "read").fillna(False).to_numpy(dtype=bool) & succeeded
        is_read &= hours["resource"].notna().to_numpy(dtype=bool)
        is_list = self._list_mask(hours) & succeeded
        group = ["cloud", "principal", "hour"]
        distinct = (
            hours[is_read]
            .drop_duplicates([*group, "resource"])
            .groupby(group)
            .size()
            .rename("distinct")
        )
        listed = hours[is_list].groupby(group).size().rename("lists")
        per_hour = pd.concat([distinct, listed], axis=1).fillna(0)
        if per_hour.empty:
            return {}
        per_hour = per_hour.reset_index()
        smallest = min(rule.min_distinct for rule in params.windows)
        per_hour["burst"] = per_hour["distinct"] >= smallest
        per_hour["sequence"] = (per_hour["lists"] > 0) & (
            per_hour["distinct"] >= params.sequence_min_reads
        )
        per_hour["day"] = per_hour["hour"].dt.floor("D")
        per_day = (
            per_hour.groupby(["cloud", "principal", "day"])
            .agg(
                burst=("burst", "any"),
                sequence=("sequence", "any"),
                max_distinct=("distinct", "max"),
            )
            .reset_index()
        )
        return {
            (str(cloud), str(principal)): days
            for (cloud, principal), days in per_day.groupby(["cloud", "principal"], sort=False)
        }

    def _usual_count(
        self, candidate: _Candidate, times: np.ndarray, usual: pd.DataFrame | None
    ) -> tuple[int, int]:
        """Return the earlier days like ``candidate`` and the max distinct secrets in an hour.

        Both cover the ``lookback_days`` before the UTC day on which the candidate starts.
        """
        if usual is None:
            return 0, 0
        rows = np.concatenate([candidate.reads, candidate.lists])
        day = pd.Timestamp(int(times[rows].min()), unit="us", tz="UTC").floor("D")
        days = usual["day"]
        since = day - pd.Timedelta(days=self.params.lookback_days)
        earlier = ((days < day) & (days >= since)).to_numpy(dtype=bool)
        if not earlier.any():
            return 0, 0
        usual_days = int(usual[candidate.kind].to_numpy(dtype=bool)[earlier].sum())
        return usual_days, int(usual["max_distinct"].to_numpy()[earlier].max())

    def _finding_row(
        self,
        candidate: _Candidate,
        context: pd.DataFrame,
        times: np.ndarray,
        key: tuple[str, str],
        usual: pd.DataFrame | None,
    ) -> dict[str, Any] | None:
        """Build the finding of one candidate, or return None when it is usual for the principal."""
        params = self.params
        usual_days, max_hourly = self._usual_count(candidate, times, usual)
        if params.usual_days and usual_days >= params.usual_days:
            return None

        lists = context.iloc[candidate.lists]
        reads = context.iloc[candidate.reads]
        events = pd.concat([lists, reads]).sort_values("time", kind="stable")
        start = pd.Timestamp(events["time"].min())
        end = pd.Timestamp(events["time"].max())
        cloud, principal = key
        secrets = sorted(reads["resource"].dropna().astype(str).unique())
        span = end - start

        common = {
            "principal": principal,
            "principal_type": _single(events["principal_type"]),
            "cloud": cloud or None,
            "account": _single(events["account"]),
            "resources": secrets,
            "source_ips": events["source_ip"].dropna().astype(str).unique().tolist(),
            "countries": events["geo_country"].dropna().astype(str).unique().tolist(),
            "first_seen": start,
            "last_seen": end,
            "event_uids": events["event_uid"].astype(str).unique().tolist(),
            "dedup_key": stable_key(self.id, candidate.kind, cloud, principal, utc_iso(start)),
        }
        evidence: dict[str, Any] = {
            "kind": candidate.kind,
            "distinct_secrets": len(secrets),
            "reads": int(reads["event_uid"].nunique()),
            "span_seconds": round(span.total_seconds(), 1),
            "max_distinct": candidate.max_distinct,
            "read_operations": to_counts(reads.drop_duplicates("event_uid")["operation"]),
            "locations": located_addresses(events),
        }
        baseline: dict[str, Any] = {
            "lookback_days": params.lookback_days,
            "max_hourly_distinct": max_hourly,
            "usual_days": usual_days,
        }

        if candidate.kind == "burst":
            smallest = min(rule.min_distinct for rule in params.windows)
            evidence["rules"] = [rule.model_dump() for rule in params.windows]
            baseline["summary"] = (
                f"{params.lookback_days}-day max {max_hourly} distinct secrets in one clock hour, "
                f"{usual_days} days with {smallest} or more; this burst {len(secrets)} in "
                f"{_duration_text(span)}"
            )
            return common | {
                "severity": "high" if len(secrets) >= params.high_distinct else "medium",
                "title": f"{principal} read {len(secrets)} distinct secrets in {_duration_text(span)}",
                "mitre": BURST_MITRE,
                "evidence": evidence,
                "baseline": baseline,
            }

        first_list = pd.Timestamp(lists["time"].min())
        last_read = pd.Timestamp(reads["time"].max())
        evidence |= {
            "list_calls": int(lists["event_uid"].nunique()),
            "list_operations": to_counts(lists.drop_duplicates("event_uid")["operation"]),
            "first_list": utc_iso(first_list),
            "last_read": utc_iso(last_read),
            "sequence_minutes": params.sequence_minutes,
            "sequence_min_reads": params.sequence_min_reads,
        }
        baseline["summary"] = (
            f"{usual_days} of the last {params.lookback_days} days with an enumeration and "
            f"{params.sequence_min_reads} or more distinct reads in one clock hour; this sequence "
            f"{len(secrets)} distinct secrets within {_duration_text(last_read - first_list)}"
        )
        return common | {
            "severity": "high",
            "title": (
                f"{principal} listed secrets, then read {len(secrets)} distinct secrets within "
                f"{_duration_text(last_read - first_list)}"
            ),
            "mitre": SEQUENCE_MITRE,
            "evidence": evidence,
            "baseline": baseline,
        }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _rule_name(rule: DistinctWindow) -> str:
    return f"{rule.minutes:g} min"


def _single(values: pd.Series) -> str | None:
    distinct = values.dropna().astype(str).unique()
    return str(distinct[0]) if len(distinct) == 1 else None


def _duration_text(span: pd.Timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{span.total_seconds():.0f} s"
