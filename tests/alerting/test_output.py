"""findings.jsonl, outbox files, console table and output settings."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError
from rich.console import Console

from detectors.base import FINDING_COLUMNS
from pipeline.alerting.output import OutputSettings, render_console, write_outputs
from tests.alerting.conftest import off_hours_row, travel_row

MakeFindings = Callable[..., pd.DataFrame]
QUIET = OutputSettings(console=False)


def _frame(make_findings: MakeFindings) -> pd.DataFrame:
    return pd.concat(
        [make_findings(travel_row()), make_findings(off_hours_row(), detector="off_hours")],
        ignore_index=True,
    )


def test_findings_jsonl_round_trip(tmp_path: Path, make_findings: MakeFindings) -> None:
    report = write_outputs(make_findings(travel_row()), tmp_path, QUIET)
    lines = (tmp_path / "findings.jsonl").read_text().splitlines()
    assert report.findings_written == 1
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == list(FINDING_COLUMNS)
    assert record["first_seen"] == "2026-10-10T01:12:00Z"
    assert record["last_seen"] == "2026-10-10T02:42:30.250000Z"
    assert record["source_ips"] == ["198.51.100.7", "203.0.113.9"]
    assert record["event_uids"] == ["ev-1", "ev-2"]
    assert record["mitre"] == ["T1078.004"]
    assert record["evidence"]["to"] == {"city": "New York", "country": "US", "ip": "203.0.113.9"}
    assert record["baseline"]["countries_30d"] == ["DE"]
    assert record["event_count"] == 2
    assert record["geoip_build_date"] == "2026-09-01"


def test_findings_jsonl_appends(tmp_path: Path, make_findings: MakeFindings) -> None:
    path = tmp_path / "findings.jsonl"
    write_outputs(make_findings(travel_row()), tmp_path, QUIET)
    first = path.read_bytes()
    write_outputs(_frame(make_findings), tmp_path, QUIET)
    data = path.read_bytes()
    assert data.startswith(first)
    assert len(data.splitlines()) == 3


def test_findings_jsonl_after_torn_line(tmp_path: Path, make_findings: MakeFindings) -> None:
    path = tmp_path / "findings.jsonl"
    path.write_bytes(b'{"finding_id": "half')
    write_outputs(make_findings(travel_row()), tmp_path, QUIET)
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"finding_id": "half'
    assert json.loads(lines[1])["detector"] == "keytrail.impossible_travel"


def test_outbox_files_and_eml(tmp_path: Path, make_findings: MakeFindings) -> None:
    settings = OutputSettings(
        console=False, email_from="keytrail@example.org", email_to=["soc@example.org"]
    )
    now = dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.UTC)
    report = write_outputs(_frame(make_findings), tmp_path, settings, now=now)
    ids = [alert.alert_id for alert in report.alerts]
    outbox = tmp_path / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == sorted(
        [f"{i}.slack.json" for i in ids] + [f"{i}.eml" for i in ids]
    )
    slack = json.loads((outbox / f"{ids[0]}.slack.json").read_text())
    assert slack["blocks"][0]["type"] == "header"

    with (outbox / f"{ids[0]}.eml").open("rb") as handle:
        parsed = email.message_from_binary_file(handle, policy=email.policy.default)
    assert parsed["X-Keytrail-Alert"] == report.alerts[0].dedup_key
    assert parsed["To"] == "soc@example.org"
    assert [part.get_content_type() for part in parsed.iter_parts()] == [
        "text/plain",
        "text/html",
    ]


def test_outbox_rewrite_same_alert_id(tmp_path: Path, make_findings: MakeFindings) -> None:
    frame = make_findings(travel_row())
    first = write_outputs(frame, tmp_path, QUIET)
    second = write_outputs(frame, tmp_path, QUIET)
    assert first.slack_files == second.slack_files
    names = sorted(os.listdir(tmp_path / "outbox"))
    assert names == sorted([first.slack_files[0].name, first.email_files[0].name]), (
        "no temporary files are left behind"
    )


def test_min_severity_filters_alerts(tmp_path: Path, make_findings: MakeFindings) -> None:
    settings = OutputSettings(console=False, min_severity="high")
    report = write_outputs(_frame(make_findings), tmp_path, settings)
    assert report.findings_written == 2
    assert [alert.severity for alert in report.alerts] == ["high"]
    assert report.below_min_severity == 1
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1


def test_outbox_off_writes_no_files(tmp_path: Path, make_findings: MakeFindings) -> None:
    report = write_outputs(
        _frame(make_findings), tmp_path, OutputSettings(console=False, outbox=False)
    )
    assert report.slack_files == []
    assert not (tmp_path / "outbox").exists()


def test_empty_findings_write_nothing(tmp_path: Path, make_findings: MakeFindings) -> None:
    empty = make_findings(travel_row()).iloc[0:0]
    report = write_outputs(empty, tmp_path, QUIET)
    assert report.findings_written == 0
    assert not (tmp_path / "findings.jsonl").exists()


def test_console_table_prints_markup_literally(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=400, color_system=None)
    frame = make_findings(
        travel_row(
            principal="[bold red]root[/bold red]\x1b[2J",
            resources=["arn:aws:secretsmanager:r:1:secret:a", "b", "c"],
        )
    )
    render_console(frame, console)
    output = console.export_text()
    assert "keytrail: 1 alert" in output
    assert "[bold red]root[/bold red] [2J" in output
    assert "arn:aws:secretsmanager:r:1:secret:a, b and 1 more" in output
    assert "\x1b" not in output
    assert "HIGH" in output


def test_console_no_alerts() -> None:
    console = Console(record=True, width=80, color_system=None)
    render_console([], console)
    assert console.export_text() == "No alerts.\n"


def test_write_outputs_prints_table(tmp_path: Path, make_findings: MakeFindings) -> None:
    console = Console(record=True, width=200, color_system=None)
    write_outputs(_frame(make_findings), tmp_path, OutputSettings(outbox=False), console=console)
    assert "keytrail: 2 alerts" in console.export_text()


def test_settings_defaults() -> None:
    settings = OutputSettings()
    assert settings.email_from == "keytrail@localhost"
    assert settings.email_to == ["security@localhost"]
    assert settings.min_severity == "low"
    assert settings.templates_dir is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"colour": True}, "Extra inputs are not permitted"),
        ({"min_severity": "urgent"}, "Input should be 'info', 'low', 'medium', 'high' or"),
        ({"email_from": "a@b\r\nBcc: c@d"}, "is not a single-line email address"),
        ({"email_to": []}, "needs at least one address"),
        ({"email_to": ["nobody"]}, "is not an email address"),
    ],
)
def test_settings_rejects_invalid(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OutputSettings(**values)  # type: ignore[arg-type]
