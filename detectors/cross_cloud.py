"""``keytrail.cross_cloud``: one address or one person reading secrets in several clouds at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from itertools import combinations
from typing import Any, ClassVar, Final, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from detectors._common import IN_WINDOW, load_context, read_mask, stable_key, utc_iso, utc_micros
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register
from pipeline.formats.ip import classify_address
from pipeline.schema import CLOUDS

__all__ = ["CrossCloudDetector", "CrossCloudParams", "person_identity"]

logger = logging.getLogger(__name__)

IdentityKey = Literal["source_ip", "person"]
_DEFAULT_KEYS: Final[tuple[IdentityKey, ...]] = ("person", "source_ip")
# Principal types that can carry a person's email or UPN: IAM Identity Center and SAML
# sessions are "federated", GCP and Azure accounts of people are "user".
_PERSON_TYPES: Final = ("user", "federated")
_EMAIL: Final = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
_DAY_US: Final = 86_400_000_000
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
    "source_kind",
    "geo_country",
)
_ROLLUP_COLUMNS: Final = (
    "hour",
    "cloud",
    "principal",
    "principal_type",
    "source_ip",
    "action",
    "outcome",
    "first_time",
)


class CrossCloudParams(DetectorParams):
    """Parameters of :class:`CrossCloudDetector`."""

    window_minutes: float = Field(default=60.0, gt=0, le=24 * 60)
    lookback_days: int = Field(default=30, ge=0, le=366)
    min_history_days: int = Field(default=7, ge=0, le=366)
    keys: list[IdentityKey] = Field(default_factory=lambda: list(_DEFAULT_KEYS))

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[IdentityKey]) -> list[IdentityKey]:
        if not value:
            raise ValueError("keys is empty; expected person, source_ip or both")
        return list(dict.fromkeys(value))


def person_identity(principals: pd.Series, principal_types: pd.Series) -> pd.Series:
    """Return the lower-cased email or UPN of each principal that is a person, else None.

    A person is a principal of type ``user`` or ``federated`` whose name is an email address,
    which is how Google accounts, Entra ID user principal names and IAM Identity Center or
    SAML session names appear. IAM user names without an ``@`` do not match across clouds.
    """
    frame = pd.DataFrame({"principal": principals, "principal_type": principal_types})
    codes, names = _identity_codes(frame, "person")
    labels = np.concatenate([names, np.array([None], dtype=object)])
    return pd.Series(labels[codes], index=principals.index, dtype=object)


@dataclass
class _Episodes:
    """The episodes of one identity kind, as slices of reads sorted by identity and time.

    ``rows`` are positions in the context frame; episode ``i`` is
    ``rows[starts[i]:ends[i]]``. ``clouds`` is a bit mask over :data:`CLOUDS` per episode.
    """

    kind: str
    rows: np.ndarray
    names: np.ndarray
    identities: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    clouds: np.ndarray
    start_times: np.ndarray


@register
class CrossCloudDetector(Detector):
    """The same source IP or the same person reading secrets in two or more clouds at once.

    Reads are successful reads (see ``read_mask``). Two kinds of identity are tracked
    (``keys``). A ``source_ip`` identity is a public source address. A ``person`` identity is
    the email of a principal of type ``user`` or ``federated`` (see :func:`person_identity`),
    compared case-insensitively. So an AWS IAM Identity Center session, a Google account and
    an Entra ID user with the same address are one person.

    A read qualifies when the same identity read a secret in another cloud at most
    ``window_minutes`` (60) before it. Qualifying reads at most ``window_minutes`` apart form
    one episode together with the reads they link to, and each episode is one finding. An
    address episode whose reads all belong to person episodes is dropped, because the person's
    finding lists the address.

    Learning: an episode is dropped, and counted in ``report_["known"]``, when every pair of
    its clouds met before the episode started, within ``lookback_days`` (30). Two clouds meet
    on a UTC day when the identity read secrets in both that day. The meeting time is the
    later of its first reads in each. Earlier days come from the hourly rollup, so people who
    work in two clouds every day stop firing after their first day. ``lookback_days: 0``
    turns learning off. An episode that starts less than ``min_history_days`` (7) after the
    earliest event in the history and window does not fire either, because the pair may have
    met just before the data began. Such episodes are counted in
    ``report_["skipped_no_history"]``.

    Severity is medium, high for three clouds. Parameters: ``window_minutes`` (60),
    ``lookback_days`` (30), ``min_history_days`` (7), ``keys`` (["person", "source_ip"]).

    Blind spots: one person with different emails per cloud is two people, and IAM users and
    roles have no email to match. An address shared by many people (a corporate NAT or VPN
    egress) fires once per new cloud pair and is then learned. Private addresses are ignored.

    ATT&CK: T1078.004 (Valid Accounts: Cloud Accounts), T1555.006 (Cloud Secrets Management
    Stores).
    """

    id: ClassVar[str] = "keytrail.cross_cloud"
    mitre: ClassVar[tuple[str, ...]] = ("T1078.004", "T1555.006")
    Params: ClassVar[type[DetectorParams]] = CrossCloudParams
    params: CrossCloudParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.report_: dict[str, int] = {}

    @property
    def lookback(self) -> timedelta:
        """The learning or minimum history days plus the episode window and one hour of rounding."""
        days = max(self.params.lookback_days, self.params.min_history_days)
        return timedelta(days=days, hours=1, minutes=self.params.window_minutes)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per new cross-cloud episode that reaches into ``window``."""
        params = self.params
        self.report_ = {"known": 0, "skipped_no_history": 0}
        if window.empty:
            return build_findings([], detector=self)
        width = int(params.window_minutes * 60_000_000)
        boundary = (window["time"].min() - pd.Timedelta(minutes=params.window_minutes)).floor("h")
        context = load_context(window, history, window["time"].min() - boundary, _COLUMNS)
        cloud_codes = _cloud_codes(context["cloud"])
        succeeded = (context["outcome"] == "success").fillna(False).to_numpy(dtype=bool)
        is_read = read_mask(context).to_numpy(dtype=bool) & succeeded & (cloud_codes >= 0)
        if not is_read.any():
            return build_findings([], detector=self)
        reads = context[is_read]
        read_rows = np.flatnonzero(is_read)
        times = utc_micros(context["time"])
        in_window = context[IN_WINDOW].to_numpy(dtype=bool)

        found = {
            kind: _find_episodes(kind, reads, read_rows, cloud_codes, times, width)
            for kind in params.keys
        }
        reported: list[tuple[_Episodes, np.ndarray]] = []
        person_rows = np.zeros(len(context), dtype=bool)
        if "person" in found:
            person_rows = _covered_rows(found["person"], len(context))
        for kind, episodes in found.items():
            keep = _any_in_slices(in_window[episodes.rows], episodes.starts, episodes.ends)
            if kind == "source_ip":
                # An address episode whose reads all belong to person episodes adds nothing.
                keep &= ~_all_in_slices(person_rows[episodes.rows], episodes.starts, episodes.ends)
            reported.append((episodes, np.flatnonzero(keep)))
        if not any(len(chosen) for _, chosen in reported):
            return build_findings([], detector=self)

        rolled = self._rollup(history, boundary)
        reported = self._drop_unwatched(reported, context, rolled)
        meetings = self._meetings(reads, rolled, reported)
        rows = []
        for episodes, chosen in reported:
            known = self._known(episodes, chosen, meetings)
            self.report_["known"] += int(known.sum())
            for index in chosen[~known]:
                rows.append(self._finding_row(episodes, int(index), context, meetings))
        logger.debug("%s: %s findings, report %s", self.id, len(rows), self.report_)
        return build_findings(rows, detector=self)

    def _rollup(self, history: HistoryView, boundary: pd.Timestamp) -> pd.DataFrame | None:
        """Read the hourly rollup of successful reads before ``boundary``, or None if not needed."""
        params = self.params
        days = max(params.lookback_days, params.min_history_days)
        if not days:
            return None
        rolled = history.rollup(
            since=boundary - pd.Timedelta(days=days), until=boundary, columns=list(_ROLLUP_COLUMNS)
        )
        return rolled

    def _drop_unwatched(
        self,
        reported: list[tuple[_Episodes, np.ndarray]],
        context: pd.DataFrame,
        rolled: pd.DataFrame | None,
    ) -> list[tuple[_Episodes, np.ndarray]]:
        """Drop episodes that start less than ``min_history_days`` after the earliest data.

        Before that, "first time in two clouds" means little: the identity may have done the
        same just before the history began. Dropped episodes are counted in
        ``report_["skipped_no_history"]``.
        """
        minimum = self.params.min_history_days * _DAY_US
        data_start = int(utc_micros(context["time"]).min())
        if rolled is not None and not rolled.empty:
            data_start = min(data_start, int(utc_micros(rolled["hour"]).min()))
        kept = []
        for episodes, chosen in reported:
            watched = episodes.start_times[chosen] - data_start >= minimum
            self.report_["skipped_no_history"] += int((~watched).sum())
            kept.append((episodes, chosen[watched]))
        return kept

    def _meetings(
        self,
        reads: pd.DataFrame,
        rolled: pd.DataFrame | None,
        reported: list[tuple[_Episodes, np.ndarray]],
    ) -> pd.DataFrame:
        """Return the days on which two clouds met for the identities of the reported episodes.

        A meeting of clouds ``a`` and ``b`` on a UTC day is at the later of the identity's
        first read in each that day. Columns: ``kind``, ``identity``, ``pair`` (``a+b`` in
        name order), ``day`` and ``time``. Days before the context come from the rollup
        ``rolled``, later ones from ``reads``.
        """
        identities_by_kind = {
            episodes.kind: {str(episodes.names[episodes.identities[i]]) for i in chosen}
            for episodes, chosen in reported
        }
        sources: list[tuple[pd.DataFrame, np.ndarray, np.ndarray]] = [
            (reads, utc_micros(reads["time"]), np.ones(len(reads), dtype=bool))
        ]
        if rolled is not None:
            succeeded = (rolled["action"] == "read") & (rolled["outcome"] == "success")
            sources.append(
                (
                    rolled,
                    utc_micros(rolled["first_time"]),
                    succeeded.fillna(False).to_numpy(dtype=bool),
                )
            )
        parts = [
            _daily_meetings(kind, sources, identities)
            for kind, identities in identities_by_kind.items()
        ]
        pairs = pd.concat(parts, ignore_index=True)
        return pairs.reset_index(drop=True)

    def _known(self, episodes: _Episodes, chosen: np.ndarray, meetings: pd.DataFrame) -> np.ndarray:
        """Return, for each chosen episode, whether every pair of its clouds met before it."""
        params = self.params
        if not params.lookback_days or meetings.empty or len(chosen) == 0:
            return np.zeros(len(chosen), dtype=bool)

        # One row per episode and cloud pair. The loop runs per episode, not per event.
        episode_pairs = []
        for number, index in enumerate(chosen):
            mask = int(episodes.clouds[index])
            clouds = sorted(cloud for bit, cloud in enumerate(CLOUDS) if mask >> bit & 1)
            identity = str(episodes.names[episodes.identities[index]])
            start = int(episodes.start_times[index])
            episode_pairs += [
                (number, identity, "+".join(pair), start) for pair in combinations(clouds, 2)
            ]
        pairs = pd.DataFrame(episode_pairs, columns=["episode", "identity", "pair", "start"])
        pairs["start"] = pd.to_datetime(pairs["start"], unit="us", utc=True).astype(
            "datetime64[us, UTC]"
        )

        # The latest earlier meeting of the same identity and pair, if one is recent enough.
        candidates = meetings[(meetings["kind"] == episodes.kind).to_numpy(dtype=bool)]
        candidates = candidates[["identity", "pair", "time"]].astype(
            {"identity": object, "pair": object}
        )
        candidates = candidates.assign(time=candidates["time"].astype("datetime64[us, UTC]"))
        matched = pd.merge_asof(
            pairs.astype({"identity": object, "pair": object}).sort_values("start"),
            candidates.sort_values("time"),
            left_on="start",
            right_on="time",
            by=["identity", "pair"],
            direction="backward",
            allow_exact_matches=False,
            tolerance=pd.Timedelta(days=params.lookback_days),
        )
        pair_known = matched["time"].notna().groupby(matched["episode"]).all()
        return pair_known.reindex(range(len(chosen)), fill_value=False).to_numpy(dtype=bool)

    def _days_seen(
        self,
        kind: str,
        identity: str,
        start: pd.Timestamp,
        pairs: list[str],
        meetings: pd.DataFrame,
    ) -> dict[str, int]:
        """Return, per cloud pair, the days in ``lookback_days`` on which it met before ``start``."""
        days_seen = dict.fromkeys(pairs, 0)
        if not self.params.lookback_days:
            return days_seen
        since = start - pd.Timedelta(days=self.params.lookback_days)
        selected = (
            (meetings["kind"] == kind)
            & (meetings["identity"] == identity)
            & (meetings["time"] < start)
            & (meetings["time"] >= since)
        )
        earlier = meetings[selected.to_numpy(dtype=bool)]
        for pair, days in earlier.groupby("pair")["day"].nunique().items():
            if pair in days_seen:
                days_seen[str(pair)] = int(days)
        return days_seen

    def _finding_row(
        self,
        episodes: _Episodes,
        index: int,
        context: pd.DataFrame,
        meetings: pd.DataFrame,
    ) -> dict[str, Any]:
        """Build the finding of one episode with at least one new pair of clouds."""
        params = self.params
        key = episodes.kind
        identity = str(episodes.names[episodes.identities[index]])
        start = pd.Timestamp(int(episodes.start_times[index]), unit="us", tz="UTC")
        mask = int(episodes.clouds[index])
        clouds = sorted(cloud for bit, cloud in enumerate(CLOUDS) if mask >> bit & 1)
        pairs = ["+".join(pair) for pair in combinations(clouds, 2)]
        days_seen = self._days_seen(key, identity, start, pairs, meetings)
        new_pairs = [pair for pair in pairs if days_seen[pair] == 0]

        positions = episodes.rows[episodes.starts[index] : episodes.ends[index]]
        members = context.iloc[positions].sort_values("time", kind="stable")
        end = pd.Timestamp(members["time"].max())
        per_cloud = {
            cloud: _cloud_summary(members[(members["cloud"] == cloud).to_numpy(dtype=bool)])
            for cloud in clouds
        }
        principals = sorted(members["principal"].dropna().astype(str).unique())
        principal = principals[0] if len(principals) == 1 else None
        subject = f"Source IP {identity}"
        if key == "person":
            principal = subject = identity
        cloud_text = " and ".join([", ".join(clouds[:-1]), clouds[-1]])
        span = _duration_text(end - start)
        return {
            "severity": "high" if len(clouds) >= 3 else "medium",
            "title": f"{subject} read secrets in {cloud_text} within {span}",
            "principal": principal,
            "principal_type": _single(members["principal_type"]),
            "cloud": None,
            "account": _single(members["account"]),
            "resources": members["resource"].dropna().astype(str).unique().tolist(),
            "source_ips": members["source_ip"].dropna().astype(str).unique().tolist(),
            "countries": members["geo_country"].dropna().astype(str).unique().tolist(),
            "first_seen": start,
            "last_seen": end,
            "event_uids": members["event_uid"].astype(str).unique().tolist(),
            "dedup_key": stable_key(self.id, key, identity, *clouds, utc_iso(start.floor("D"))),
            "evidence": {
                "key": key,
                "identity": identity,
                "clouds": clouds,
                "per_cloud": per_cloud,
                "principals": principals,
                "span_seconds": round((end - start).total_seconds(), 1),
                "window_minutes": params.window_minutes,
                "new_pairs": new_pairs,
            },
            "baseline": {
                "lookback_days": params.lookback_days,
                "days_seen": days_seen,
                "summary": "; ".join(
                    f"no earlier day in the last {params.lookback_days} days with secret reads "
                    f"by {identity} in both {pair.replace('+', ' and ')}"
                    for pair in new_pairs
                ),
            },
        }


def _identity_codes(frame: pd.DataFrame, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's identity code of ``kind`` (-1 for none) and the identity names.

    The checks run once per distinct principal or address, not once per row.
    """
    if kind == "person":
        codes, principals = pd.factorize(frame["principal"])
        names = pd.Series(np.asarray(principals, dtype=object), dtype=object).astype(str)
        is_email = names.str.match(_EMAIL).to_numpy(dtype=bool)
        identity_codes, lowered = pd.factorize(names.str.lower())
        identities = np.asarray(lowered, dtype=object)
        per_name = np.where(is_email, identity_codes, -1)
        allowed = frame["principal_type"].isin(_PERSON_TYPES).fillna(False).to_numpy(dtype=bool)
    else:
        codes, addresses = pd.factorize(frame["source_ip"])
        identities = np.asarray(addresses, dtype=object)
        if "source_kind" in frame.columns:
            allowed = (frame["source_kind"] == "public").fillna(False).to_numpy(dtype=bool)
            per_name = np.arange(len(identities))
        else:
            # The rollup keeps the canonical address but not its kind: classify each once.
            public = [classify_address(str(ip))[1] == "public" for ip in identities]
            per_name = np.where(np.array(public, dtype=bool), np.arange(len(identities)), -1)
            allowed = np.ones(len(frame), dtype=bool)
    per_name = np.append(per_name, -1).astype(np.int64)
    result = np.where(allowed, per_name[codes], -1)
    return result, np.asarray(identities, dtype=object)


def _find_episodes(
    kind: str,
    reads: pd.DataFrame,
    read_rows: np.ndarray,
    cloud_codes: np.ndarray,
    times: np.ndarray,
    width: int,
) -> _Episodes:
    """Find the episodes of one identity kind among the reads, with numpy only.

    A read qualifies when the identity's latest read in another cloud, at or before it, is at
    most ``width`` microseconds earlier. Qualifying reads at most ``width`` apart form one
    episode, which spans from the earliest read they link to up to the last of them.
    """
    identity, names = _identity_codes(reads, kind)
    has_identity = identity >= 0
    rows = read_rows[has_identity]
    identity = identity[has_identity]
    order = np.lexsort((times[rows], identity))
    rows, identity = rows[order], identity[order]
    clouds, stamps = cloud_codes[rows], times[rows]
    count = len(rows)
    empty = np.zeros(0, dtype=np.int64)
    if count == 0:
        return _Episodes(kind, rows, names, empty, empty, empty, empty, empty)

    position = np.arange(count)
    new_identity = np.ones(count, dtype=bool)
    new_identity[1:] = identity[1:] != identity[:-1]
    group_start = np.maximum.accumulate(np.where(new_identity, position, 0))
    no_link = np.iinfo(np.int64).max
    link_start = np.full(count, no_link, dtype=np.int64)
    for code in range(len(CLOUDS)):
        # Position of the latest read in this cloud at or before each read (-1 if none).
        latest = np.maximum.accumulate(np.where(clouds == code, position, -1))
        valid = (latest >= group_start) & (clouds != code)
        latest_time = stamps[np.maximum(latest, 0)]
        linked = valid & (stamps - latest_time <= width)
        link_start = np.where(linked, np.minimum(link_start, latest_time), link_start)

    qualifying = np.flatnonzero(link_start != no_link)
    if len(qualifying) == 0:
        return _Episodes(kind, rows, names, empty, empty, empty, empty, empty)
    new = np.ones(len(qualifying), dtype=bool)
    new[1:] = (np.diff(identity[qualifying]) != 0) | (np.diff(stamps[qualifying]) > width)
    firsts = np.flatnonzero(new)
    starts_time = np.minimum.reduceat(link_start[qualifying], firsts)
    ends_time = np.maximum.reduceat(stamps[qualifying], firsts)
    episode_identity = identity[qualifying][firsts]

    origin = int(stamps.min())
    span = int(stamps.max()) - origin + 1
    axis = identity * span + (stamps - origin)
    starts = np.searchsorted(axis, episode_identity * span + (starts_time - origin), side="left")
    ends = np.searchsorted(axis, episode_identity * span + (ends_time - origin), side="right")
    masks = np.zeros(len(firsts), dtype=np.int64)
    for code in range(len(CLOUDS)):
        present = _any_in_slices(clouds == code, starts, ends)
        masks |= present.astype(np.int64) << code
    return _Episodes(kind, rows, names, episode_identity, starts, ends, masks, starts_time)


def _any_in_slices(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Return, for each slice ``[start, end)`` of ``flags``, whether any flag is set."""
    totals = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return (totals[ends] - totals[starts]) > 0


def _all_in_slices(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Return, for each slice ``[start, end)`` of ``flags``, whether every flag is set."""
    totals = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return (totals[ends] - totals[starts]) == (ends - starts)


def _covered_rows(episodes: _Episodes, size: int) -> np.ndarray:
    """Return a mask over the context rows: True for rows inside one of the episodes."""
    marks = np.zeros(len(episodes.rows) + 1, dtype=np.int64)
    np.add.at(marks, episodes.starts, 1)
    np.add.at(marks, episodes.ends, -1)
    inside = np.cumsum(marks[:-1]) > 0
    covered = np.zeros(size, dtype=bool)
    covered[episodes.rows[inside]] = True
    return covered


def _daily_meetings(
    kind: str,
    sources: list[tuple[pd.DataFrame, np.ndarray, np.ndarray]],
    identities: set[str],
) -> pd.DataFrame:
    """Return the days on which two clouds met for ``identities`` of one kind.

    ``sources`` are (frame, times in microseconds, row mask) triples, raw reads or rollup
    rows. Columns of the result: ``kind``, ``identity``, ``pair``, ``day`` and ``time``.
    """
    tables, codes, clouds, times = [], [], [], []
    for frame, stamps, mask in sources:
        frame_codes, names = _identity_codes(frame, kind)
        selected = np.flatnonzero(np.isin(names.astype(str), sorted(identities)))
        keep = np.isin(frame_codes, selected) & mask
        tables.append(names)
        codes.append(frame_codes[keep])
        clouds.append(_cloud_codes(frame["cloud"])[keep])
        times.append(stamps[keep])
    # One identity table for all sources: the small tables are merged, not the rows.
    merged, distinct = pd.factorize(pd.Series(np.concatenate(tables), dtype=object))
    identity_names = np.asarray(distinct, dtype=object)
    offsets = np.cumsum([0] + [len(table) for table in tables[:-1]])
    identity = np.concatenate(
        [merged[offset + part] for offset, part in zip(offsets, codes, strict=True)]
    )
    stamps = np.concatenate(times)
    frame = pd.DataFrame(
        {
            "identity": identity,
            "day": stamps // _DAY_US,
            "cloud": np.concatenate(clouds),
            "time": stamps,
        }
    )
    frame = frame[(frame["cloud"] >= 0).to_numpy(dtype=bool)]
    first = frame.groupby(["identity", "day", "cloud"])["time"].min().unstack("cloud")
    parts = []
    for a, b in combinations(range(len(CLOUDS)), 2):
        if a not in first.columns or b not in first.columns:
            continue
        both = first[[a, b]].dropna()
        if both.empty:
            continue
        met = both.max(axis=1).astype(np.int64).to_numpy()
        parts.append(
            pd.DataFrame(
                {
                    "kind": kind,
                    "identity": identity_names[
                        both.index.get_level_values("identity").to_numpy(dtype=np.int64)
                    ],
                    "pair": "+".join(sorted((CLOUDS[a], CLOUDS[b]))),
                    "day": _utc(
                        both.index.get_level_values("day").to_numpy(dtype=np.int64) * _DAY_US
                    ),
                    "time": _utc(met),
                }
            )
        )
    columns = ["kind", "identity", "pair", "day", "time"]
    if not parts:
        return pd.DataFrame({name: pd.Series([], dtype=object) for name in columns}).astype(
            {"day": "datetime64[us, UTC]", "time": "datetime64[us, UTC]"}
        )
    return pd.concat(parts, ignore_index=True)[columns]


def _utc(micros: np.ndarray) -> pd.Series:
    return pd.Series(pd.to_datetime(micros, unit="us", utc=True)).astype("datetime64[us, UTC]")


def _cloud_codes(clouds: pd.Series) -> np.ndarray:
    """Return the position of each cloud in :data:`CLOUDS`, -1 for null or unknown."""
    codes, names = pd.factorize(clouds)
    lookup = np.array([CLOUDS.index(name) if name in CLOUDS else -1 for name in names] + [-1])
    return lookup[codes].astype(np.int64)


def _cloud_summary(reads: pd.DataFrame) -> dict[str, Any]:
    return {
        "principals": sorted(reads["principal"].dropna().astype(str).unique()),
        "accounts": sorted(reads["account"].dropna().astype(str).unique()),
        "source_ips": sorted(reads["source_ip"].dropna().astype(str).unique()),
        "reads": len(reads),
        "first": utc_iso(reads["time"].min()),
        "last": utc_iso(reads["time"].max()),
    }


def _single(values: pd.Series) -> str | None:
    distinct = values.dropna().astype(str).unique()
    return str(distinct[0]) if len(distinct) == 1 else None


def _duration_text(span: pd.Timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{span.total_seconds():.0f} s"
