"""``keytrail.failure_burst``: many failed secret accesses in a short time."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, ClassVar, Final, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from detectors._common import (
    IN_WINDOW,
    iter_rows,
    load_context,
    located_addresses,
    read_mask,
    stable_key,
    to_counts,
    utc_iso,
)
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register
from pipeline.schema import FAILURE_REASONS

__all__ = ["FailureBurstDetector", "FailureBurstParams"]

logger = logging.getLogger(__name__)

BurstKey = Literal["principal", "source_ip"]
_BASELINE_DAYS: Final = 7
_DAY_US: Final = 86_400_000_000
_DEFAULT_KEYS: Final[tuple[BurstKey, ...]] = ("principal", "source_ip")
_IDS: Final = ("event_uid", "resource")
# Text columns of a burst that its finding lists or counts.
_FINDING_TEXT: Final = (
    "event_uid",
    "resource",
    "principal",
    "principal_type",
    "principal_arn",
    "cloud",
    "account",
    "source_ip",
    "geo_country",
    "failure_reason",
    "operation",
)
_COLUMNS: Final = (
    "time",
    "cloud",
    "operation",
    "action",
    "outcome",
    "failure_reason",
    "invoked_by",
    "principal",
    "principal_type",
    "principal_arn",
    "account",
    "source_ip",
    "source_kind",
    "geo_country",
    "geo_city",
)


class FailureBurstParams(DetectorParams):
    """Parameters of :class:`FailureBurstDetector`."""

    min_failures: int = Field(default=10, ge=2)
    window_minutes: float = Field(default=10.0, gt=0, le=24 * 60)
    reasons: list[str] = Field(default_factory=lambda: ["denied", "not_found"])
    keys: list[BurstKey] = Field(default_factory=lambda: list(_DEFAULT_KEYS))
    high_distinct_secrets: int = Field(default=5, ge=1)
    success_within_minutes: float = Field(default=30.0, ge=0)

    @field_validator("reasons")
    @classmethod
    def _reasons(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(FAILURE_REASONS))
        if unknown:
            raise ValueError(
                f"unknown failure reasons {unknown}; expected some of {FAILURE_REASONS}"
            )
        if not value:
            raise ValueError("reasons is empty, so no failure would count")
        return value

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[BurstKey]) -> list[BurstKey]:
        if not value:
            raise ValueError("keys is empty; expected principal, source_ip or both")
        return list(dict.fromkeys(value))


@register
class FailureBurstDetector(Detector):
    """Bursts of failed secret accesses: guessing names, probing permissions, brute force.

    A failure is outcome ``failure`` with a ``failure_reason`` in ``reasons``. For each key in
    ``keys`` (one principal; one public source IP across principals), a failure qualifies when
    at least ``min_failures`` failures of the key fall in the ``window_minutes`` ending at it.
    The failures of every qualifying window form bursts, and a burst ends when the next
    qualifying failure is more than ``window_minutes`` later. A burst becomes a finding when it
    contains at least one window event.

    Parameters: ``min_failures`` (10), ``window_minutes`` (10), ``reasons``
    (["denied", "not_found"]), ``keys`` (["principal", "source_ip"]),
    ``high_distinct_secrets`` (5), ``success_within_minutes`` (30).

    Severity is medium. It is high when the burst touched at least ``high_distinct_secrets``
    distinct secrets, or when a principal of the burst read a secret successfully within
    ``success_within_minutes`` after the burst's last failure (the success is in the evidence).
    The baseline is the key's failures per UTC day over the 7 days before the burst.

    Blind spots: a slow attacker that stays under ``min_failures`` per window, and failures
    spread over many principals and addresses.

    ATT&CK: T1110 (Brute Force), T1555.006 (Cloud Secrets Management Stores).
    """

    id: ClassVar[str] = "keytrail.failure_burst"
    mitre: ClassVar[tuple[str, ...]] = ("T1110", "T1555.006")
    Params: ClassVar[type[DetectorParams]] = FailureBurstParams
    params: FailureBurstParams

    @property
    def lookback(self) -> timedelta:
        """The 7 baseline days plus one, to cover the whole first baseline day."""
        return timedelta(days=_BASELINE_DAYS + 1)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per burst of failures that reaches into ``window``."""
        params = self.params
        is_failure = self._failures(window).to_numpy(dtype=bool)
        if not is_failure.any():
            return build_findings([], detector=self)
        # Only the columns used below are selected, because a boolean mask takes every column
        # of the window (one Arrow take each).
        window_failures = window.loc[is_failure, list(dict.fromkeys([*_COLUMNS, *_IDS]))]
        # Raw history is read only as far back as the bursts reach: a burst's failures are at
        # most window_minutes apart, so the span grows until no burst can chain further back.
        width = pd.Timedelta(minutes=params.window_minutes)
        span = 2 * width
        while True:
            context = load_context(window_failures, history, span, _COLUMNS)
            failures = context[self._failures(context).to_numpy(dtype=bool)]
            found = {key: self._bursts(_keyed(failures, key), key) for key in params.keys}
            read_from = window["time"].min() - span
            earliest = min(
                (bursts["time"].min() for bursts in found.values() if not bursts.empty),
                default=None,
            )
            if earliest is None or earliest - read_from >= 2 * width or span >= self.lookback:
                break
            span = min(span * 4, pd.Timedelta(self.lookback))
        reached: dict[str, pd.DataFrame] = {
            key: bursts for key, bursts in found.items() if not bursts.empty
        }
        if not reached:
            return build_findings([], detector=self)
        # A burst ends at or after a window event, so a read that follows it is in the window.
        # Only reads by the bursts' principals can match, and they are few of the window's
        # reads. Comparing the Arrow-backed strings directly avoids a Python string per row.
        involved = pd.unique(
            pd.concat([bursts["principal"].dropna() for bursts in reached.values()]).astype(str)
        )
        is_success = (window["outcome"] == "success").fillna(False).to_numpy(dtype=bool)
        by_involved = window["principal"].isin(involved).fillna(False).to_numpy(dtype=bool)
        successes = window.loc[
            read_mask(window).to_numpy(dtype=bool) & is_success & by_involved,
            ["principal", "time", "event_uid", "resource", "source_ip"],
        ]
        rolled = _failure_rollup(history, window, reached)
        rows: list[dict[str, Any]] = []
        for key, bursts in reached.items():
            daily = _daily_failures(rolled, window_failures, bursts, key)
            bursts = _add_baseline(bursts, daily)
            bursts = self._add_success(bursts, successes, key)
            rows.extend(self._finding_rows(bursts, key))
        logger.debug("%s: %s bursts", self.id, len(rows))
        return build_findings(rows, detector=self)

    def _failures(self, frame: pd.DataFrame) -> pd.Series:
        """Return True for the failures whose reason is one of ``reasons``."""
        outcome = (frame["outcome"] == "failure").fillna(False).astype(bool)
        reason = frame["failure_reason"].isin(self.params.reasons).fillna(False).astype(bool)
        return outcome & reason

    def _bursts(self, failures: pd.DataFrame, key: str) -> pd.DataFrame:
        """Return the failures that belong to a burst, with ``burst`` numbering each burst."""
        params = self.params
        if failures.empty:
            return failures.assign(burst=pd.Series(dtype="int64"))
        frame = failures.assign(key=failures[key].astype(str))
        # Failures are counted once per event, even when a batch call names several secrets.
        events = frame[["key", "event_uid", "time"]].drop_duplicates(["key", "event_uid"])
        events = events.sort_values(["key", "time"])
        events = events.reset_index(drop=True)
        codes = pd.factorize(events["key"])[0].astype(np.int64)
        times = events["time"].astype("int64").to_numpy()
        width = int(params.window_minutes * 60_000_000)

        # One sorted axis with keys far apart: the window start of failure i is a searchsorted.
        span = int(times.max() - times.min()) + width + 1
        axis = codes * span + (times - times.min())
        start = np.searchsorted(axis, axis - width, side="left")
        position = np.arange(len(axis))
        qualifies = position - start + 1 >= params.min_failures

        # Mark every failure inside some qualifying window with a difference array.
        marks = np.zeros(len(axis) + 1, dtype=np.int64)
        np.add.at(marks, start[qualifies], 1)
        np.add.at(marks, position[qualifies] + 1, -1)
        covered = np.cumsum(marks[:-1]) > 0
        burst_events = events[covered]
        if burst_events.empty:
            return burst_events.assign(burst=pd.Series(dtype="int64"))
        gap = burst_events["time"].diff() > pd.Timedelta(minutes=params.window_minutes)
        new_key = burst_events["key"] != burst_events["key"].shift()
        burst_ids = (gap | new_key).cumsum().to_numpy()
        uid_to_burst = pd.DataFrame(
            {"key": burst_events["key"].to_numpy(), "event_uid": burst_events["event_uid"]}
        ).assign(burst=burst_ids)
        members = frame.merge(uid_to_burst, on=["key", "event_uid"], how="inner")
        in_window = members.groupby("burst")[IN_WINDOW].transform("any")
        return members[in_window.to_numpy(dtype=bool)]

    def _add_success(self, bursts: pd.DataFrame, successes: pd.DataFrame, key: str) -> pd.DataFrame:
        """Attach the first successful read by a burst principal soon after each burst.

        For a burst keyed by source IP, the read must also come from that address: a success
        by the same principal from another address says nothing about the caller that failed.
        """
        summary = bursts.groupby("burst").agg(end=("time", "max"), key=("key", "first"))
        involved = bursts[["burst", "principal"]].dropna().drop_duplicates()
        candidates = involved.merge(summary.reset_index(), on="burst")
        reads = successes.dropna(subset=["principal"])
        match_on = ["principal"]
        if key == "source_ip":
            reads = reads.dropna(subset=["source_ip"])
            reads = reads.assign(source_ip=reads["source_ip"].astype(str))
            candidates["source_ip"] = candidates["key"].astype(str)
            match_on.append("source_ip")
        candidates = candidates.drop(columns="key")
        if candidates.empty or reads.empty:
            bursts["success"] = None
            return bursts
        limit = pd.Timedelta(minutes=self.params.success_within_minutes)
        candidates["principal"] = candidates["principal"].astype(str)
        reads = reads.assign(principal=reads["principal"].astype(str), success_time=reads["time"])
        matched = pd.merge_asof(
            candidates.sort_values("end"),
            reads.drop(columns="time").sort_values("success_time"),
            left_on="end",
            right_on="success_time",
            by=match_on,
            direction="forward",
            tolerance=limit,
            allow_exact_matches=False,
        ).dropna(subset=["success_time"])
        first = matched.sort_values("success_time").drop_duplicates("burst")
        success = {
            row.burst: {
                "principal": row.principal,
                "time": utc_iso(row.success_time),
                "event_uid": row.event_uid,
                "resource": _text(row.resource),
                "source_ip": _text(row.source_ip),
                "minutes_after_burst": round((row.success_time - row.end).total_seconds() / 60, 1),
            }
            for row in iter_rows(first)
        }
        bursts["success"] = bursts["burst"].map(success).astype(object)
        return bursts

    def _finding_rows(self, bursts: pd.DataFrame, key: str) -> list[dict[str, Any]]:
        params = self.params
        rows: list[dict[str, Any]] = []
        if bursts.empty:
            return rows
        # NOTE: one loop iteration per burst (per finding, not per event) is fast for hundreds
        # of bursts but slow if a run produces tens of thousands. Each burst is a slice of the
        # frame sorted by burst, and the text columns become object arrays once. Pandas calls
        # per burst on Arrow columns took 0.7 s for the 47 bursts of benchmarks/detect.py.
        bursts = bursts.sort_values("burst", kind="stable").reset_index(drop=True)
        text = {name: bursts[name].to_numpy(dtype=object) for name in _FINDING_TEXT}
        times = bursts["time"].array
        medians = bursts["baseline_median"].to_numpy(dtype=float)
        ids = bursts["burst"].to_numpy()
        edges = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        for start_at, stop_at in zip(
            np.concatenate([[0], edges]), np.concatenate([edges, [len(ids)]]), strict=True
        ):
            part = {name: values[start_at:stop_at] for name, values in text.items()}
            first_of_event = ~pd.Series(part["event_uid"]).duplicated().to_numpy()
            principals = sorted(_present(part["principal"]))
            secrets = sorted(_present(part["resource"]))
            success = bursts["success"].iat[start_at]
            failures = len(_present(part["event_uid"]))
            start = pd.Timestamp(times[start_at:stop_at].min())
            end = pd.Timestamp(times[start_at:stop_at].max())
            key_value = str(bursts["key"].iat[start_at])
            severity = (
                "high"
                if len(secrets) >= params.high_distinct_secrets or isinstance(success, dict)
                else "medium"
            )
            # A burst from one address across several principals has no single principal:
            # the evidence lists them and the title names the address.
            principal: str | None = None
            if key == "principal":
                principal = key_value
            elif len(principals) == 1:
                principal = principals[0]
            subject = key_value if key == "principal" else f"source IP {key_value}"
            median = float(medians[start_at])
            rows.append(
                {
                    "severity": severity,
                    "title": (
                        f"{failures} failed secret accesses by {subject} in "
                        f"{_minutes_text(end - start)}"
                    ),
                    "principal": principal,
                    "principal_type": _single(part["principal_type"]),
                    "cloud": _single(part["cloud"]),
                    "account": _single(part["account"]),
                    "resources": secrets,
                    "source_ips": _present(part["source_ip"]),
                    "countries": _present(part["geo_country"]),
                    "first_seen": start,
                    "last_seen": end,
                    "event_uids": pd.Series(part["event_uid"]).astype(str).unique().tolist(),
                    "event_count": failures,
                    "dedup_key": stable_key(self.id, key, key_value, utc_iso(start)),
                    "evidence": {
                        "key": key,
                        "key_value": key_value,
                        "failures": failures,
                        "distinct_secrets": len(secrets),
                        "reasons": to_counts(pd.Series(part["failure_reason"][first_of_event])),
                        "operations": to_counts(pd.Series(part["operation"][first_of_event])),
                        "principals": principals,
                        "span_seconds": round((end - start).total_seconds(), 1),
                        "window_minutes": params.window_minutes,
                        "min_failures": params.min_failures,
                        "success_after": success if isinstance(success, dict) else None,
                        "locations": located_addresses(
                            bursts.iloc[start_at:stop_at][
                                ["time", "source_ip", "geo_city", "geo_country"]
                            ]
                        ),
                        "principal_arns": sorted(
                            set(_present(part["principal_arn"])) - set(principals)
                        ),
                    },
                    "baseline": {
                        "days": _BASELINE_DAYS,
                        "daily_failures": bursts["baseline_daily"].iat[start_at],
                        "median_per_day": median,
                        "summary": f"{_BASELINE_DAYS}-day median {median:g} failures/day; "
                        f"this burst {failures}",
                    },
                }
            )
        return rows


def _keyed(failures: pd.DataFrame, key: str) -> pd.DataFrame:
    """Return the failures that carry ``key``: a principal, or a public source address."""
    if key == "principal":
        return failures[failures["principal"].notna().to_numpy(dtype=bool)]
    public = (failures["source_kind"] == "public").fillna(False).to_numpy(dtype=bool)
    return failures[public & failures["source_ip"].notna().to_numpy()]


def _failure_rollup(
    history: HistoryView, window: pd.DataFrame, bursts: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Read the failure rows of the hourly rollup for the baseline days of ``bursts``.

    One read serves every key. Columns ``hour``, the keys, and ``count``.
    """
    keys = list(bursts)
    if not keys:
        return pd.DataFrame(columns=["hour", "count"])
    first = min(frame["time"].min() for frame in bursts.values())
    since = first.floor("D") - pd.Timedelta(days=_BASELINE_DAYS)
    until = window["time"].min()
    rolled = history.rollup(since=since, until=until, columns=["hour", *keys, "outcome", "count"])
    # NOTE: the rollup has no failure_reason and counts one row per secret of a batch call.
    # So days before the window count every failure row, and window days count events.
    failed = (rolled["outcome"] == "failure").fillna(False).to_numpy(dtype=bool)
    return rolled.loc[failed, ["hour", *keys, "count"]].reset_index(drop=True)


def _daily_failures(
    rolled: pd.DataFrame, window_failures: pd.DataFrame, bursts: pd.DataFrame, key: str
) -> pd.DataFrame:
    """Count the failures per key and UTC day, from the rollup before the window and its events.

    Weeks of raw history are never read. Returns columns ``key``, ``day``, ``count``.
    """
    keys = pd.unique(bursts["key"].to_numpy(dtype=object))
    # Days are int64 day numbers. Flooring the tz-aware hours and converting them to numpy
    # made a Timestamp object per rollup row (0.8 s in benchmarks/detect.py).
    rolled = rolled[rolled[key].isin(keys).fillna(False).to_numpy(dtype=bool)]
    earlier = pd.DataFrame(
        {
            "key": rolled[key].astype(object).to_numpy(),
            "day": _epoch_days(rolled["hour"]),
            "count": rolled["count"].to_numpy(np.int64),
        }
    )
    current = _keyed(window_failures, key)
    current = current.assign(key=current[key].astype(str)).drop_duplicates(["key", "event_uid"])
    current = current[current["key"].isin(keys).to_numpy(dtype=bool)]
    recent = pd.DataFrame(
        {
            "key": current["key"].to_numpy(dtype=object),
            "day": _epoch_days(current["time"]),
            "count": np.ones(len(current), dtype=np.int64),
        }
    )
    both = pd.concat([earlier, recent], ignore_index=True)
    daily = both.groupby(["key", "day"])["count"].sum().reset_index()
    daily["day"] = pd.to_datetime(daily["day"].to_numpy(np.int64) * _DAY_US, unit="us", utc=True)
    return daily


def _epoch_days(times: pd.Series) -> np.ndarray:
    """Return the UTC day of each time as whole days since 1970-01-01 (int64)."""
    return times.astype("datetime64[us, UTC]").astype("int64").to_numpy() // _DAY_US


def _add_baseline(bursts: pd.DataFrame, daily: pd.DataFrame) -> pd.DataFrame:
    """Add the key's failures per UTC day for the 7 days before each burst's day."""
    starts = bursts.groupby("burst").agg(key=("key", "first"), start=("time", "min"))
    starts["day"] = starts["start"].dt.floor("D")
    offsets = pd.DataFrame({"offset": np.arange(_BASELINE_DAYS, 0, -1)})
    grid = starts.reset_index().merge(offsets, how="cross")
    grid["day"] = grid["day"] - pd.to_timedelta(grid["offset"], unit="D")
    grid = grid.merge(daily, on=["key", "day"], how="left").fillna({"count": 0})
    grid = grid.sort_values(["burst", "day"])
    per_burst = grid.groupby("burst")["count"]
    medians = per_burst.median()
    series = per_burst.apply(lambda counts: [int(count) for count in counts])
    bursts["baseline_median"] = bursts["burst"].map(medians)
    bursts["baseline_daily"] = bursts["burst"].map(series).astype(object)
    return bursts


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _present(values: np.ndarray) -> list[str]:
    """Return the non-null values as text, each once, in order of first appearance."""
    return list(dict.fromkeys(str(value) for value in values[~pd.isna(values)]))


def _single(values: np.ndarray) -> str | None:
    """Return the one distinct non-null value as text, or None when there are none or several."""
    distinct = _present(values)
    return distinct[0] if len(distinct) == 1 else None


def _minutes_text(span: pd.Timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{span.total_seconds():.0f} s"
