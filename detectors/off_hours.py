"""``keytrail.off_hours``: secret reads outside the principal's business hours."""

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
    load_context,
    located_addresses,
    read_mask,
    value_counts_by_group,
)
from detectors.base import Detector, DetectorParams, HistoryView, build_findings, register
from pipeline.schema import HUMAN_PRINCIPAL_TYPES, PRINCIPAL_TYPES

__all__ = ["AccountOverride", "OffHoursDetector", "OffHoursParams", "PrincipalOverride"]

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
    """Secret reads outside business hours in the principal's time zone.

    A read is action ``read``, or ``decrypt`` that no service made on the principal's behalf,
    that did not fail (failed attempts are the concern of ``keytrail.failure_burst``).
    Each principal gets a schedule: the first principal override whose ``match`` glob fits,
    else the first account override, else the defaults. One finding per principal and local
    calendar day with at least ``min_reads`` off-hours read events.

    Parameters: ``timezone``, ``business_hours`` (``HH:MM-HH:MM``), ``business_days``,
    ``holidays_country``, ``principal_types`` (people by default; workloads opt in),
    ``overrides``, ``account_overrides``, ``min_reads``, ``baseline_days`` (30),
    ``habit_days`` (4), ``high_distinct_secrets`` (5).

    Severity is medium. It is high when the principal had no off-hours day in the baseline
    and read at least ``high_distinct_secrets`` distinct secrets, and low when off-hours reads
    are a habit (at least ``habit_days`` off-hours days in the baseline).

    Blind spots: people who travel read in another time zone than their configured one, and
    the usual-hours summary assumes a day shift (it does not wrap around midnight).

    ATT&CK: T1555.006 (Cloud Secrets Management Stores), T1078.004 (Cloud Accounts).
    """

    id: ClassVar[str] = "keytrail.off_hours"
    mitre: ClassVar[tuple[str, ...]] = ("T1555.006", "T1078.004")
    Params: ClassVar[type[DetectorParams]] = OffHoursParams
    params: OffHoursParams

    @property
    def lookback(self) -> timedelta:
        """The baseline days plus one, since local days can start before the UTC day."""
        return timedelta(days=self.params.baseline_days + 1)

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
            group["off"] = ~is_business_day | is_holiday | ~in_hours
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

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        """Return one finding per principal and local day with off-hours reads in ``window``."""
        params = self.params
        context = load_context(window, history, self.lookback, _COLUMNS)
        if context.empty:
            return build_findings([], detector=self)
        keep = (
            read_mask(context)
            & (context["outcome"].astype(object) != "failure")
            & context["principal_type"].isin(params.principal_types).fillna(False)
            & context["principal"].notna()
        )
        reads = context[keep.to_numpy(dtype=bool)]
        if not reads[IN_WINDOW].any():
            return build_findings([], detector=self)
        reads = self._localize(reads)
        reads["code"] = pd.factorize(reads["principal"])[0]

        flagged = reads[reads["off"] & reads[IN_WINDOW]]
        if flagged.empty:
            return build_findings([], detector=self)
        days = _day_findings(flagged)
        days = days[days["events"] >= params.min_reads]
        if days.empty:
            return build_findings([], detector=self)

        days = _add_baseline(days, reads, params.baseline_days)
        no_habit = days["prior_off_days"] == 0
        days["severity"] = np.select(
            [
                no_habit & (days["distinct_secrets"] >= params.high_distinct_secrets),
                days["prior_off_days"] >= params.habit_days,
            ],
            ["high", "low"],
            default="medium",
        )
        logger.debug("%s: %s off-hours principal-days", self.id, len(days))
        return build_findings(_finding_rows(days, params.baseline_days), detector=self)


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
    table = per_day["off"].any().reset_index()
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
    np.add.at(histogram, (row_of_read, reads["local_hour"].to_numpy(np.int64)), 1)
    prefix = np.vstack([np.zeros((1, 24), dtype=np.int64), np.cumsum(histogram, axis=0)])
    prior = prefix[last] - prefix[first]
    total = prior.sum(axis=1)
    cumulative = np.cumsum(prior, axis=1)
    low = np.argmax(cumulative >= 0.1 * total[:, None], axis=1)
    high = np.argmax(cumulative >= 0.9 * total[:, None], axis=1)
    days["prior_reads"] = total
    days["usual_hours"] = [
        f"{lo:02d}:00-{hi + 1:02d}:00" if count else None
        for lo, hi, count in zip(low, high, total, strict=True)
    ]
    return days


def _finding_rows(days: pd.DataFrame, baseline_days: int) -> list[dict[str, Any]]:
    rows = []
    for day in iter_rows(days):
        usual = f"usual {day.usual_hours}" if day.usual_hours else "no reads"
        summary = f"{baseline_days}-day: {day.prior_off_days} off-hours days; {usual}"
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
                },
                "baseline": {
                    "days": baseline_days,
                    "off_hours_days": int(day.prior_off_days),
                    "reads": int(day.prior_reads),
                    "usual_hours": day.usual_hours,
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
    return "outside business hours"
