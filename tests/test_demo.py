"""The shipped demo end to end: config.yaml over sample_logs finds every labeled incident."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.evaluate import evaluate, load_findings, load_labels
from pipeline.summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]
DETECTOR_IDS = (
    "keytrail.failure_burst",
    "keytrail.impossible_travel",
    "keytrail.new_country",
    "keytrail.off_hours",
)


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

    assert source["events"] == 15439
    assert source["quarantined_by_reason"] == {"invalid_json": 2, "invalid_time": 1}
    assert source["skipped_by_kind"]["digest"] == 2
    assert source["skipped_by_kind"]["insight"] == 2
    assert source["skipped_by_kind"]["incomplete_last_line"] == 1


def test_demo_finds_every_incident(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    findings = load_findings(work / "out" / "findings.jsonl")
    report = evaluate(findings, load_labels(ROOT / "sample_logs" / "labels.json")).to_json()

    for detector_id in DETECTOR_IDS:
        scores = report[detector_id]
        assert scores["recall"] == 1.0, detector_id
        assert scores["precision"] == 1.0, detector_id
        assert scores["false_positives"] == 0, detector_id
        assert scores["decoy_violations"] == [], detector_id


def test_demo_second_run_adds_nothing(demo_run: tuple[RunSummary, Path]) -> None:
    _, work = demo_run
    before = (work / "out" / "findings.jsonl").read_text(encoding="utf-8")

    summary = run_once(demo_settings(work)).to_dict()

    assert summary["sources"][0]["events"] == 0
    assert (work / "out" / "findings.jsonl").read_text(encoding="utf-8") == before
