"""``keytrail.off_hours``: secret reads outside the principal's business hours or usual hours."""

from __future__ import annotations

import fnmatch
import logging
import re
from datetime import date, timedelta
from functools import cache
from typing import Any, ClassVar, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors._common import (
    IN_WINDOW,
    distinct_lists,
    iter_rows,
    located_addresses,
    read_mask,
    value_counts_by_group,
)
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register
from pipeline.schema import HUMAN_PRINCIPAL_TYPES, PRINCIPAL_TYPES

__all__ = [
    "AccountOverride",
    "OffHoursDetector",
    "OffHoursParams",
    "PrincipalOverride",
    "usual_hours_span",
]

logger = logging.getLogger(__name__)

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_BUSINESS_DAYS: Final[tuple[Weekday, ...]] = ("mon", "tue", "wed", "thu", "fri")
_HOURS_PATTERN: Final = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_COLUMNS: Final = (
    "time",
    "cloud",
    "operation",
    "action",
    "outcome",
    "invoked_by",
    "principal",
    "principal_type",
    "principal_arn",
    "account",
    "resource",
    "source_ip",
    "geo_country",
    "geo_city",
)
_ROLLUP_COLUMNS: Final = (
    "hour",
    "principal",
    "principal_type",
    "account",
    "action",
    "outcome",
    "invoked_by",
    "count",
    "first_time",
    "last_time",
)
# Share of a principal's reads that the usual-hours span in a finding's baseline covers.
_USUAL_SHARE: Final = 0.9


def parse_business_hours(value: str) -> tuple[int, int]:
    """Parse ``"HH:MM-HH:MM"`` into start and end minutes after local midnight.

    The end may be ``24:00``. Raises ``ValueError`` when the text is malformed or the start is
    not before the end (a range across midnight is not supported).
    """
    match = _HOURS_PATTERN.match(value.strip())
    if match is None:
        raise ValueError(
            f"invalid business_hours {value!r}; expected HH:MM-HH:MM, e.g. 08:00-19:00"
        )
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or end_h > 24 or start_m > 59 or end_m > 59 or (end_h == 24 and end_m):
        raise ValueError(f"invalid business_hours {value!r}: hours 00-24, minutes 00-59")
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start >= end:
        raise ValueError(
            f"invalid business_hours {value!r}: the start must be before the end "
            "(ranges across midnight are not supported)"
        )
    return start, end


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r}; expected an IANA name such as Europe/Berlin"
        ) from None
    return value


def _check_country(value: str | None) -> str | None:
    if value is None:
        return None
    code = value.strip().upper()
    if code not in holidays.list_supported_countries():
        raise ValueError(
            f"holidays has no calendar for country {value!r}; expected an ISO 3166 code "
            "such as DE or US"
        )
    return code


def _check_days(value: list[Weekday] | None) -> list[Weekday] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("business_days must name at least one day, e.g. [mon, tue, wed, thu, fri]")
    if len(set(value)) != len(value):
        raise ValueError(f"business_days lists a day twice: {value}")
    return value


class _Schedule(BaseModel):
    """Business-hours settings that an override may replace; unset fields keep the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1, description="fnmatch glob")
    timezone: str
    business_hours: str | None = None
    business_days: list[Weekday] | None = None
    holidays_country: str | None = None

    _timezone = field_validator("timezone")(_check_timezone)
    _country = field_validator("holidays_country")(_check_country)
    _days = field_validator("business_days")(_check_days)

    @field_validator("business_hours")
    @classmethod
    def _hours(cls, value: str | None) -> str | None:
        if value is not None:
            parse_business_hours(value)
        return value


class PrincipalOverride(_Schedule):
    """Schedule for the principals whose name matches the ``match`` glob (fnmatch)."""


class AccountOverride(_Schedule):
    """Schedule for the accounts (AWS account, GCP project, Azure subscription) matching ``match``."""


class OffHoursParams(DetectorParams):
    """Parameters of :class:`OffHoursDetector`."""

    timezone: str = "UTC"
    business_hours: str = "08:00-19:00"
    business_days: list[Weekday] = Field(default_factory=lambda: list(DEFAULT_BUSINESS_DAYS))
    holidays_country: str | None = None
    principal_types: list[str] = Field(default_factory=lambda: sorted(HUMAN_PRINCIPAL_TYPES))
    overrides: list[PrincipalOverride] = Field(default_factory=list)
    account_overrides: list[AccountOverride] = Field(default_factory=list)
    min_reads: int = Field(default=1, ge=1)
    baseline_days: int = Field(default=30, ge=1, le=366)
    habit_days: int = Field(default=4, ge=1)
    high_distinct_secrets: int = Field(default=5, ge=1)
    baseline: Literal["learned", "office_hours", "both"] = "both"
    learning_days: int = Field(default=28, ge=7, le=366)
    min_learning_days: int = Field(default=10, ge=1)
    neighbour_weight: float = Field(default=0.5, ge=0, le=1)
    same_hour_weight: float = Field(default=0.5, ge=0, le=1)
    min_support: float = Field(default=1.0, gt=0)
    slack_hours: int = Field(default=1, ge=0, le=12)

    _timezone = field_validator("timezone")(_check_timezone)
    _country = field_validator("holidays_country")(_check_country)

    @field_validator("business_days")
    @classmethod
    def _days(cls, value: list[Weekday]) -> list[Weekday]:
        _check_days(value)
        return value

    @field_validator("business_hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        parse_business_hours(value)
        return value

    @field_validator("principal_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(PRINCIPAL_TYPES))
        if unknown:
            raise ValueError(
                f"unknown principal types {unknown}; expected some of {PRINCIPAL_TYPES}"
            )
        if not value:
            raise ValueError("principal_types is empty, so the detector could never fire")
        return value


class _Profile:
    """One resolved schedule: time zone, business minutes, business days, holiday calendar."""

    def __init__(self, timezone: str, hours: str, days: list[Weekday], country: str | None) -> None:
        self.timezone = timezone
        self.hours = hours
        self.start, self.end = parse_business_hours(hours)
        self.days = days
        self.weekday_numbers = np.array([WEEKDAYS.index(day) for day in days])
        self.country = country

    def holiday_names(self, dates: pd.Series) -> pd.Series:
        """Return the holiday name for each local date, or None on ordinary days."""
        if self.country is None or dates.empty:
            return pd.Series(None, index=dates.index, dtype=object)
        unique = pd.Series(dates.unique())
        calendar = _calendar(self.country, int(unique.min().year), int(unique.max().year))
        names = {day: calendar.get(day) for day in unique}
        return dates.map(names).astype(object)


@cache
def _calendar(country: str, first_year: int, last_year: int) -> holidays.HolidayBase:
    return holidays.country_holidays(country, years=range(first_year, last_year + 1))


@register
class OffHoursDetector(Detector):
    """Secret reads outside business hours, or outside the hours the principal usually reads.

    A read is action ``read``, or ``decrypt`` that no service made on the principal's behalf,
    that did not fail (failed attempts are the concern of ``keytrail.failure_burst``).
    Each principal gets a schedule: the first principal override whose ``match`` glob fits,
    else the first account override, else the defaults. One finding per principal and local
    calendar day with at least ``min_reads`` flagged read events.

    ``baseline`` chooses what a read is compared with:

    * ``office_hours``: the schedule. A read on a holiday, a weekend day or outside business
      hours is flagged.
    * ``learned``: the principal's own hours of the week over the ``learning_days`` before the
      read's local day. An hour's count is the number of those days with a read in that hour
      of the week, plus ``neighbour_weight`` times the counts of the hour before and after
      (across midnight and the week's end). The support of a read is its hour's count plus
      ``same_hour_weight`` times the sum of the counts of the same hour on the other days of
      the same kind (business days or not), because people keep similar hours on every
      working day. A read whose support is below ``min_support`` is flagged, inside business
      hours too, and so is a read on a public holiday of ``holidays_country``. Inside
      business hours (on a business day that is not a holiday) a read takes the highest
      support of the hours within ``slack_hours`` of its own, so it is flagged only when no
      hour that close reaches ``min_support``. The pattern counts whole clock hours, and
      without the slack a read at 17:39 by someone who sometimes reads until 16:57 is judged
      by the 17:00 hour alone. Outside business hours only the read's own hour counts.
      Principals with fewer than ``min_learning_days`` days of reads are not judged and are
      counted in ``report_["skipped_no_history"]``.
    * ``both`` (default): learned where the principal has ``min_learning_days``, the schedule
      otherwise. A night-shift engineer who reads at 02:00 every day is then quiet.

    Parameters: ``timezone``, ``business_hours`` (``HH:MM-HH:MM``), ``business_days``,
    ``holidays_country``, ``principal_types`` (people by default; workloads opt in),
    ``overrides``, ``account_overrides``, ``min_reads``, ``baseline_days`` (30),
    ``habit_days`` (4), ``high_distinct_secrets`` (5), ``baseline`` (both), ``learning_days``
    (28), ``min_learning_days`` (10), ``neighbour_weight`` (0.5), ``same_hour_weight`` (0.5),
    ``min_support`` (1.0), ``slack_hours`` (1; 0 judges every read at its own hour).

    Severity against the schedule is medium. It is high when the principal had no off-hours
    day in the baseline and read at least ``high_distinct_secrets`` distinct secrets, and low
    when off-hours reads are a habit (at least ``habit_days`` off-hours days in the baseline).
    Severity against the learned hours is low when every flagged read was inside business
    hours and medium otherwise.

    History comes from the hourly rollup, and a rollup row is placed at its first event's
    local time. NOTE: in a time zone with a 30- or 45-minute offset a rollup hour spans two
    local hours. Its off-hours verdict checks its first and last event, which is exact for one
    business interval per day, but its learned hour is that of the first event only.

    Blind spots: people who travel read in another time zone than their configured one. A
    learned pattern accepts whatever the principal did in the learning period, including an
    attacker's habits.

    ATT&CK: T1555.006 (Cloud Secrets Management Stores), T1078.004 (Cloud Accounts).
    """

    id: ClassVar[str] = "keytrail.off_hours"
    mitre: ClassVar[tuple[str, ...]] = ("T1555.006", "T1078.004")
    Params: ClassVar[type[DetectorParams]] = OffHoursParams
    params: OffHoursParams

    @property
    def lookback(self) -> timedelta:
        """The longer of the baseline and learning days, plus one for local days before UTC."""
        return timedelta(days=max(self.params.baseline_days, self.params.learning_days) + 1)

    def _profiles(self) -> list[_Profile]:
        params = self.params
        default = _Profile(
            params.timezone, params.business_hours, params.business_days, params.holidays_country
        )
        profiles = [default]
        for override in [*params.overrides, *params.account_overrides]:
            explicit_fields = override.model_fields_set
            profiles.append(
                _Profile(
                    override.timezone,
                    override.business_hours or default.hours,
                    override.business_days or default.days,
                    override.holidays_country
                    if "holidays_country" in explicit_fields
                    else default.country,
                )
            )
        return profiles

    def _profile_index(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the schedule index of each row: principal override, account override, default."""
        params = self.params

        def first_match(value: Any, patterns: list[str], offset: int) -> int:
            if value is None or value is pd.NA:
                return -1
            for position, pattern in enumerate(patterns):
                if fnmatch.fnmatchcase(str(value), pattern):
                    return offset + position
            return -1

        by_principal = [override.match for override in params.overrides]
        by_account = [override.match for override in params.account_overrides]
        principals = frame["principal"].astype(object)
        accounts = frame["account"].astype(object)
        principal_hits = {
            value: first_match(value, by_principal, 1) for value in principals.dropna().unique()
        }
        account_hits = {
            value: first_match(value, by_account, 1 + len(by_principal))
            for value in accounts.dropna().unique()
        }
        from_principal = principals.map(principal_hits).fillna(-1).astype(int).to_numpy()
        from_account = accounts.map(account_hits).fillna(-1).astype(int).to_numpy()
        index = np.where(from_principal >= 0, from_principal, from_account)
        return np.where(index >= 0, index, 0)

    def _localize(self, reads: pd.DataFrame) -> pd.DataFrame:
        """Add local time fields and the off-hours verdict, converting once per schedule."""
        profiles = self._profiles()
        profile_index = self._profile_index(reads)
        parts = []
        for number in np.unique(profile_index):
            profile = profiles[int(number)]
            group = reads[profile_index == number].copy()
            local = group["time"].dt.tz_convert(profile.timezone)
            minutes = (local.dt.hour * 60 + local.dt.minute).to_numpy()
            weekday = local.dt.day_of_week.to_numpy()
            local_date = local.dt.date
            holiday = profile.holiday_names(local_date)
            is_business_day = np.isin(weekday, profile.weekday_numbers)
            in_hours = (minutes >= profile.start) & (minutes < profile.end)
            is_holiday = holiday.notna().to_numpy()
            group["local_date"] = local_date
            group["local_hour"] = local.dt.hour.to_numpy()
            group["local_time"] = local.dt.strftime("%H:%M").astype(object)
            group["day"] = (local.dt.tz_localize(None).dt.normalize() - pd.Timestamp(0)).dt.days
            group["weekday"] = weekday
            group["profile"] = int(number)
            group["off"] = ~is_business_day | is_holiday | ~in_hours
            if "last_time" in group.columns:
                # A rollup row is off-hours when its first or its last event is.
                group["off"] |= self._off_at(group["last_time"], profile)
            group["reason"] = np.select(
                [is_holiday, ~is_business_day, ~in_hours],
                ["holiday", "weekend", "outside business hours"],
                default="",
            )
            group["holiday"] = holiday
            group["holiday_country"] = profile.country
            group["timezone"] = profile.timezone
            group["business_hours"] = profile.hours
            parts.append(group)
        return pd.concat(parts).sort_values("time", kind="stable")

    @staticmethod
    def _off_at(times: pd.Series, profile: _Profile) -> np.ndarray:
        """Return the off-hours verdict of ``times`` under ``profile``."""
        local = times.dt.tz_convert(profile.timezone)
        minutes = (local.dt.hour * 60 + local.dt.minute).to_numpy()
        is_business_day = np.isin(local.dt.day_of_week.to_numpy(), profile.weekday_numbers)
        is_holiday = profile.holiday_names(local.dt.date).notna().to_numpy()
        in_hours = (minutes >= profile.start) & (minutes < profile.end)
        return np.asarray(~is_business_day | is_holiday | ~in_hours)

    def _keep(self, frame: pd.DataFrame) -> np.ndarray:
        """Return True for successful reads of the watched principal types."""
        keep = (
            read_mask(frame)
            & (frame["outcome"].astype(object) != "failure")
            & frame["principal_type"].isin(self.params.principal_types).fillna(False)
            & frame["principal"].notna()
        )
        return keep.to_numpy(dtype=bool)

    def _history_reads(self, history: HistoryView, current: pd.DataFrame) -> pd.DataFrame:
        """Return the rollup rows of earlier reads by the window's principals, one row each.

        Each row stands for ``weight`` reads at ``time`` (its first event); ``last_time`` is
        its last event.
        """
        start = current["time"].min()
        rollup = history.rollup(
            since=start - self.lookback, until=start, columns=list(_ROLLUP_COLUMNS)
        )
        if rollup.empty:
            return rollup
        rollup = rollup[self._keep(rollup)]
        rollup = rollup[rollup["principal"].isin(current["principal"].unique()).to_numpy(bool)]
        earlier = rollup.drop(columns=["hour"]).rename(
            columns={"first_time": "time", "count": "weight"}
        )
        earlier[IN_WINDOW] = False
        return earlier.reset_index(drop=True)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per principal and local day with flagged reads in ``window``."""
        params = self.params
        self.report_: dict[str, Any] = {
            "skipped_no_history": 0,
            "learned_principals": 0,
            "office_hours_principals": 0,
        }
        if window.empty:
            return build_findings([], detector=self)
        current = window[self._keep(window)][[*_COLUMNS, "event_uid"]].copy()
        current = current[current["time"].notna().to_numpy(dtype=bool)]
        if current.empty:
            return build_findings([], detector=self)
        current["weight"] = 1
        current["last_time"] = current["time"]
        current[IN_WINDOW] = True
        earlier = self._history_reads(history, window[window["time"].notna()])
        reads = pd.concat([earlier, current], ignore_index=True) if len(earlier) else current
        reads = self._localize(reads.sort_values("time", kind="stable"))
        reads["code"] = pd.factorize(reads["principal"])[0]
        reads = self._judge(reads)

        flagged = reads[reads["flag"] & reads[IN_WINDOW]]
        if flagged.empty:
            return build_findings([], detector=self)
        days = _day_findings(flagged)
        days = days[days["events"] >= params.min_reads]
        if days.empty:
            return build_findings([], detector=self)

        days = _add_baseline(days, reads, params.baseline_days)
        no_habit = days["prior_off_days"] == 0
        learned = (days["mode"] == "learned").to_numpy()
        days["severity"] = np.select(
            [
                learned & days["office_off"].to_numpy(dtype=bool),
                learned,
                no_habit & (days["distinct_secrets"] >= params.high_distinct_secrets),
                days["prior_off_days"] >= params.habit_days,
            ],
            ["medium", "low", "high", "low"],
            default="medium",
        )
        logger.debug("%s: %s flagged principal-days", self.id, len(days))
        return build_findings(_finding_rows(days, params), detector=self)

    def _judge(self, reads: pd.DataFrame) -> pd.DataFrame:
        """Add ``flag``, ``mode`` and the learned ``support`` of each window read.

        ``mode`` is ``learned``, ``office_hours`` or ``skipped`` (learned only, not enough
        history). History rows get mode ``history`` and are never flagged.
        """
        params = self.params
        if params.baseline == "office_hours":
            support, active_days = np.zeros(len(reads)), np.zeros(len(reads), dtype=np.int64)
        else:
            support, active_days = _learned_support(reads, self._profiles(), params)
        enough = active_days >= params.min_learning_days
        window_rows = reads[IN_WINDOW].to_numpy(dtype=bool)
        use_learned = enough if params.baseline != "office_hours" else np.zeros_like(enough)
        fallback = "skipped" if params.baseline == "learned" else "office_hours"
        mode = np.where(use_learned, "learned", fallback)
        mode = np.where(window_rows, mode, "history")
        off_pattern = support < params.min_support
        # A learned pattern cannot know the calendar, so a public holiday still counts.
        holiday = reads["holiday"].notna().to_numpy(dtype=bool)
        reads["office_off"] = reads["off"]
        reads["support"] = support
        reads["active_days"] = active_days
        reads["mode"] = mode
        reads["flag"] = np.select(
            [mode == "learned", mode == "office_hours"],
            [off_pattern | holiday, reads["off"].to_numpy(dtype=bool)],
            default=False,
        )
        learned_reason = np.where(holiday, "holiday", "outside usual hours")
        reads["reason"] = np.where(mode == "learned", learned_reason, reads["reason"])
        in_window = reads[window_rows]
        for name in ("learned", "office_hours", "skipped"):
            principals = in_window.loc[in_window["mode"] == name, "principal"].nunique()
            key = "skipped_no_history" if name == "skipped" else f"{name}_principals"
            self.report_[key] = int(principals)
        return reads


def _day_findings(flagged: pd.DataFrame) -> pd.DataFrame:
    """Aggregate off-hours reads into one row per principal and local day."""
    grouped = flagged.groupby(["code", "day"], sort=True)
    days = grouped.agg(
        principal=("principal", "first"),
        principal_type=("principal_type", "first"),
        cloud=("cloud", "first"),
        account=("account", "first"),
        local_date=("local_date", "first"),
        timezone=("timezone", "first"),
        business_hours=("business_hours", "first"),
        holiday=("holiday", "first"),
        holiday_country=("holiday_country", "first"),
        first_seen=("time", "min"),
        last_seen=("time", "max"),
        events=("event_uid", "nunique"),
        distinct_secrets=("resource", "nunique"),
        mode=("mode", "first"),
        office_off=("office_off", "any"),
        support=("support", "min"),
        active_days=("active_days", "first"),
    ).reset_index()
    group = grouped.ngroup().to_numpy()
    size = len(days)
    for name, column in (
        ("event_uids", "event_uid"),
        ("resources", "resource"),
        ("source_ips", "source_ip"),
        ("countries", "geo_country"),
        ("local_times", "local_time"),
        ("reasons", "reason"),
        ("principal_arns", "principal_arn"),
    ):
        days[name] = distinct_lists(group, flagged[column], size)
    labels = flagged["weekday"].map(lambda day: WEEKDAYS[int(day)].capitalize()).astype(str)
    labels = labels + " " + flagged["local_hour"].map("{:02d}:00".format)
    days["hours_of_week"] = distinct_lists(group, labels, size)
    operations = value_counts_by_group(group, flagged["operation"], size)
    days["operations"] = pd.Series(operations, index=days.index, dtype=object)
    # One small list per finding: each address with the place GeoIP gave it.
    locations = [located_addresses(rows) for _, rows in flagged.groupby(group, sort=True)]
    days["locations"] = pd.Series(locations, index=days.index, dtype=object)
    return days


def _add_baseline(days: pd.DataFrame, reads: pd.DataFrame, baseline_days: int) -> pd.DataFrame:
    """Add the off-hours day count and usual local hours of the ``baseline_days`` before each day.

    Both are computed from reads on earlier local days only, so a backfill over many days gets
    the same baselines as a run per day.
    """
    per_day = reads.groupby(["code", "day"], sort=True)
    # History rows are learned from whatever their mode; only office-hours verdicts count here.
    table = per_day["office_off"].any().reset_index().rename(columns={"office_off": "off"})
    # Days are small positive integers (days since 1970), so code * 10**6 + day keeps groups apart.
    scale = 10**6
    keys = table["code"].to_numpy(np.int64) * scale + table["day"].to_numpy(np.int64)
    query = days["code"].to_numpy(np.int64) * scale + days["day"].to_numpy(np.int64)
    first = np.searchsorted(keys, query - baseline_days, side="left")
    last = np.searchsorted(keys, query, side="left")

    off_cumulative = np.concatenate([[0], np.cumsum(table["off"].to_numpy(np.int64))])
    days["prior_off_days"] = off_cumulative[last] - off_cumulative[first]

    # Hour histogram per principal-day; prefix sums give the histogram of any day range.
    row_of_read = per_day.ngroup().to_numpy()
    histogram = np.zeros((len(table), 24), dtype=np.int64)
    weights = reads["weight"].to_numpy(np.int64)
    np.add.at(histogram, (row_of_read, reads["local_hour"].to_numpy(np.int64)), weights)
    prefix = np.vstack([np.zeros((1, 24), dtype=np.int64), np.cumsum(histogram, axis=0)])
    prior = prefix[last] - prefix[first]
    days["prior_reads"] = prior.sum(axis=1)
    days["usual_hours"] = usual_hours_span(prior)
    return days


def usual_hours_span(histograms: np.ndarray, share: float = _USUAL_SHARE) -> list[str | None]:
    """Return the shortest span of local hours holding ``share`` of each histogram's reads.

    ``histograms`` has one row of 24 hourly counts per principal. A span may cross midnight
    ("22:00-06:00"); of equally short spans the one with the most reads wins, then the
    earliest start. A row without reads gives None.
    """
    rows = len(histograms)
    if rows == 0:
        return []
    total = histograms.sum(axis=1)
    doubled = np.concatenate([histograms, histograms], axis=1)
    prefix = np.concatenate(
        [np.zeros((rows, 1), dtype=np.int64), np.cumsum(doubled, axis=1)], axis=1
    )
    starts = np.arange(24)
    spans: list[str | None] = [None] * rows
    pending = total > 0
    for length in range(1, 25):
        if not pending.any():
            break
        covered = prefix[:, starts + length] - prefix[:, starts]
        fits = covered >= share * total[:, None]
        found = pending & fits.any(axis=1)
        best = np.argmax(np.where(fits, covered, -1), axis=1)
        for row in np.flatnonzero(found):
            begin = int(best[row])
            end = (begin + length) % 24
            spans[row] = (
                f"{begin:02d}:00-{end if end else 24:02d}:00" if length < 24 else ("00:00-24:00")
            )
        pending &= ~found
    return spans


def _learned_support(
    reads: pd.DataFrame, profiles: list[_Profile], params: OffHoursParams
) -> tuple[np.ndarray, np.ndarray]:
    """Return the learned support of each read, and the active days.

    Both count the ``learning_days`` local days before the read's own day (see
    :class:`OffHoursDetector`). A read inside business hours whose own hour is below
    ``min_support`` gets the highest support of the hours within ``slack_hours``. History
    rows get 0 and 0: they are never judged.
    """
    size = len(reads)
    support = np.zeros(size)
    active = np.zeros(size, dtype=np.int64)
    window_rows = reads[IN_WINDOW].to_numpy(dtype=bool)
    if not window_rows.any():
        return support, active
    per_day = reads.groupby(["code", "day"], sort=True)
    table = per_day.size().reset_index()[["code", "day"]]
    row_of_read = per_day.ngroup().to_numpy()
    hour_of_week = reads["weekday"].to_numpy(np.int64) * 24 + reads["local_hour"].to_numpy(np.int64)
    presence = np.zeros((len(table), 168), dtype=np.int32)
    presence[row_of_read, hour_of_week] = 1
    prefix = np.vstack(
        [np.zeros((1, 168), dtype=np.int32), np.cumsum(presence, axis=0, dtype=np.int32)]
    )
    del presence

    # Days are small positive integers (days since 1970), so code * 10**6 + day keeps groups apart.
    scale = 10**6
    keys = table["code"].to_numpy(np.int64) * scale + table["day"].to_numpy(np.int64)
    queries = reads.loc[window_rows, ["code", "day"]]
    query_keys = queries["code"].to_numpy(np.int64) * scale + queries["day"].to_numpy(np.int64)
    unique_keys, query_row = np.unique(query_keys, return_inverse=True)
    first = np.searchsorted(keys, unique_keys - params.learning_days, side="left")
    last = np.searchsorted(keys, unique_keys, side="left")
    learned = prefix[last] - prefix[first]
    active[window_rows] = (last - first)[query_row]

    business = np.array(
        [[day in profile.weekday_numbers for day in range(7)] for profile in profiles]
    )
    kinds = business[reads["profile"].to_numpy(np.int64)[window_rows]]
    slot = hour_of_week[window_rows]
    window_support = _slot_support(learned, query_row, slot, kinds, params)

    # The slack can only change the verdict of reads below min_support inside business hours,
    # so only those are scored again, once per hour of offset.
    inside_hours = ~reads["off"].to_numpy(dtype=bool)[window_rows]
    candidates = np.flatnonzero(inside_hours & (window_support < params.min_support))
    if params.slack_hours and candidates.size:
        nearby = window_support[candidates]
        for offset in range(1, params.slack_hours + 1):
            for shifted in (slot[candidates] - offset, slot[candidates] + offset):
                shifted_support = _slot_support(
                    learned, query_row[candidates], shifted % 168, kinds[candidates], params
                )
                nearby = np.maximum(nearby, shifted_support)
        window_support[candidates] = nearby
    support[window_rows] = window_support
    return support, active


def _slot_support(
    learned: np.ndarray,
    query_row: np.ndarray,
    slot: np.ndarray,
    kinds: np.ndarray,
    params: OffHoursParams,
) -> np.ndarray:
    """Return the support of each hour of the week in ``slot`` (0 is Monday 00:00).

    ``learned`` contains one row of 168 day counts per query and ``query_row`` picks each slot's
    row. ``kinds`` marks, per slot, which weekdays are business days in its schedule.
    """
    hour = slot % 24
    weekday = slot // 24
    positions = np.arange(len(slot))
    seen = learned[query_row, slot]
    neighbours = learned[query_row, (slot - 1) % 168] + learned[query_row, (slot + 1) % 168]
    same_kind = kinds == kinds[positions, weekday][:, None]
    same_kind[positions, weekday] = False
    slots = np.arange(7)[None, :] * 24 + hour[:, None]
    rows = query_row[:, None]
    same_hour = learned[rows, slots] + params.neighbour_weight * (
        learned[rows, (slots - 1) % 168] + learned[rows, (slots + 1) % 168]
    )
    other_days = (same_hour * same_kind).sum(axis=1)
    return np.asarray(
        seen + params.neighbour_weight * neighbours + params.same_hour_weight * other_days,
        dtype=np.float64,
    )


def _finding_rows(days: pd.DataFrame, params: OffHoursParams) -> list[dict[str, Any]]:
    baseline_days = params.baseline_days
    rows = []
    for day in iter_rows(days):
        # A day without earlier reads has a missing span, which pandas may hold as NaN.
        usual_hours = day.usual_hours if isinstance(day.usual_hours, str) else None
        usual = f"usual {usual_hours}" if usual_hours else "no reads"
        summary = f"{baseline_days}-day: {day.prior_off_days} off-hours days; {usual}"
        learned = day.mode == "learned"
        if learned:
            # A holiday read fires even at a usual hour, so the text names the comparison.
            compared = "below" if day.support < params.min_support else "not below"
            # Every flagged read of a day without an office-hours verdict was inside business
            # hours, so its support is the best of the hours within slack_hours.
            nearby = (
                f" at best within {params.slack_hours} h"
                if params.slack_hours and not day.office_off
                else ""
            )
            summary = (
                f"{params.learning_days}-day pattern: reads on {day.active_days} days, {usual}; "
                f"{', '.join(day.hours_of_week)} had support {day.support:.2f}{nearby} "
                f"({compared} {params.min_support:g})"
            )
        local_date: date = day.local_date
        rows.append(
            {
                "severity": day.severity,
                "title": (
                    f"{day.principal} read {_count_text(int(day.distinct_secrets), 'secret')} "
                    f"{_why_text(day)}, {local_date.isoformat()} ({day.timezone})"
                ),
                "principal": day.principal,
                "principal_type": day.principal_type,
                "cloud": day.cloud,
                "account": day.account,
                "resources": day.resources,
                "source_ips": day.source_ips,
                "countries": day.countries,
                "first_seen": day.first_seen,
                "last_seen": day.last_seen,
                "event_uids": day.event_uids,
                "event_count": int(day.events),
                "evidence": {
                    "local_date": local_date.isoformat(),
                    "timezone": day.timezone,
                    "business_hours": day.business_hours,
                    "reasons": day.reasons,
                    "holiday": day.holiday,
                    "events": int(day.events),
                    "distinct_secrets": int(day.distinct_secrets),
                    "local_times": day.local_times,
                    "operations": day.operations,
                    "locations": day.locations,
                    "principal_arns": [arn for arn in day.principal_arns if arn != day.principal],
                    "hours_of_week": day.hours_of_week,
                },
                "baseline": {
                    "mode": day.mode,
                    "days": baseline_days,
                    "off_hours_days": int(day.prior_off_days),
                    "reads": int(day.prior_reads),
                    "usual_hours": usual_hours,
                    "learning_days": params.learning_days,
                    "active_days": int(day.active_days),
                    "support": round(float(day.support), 2) if learned else None,
                    "summary": summary,
                },
            }
        )
    return rows


def _count_text(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _why_text(day: Any) -> str:
    """Say why a day's reads are off-hours, for the title.

    A holiday and a weekend apply to the whole local day, so the reads of one day share the
    first of these reasons that applies: holiday, then weekend, then outside business hours.
    """
    reasons = list(day.reasons)
    if "holiday" in reasons:
        where = f", {day.holiday_country}" if isinstance(day.holiday_country, str) else ""
        return f"on a public holiday ({day.holiday}{where})"
    if "weekend" in reasons:
        return "on a weekend day"
    if "outside usual hours" in reasons:
        return "outside its usual hours"
    return "outside business hours"
