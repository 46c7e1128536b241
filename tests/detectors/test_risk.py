"""Named positive and negative cases for ``keytrail.risk``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FrameHistory
from detectors.risk import RiskDetector, _codes_in, _hour_slots, _records, user_agent_family
from pipeline.errors import StateError
from pipeline.store.history import CappedHistoryView, History
from tests.detectors.conftest import ACCOUNT, ALICE, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]

USUAL = ("prod/api/key", "prod/db/password")
DAY0 = pd.Timestamp("2024-06-01T00:00:00Z")  # a Saturday
HOME: dict[str, Any] = {
    "city": "berlin",
    "ip": "203.0.113.10",
    "asn": 64500,
    "as_org": "Example Telecom",
}
AWAY: dict[str, Any] = {
    "city": "moscow",
    "ip": "198.51.100.7",
    "asn": 64999,
    "as_org": "Elsewhere Hosting",
}


def at(day: int, hour: int, minute: int = 0) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=day, hours=hour, minutes=minute)


def usual_days(days: range, principal: str = ALICE) -> list[dict[str, Any]]:
    """Return the principal's habit: its usual secrets at 09:00 from home, every day."""
    return [
        aws_read(at(day, 9, minute), principal, secret=secret, **HOME)
        for day in days
        for minute, secret in enumerate(USUAL)
    ]


def new_network(time: pd.Timestamp, uid: str) -> dict[str, Any]:
    """A read of a usual secret from an unknown network in an unknown country."""
    return aws_read(time, secret="prod/db/password", event_uid=uid, **AWAY)


def denied(time: pd.Timestamp, uid: str, place: dict[str, Any] = AWAY) -> dict[str, Any]:
    return aws_denied(time, secret="prod/db/password", event_uid=uid, **place)


def new_secret(
    time: pd.Timestamp, uid: str, secret: str = "prod/root/credentials"
) -> dict[str, Any]:
    return aws_read(time, secret=secret, event_uid=uid, **AWAY)


def five_signals(day: int = 21, hour: int = 3) -> list[dict[str, Any]]:
    """New network, new country and new hour at :00; a denial at :10; a new secret at :20."""
    return [
        new_network(at(day, hour), f"a-{day}"),
        denied(at(day, hour, 10), f"b-{day}"),
        new_secret(at(day, hour, 20), f"c-{day}"),
    ]


def history(make_events: Build, days: range = range(21)) -> FrameHistory:
    return FrameHistory(make_events(usual_days(days)))


def decayed(weight: float, hours: float, half_life: float = 24.0) -> float:
    return weight * 2 ** (-hours / half_life)


def test_usual_behaviour_never_fires(make_events: Build) -> None:
    detector = RiskDetector()
    findings = detector.detect(make_events(usual_days(range(21, 28))), history(make_events), NOW)
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 0, "signals": 0, "signals_before_state": 0}


def test_five_signals_in_an_hour_fire(make_events: Build) -> None:
    detector = RiskDetector()
    findings = detector.detect(make_events(five_signals()), history(make_events), NOW)

    assert len(findings) == 1
    finding = findings.iloc[0]
    score = decayed(8, 20 / 60) + decayed(2, 10 / 60) + 2
    assert finding["detector"] == "keytrail.risk"
    assert finding["severity"] == "medium"
    assert finding["title"] == f"Risk score {score:.1f} for {ALICE} from 5 signals"
    assert finding["principal"] == ALICE
    assert finding["cloud"] == "aws"
    assert finding["account"] == ACCOUNT
    assert finding["event_uids"] == ["a-21", "b-21", "c-21"]
    assert finding["first_seen"] == at(21, 3)
    assert finding["last_seen"] == at(21, 3, 20)
    assert finding["countries"] == ["RU"]
    assert finding["mitre"] == ["T1078.004", "T1555.006"]
    assert detector.report_ == {"skipped_no_history": 0, "signals": 5, "signals_before_state": 0}


def test_five_signals_evidence(make_events: Build) -> None:
    findings = RiskDetector().detect(make_events(five_signals()), history(make_events), NOW)
    evidence = findings.iloc[0]["evidence"]
    score = decayed(8, 20 / 60) + decayed(2, 10 / 60) + 2

    assert evidence["score"] == round(score, 3)
    assert evidence["score_before"] == round(score - 2, 3)
    assert evidence["carried_score"] == 0.0
    assert evidence["signal_count"] == 5
    assert evidence["signals_not_listed"] == 0
    assert evidence["signal_kinds"] == {
        "new_asn": 1,
        "new_country": 1,
        "new_hour_of_week": 1,
        "access_denied": 1,
        "first_seen_secret": 1,
    }
    listed = [(item["time"], item["kind"], item["weight"]) for item in evidence["signals"]]
    assert listed == [
        ("2024-06-22T03:00:00Z", "new_asn", 3.0),
        ("2024-06-22T03:00:00Z", "new_country", 3.0),
        ("2024-06-22T03:00:00Z", "new_hour_of_week", 2.0),
        ("2024-06-22T03:10:00Z", "access_denied", 2.0),
        ("2024-06-22T03:20:00Z", "first_seen_secret", 2.0),
    ]
    assert [item["detail"] for item in evidence["signals"]] == [
        "new network AS64999 (Elsewhere Hosting)",
        "new country RU",
        "read at 03:00-03:59 UTC on a weekend day, with no weekend read within an hour of it "
        "in 30 days",
        "access denied (AccessDeniedException): GetSecretValue on prod/db/password",
        "first read of prod/root/credentials in 30 days",
    ]
    assert evidence["signals"][0]["contribution"] == round(decayed(3, 20 / 60), 3)
    assert findings.iloc[0]["baseline"]["summary"] == (
        f"5 weak signals since 2024-06-22T03:00:00Z add up to {score:.1f}, over the threshold "
        "of 10; each weight halves every 24 h"
    )


def test_decayed_signals_are_summed_not_listed(make_events: Build) -> None:
    window = [denied(at(21, 0), "old", HOME), *five_signals(day=26)]
    findings = RiskDetector().detect(make_events(window), history(make_events), NOW)
    evidence = findings.iloc[0]["evidence"]
    # On a weekday the new hour adds to the new network, and the denial at 03:10 crosses.
    assert evidence["signal_count"] == 4
    assert evidence["minor_signals_score"] == round(decayed(2, 5 * 24 + 3 + 10 / 60), 3)
    assert "old" not in findings.iloc[0]["event_uids"]
    assert findings.iloc[0]["first_seen"] == at(26, 3)


def test_same_signals_over_a_week_decay(make_events: Build) -> None:
    # The same five signals: 8 points on day 21, a denial on day 24, a new secret on day 28
    # (the same weekday and hour as day 21, so that hour of the week is known by then).
    window = [
        new_network(at(21, 3), "a"),
        denied(at(24, 3, 10), "b"),
        new_secret(at(28, 3, 20), "c"),
    ]
    detector = RiskDetector()
    findings = detector.detect(make_events(window), history(make_events), NOW)
    assert findings.empty
    assert detector.report_["signals"] == 5


def test_learning_principal_only_scores_denials(make_events: Build) -> None:
    detector = RiskDetector()
    findings = detector.detect(
        make_events(five_signals()), history(make_events, range(18, 21)), NOW
    )
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "signals": 1, "signals_before_state": 0}


def test_denials_capped_per_hour(make_events: Build) -> None:
    window = [denied(at(21, 10, minute), f"d-{minute}", HOME) for minute in range(10)]
    detector = RiskDetector()
    findings = detector.detect(make_events(window), history(make_events), NOW)
    assert findings.empty
    assert detector.report_["signals"] == 2
    assert detector.get_state()["principals"][ALICE]["signals"][1]["event_uid"] == "d-1"


def test_denials_over_hours_add_up(make_events: Build) -> None:
    window = [
        denied(at(21, hour, minute), f"d-{hour}-{minute}", HOME)
        for hour in range(3)
        for minute in range(3)
    ]
    findings = RiskDetector().detect(make_events(window), history(make_events), NOW)
    assert len(findings) == 1
    # Two denials count per hour: the sixth, at 02:01, lifts the score over 10.
    assert findings.iloc[0]["evidence"]["signal_kinds"] == {"access_denied": 6}
    assert findings.iloc[0]["last_seen"] == at(21, 2, 1)


def test_zero_weight_turns_kind_off(make_events: Build) -> None:
    detector = RiskDetector(weights={"new_country": 0})
    findings = detector.detect(make_events(five_signals()), history(make_events), NOW)
    assert findings.empty
    assert detector.report_["signals"] == 4


@pytest.mark.parametrize(
    ("weight", "severity"), [(12.0, "medium"), (25.0, "high"), (45.0, "critical")]
)
def test_severity_by_score(make_events: Build, weight: float, severity: str) -> None:
    detector = RiskDetector(weights={"access_denied": weight})
    window = make_events([denied(at(21, 10), "d", HOME)])
    findings = detector.detect(window, history(make_events), NOW)
    assert findings["severity"].tolist() == [severity]


def test_new_user_agent_family(make_events: Build) -> None:
    window = [
        aws_read(at(21, 9), secret="prod/db/password", user_agent="python-requests/2.31", **HOME),
        aws_read(at(21, 9, 5), secret="prod/db/password", user_agent="aws-cli/2.17.1", **HOME),
    ]
    detector = RiskDetector(threshold=1.5)
    findings = detector.detect(make_events(window), history(make_events), NOW)
    assert findings.iloc[0]["evidence"]["signals"][0]["detail"] == (
        "new user agent family python-requests"
    )
    assert detector.report_["signals"] == 1


@pytest.mark.parametrize("store", ["frame", "parquet"])
@pytest.mark.parametrize(
    ("last_used_day", "signals"),
    [(18, 0), (13, 1)],
    ids=["agent-used-3-days-ago", "agent-used-8-days-ago"],
)
def test_user_agent_baseline_spans_user_agent_days(
    make_events: Build, tmp_path: Path, store: str, last_used_day: int, signals: int
) -> None:
    # The usual reads carry the SDK's agent; the command line was last used on one morning.
    earlier = usual_days(range(21))
    for event in earlier:
        event["user_agent"] = "Boto3/1.35.0 md/Botocore#1.35.0"
    earlier.append(
        aws_read(
            at(last_used_day, 9, 30), secret="prod/db/password", user_agent="aws-cli/2.17.1", **HOME
        )
    )
    window = make_events(
        [aws_read(at(21, 9), secret="prod/db/password", user_agent="aws-cli/2.17.9", **HOME)]
    )
    baseline: Any = FrameHistory(make_events(earlier))
    if store == "parquet":
        # The engine's view: Parquet history, categorical rollup keys, capped at the window.
        saved = History(tmp_path / "history")
        saved.append(make_events(earlier), "run-1")
        baseline = CappedHistoryView(saved, window["time"].min())
    detector = RiskDetector(threshold=1.0)

    findings = detector.detect(window, baseline, NOW)

    assert detector.report_["signals"] == signals
    details = [signal["detail"] for row in findings["evidence"] for signal in row["signals"]]
    assert details == ["new user agent family aws-cli"] * signals


@pytest.mark.parametrize(
    ("day", "hour", "signals"),
    [
        (22, 10, 0),  # Sunday, an hour after the usual 09:00 reads
        (22, 11, 1),  # Sunday, two hours after them
        (23, 8, 0),  # Monday, an hour before them
        (23, 3, 1),  # Monday night
    ],
)
def test_hour_signal_allows_one_hour(make_events: Build, day: int, hour: int, signals: int) -> None:
    window = [aws_read(at(day, hour), secret="prod/db/password", **HOME)]
    detector = RiskDetector()
    detector.detect(make_events(window), history(make_events, range(22)), NOW)
    assert detector.report_["signals"] == signals


def test_hour_signal_learns_from_window(make_events: Build) -> None:
    # The 03:00 read is new; the 04:00 read is within an hour of it.
    window = [
        aws_read(at(23, 3), secret="prod/db/password", **HOME),
        aws_read(at(23, 4), secret="prod/db/password", **HOME),
    ]
    detector = RiskDetector()
    detector.detect(make_events(window), history(make_events, range(22)), NOW)
    assert detector.report_["signals"] == 1


def test_hysteresis_fires_once_until_score_halves(make_events: Build) -> None:
    later_denials = [denied(at(21, 6, minute), f"late-{minute}") for minute in range(2)]
    window = five_signals() + later_denials
    findings = RiskDetector().detect(make_events(window), history(make_events), NOW)
    assert len(findings) == 1


def test_fires_again_after_score_drops(make_events: Build) -> None:
    second = [
        aws_read(
            at(26, 3),
            secret="prod/db/password",
            event_uid="a-26",
            city="new_york",
            ip="192.0.2.80",
            asn=64777,
            as_org="Far Cloud",
        ),
        denied(at(26, 3, 10), "b-26"),
        new_secret(at(26, 3, 20), "c-26", secret="prod/payments/key"),
    ]
    findings = RiskDetector().detect(
        make_events(five_signals() + second), history(make_events), NOW
    )
    # The second time, 8 new points and a denial cross the threshold before the new secret.
    assert findings["last_seen"].tolist() == [at(21, 3, 20), at(26, 3, 10)]


def test_state_round_trip_matches_one_run(make_events: Build) -> None:
    # 9.8 points late on day 21, 4 more on day 22: only the carried score makes day 22 fire.
    day21 = [
        *usual_days(range(21, 22)),
        new_network(at(21, 22), "a"),
        denied(at(21, 23), "b"),
    ]
    day22 = [*usual_days(range(22, 23)), new_secret(at(22, 1), "c")]
    base = make_events(usual_days(range(21)))
    first_window, second_window = make_events(day21), make_events(day22)

    whole = RiskDetector().detect(
        pd.concat([first_window, second_window], ignore_index=True), FrameHistory(base), NOW
    )
    first = RiskDetector()
    first_findings = first.detect(first_window, FrameHistory(base), NOW)
    stored = json.loads(json.dumps(first.get_state()))
    second = RiskDetector()
    second.set_state(stored)
    later_history = FrameHistory(pd.concat([base, first_window], ignore_index=True))
    second_findings = second.detect(second_window, later_history, NOW)
    without_state = RiskDetector().detect(second_window, later_history, NOW)

    assert first_findings.empty
    assert without_state.empty
    assert len(whole) == 1
    assert second_findings["finding_id"].tolist() == whole["finding_id"].tolist()
    assert second_findings["evidence"].tolist() == whole["evidence"].tolist()
    assert whole.iloc[0]["evidence"]["carried_score"] == 0.0
    assert second_findings.iloc[0]["evidence"]["carried_score"] == 0.0
    assert second.get_state() == json.loads(json.dumps(second.get_state()))


def test_state_carries_hysteresis(make_events: Build) -> None:
    first = RiskDetector()
    assert len(first.detect(make_events(five_signals()), history(make_events), NOW)) == 1
    second = RiskDetector()
    second.set_state(first.get_state())
    more = [denied(at(21, 5, minute), f"late-{minute}") for minute in range(2)]
    earlier = FrameHistory(make_events(usual_days(range(21)) + five_signals()))
    assert second.detect(make_events(more), earlier, NOW).empty
    assert len(second.get_state()["principals"][ALICE]["signals"]) == 7


def test_old_signals_fold_into_carried_score(make_events: Build) -> None:
    first = RiskDetector()
    first.detect(make_events(five_signals()), history(make_events), NOW)
    second = RiskDetector()
    second.set_state(first.get_state())
    # Ten days later: every earlier signal is older than seven half-lives.
    second.detect(make_events(usual_days(range(31, 32))), history(make_events, range(31)), NOW)
    entry = second.get_state()["principals"][ALICE]
    assert entry["signals"] == []
    assert entry["armed"] is True
    cut = at(31, 9, 1) - pd.Timedelta(days=7)
    assert entry["base_time"] == cut.isoformat()
    expected = sum(
        decayed(weight, (cut - time).total_seconds() / 3600)
        for weight, time in [(8, at(21, 3)), (2, at(21, 3, 10)), (2, at(21, 3, 20))]
    )
    assert entry["base_score"] == pytest.approx(expected, rel=1e-9)


def test_rerun_of_window_gives_same_findings(make_events: Build) -> None:
    detector = RiskDetector()
    window = make_events(five_signals())
    first = detector.detect(window, history(make_events), NOW)
    again = detector.detect(window, history(make_events), NOW)
    assert len(first) == 1
    assert again["finding_id"].tolist() == first["finding_id"].tolist()


def test_history_holding_window_gives_same_findings(make_events: Build) -> None:
    window = make_events(five_signals())
    base = make_events(usual_days(range(21)))
    alone = RiskDetector().detect(window, FrameHistory(base), NOW)
    doubled = RiskDetector().detect(
        window, FrameHistory(pd.concat([base, window], ignore_index=True)), NOW
    )
    assert len(alone) == 1
    assert doubled["finding_id"].tolist() == alone["finding_id"].tolist()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"version": 2, "principals": {}}, "expected version 1, found 2"),
        ([], "expected version 1, found 'list'"),
        ({"version": 1}, "'principals' is missing or not an object"),
        (
            {"version": 1, "principals": {"p": {"base_time": None, "base_score": 0.0}}},
            "principal 'p': invalid entry: KeyError: 'armed'",
        ),
        (
            {
                "version": 1,
                "principals": {
                    "p": {
                        "base_time": None,
                        "base_score": 0.0,
                        "armed": True,
                        "signals": [
                            {
                                "time": "2024-06-01T00:00:00+00:00",
                                "kind": "odd",
                                "weight": 1,
                                "event_uid": "e",
                                "value": "v",
                            }
                        ],
                    }
                },
            },
            "unknown signal kind 'odd'",
        ),
    ],
)
def test_invalid_state_is_rejected(state: Any, message: str) -> None:
    with pytest.raises(StateError) as caught:
        RiskDetector().set_state(state)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("user_agent", "family"),
    [
        ("aws-cli/2.15.0 Python/3.11.6 Linux/6.1", "aws-cli"),
        ("Boto3/1.34.0 md/Botocore#1.34.0 ua/2.0", "boto3"),
        ("[aws-sdk-go/1.44.0 (go1.21; linux; amd64)]", "aws-sdk-go"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0", "browser"),
        ("azsdk-python-keyvault-secrets/4.7.0 Python/3.11", "azsdk-python-keyvault-secrets"),
        ("  ", "other"),
    ],
)
def test_user_agent_family(user_agent: str, family: str) -> None:
    assert user_agent_family(user_agent) == family


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"threshold": 0}, ("threshold",)),
        ({"weights": {"new_asn": -1}}, ("weights", "new_asn")),
        ({"weights": {"typo": 1}}, ("weights", "typo")),
        ({"learning_days": 40}, ()),
        ({"high_score": 5}, ()),
        ({"half_life_hours": 0}, ("half_life_hours",)),
    ],
)
def test_invalid_params_are_rejected(params: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        RiskDetector(**params)
    assert [error["loc"] for error in caught.value.errors()] == [loc]


def test_history_store_gives_same_findings(make_events: Build, tmp_path: Path) -> None:
    store = History(tmp_path / "history")
    store.append(make_events(usual_days(range(21))), "backfill")
    window = make_events(five_signals())
    from_store = RiskDetector().detect(window, store, NOW)
    from_frame = RiskDetector().detect(window, history(make_events), NOW)
    assert len(from_store) == 1
    assert from_store["evidence"].tolist() == from_frame["evidence"].tolist()


def test_codes_in_finds_positions() -> None:
    distinct = pd.Index(["p", "q", "r"])
    values = pd.Series(pd.Categorical(["r", "p", "x", None, "r"]))
    assert _codes_in(values, distinct).tolist() == [2, 0, -1, -1, 2]
    assert _codes_in(pd.Series([], dtype="string[pyarrow]"), distinct).tolist() == []


def test_hour_slots_weekday_and_weekend() -> None:
    times = pd.Series(
        pd.to_datetime(
            [
                "2024-06-03T09:30Z",  # Monday
                "2024-06-07T23:59Z",  # Friday
                "2024-06-08T00:00Z",  # Saturday
                "2024-06-09T23:00Z",  # Sunday
                "1969-12-31T23:00Z",  # Wednesday, before the epoch
            ]
        ),
        index=[4, 3, 2, 1, 0],
    )
    slots = _hour_slots(times)
    assert slots.tolist() == [9, 23, 24, 47, 23]
    assert slots.index.tolist() == [4, 3, 2, 1, 0]
    # A zone other than UTC gives the UTC hour and day: Saturday 01:00 in Berlin is Friday.
    berlin = _hour_slots(pd.Series(pd.to_datetime(["2024-06-08T01:00+02:00"], utc=True)))
    assert berlin.tolist() == [23]


def test_records_fill_missing_with_none() -> None:
    frame = pd.DataFrame(
        {
            "kind": pd.array(["access_denied", None], dtype="str"),
            "weight": [2.0, 1.5],
            "number": np.array([3, 4], dtype=np.int64),
            "time": pd.to_datetime(["2024-06-03T09:30Z", "2024-06-03T10:00Z"]),
        }
    )
    records = _records(frame)
    expected = frame.to_dict("records")
    assert [list(record) for record in records] == [["kind", "weight", "number", "time"]] * 2
    assert records[0] == expected[0]
    # to_dict gives NaN for the missing string; the state's JSON needs None.
    assert records[1]["kind"] is None
    assert records[1]["weight"] == 1.5
    assert [type(value) for value in records[0].values()] == [
        type(value) for value in expected[0].values()
    ]
    assert _records(frame.iloc[:0]) == []
