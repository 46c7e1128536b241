"""Runs of the engine keep a statistical detector's fitted state and read history lazily."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Self

import pandas as pd
import pytest

from detectors.base import (
    HistoryView,
    StatisticalDetector,
    StatisticalParams,
    build_findings,
    register,
    registered_detectors,
)
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.store.state import State

NOW = datetime(2026, 10, 9, 12, 0, tzinfo=UTC)


class RollupTotals(StatisticalDetector):
    """Learn each principal's read count from the rollup; never fires."""

    id = "tests.rollup_totals"
    Params = StatisticalParams
    fits: ClassVar[list[pd.Timestamp]] = []

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.totals_: dict[str, int] = {}
        self.report_: dict[str, Any] = {}

    @property
    def lookback(self) -> timedelta:
        return timedelta(days=7)

    def fit(self, history: HistoryView, now: pd.Timestamp) -> Self:
        rollup = history.rollup(until=now, columns=["principal", "count"])
        self.totals_ = {
            str(name): int(count)
            for name, count in zip(rollup["principal"], rollup["count"], strict=True)
        }
        self.fitted_through_ = now
        type(self).fits.append(now)
        return self

    def score(self, window: pd.DataFrame) -> pd.Series:
        return window["principal"].map(self.totals_).astype(float)

    def get_state(self) -> dict[str, Any]:
        fitted = self.fitted_through_
        return {"totals": self.totals_, "fitted_through": None if fitted is None else str(fitted)}

    def set_state(self, state: dict[str, Any]) -> Self:
        self.totals_ = dict(state["totals"])
        self.fitted_through_ = pd.Timestamp(state["fitted_through"])
        return self

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        self.ensure_fitted(history, window["time"].min())
        unknown = set(window["principal"].dropna()) - set(self.totals_)
        self.report_ = {"skipped_no_history": len(unknown), "known": sorted(self.totals_)}
        return build_findings([], detector=self)


if RollupTotals.id not in registered_detectors():
    register(RollupTotals)


def read_record(number: int, time: str, user: str = "alice") -> dict[str, Any]:
    """Return one CloudTrail GetSecretValue record by an IAM user."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": "AIDAEXAMPLE0000000001",
            "arn": f"arn:aws:iam::111122223333:user/{user}",
            "accountId": "111122223333",
            "userName": user,
        },
        "eventTime": time,
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "eu-west-1",
        "sourceIPAddress": "203.0.113.9",
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": {"secretId": "prod/db"},
        "responseElements": None,
        "eventID": f"22222222-0000-4000-8000-{number:012d}",
        "eventType": "AwsApiCall",
        "recipientAccountId": "111122223333",
    }


def add_log(root: Path, name: str, records: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (root / f"{name}.jsonl").write_text(lines, encoding="utf-8")


def settings(tmp_path: Path) -> Settings:
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {"tests.rollup_totals": {"refit_hours": 24}},
        "alerting": {"console": False, "outbox": False},
    }
    return settings_from_mapping(data, base_dir=tmp_path)


@pytest.fixture(autouse=True)
def clear_fits() -> None:
    RollupTotals.fits.clear()


def stored_totals(tmp_path: Path) -> dict[str, Any] | None:
    with State(tmp_path / "state" / "state.db", read_only=True) as state:
        stored = state.detector_state("tests.rollup_totals")
    return None if stored is None else stored.state["totals"]


def test_state_is_kept_until_refit_hours(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    config = settings(tmp_path)
    add_log(logs, "day1", [read_record(n, f"2026-10-05T0{n}:00:00Z") for n in range(1, 4)])
    first = run_once(config, now=NOW)
    assert [str(time) for time in RollupTotals.fits] == ["2026-10-05 01:00:00+00:00"]
    assert first.detectors[0].report == {"skipped_no_history": 1, "known": []}
    assert stored_totals(tmp_path) == {}

    # Twenty hours later: the stored state still serves, so nothing is fitted.
    add_log(logs, "day1-late", [read_record(10, "2026-10-05T21:00:00Z")])
    run_once(config, now=NOW)
    assert len(RollupTotals.fits) == 1

    # Two days later the state is too old; the fit reads the rollup of the earlier runs.
    add_log(logs, "day3", [read_record(20, "2026-10-07T09:00:00Z", user="bob")])
    third = run_once(config, now=NOW)
    assert [str(time) for time in RollupTotals.fits][1:] == ["2026-10-07 09:00:00+00:00"]
    assert stored_totals(tmp_path) == {"alice": 4}
    assert third.detectors[0].report == {"skipped_no_history": 1, "known": ["alice"]}
    assert third.to_dict()["detectors"][0]["report"]["skipped_no_history"] == 1


def test_changed_params_refit(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    add_log(logs, "day1", [read_record(1, "2026-10-05T01:00:00Z")])
    run_once(settings(tmp_path), now=NOW)
    add_log(logs, "day1-late", [read_record(2, "2026-10-05T02:00:00Z")])
    changed = settings(tmp_path).model_copy(deep=True)
    # refit_hours does not shape the state, so changing it alone keeps the state.
    changed.detectors["tests.rollup_totals"].params["refit_hours"] = 48
    run_once(changed, now=NOW)
    assert len(RollupTotals.fits) == 1


def test_dry_run_stores_no_state(tmp_path: Path) -> None:
    add_log(tmp_path / "logs", "day1", [read_record(1, "2026-10-05T01:00:00Z")])
    run_once(settings(tmp_path), now=NOW, dry_run=True)
    assert len(RollupTotals.fits) == 1
    assert not (tmp_path / "state" / "state.db").exists()
