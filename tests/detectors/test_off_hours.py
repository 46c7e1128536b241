"""Tests for keytrail.off_hours: named positive and negative cases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory
from detectors.off_hours import OffHoursDetector, parse_business_hours, usual_hours_span
from tests.detectors.conftest import ACCOUNT, ALICE, DEPLOY_ROLE, NOW, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
BERLIN: dict[str, Any] = {"timezone": "Europe/Berlin"}


def detect(
    make_events: Build,
    window: list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
    **params: Any,
) -> pd.DataFrame:
    detector = OffHoursDetector(**params)
    earlier = FrameHistory(make_events(history)) if history else FrameHistory()
    return detector.detect(make_events(window), earlier, NOW)


def test_berlin_user_at_2am_fires(make_events: Build) -> None:
    # 2024-06-12 is a Wednesday; 00:00 UTC is 02:00 in Berlin (CEST).
    findings = detect(make_events, [aws_read("2024-06-12T00:00:00Z")], **BERLIN)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["detector"] == "keytrail.off_hours"
    assert finding["severity"] == "medium"
    assert finding["principal"] == ALICE
    assert finding["title"] == (
        f"{ALICE} read 1 secret outside business hours, 2024-06-12 (Europe/Berlin)"
    )
    assert finding["mitre"] == ["T1555.006", "T1078.004"]
    assert finding["event_count"] == 1
    assert finding["evidence"]["local_times"] == ["02:00"]
    assert finding["evidence"]["reasons"] == ["outside business hours"]
    assert finding["evidence"]["business_hours"] == "08:00-19:00"
    assert finding["evidence"]["operations"] == {"GetSecretValue": 1}
    assert finding["baseline"]["off_hours_days"] == 0
    assert finding["baseline"]["summary"] == "30-day: 0 off-hours days; no reads"


def test_berlin_user_at_10am_does_not_fire(make_events: Build) -> None:
    findings = detect(make_events, [aws_read("2024-06-12T08:00:00Z")], **BERLIN)
    assert findings.empty
    assert list(findings.columns) == list(FINDING_COLUMNS)


def test_end_of_business_hours_is_exclusive(make_events: Build) -> None:
    # 17:00 UTC is 19:00 in Berlin, the first off-hours minute of 08:00-19:00.
    findings = detect(make_events, [aws_read("2024-06-12T16:59:00Z")], **BERLIN)
    assert findings.empty
    findings = detect(make_events, [aws_read("2024-06-12T17:00:00Z")], **BERLIN)
    assert findings["evidence"].iloc[0]["local_times"] == ["19:00"]


def test_ci_role_at_2am_does_not_fire(make_events: Build) -> None:
    window = [aws_read("2024-06-12T00:00:00Z", DEPLOY_ROLE, principal_type="role")]
    assert detect(make_events, window, **BERLIN).empty


def test_workload_fires_when_opted_in(make_events: Build) -> None:
    window = [aws_read("2024-06-12T00:00:00Z", DEPLOY_ROLE, principal_type="role")]
    findings = detect(make_events, window, principal_types=["role"], **BERLIN)
    assert findings["principal"].tolist() == [DEPLOY_ROLE]


def test_weekend_fires(make_events: Build) -> None:
    # 2024-06-15 is a Saturday; 09:00 UTC is 11:00 in Berlin.
    findings = detect(make_events, [aws_read("2024-06-15T09:00:00Z")], **BERLIN)
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["reasons"] == ["weekend"]
    assert findings["title"].iloc[0] == (
        f"{ALICE} read 1 secret on a weekend day, 2024-06-15 (Europe/Berlin)"
    )


def test_holiday_fires(make_events: Build) -> None:
    # 2024-10-03 (Thursday) is German Unity Day; 08:00 UTC is 10:00 in Berlin.
    window = [aws_read("2024-10-03T08:00:00Z")]
    findings = detect(make_events, window, holidays_country="de", **BERLIN)
    assert len(findings) == 1
    evidence = findings["evidence"].iloc[0]
    assert evidence["reasons"] == ["holiday"]
    assert evidence["holiday"] == "German Unity Day"
    assert findings["title"].iloc[0] == (
        f"{ALICE} read 1 secret on a public holiday (German Unity Day, DE), "
        "2024-10-03 (Europe/Berlin)"
    )


def test_holiday_without_country_does_not_fire(make_events: Build) -> None:
    assert detect(make_events, [aws_read("2024-10-03T08:00:00Z")], **BERLIN).empty


def test_override_time_zone_shifts_verdict(make_events: Build) -> None:
    # 14:00 UTC is inside business hours in UTC but 23:00 in Tokyo.
    window = [aws_read("2024-06-12T14:00:00Z")]
    assert detect(make_events, window).empty
    overrides = [{"match": "alice@*", "timezone": "Asia/Tokyo"}]
    findings = detect(make_events, window, overrides=overrides)
    assert findings["evidence"].iloc[0]["timezone"] == "Asia/Tokyo"
    assert findings["evidence"].iloc[0]["local_times"] == ["23:00"]


def test_override_without_match_keeps_default(make_events: Build) -> None:
    overrides = [{"match": "bob@*", "timezone": "Asia/Tokyo"}]
    assert detect(make_events, [aws_read("2024-06-12T14:00:00Z")], overrides=overrides).empty


def test_principal_override_wins_over_account(make_events: Build) -> None:
    window = [aws_read("2024-06-12T14:00:00Z")]
    by_account = [{"match": ACCOUNT, "timezone": "Asia/Tokyo"}]
    findings = detect(make_events, window, account_overrides=by_account)
    assert findings["evidence"].iloc[0]["timezone"] == "Asia/Tokyo"
    by_principal = [{"match": ALICE, "timezone": "Europe/London"}]
    findings = detect(make_events, window, account_overrides=by_account, overrides=by_principal)
    assert findings.empty


def test_override_business_hours_replace_default(make_events: Build) -> None:
    overrides = [{"match": "alice@*", "timezone": "UTC", "business_hours": "06:00-14:00"}]
    findings = detect(make_events, [aws_read("2024-06-12T14:30:00Z")], overrides=overrides)
    assert findings["evidence"].iloc[0]["business_hours"] == "06:00-14:00"


def test_many_secrets_without_habit_is_high(make_events: Build) -> None:
    window = [aws_read("2024-06-12T00:05:00Z", secret=f"prod/app{n}") for n in range(5)]
    findings = detect(make_events, window, **BERLIN)
    assert findings["severity"].tolist() == ["high"]
    assert findings["evidence"].iloc[0]["distinct_secrets"] == 5
    assert findings["event_count"].tolist() == [5]
    assert findings["title"].iloc[0] == (
        f"{ALICE} read 5 secrets outside business hours, 2024-06-12 (Europe/Berlin)"
    )


def test_habit_of_off_hours_reads_is_low(make_events: Build) -> None:
    history = [aws_read(f"2024-06-0{day}T22:00:00Z") for day in (3, 4, 5, 6)]
    # Weekday office-hours reads; 2024-06-08 and 09 are a weekend and left out.
    history += [aws_read(f"2024-06-{day:02d}T08:00:00Z") for day in (3, 4, 5, 6, 7, 10, 11)]
    findings = detect(make_events, [aws_read("2024-06-12T00:00:00Z")], history, **BERLIN)
    assert findings["severity"].tolist() == ["low"]
    baseline = findings["baseline"].iloc[0]
    assert baseline["off_hours_days"] == 4
    assert baseline["reads"] == 11


def test_baseline_reports_usual_hours(make_events: Build) -> None:
    history = [
        aws_read(f"2024-06-{day:02d}T{hour:02d}:00:00Z")
        for day in range(3, 8)
        for hour in range(7, 15)
    ]
    findings = detect(make_events, [aws_read("2024-06-12T00:00:00Z")], history, **BERLIN)
    baseline = findings["baseline"].iloc[0]
    assert baseline["usual_hours"] == "09:00-17:00"
    assert baseline["summary"] == "30-day: 0 off-hours days; usual 09:00-17:00"


def test_backfill_baseline_sees_earlier_window_days(make_events: Build) -> None:
    window = [aws_read("2024-06-11T00:00:00Z"), aws_read("2024-06-12T00:00:00Z")]
    findings = detect(make_events, window, **BERLIN).sort_values("first_seen")
    assert [b["off_hours_days"] for b in findings["baseline"]] == [0, 1]
    assert [b["summary"] for b in findings["baseline"]] == [
        "30-day: 0 off-hours days; no reads",
        "30-day: 1 off-hours days; usual 02:00-03:00",
    ]
    assert [b["usual_hours"] for b in findings["baseline"]] == [None, "02:00-03:00"]


def test_history_older_than_baseline_is_ignored(make_events: Build) -> None:
    history = [aws_read(f"2024-05-0{day}T22:00:00Z") for day in (1, 2, 3, 4, 5)]
    findings = detect(make_events, [aws_read("2024-06-12T00:00:00Z")], history, **BERLIN)
    assert findings["baseline"].iloc[0]["off_hours_days"] == 0


def test_one_finding_per_local_day(make_events: Build) -> None:
    # 22:30 UTC on the 11th and 00:30 UTC on the 12th are both on 2024-06-12 in Berlin.
    window = [aws_read("2024-06-11T22:30:00Z"), aws_read("2024-06-12T00:30:00Z")]
    findings = detect(make_events, window, **BERLIN)
    assert len(findings) == 1
    assert findings["evidence"].iloc[0]["local_date"] == "2024-06-12"
    assert findings["evidence"].iloc[0]["local_times"] == ["00:30", "02:30"]


def test_min_reads_suppresses_single_read(make_events: Build) -> None:
    assert detect(make_events, [aws_read("2024-06-12T00:00:00Z")], min_reads=2, **BERLIN).empty


def test_service_invoked_decrypt_is_not_a_read(make_events: Build) -> None:
    kms = {"service": "kms", "operation": "Decrypt", "action": "decrypt"}
    by_service = aws_read("2024-06-12T00:00:00Z", invoked_by="secretsmanager.amazonaws.com", **kms)
    assert detect(make_events, [by_service], **BERLIN).empty
    direct = aws_read("2024-06-12T00:00:00Z", **kms)
    assert len(detect(make_events, [direct], **BERLIN)) == 1


def test_failed_read_does_not_fire(make_events: Build) -> None:
    failed = aws_read("2024-06-12T00:00:00Z", outcome="failure", failure_reason="denied")
    assert detect(make_events, [failed], **BERLIN).empty


def test_list_call_is_not_a_read(make_events: Build) -> None:
    listing = aws_read("2024-06-12T00:00:00Z", operation="ListSecrets", action="list")
    assert detect(make_events, [listing], **BERLIN).empty


def test_batch_read_counts_one_event(make_events: Build) -> None:
    batch = [
        aws_read(
            "2024-06-12T00:00:00Z",
            secret=name,
            event_uid="batch-1",
            operation="BatchGetSecretValue",
        )
        for name in ("a", "b", "c")
    ]
    findings = detect(make_events, batch, **BERLIN)
    assert findings["event_count"].tolist() == [1]
    assert findings["evidence"].iloc[0]["distinct_secrets"] == 3
    assert findings["event_uids"].iloc[0] == ["batch-1"]


def test_history_copy_of_window_not_counted(make_events: Build) -> None:
    row = aws_read("2024-06-12T00:00:00Z", event_uid="same")
    findings = detect(make_events, [row], [row], **BERLIN)
    assert findings["baseline"].iloc[0]["off_hours_days"] == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("08:00-19:00", (480, 1140)), ("00:00-24:00", (0, 1440)), (" 9:00-17:00 ", None)],
)
def test_parse_business_hours(text: str, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="expected HH:MM-HH:MM"):
            parse_business_hours(text)
    else:
        assert parse_business_hours(text) == expected


@pytest.mark.parametrize(
    ("params", "loc", "message"),
    [
        ({"timezone": "Mars/Olympus"}, ("timezone",), "unknown time zone 'Mars/Olympus'"),
        ({"business_hours": "19:00-08:00"}, ("business_hours",), "start must be before"),
        ({"business_hours": "25:00-26:00"}, ("business_hours",), "hours 00-24"),
        ({"business_days": []}, ("business_days",), "at least one day"),
        ({"business_days": ["monday"]}, ("business_days", 0), "Input should be"),
        ({"holidays_country": "XX"}, ("holidays_country",), "no calendar for country 'XX'"),
        ({"principal_types": ["robot"]}, ("principal_types",), "unknown principal types"),
        ({"min_reads": 0}, ("min_reads",), "greater than or equal to 1"),
        ({"slack_hours": -1}, ("slack_hours",), "greater than or equal to 0"),
        ({"slack_hours": 13}, ("slack_hours",), "less than or equal to 12"),
        (
            {"overrides": [{"match": "a*", "timezone": "Nowhere/City"}]},
            ("overrides", 0, "timezone"),
            "unknown time zone",
        ),
        (
            {"account_overrides": [{"match": "1*"}]},
            ("account_overrides", 0, "timezone"),
            "Field required",
        ),
        ({"time_zone": "UTC"}, ("time_zone",), "Extra inputs are not permitted"),
    ],
)
def test_invalid_params_name_the_field(
    params: dict[str, Any], loc: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        OffHoursDetector(**params)
    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == loc
    assert message in errors[0]["msg"]


def test_evidence_keeps_assumed_role_arn(make_events: Build) -> None:
    arn = "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_Admin_0a1b2c/alice@example.com"
    findings = detect(make_events, [aws_read("2024-06-12T00:00:00Z", principal_arn=arn)], **BERLIN)
    assert findings["evidence"].iloc[0]["principal_arns"] == [arn]


def test_evidence_drops_arn_equal_to_principal(make_events: Build) -> None:
    window = [aws_read("2024-06-12T00:00:00Z", principal_arn=ALICE)]
    findings = detect(make_events, window, **BERLIN)
    assert findings["evidence"].iloc[0]["principal_arns"] == []


def test_evidence_places_each_address(make_events: Build) -> None:
    window = [
        aws_read("2024-06-12T00:00:00Z", city="berlin", ip="203.0.113.10"),
        aws_read("2024-06-12T00:05:00Z", city="frankfurt", ip="198.51.100.7"),
        aws_read("2024-06-12T00:09:00Z", ip=None, source_kind="internal"),
    ]
    findings = detect(make_events, window, **BERLIN)
    assert findings["evidence"].iloc[0]["locations"] == [
        {"ip": "203.0.113.10", "city": "Berlin", "country": "DE"},
        {"ip": "198.51.100.7", "city": "Frankfurt am Main", "country": "DE"},
    ]


def weekdays_between(first: str, last: str) -> list[pd.Timestamp]:
    days = pd.date_range(first, last, freq="D", tz="UTC")
    return [day for day in days if day.day_of_week < 5]


def test_night_shift_learned_is_quiet(make_events: Build) -> None:
    # 00:30 UTC is 02:30 in Berlin; 2024-06-26 is a Wednesday.
    history = [
        aws_read(day + pd.Timedelta(minutes=30))
        for day in pd.date_range("2024-06-05", "2024-06-25", tz="UTC")
    ]
    window = [aws_read("2024-06-26T00:30:00Z")]
    assert detect(make_events, window, history, **BERLIN).empty
    office = detect(make_events, window, history, baseline="office_hours", **BERLIN)
    assert office["evidence"].iloc[0]["reasons"] == ["outside business hours"]


def test_read_outside_learned_hours_fires_low(make_events: Build) -> None:
    # Weekday reads at 09:00 Berlin for three weeks, then one at 16:00: inside business hours.
    history = [
        aws_read(day + pd.Timedelta(hours=7))
        for day in weekdays_between("2024-06-03", "2024-06-25")
    ]
    findings = detect(make_events, [aws_read("2024-06-26T14:00:00Z")], history, **BERLIN)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "low"
    assert finding["title"] == (
        f"{ALICE} read 1 secret outside its usual hours, 2024-06-26 (Europe/Berlin)"
    )
    assert finding["evidence"]["reasons"] == ["outside usual hours"]
    assert finding["evidence"]["hours_of_week"] == ["Wed 16:00"]
    baseline = finding["baseline"]
    assert baseline["mode"] == "learned"
    assert baseline["active_days"] == 17
    assert baseline["support"] == 0.0
    assert baseline["usual_hours"] == "09:00-10:00"
    assert baseline["summary"] == (
        "28-day pattern: reads on 17 days, usual 09:00-10:00; "
        "Wed 16:00 had support 0.00 at best within 1 h (below 1)"
    )


def test_learned_outside_office_hours_is_medium(make_events: Build) -> None:
    history = [
        aws_read(day + pd.Timedelta(hours=7))
        for day in weekdays_between("2024-06-03", "2024-06-25")
    ]
    findings = detect(make_events, [aws_read("2024-06-26T19:00:00Z")], history, **BERLIN)
    assert findings["severity"].tolist() == ["medium"]
    assert findings["evidence"].iloc[0]["hours_of_week"] == ["Wed 21:00"]


def test_neighbouring_hour_is_usual(make_events: Build) -> None:
    # Reads at 09:00 on 17 days support 10:00 with 0.5 * 17.
    history = [
        aws_read(day + pd.Timedelta(hours=7))
        for day in weekdays_between("2024-06-03", "2024-06-25")
    ]
    assert detect(make_events, [aws_read("2024-06-26T08:30:00Z")], history, **BERLIN).empty


def test_same_hour_other_weekday_is_usual(make_events: Build) -> None:
    # Reads at 14:00 Berlin on four Mondays and four Tuesdays; a Wednesday at 14:00 gets half
    # the sum of those days' counts at 14:00, (4 + 4) * 0.5 = 4.0.
    history = [
        aws_read(day + pd.Timedelta(hours=12))
        for day in weekdays_between("2024-06-03", "2024-06-25")
        if day.day_of_week < 2
    ]
    window = [aws_read("2024-06-26T12:10:00Z")]
    assert detect(make_events, window, history, min_learning_days=8, **BERLIN).empty
    strict = detect(make_events, window, history, min_learning_days=8, min_support=4.5, **BERLIN)
    assert strict["baseline"].iloc[0]["support"] == 4.0
    assert strict["baseline"].iloc[0]["active_days"] == 8


def working_day_history(late_hour_utc: int) -> list[dict[str, Any]]:
    """Return reads at 09:00 Berlin on 17 weekdays, plus one on 2024-06-17 and 2024-06-18.

    The two extra reads are at ``late_hour_utc``:20 UTC (Berlin is UTC+2 in June), the late
    end of a working day that the learned hours see on those two days only.
    """
    mornings = [
        aws_read(day + pd.Timedelta(hours=7))
        for day in weekdays_between("2024-06-03", "2024-06-25")
    ]
    late = [
        aws_read(pd.Timestamp(f"{day}T{late_hour_utc:02d}:20:00Z"))
        for day in ("2024-06-17", "2024-06-18")
    ]
    return mornings + late


def test_read_an_hour_past_learned_hours_is_quiet(make_events: Build) -> None:
    # Late reads at 16:20 Berlin on a Monday and a Tuesday, then Wednesday 17:40 in the next
    # hour. Its own hour has support 0.5 * 0.5 * (1 + 1) = 0.5 and the 16:00 hour 0.5 * 2 = 1.0.
    history = working_day_history(late_hour_utc=14)
    window = [aws_read("2024-06-26T15:40:00Z")]
    assert detect(make_events, window, history, **BERLIN).empty

    strict = detect(make_events, window, history, slack_hours=0, **BERLIN)
    assert strict["evidence"].iloc[0]["hours_of_week"] == ["Wed 17:00"]
    assert strict["baseline"].iloc[0]["support"] == 0.5
    assert strict["baseline"].iloc[0]["summary"] == (
        "28-day pattern: reads on 17 days, usual 09:00-17:00; Wed 17:00 had support 0.50 (below 1)"
    )


def test_read_two_hours_past_learned_hours_fires(make_events: Build) -> None:
    # The same late reads at 16:20 Berlin. Wednesday 18:40 is still inside business hours, but
    # the best hour within one hour of it is 17:00 with support 0.5.
    history = working_day_history(late_hour_utc=14)
    findings = detect(make_events, [aws_read("2024-06-26T16:40:00Z")], history, **BERLIN)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "low"
    assert finding["evidence"]["reasons"] == ["outside usual hours"]
    assert finding["evidence"]["local_times"] == ["18:40"]
    assert finding["baseline"]["support"] == 0.5
    assert finding["baseline"]["summary"] == (
        "28-day pattern: reads on 17 days, usual 09:00-17:00; "
        "Wed 18:00 had support 0.50 at best within 1 h (below 1)"
    )


def test_slack_skips_reads_outside_business_hours(make_events: Build) -> None:
    # Late reads at 18:20 Berlin on a Monday and a Tuesday support 18:00 with 1.0, but Wednesday
    # 19:40 is after business hours (08:00-19:00), so only its own hour counts: 0.5. With
    # business hours until 20:00 the read is inside them and the 18:00 hour keeps it quiet.
    history = working_day_history(late_hour_utc=16)
    window = [aws_read("2024-06-26T17:40:00Z")]
    assert detect(make_events, window, history, business_hours="08:00-20:00", **BERLIN).empty

    findings = detect(make_events, window, history, **BERLIN)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["severity"] == "medium"
    assert finding["evidence"]["hours_of_week"] == ["Wed 19:00"]
    assert finding["baseline"]["support"] == 0.5
    assert finding["baseline"]["summary"] == (
        "28-day pattern: reads on 17 days, usual 09:00-19:00; Wed 19:00 had support 0.50 (below 1)"
    )


def test_weekend_hour_not_learned_from_weekdays(make_events: Build) -> None:
    # Weekday reads at 14:00 do not support a Saturday at 14:00: a weekend day is another kind.
    history = [
        aws_read(day + pd.Timedelta(hours=12))
        for day in weekdays_between("2024-06-03", "2024-06-28")
    ]
    findings = detect(make_events, [aws_read("2024-06-29T12:10:00Z")], history, **BERLIN)
    assert findings["evidence"].iloc[0]["hours_of_week"] == ["Sat 14:00"]
    assert findings["baseline"].iloc[0]["support"] == 0.0


def test_learned_without_history_skips(make_events: Build) -> None:
    detector = OffHoursDetector(baseline="learned", **BERLIN)
    window = make_events([aws_read("2024-06-26T00:30:00Z")])
    findings = detector.detect(window, FrameHistory(), NOW)
    assert findings.empty
    assert detector.report_ == {
        "skipped_no_history": 1,
        "learned_principals": 0,
        "office_hours_principals": 0,
    }


def test_both_falls_back_to_office_hours(make_events: Build) -> None:
    detector = OffHoursDetector(**BERLIN)
    findings = detector.detect(make_events([aws_read("2024-06-26T00:30:00Z")]), FrameHistory(), NOW)
    assert findings["baseline"].iloc[0]["mode"] == "office_hours"
    assert detector.report_["office_hours_principals"] == 1


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        ({22: 3, 23: 3, 0: 3, 1: 3}, "22:00-02:00"),
        ({9: 5, 10: 5, 11: 5}, "09:00-12:00"),
        ({23: 10}, "23:00-24:00"),
        ({}, None),
    ],
)
def test_usual_hours_span_wraps_midnight(hours: dict[int, int], expected: str | None) -> None:
    histogram = np.zeros((1, 24), dtype=np.int64)
    for hour, count in hours.items():
        histogram[0, hour] = count
    assert usual_hours_span(histogram) == [expected]


def test_learning_days_param_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        OffHoursDetector(baseline="weekly")
    assert caught.value.errors()[0]["loc"] == ("baseline",)


def test_learned_judges_each_principal_day(make_events: Build) -> None:
    # Two principals over two days: each read is judged against its own principal's days.
    bob = "bob@example.com"
    history = [
        aws_read(day + pd.Timedelta(hours=hour), principal)
        for day in weekdays_between("2024-06-03", "2024-06-24")
        for principal, hour in ((ALICE, 7), (bob, 20))
    ]
    window = [
        aws_read("2024-06-25T07:10:00Z"),
        aws_read("2024-06-25T20:10:00Z", bob),
        aws_read("2024-06-26T20:20:00Z"),
        aws_read("2024-06-26T07:20:00Z", bob),
    ]
    findings = detect(make_events, window, history, **BERLIN).sort_values("principal")
    assert findings["principal"].tolist() == [ALICE, bob]
    assert [e["hours_of_week"] for e in findings["evidence"]] == [["Wed 22:00"], ["Wed 09:00"]]
    # 16 history days and the window's own 2024-06-25.
    assert [b["active_days"] for b in findings["baseline"]] == [17, 17]
    assert findings["severity"].tolist() == ["medium", "low"]


def test_learned_still_flags_holiday(make_events: Build) -> None:
    # Weekday reads at 10:00 Berlin; 2024-10-03 (German Unity Day) at 10:00 is usual but a holiday.
    history = [
        aws_read(day + pd.Timedelta(hours=8))
        for day in weekdays_between("2024-09-09", "2024-10-02")
    ]
    window = [aws_read("2024-10-03T08:05:00Z")]
    findings = detect(make_events, window, history, holidays_country="DE", **BERLIN)
    assert findings["baseline"].iloc[0]["mode"] == "learned"
    assert findings["evidence"].iloc[0]["reasons"] == ["holiday"]
    assert findings["severity"].tolist() == ["medium"]
    assert detect(make_events, window, history, **BERLIN).empty
