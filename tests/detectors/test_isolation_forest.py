"""Tests for keytrail.isolation_forest: named positive and negative cases."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS, FrameHistory, project_rollup, rollup_events
from detectors.isolation_forest import (
    _DAY_US,
    _ROLLUP_COLUMNS,
    IsolationForestDetector,
    _codes,
    _day_starts,
    _distinct_counts,
    _new_secret_reads,
    _rollup,
    _sorted_codes,
    principal_hours,
)
from pipeline.schema import events_from_rows
from tests.detectors.conftest import ACCOUNT, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]
APP = f"arn:aws:iam::{ACCOUNT}:role/app"
BATCH = f"arn:aws:iam::{ACCOUNT}:role/batch"
WEB = f"arn:aws:iam::{ACCOUNT}:role/web"
HISTORY_START = pd.Timestamp("2024-06-01T00:00:00Z")
WINDOW_START = pd.Timestamp("2024-06-08T03:00:00Z")
NOW = WINDOW_START + pd.Timedelta(hours=1)


def steady_history() -> pd.DataFrame:
    """Return seven days of three roles reading their own few secrets at a steady rate."""
    rng = np.random.default_rng(7)
    rows = []
    for principal, rate, secrets in ((APP, 5, 2), (BATCH, 40, 3), (WEB, 12, 1)):
        for hour in range(7 * 24):
            for _ in range(int(rng.poisson(rate))):
                moment = HISTORY_START + pd.Timedelta(hours=hour, minutes=int(rng.integers(60)))
                secret = f"prod/{int(rng.integers(secrets))}"
                rows.append(aws_read(moment, principal, secret=secret, principal_type="role"))
    return events_from_rows([row | {"event_uid": f"h-{n}"} for n, row in enumerate(rows)])


@pytest.fixture(scope="module")
def history() -> FrameHistory:
    return FrameHistory(steady_history())


def minute(offset: int) -> pd.Timestamp:
    return WINDOW_START + pd.Timedelta(minutes=offset)


def sweep(principal: str = APP, count: int = 40) -> list[dict[str, Any]]:
    """Return ``count`` reads of different secrets from four addresses within one hour."""
    return [
        aws_read(
            minute(n),
            principal,
            secret=f"prod/other-{n}",
            ip=f"198.51.100.{n % 4}",
            principal_type="role",
        )
        for n in range(count)
    ]


def test_secret_sweep_fires(make_events: Build, history: FrameHistory) -> None:
    detector = IsolationForestDetector()
    findings = detector.detect(make_events(sweep()), history, NOW)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["principal"] == APP
    assert finding["severity"] == "medium"
    assert finding["title"] == (
        f"{APP} accessed secrets unlike its own history at 2024-06-08 03:00 UTC "
        "(40 reads, 40 secrets)"
    )
    assert finding["event_count"] == 40
    evidence = finding["evidence"]
    assert evidence["distinct_secrets"] == 40
    assert evidence["distinct_ips"] == 4
    assert evidence["new_secret_share"] == 1.0
    assert evidence["anomaly_score"] > evidence["threshold"]
    top = [item["feature"] for item in evidence["top_features"]]
    assert top == ["new_secret_share", "distinct_secrets", "reads"]
    assert evidence["top_features"][1]["value"] == 40
    assert evidence["top_features"][1]["typical"] == 2.0
    baseline = finding["baseline"]
    assert baseline["active_hours"] == 168
    assert baseline["typical"] == {"new_secret_share": 0.0, "distinct_secrets": 2.0, "reads": 5.0}
    assert baseline["summary"].startswith(
        "this hour against the 14-day median of 168 active hours: new_secret_share 1.0 against 0.0"
    )


def test_busy_service_at_its_rate_is_quiet(make_events: Build, history: FrameHistory) -> None:
    window = [
        aws_read(minute(n), BATCH, secret=f"prod/{n % 3}", principal_type="role") for n in range(42)
    ]
    detector = IsolationForestDetector()
    assert detector.detect(make_events(window), history, NOW).empty
    assert detector.report_ == {
        "skipped_no_history": 0,
        "principal_hours_scored": 1,
        "walk_forward_fits": 0,
    }


def test_quiet_hour_does_not_fire(make_events: Build, history: FrameHistory) -> None:
    # One read where the batch role makes about 40: unusual, but not a threat.
    window = [aws_read(minute(1), BATCH, secret="prod/0", principal_type="role")]
    assert IsolationForestDetector(min_events=1).detect(make_events(window), history, NOW).empty


def test_sweep_below_min_events_is_quiet(make_events: Build, history: FrameHistory) -> None:
    detector = IsolationForestDetector(min_events=41)
    assert detector.detect(make_events(sweep()), history, NOW).empty


def test_new_principal_is_skipped(make_events: Build, history: FrameHistory) -> None:
    detector = IsolationForestDetector()
    findings = detector.detect(make_events(sweep("newcomer")), history, NOW)
    assert findings.empty
    assert detector.report_ == {
        "skipped_no_history": 1,
        "principal_hours_scored": 0,
        "walk_forward_fits": 0,
    }


def test_principal_types_filter(make_events: Build, history: FrameHistory) -> None:
    detector = IsolationForestDetector(principal_types=["user"])
    assert detector.detect(make_events(sweep()), history, NOW).empty
    assert detector.principals_ == {}


def test_fit_learns_per_principal_medians(history: FrameHistory) -> None:
    detector = IsolationForestDetector(features=["reads", "distinct_secrets"])
    detector.fit(history, WINDOW_START)
    assert sorted(detector.principals_) == [APP, BATCH, WEB]
    medians = np.expm1(detector.medians_[detector.principals_[WEB]])
    assert medians.round(1).tolist() == [12.0, 1.0]
    assert detector.fitted_through == WINDOW_START
    assert detector.fitted_vectors_ == 3 * 168


def test_state_restores_scores(make_events: Build, history: FrameHistory) -> None:
    fitted = IsolationForestDetector().fit(history, WINDOW_START)
    restored = IsolationForestDetector().set_state(json.loads(json.dumps(fitted.get_state())))
    hours = principal_hours(rollup_events(make_events(sweep())), fitted.known_pairs_)
    assert restored.score(hours).tolist() == fitted.score(hours).tolist()
    assert restored.known_pairs_ == fitted.known_pairs_


def test_state_from_other_sklearn_is_rejected(history: FrameHistory) -> None:
    state = IsolationForestDetector().fit(history, WINDOW_START).get_state()
    state["sklearn"] = "0.1"
    with pytest.raises(ValueError, match=r"from scikit-learn 0\.1, expected 1 from"):
        IsolationForestDetector().set_state(state)


def test_state_with_other_features_is_rejected(history: FrameHistory) -> None:
    state = IsolationForestDetector(features=["reads"]).fit(history, WINDOW_START).get_state()
    with pytest.raises(ValueError, match=r"state features \['reads'\] differ"):
        IsolationForestDetector().set_state(state)


def test_score_before_fit_is_nan(make_events: Build) -> None:
    hours = principal_hours(rollup_events(make_events(sweep())))
    scores = IsolationForestDetector().score(hours)
    assert scores.isna().tolist() == [True]


def test_principal_hours_features(make_events: Build) -> None:
    rows = [
        aws_read(minute(0), APP, secret="a", ip="203.0.113.1", city="berlin", asn=64500),
        aws_read(minute(5), APP, secret="b", ip="203.0.113.2", city="tokyo", asn=64501),
        aws_read(minute(6), APP, secret="a", ip="203.0.113.2", city="tokyo", asn=64501),
        aws_denied(minute(7), APP, secret="c"),
        aws_read(minute(70), APP, secret="a"),
    ]
    hours = principal_hours(rollup_events(make_events(rows)), known_pairs={(APP, "x")})
    first = hours.iloc[0]
    assert first["events"] == 4
    assert first["reads"] == 4
    assert first["failures"] == 1
    assert first["distinct_secrets"] == 3
    assert first["distinct_ips"] == 3
    assert first["countries"] == 2
    assert first["asns"] == 2
    assert first["new_secret_share"] == 1.0
    # Secret "a" was new in the first hour, so the second hour reads nothing new.
    assert hours.iloc[1]["new_secret_share"] == 0.0
    assert hours["hour"].dt.hour.tolist() == [3, 4]


def _as_store_rollup(rollup: pd.DataFrame) -> pd.DataFrame:
    """Give the text keys Categorical dtypes with reversed category order, as a store might."""
    keys = ["principal", "principal_type", "resource", "action", "outcome", "source_ip"]
    keys += ["invoked_by", "geo_country"]
    converted = {}
    for name in keys:
        values = sorted(set(rollup[name].dropna().tolist()), reverse=True)
        categories = pd.Index(values, dtype="str")
        converted[name] = pd.Categorical(rollup[name].astype(object), categories=categories)
    return rollup.assign(**converted)


def test_categorical_rollup_matches_strings(history: FrameHistory) -> None:
    rollup = history.rollup(since=HISTORY_START, until=WINDOW_START, columns=list(_ROLLUP_COLUMNS))
    stored = _as_store_rollup(rollup)
    plain = principal_hours(rollup)
    categorical = principal_hours(stored)
    # Rows follow the names, whatever the category order, so both fit the same forest.
    assert plain["principal"].unique().tolist() == [APP, BATCH, WEB]
    pd.testing.assert_frame_equal(categorical, plain, check_exact=True)

    from_plain = IsolationForestDetector()._fit_rollup(rollup, WINDOW_START)
    from_store = IsolationForestDetector()._fit_rollup(stored, WINDOW_START)
    assert from_store.principals_ == from_plain.principals_ == {APP: 0, BATCH: 1, WEB: 2}
    assert from_store.history_hours_.tolist() == from_plain.history_hours_.tolist()
    assert np.array_equal(from_store.medians_, from_plain.medians_)
    assert np.array_equal(from_store.scales_, from_plain.scales_)
    assert from_store.known_pairs_ == from_plain.known_pairs_


def test_fit_skips_principal_with_few_hours(history: FrameHistory) -> None:
    rollup = history.rollup(since=HISTORY_START, until=WINDOW_START, columns=list(_ROLLUP_COLUMNS))
    # Two hours of a fourth principal: too few to be judged, and left out of the medians.
    extra = rollup[rollup["principal"] == WEB].head(2).assign(principal="arn:new")
    fitted = IsolationForestDetector()._fit_rollup(pd.concat([rollup, extra]), WINDOW_START)
    assert fitted.principals_ == {APP: 0, BATCH: 1, WEB: 2}
    assert fitted.medians_.shape == (3, 9)


def test_sorted_codes_match_factorize() -> None:
    keys = np.array([7, 3, 7, 0, 3], dtype=np.int64)
    codes, uniques = _sorted_codes(keys, 8)
    assert codes.tolist() == [2, 1, 2, 0, 1]
    assert uniques.tolist() == [0, 3, 7]
    # A bound far above the number of keys goes through pd.factorize instead of a table.
    wide = keys * 1_000_000
    codes, uniques = _sorted_codes(wide, 8_000_000)
    assert codes.tolist() == [2, 1, 2, 0, 1]
    assert uniques.tolist() == [0, 3_000_000, 7_000_000]


def test_distinct_counts_ignore_nulls() -> None:
    group = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.int64)
    codes = np.array([3, 3, -1, -1, -1, 5, 0])
    assert _distinct_counts(group, codes, 4).tolist() == [1.0, 0.0, 2.0, 0.0]


def test_distinct_counts_without_rows() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert _distinct_counts(empty, empty, 2).tolist() == [0.0, 0.0]


def test_distinct_counts_with_wide_keys() -> None:
    # 2**21 groups and codes up to 2**12 need more than 32 bits per key.
    size = 2**21
    group = np.array([size - 1, size - 1, 5, size - 1], dtype=np.int64)
    codes = np.array([4095, 4095, 4095, 0])
    counts = _distinct_counts(group, codes, size)
    assert counts[size - 1] == 2.0
    assert counts[5] == 1.0
    assert counts.sum() == 3.0


def test_codes_of_categorical_follow_value_order() -> None:
    values = pd.Series(pd.Categorical(["b", None, "c"], categories=["c", "b", "a"]))
    codes, uniques = _codes(values)
    assert codes.tolist() == [1, -1, 2]
    assert uniques.tolist() == ["a", "b", "c"]


def test_codes_of_sorted_categorical_are_its_own() -> None:
    values = pd.Series(pd.Categorical(["b", None, "c"], categories=["a", "b", "c"]))
    codes, uniques = _codes(values)
    assert codes.tolist() == [1, -1, 2]
    assert uniques.tolist() == ["a", "b", "c"]


def test_codes_of_strings_are_sorted() -> None:
    codes, uniques = _codes(pd.Series(["b", None, "a", "b"], dtype="string"))
    assert codes.tolist() == [1, -1, 0, 1]
    assert uniques.tolist() == ["a", "b"]


def test_new_reads_against_known_pairs() -> None:
    principals = (np.array([0, 0, 0, 1, 1]), pd.Index(["p", "q"]))
    resources = (np.array([0, -1, 1, 0, 0]), pd.Index(["a", "b"]))
    hour = np.array([10, 10, 10, 10, 20], dtype=np.int64)
    is_read = np.array([True, True, True, True, True])
    new = _new_secret_reads(principals, resources, hour, hour, is_read, {("p", "b")})
    # (p, a) is new, and so is (q, a) at hour 10 but not at 20. The row without a secret is
    # not new, and (p, b) is known.
    assert new.tolist() == [True, False, False, True, False]


def test_history_new_reads_skip_first_day() -> None:
    principals = (np.array([0, 0, 0]), pd.Index(["p"]))
    resources = (np.array([0, 1, 1]), pd.Index(["a", "b"]))
    hour = np.array([0, 3_600_000_000, _DAY_US + 3_600_000_000], dtype=np.int64)
    start = np.zeros(3, dtype=np.int64)
    is_read = np.array([True, False, True])
    new = _new_secret_reads(principals, resources, hour, start, is_read, None)
    # "a" is first read on the principal's first day, so it is not new. The first read of "b"
    # is a day later (its earlier row is not a read), so it is new.
    assert new.tolist() == [False, False, True]


def test_rollup_matches_projected_rollup(make_events: Build) -> None:
    events = make_events(
        [
            aws_read(minute(0), APP, secret="a", city="berlin", asn=64500),
            aws_read(minute(1), APP, secret="a", city="berlin", asn=64500),
            aws_read(minute(2), APP, secret="b", ip=None),
            aws_denied(minute(3), WEB, secret="a"),
            aws_read(minute(70), APP, secret="a", city="berlin", asn=64500),
        ]
    )
    expected = project_rollup(rollup_events(events), list(_ROLLUP_COLUMNS))
    rolled = _rollup(events)
    pd.testing.assert_frame_equal(rolled, expected, check_exact=True)
    assert rolled["count"].tolist() == [2, 1, 1, 1]
    empty = events.iloc[:0]
    expected = project_rollup(rollup_events(empty), list(_ROLLUP_COLUMNS))
    pd.testing.assert_frame_equal(_rollup(empty), expected)


def test_flagged_scores_match_full_scoring(make_events: Build, history: FrameHistory) -> None:
    detector = IsolationForestDetector().fit(history, NOW)
    rows = [aws_read(minute(n), BATCH, principal_type="role") for n in range(30)]
    hours = principal_hours(
        rollup_events(make_events([*sweep(), *rows])), detector.known_pairs_
    ).reset_index(drop=True)
    chosen = detector._flagged_hours(hours)
    assert chosen["principal"].tolist() == [APP]
    # Only hours that could fire go through the forest, and their scores equal a full pass.
    full = detector.score(hours)
    assert chosen["score"].tolist() == full[hours["principal"] == APP].tolist()


MONTH_START = pd.Timestamp("2024-07-01T00:00:00Z")
MONTH_DAYS = 8
SWEEP_DAY = 6


def month_of_events() -> pd.DataFrame:
    """Return eight days of the three steady roles, with a secret sweep by the app role.

    Reads fall at random seconds, so each day's first event and each look-back's first hour
    are cut mid-hour. The sweep is 40 reads of new secrets at 05:00 on day 6.
    """
    rng = np.random.default_rng(11)
    rows = []
    for principal, rate, secrets in ((APP, 3, 2), (BATCH, 12, 3), (WEB, 6, 1)):
        for hour in range(MONTH_DAYS * 24):
            for _ in range(int(rng.poisson(rate))):
                moment = MONTH_START + pd.Timedelta(hours=hour, seconds=int(rng.integers(3600)))
                secret = f"prod/{int(rng.integers(secrets))}"
                rows.append(aws_read(moment, principal, secret=secret, principal_type="role"))
    swept = MONTH_START + pd.Timedelta(days=SWEEP_DAY, hours=5)
    for n in range(40):
        rows.append(
            aws_read(
                swept + pd.Timedelta(minutes=n),
                APP,
                secret=f"prod/other-{n}",
                ip=f"198.51.100.{n % 4}",
                principal_type="role",
            )
        )
    events = events_from_rows([row | {"event_uid": f"m-{n}"} for n, row in enumerate(rows)])
    return events.sort_values("time", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def month() -> pd.DataFrame:
    return month_of_events()


def daily_runs(events: pd.DataFrame, window: pd.DataFrame, **params: Any) -> pd.DataFrame:
    """Judge ``window`` one UTC day at a time, each day by a fresh detector, as a backtest does."""
    found = []
    for _, day in window.groupby(window["time"].dt.floor("D")):
        before = FrameHistory(events[events["time"] < day["time"].min()])
        found.append(IsolationForestDetector(**params).detect(day, before, day["time"].max()))
    return pd.concat(found, ignore_index=True)


@pytest.mark.parametrize(
    ("history_days", "baseline_days"),
    [
        pytest.param(0, 2, id="first-run-look-back-inside-window"),
        pytest.param(0, 14, id="first-run-look-back-covers-window"),
        pytest.param(3, 2, id="stored-history-look-back-cut-in-history"),
        pytest.param(3, 4, id="stored-history-look-back-spans-both"),
    ],
)
def test_long_window_matches_daily_runs(
    month: pd.DataFrame, history_days: int, baseline_days: int
) -> None:
    split = MONTH_START + pd.Timedelta(days=history_days)
    stored = FrameHistory(month[month["time"] < split])
    window = month[month["time"] >= split].reset_index(drop=True)

    detector = IsolationForestDetector(baseline_days=baseline_days, min_history_hours=12)
    found = detector.detect(window, stored, window["time"].max())
    daily = daily_runs(month, window, baseline_days=baseline_days, min_history_hours=12)

    assert sorted(found["finding_id"]) == sorted(daily["finding_id"])
    assert found["principal"].tolist() == [APP]
    # The sweep's 40 reads and the role's two usual reads of that hour.
    assert found["title"].tolist() == [
        f"{APP} accessed secrets unlike its own history at 2024-07-07 05:00 UTC "
        "(42 reads, 42 secrets)"
    ]
    assert detector.report_["walk_forward_fits"] == MONTH_DAYS - history_days - 1
    last_start = _day_starts(window["time"])[-1]
    refitted = IsolationForestDetector(baseline_days=baseline_days, min_history_hours=12).fit(
        FrameHistory(month[month["time"] < last_start]), last_start
    )
    for key in ("fitted_through", "principals", "medians", "scales", "known_pairs"):
        assert detector.get_state()[key] == refitted.get_state()[key], key


def test_long_window_first_day_not_judged(month: pd.DataFrame) -> None:
    # The sweep falls on the window's first day: with no history, no one is judged on it.
    # The second day is judged (71 principal-hours: the app role was idle for one hour).
    window = month[month["time"] >= MONTH_START + pd.Timedelta(days=SWEEP_DAY)]
    detector = IsolationForestDetector(baseline_days=2, min_history_hours=12)

    assert detector.detect(window, FrameHistory(), window["time"].max()).empty
    assert detector.report_ == {
        "skipped_no_history": 3,
        "principal_hours_scored": 71,
        "walk_forward_fits": 1,
    }


def test_long_window_principal_short_history_skipped(month: pd.DataFrame) -> None:
    # Four hours of the newcomer before its sweep are fewer than min_history_hours (12).
    days = pd.Timedelta(days=SWEEP_DAY)
    early = [
        aws_read(MONTH_START + days - pd.Timedelta(hours=4 - n), "newcomer", secret="prod/0")
        for n in range(4)
    ]
    swept = [
        aws_read(MONTH_START + days + pd.Timedelta(hours=5, minutes=n), "newcomer", secret=f"x/{n}")
        for n in range(40)
    ]
    extra = events_from_rows([row | {"event_uid": f"n-{n}"} for n, row in enumerate(early + swept)])
    window = pd.concat([month, extra], ignore_index=True).sort_values("time", kind="stable")
    detector = IsolationForestDetector(baseline_days=2, min_history_hours=12)

    found = detector.detect(window.reset_index(drop=True), FrameHistory(), window["time"].max())

    assert found["principal"].tolist() == [APP]
    assert detector.report_["skipped_no_history"] == 4


def test_long_window_leaves_last_day_fit(month: pd.DataFrame) -> None:
    walked = IsolationForestDetector(baseline_days=2, min_history_hours=12)
    walked.detect(month, FrameHistory(), month["time"].max())
    last_start = month.loc[month["time"] >= MONTH_START + pd.Timedelta(days=7), "time"].min()
    refitted = IsolationForestDetector(baseline_days=2, min_history_hours=12)
    refitted.fit(FrameHistory(month[month["time"] < last_start]), last_start)

    assert walked.fitted_through == last_start
    state = walked.get_state()
    expected = refitted.get_state()
    for key in ("fitted_through", "principals", "medians", "scales", "known_pairs"):
        assert state[key] == expected[key], key
    assert state["history_hours"] == expected["history_hours"] == [48, 48, 48]


def test_day_starts_first_event_per_day() -> None:
    times = pd.Series(
        pd.to_datetime(
            [
                "2024-07-02T00:00:05Z",
                "2024-07-01T23:59:59Z",
                "2024-07-01T08:30:00Z",
                "2024-07-03T12:00:00Z",
                "2024-07-02T17:00:00Z",
            ],
            utc=True,
        )
    )
    assert _day_starts(times) == [
        pd.Timestamp("2024-07-01T08:30:00Z"),
        pd.Timestamp("2024-07-02T00:00:05Z"),
        pd.Timestamp("2024-07-03T12:00:00Z"),
    ]


@pytest.mark.parametrize(
    ("params", "loc", "message"),
    [
        ({"features": []}, ("features",), "features is empty"),
        ({"features": ["reads", "reads"]}, ("features",), "lists a feature twice"),
        ({"features": ["bytes"]}, ("features", 0), "Input should be"),
        ({"contamination": 0.7}, ("contamination",), "less than or equal to 0.5"),
        ({"principal_types": ["robot"]}, ("principal_types",), "unknown principal types"),
        ({"refit_hours": 0}, ("refit_hours",), "greater than 0"),
    ],
)
def test_invalid_params_name_the_field(
    params: dict[str, Any], loc: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        IsolationForestDetector(**params)
    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == loc
    assert message in errors[0]["msg"]
