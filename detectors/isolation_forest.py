"""``keytrail.isolation_forest``: principal-hours whose access pattern is unlike the principal's own.

Each principal-hour becomes a feature vector (reads, distinct secrets, failures, addresses,
countries, networks, the share of reads of secrets new to the principal, the hour of the week).
Each feature is turned into a robust z-score against the same principal's medians, so a busy
service is not unusual for being busy, and one scikit-learn ``IsolationForest`` learns from the
z-scores of every principal's history. The rollup of the history is enough for every feature.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Final, Literal, Self

import numpy as np
import pandas as pd
import sklearn
from pydantic import Field, field_validator
from sklearn.ensemble import IsolationForest

from detectors._common import distinct_lists, iter_rows, read_mask, utc_iso
from detectors.base import (
    DetectorParams,
    HistoryView,
    StatisticalDetector,
    StatisticalParams,
    build_findings,
    project_rollup,
    register,
    rollup_events,
)
from pipeline.schema import PRINCIPAL_TYPES

__all__ = ["FEATURES", "IsolationForestDetector", "IsolationForestParams", "principal_hours"]

logger = logging.getLogger(__name__)

Feature = Literal[
    "reads",
    "distinct_secrets",
    "failures",
    "distinct_ips",
    "countries",
    "asns",
    "new_secret_share",
    "hour_sin",
    "hour_cos",
]
FEATURES: Final[tuple[Feature, ...]] = (
    "reads",
    "distinct_secrets",
    "failures",
    "distinct_ips",
    "countries",
    "asns",
    "new_secret_share",
    "hour_sin",
    "hour_cos",
)
"""Every feature a principal-hour can have; counts enter the model as ``log1p`` of the count."""

_COUNT_FEATURES: Final = frozenset(
    {"reads", "distinct_secrets", "failures", "distinct_ips", "countries", "asns"}
)
# Smallest scale of each feature's z-score, so a principal whose value never varied (MAD 0)
# does not turn a difference of one into an infinite z-score. Count features are in log1p
# units, where 0.5 is a change of about 65%.
_SCALE_FLOOR: Final = {"new_secret_share": 0.1, "hour_sin": 0.25, "hour_cos": 0.25} | {
    name: 0.5 for name in _COUNT_FEATURES
}
# Consistency constant that makes the MAD estimate the standard deviation of normal data.
_MAD_TO_SIGMA: Final = 1.4826
_ROLLUP_COLUMNS: Final = (
    "hour",
    "principal",
    "principal_type",
    "resource",
    "action",
    "outcome",
    "invoked_by",
    "source_ip",
    "geo_country",
    "asn",
    "count",
)
_STATE_VERSION: Final = 1
_DAY_US: Final = 86_400_000_000


class IsolationForestParams(StatisticalParams):
    """Parameters of :class:`IsolationForestDetector`."""

    features: list[Feature] = Field(default_factory=lambda: list(FEATURES))
    baseline_days: int = Field(default=14, ge=1, le=366)
    contamination: float = Field(default=0.005, gt=0, le=0.5)
    n_estimators: int = Field(default=100, ge=10, le=1000)
    max_fit_vectors: int = Field(default=20_000, ge=1000)
    random_state: int = 0
    jitter: float = Field(default=1.0, ge=0)
    min_history_hours: int = Field(default=24, ge=1)
    min_events: int = Field(default=10, ge=1)
    min_feature_z: float = Field(default=3.0, gt=0)
    top_features: int = Field(default=3, ge=1)
    principal_types: list[str] | None = None
    severity: Literal["low", "medium", "high"] = "medium"

    @field_validator("features")
    @classmethod
    def _features(cls, value: list[Feature]) -> list[Feature]:
        if not value:
            raise ValueError("features is empty; name at least one, e.g. [reads]")
        if len(set(value)) != len(value):
            raise ValueError(f"features lists a feature twice: {value}")
        return value

    @field_validator("principal_types")
    @classmethod
    def _types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = sorted(set(value) - set(PRINCIPAL_TYPES))
        if unknown:
            raise ValueError(
                f"unknown principal types {unknown}; expected some of {PRINCIPAL_TYPES}"
            )
        if not value:
            raise ValueError("principal_types is empty, so the detector could never fire")
        return value


def principal_hours(
    rollup: pd.DataFrame, known_pairs: set[tuple[str, str]] | None = None
) -> pd.DataFrame:
    """Compute the features of each principal-hour from hourly rollup rows.

    ``rollup`` needs the columns of ``_ROLLUP_COLUMNS``. A read of a secret is new when the
    (principal, secret) pair is not in ``known_pairs`` and this is the first hour the rollup
    shows it. With ``known_pairs`` None (the history, in a fit) a pair is new in its first
    hour unless that hour is within a day of the principal's first hour.

    Returns:
        One row per principal and hour with ``principal``, ``hour``, ``events`` (rows of any
        action) and every feature of :data:`FEATURES`, sorted by principal and hour.
    """
    rows = rollup[rollup["principal"].notna().to_numpy(dtype=bool)]
    columns = ["principal", "hour", "events", *FEATURES]
    if rows.empty:
        return pd.DataFrame({name: pd.Series([], dtype=float) for name in columns}).astype(
            {"principal": object, "hour": "datetime64[us, UTC]", "events": "int64"}
        )
    principal_code, principals = pd.factorize(rows["principal"], sort=True)
    hour = _hour_numbers(rows["hour"])
    hour_code, hours = pd.factorize(hour, sort=True)
    # Integer keys sort like (principal, hour), and factorizing them is fast.
    group, keys = pd.factorize(principal_code.astype(np.int64) * len(hours) + hour_code, sort=True)
    size = len(keys)
    count = rows["count"].to_numpy(np.int64)
    is_read = read_mask(rows).to_numpy(dtype=bool)
    is_failure = (rows["outcome"].astype(object) == "failure").fillna(False).to_numpy(dtype=bool)

    features = pd.DataFrame(
        {
            "principal": np.asarray(principals, dtype=object)[keys // len(hours)],
            "hour": pd.to_datetime(hours[keys % len(hours)], unit="us", utc=True).as_unit("us"),
        }
    )
    features["events"] = np.bincount(group, weights=count, minlength=size).astype(np.int64)
    features["reads"] = np.bincount(group, weights=count * is_read, minlength=size)
    features["failures"] = np.bincount(group, weights=count * is_failure, minlength=size)
    resource_code = pd.factorize(rows["resource"])[0]
    features["distinct_secrets"] = _distinct_counts(
        group, np.where(is_read, resource_code, -1), size
    )
    features["distinct_ips"] = _distinct_counts(group, pd.factorize(rows["source_ip"])[0], size)
    features["countries"] = _distinct_counts(group, pd.factorize(rows["geo_country"])[0], size)
    features["asns"] = _distinct_counts(group, pd.factorize(rows["asn"])[0], size)

    new = _new_secret_reads(rows, principal_code, hour, is_read, known_pairs)
    new_reads = np.bincount(group, weights=count * new, minlength=size)
    reads = features["reads"].to_numpy()
    features["new_secret_share"] = np.divide(new_reads, reads, out=np.zeros(size), where=reads > 0)
    hour_index = features["hour"]
    hour_of_week = (hour_index.dt.day_of_week * 24 + hour_index.dt.hour).to_numpy(np.float64)
    angle = 2 * np.pi * hour_of_week / 168
    features["hour_sin"] = np.sin(angle)
    features["hour_cos"] = np.cos(angle)
    return features[columns]


def _distinct_counts(group: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """Count the distinct non-negative ``codes`` (factorized values, -1 for null) per group."""
    present = codes >= 0
    width = int(codes.max()) + 1 if present.any() else 1
    pairs = pd.unique(group[present].astype(np.int64) * width + codes[present])
    return np.bincount(pairs // width, minlength=size).astype(np.float64)


def _hour_numbers(hours: pd.Series) -> np.ndarray:
    """Return UTC times as int64 microseconds since the epoch."""
    return hours.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]").view("int64")


def _new_secret_reads(
    rows: pd.DataFrame,
    principal_code: np.ndarray,
    hour: np.ndarray,
    is_read: np.ndarray,
    known_pairs: set[tuple[str, str]] | None,
) -> np.ndarray:
    """Return 1.0 for read rows of a (principal, secret) pair in its first hour, else 0.0."""
    resource_code, resources = pd.factorize(rows["resource"])
    pair_code, pair_keys = pd.factorize(
        principal_code.astype(np.int64) * (len(resources) + 1) + resource_code
    )
    read_hours = pd.Series(np.where(is_read, hour, np.iinfo(np.int64).max))
    first_hour = read_hours.groupby(pair_code).transform("min").to_numpy()
    new = is_read & (hour == first_hour) & (resource_code >= 0)
    if known_pairs is None:
        # In the history every pair has a first hour. Pairs first read on the principal's
        # first day were most likely read before the history starts, so they are not new.
        first_of_principal = pd.Series(hour).groupby(principal_code).transform("min").to_numpy()
        new &= hour >= first_of_principal + _DAY_US
    elif known_pairs:
        # One set lookup per distinct pair, not per row.
        principals = np.asarray(rows["principal"].astype(object))
        first_row = pd.Series(np.arange(len(rows))).groupby(pair_code).first().to_numpy()
        resource_names = np.asarray(rows["resource"].astype(object))
        known = np.array(
            [
                (principals[row], resource_names[row]) in known_pairs
                for row in first_row[: len(pair_keys)]
            ],
            dtype=bool,
        )
        new &= ~known[pair_code]
    return new.astype(np.float64)


@register
class IsolationForestDetector(StatisticalDetector):
    """Principal-hours that an isolation forest finds unlike the principal's own history.

    Fitting reads ``baseline_days`` of the history's hourly rollup, builds one vector of
    ``features`` per principal-hour, and scales each feature per principal to a robust
    z-score, ``(value - median) / max(1.4826 * MAD, floor)``, with counts as ``log1p``. A
    principal needs ``min_history_hours`` active hours to be judged; the others are counted
    in ``report_["skipped_no_history"]``. The forest (scikit-learn ``IsolationForest``,
    ``n_estimators`` trees, ``random_state`` fixed, ``contamination`` setting the cut) learns
    from at most ``max_fit_vectors`` vectors drawn with the same seed.

    :meth:`score` is the negated ``score_samples`` of the forest: about 0.5 for ordinary
    vectors, closer to 1 for anomalies. A principal-hour of the window fires when the forest
    flags it and it has at least ``min_events`` events. One of its features must also be at
    least ``min_feature_z`` robust deviations above the principal's median, so an unusually
    quiet hour does not fire. For the hour of the week the distance counts in either direction.

    The fitted state (medians, scales, known secret pairs and the forest) goes to the state
    database. The forest is pickled and base64 encoded, so :meth:`set_state` must only get
    states that :meth:`get_state` wrote; the engine reads them from its own state database.

    A window that spans several UTC days is judged walk-forward (see :meth:`detect`), so a
    principal that is new in a month-long backfill is judged once it has enough active hours.

    Blind spot: a slow reader that stays within its own spread is the concern of the volume
    and first-seen detectors.

    ATT&CK: T1555.006 (Cloud Secrets Management Stores), T1078.004 (Cloud Accounts).
    """

    id: ClassVar[str] = "keytrail.isolation_forest"
    mitre: ClassVar[tuple[str, ...]] = ("T1555.006", "T1078.004")
    Params: ClassVar[type[DetectorParams]] = IsolationForestParams
    params: IsolationForestParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.fitted_through_: pd.Timestamp | None = None
        self.principals_: dict[str, int] = {}
        self.medians_: np.ndarray = np.zeros((0, len(self.params.features)))
        self.scales_: np.ndarray = np.zeros((0, len(self.params.features)))
        self.history_hours_: np.ndarray = np.zeros(0, dtype=np.int64)
        self.known_pairs_: set[tuple[str, str]] = set()
        self.model_: IsolationForest | None = None
        self.fitted_vectors_ = 0
        self.report_: dict[str, Any] = {}

    @property
    def lookback(self) -> timedelta:
        """The baseline the forest learns from."""
        return timedelta(days=self.params.baseline_days)

    def fit(self, history: HistoryView, now: pd.Timestamp) -> Self:
        """Learn per-principal scales and the forest from the rollup of ``baseline_days`` before ``now``."""
        rollup = history.rollup(since=now - self.lookback, until=now, columns=list(_ROLLUP_COLUMNS))
        return self._fit_rollup(rollup, now)

    def _fit_rollup(self, rollup: pd.DataFrame, now: pd.Timestamp) -> Self:
        """Fit on ``rollup``, the hourly rollup of the events in ``[now - lookback, now)``."""
        params = self.params
        rollup = self._keep_types(rollup)
        hours = principal_hours(rollup)
        names = list(params.features)
        counts = hours.groupby("principal", sort=True).size()
        eligible = counts[counts >= params.min_history_hours]
        self.principals_ = {str(name): index for index, name in enumerate(eligible.index)}
        self.history_hours_ = eligible.to_numpy(np.int64)
        self.known_pairs_ = _read_pairs(rollup)
        self.fitted_through_ = pd.Timestamp(now)

        hours = hours[hours["principal"].isin(self.principals_).to_numpy(dtype=bool)]
        if hours.empty:
            self.medians_ = np.zeros((0, len(names)))
            self.scales_ = np.zeros((0, len(names)))
            self.model_ = None
            self.fitted_vectors_ = 0
            logger.info("%s: no principal has %s active hours", self.id, params.min_history_hours)
            return self
        values = _transform(hours, names)
        codes = hours["principal"].map(self.principals_).to_numpy(np.int64)
        self.medians_, self.scales_ = _robust_scales(values, codes, len(self.principals_), names)
        z = (values - self.medians_[codes]) / self.scales_[codes]
        if len(z) > params.max_fit_vectors:
            pick = np.random.default_rng(params.random_state).choice(
                len(z), params.max_fit_vectors, replace=False
            )
            z = z[np.sort(pick)]
        # A forest can only split a feature that varies in its training vectors, and most
        # features of a steady principal sit at z = 0. Gaussian noise of scale ``jitter`` gives
        # every feature a spread, so a value far outside it is isolated quickly.
        rng = np.random.default_rng(params.random_state)
        z = z + rng.normal(0.0, params.jitter, size=z.shape)
        model = IsolationForest(
            n_estimators=params.n_estimators,
            contamination=params.contamination,
            random_state=params.random_state,
        )
        self.model_ = model.fit(z)
        self.fitted_vectors_ = len(z)
        logger.info(
            "%s: fitted on %s vectors of %s principals",
            self.id,
            len(z),
            len(self.principals_),
        )
        return self

    def score(self, window: pd.DataFrame) -> pd.Series:
        """Return the anomaly score of each principal-hour of ``window`` (higher: more anomalous).

        ``window`` is a frame of :func:`principal_hours`; rows of principals without enough
        history, or any row before a fit, score NaN.
        """
        result = pd.Series(np.nan, index=window.index, dtype=np.float64)
        if self.model_ is None or window.empty:
            return result
        z, known = self._z_scores(window)
        if known.any():
            result[known] = -self.model_.score_samples(z[known])
        return result

    def get_state(self) -> dict[str, Any]:
        """Return the fitted state as a JSON-ready dict; the forest is pickled and base64 encoded."""
        model = None
        if self.model_ is not None:
            model = base64.b64encode(pickle.dumps(self.model_)).decode("ascii")
        return {
            "version": _STATE_VERSION,
            "sklearn": sklearn.__version__,
            "fitted_through": None
            if self.fitted_through_ is None
            else utc_iso(self.fitted_through_),
            "features": list(self.params.features),
            "principals": list(self.principals_),
            "medians": self.medians_.tolist(),
            "scales": self.scales_.tolist(),
            "history_hours": self.history_hours_.tolist(),
            "known_pairs": sorted([principal, secret] for principal, secret in self.known_pairs_),
            "fitted_vectors": self.fitted_vectors_,
            "model": model,
        }

    def set_state(self, state: dict[str, Any]) -> Self:
        """Restore a state from :meth:`get_state`.

        Raises:
            ValueError: the state was written by another state version, another scikit-learn
                version or for other features; the caller fits again.
        """
        if state.get("version") != _STATE_VERSION or state.get("sklearn") != sklearn.__version__:
            raise ValueError(
                f"state version {state.get('version')} from scikit-learn {state.get('sklearn')}, "
                f"expected {_STATE_VERSION} from {sklearn.__version__}"
            )
        if state["features"] != list(self.params.features):
            raise ValueError(f"state features {state['features']} differ from the parameters")
        width = len(self.params.features)
        self.principals_ = {str(name): index for index, name in enumerate(state["principals"])}
        self.medians_ = np.asarray(state["medians"], dtype=np.float64).reshape(-1, width)
        self.scales_ = np.asarray(state["scales"], dtype=np.float64).reshape(-1, width)
        self.history_hours_ = np.asarray(state["history_hours"], dtype=np.int64)
        self.known_pairs_ = {(str(pair[0]), str(pair[1])) for pair in state["known_pairs"]}
        self.fitted_vectors_ = int(state["fitted_vectors"])
        model = state["model"]
        # The pickle comes from this detector's own get_state, stored in keytrail's state.db.
        self.model_ = None if model is None else pickle.load(io.BytesIO(base64.b64decode(model)))
        fitted = state["fitted_through"]
        self.fitted_through_ = None if fitted is None else pd.Timestamp(fitted)
        return self

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per principal-hour of ``window`` that the forest flags.

        A window whose events fall on one UTC day is judged by one fit on the history before
        its first event. A window over several UTC days is judged walk-forward, one fit per
        day: each later day is judged by a fit on the history and the window's earlier days
        before that day's first event, as ``keytrail backtest`` fits a fresh detector each day.
        So a first run over a month finds what daily runs find. The fitted state left at the
        end is the fit of the last day that had events to judge.
        """
        self.report_ = {
            "skipped_no_history": 0,
            "principal_hours_scored": 0,
            "walk_forward_fits": 0,
        }
        window = window[window["time"].notna().to_numpy(dtype=bool)]
        if window.empty:
            return build_findings([], detector=self)
        starts = _day_starts(window["time"])
        self.ensure_fitted(history, starts[0])

        events = self._keep_types(window)
        rollup = project_rollup(rollup_events(events), list(_ROLLUP_COLUMNS))
        days = rollup["hour"].dt.floor("D")
        earlier = _EarlierRollup(history, starts[0], self.lookback)
        # pipeline.engine stores the state after detect, so the last day's fit is kept.
        judged = []
        skipped: set[str] = set()
        for number, start in enumerate(starts):
            day = start.floor("D")
            rows = rollup[(days == day).to_numpy(dtype=bool)]
            if rows.empty:
                # Every event of the day is of a principal type this detector does not judge.
                continue
            if number > 0:
                before = rollup[(days < day).to_numpy(dtype=bool)]
                self._fit_rollup(earlier.before(start, events, before), start)
                self.report_["walk_forward_fits"] += 1
            hours = principal_hours(rows, self.known_pairs_)
            known = hours["principal"].isin(self.principals_).to_numpy(dtype=bool)
            skipped.update(hours.loc[~known, "principal"])
            if self.model_ is None or not known.any():
                continue
            hours = hours[known].reset_index(drop=True)
            self.report_["principal_hours_scored"] += len(hours)
            flagged = self._flagged_hours(hours)
            if len(flagged):
                judged.append(flagged)
        self.report_["skipped_no_history"] = len(skipped)

        if not judged:
            return build_findings([], detector=self)
        chosen = pd.concat(judged, ignore_index=True)
        rows = _finding_rows(chosen, _window_details(events, chosen), self.params)
        logger.debug("%s: %s principal-hours flagged", self.id, len(rows))
        return build_findings(rows, detector=self)

    def _flagged_hours(self, hours: pd.DataFrame) -> pd.DataFrame:
        """Return the principal-hours that fire, with their score and top features."""
        assert self.model_ is not None
        params = self.params
        names = list(params.features)
        z, _ = self._z_scores(hours)
        samples = self.model_.score_samples(z)
        # The same cut as IsolationForest.predict, without scoring twice.
        flagged = samples < self.model_.offset_
        upward = np.array([name not in ("hour_sin", "hour_cos") for name in names])
        pushed = np.where(upward, z, np.abs(z))
        strong = pushed.max(axis=1) >= params.min_feature_z
        enough = hours["events"].to_numpy() >= params.min_events
        fire = flagged & strong & enough

        chosen = hours[fire].reset_index(drop=True)
        chosen["score"] = -samples[fire]
        chosen["threshold"] = -float(self.model_.offset_)
        codes = chosen["principal"].map(self.principals_).to_numpy(np.int64)
        top = np.argsort(-pushed[fire], axis=1)[:, : params.top_features]
        values = _transform(chosen, names)
        chosen_z = z[fire]
        chosen["top"] = [
            [
                _feature_report(
                    names[column],
                    float(values[row, column]),
                    float(self.medians_[codes[row], column]),
                    float(chosen_z[row, column]),
                )
                for column in top[row]
            ]
            for row in range(len(chosen))
        ]
        chosen["history_hours"] = self.history_hours_[codes]
        return chosen

    def _keep_types(self, frame: pd.DataFrame) -> pd.DataFrame:
        types = self.params.principal_types
        if types is None:
            return frame
        return frame[frame["principal_type"].isin(types).fillna(False).to_numpy(dtype=bool)]

    def _z_scores(self, hours: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Return the z-scores of ``hours`` (zeros for unknown principals) and the known mask."""
        names = list(self.params.features)
        codes = hours["principal"].map(self.principals_)
        known = codes.notna().to_numpy(dtype=bool)
        index = codes.fillna(0).to_numpy(np.int64)
        values = _transform(hours, names)
        if len(self.principals_) == 0:
            return np.zeros_like(values), known
        z = (values - self.medians_[index]) / self.scales_[index]
        z[~known] = 0.0
        return z, known


def _day_starts(times: pd.Series) -> list[pd.Timestamp]:
    """Return the earliest of ``times`` in each UTC day, in time order."""
    # Group by the Series itself: ``to_numpy()`` of zone-aware times is one Python object per row.
    first = times.groupby(times.dt.floor("D")).min().sort_index()
    return [pd.Timestamp(value) for value in first]


def _rollup_since(
    rollup: pd.DataFrame,
    since: pd.Timestamp,
    cut_hour: Callable[[pd.Timestamp, pd.Timestamp], pd.DataFrame],
) -> list[pd.DataFrame]:
    """Return the parts of ``rollup`` for events at or after ``since``.

    Rows of whole hours are kept as they are. The hour that ``since`` cuts cannot be split
    from its rollup rows, so ``cut_hour(since, end_of_that_hour)`` rolls it up from raw events.
    """
    whole = since.ceil("h")
    parts = [rollup[(rollup["hour"] >= whole).to_numpy(dtype=bool)]]
    if since < whole:
        parts.insert(0, cut_hour(since, whole))
    return parts


class _EarlierRollup:
    """The rollup a walk-forward fit learns from: the stored history, then earlier window days.

    The stored history before the window is read once, over the look-back of the window's
    first day. A later day's look-back starts later, so its rollup is cut from that read.
    """

    def __init__(self, history: HistoryView, window_start: pd.Timestamp, lookback: timedelta):
        self.history = history
        self.window_start = window_start
        self.lookback = pd.Timedelta(lookback)
        self._stored: pd.DataFrame | None = None

    def before(
        self, start: pd.Timestamp, events: pd.DataFrame, window_rollup: pd.DataFrame
    ) -> pd.DataFrame:
        """Return the rollup of the events in ``[start - lookback, start)``.

        ``start`` is the first window event of its UTC day. ``events`` are the window's
        events, and ``window_rollup`` is the rollup of those before ``start``'s day.
        """
        columns = list(_ROLLUP_COLUMNS)
        since = start - self.lookback
        if since < self.window_start:
            parts = [*self._stored_since(since, columns), window_rollup]
        else:

            def window_hour(first: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
                times = events["time"]
                inside = ((times >= first) & (times < end)).to_numpy(dtype=bool)
                return project_rollup(rollup_events(events[inside]), columns)

            parts = _rollup_since(window_rollup, since, window_hour)
        parts = [part for part in parts if len(part)]
        if not parts:
            return window_rollup.iloc[:0]
        return pd.concat(parts, ignore_index=True)

    def _stored_since(self, since: pd.Timestamp, columns: list[str]) -> list[pd.DataFrame]:
        if self._stored is None:
            self._stored = self.history.rollup(
                since=self.window_start - self.lookback, until=self.window_start, columns=columns
            )

        def stored_hour(first: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
            until = min(end, self.window_start)
            return self.history.rollup(since=first, until=until, columns=columns)

        return _rollup_since(self._stored, since, stored_hour)


def _read_pairs(rollup: pd.DataFrame) -> set[tuple[str, str]]:
    """Return the distinct (principal, secret) pairs of the read rows of ``rollup``."""
    reads = rollup[read_mask(rollup).to_numpy(dtype=bool)]
    principal_code, principals = pd.factorize(reads["principal"])
    resource_code, resources = pd.factorize(reads["resource"])
    present = (principal_code >= 0) & (resource_code >= 0)
    width = len(resources)
    keys = pd.unique(principal_code[present].astype(np.int64) * width + resource_code[present])
    principal_names = np.asarray(principals, dtype=object)[keys // max(width, 1)]
    resource_names = np.asarray(resources, dtype=object)[keys % max(width, 1)]
    return set(zip(principal_names.tolist(), resource_names.tolist(), strict=True))


def _transform(hours: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Return the model's view of the features: ``log1p`` of counts, other features as they are."""
    columns = [
        np.log1p(hours[name].to_numpy(np.float64))
        if name in _COUNT_FEATURES
        else hours[name].to_numpy(np.float64)
        for name in names
    ]
    return np.column_stack(columns) if columns else np.zeros((len(hours), 0))


def _robust_scales(
    values: np.ndarray, codes: np.ndarray, size: int, names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-principal medians and robust scales of each feature column."""
    frame = pd.DataFrame(values)
    medians = frame.groupby(codes).median().reindex(range(size)).to_numpy()
    deviations = pd.DataFrame(np.abs(values - medians[codes]))
    mad = deviations.groupby(codes).median().reindex(range(size)).to_numpy()
    floors = np.array([_SCALE_FLOOR[name] for name in names])
    return medians, np.maximum(_MAD_TO_SIGMA * mad, floors)


def _feature_report(name: str, value: float, median: float, z: float) -> dict[str, Any]:
    """Describe one feature of a flagged hour in its own units, against the principal's median."""
    shown: float
    if name in _COUNT_FEATURES:
        shown, typical = round(float(np.expm1(value))), round(float(np.expm1(median)), 1)
    else:
        shown, typical = round(value, 3), round(median, 3)
    return {"feature": name, "value": shown, "typical": typical, "z": round(z, 1)}


def _window_details(events: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Collect the event ids, secrets, addresses and countries of each chosen principal-hour."""
    keyed = events.assign(hour=events["time"].dt.floor("h"))
    keys = chosen[["principal", "hour"]].assign(_row=np.arange(len(chosen)))
    keyed = keyed.merge(keys, on=["principal", "hour"], how="inner")
    group = keyed["_row"].to_numpy(np.int64)
    size = len(chosen)
    details = pd.DataFrame(index=range(size))
    for name, column in (
        ("event_uids", "event_uid"),
        ("resources", "resource"),
        ("source_ips", "source_ip"),
        ("countries", "geo_country"),
    ):
        details[name] = distinct_lists(group, keyed[column], size)
    grouped = keyed.groupby("_row", sort=True)
    details["first_seen"] = grouped["time"].min().reindex(range(size)).to_numpy()
    details["last_seen"] = grouped["time"].max().reindex(range(size)).to_numpy()
    for name in ("principal_type", "cloud", "account"):
        details[name] = grouped[name].first().reindex(range(size)).astype(object).to_numpy()
    return details


def _finding_rows(
    chosen: pd.DataFrame, details: pd.DataFrame, params: IsolationForestParams
) -> list[dict[str, Any]]:
    rows = []
    for hour, extra in zip(iter_rows(chosen), iter_rows(details), strict=True):
        top: list[dict[str, Any]] = hour.top
        described = "; ".join(
            f"{item['feature']} {item['value']} against {item['typical']}" for item in top
        )
        when = pd.Timestamp(hour.hour).strftime("%Y-%m-%d %H:00 UTC")
        reads = round(float(hour.reads))
        secrets = round(float(hour.distinct_secrets))
        rows.append(
            {
                "severity": params.severity,
                "title": (
                    f"{hour.principal} accessed secrets unlike its own history at {when} "
                    f"({reads} reads, {secrets} secrets)"
                ),
                "principal": hour.principal,
                "principal_type": extra.principal_type,
                "cloud": extra.cloud,
                "account": extra.account,
                "resources": extra.resources,
                "source_ips": extra.source_ips,
                "countries": extra.countries,
                "first_seen": extra.first_seen,
                "last_seen": extra.last_seen,
                "event_uids": extra.event_uids,
                "evidence": {
                    "hour": utc_iso(hour.hour),
                    "events": int(hour.events),
                    "reads": reads,
                    "distinct_secrets": secrets,
                    "failures": round(float(hour.failures)),
                    "distinct_ips": round(float(hour.distinct_ips)),
                    "countries": round(float(hour.countries)),
                    "asns": round(float(hour.asns)),
                    "new_secret_share": round(float(hour.new_secret_share), 3),
                    "anomaly_score": round(float(hour.score), 3),
                    "threshold": round(float(hour.threshold), 3),
                    "top_features": top,
                },
                "baseline": {
                    "days": params.baseline_days,
                    "active_hours": int(hour.history_hours),
                    "typical": {item["feature"]: item["typical"] for item in top},
                    "summary": (
                        f"this hour against the {params.baseline_days}-day median of "
                        f"{int(hour.history_hours)} active hours: {described}"
                    ),
                },
            }
        )
    return rows
