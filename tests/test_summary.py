"""The printed run summary: layout at 80 columns, literal log strings, dry runs."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from pipeline.summary import DetectorSummary, RunSummary, SourceSummary, print_summary


def _summary() -> RunSummary:
    summary = RunSummary(
        run_id="20261010T010000Z-abc123",
        started=datetime(2026, 10, 10, 1, tzinfo=UTC),
        status="completed_with_problems",
        duration_seconds=1.234,
        events_read=100,
        events_new=90,
        events_already_seen=10,
        findings_new=1,
        findings_already_written=1,
        quarantine_file="/srv/keytrail/state/quarantine/20261010T010000Z-abc123.jsonl",
    )
    summary.sources = [
        SourceSummary(
            name="prod-trail",
            files_listed=5,
            files_unchanged=2,
            files_read=3,
            records=120,
            events=100,
            quarantined_by_reason={"unknown_format": 3, "invalid_json": 12},
            skipped_by_kind={"not_secret_activity": 5},
        )
    ]
    summary.detectors = [
        DetectorSummary(
            id="keytrail.off_hours",
            findings=2,
            new_findings=1,
            report={"skipped_no_history": 4},
        ),
        DetectorSummary(
            id="keytrail.failure_burst",
            error="detector keytrail.failure_burst: RuntimeError: table missing",
        ),
    ]
    summary.problems = ["detector keytrail.failure_burst: RuntimeError: table missing"]
    summary.geoip = {
        "geoip_source": "DB-IP City Lite 2026-09",
        "geoip_build_date": "2026-09-01",
        "stale": True,
        "warnings": ["GeoIP database is 130 days old"],
        "addresses_looked_up": 7,
        "addresses_found": 6,
    }
    summary.outputs = {
        "findings_file": "/srv/keytrail/out/findings.jsonl",
        "findings_written": 2,
        "below_min_severity": 1,
        "slack_files": 1,
        "email_files": 1,
    }
    return summary


def _printed(summary: RunSummary, width: int = 80) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    print_summary(summary, console)
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_summary_lines_at_80_columns() -> None:
    assert _printed(_summary()) == [
        "",
        "keytrail run 20261010T010000Z-abc123",
        "",
        "source prod-trail",
        "  files read               3",
        "  files unchanged          2",
        "  records                120",
        "  events                 100",
        "  quarantined             15",
        "    invalid_json          12",
        "    unknown_format         3",
        "  skipped                  5",
        "    not_secret_activity    5",
        "",
        "detectors                 findings  new  too little history",
        "  keytrail.off_hours             2    1                   4",
        "  keytrail.failure_burst    failed    -                   -",
        "",
        "events      100 read, 90 new, 10 already seen",
        "findings    1 new, 1 already written",
        "GeoIP       DB-IP City Lite 2026-09",
        "            built 2026-09-01, stale; 6 of 7 addresses found",
        "warning     GeoIP database is 130 days old",
        "outputs     2 findings appended to /srv/keytrail/out/findings.jsonl",
        "            1 finding below min_severity, not alerted",
        "files       1 Slack file and 1 email file written to the outbox folder",
        "quarantine  15 records kept in",
        "            /srv/keytrail/state/quarantine/20261010T010000Z-abc123.jsonl",
        "problem     detector keytrail.failure_burst: RuntimeError: table missing",
        "status      completed_with_problems in 1.23 s",
    ]


def test_summary_alert_lines_per_receiver() -> None:
    summary = _summary()
    summary.outputs = {"findings_file": "/out/findings.jsonl", "findings_written": 34}
    summary.alerting = {
        "allowed": 1,
        "silenced": 0,
        "alerts": {"security": 29, "pager": 1},
        "queued": {
            "security": {"queued": 27, "updates": 1, "repeats_skipped": 2},
            "pager": {"queued": 1, "updates": 0, "repeats_skipped": 0},
        },
    }
    lines = _printed(summary)
    start = lines.index("outputs     34 findings appended to /out/findings.jsonl")
    assert lines[start + 1 : start + 4] == [
        "            1 finding removed by the allow-list, 0 findings silenced",
        "alerts      pager: 1 alert routed, 1 queued, 0 held back by repeat_interval",
        "alerts      security: 29 alerts routed, 27 queued (1 update), 2 held back by",
    ]
    assert lines[start + 4] == "            repeat_interval"


def test_summary_routed_alerts_before_commit() -> None:
    # A run that failed before its commit has routed alerts but queued none.
    summary = _summary()
    summary.outputs = {"findings_file": "/out/findings.jsonl", "findings_written": 3}
    summary.alerting = {"alerts": {"security": 3}}
    assert "alerts      security: 3 alerts routed" in _printed(summary)


def test_summary_wide_console_keeps_lines_whole() -> None:
    lines = _printed(_summary(), width=160)
    assert (
        "quarantine  15 records kept in "
        "/srv/keytrail/state/quarantine/20261010T010000Z-abc123.jsonl"
    ) in lines
    assert "    invalid_json          12" in lines


def test_summary_prints_log_strings_literally() -> None:
    summary = _summary()
    summary.sources.append(
        SourceSummary(name="[red]gcp[/red]", error="could not list gs://b: :fire: denied\x1b[2J")
    )
    lines = _printed(summary)
    assert "source [red]gcp[/red]  failed" in lines
    assert "problem     source [red]gcp[/red]: could not list gs://b: :fire: denied [2J" in lines
    assert not any("\x1b" in line for line in lines)


def test_summary_error_not_repeated() -> None:
    lines = _printed(_summary())
    assert sum("RuntimeError: table missing" in line for line in lines) == 1


def test_summary_dry_run_without_geoip() -> None:
    summary = RunSummary(
        run_id="20261010T010000Z-def456",
        started=datetime(2026, 10, 10, 1, tzinfo=UTC),
        dry_run=True,
        status="completed",
        duration_seconds=0.5,
        geoip={"geoip_source": None, "geoip_build_date": None, "stale": False},
    )
    lines = _printed(summary)
    assert lines[1] == "keytrail run 20261010T010000Z-def456 (dry run)"
    assert "GeoIP     no database used" in lines
    assert "outputs   none (dry run)" in lines
    assert lines[-1] == "status    completed in 0.50 s"
    assert not any(line.startswith("quarantine") for line in lines)
