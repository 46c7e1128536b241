"""Tests of scoring findings against labeled incidents and decoys."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.alerting.routing import AllowEntry
from pipeline.alerting.silences import Matcher, Silence, SilenceStore
from pipeline.errors import InputError
from pipeline.evaluate import evaluate, load_findings, load_labels, read_silences

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
    labels: dict[str, Any] = {"incidents": [], "decoys": []}
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
        "expected",
        "allowed",
        "silenced",
        "alerts",
        "alerts/day",
    ]
    assert lines[2].split() == [BURST, "-", "0.00", "0", "0", "1", "0", "0", "0", "0", "0.00"]
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


# --- may_fire, expected spans, filters and alerts per day ---------------------------------------

RISK = "keytrail.risk"
FIRST = "keytrail.first_seen"
SPIKE = "keytrail.volume_spike"
NOW = dt.datetime(2026, 10, 31, tzinfo=dt.UTC)

EXTENDED: dict[str, Any] = {
    "start": "2026-10-01",
    "days": 30,
    "incidents": [
        {
            "id": "takeover",
            "principal": "felix@example.com",
            "start": "2026-10-27T15:12:00Z",
            "end": "2026-10-27T16:31:00Z",
            "detectors": [RISK],
            "may_fire": [FIRST],
        }
    ],
    "decoys": [
        {
            "id": "quarter-end",
            "principal": "mi-batch-jobs",
            "start": "2026-10-30T00:00:00Z",
            "end": "2026-10-30T23:59:00Z",
            "must_not_fire": [SPIKE],
        }
    ],
    "expected": [
        {
            "id": "night-shift-learning",
            "principal": "carlos@example.com",
            "start": "2026-10-01T05:30:00Z",
            "end": "2026-10-15T07:30:00Z",
            "expected": [OFF],
        }
    ],
}


def _quarter_end(finding_id: str = "q-1") -> dict[str, Any]:
    return _finding(
        SPIKE,
        "mi-batch-jobs",
        "2026-10-30T00:00:41Z",
        "2026-10-30T23:20:41Z",
        finding_id=finding_id,
        account="kv",
        source_ips=["10.1.3.4"],
        evidence={},
    )


def test_may_fire_counts_true_positive() -> None:
    findings = [
        _finding(FIRST, "felix@example.com", "2026-10-27T15:24:00Z", "2026-10-27T16:31:00Z")
    ]

    scores = evaluate(findings, EXTENDED, now=NOW).to_json()

    assert scores[FIRST]["true_positives"] == 1
    assert scores[FIRST]["false_positives"] == 0
    assert scores[FIRST]["recall"] is None
    assert scores[RISK]["false_negatives"] == 1
    assert scores[RISK]["missed"] == ["takeover"]


def test_expected_span_neither_true_nor_false() -> None:
    findings = [
        _finding(OFF, "carlos@example.com", "2026-10-02T06:08:00Z", "2026-10-02T06:40:00Z"),
        _finding(OFF, "carlos@example.com", "2026-10-20T06:08:00Z", "2026-10-20T06:40:00Z"),
    ]

    scores = evaluate(findings, EXTENDED, now=NOW).to_json()

    assert scores[OFF]["expected"] == 1
    assert scores[OFF]["false_positives"] == 1
    assert scores[OFF]["true_positives"] == 0
    assert scores[OFF]["precision"] == 0.0


def test_allow_list_removes_decoy_finding() -> None:
    entry = AllowEntry(detectors=[SPIKE], principals=["mi-batch-*"], reason="quarter close")

    report = evaluate([_quarter_end()], EXTENDED, allow_list=[entry], now=NOW)

    scores = report.to_json()[SPIKE]
    assert scores["findings"] == 1
    assert scores["allowed"] == 1
    assert scores["alerts"] == 0
    assert scores["false_positives"] == 0
    assert report.decoy_violations == []
    assert [removal.to_json() for removal in report.removed] == [
        {
            "finding_id": "q-1",
            "detector": SPIKE,
            "principal": "mi-batch-jobs",
            "first_seen": "2026-10-30T00:00:41Z",
            "removed_by": "allow-list entry 0: quarter close",
            "labels": ["quarter-end"],
        }
    ]
    assert (
        "removed by allow-list entry 0: quarter close: keytrail.volume_spike finding q-1 "
        "(mi-batch-jobs, 2026-10-30T00:00:41Z; matched quarter-end)"
    ) in report.to_table().splitlines()


def test_expired_allow_entry_keeps_finding() -> None:
    entry = AllowEntry(
        detectors=[SPIKE],
        principals=["mi-batch-jobs"],
        reason="quarter close",
        expires=dt.datetime(2026, 10, 15, tzinfo=dt.UTC),
    )

    report = evaluate([_quarter_end()], EXTENDED, allow_list=[entry], now=NOW)

    assert report.to_json()[SPIKE]["allowed"] == 0
    assert report.decoy_violations == [
        {"decoy": "quarter-end", "detector": SPIKE, "finding_id": "q-1"}
    ]


def test_default_now_is_period_end() -> None:
    entry = AllowEntry(
        detectors=[SPIKE],
        principals=["mi-batch-jobs"],
        reason="quarter close",
        expires=dt.datetime(2026, 11, 2, tzinfo=dt.UTC),
    )

    report = evaluate([_quarter_end()], EXTENDED, allow_list=[entry])

    assert report.to_json()[SPIKE]["allowed"] == 1


def test_silence_removal_named() -> None:
    silence = Silence(
        id="5a1e0c07",
        matchers=[Matcher(label="principal", value="mi-batch-jobs")],
        owner="ops@example.com",
        reason="quarter close",
        starts_at=dt.datetime(2026, 10, 29, tzinfo=dt.UTC),
        ends_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        created_at=dt.datetime(2026, 10, 29, tzinfo=dt.UTC),
    )

    report = evaluate([_quarter_end()], EXTENDED, silences=[silence], now=NOW)

    assert report.to_json()[SPIKE]["silenced"] == 1
    assert report.to_json()[SPIKE]["alerts"] == 0
    assert report.removed[0].removed_by == "silence 5a1e0c07"


def test_alerts_per_day_over_period() -> None:
    findings = [
        _finding(
            OFF, "tom@example.com", f"2026-10-{day:02d}T07:05:00Z", f"2026-10-{day:02d}T07:06:00Z"
        )
        for day in range(1, 7)
    ]

    scores = evaluate(findings, EXTENDED, now=NOW).to_json()

    assert scores[OFF]["alerts"] == 6
    assert scores[OFF]["alerts_per_day"] == 0.2


def test_alerts_per_day_without_period() -> None:
    findings = [
        _finding(OFF, "tom@example.com", "2026-10-01T07:05:00Z", "2026-10-01T07:06:00Z"),
        _finding(OFF, "tom@example.com", "2026-10-03T07:05:00Z", "2026-10-03T07:06:00Z"),
        _finding(OFF, "ann@example.com", "2026-10-03T08:05:00Z", "2026-10-03T08:06:00Z"),
    ]

    report = evaluate(findings, {"incidents": [], "decoys": []}, now=NOW)

    assert report.days == 2
    assert report.to_json()[OFF]["alerts_per_day"] == 1.5


def test_document_holds_removals() -> None:
    entry = AllowEntry(detectors=[SPIKE], principals=["mi-batch-jobs"], reason="quarter close")

    document = evaluate([_quarter_end()], EXTENDED, allow_list=[entry], now=NOW).to_document()

    assert document["days"] == 30
    assert document["removed"][0]["removed_by"] == "allow-list entry 0: quarter close"
    assert document["decoy_violations"] == []
    assert document["detectors"][SPIKE]["allowed"] == 1


def test_load_labels_expected_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    broken = {"expected": [{"id": "a", "principal": "p", "start": "x", "end": "y"}]}
    path.write_text(json.dumps(broken))

    with pytest.raises(InputError, match=r"expected\[0\] is missing expected"):
        load_labels(path)


def test_read_silences_leaves_file_unchanged(tmp_path: Path) -> None:
    state_db = tmp_path / "state.db"
    store = SilenceStore(state_db)
    store.add(
        Silence(
            id="0000c0de",
            matchers=[Matcher(label="detector", value=SPIKE)],
            owner="ops@example.com",
            reason="maintenance",
            starts_at=dt.datetime(2026, 10, 29, tzinfo=dt.UTC),
            ends_at=dt.datetime(2026, 10, 30, tzinfo=dt.UTC),
            created_at=dt.datetime(2026, 10, 29, tzinfo=dt.UTC),
        ),
        now=dt.datetime(2026, 10, 29, tzinfo=dt.UTC),
    )
    before = state_db.read_bytes()

    silences = read_silences(state_db)

    assert [silence.id for silence in silences] == ["0000c0de"]
    assert state_db.read_bytes() == before


def test_read_silences_missing_file(tmp_path: Path) -> None:
    assert read_silences(tmp_path / "state.db") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("first", "last", "scored"),
    [
        ("2026-11-05T07:05:00Z", "2026-11-05T07:06:00Z", False),  # after the 30 days
        ("2026-09-30T23:50:00Z", "2026-09-30T23:59:00Z", False),  # the evening before
        ("2026-09-30T23:50:00Z", "2026-10-01T00:10:00Z", True),  # reaches into the period
        ("2026-10-30T23:50:00Z", "2026-10-30T23:59:00Z", True),  # the last evening
    ],
)
def test_findings_outside_labeled_period_are_not_scored(
    first: str, last: str, scored: bool
) -> None:
    findings = [_finding(OFF, "tom@example.com", first, last)]

    report = evaluate(findings, LABELS)

    assert report.to_json()[OFF]["false_positives"] == int(scored)
    assert report.outside_period == int(not scored)
    assert report.to_document()["outside_period"] == int(not scored)
    assert report.to_table().endswith(
        "decoy violations: none"
        if scored
        else "decoy violations: none\nnot scored: 1 finding outside the labeled period"
    )
