"""Tests of backfill windows (--since/--until), dry runs and late events."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from pipeline.cli import main
from pipeline.engine import ENGINE_CHECKPOINTS, LATE_TOLERANCE, run_once
from pipeline.store.history import History
from pipeline.store.state import State
from tests.test_engine import (
    NOW,
    EveryReadDetector,
    cloudtrail_record,
    make_settings,
    read_findings,
    write_logs,
)
from tests.test_engine_crash import write_config

# write_logs: CloudTrail reads at 2026-10-05 08:00 and 09:00, GCP at 10:00:00.123456789 and
# Azure at 11:00, all UTC.
SINCE = datetime(2026, 10, 5, 9, 0, tzinfo=UTC)
UNTIL = datetime(2026, 10, 5, 11, 0, tzinfo=UTC)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return write_logs(tmp_path / "logs")


@pytest.fixture(autouse=True)
def _reset_baseline_rows() -> None:
    EveryReadDetector.baseline_rows.clear()


def history_times(tmp_path: Path) -> list[str]:
    events = History(tmp_path / "state" / "history").events()
    return sorted(moment.isoformat() for moment in events["time"])


def test_window_keeps_events_inside(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW, since=SINCE, until=UNTIL)

    assert summary.events_read == 4
    assert summary.events_new == 2
    assert summary.events_already_seen == 0
    assert summary.events_outside_window == 2
    assert history_times(tmp_path) == [
        "2026-10-05T09:00:00+00:00",
        # The history stores microseconds.
        "2026-10-05T10:00:00.123456+00:00",
    ]
    assert summary.findings_new == 2


def test_window_bounds_in_summary(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW, since=SINCE, until=UNTIL)

    data = summary.to_dict()
    assert data["since"] == "2026-10-05T09:00:00Z"
    assert data["until"] == "2026-10-05T11:00:00Z"
    assert data["events_outside_window"] == 2


def test_since_alone_ends_now(tmp_path: Path, logs: Path) -> None:
    now = datetime(2026, 10, 5, 10, 30, tzinfo=UTC)

    summary = run_once(make_settings(tmp_path), now=now, since=SINCE)

    assert summary.until == now
    assert summary.events_new == 2
    assert summary.events_outside_window == 2


def test_naive_since_is_utc(tmp_path: Path, logs: Path) -> None:
    summary = run_once(
        make_settings(tmp_path), now=NOW, since=datetime(2026, 10, 5, 9, 0), until=UNTIL
    )

    assert summary.since == SINCE
    assert summary.events_new == 2


def test_offset_since_converted_to_utc(tmp_path: Path, logs: Path) -> None:
    berlin_summer = datetime.fromisoformat("2026-10-05T11:00:00+02:00")

    summary = run_once(make_settings(tmp_path), now=NOW, since=berlin_summer, until=UNTIL)

    assert summary.since == SINCE
    assert summary.events_new == 2


def test_until_without_since_rejected(tmp_path: Path, logs: Path) -> None:
    with pytest.raises(ValueError) as caught:
        run_once(make_settings(tmp_path), now=NOW, until=UNTIL)
    assert str(caught.value) == "a backfill window needs a start: give since with until"
    assert not (tmp_path / "state").exists()


def test_empty_window_rejected(tmp_path: Path, logs: Path) -> None:
    with pytest.raises(ValueError) as caught:
        run_once(make_settings(tmp_path), now=NOW, since=UNTIL, until=SINCE)
    assert str(caught.value) == (
        "the backfill window is empty: since 2026-10-05T11:00:00+00:00 is not before "
        "until 2026-10-05T09:00:00+00:00"
    )


def test_backfill_keeps_source_checkpoints(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)

    run_once(settings, now=NOW, since=SINCE, until=UNTIL)

    with State(tmp_path / "state" / "state.db") as state:
        assert state.checkpoints("local") == {}
        assert state.checkpoints(ENGINE_CHECKPOINTS) == {
            "max_event_time": "2026-10-05T10:00:00.123456+00:00"
        }


def test_regular_run_after_backfill_reads_rest(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW, since=SINCE, until=UNTIL)

    regular = run_once(settings, now=NOW)

    assert regular.sources[0].files_read == 3
    assert regular.events_read == 4
    assert regular.events_already_seen == 2
    assert regular.events_new == 2
    assert regular.events_outside_window == 0
    assert len(history_times(tmp_path)) == 4
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4
    with State(tmp_path / "state" / "state.db") as state:
        assert len(state.checkpoints("local")) == 3


def test_backfill_bootstraps_baseline(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW, since=datetime(2026, 10, 1, tzinfo=UTC), until=NOW)
    (logs / "aws" / "next.jsonl").write_text(
        json.dumps(cloudtrail_record(7, time="2026-10-06T09:00:00Z")) + "\n", encoding="utf-8"
    )

    regular = run_once(settings, now=NOW + timedelta(days=1))

    assert regular.events_new == 1
    # The backfill's window had no history before it. The regular run's baseline is its 4 events.
    assert EveryReadDetector.baseline_rows == [0, 4]


def test_cli_since_until_window(tmp_path: Path, logs: Path) -> None:
    config = write_config(tmp_path, {"tests.every_read": {}})
    summary_path = tmp_path / "summary.json"

    result = CliRunner().invoke(
        main,
        [
            "run",
            "--config",
            str(config),
            "--since",
            "2026-10-05T09:00:00",
            "--until",
            "2026-10-05T11:00:00Z",
            "--summary-json",
            str(summary_path),
        ],
    )

    assert result.exit_code == 0, result.output
    data = json.loads(summary_path.read_text(encoding="utf-8"))
    assert data["since"] == "2026-10-05T09:00:00Z"
    assert data["until"] == "2026-10-05T11:00:00Z"
    assert data["events_new"] == 2
    assert data["events_outside_window"] == 2
    assert "2026-10-05T09:00:00Z to 2026-10-05T11:00:00Z (backfill)" in result.output
    assert "4 read, 2 new, 0 already seen, 2 outside the window" in result.output


def test_cli_date_only_since(tmp_path: Path, logs: Path) -> None:
    config = write_config(tmp_path, {"tests.every_read": {}})
    summary_path = tmp_path / "summary.json"

    result = CliRunner().invoke(
        main,
        [
            "run",
            "--config",
            str(config),
            "--since",
            "2026-10-05",
            "--until",
            "2026-10-06",
            "--summary-json",
            str(summary_path),
        ],
    )

    assert result.exit_code == 0, result.output
    data = json.loads(summary_path.read_text(encoding="utf-8"))
    assert data["since"] == "2026-10-05T00:00:00Z"
    assert data["until"] == "2026-10-06T00:00:00Z"
    assert data["events_new"] == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--until", "2026-10-06"], "--until needs --since: a backfill window needs a start"),
        (
            ["--since", "yesterday"],
            "Invalid value for '--since': invalid time 'yesterday': expected an ISO 8601 date or "
            "time such as 2026-10-01 or 2026-10-01T08:00:00Z",
        ),
        (
            ["--since", "2026-10-06", "--until", "2026-10-05"],
            "Invalid value for '--since': 2026-10-06T00:00:00Z is not before --until "
            "2026-10-05T00:00:00Z",
        ),
    ],
)
def test_cli_bad_window_usage_error(
    tmp_path: Path, logs: Path, arguments: list[str], message: str
) -> None:
    config = write_config(tmp_path, {"tests.every_read": {}})

    result = CliRunner().invoke(main, ["run", "--config", str(config), *arguments])

    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "state").exists()


# Dry runs


def snapshot(folder: Path) -> dict[str, str]:
    """Return relative path -> SHA-256 of every file under ``folder``.

    SQLite's ``-wal`` and ``-shm`` files are left out: opening a WAL database read-only creates
    them (an empty ``-wal``), and they hold no data that ``state.db`` does not.
    """
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(("-wal", "-shm"))
    }


def test_dry_run_changes_no_file(tmp_path: Path, logs: Path) -> None:
    config = write_config(tmp_path, {"tests.every_read": {}})
    first = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert first.exit_code == 0, first.output
    (logs / "aws" / "next.jsonl").write_text(
        json.dumps(cloudtrail_record(7, time="2026-10-06T09:00:00Z")) + "\n", encoding="utf-8"
    )
    before = {name: snapshot(tmp_path / name) for name in ("state", "out")}

    result = CliRunner().invoke(main, ["run", "--config", str(config), "--dry-run"])

    assert result.exit_code == 0, result.output
    assert "(dry run)" in result.output
    after = {name: snapshot(tmp_path / name) for name in ("state", "out")}
    assert after == before
    assert "state.db" in after["state"]
    assert (tmp_path / "state" / "state.db-wal").stat().st_size == 0


def test_dry_run_backfill_writes_nothing(tmp_path: Path, logs: Path) -> None:
    console = Console(record=True, width=200)

    summary = run_once(
        make_settings(tmp_path), now=NOW, since=SINCE, until=UNTIL, dry_run=True, console=console
    )

    assert summary.events_new == 2
    assert summary.findings_new == 2
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "out").exists()


# Late events


def write_late_file(logs: Path) -> None:
    """Write two reads delivered after the first run, 5 h and 30 min before its newest event."""
    lines = [
        json.dumps(cloudtrail_record(21, time="2026-10-05T06:00:00Z", user="dave")),
        json.dumps(cloudtrail_record(22, time="2026-10-05T10:30:00Z", user="erin")),
    ]
    (logs / "aws" / "late.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_late_file_finding_marked(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    write_late_file(logs)

    summary = run_once(settings, now=NOW)

    assert summary.findings_new == 2
    assert summary.findings_late == 1
    assert summary.max_event_time == datetime(2026, 10, 5, 11, 0, tzinfo=UTC)
    findings = {f["principal"]: f for f in read_findings(tmp_path / "out" / "findings.jsonl")}
    assert findings["dave"]["title"] == "read of prod/db-21 (late)"
    assert findings["dave"]["evidence"] == {"operation": "GetSecretValue", "late": True}
    assert findings["erin"]["title"] == "read of prod/db-22"
    assert findings["erin"]["evidence"] == {"operation": "GetSecretValue"}


def test_late_finding_in_console(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    settings = settings.model_copy(
        update={"alerting": settings.alerting.model_copy(update={"console": True})}
    )
    run_once(settings, now=NOW)
    write_late_file(logs)
    console = Console(record=True, width=200)

    run_once(settings, now=NOW, console=console)

    assert "read of prod/db-21 (late)" in console.export_text()


def test_first_run_marks_nothing_late(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert summary.findings_late == 0
    assert summary.max_event_time is None
    titles = [f["title"] for f in read_findings(tmp_path / "out" / "findings.jsonl")]
    assert not any(title.endswith("(late)") for title in titles)


def test_mark_advances_never_back(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    write_late_file(logs)

    run_once(settings, now=NOW)

    with State(tmp_path / "state" / "state.db") as state:
        assert state.checkpoints(ENGINE_CHECKPOINTS) == {
            "max_event_time": "2026-10-05T11:00:00+00:00"
        }


def test_late_tolerance_boundary(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    mark = datetime(2026, 10, 5, 11, 0, tzinfo=UTC)
    at_boundary = (mark - LATE_TOLERANCE).strftime("%Y-%m-%dT%H:%M:%SZ")
    just_before = (mark - LATE_TOLERANCE - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        json.dumps(cloudtrail_record(31, time=at_boundary, user="frank")),
        json.dumps(cloudtrail_record(32, time=just_before, user="grace")),
    ]
    (logs / "aws" / "edge.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = run_once(settings, now=NOW)

    assert summary.findings_late == 1
    findings = {f["principal"]: f for f in read_findings(tmp_path / "out" / "findings.jsonl")}
    assert findings["frank"]["title"] == "read of prod/db-31"
    assert findings["grace"]["title"] == "read of prod/db-32 (late)"
