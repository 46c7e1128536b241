"""Tests of scoring findings against labeled incidents and decoys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.evaluate import evaluate, load_findings, load_labels

OFF = "keytrail.off_hours"
TRAVEL = "keytrail.impossible_travel"
COUNTRY = "keytrail.new_country"
BURST = "keytrail.failure_burst"

LABELS: dict[str, Any] = {
    "seed": 7,
    "start": "2026-10-01",
    "days": 30,
    "incidents": [
        {
            "id": "night-read",
            "kind": "off_hours",
            "principal": "maria@example.com",
            "cloud": "gcp",
            "start": "2026-10-13T07:05:00Z",
            "end": "2026-10-13T07:40:00Z",
            "detectors": [OFF],
            "description": "reads at 03:00 local",
        },
        {
            "id": "second-night",
            "kind": "off_hours",
            "principal": "lena@example.com",
            "cloud": "aws",
            "start": "2026-10-22T00:20:00Z",
            "end": "2026-10-22T00:55:00Z",
            "detectors": [OFF],
            "description": "reads at 02:00 local",
        },
        {
            "id": "trip",
            "kind": "impossible_travel",
            "principal": "jonas@example.com",
            "aliases": ["arn:aws:iam::1:user/jonas"],
            "cloud": "gcp",
            "start": "2026-10-14T08:30:00Z",
            "end": "2026-10-14T10:20:00Z",
            "detectors": [TRAVEL, COUNTRY],
            "description": "Berlin then São Paulo",
        },
        {
            "id": "spray",
            "kind": "failure_burst",
            "principal": None,
            "cloud": "azure",
            "source_ip": "5.42.189.44",
            "start": "2026-10-29T21:40:00Z",
            "end": "2026-10-29T21:46:00Z",
            "detectors": [BURST],
            "description": "one address, many identities",
        },
    ],
    "decoys": [
        {
            "id": "late-worker",
            "kind": "working_late",
            "principal": "sarah@example.com",
            "start": "2026-10-07T22:30:00Z",
            "end": "2026-10-07T22:30:00Z",
            "must_not_fire": [OFF],
            "description": "18:30 local",
        }
    ],
}


def _finding(
    detector: str, principal: str | None, first: str, last: str, **extra: Any
) -> dict[str, Any]:
    row = {"detector": detector, "principal": principal, "first_seen": first, "last_seen": last}
    row.update(extra)
    return row


def test_exact_scores_mixed_findings() -> None:
    findings = [
        _finding(OFF, "maria@example.com", "2026-10-13T07:05:00Z", "2026-10-13T07:38:00Z"),
        _finding(OFF, "tom@example.com", "2026-10-13T07:05:00Z", "2026-10-13T07:38:00Z"),
        _finding(TRAVEL, "JONAS@example.com", "2026-10-14T08:30:00Z", "2026-10-14T10:00:00Z"),
        _finding(
            BURST,
            "4 principals",
            "2026-10-29T21:40:06Z",
            "2026-10-29T21:45:00Z",
            source_ips=["5.42.189.44"],
        ),
    ]
    scores = evaluate(findings, LABELS).to_json()
    assert scores[OFF]["true_positives"] == 1
    assert scores[OFF]["false_positives"] == 1
    assert scores[OFF]["false_negatives"] == 1
    assert scores[OFF]["precision"] == 0.5
    assert scores[OFF]["recall"] == 0.5
    assert scores[OFF]["missed"] == ["second-night"]
    assert scores[TRAVEL]["precision"] == 1.0
    assert scores[TRAVEL]["recall"] == 1.0
    assert scores[BURST]["true_positives"] == 1
    assert scores[BURST]["recall"] == 1.0


def test_no_findings_precision_none() -> None:
    scores = evaluate([], LABELS).to_json()
    assert scores[COUNTRY]["precision"] is None
    assert scores[COUNTRY]["recall"] == 0.0
    assert scores[COUNTRY]["false_negatives"] == 1
    assert scores[COUNTRY]["findings"] == 0
    assert scores[COUNTRY]["incidents"] == 1


def test_no_incidents_recall_none() -> None:
    labels = {"incidents": [], "decoys": []}
    scores = evaluate(
        [_finding(BURST, "x", "2026-10-01T00:00:00Z", "2026-10-01T00:01:00Z")], labels
    )
    assert scores.to_json()[BURST]["recall"] is None
    assert scores.to_json()[BURST]["precision"] == 0.0


def test_alias_matches_incident() -> None:
    findings = [
        _finding(
            COUNTRY, "arn:aws:iam::1:user/jonas", "2026-10-14T10:00:00Z", "2026-10-14T10:00:00Z"
        )
    ]
    assert evaluate(findings, LABELS).to_json()[COUNTRY]["true_positives"] == 1


def test_tolerance_edges() -> None:
    inside = _finding(OFF, "lena@example.com", "2026-10-22T01:55:00Z", "2026-10-22T02:10:00Z")
    outside = _finding(OFF, "lena@example.com", "2026-10-22T01:56:00Z", "2026-10-22T02:10:00Z")
    assert evaluate([inside], LABELS).to_json()[OFF]["true_positives"] == 1
    assert evaluate([outside], LABELS).to_json()[OFF]["true_positives"] == 0


def test_wrong_detector_no_match() -> None:
    findings = [
        _finding(BURST, "maria@example.com", "2026-10-13T07:05:00Z", "2026-10-13T07:38:00Z")
    ]
    scores = evaluate(findings, LABELS).to_json()
    assert scores[BURST]["false_positives"] == 1
    assert scores[OFF]["false_negatives"] == 2


def test_source_ip_needs_listed_address() -> None:
    findings = [
        _finding(
            BURST,
            "4 principals",
            "2026-10-29T21:40:06Z",
            "2026-10-29T21:45:00Z",
            source_ips=["5.42.189.45"],
        )
    ]
    assert evaluate(findings, LABELS).to_json()[BURST]["true_positives"] == 0


def test_decoy_violation_reported() -> None:
    findings = [
        _finding(
            OFF,
            "sarah@example.com",
            "2026-10-07T22:30:00Z",
            "2026-10-07T22:30:00Z",
            finding_id="f-1",
        )
    ]
    report = evaluate(findings, LABELS)
    assert report.decoy_violations == [
        {"decoy": "late-worker", "detector": OFF, "finding_id": "f-1"}
    ]
    assert report.to_json()[OFF]["decoy_violations"] == ["late-worker"]
    assert report.to_json()[OFF]["false_positives"] == 1
    assert "decoy fired: late-worker by keytrail.off_hours (finding f-1)" in report.to_table()


def test_dataframe_input_with_timestamps() -> None:
    frame = pd.DataFrame(
        {
            "detector": [OFF],
            "principal": ["maria@example.com"],
            "first_seen": [pd.Timestamp("2026-10-13T07:05:00", tz="UTC")],
            "last_seen": [pd.Timestamp("2026-10-13T07:38:00", tz="UTC")],
            "source_ips": [["1.2.3.4"]],
        }
    )
    assert evaluate(frame, LABELS).to_json()[OFF]["true_positives"] == 1


def test_table_lists_detectors() -> None:
    table = evaluate([], LABELS).to_table()
    lines = table.splitlines()
    assert lines[0].split() == [
        "detector",
        "precision",
        "recall",
        "TP",
        "FP",
        "FN",
        "findings",
        "incidents",
    ]
    assert lines[2].split() == [BURST, "-", "0.00", "0", "0", "1", "0", "1"]
    assert "missed: night-read (keytrail.off_hours)" in lines
    assert lines[-1] == "decoy violations: none"


def test_load_labels_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(LABELS))
    assert load_labels(path) == LABELS


def test_load_labels_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    broken = {"incidents": [{"id": "a", "principal": "p", "start": "2026-10-01T00:00:00Z"}]}
    path.write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"incidents\[0\] is missing end, detectors"):
        load_labels(path)


def test_load_labels_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="labels file not found"):
        load_labels(tmp_path / "absent.json")


def test_load_findings_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    path.write_text('{"detector": "a", "principal": "p"}\n\n{"detector": "b", "principal": "q"}\n')
    assert load_findings(path) == [
        {"detector": "a", "principal": "p"},
        {"detector": "b", "principal": "q"},
    ]


def test_load_findings_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "findings.jsonl"
    path.write_text('{"detector": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2: expected a JSON object"):
        load_findings(path)
