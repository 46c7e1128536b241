"""Named positive and negative cases for ``keytrail.first_seen``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FrameHistory
from detectors.first_seen import (
    FirstSeenDetector,
    map_keys,
    novel_mask,
    secret_name,
    shared_key_codes,
)
from pipeline.store.history import History
from tests.detectors.conftest import ACCOUNT, NOW, aws_denied, aws_read

Build = Callable[[list[dict[str, Any]]], pd.DataFrame]

DEPLOYER = "arn:aws:iam::111122223333:role/ci-deployer"
NEWCOMER = "new.engineer@example.com"
USUAL = ("prod/api/key", "prod/cache/token", "prod/db/password")
DAY0 = pd.Timestamp("2024-06-01T00:00:00Z")
WINDOW_DAY = DAY0 + pd.Timedelta(days=21)


def arn(secret: str) -> str:
    return f"arn:aws:secretsmanager:eu-central-1:{ACCOUNT}:secret:{secret}"


def at(day: int, hour: int = 9, minute: int = 0) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=day, hours=hour, minutes=minute)


def daily_reads(
    principal: str, secrets: tuple[str, ...], days: range, hour: int = 9
) -> list[dict[str, Any]]:
    """Return one read of each secret per day, a minute apart."""
    return [
        aws_read(at(day, hour, minute), principal, secret=secret)
        for day in days
        for minute, secret in enumerate(secrets)
    ]


def deployer_history(make_events: Build) -> FrameHistory:
    """Twenty days of the deployer reading its three usual secrets every morning."""
    return FrameHistory(make_events(daily_reads(DEPLOYER, USUAL, range(21))))


def run(
    make_events: Build,
    window_rows: list[dict[str, Any]],
    history: FrameHistory,
    **params: Any,
) -> tuple[FirstSeenDetector, pd.DataFrame]:
    detector = FirstSeenDetector(**params)
    findings = detector.detect(make_events(window_rows), history, NOW)
    return detector, findings


def test_usual_secrets_never_fire(make_events: Build) -> None:
    window = daily_reads(DEPLOYER, USUAL, range(21, 23))
    detector, findings = run(make_events, window, deployer_history(make_events))
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 0, "skipped_no_history_secrets": 0}


def test_fourth_secret_fires_once(make_events: Build) -> None:
    window = daily_reads(DEPLOYER, USUAL, range(21, 22))
    window.append(aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key", event_uid="new-1"))
    window.append(aws_read(at(21, 12), DEPLOYER, secret="prod/payments/key", event_uid="new-2"))
    _, findings = run(make_events, window, deployer_history(make_events))

    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["detector"] == "keytrail.first_seen"
    assert finding["severity"] == "low"
    assert finding["title"] == f"First read of prod/payments/key by {DEPLOYER} in 30 days"
    assert finding["principal"] == DEPLOYER
    assert finding["principal_type"] == "role"
    assert finding["cloud"] == "aws"
    assert finding["account"] == ACCOUNT
    assert finding["resources"] == [arn("prod/payments/key")]
    assert finding["event_uids"] == ["new-1", "new-2"]
    assert finding["event_count"] == 2
    assert finding["first_seen"] == at(21, 11)
    assert finding["last_seen"] == at(21, 12)
    assert finding["mitre"] == ["T1555.006"]


def test_fourth_secret_evidence_and_baseline(make_events: Build) -> None:
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key", event_uid="new-1")]
    _, findings = run(make_events, window, deployer_history(make_events))

    evidence = findings.iloc[0]["evidence"]
    assert evidence == {
        "day": "2024-06-22",
        "new_secrets": [
            {
                "resource": arn("prod/payments/key"),
                "name": "prod/payments/key",
                "first_read": "2024-06-22T11:00:00Z",
                "reads": 1,
                "sensitive": False,
            }
        ],
        "new_secret_count": 1,
        "sensitive_secrets": [],
        "principal_age_days": 21.1,
        "learning_days": 14,
    }
    assert findings.iloc[0]["baseline"] == {
        "days": 30,
        "usual_secret_count": 3,
        "usual_secrets": list(USUAL),
        "principal_first_seen": "2024-06-01T09:00:00Z",
        "principal_age_days": 21.1,
        "summary": (
            f"first read of prod/payments/key by {DEPLOYER} in 30 days; it reads 3 other secrets"
        ),
    }


def test_sensitive_secret_raises_severity(make_events: Build) -> None:
    window = [aws_read(at(21, 11), DEPLOYER, secret="Prod/Root/Credentials")]
    _, findings = run(
        make_events,
        window,
        deployer_history(make_events),
        sensitive_resources=["*:secret:prod/root/*"],
    )
    assert findings["severity"].tolist() == ["high"]
    assert findings.iloc[0]["evidence"]["sensitive_secrets"] == [arn("Prod/Root/Credentials")]


def test_non_matching_glob_keeps_low(make_events: Build) -> None:
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key")]
    _, findings = run(
        make_events, window, deployer_history(make_events), sensitive_resources=["*root*"]
    )
    assert findings["severity"].tolist() == ["low"]


def test_learning_principal_does_not_fire(make_events: Build) -> None:
    # The new engineer appeared five days before the window: still learning.
    history = daily_reads(DEPLOYER, USUAL, range(21)) + daily_reads(
        NEWCOMER, ("dev/db/password",), range(16, 21)
    )
    window = [
        aws_read(at(21, 10, minute), NEWCOMER, secret=f"dev/service-{minute}/token")
        for minute in range(6)
    ]
    detector, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert findings.empty
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 6}


def test_principal_without_history_is_learning(make_events: Build) -> None:
    window = [aws_read(at(21, 10), NEWCOMER, secret="dev/db/password")]
    detector, findings = run(make_events, window, FrameHistory())
    assert findings.empty
    assert detector.report_["skipped_no_history"] == 1


def test_learning_ends_after_learning_days(make_events: Build) -> None:
    # First seen at day 7, 09:00; the read on day 21 at 09:00 is exactly 14 days later.
    history = daily_reads(NEWCOMER, ("dev/db/password",), range(7, 21))
    window = [aws_read(at(21, 9), NEWCOMER, secret="dev/cache/token")]
    _, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert len(findings) == 1
    assert findings.iloc[0]["evidence"]["principal_age_days"] == 14.0


def test_sensitive_during_learning_fires_when_enabled(make_events: Build) -> None:
    window = [
        aws_read(at(21, 10), NEWCOMER, secret="prod/root/credentials"),
        aws_read(at(21, 11), NEWCOMER, secret="dev/db/password"),
    ]
    params: dict[str, Any] = {"sensitive_resources": ["*prod/root/*"]}
    _, quiet = run(make_events, window, FrameHistory(), **params)
    detector, findings = run(
        make_events, window, FrameHistory(), sensitive_during_learning=True, **params
    )
    assert quiet.empty
    assert findings["resources"].tolist() == [[arn("prod/root/credentials")]]
    assert findings["severity"].tolist() == ["high"]
    assert detector.report_ == {"skipped_no_history": 1, "skipped_no_history_secrets": 1}


def test_first_day_of_many_secrets_is_one_finding(make_events: Build) -> None:
    new = tuple(f"team/app-{number}/token" for number in range(5))
    window = daily_reads(DEPLOYER, new, range(21, 22), hour=14)
    _, findings = run(make_events, window, deployer_history(make_events))

    assert len(findings) == 1
    finding = findings.iloc[0]
    assert finding["title"] == f"{DEPLOYER} read 5 secrets for the first time in 30 days"
    assert finding["resources"] == sorted(arn(secret) for secret in new)
    assert finding["event_count"] == 5
    assert finding["evidence"]["new_secret_count"] == 5
    assert [item["name"] for item in finding["evidence"]["new_secrets"]] == list(new)
    assert finding["baseline"]["summary"] == (
        f"first reads of 5 secrets ({', '.join(new)}) by {DEPLOYER} in 30 days; "
        "it reads 3 other secrets"
    )


def test_one_finding_per_day(make_events: Build) -> None:
    window = [
        aws_read(at(21, 14), DEPLOYER, secret="team/a/token"),
        aws_read(at(21, 15), DEPLOYER, secret="team/b/token"),
        aws_read(at(22, 14), DEPLOYER, secret="team/a/token"),
        aws_read(at(22, 15), DEPLOYER, secret="team/c/token"),
    ]
    _, findings = run(make_events, window, deployer_history(make_events))
    assert findings["resources"].tolist() == [
        [arn("team/a/token"), arn("team/b/token")],
        [arn("team/c/token")],
    ]
    assert findings["dedup_key"].nunique() == 2
    # On the second day team/a and team/b count as usual secrets: they were read the day before.
    assert findings.iloc[1]["baseline"]["usual_secret_count"] == 5


def test_read_older_than_lookback_is_new_again(make_events: Build) -> None:
    history = daily_reads(DEPLOYER, USUAL, range(21))
    history.append(aws_read(at(-15, 9), DEPLOYER, secret="prod/archive/key"))
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/archive/key")]
    _, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert findings["resources"].tolist() == [[arn("prod/archive/key")]]


def test_read_inside_lookback_is_known(make_events: Build) -> None:
    history = daily_reads(DEPLOYER, USUAL, range(21))
    history.append(aws_read(at(-5, 9), DEPLOYER, secret="prod/archive/key"))
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/archive/key")]
    _, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert findings.empty


def test_failed_read_does_not_fire(make_events: Build) -> None:
    window = [aws_denied(at(21, 11), DEPLOYER, secret="prod/payments/key")]
    _, findings = run(make_events, window, deployer_history(make_events))
    assert findings.empty


def test_secret_read_by_another_principal_fires(make_events: Build) -> None:
    history = daily_reads(DEPLOYER, USUAL, range(21)) + daily_reads(
        "arn:aws:iam::111122223333:role/app", ("prod/payments/key",), range(21)
    )
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key")]
    _, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert findings["principal"].tolist() == [DEPLOYER]


def test_kms_decrypt_via_invoked_by_counts_once(make_events: Build) -> None:
    window = [
        aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key", event_uid="get-1"),
        aws_read(
            at(21, 11),
            DEPLOYER,
            secret="prod/payments/key",
            event_uid="kms-1",
            service="kms",
            operation="Decrypt",
            action="decrypt",
            invoked_by="secretsmanager.amazonaws.com",
        ),
    ]
    _, findings = run(make_events, window, deployer_history(make_events))
    assert findings["event_uids"].tolist() == [["get-1"]]
    assert findings.iloc[0]["evidence"]["new_secrets"][0]["reads"] == 1


def test_kms_decrypt_in_history_makes_secret_known(make_events: Build) -> None:
    history = daily_reads(DEPLOYER, USUAL, range(21))
    history.append(
        aws_read(
            at(18, 9),
            DEPLOYER,
            secret="prod/payments/key",
            service="kms",
            operation="Decrypt",
            action="decrypt",
            invoked_by="secretsmanager.amazonaws.com",
        )
    )
    window = [aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key")]
    _, findings = run(make_events, window, FrameHistory(make_events(history)))
    assert findings.empty


def test_batch_read_is_one_event(make_events: Build) -> None:
    window = [
        aws_read(at(21, 11), DEPLOYER, secret="team/a/token", event_uid="batch-1"),
        aws_read(at(21, 11), DEPLOYER, secret="team/b/token", event_uid="batch-1"),
    ]
    _, findings = run(make_events, window, deployer_history(make_events))
    assert findings["event_count"].tolist() == [1]
    assert findings.iloc[0]["evidence"]["new_secret_count"] == 2


def test_history_holding_window_gives_same_findings(make_events: Build) -> None:
    history_rows = daily_reads(DEPLOYER, USUAL, range(21))
    window_rows = [
        aws_read(at(21, 11, 30), DEPLOYER, secret="prod/payments/key", event_uid="new-1")
    ]
    window = make_events(window_rows)
    detector = FirstSeenDetector()
    alone = detector.detect(window, FrameHistory(make_events(history_rows)), NOW)
    both = pd.concat([make_events(history_rows), window], ignore_index=True)
    doubled = detector.detect(window, FrameHistory(both), NOW)
    assert len(alone) == 1
    assert doubled["finding_id"].tolist() == alone["finding_id"].tolist()


def test_daily_runs_match_one_run(make_events: Build) -> None:
    history_rows = daily_reads(DEPLOYER, USUAL, range(21))
    days = [
        [aws_read(at(21, 11), DEPLOYER, secret="team/a/token")],
        [
            aws_read(at(22, 11), DEPLOYER, secret="team/a/token"),
            aws_read(at(22, 12), DEPLOYER, secret="team/b/token"),
        ],
    ]
    frames = [make_events(rows) for rows in days]
    history = make_events(history_rows)
    whole = FirstSeenDetector().detect(
        pd.concat(frames, ignore_index=True), FrameHistory(history), NOW
    )
    first = FirstSeenDetector().detect(frames[0], FrameHistory(history), NOW)
    second = FirstSeenDetector().detect(
        frames[1], FrameHistory(pd.concat([history, frames[0]], ignore_index=True)), NOW
    )
    assert sorted(whole["finding_id"]) == sorted([*first["finding_id"], *second["finding_id"]])
    assert whole["resources"].tolist() == [[arn("team/a/token")], [arn("team/b/token")]]


def test_novel_mask_compares_earlier_rows() -> None:
    prior = pd.DataFrame(
        {
            "principal": ["p", "p"],
            "value": ["a", "b"],
            "last_time": pd.to_datetime(["2024-06-01T00:00Z", "2024-05-01T00:00Z"]),
        }
    )
    current = pd.DataFrame(
        {
            "principal": ["p", "p", "p", "q"],
            "value": ["a", "b", "b", "a"],
            "time": pd.to_datetime(
                ["2024-06-10T00:00Z", "2024-06-10T00:00Z", "2024-06-11T00:00Z", "2024-06-10T00:00Z"]
            ),
        }
    )
    mask = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=30))
    assert mask.tolist() == [False, True, False, True]
    assert (
        novel_mask(prior, current.iloc[:0], ("principal", "value"), pd.Timedelta(days=1)).dtype
        == np.bool_
    )


def test_novel_mask_uses_latest_earlier_row() -> None:
    prior = pd.DataFrame(
        {
            "principal": ["p", "p", "p"],
            "value": ["a", "a", "a"],
            "last_time": pd.to_datetime(
                ["2024-05-01T00:00Z", "2024-06-01T00:00Z", "2024-06-12T00:00Z"]
            ),
        }
    )
    current = pd.DataFrame(
        {
            "principal": ["p", "p"],
            "value": ["a", "a"],
            "time": pd.to_datetime(["2024-06-10T00:00Z", "2024-06-13T00:00Z"]),
        }
    )
    month = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=15))
    days = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=5))
    assert month.tolist() == [False, False]
    # The prior row of June 12 is later than the first current row, so it is not compared.
    assert days.tolist() == [True, False]


def test_novel_mask_span_shorter_than_lookback() -> None:
    # The rows span two days and the look-back is ten days, so only a key's first row can be new.
    prior = pd.DataFrame(
        {
            "principal": ["p", "p", "q", "r"],
            "value": ["a", "b", "a", "a"],
            "last_time": pd.to_datetime(
                ["2024-06-05T00:00Z", "2024-05-01T00:00Z", "2024-06-11T12:00Z", "2024-06-10T00:00Z"]
            ),
        }
    )
    current = pd.DataFrame(
        {
            "principal": ["p", "p", "q", "p", "q", "r"],
            "value": ["a", "b", "a", "b", "a", "a"],
            "time": pd.to_datetime(
                [
                    "2024-06-10T00:00Z",
                    "2024-06-10T00:00Z",
                    "2024-06-11T00:00Z",
                    "2024-06-11T00:00Z",
                    "2024-06-12T00:00Z",
                    "2024-06-12T00:00Z",
                ]
            ),
        }
    )
    mask = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=10))
    # p/a is known from June 5, and p/b was last read 40 days before. The prior row of q/a is
    # later than its first current row, so it does not count. r/a was read two days before.
    assert mask.tolist() == [False, True, True, False, False, False]


def test_novel_mask_span_longer_than_lookback() -> None:
    # A key that returns after more than the look-back is new again within ``current``.
    prior = pd.DataFrame(
        {"principal": ["p"], "value": ["a"], "last_time": pd.to_datetime(["2024-06-01T00:00Z"])}
    )
    current = pd.DataFrame(
        {
            "principal": ["p", "p", "p", "p"],
            "value": ["a", "a", "b", "a"],
            "time": pd.to_datetime(
                ["2024-06-02T00:00Z", "2024-06-03T00:00Z", "2024-06-03T00:00Z", "2024-06-10T00:00Z"]
            ),
        }
    )
    mask = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=3))
    assert mask.tolist() == [False, False, True, True]


def test_novel_mask_unsorted_rows_match_sorted_rows() -> None:
    prior = pd.DataFrame(
        {"principal": ["p"], "value": ["a"], "last_time": pd.to_datetime(["2024-06-01T00:00Z"])}
    )
    times = ["2024-06-09T00:00Z", "2024-06-02T00:00Z", "2024-06-05T00:00Z"]
    current = pd.DataFrame(
        {"principal": ["p", "p", "p"], "value": ["a", "a", "a"], "time": pd.to_datetime(times)}
    )
    mask = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=30))
    ordered = current.sort_values("time").reset_index(drop=True)
    assert mask.tolist() == [False, False, False]
    assert novel_mask(prior, ordered, ("principal", "value"), pd.Timedelta(days=2)).tolist() == [
        False,
        True,
        True,
    ]
    # Out of order, the June 5 row (second in time) is compared with June 2.
    assert novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=2)).tolist() == [
        True,
        False,
        True,
    ]


def test_novel_mask_categorical_prior_and_arrow_current() -> None:
    prior = pd.DataFrame(
        {
            "principal": pd.Categorical(["p", "q"]),
            "value": pd.Categorical(["a", "a"]),
            "last_time": pd.to_datetime(["2024-06-01T00:00Z", "2024-06-01T00:00Z"]),
        }
    )
    current = pd.DataFrame(
        {
            "principal": pd.array(["p", "q", "q"], dtype="string[pyarrow]"),
            "value": pd.array(["a", "b", "a"], dtype="string[pyarrow]"),
            "time": pd.to_datetime(["2024-06-02T00:00Z"] * 3),
        }
    )
    mask = novel_mask(prior, current, ("principal", "value"), pd.Timedelta(days=30))
    assert mask.tolist() == [False, True, False]


def test_shared_key_codes_number_current_keys() -> None:
    prior = pd.DataFrame({"principal": pd.Categorical(["q", "p", "z"]), "value": [1, 1, 1]})
    current = pd.DataFrame({"principal": ["p", "q", "p", "p"], "value": [1, 1, 2, 1]})
    prior_codes, codes = shared_key_codes(prior, current, ("principal", "value"))
    assert codes.tolist() == [0, 1, 2, 0]
    assert prior_codes.tolist() == [1, 0, -1]


def test_shared_key_codes_without_prior_rows() -> None:
    prior = pd.DataFrame({"principal": pd.Series([], dtype=object)})
    current = pd.DataFrame({"principal": ["p", "q", "p"]})
    prior_codes, codes = shared_key_codes(prior, current, ("principal",))
    assert codes.tolist() == [0, 1, 0]
    assert prior_codes.tolist() == []


def test_map_keys_looks_up_each_key() -> None:
    keys = pd.Series(["b", "a", None, "c", "b"], dtype="string[pyarrow]", index=[5, 6, 7, 8, 9])
    mapping = pd.Series(
        pd.to_datetime(["2024-06-01T00:00Z", "2024-06-02T00:00Z"]), index=["a", "b"]
    )
    mapped = map_keys(keys, mapping)
    assert mapped.index.tolist() == [5, 6, 7, 8, 9]
    assert mapped.tolist()[:2] == [
        pd.Timestamp("2024-06-02T00:00Z"),
        pd.Timestamp("2024-06-01T00:00Z"),
    ]
    # A null key and a key without an entry map to NaT.
    assert mapped.isna().tolist() == [False, False, True, True, False]


def test_sensitive_matches_any_glob_case_insensitively() -> None:
    detector = FirstSeenDetector(sensitive_resources=["*ROOT*", "*/pci/*"])
    resources = pd.Series(
        [arn("prod/root-token"), arn("team/pci/card"), arn("prod/api/key"), arn("prod/root-token")],
        dtype="string[pyarrow]",
    )
    assert detector._sensitive(resources).tolist() == [True, True, False, True]
    assert FirstSeenDetector()._sensitive(resources).tolist() == [False] * 4


@pytest.mark.parametrize(
    ("resource", "name"),
    [
        (arn("prod/db/password"), "prod/db/password"),
        ("/prod/db/password", "/prod/db/password"),
        ("projects/shop/secrets/stripe", "projects/shop/secrets/stripe"),
    ],
)
def test_secret_name(resource: str, name: str) -> None:
    assert secret_name(resource) == name


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"learning_days": 40}, ()),
        ({"sensitive_resources": ["prod/*", " "]}, ("sensitive_resources",)),
        ({"severity": "urgent"}, ("severity",)),
        ({"lookback_days": 0}, ("lookback_days",)),
    ],
)
def test_invalid_params_are_rejected(params: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        FirstSeenDetector(**params)
    assert [error["loc"] for error in caught.value.errors()] == [loc]


def test_history_store_gives_same_findings(make_events: Build, tmp_path: Path) -> None:
    history_rows = daily_reads(DEPLOYER, USUAL, range(21))
    history_rows.append(aws_read(at(21, 10, 30), DEPLOYER, secret="team/a/token"))
    store = History(tmp_path / "history")
    store.append(make_events(history_rows), "backfill")
    window = make_events(
        [
            aws_read(at(21, 10, 45), DEPLOYER, secret="team/a/token"),
            aws_read(at(21, 11), DEPLOYER, secret="prod/payments/key"),
        ]
    )
    from_store = FirstSeenDetector().detect(window, store, NOW)
    from_frame = FirstSeenDetector().detect(window, FrameHistory(make_events(history_rows)), NOW)
    assert from_store["resources"].tolist() == [[arn("prod/payments/key")]]
    assert from_store["evidence"].tolist() == from_frame["evidence"].tolist()
    assert from_store["baseline"].tolist() == from_frame["baseline"].tolist()
