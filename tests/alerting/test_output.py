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
from pipeline.alerting.alerts import alerts_from_findings
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


def test_empty_findings_create_empty_file(tmp_path: Path, make_findings: MakeFindings) -> None:
    empty = make_findings(travel_row()).iloc[0:0]
    report = write_outputs(empty, tmp_path, QUIET)
    assert report.findings_written == 0
    assert (tmp_path / "findings.jsonl").read_bytes() == b""
    assert not (tmp_path / "outbox").exists()


def test_empty_findings_keep_existing_lines(tmp_path: Path, make_findings: MakeFindings) -> None:
    write_outputs(make_findings(travel_row()), tmp_path, QUIET)
    before = (tmp_path / "findings.jsonl").read_bytes()

    write_outputs(make_findings(travel_row()).iloc[0:0], tmp_path, QUIET)

    assert (tmp_path / "findings.jsonl").read_bytes() == before
    assert before.count(b"\n") == 1


def _console_lines(console: Console) -> list[str]:
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_console_prints_markup_literally(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=400, color_system=None)
    frame = make_findings(
        travel_row(
            principal="[bold red]root[/bold red]\x1b[2J",
            title="read :secret: [link=http://x]here[/link]",
            resources=["arn:aws:secretsmanager:r:1:secret:a", "b", "c", "d", "e"],
        )
    )
    render_console(frame, console)
    lines = _console_lines(console)
    output = "\n".join(lines)
    assert "keytrail: 1 new finding" in output
    assert "[bold red]root[/bold red] [2J" in output
    assert "  title    read :secret: [link=http://x]here[/link]" in lines
    assert "  secrets  arn:aws:secretsmanager:r:1:secret:a" in lines
    assert "           and 2 more" in lines
    assert "\x1b" not in output
    assert "HIGH" in output


def test_console_block_at_80_columns(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    render_console(make_findings(travel_row()), console)
    assert _console_lines(console) == [
        "keytrail: 1 new finding",
        "",
        "HIGH      keytrail.impossible_travel",
        "          arn:aws:sts::123456789012:assumed-role/Admin/alice",
        "  title    alice read prod/db from Berlin and New York 1.5 hours apart",
        "  secrets  arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf",
        "  where    Berlin, DE (198.51.100.7); New York, US (203.0.113.9)",
        "  when     2026-10-10 01:12:00 to 02:42:30 UTC, 2 events",
        "  account  aws 123456789012",
    ]


def test_console_heading_fits_one_line(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    render_console(make_findings(off_hours_row(), detector="off_hours"), console)
    lines = _console_lines(console)
    assert lines[2] == "MEDIUM    keytrail.off_hours  bob@example.com"
    assert "  where    DE (192.0.2.10)" in lines
    assert "  when     2026-10-10 01:12:00 to 01:20:00 UTC, 3 events" in lines


def test_console_long_value_wraps_under_itself(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    title = "carol read 40 secrets " + "from a place far away " * 4
    render_console(make_findings(travel_row(title=title.strip())), console)
    lines = _console_lines(console)
    title_lines = [line for line in lines if "far away" in line]
    assert len(title_lines) == 2
    assert title_lines[0].startswith("  title    carol read 40 secrets from a place")
    assert title_lines[1].startswith("           ")


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [
        ("2026-10-10T01:12:00Z", "2026-10-10T01:12:00Z", "2026-10-10 01:12:00 UTC, 2 events"),
        (
            "2026-10-10T23:50:00Z",
            "2026-10-11T00:10:00Z",
            "2026-10-10 23:50:00 UTC to 2026-10-11 00:10:00 UTC, 2 events",
        ),
    ],
)
def test_console_when_line(
    make_findings: MakeFindings, first: str, last: str, expected: str
) -> None:
    console = Console(record=True, width=200, color_system=None)
    row = travel_row(first_seen=pd.Timestamp(first), last_seen=pd.Timestamp(last))
    render_console(make_findings(row), console)
    assert f"  when     {expected}" in _console_lines(console)


def test_console_where_without_geo(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    row = travel_row(source_ips=[], countries=[], evidence={"distance_km": 1})
    render_console(make_findings(row), console)
    assert "  where    -" in _console_lines(console)


def test_console_caps_alerts_most_severe_first(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    medium = make_findings(off_hours_row(), detector="off_hours")
    high = make_findings(travel_row(), travel_row(principal="dave"))
    alerts = alerts_from_findings(medium) + alerts_from_findings(high)
    render_console(alerts, console, limit=2, findings_path=Path("/out/findings.jsonl"))
    lines = _console_lines(console)
    assert lines[0] == "keytrail: 3 new findings, the 2 most severe shown"
    assert [line.split()[0] for line in lines if line[:1] not in ("", " ")][1:3] == [
        "HIGH",
        "HIGH",
    ]
    assert not any("bob@example.com" in line for line in lines)
    assert lines[-1] == "1 more finding in /out/findings.jsonl"


def test_console_cap_without_findings_file(make_findings: MakeFindings) -> None:
    console = Console(record=True, width=80, color_system=None)
    frame = make_findings(travel_row(), travel_row(principal="dave"), travel_row(principal="eve"))
    render_console(frame, console, limit=1)
    lines = _console_lines(console)
    assert lines[0] == "keytrail: 3 new findings, the 1 most severe shown"
    assert lines[-1] == "2 more findings not shown"


def test_console_no_alerts() -> None:
    console = Console(record=True, width=80, color_system=None)
    render_console([], console)
    assert console.export_text() == "No new findings.\n"


def test_write_outputs_prints_alerts(tmp_path: Path, make_findings: MakeFindings) -> None:
    console = Console(record=True, width=200, color_system=None)
    write_outputs(_frame(make_findings), tmp_path, OutputSettings(outbox=False), console=console)
    lines = _console_lines(console)
    assert lines[0] == "keytrail: 2 new findings"
    assert lines[2].startswith("HIGH      keytrail.impossible_travel  arn:aws:sts::")
    assert "MEDIUM    keytrail.off_hours  bob@example.com" in lines


def test_write_outputs_log_counts_files(
    tmp_path: Path, make_findings: MakeFindings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = OutputSettings(console=False, min_severity="high")
    with caplog.at_level("INFO", logger="pipeline.alerting.output"):
        write_outputs(_frame(make_findings), tmp_path, settings)
    assert caplog.messages == [
        f"wrote 2 findings to {tmp_path / 'findings.jsonl'}, and a Slack and an email file "
        f"for each of the 1 at or above high to {tmp_path / 'outbox'}"
    ]


def test_write_outputs_log_without_outbox(
    tmp_path: Path, make_findings: MakeFindings, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine turns the outbox files off, because its file receiver writes them; the log
    # must not claim that no alerts were written.
    with caplog.at_level("INFO", logger="pipeline.alerting.output"):
        write_outputs(_frame(make_findings), tmp_path, QUIET.model_copy(update={"outbox": False}))
    assert caplog.messages == [f"wrote 2 findings to {tmp_path / 'findings.jsonl'}"]


def test_write_outputs_caps_console(tmp_path: Path, make_findings: MakeFindings) -> None:
    console = Console(record=True, width=200, color_system=None)
    rows = [travel_row(principal=f"user-{number:02d}") for number in range(52)]
    report = write_outputs(
        make_findings(*rows), tmp_path, OutputSettings(outbox=False), console=console
    )
    lines = _console_lines(console)
    assert report.findings_written == 52
    assert lines[0] == "keytrail: 52 new findings, the 50 most severe shown"
    assert sum(line.startswith("HIGH ") for line in lines) == 50
    assert lines[-1] == f"2 more findings in {tmp_path / 'findings.jsonl'}"


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
