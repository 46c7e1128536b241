"""Location detectors: ``keytrail.new_country`` and ``keytrail.impossible_travel``.

Both use the GeoIP enrichment of public caller addresses (``source_kind`` public). GeoIP is
accurate to the country for most addresses but often wrong to the city, and it places a caller
where its egress is: VPNs, corporate proxies, mobile carriers and shared cloud egress move
people, and a VPN user can look like an attacker or hide one.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Any, ClassVar, Final

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from detectors._common import (
    IN_WINDOW,
    count_in_range,
    distinct_lists,
    haversine_km,
    iter_rows,
    load_context,
    located_addresses,
    stable_key,
    to_counts,
    utc_iso,
    utc_micros,
)
from detectors.base import (
    SEVERITIES,
    Detector,
    DetectorParams,
    HistoryView,
    build_findings,
    register,
)

__all__ = [
    "ImpossibleTravelDetector",
    "ImpossibleTravelParams",
    "NewCountryDetector",
    "NewCountryParams",
]

logger = logging.getLogger(__name__)

HALF_EARTH_CIRCUMFERENCE_KM: Final = 20_037.5
_DAY_US: Final = 86_400_000_000
_GEO_COLUMNS: Final = (
    "time",
    "cloud",
    "operation",
    "outcome",
    "principal",
    "principal_type",
    "principal_arn",
    "account",
    "source_ip",
    "source_kind",
    "geo_country",
    "geo_city",
    "geo_lat",
    "geo_lon",
    "asn",
    "as_org",
)


def _distinct(values: pd.Series) -> list[str]:
    return values.dropna().astype(str).unique().tolist()


def _counts_per_group(grouped: Any) -> list[dict[str, int]]:
    """Count the values of each group of a ``SeriesGroupBy``, in group order.

    ``agg(to_counts)`` is not used because pandas turns the dicts it returns into a pyarrow
    struct column on Arrow-backed frames, which gives every group every key (missing ones as
    null) and float counts.
    """
    return [to_counts(values) for _, values in grouped]


def _objects(values: list[Any], index: pd.Index) -> pd.Series:
    return pd.Series(values, index=index, dtype=object)


def _public_geolocated(context: pd.DataFrame) -> pd.Series:
    # Comparing the Arrow-backed strings directly avoids a Python string per row.
    public = (context["source_kind"] == "public").fillna(False).astype(bool)
    return public & context["principal"].notna() & context["geo_country"].notna()


class NewCountryParams(DetectorParams):
    """Parameters of :class:`NewCountryDetector`."""

    lookback_days: int = Field(default=30, ge=1, le=366)
    min_history_days: int = Field(default=7, ge=0)
    min_history_events: int = Field(default=5, ge=0)
    deny_countries: list[str] = Field(default_factory=list)
    severity: str = "medium"

    @field_validator("deny_countries")
    @classmethod
    def _countries(cls, value: list[str]) -> list[str]:
        codes = [code.strip().upper() for code in value]
        bad = [code for code in codes if len(code) != 2 or not code.isalpha()]
        if bad:
            raise ValueError(f"invalid country codes {bad}; expected ISO 3166-1 alpha-2 such as RU")
        return codes

    @field_validator("severity")
    @classmethod
    def _severity(cls, value: str) -> str:
        if value not in SEVERITIES:
            raise ValueError(f"invalid severity {value!r}; expected one of {SEVERITIES}")
        return value


@register
class NewCountryDetector(Detector):
    """A principal acting from a country not seen for it in the look-back.

    Only successful or failed actions from public addresses with a GeoIP country count. An
    event is new when the principal has no event from that country in the ``lookback_days``
    before it. It fires only after a learning period: the principal needs geolocated activity
    on at least ``min_history_days`` distinct UTC days before the event's day and at least
    ``min_history_events`` events in the look-back. Activity from ``deny_countries`` fires
    high regardless of history. One finding per principal and country per run, covering the
    window events from that country from the first flagged one on.

    Parameters: ``lookback_days`` (30), ``min_history_days`` (7), ``min_history_events`` (5),
    ``deny_countries`` ([]), ``severity`` ("medium").

    Blind spots: see the module docstring (VPNs, proxies, GeoIP errors). An attacker in the
    victim's own country is invisible here.

    ATT&CK: T1078.004 (Cloud Accounts).
    """

    id: ClassVar[str] = "keytrail.new_country"
    mitre: ClassVar[tuple[str, ...]] = ("T1078.004",)
    Params: ClassVar[type[DetectorParams]] = NewCountryParams
    params: NewCountryParams

    @property
    def lookback(self) -> timedelta:
        """The look-back of known countries."""
        return timedelta(days=self.params.lookback_days)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per principal and new or denied country in ``window``."""
        params = self.params
        keep = _public_geolocated(window) & window["outcome"].isin(["success", "failure"])
        rows = np.flatnonzero(keep.to_numpy(dtype=bool))
        if len(rows) == 0:
            return build_findings([], detector=self)
        # Everything up to the flagged events works on int arrays of window positions, times,
        # principals and countries. Object columns of the 1M-event window and the 2.1M rollup
        # rows of benchmarks/detect.py cost most of a second.
        all_times = utc_micros(window["time"])
        rows = rows[np.argsort(all_times[rows], kind="stable")]
        times = all_times[rows]
        codes, principals = _first_seen_codes(window["principal"], rows)
        known = self._known(history, pd.Timestamp(times[0], unit="us", tz="UTC"))
        known_raw, known_principals = pd.factorize(known["principal"])
        known_codes = _lookup(principals, known_principals)[known_raw]
        # Rollup rows of principals without a window event never count, so they are dropped.
        mine = known_codes >= 0
        known_codes = known_codes[mine]
        known_times = utc_micros(known["last_time"])[mine]
        known_counts = known["count"].to_numpy(np.int64)[mine]
        names, (countries, known_countries) = _country_codes(
            [window["geo_country"], known["geo_country"]]
        )
        countries = countries[rows]
        known_countries = known_countries[mine]
        lookback_us = int(self.lookback / timedelta(microseconds=1))

        # A country is new when the same principal's previous event there is missing or too
        # old. Before the window's first event there, the previous one is the rollup's latest.
        group, keys = pd.factorize(codes * len(names) + countries)
        known_group = pd.Index(keys).get_indexer(known_codes * len(names) + known_countries)
        previous, has_previous = _previous_in_group(group, times)
        latest = np.full(len(keys), np.iinfo(np.int64).min, dtype=np.int64)
        in_group = known_group >= 0
        np.maximum.at(latest, known_group[in_group], known_times[in_group])
        has_latest = np.zeros(len(keys), dtype=bool)
        has_latest[known_group[in_group]] = True
        previous = np.where(has_previous, previous, latest[group])
        has_previous |= has_latest[group]
        is_new = ~has_previous | (times - previous > lookback_us)

        # The learning period only matters for new countries, so only those events are counted.
        candidates = np.flatnonzero(is_new)
        new_codes, new_times = codes[candidates], times[candidates]
        prior_events = count_in_range(
            codes, times, new_codes, new_times - lookback_us, new_times
        ) + count_in_range(
            known_codes,
            known_times,
            new_codes,
            new_times - lookback_us,
            new_times,
            weights=known_counts,
        )
        day = times // _DAY_US
        day_codes, days = _distinct_days(
            np.concatenate([codes, known_codes]), np.concatenate([day, known_times // _DAY_US])
        )
        prior_days = count_in_range(
            day_codes,
            days,
            new_codes,
            (new_times - lookback_us) // _DAY_US,
            day[candidates],
        )
        learned = np.zeros(len(rows), dtype=bool)
        learned[candidates] = (prior_days >= params.min_history_days) & (
            prior_events >= params.min_history_events
        )
        denied = np.isin(names, params.deny_countries)[countries]
        fires = (is_new & learned) | denied
        suppressed = int((is_new & ~learned & ~denied).sum())
        if suppressed:
            logger.debug("%s: %s new-country events in the learning period", self.id, suppressed)
        if not fires.any():
            return build_findings([], detector=self)
        # The finding covers the window activity from the country from its first flagged event.
        first_flagged = np.full(len(keys), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first_flagged, group[fires], times[fires])
        follows = np.flatnonzero(times >= first_flagged[group])
        columns = list(dict.fromkeys([*_GEO_COLUMNS, "event_uid", "resource"]))
        flagged = window.iloc[rows[follows]][columns]
        flagged.index = follows
        flagged["country"] = flagged["geo_country"].astype(str).str.upper()
        flagged["code"] = codes[follows]

        # Known countries come from the events and rollup rows of the flagged principals only.
        found_codes = np.unique(codes[follows])
        from_events = np.isin(codes, found_codes)
        from_rollup = np.isin(known_codes, found_codes)
        earlier = pd.concat(
            [
                pd.DataFrame(
                    {
                        "code": codes[from_events],
                        "known": names[countries[from_events]],
                        "time": times[from_events],
                        "count": np.ones(int(from_events.sum()), dtype=np.int64),
                    }
                ),
                pd.DataFrame(
                    {
                        "code": known_codes[from_rollup],
                        "known": names[known_countries[from_rollup]],
                        "time": known_times[from_rollup],
                        "count": known_counts[from_rollup],
                    }
                ),
            ],
            ignore_index=True,
        )
        return build_findings(self._findings(flagged, earlier), detector=self)

    def _known(self, history: HistoryView, start: pd.Timestamp) -> pd.DataFrame:
        """Return the principals' geolocated activity per hour and country before ``start``.

        Reads the hourly rollup, not raw events, so a month of history stays cheap. Columns
        ``principal``, ``geo_country``, ``count`` and ``last_time`` (the latest event of the
        hour), as the rollup gives them (Categorical or string keys).
        """
        # The hour stays a key although only last_time is used, because each window event has
        # its own look-back and the per-hour last_time and day decide which rows fall inside.
        rolled = history.rollup(
            since=start - pd.Timedelta(self.lookback),
            until=start,
            columns=["hour", "principal", "geo_country", "outcome", "count", "last_time"],
        )
        # NOTE: the rollup has no source_kind, so history counts every address with a GeoIP
        # country; enrichment gives a country only to public addresses.
        keep = (
            rolled["principal"].notna()
            & rolled["geo_country"].notna()
            & rolled["outcome"].isin(["success", "failure"])
        )
        rolled = rolled.loc[
            keep.fillna(False).to_numpy(dtype=bool),
            ["principal", "geo_country", "count", "last_time"],
        ]
        return rolled.reset_index(drop=True)

    def _findings(self, flagged: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
        """Build the finding rows of ``flagged`` events, grouped by principal code and country.

        ``earlier`` holds the flagged principals' activity for the known countries: columns
        ``code``, ``known`` (country), ``time`` (int64 microseconds) and ``count``.
        """
        params = self.params
        grouped = flagged.groupby(["code", "country"], sort=True)
        found = grouped.agg(
            principal=("principal", "first"),
            principal_type=("principal_type", "first"),
            principal_arns=("principal_arn", _distinct),
            cloud=("cloud", "first"),
            account=("account", "first"),
            first_seen=("time", "min"),
            last_seen=("time", "max"),
            event_uids=("event_uid", _distinct),
            resources=("resource", _distinct),
            source_ips=("source_ip", _distinct),
            cities=("geo_city", _distinct),
            as_orgs=("as_org", _distinct),
            asns=("asn", lambda values: sorted({int(asn) for asn in values.dropna()})),
            events=("event_uid", "nunique"),
            failures=("outcome", lambda values: int((values == "failure").sum())),
        ).reset_index()
        found["operations"] = _objects(_counts_per_group(grouped["operation"]), found.index)
        found["locations"] = _objects(
            [located_addresses(group, country_column="country") for _, group in grouped],
            found.index,
        )

        # Known countries: the principal's events in the look-back before the first new event,
        # from the window and from the rollup (an hour counts when its latest event is inside).
        pairs = found[["code", "country"]].assign(first=utc_micros(found["first_seen"]))
        pairs = pairs.merge(earlier, on="code")
        since = pairs["first"] - int(self.lookback / timedelta(microseconds=1))
        pairs = pairs[(pairs["time"] >= since) & (pairs["time"] < pairs["first"])]
        totals = pairs.groupby(["code", "country", "known"])["count"].sum().reset_index()
        totals = totals.sort_values(
            ["code", "country", "count", "known"], ascending=[True, True, False, True]
        )
        countries: dict[tuple[int, str], dict[str, int]] = {}
        for code, country, other, count in zip(
            totals["code"], totals["country"], totals["known"], totals["count"], strict=True
        ):
            countries.setdefault((int(code), str(country)), {})[str(other)] = int(count)
        found["known_countries"] = _objects(
            [
                countries.get((int(code), str(country)), {})
                for code, country in zip(found["code"], found["country"], strict=True)
            ],
            found.index,
        )
        denied = found["country"].isin(params.deny_countries)
        found["severity"] = np.where(denied, "high", params.severity)

        rows = []
        for item, is_denied in zip(iter_rows(found), denied, strict=True):
            known_countries = item.known_countries if isinstance(item.known_countries, dict) else {}
            reason = "deny-listed country" if is_denied else "new country"
            rows.append(
                {
                    "severity": item.severity,
                    "title": f"{item.principal} active from {reason} {item.country}",
                    "principal": item.principal,
                    "principal_type": item.principal_type,
                    "cloud": item.cloud,
                    "account": item.account,
                    "resources": item.resources,
                    "source_ips": item.source_ips,
                    "countries": [item.country],
                    "first_seen": item.first_seen,
                    "last_seen": item.last_seen,
                    "event_uids": item.event_uids,
                    "event_count": int(item.events),
                    "evidence": {
                        "country": item.country,
                        "reason": reason,
                        "first_seen": utc_iso(item.first_seen),
                        "last_seen": utc_iso(item.last_seen),
                        "events": int(item.events),
                        "failures": item.failures,
                        "source_ips": item.source_ips,
                        "cities": item.cities,
                        "asns": item.asns,
                        "as_orgs": item.as_orgs,
                        "operations": item.operations,
                        "locations": item.locations,
                        "principal_arns": [
                            arn for arn in item.principal_arns if arn != item.principal
                        ],
                    },
                    "baseline": {
                        "days": params.lookback_days,
                        "known_countries": known_countries,
                        "summary": (
                            f"{params.lookback_days}-day countries: "
                            + (
                                ", ".join(f"{c} ({n})" for c, n in known_countries.items())
                                or "none"
                            )
                        ),
                    },
                    "dedup_key": stable_key(self.id, item.principal, item.country),
                }
            )
        return pd.DataFrame(rows)


def _lookup(names: np.ndarray, values: Any) -> np.ndarray:
    """Return the position of each of ``values`` in ``names`` (-1 when absent), plus a final -1.

    The extra -1 lets ``result[codes]`` map the code -1 that ``pd.factorize`` gives nulls to -1.
    """
    found = pd.Index(names).get_indexer(np.asarray(values, dtype=object))
    return np.append(found, -1).astype(np.int64)


def _first_seen_codes(values: pd.Series, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number the values at positions ``rows`` in order of first appearance there.

    The values at ``rows`` must not be null. Returns the code of each of those rows and the
    distinct values in code order. The whole column is factorized once (Arrow dictionary
    encoding), so no string is taken per row.
    """
    raw, uniques = pd.factorize(values)
    raw = raw[rows]
    first = pd.unique(raw)
    renumber = np.full(len(uniques), -1, dtype=np.int64)
    renumber[first] = np.arange(len(first))
    return renumber[raw], np.asarray(uniques, dtype=object)[first]


def _country_codes(columns: list[pd.Series]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Code the upper-cased countries of several columns on one shared, sorted list of names.

    Returns the names and, per column, the int64 code of each row (-1 for null). Names are
    sorted, so codes order like the country text. Only the distinct values are upper-cased.
    """
    factorized = [pd.factorize(column) for column in columns]
    upper = [
        pd.Series(np.asarray(uniques, dtype=object), dtype=object)
        .astype(str)
        .str.upper()
        .to_numpy(dtype=object)
        for _, uniques in factorized
    ]
    names = np.array(sorted(set().union(*(set(part) for part in upper))), dtype=object)
    return names, [
        _lookup(names, part)[codes] for (codes, _), part in zip(factorized, upper, strict=True)
    ]


def _previous_in_group(group: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's previous time in its group, and whether there is one.

    ``group`` contains int codes, and ``times`` must be sorted within each group (for example
    sorted overall). Where there is no previous time, the first array contains 0.
    """
    # A grouped shift of row positions is linear, where a stable argsort of 1M group codes
    # took 0.13 s.
    earlier = (
        pd.Series(np.arange(len(group)))
        .groupby(group, sort=False)
        .shift(fill_value=-1)
        .to_numpy(np.int64)
    )
    has_previous = earlier >= 0
    return np.where(has_previous, times[earlier], 0), has_previous


def _distinct_days(codes: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct (code, day) pairs of two aligned int64 arrays, in any order."""
    if len(codes) == 0:
        return codes.astype(np.int64), days.astype(np.int64)
    first_day = int(days.min())
    span = int(days.max()) - first_day + 1
    pairs = pd.unique(codes.astype(np.int64) * span + (days.astype(np.int64) - first_day))
    return pairs // span, pairs % span + first_day


class ImpossibleTravelParams(DetectorParams):
    """Parameters of :class:`ImpossibleTravelDetector`."""

    max_speed_kmh: float = Field(default=900.0, gt=0)
    min_distance_km: float = Field(default=500.0, ge=0)
    max_pairs_in_evidence: int = Field(default=20, ge=1)


@register
class ImpossibleTravelDetector(Detector):
    """Two consecutive events of one principal too far apart for the time between them.

    Events are the principal's geolocated public calls, one per ``event_uid``, ordered by time
    across history and window. A pair is flagged when the haversine distance is at least
    ``min_distance_km`` and the implied speed exceeds ``max_speed_kmh``. A zero time gap
    counts as infinite speed. Pairs in the same country and city are skipped, because GeoIP
    may give one city different coordinates. Flagged pairs whose later event is in the window
    are collapsed into one finding per principal and UTC day of the later event.

    Parameters: ``max_speed_kmh`` (900, a little above airliner cruise speed),
    ``min_distance_km`` (500), ``max_pairs_in_evidence`` (20).

    Blind spots: GeoIP places callers at their egress, so VPNs, corporate proxies and shared
    cloud egress fire falsely (a user switching a VPN on) or hide travel (an attacker using
    an egress near the victim). City coordinates can be a country centroid, hundreds of km
    off. Callers from private, internal or cloud-service addresses have no location here.

    ATT&CK: T1078.004 (Cloud Accounts).
    """

    id: ClassVar[str] = "keytrail.impossible_travel"
    mitre: ClassVar[tuple[str, ...]] = ("T1078.004",)
    Params: ClassVar[type[DetectorParams]] = ImpossibleTravelParams
    params: ImpossibleTravelParams

    @property
    def lookback(self) -> timedelta:
        """The maximum time gap that can still exceed ``max_speed_kmh``: half the Earth's circumference."""
        hours = HALF_EARTH_CIRCUMFERENCE_KM / self.params.max_speed_kmh
        return timedelta(hours=math.ceil(hours))

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per principal and day with impossible travel in ``window``."""
        params = self.params
        # Only a window event with a location can be the later event of a flagged pair, so
        # without one the raw history of the look-back is not read at all.
        located = window["geo_lat"].notna() & window["geo_lon"].notna()
        if not (_public_geolocated(window) & located).any():
            return build_findings([], detector=self)
        context = load_context(window, history, self.lookback, [*_GEO_COLUMNS, "resource"])
        keep = _public_geolocated(context) & context["geo_lat"].notna() & context["geo_lon"].notna()
        events = context[keep.to_numpy(dtype=bool)]
        if not events[IN_WINDOW].any():
            return build_findings([], detector=self)
        # Rows of a batch read share the event uid; the resources are joined back later.
        resources = events[["event_uid", "resource"]].dropna().drop_duplicates().astype(object)
        events = events.drop_duplicates(["principal", "event_uid"]).sort_values(
            ["principal", "time", "event_uid"], kind="stable"
        )
        events = events.reset_index(drop=True)

        previous = events.groupby("principal").shift()
        distance = haversine_km(
            previous["geo_lat"].to_numpy(float),
            previous["geo_lon"].to_numpy(float),
            events["geo_lat"].to_numpy(float),
            events["geo_lon"].to_numpy(float),
        )
        hours = (events["time"] - previous["time"]).dt.total_seconds().to_numpy(float) / 3600
        with np.errstate(divide="ignore", invalid="ignore"):
            speed = np.where(hours > 0, distance / np.where(hours > 0, hours, 1.0), np.inf)
        same_place = (
            (previous["geo_country"].astype(object) == events["geo_country"].astype(object))
            & (previous["geo_city"].astype(object) == events["geo_city"].astype(object))
        ).fillna(False)
        flagged_mask = (
            events[IN_WINDOW].to_numpy(dtype=bool)
            & previous["time"].notna().to_numpy()
            & (distance >= params.min_distance_km)
            & (speed > params.max_speed_kmh)
            & ~same_place.to_numpy(dtype=bool)
        )
        if not flagged_mask.any():
            return build_findings([], detector=self)

        pairs = events[flagged_mask].copy()
        before = previous[flagged_mask]
        for name in ("event_uid", "time", "source_ip", "geo_city", "geo_country"):
            pairs[f"from_{name}"] = before[name].to_numpy()
        pairs["distance_km"] = distance[flagged_mask]
        pairs["hours"] = hours[flagged_mask]
        pairs["speed_kmh"] = speed[flagged_mask]
        pairs["day"] = pairs["time"].dt.floor("D")
        logger.debug("%s: %s flagged pairs", self.id, len(pairs))
        return build_findings(self._findings(pairs, resources), detector=self)

    def _findings(self, pairs: pd.DataFrame, resources: pd.DataFrame) -> pd.DataFrame:
        """Collapse flagged pairs into one finding per principal and UTC day, fastest first."""
        params = self.params
        pairs = pairs.sort_values(
            ["principal", "day", "speed_kmh", "distance_km"],
            ascending=[True, True, False, False],
            kind="stable",
        ).reset_index(drop=True)
        group = pairs.groupby(["principal", "day"], sort=False).ngroup().to_numpy()
        size = int(group.max()) + 1
        found = pairs.drop_duplicates(["principal", "day"]).reset_index(drop=True)
        found["flagged_pairs"] = np.bincount(group, minlength=size)
        found["first_seen"] = pairs.groupby(group)["from_time"].min().to_numpy()
        found["last_seen"] = pairs.groupby(group)["time"].max().to_numpy()

        both_groups = np.concatenate([group, group])

        def both(later: str, earlier: str) -> pd.Series:
            return pd.concat([pairs[later], pairs[earlier]], ignore_index=True).astype(object)

        uids = both("event_uid", "from_event_uid")
        found["event_uids"] = distinct_lists(both_groups, uids, size)
        found["source_ips"] = distinct_lists(both_groups, both("source_ip", "from_source_ip"), size)
        found["countries"] = distinct_lists(
            both_groups, both("geo_country", "from_geo_country"), size
        )
        touched = pd.DataFrame({"group": both_groups, "event_uid": uids}).merge(
            resources, on="event_uid"
        )
        found["resources"] = distinct_lists(touched["group"].to_numpy(), touched["resource"], size)

        # Evidence dicts are built for at most max_pairs_in_evidence pairs per finding.
        in_evidence = (pairs.groupby(group).cumcount() < params.max_pairs_in_evidence).to_numpy()
        evidence = np.empty(int(in_evidence.sum()), dtype=object)
        evidence[:] = [_pair_evidence(pair) for pair in iter_rows(pairs[in_evidence])]
        per_finding = np.split(
            evidence, np.cumsum(np.bincount(group[in_evidence], minlength=size))[:-1]
        )

        baseline = {
            "max_speed_kmh": params.max_speed_kmh,
            "min_distance_km": params.min_distance_km,
            "summary": (
                f"plausible travel is under {params.max_speed_kmh:g} km/h between consecutive events"
            ),
        }
        found["severity"] = "high"
        found["title"] = [
            f"{item.principal} impossible travel {_place(item, 'from_')} → {_place(item, '')} "
            f"({_speed_text(item.speed_kmh)})"
            for item in iter_rows(found)
        ]
        evidence_column = [
            {**shown_pairs[0], "flagged_pairs": int(count), "pairs": list(shown_pairs)}
            for shown_pairs, count in zip(per_finding, found["flagged_pairs"], strict=True)
        ]
        found["evidence"] = pd.Series(evidence_column, index=found.index, dtype=object)
        found["baseline"] = pd.Series(
            [dict(baseline) for _ in range(size)], index=found.index, dtype=object
        )
        found["dedup_key"] = [
            stable_key(self.id, principal, utc_iso(day))
            for principal, day in zip(found["principal"], found["day"], strict=True)
        ]
        columns = [
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
            "event_uids",
            "evidence",
            "baseline",
            "dedup_key",
        ]
        return found[columns]


def _place(row: Any, prefix: str) -> str:
    city = getattr(row, f"{prefix}geo_city")
    country = getattr(row, f"{prefix}geo_country")
    return f"{city}, {country}" if isinstance(city, str) else str(country)


def _speed_text(speed: float) -> str:
    return "zero time gap" if math.isinf(speed) else f"{speed:,.0f} km/h"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _pair_evidence(pair: Any) -> dict[str, Any]:
    speed = float(pair.speed_kmh)
    return {
        "from": {
            "ip": _text(pair.from_source_ip),
            "city": _text(pair.from_geo_city),
            "country": _text(pair.from_geo_country),
            "time": utc_iso(pair.from_time),
            "event_uid": pair.from_event_uid,
        },
        "to": {
            "ip": _text(pair.source_ip),
            "city": _text(pair.geo_city),
            "country": _text(pair.geo_country),
            "time": utc_iso(pair.time),
            "event_uid": pair.event_uid,
        },
        "distance_km": round(float(pair.distance_km), 1),
        "hours": round(float(pair.hours), 3),
        # JSON has no infinity: a zero time gap is reported as speed null and zero_gap true.
        "speed_kmh": None if math.isinf(speed) else round(speed, 1),
        "zero_gap": math.isinf(speed),
    }
