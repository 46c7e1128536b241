"""Tests of pipeline.scheduler and `keytrail schedule`: triggers, coalescing, signals, errors."""

from __future__ import annotations

import signal
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from click.testing import CliRunner
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.config import ScheduleSettings, Settings, load_config
from pipeline.scheduler import JOB_ID, ScheduledJob, build_scheduler, build_trigger, describe
from pipeline.store.state import State, state_lock
from pipeline.summary import RunSummary
from tests.test_engine import write_logs
from tests.test_engine_crash import (  # reap_children is an autouse fixture
    finish,
    reap_children,  # noqa: F401
    start_child,
    wait_for,
    write_config,
)

# Settings


def test_interval_parsed() -> None:
    schedule = ScheduleSettings.model_validate({"interval": "5m"})

    assert schedule.interval == timedelta(minutes=5)
    assert schedule.misfire_grace_time == timedelta(hours=1)
    assert schedule.run_at_start is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "set exactly one of cron (a crontab line) and interval (such as 5m)"),
        (
            {"cron": "0 3 * * *", "interval": "5m", "timezone": "UTC"},
            "set exactly one of cron (a crontab line) and interval (such as 5m)",
        ),
        (
            {"cron": "*/5 * * * *"},
            "timezone is required with cron: the IANA name the crontab hours are read in, such "
            "as UTC or Europe/Berlin",
        ),
        (
            {"cron": "0 3 * * *", "timezone": "Mars/Olympus"},
            "unknown time zone 'Mars/Olympus'; expected an IANA name such as UTC or Europe/Berlin",
        ),
        (
            {"cron": "0 3 * * 1-5", "timezone": "UTC"},
            "invalid cron '0 3 * * 1-5': write the weekday field with names such as mon-fri or "
            "sun, not numbers, because APScheduler 3 counts 0 as Monday where crontab counts 0 "
            "as Sunday",
        ),
        ({"cron": "0 3 * *", "timezone": "UTC"}, "invalid cron '0 3 * *': Wrong number of fields"),
        (
            {"interval": "5 minutes"},
            "invalid duration '5 minutes': expected a number and a unit (s, m, h, d, w)",
        ),
        ({"interval": "5m", "every": "5m"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_schedule_rejected(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ScheduleSettings.model_validate(data)
    assert message in str(caught.value)


def test_schedule_section_in_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"tests.every_read": {}},
        schedule={"cron": "*/15 * * * mon-fri", "timezone": "Europe/Berlin", "jitter": "30s"},
    )

    settings = load_config(config)

    assert settings.schedule == ScheduleSettings(
        cron="*/15 * * * mon-fri", timezone="Europe/Berlin", jitter=timedelta(seconds=30)
    )


def test_source_name_with_underscore_rejected(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    text = config.read_text(encoding="utf-8").replace("name: local", "name: _engine")
    config.write_text(text, encoding="utf-8")

    result = CliRunner().invoke(main, ["validate-config", "--config", str(config)])

    assert result.exit_code == 2
    assert (
        "sources[0].name: '_engine' starts with an underscore; such names are reserved for "
        "keytrail's own checkpoints, so rename the source"
    ) in result.output


# Triggers


def test_cron_trigger_in_timezone() -> None:
    schedule = ScheduleSettings(cron="30 2 * * mon-fri", timezone="America/New_York")

    trigger = build_trigger(schedule)

    assert isinstance(trigger, CronTrigger)
    friday = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    # The next weekday 02:30 in New York after Friday noon UTC is Monday 07:30 UTC (EST, UTC-5).
    assert trigger.get_next_fire_time(None, friday) == datetime(
        2026, 12, 7, 7, 30, tzinfo=UTC
    ).astimezone(trigger.timezone)


def test_interval_trigger_with_jitter() -> None:
    trigger = build_trigger(
        ScheduleSettings(interval=timedelta(minutes=5), jitter=timedelta(seconds=20))
    )

    assert isinstance(trigger, IntervalTrigger)
    assert trigger.interval == timedelta(minutes=5)
    assert trigger.jitter == 20


def test_cron_trigger_jitter_set() -> None:
    trigger = build_trigger(
        ScheduleSettings(cron="0 * * * *", timezone="UTC", jitter=timedelta(minutes=1))
    )

    assert trigger.jitter == 60


def test_describe_schedule() -> None:
    assert (
        describe(ScheduleSettings(interval=timedelta(minutes=90)))
        == "every 1h 30m (UTC), first run now"
    )
    assert (
        describe(ScheduleSettings(cron="0 3 * * *", timezone="Asia/Kolkata", run_at_start=False))
        == "cron '0 3 * * *' (Asia/Kolkata), first run at the first trigger time"
    )


# Coalescing


def run_scheduler_once(
    schedule: ScheduleSettings, job: ScheduledJob, next_run_time: datetime
) -> datetime:
    """Start a scheduler whose first run time is ``next_run_time``, wait for one job execution,
    stop it and return the job's next run time."""
    scheduler = build_scheduler(schedule, job, next_run_time=next_run_time)
    done = threading.Event()

    def on_done(event: JobExecutionEvent) -> None:
        done.set()

    scheduler.add_listener(on_done, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    scheduler.start()
    try:
        assert done.wait(30), "the scheduled job did not run"
        # get_job waits for the scheduler thread, which plans the next run under the same lock.
        planned = scheduler.get_job(JOB_ID)
    finally:
        scheduler.shutdown(wait=True)
    assert planned is not None
    next_run: datetime = planned.next_run_time
    return next_run


def settings_for(tmp_path: Path) -> Settings:
    write_logs(tmp_path / "logs")
    return load_config(write_config(tmp_path, {"tests.every_read": {}}))


def test_gap_of_three_intervals_runs_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    schedule = ScheduleSettings(interval=timedelta(hours=1))
    job = ScheduledJob(settings)
    now = datetime.now(UTC)

    next_run = run_scheduler_once(schedule, job, next_run_time=now - 3 * timedelta(hours=1))

    assert job.calls == 1
    assert job.last is not None
    assert job.last.status == "completed"
    assert next_run > now
    assert next_run <= now + timedelta(hours=1)
    with State(tmp_path / "state" / "state.db") as state:
        assert [run["status"] for run in state.runs()] == ["completed"]


def test_missed_run_beyond_grace_skipped(tmp_path: Path) -> None:
    # Every missed time of a daily cron lies more than the 1 h grace in the past, so the run
    # is skipped and the next one is planned.
    settings = settings_for(tmp_path)
    now = datetime.now(UTC)
    # The top of the hour three hours back lies 3 to 4 hours in the past.
    past = (now - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    schedule = ScheduleSettings(cron=f"0 {past.hour} * * *", timezone="UTC", run_at_start=False)
    job = ScheduledJob(settings)
    scheduler = build_scheduler(schedule, job, next_run_time=past)
    missed = threading.Event()
    scheduler.add_listener(lambda event: missed.set(), EVENT_JOB_MISSED)

    scheduler.start()
    try:
        assert missed.wait(30), "the missed run was not reported"
        planned = scheduler.get_job(JOB_ID)
    finally:
        scheduler.shutdown(wait=True)

    assert job.calls == 0
    assert planned is not None
    assert planned.next_run_time == past + timedelta(days=1)


# Job body


def test_job_skips_when_locked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path)
    job = ScheduledJob(settings)

    with state_lock(settings.state_dir):
        outcome = job()

    assert outcome.status == "skipped"
    assert outcome.exit_code == 4
    assert outcome.summary is None
    assert outcome.error is not None
    assert outcome.error.startswith(f"another keytrail run holds the lock on {settings.state_dir}")
    skipped = [r for r in caplog.records if r.getMessage().startswith("scheduled run 1 skipped")]
    assert len(skipped) == 1
    assert skipped[0].levelname == "WARNING"


def test_job_survives_raising_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path)
    calls: list[int] = []

    def flaky_run(settings: Settings, **options: object) -> RunSummary:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return RunSummary(run_id="r2", started=datetime.now(UTC), status="completed")

    job = ScheduledJob(settings, run=flaky_run)

    first = job()
    second = job()

    assert first.status == "failed"
    assert first.exit_code == 1
    assert first.error == "RuntimeError: disk full"
    assert second.status == "completed"
    assert second.exit_code == 0
    assert job.calls == 2
    failed = [
        r
        for r in caplog.records
        if r.getMessage() == "scheduled run 1 failed: RuntimeError: disk full"
    ]
    assert len(failed) == 1
    assert failed[0].levelname == "ERROR"


def test_job_outcome_with_problems(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    settings = settings.model_copy(
        update={
            "sources": [
                *settings.sources,
                settings.sources[0].model_copy(
                    update={"name": "gone", "paths": [tmp_path / "missing"]}
                ),
            ]
        }
    )

    outcome = ScheduledJob(settings)()

    assert outcome.status == "completed_with_problems"
    assert outcome.exit_code == 3
    assert outcome.summary is not None
    assert [entry["source"] for entry in outcome.summary.behind()] == ["gone"]


# Command line


def test_schedule_once_runs_job(tmp_path: Path) -> None:
    write_logs(tmp_path / "logs")
    config = write_config(tmp_path, {"tests.every_read": {}})

    result = CliRunner().invoke(main, ["schedule", "--config", str(config), "--once"])

    assert result.exit_code == 0, result.output
    with State(tmp_path / "state" / "state.db") as state:
        runs = state.runs()
    assert [run["status"] for run in runs] == ["completed"]
    assert runs[0]["summary"]["findings_new"] == 4


def test_schedule_once_locked_exit_code(tmp_path: Path) -> None:
    write_logs(tmp_path / "logs")
    config = write_config(tmp_path, {"tests.every_read": {}})

    with state_lock(tmp_path / "state"):
        result = CliRunner().invoke(main, ["schedule", "--config", str(config), "--once"])

    assert result.exit_code == 4


def test_schedule_without_section_fails(tmp_path: Path) -> None:
    write_logs(tmp_path / "logs")
    config = write_config(tmp_path, {"tests.every_read": {}})

    result = CliRunner().invoke(main, ["schedule", "--config", str(config)])

    assert result.exit_code == 2
    assert result.output == (
        "error: invalid config: schedule: missing; add a schedule section with cron (and "
        "timezone) or interval, or run `keytrail schedule --once` to run the job once\n"
    )


# Signals, with a real `keytrail schedule` process. tests.gate blocks the run until the test releases it.


def start_scheduler(folder: Path) -> subprocess.Popen[bytes]:
    write_logs(folder / "logs")
    config = write_config(
        folder, {"tests.every_read": {}, "tests.gate": {}}, schedule={"interval": "1h"}
    )
    child = start_child(["schedule", "--config", str(config)], folder)
    wait_for(lambda: (folder / "gate-reached").exists() or child.poll() is not None, "the run")
    assert child.poll() is None, (folder / "stderr.txt").read_text(encoding="utf-8")
    return child


def stderr_of(folder: Path) -> str:
    return (folder / "stderr.txt").read_text(encoding="utf-8")


def test_sigterm_lets_run_finish(tmp_path: Path) -> None:
    child = start_scheduler(tmp_path)

    child.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in stderr_of(tmp_path), "the signal to be logged")
    (tmp_path / "gate-release").touch()

    assert finish(child) == 0
    stderr = stderr_of(tmp_path)
    assert "SIGTERM received: stopping after the current run" in stderr
    assert "scheduled run 1 ended: completed, exit code 0" in stderr
    assert stderr.rstrip().endswith("INFO pipeline.scheduler: scheduler stopped")
    with State(tmp_path / "state" / "state.db") as state:
        runs = state.runs()
    assert [run["status"] for run in runs] == ["completed"]
    assert runs[0]["summary"]["findings_new"] == 4


def test_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    child = start_scheduler(tmp_path)

    child.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in stderr_of(tmp_path), "the signal to be logged")
    child.send_signal(signal.SIGTERM)

    assert finish(child) == 128 + signal.SIGTERM
    assert "SIGTERM received again: stopping at once" in stderr_of(tmp_path)
    with State(tmp_path / "state" / "state.db") as state:
        assert [run["status"] for run in state.runs()] == ["started"]


def test_schedule_without_config_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["schedule"])

    assert result.exit_code == 2
    assert (
        f"no config file: --config was not given and config.yaml is not in {tmp_path}; keytrail "
        "schedule reads its sources and schedule from a config file"
    ) in " ".join(result.output.split())


def test_job_rolled_back_run_failed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    def rolled_back(settings: Settings, **options: object) -> RunSummary:
        return RunSummary(
            run_id="r1",
            started=datetime.now(UTC),
            status="failed",
            problems=["run r1 rolled back (StateError: disk I/O error)"],
        )

    outcome = ScheduledJob(settings, run=rolled_back)()

    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert outcome.error == "run r1 rolled back (StateError: disk I/O error)"
