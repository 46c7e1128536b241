"""``keytrail.volume_spike``: a principal reads far more secrets than its own history shows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Final, Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from detectors._common import IN_WINDOW, load_context, stable_key, to_counts, utc_iso, utc_micros
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register

__all__ = ["VolumeSpikeDetector", "VolumeSpikeParams", "robust_scores", "shared_codes"]

logger = logging.getLogger(__name__)

Level = Literal["principal", "secret"]

MAD_TO_SIGMA: Final = 1.4826
"""Factor that turns a median absolute deviation into a standard deviation for normal data."""

_DEFAULT_LEVELS: Final[tuple[Level, ...]] = ("principal", "secret")
_MAX_EVENT_UIDS: Final = 1000
_RAW_COLUMNS: Final = (
    "cloud",
    "operation",
    "action",
    "outcome",
    "principal",
    "principal_type",
    "account",
    "source_ip",
    "geo_country",
)
_ROLLUP_COLUMNS: Final = (
    "hour",
    "cloud",
    "principal",
    "resource",
    "action",
    "outcome",
    "count",
    "first_time",
    "last_time",
)
# Matrix cells (targets x baseline buckets) handled in one numpy call, to bound memory.
_CHUNK_CELLS: Final = 4_000_000
# Factor that puts a principal key and a bucket number on one int64 axis: bucket numbers
# (hours since 1970 at most) stay far below it.
_BUCKETS_PER_KEY: Final = 1 << 32


class _Names(NamedTuple):
    """The names behind a target's integer key."""

    cloud: str | None
    principal: str | None
    resource: str | None
    bucket: pd.Timestamp


@dataclass
class _Counts:
    """Read counts per secret key and bucket, and the window's reads, keyed by integer codes.

    ``secret_key`` is ``principal_key * sizes["resource"] + resource code`` and
    ``principal_key`` is ``cloud code * sizes["principal"] + principal code``. ``buckets``
    has one row per secret key and bucket with ``count``, ``first_time`` and ``last_time``
    (int64 microseconds). ``window_reads`` has the context row of each read in the window.
    """

    buckets: pd.DataFrame
    window_reads: pd.DataFrame
    context: pd.DataFrame
    uniques: dict[str, np.ndarray]
    sizes: dict[str, int]
    bucket_us: int

    def principal_key(self, secret_keys: np.ndarray) -> np.ndarray:
        return secret_keys.astype(np.int64) // self.sizes["resource"]

    def principal_names(self, principal_key: int) -> tuple[str | None, str | None]:
        cloud, principal = divmod(int(principal_key), self.sizes["principal"])
        return _text(self.uniques["cloud"][cloud]), _text(self.uniques["principal"][principal])

    def resource_name(self, secret_key: int) -> str | None:
        return _text(self.uniques["resource"][int(secret_key) % self.sizes["resource"]])


class VolumeSpikeParams(DetectorParams):
    """Parameters of :class:`VolumeSpikeDetector`."""

    baseline_days: int = Field(default=30, ge=1, le=366)
    bucket_hours: int = Field(default=24, ge=1, le=24)
    min_count: int = Field(default=20, ge=1)
    min_ratio: float = Field(default=3.0, ge=1.0)
    threshold: float = Field(default=5.0, gt=0)
    min_history_days: int = Field(default=7, ge=1)
    levels: list[Level] = Field(default_factory=lambda: list(_DEFAULT_LEVELS))
    top_secrets: int = Field(default=5, ge=1)
    medium_ratio: float = Field(default=5.0, ge=1.0)
    high_ratio: float = Field(default=10.0, ge=1.0)

    @field_validator("bucket_hours")
    @classmethod
    def _bucket_divides_day(cls, value: int) -> int:
        if 24 % value:
            raise ValueError(
                f"bucket_hours must divide 24 (1, 2, 3, 4, 6, 8, 12 or 24), got {value}"
            )
        return value

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[Level]) -> list[Level]:
        if not value:
            raise ValueError("levels is empty; expected principal, secret or both")
        return list(dict.fromkeys(value))


def robust_scores(counts: np.ndarray, medians: np.ndarray, mads: np.ndarray) -> np.ndarray:
    """Return how far each count lies above its baseline, in robust standard deviations.

    The scale is ``1.4826 * MAD``, floored at ``sqrt(max(median, 1))``, the standard deviation
    of a Poisson count with that mean. The floor keeps a perfectly steady series (MAD 0) from
    turning any small change into an infinite score.
    """
    scale = np.maximum(MAD_TO_SIGMA * mads, np.sqrt(np.maximum(medians, 1.0)))
    return (counts - medians) / scale


@register
class VolumeSpikeDetector(Detector):
    """Many more secret reads by one principal in a day than its own history shows.

    Reads are successful rows with action ``read``, so a batch call that reads N secrets counts
    N; failed reads are left to ``keytrail.failure_burst``. The detector counts them per
    ``bucket_hours`` bucket (a UTC day by default) for each principal (level ``principal``) and
    each principal and secret (level ``secret``), in every bucket that has a read in the
    window. A principal is a name in one cloud. The count is compared with the same key's
    buckets over the ``baseline_days`` before it, read from the hourly history rollup, starting
    at the key's first read in that span. Empty buckets after that first read count as zero.

    A bucket fires when all four conditions are met:

    - the count is at least ``min_count``,
    - the robust score (see :func:`robust_scores`) is above ``threshold``,
    - the count is at least ``min_ratio`` times the baseline median,
    - the key read secrets on at least ``min_history_days`` distinct days of the baseline.

    Keys with less history in at least one of their buckets are counted in
    ``report_["skipped_no_history"]`` (principals) and ``report_["skipped_no_history_secrets"]``
    (principal and secret pairs). A secret-level finding is dropped when its principal fires
    for the same bucket, because the principal's finding lists its top secrets.

    Severity follows the ratio of the count to the median (a median below 1 counts as 1):
    high from ``high_ratio`` (10), medium from ``medium_ratio`` (5), else low.

    Parameters: ``baseline_days`` (30), ``bucket_hours`` (24), ``min_count`` (20),
    ``min_ratio`` (3), ``threshold`` (5), ``min_history_days`` (7), ``levels``
    (["principal", "secret"]), ``top_secrets`` (5), ``medium_ratio`` (5), ``high_ratio`` (10).

    Blind spots: a reader that grows slowly moves its own median. A principal without enough
    history is not scored (``keytrail.first_seen`` covers new readers). KMS Decrypt calls made
    directly by a principal are not counted, because the hourly rollup does not keep
    ``invoked_by`` and cannot tell them from the decrypts that Secrets Manager makes on a
    reader's behalf.

    ATT&CK: T1555.006 (Cloud Secrets Management Stores).
    """

    id: ClassVar[str] = "keytrail.volume_spike"
    mitre: ClassVar[tuple[str, ...]] = ("T1555.006",)
    Params: ClassVar[type[DetectorParams]] = VolumeSpikeParams
    params: VolumeSpikeParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report_: dict[str, int] = {}

    @property
    def lookback(self) -> timedelta:
        """The baseline days plus the bucket that contains the window's first event."""
        return timedelta(days=self.params.baseline_days, hours=self.params.bucket_hours)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per key and bucket whose read count is a spike."""
        params = self.params
        self.report_ = {"skipped_no_history": 0, "skipped_no_history_secrets": 0}
        if not _read_mask(window).any():
            return build_findings([], detector=self)

        counts = self._bucket_counts(window, history)
        rows: list[dict[str, Any]] = []
        fired_principals = np.zeros(0, dtype=np.int64)
        for level in params.levels:
            scored = self._score(level, counts)
            fired = scored[scored["fires"].to_numpy(dtype=bool)]
            if level == "secret":
                # The principal key and bucket of each secret target, on one int64 axis.
                principal_bucket = counts.principal_key(fired["key"].to_numpy()) * (
                    _BUCKETS_PER_KEY
                ) + fired["bucket"].to_numpy(dtype=np.int64)
                fired = fired[~np.isin(principal_bucket, fired_principals)]
            else:
                fired_principals = fired["key"].to_numpy(dtype=np.int64) * _BUCKETS_PER_KEY + fired[
                    "bucket"
                ].to_numpy(dtype=np.int64)
            rows.extend(self._finding_rows(level, fired, counts))
        logger.debug("%s: %s findings, report %s", self.id, len(rows), self.report_)
        return build_findings(rows, detector=self)

    def _bucket_counts(self, window: pd.DataFrame, history: HistoryView) -> _Counts:
        """Return reads per secret key and bucket over the baseline span, and the window reads.

        History before the hour of the window's first event comes from the rollup. From that
        hour on, raw events are read, so history rows that repeat window rows are dropped
        instead of being counted twice.
        """
        params = self.params
        first = window["time"].min()
        boundary = first.floor("h")
        since = first.floor(f"{params.bucket_hours}h") - pd.Timedelta(days=params.baseline_days)
        context = load_context(window, history, first - boundary, _RAW_COLUMNS)
        rolled = history.rollup(since=since, until=boundary, columns=list(_ROLLUP_COLUMNS))
        # Select rows after encoding: taking rows of integer arrays is much cheaper than
        # taking rows of string columns.
        rolled_reads = np.flatnonzero(_read_mask(rolled))
        raw_reads = np.flatnonzero(_read_mask(context))

        # Integer codes for the key columns, shared by rollup and raw rows: grouping and
        # merging on int64 is much faster than on strings.
        codes: dict[str, np.ndarray] = {}
        uniques: dict[str, np.ndarray] = {}
        for name in ("cloud", "principal", "resource"):
            (rolled_codes, raw_codes), uniques[name] = shared_codes([rolled[name], context[name]])
            codes[name] = np.concatenate([rolled_codes[rolled_reads], raw_codes[raw_reads]])
        sizes = {name: max(len(values), 1) for name, values in uniques.items()}
        principal_key = codes["cloud"] * sizes["principal"] + codes["principal"]
        secret_key = principal_key * sizes["resource"] + codes["resource"]

        bucket_us = params.bucket_hours * 3_600_000_000
        raw_times = utc_micros(context["time"])[raw_reads]
        first_times = np.concatenate([utc_micros(rolled["first_time"])[rolled_reads], raw_times])
        last_times = np.concatenate([utc_micros(rolled["last_time"])[rolled_reads], raw_times])
        counts = np.concatenate(
            [
                rolled["count"].to_numpy(dtype=np.int64)[rolled_reads],
                np.ones(len(raw_times), np.int64),
            ]
        )
        bucket = first_times // bucket_us
        buckets = _sum_by_key(secret_key, bucket, counts, first_times, last_times)
        buckets["principal_key"] = buckets["secret_key"] // sizes["resource"]

        in_window = context[IN_WINDOW].to_numpy(dtype=bool)[raw_reads]
        split = len(rolled_reads)
        window_reads = pd.DataFrame(
            {
                "row": raw_reads[in_window],
                "secret_key": secret_key[split:][in_window],
                "principal_key": principal_key[split:][in_window],
                "bucket": raw_times[in_window] // bucket_us,
            }
        )
        logger.debug(
            "%s: %s rollup rows and %s raw reads make %s bucket rows",
            self.id,
            split,
            len(raw_reads),
            len(buckets),
        )
        return _Counts(buckets, window_reads, context, uniques, sizes, bucket_us)

    def _score(self, level: str, counts: _Counts) -> pd.DataFrame:
        """Score every key and bucket that has a read in the window against its baseline."""
        params = self.params
        key_column = f"{level}_key"
        buckets = counts.buckets
        per_bucket = (
            pd.DataFrame(
                {"key": buckets[key_column], "bucket": buckets["bucket"], "count": buckets["count"]}
            )
            .groupby(["key", "bucket"], sort=False)["count"]
            .sum()
            .reset_index()
        )
        window_reads = counts.window_reads
        targets = (
            pd.DataFrame({"key": window_reads[key_column], "bucket": window_reads["bucket"]})
            .drop_duplicates()
            .reset_index(drop=True)
        )
        targets = targets.merge(per_bucket, on=["key", "bucket"], how="left")
        targets["count"] = targets["count"].fillna(0).astype("int64")
        targets["target"] = np.arange(len(targets))

        size = params.baseline_days * 24 // params.bucket_hours
        earlier = targets[["key", "bucket", "target"]].merge(
            per_bucket.rename(columns={"bucket": "earlier"}), on="key", how="inner"
        )
        offset = (earlier["bucket"] - earlier["earlier"]).to_numpy(dtype=np.int64)
        in_span = (offset >= 1) & (offset <= size)
        earlier = earlier[in_span].assign(position=size - offset[in_span])

        buckets_per_day = 24 // params.bucket_hours
        active = earlier[["target"]].assign(day=earlier["earlier"] // buckets_per_day)
        active_days = np.bincount(
            active.drop_duplicates()["target"].to_numpy(dtype=np.int64), minlength=len(targets)
        )
        targets["active_days"] = active_days
        enough = active_days >= params.min_history_days
        self._count_skipped(level, targets["key"].to_numpy()[~enough])

        medians = np.full(len(targets), np.nan)
        mads = np.full(len(targets), np.nan)
        usable = np.flatnonzero(enough)
        step = max(1, _CHUNK_CELLS // size)
        for begin in range(0, len(usable), step):
            chunk = usable[begin : begin + step]
            medians[chunk], mads[chunk] = _baseline_stats(earlier, chunk, size)

        observed = targets["count"].to_numpy(dtype=float)
        scores = np.where(enough, robust_scores(observed, medians, mads), np.nan)
        ratios = observed / np.maximum(np.nan_to_num(medians, nan=0.0), 1.0)
        targets["median"] = medians
        targets["mad"] = mads
        targets["score"] = scores
        targets["ratio"] = ratios
        targets["fires"] = (
            enough
            & (observed >= params.min_count)
            & (np.nan_to_num(scores, nan=-np.inf) > params.threshold)
            & (observed >= params.min_ratio * np.nan_to_num(medians, nan=np.inf))
        )
        fired = targets["fires"].to_numpy(dtype=bool)
        targets["series"] = None
        if fired.any():
            targets.loc[fired, "series"] = pd.Series(
                _baseline_series(earlier, np.flatnonzero(fired), size),
                index=targets.index[fired],
                dtype=object,
            )
        return targets

    def _count_skipped(self, level: str, keys: np.ndarray) -> None:
        name = "skipped_no_history" if level == "principal" else "skipped_no_history_secrets"
        self.report_[name] = len(np.unique(keys))

    def _finding_rows(
        self, level: str, fired: pd.DataFrame, counts: _Counts
    ) -> list[dict[str, Any]]:
        params = self.params
        rows: list[dict[str, Any]] = []
        if fired.empty:
            return rows
        key_column = f"{level}_key"
        fired_keys = fired["key"].to_numpy(dtype=np.int64)
        fired_buckets = fired["bucket"].to_numpy(dtype=np.int64)
        buckets = counts.buckets[np.isin(counts.buckets[key_column].to_numpy(), fired_keys)]
        reads = counts.window_reads
        reads = reads[np.isin(reads[key_column].to_numpy(), fired_keys)]
        bucket_groups = buckets.groupby([key_column, "bucket"], sort=False).indices
        read_groups = reads.groupby([key_column, "bucket"], sort=False).indices
        first_times = buckets["first_time"].to_numpy(dtype=np.int64)
        last_times = buckets["last_time"].to_numpy(dtype=np.int64)
        secret_keys = buckets["secret_key"].to_numpy(dtype=np.int64)
        bucket_counts = buckets["count"].to_numpy(dtype=np.int64)

        # NOTE: one loop iteration per finding with pandas calls; fine for hundreds of
        # findings, slow if one run produces tens of thousands.
        for index, target in enumerate(fired.itertuples(index=False)):
            key, bucket = int(fired_keys[index]), int(fired_buckets[index])
            positions = bucket_groups[(key, bucket)]
            window_rows = reads["row"].to_numpy()[read_groups.get((key, bucket), [])]
            events = counts.context.iloc[window_rows].sort_values("time", kind="stable")

            per_secret = pd.Series(bucket_counts[positions]).groupby(secret_keys[positions]).sum()
            # Ties go by name: the codes follow the order in which the history gave the names,
            # which differs between the Parquet history and a frame of the same events.
            ranked = pd.DataFrame(
                {
                    "name": [counts.resource_name(int(key)) or "" for key in per_secret.index],
                    "count": per_secret.to_numpy(dtype=np.int64),
                }
            ).sort_values(["count", "name"], ascending=[False, True], kind="stable")
            ranked = ranked.head(params.top_secrets)
            top = dict(zip(ranked["name"].tolist(), ranked["count"].tolist(), strict=True))

            principal_key = key
            if level == "secret":
                principal_key = int(counts.principal_key(np.array([key]))[0])
            cloud, principal = counts.principal_names(principal_key)
            names = _Names(
                cloud,
                principal,
                counts.resource_name(key) if level == "secret" else None,
                pd.Timestamp(bucket * counts.bucket_us, unit="us", tz="UTC"),
            )
            row = self._finding_row(level, target, names, events, top, len(per_secret))
            row["first_seen"] = pd.Timestamp(int(first_times[positions].min()), unit="us", tz="UTC")
            row["last_seen"] = pd.Timestamp(int(last_times[positions].max()), unit="us", tz="UTC")
            rows.append(row)
        return rows

    def _finding_row(
        self,
        level: str,
        target: Any,
        names: _Names,
        events: pd.DataFrame,
        top: dict[str, int],
        distinct_secrets: int,
    ) -> dict[str, Any]:
        params = self.params
        width = pd.Timedelta(hours=params.bucket_hours)
        count = int(target.count)
        median = float(target.median)
        mad = float(target.mad)
        ratio = float(target.ratio)
        severity = "low"
        if ratio >= params.high_ratio:
            severity = "high"
        elif ratio >= params.medium_ratio:
            severity = "medium"

        period = _period_text(names.bucket, params.bucket_hours)
        unit = {24: "day", 1: "hour"}.get(params.bucket_hours, f"{params.bucket_hours} hours")
        subject = f"by {names.principal}"
        if level == "secret":
            subject = f"of {names.resource} by {names.principal}"
        title = (
            f"{count} secret reads {subject} {period}, "
            f"{ratio:.0f}x the {params.baseline_days}-day median"
        )
        uids = events["event_uid"].astype(str).tolist()

        return {
            "severity": severity,
            "title": title,
            "principal": names.principal or None,
            "principal_type": _single(events["principal_type"]),
            "cloud": names.cloud or None,
            "account": _single(events["account"]),
            "resources": list(top) if level == "principal" else [names.resource],
            "source_ips": events["source_ip"].dropna().astype(str).unique().tolist(),
            "countries": events["geo_country"].dropna().astype(str).unique().tolist(),
            "event_uids": uids[:_MAX_EVENT_UIDS],
            "event_count": count,
            "dedup_key": stable_key(
                self.id,
                level,
                names.cloud,
                names.principal,
                names.resource or "",
                utc_iso(names.bucket),
            ),
            "evidence": {
                "level": level,
                "bucket_start": utc_iso(names.bucket),
                "bucket_end": utc_iso(names.bucket + width),
                "bucket_hours": params.bucket_hours,
                "count": count,
                "window_reads": len(uids),
                "event_uids_listed": min(len(uids), _MAX_EVENT_UIDS),
                "median": median,
                "mad": mad,
                "score": round(float(target.score), 2),
                "ratio": round(ratio, 2),
                "threshold": params.threshold,
                "min_count": params.min_count,
                "min_ratio": params.min_ratio,
                "distinct_secrets": distinct_secrets,
                "top_secrets": top,
                "operations": to_counts(events["operation"]),
            },
            "baseline": {
                "days": params.baseline_days,
                "bucket_hours": params.bucket_hours,
                "counts": target.series,
                "active_days": int(target.active_days),
                "median": median,
                "mad": mad,
                "summary": (
                    f"{params.baseline_days}-day median {median:g} reads/{unit} "
                    f"(MAD {mad:g}, {int(target.active_days)} active days); {period} {count}"
                ),
            },
        }


def _sum_by_key(
    secret_key: np.ndarray,
    bucket: np.ndarray,
    counts: np.ndarray,
    first_times: np.ndarray,
    last_times: np.ndarray,
) -> pd.DataFrame:
    """Sum ``counts`` and take the min first and max last time per (secret key, bucket).

    Both keys go onto one int64 axis when that cannot overflow, because grouping on one
    integer column is several times faster than on two.
    """
    frame = pd.DataFrame({"count": counts, "first_time": first_times, "last_time": last_times})
    if len(frame) == 0:
        return frame.assign(secret_key=np.zeros(0, np.int64), bucket=np.zeros(0, np.int64))
    low = int(bucket.min())
    width = int(bucket.max()) - low + 1
    aggregations = {
        "count": ("count", "sum"),
        "first_time": ("first_time", "min"),
        "last_time": ("last_time", "max"),
    }
    if int(secret_key.max()) >= (2**62) // width:
        frame["secret_key"] = secret_key
        frame["bucket"] = bucket
        return frame.groupby(["secret_key", "bucket"], sort=False).agg(**aggregations).reset_index()
    frame["key"] = secret_key * width + (bucket - low)
    result = frame.groupby("key", sort=False).agg(**aggregations).reset_index()
    keys = result.pop("key").to_numpy(dtype=np.int64)
    result["secret_key"] = keys // width
    result["bucket"] = keys % width + low
    return result


def _read_mask(frame: pd.DataFrame) -> np.ndarray:
    is_read = (frame["action"] == "read") & (frame["outcome"] == "success")
    return is_read.fillna(False).to_numpy(dtype=bool) & frame["principal"].notna().to_numpy(bool)


def shared_codes(parts: list[pd.Series]) -> tuple[list[np.ndarray], np.ndarray]:
    """Encode several columns with one code table; nulls get a code of their own.

    Each part is factorized on its own (fast on Arrow strings), then the small tables of
    distinct values are merged, so the long string columns are never concatenated.

    Returns:
        The int64 codes of each part, and the distinct values (objects) the codes index.
    """
    local = [pd.factorize(part, use_na_sentinel=False) for part in parts]
    tables = [np.asarray(values, dtype=object) for _, values in local]
    merged, distinct = pd.factorize(
        pd.Series(np.concatenate(tables) if tables else [], dtype=object), use_na_sentinel=False
    )
    codes = []
    offset = 0
    for (part_codes, _), table in zip(local, tables, strict=True):
        codes.append(merged[offset + np.asarray(part_codes, dtype=np.int64)].astype(np.int64))
        offset += len(table)
    return codes, np.asarray(distinct, dtype=object)


def _baseline_stats(
    earlier: pd.DataFrame, chunk: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the median and MAD of the baseline of each target in ``chunk``."""
    matrix, _ = _baseline_matrix(earlier, chunk, size)
    medians = np.nanmedian(matrix, axis=1)
    mads = np.nanmedian(np.abs(matrix - medians[:, None]), axis=1)
    return medians, mads


def _baseline_series(earlier: pd.DataFrame, chunk: np.ndarray, size: int) -> list[list[int]]:
    """Return the bucket counts of the baseline of each target in ``chunk``, oldest first."""
    matrix, starts = _baseline_matrix(earlier, chunk, size)
    return [
        [int(value) for value in row[start:]] for row, start in zip(matrix, starts, strict=True)
    ]


def _baseline_matrix(
    earlier: pd.DataFrame, chunk: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the baselines of the targets in ``chunk`` as rows of ``size`` buckets.

    Buckets before the key's first read in the span are not part of a baseline (NaN); later
    empty buckets count as zero. The second array contains the position of each first read.
    """
    rows = earlier[np.isin(earlier["target"].to_numpy(), chunk)]
    row_of = np.full(int(chunk.max()) + 1, -1, dtype=np.int64)
    row_of[chunk] = np.arange(len(chunk))
    row_index = row_of[rows["target"].to_numpy(dtype=np.int64)]
    positions = rows["position"].to_numpy(dtype=np.int64)
    matrix = np.zeros((len(chunk), size))
    np.add.at(matrix, (row_index, positions), rows["count"].to_numpy(dtype=float))
    starts = np.full(len(chunk), size, dtype=np.int64)
    np.minimum.at(starts, row_index, positions)
    matrix[np.arange(size)[None, :] < starts[:, None]] = np.nan
    return matrix, starts


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _single(values: pd.Series) -> str | None:
    distinct = values.dropna().astype(str).unique()
    return str(distinct[0]) if len(distinct) == 1 else None


def _period_text(bucket: pd.Timestamp, bucket_hours: int) -> str:
    if bucket_hours == 24:
        return f"on {bucket.strftime('%Y-%m-%d')}"
    end = bucket + pd.Timedelta(hours=bucket_hours)
    return f"on {bucket.strftime('%Y-%m-%d %H:%M')}-{end.strftime('%H:%M')} UTC"
