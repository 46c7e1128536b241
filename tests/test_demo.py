"""The shipped demo end to end: config.yaml over sample_logs, scored against its labels.

One run reads the whole month as one window, as a first backfill does. Every detector finds
what daily runs find: the isolation forest, the one detector that fits a model, fits again for
each day of the window on the days before it, as the daily replay (``keytrail backtest``) does.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from pipeline.backtest import backtest
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.evaluate import EvaluationReport, evaluate, load_findings, load_labels
from pipeline.summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "sample_logs" / "labels.json"
ISOLATION_FOREST = "keytrail.isolation_forest"
# detector -> (true positives, false positives, false negatives, expected, allowed), measured.
# The isolation forest flags the takeover and the failure burst, whose labels allow it.
SCORES = {
    "keytrail.cross_cloud": (1, 0, 0, 0, 0),
    "keytrail.failure_burst": (2, 0, 0, 0, 0),
    "keytrail.first_seen": (7, 0, 0, 0, 0),
    "keytrail.impossible_travel": (1, 0, 0, 0, 0),
    "keytrail.isolation_forest": (2, 0, 0, 0, 0),
    "keytrail.mass_retrieval": (2, 0, 0, 0, 0),
    "keytrail.new_country": (2, 0, 0, 0, 0),
    "keytrail.off_hours": (4, 0, 0, 10, 0),
    "keytrail.risk": (1, 0, 0, 0, 0),
    "keytrail.volume_spike": (1, 0, 0, 0, 1),
}


def demo_settings(work: Path) -> Settings:
    """Return the shipped config with state and outputs moved into ``work``."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data["state_dir"] = str(work / "state")
    data["output_dir"] = str(work / "out")
    data["alerting"]["console"] = False
    return settings_from_mapping(data, base_dir=ROOT)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSummary, Path]:
    """Run the shipped config once, with state and outputs in a temporary folder."""
    work = tmp_path_factory.mktemp("demo")
    return run_once(demo_settings(work)), work


def test_demo_reads_all_three_clouds(demo_run: tuple[RunSummary, Path]) -> None:
    summary, _ = demo_run
    source = summary.to_dict()["sources"][0]

    assert source["events"] == 16239
    assert source["quarantined_by_reason"] == {"invalid_json": 2, "invalid_time": 1}
    assert source["skipped_by_kind"]["digest"] == 2
    assert source["skipped_by_kind"]["insight"] == 2
    assert source["skipped_by_kind"]["incomplete_last_line"] == 1


def _report(work: Path, settings: Settings) -> EvaluationReport:
    findings = load_findings(work / "out" / "findings.jsonl")
    return evaluate(findings, load_labels(LABELS), allow_list=settings.alerting.allow_list)


def test_demo_exact_scores(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    scores = _report(work, demo_settings(work)).to_json()

    measured = {
        detector: (
            score["true_positives"],
            score["false_positives"],
            score["false_negatives"],
            score["expected"],
            score["allowed"],
        )
        for detector, score in scores.items()
    }
    assert measured == SCORES


def test_demo_finds_every_incident(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    scores = _report(work, demo_settings(work)).to_json()

    missed = {detector: score["missed"] for detector, score in scores.items() if score["missed"]}
    assert missed == {}
    for detector, score in scores.items():
        assert score["recall"] == 1.0, detector


def test_demo_no_decoy_fires(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    report = _report(work, demo_settings(work))

    assert report.decoy_violations == []
    assert [(removal.removed_by, removal.labels) for removal in report.removed] == [
        (
            "allow-list entry 0: quarter-end close runs the batch jobs every 40 minutes on "
            "2026-10-30",
            ("decoy-quarter-end-batch",),
        )
    ]


def test_demo_holiday_read_baseline_text(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    findings = load_findings(work / "out" / "findings.jsonl")
    holiday = [
        finding
        for finding in findings
        if finding["detector"] == "keytrail.off_hours"
        and finding["principal"] == "ananya.das@example.com"
        and "public holiday" in finding["title"]
    ]
    assert len(holiday) == 1
    summary = holiday[0]["baseline"]["summary"]
    # The read was at a usual hour; it fired because of the holiday, not low support.
    assert "(not below 1)" in summary


def test_demo_forest_judges_each_day(demo_run: tuple[RunSummary, Path]) -> None:
    summary, _ = demo_run
    forest = next(
        entry for entry in summary.to_dict()["detectors"] if entry["id"] == ISOLATION_FOREST
    )

    # 30 days of logs: the run's fit before the first day, then one fit for each later day.
    assert forest["report"] == {
        "skipped_no_history": 42,
        "principal_hours_scored": 7547,
        "walk_forward_fits": 29,
    }


def test_demo_daily_replay_matches_run(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    day = dt.datetime(2026, 10, 27, tzinfo=dt.UTC)
    detectors = [ISOLATION_FOREST, "keytrail.risk"]

    replay = backtest(demo_settings(work), day, day + dt.timedelta(days=1), detectors)

    report = evaluate(replay.findings, load_labels(LABELS))
    assert report.to_json()[ISOLATION_FOREST]["found"] == ["takeover-felix"]
    assert "takeover-felix" in report.to_json()["keytrail.risk"]["found"]
    written = load_findings(work / "out" / "findings.jsonl")
    in_run = sorted(item["finding_id"] for item in written if item["detector"] == ISOLATION_FOREST)
    replayed = replay.findings.loc[replay.findings["detector"] == ISOLATION_FOREST, "finding_id"]
    # Both forest findings of the run fall on this day: the takeover and the failure burst.
    assert len(in_run) == 2
    assert sorted(replayed) == in_run


def test_demo_second_run_adds_nothing(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    before = (work / "out" / "findings.jsonl").read_text(encoding="utf-8")

    summary = run_once(demo_settings(work)).to_dict()

    assert summary["sources"][0]["events"] == 0
    assert (work / "out" / "findings.jsonl").read_text(encoding="utf-8") == before
