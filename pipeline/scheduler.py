"""``keytrail schedule``: run the job on a cron or interval trigger in one long-lived process.

APScheduler 3's :class:`~apscheduler.schedulers.background.BackgroundScheduler` fires the
trigger from the ``schedule`` settings, and the job body (:class:`ScheduledJob`) calls the same
:func:`pipeline.engine.run_once` as ``keytrail run``. The job is added with ``coalesce=True``
and ``max_instances=1``: after the machine slept or the process was down, the run times missed
in between collapse into one run, and that run reads everything since the sources' checkpoints.
A run still going when the next one is due makes APScheduler skip the next one.

The main thread waits for SIGTERM or SIGINT. The first signal lets the current run finish and
then stops the scheduler (exit code 0). A second signal ends the process at once with exit code
128 + the signal number. The run it interrupts has not committed, so the next run reads the same
input again.

A run that raises is logged and the scheduler goes on to the next trigger. A run that finds the
state directory locked by another keytrail process is logged as skipped.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Final, Literal

from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from rich.console import Console

from pipeline.alerting.silences import format_duration
from pipeline.config import ScheduleSettings, Settings
from pipeline.engine import run_once
from pipeline.errors import ConfigError, KeytrailError
from pipeline.store.state import StateLockedError
from pipeline.summary import EXIT_PROBLEMS, RunSummary

__all__ = [
    "EXIT_CONFIG",
    "EXIT_INTERNAL",
    "EXIT_LOCKED",
    "JOB_ID",
    "JobOutcome",
    "ScheduledJob",
    "build_scheduler",
    "build_trigger",
    "describe",
    "serve",
]

logger = logging.getLogger(__name__)

JOB_ID: Final = "keytrail-run"
"""Id of the one job in the scheduler."""

# The exit codes of `keytrail run`, which `keytrail schedule --once` exits with as well.
EXIT_INTERNAL: Final = 1
EXIT_CONFIG: Final = 2
EXIT_LOCKED: Final = 4

WAKE_SECONDS: Final = 60.0
"""How often the main loop wakes the scheduler thread to recompute its wait.

Python's timed waits use the monotonic clock, which on Linux stops while the machine is
suspended, so after a suspend the scheduler thread could sleep for the whole wait it planned
before. A wake-up every minute makes it notice the missed run times within a minute of resuming.
"""

JobStatus = Literal["completed", "completed_with_problems", "failed", "skipped"]


@dataclass(frozen=True)
class JobOutcome:
    """Outcome of one job call.

    Attributes:
        status: the run's status, ``failed`` when it raised, or ``skipped`` when another
            process held the state lock.
        exit_code: the code ``keytrail schedule --once`` exits with, as ``keytrail run``.
        summary: the run summary, None when the run raised or was skipped.
        error: why the run failed or was skipped: the exception as ``Type: message``, the lock
            message, or the problems of a run that was rolled back.
    """

    status: JobStatus
    exit_code: int
    summary: RunSummary | None = None
    error: str | None = None


class ScheduledJob:
    """The job body: one :func:`run_once` call that logs its outcome and raises no ``Exception``.

    Args:
        settings: validated settings, paths resolved.
        console: where findings are printed when ``alerting.console`` is on.
        run: the run function; :func:`run_once` unless a test or notebook passes another.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        console: Console | None = None,
        run: Callable[..., RunSummary] = run_once,
    ) -> None:
        self.settings = settings
        self.console = console
        self.run = run
        self.calls = 0
        self.last: JobOutcome | None = None
        self._lock = threading.Lock()

    def __call__(self) -> JobOutcome:
        """Run once and return the outcome; errors are logged, not raised."""
        with self._lock:
            self.calls += 1
            number = self.calls
        logger.info("scheduled run %s started", number)
        outcome = self._run()
        self.last = outcome
        if outcome.status == "skipped":
            logger.warning("scheduled run %s skipped: %s", number, outcome.error)
        elif outcome.status == "failed":
            logger.error("scheduled run %s failed: %s", number, outcome.error)
        else:
            # run_once has logged the one-line summary; this line pairs with the start line.
            logger.info(
                "scheduled run %s ended: %s, exit code %s",
                number,
                outcome.status,
                outcome.exit_code,
            )
        return outcome

    def _run(self) -> JobOutcome:
        try:
            summary = self.run(self.settings, console=self.console)
        except StateLockedError as exc:
            return JobOutcome("skipped", EXIT_LOCKED, error=str(exc))
        except KeytrailError as exc:
            # These errors (a state database that cannot be opened or committed) name what
            # failed in their message, so they are logged without a traceback.
            code = EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_PROBLEMS
            return JobOutcome("failed", code, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("scheduled run raised an unexpected error")
            return JobOutcome("failed", EXIT_INTERNAL, error=f"{type(exc).__name__}: {exc}")
        if summary.status == "completed":
            return JobOutcome("completed", summary.exit_code(), summary=summary)
        if summary.status == "completed_with_problems":
            return JobOutcome("completed_with_problems", summary.exit_code(), summary=summary)
        # A run that rolled back returns with status "failed" and lists the reason in its problems.
        reason = "; ".join(summary.problems) or f"run ended with status {summary.status}"
        return JobOutcome("failed", summary.exit_code(), summary=summary, error=reason)


def build_trigger(schedule: ScheduleSettings) -> BaseTrigger:
    """Return the APScheduler trigger that ``schedule`` describes (cron or interval)."""
    timezone = schedule.timezone or "UTC"
    jitter = int(schedule.jitter.total_seconds()) if schedule.jitter is not None else None
    if schedule.cron is not None:
        trigger = CronTrigger.from_crontab(schedule.cron, timezone=timezone)
        # from_crontab takes no jitter argument; the trigger reads the attribute.
        trigger.jitter = jitter
        return trigger
    assert schedule.interval is not None
    return IntervalTrigger(
        seconds=int(schedule.interval.total_seconds()), timezone=timezone, jitter=jitter
    )


def describe(schedule: ScheduleSettings) -> str:
    """Return the schedule in words for the log, such as ``every 5m (UTC), first run now``."""
    if schedule.cron is not None:
        trigger = f"cron {schedule.cron!r}"
    else:
        assert schedule.interval is not None
        trigger = f"every {format_duration(schedule.interval)}"
    first = "now" if schedule.run_at_start else "at the first trigger time"
    return f"{trigger} ({schedule.timezone or 'UTC'}), first run {first}"


def build_scheduler(
    schedule: ScheduleSettings,
    job: Callable[[], object],
    *,
    next_run_time: datetime | None = None,
) -> BackgroundScheduler:
    """Return a scheduler, not started, that contains ``job`` under :data:`JOB_ID`.

    Args:
        schedule: the trigger settings.
        job: the job body, normally a :class:`ScheduledJob`.
        next_run_time: the first run time. Default: now when ``schedule.run_at_start`` is set,
            else the trigger's first time. A time in the past is a missed run, and every run
            time missed since then is coalesced into one run.
    """
    scheduler = BackgroundScheduler(timezone=schedule.timezone or "UTC")
    if next_run_time is None and schedule.run_at_start:
        next_run_time = datetime.now(UTC)
    options: dict[str, object] = {}
    if next_run_time is not None:
        options["next_run_time"] = next_run_time
    scheduler.add_job(
        job,
        build_trigger(schedule),
        id=JOB_ID,
        name="keytrail run",
        coalesce=True,
        max_instances=1,
        misfire_grace_time=int(schedule.misfire_grace_time.total_seconds()),
        **options,
    )

    def log_missed(event: JobExecutionEvent) -> None:
        # Listeners run in the executor's thread. They must not call scheduler methods that
        # take the job store lock, because shutdown(wait=True) keeps that lock while it waits
        # for the executor (BaseScheduler.shutdown in APScheduler 3.11). APScheduler's own log
        # lines give the next run time.
        logger.warning(
            "run planned for %s skipped: it would start more than misfire_grace_time (%s) "
            "late; the next run reads everything since the checkpoints",
            event.scheduled_run_time.isoformat(),
            format_duration(schedule.misfire_grace_time),
        )

    scheduler.add_listener(log_missed, EVENT_JOB_MISSED)
    return scheduler


def serve(
    settings: Settings,
    *,
    console: Console | None = None,
    job: Callable[[], object] | None = None,
) -> int:
    """Run the job on the configured schedule until SIGTERM or SIGINT, and return 0.

    Must be called from the main thread, because it installs the signal handlers (and puts
    back the earlier ones when it returns).

    Raises:
        ConfigError: the settings have no ``schedule`` section.
    """
    if settings.schedule is None:
        raise ConfigError(
            "schedule: missing; add a schedule section with cron (and timezone) or interval, "
            "or run `keytrail schedule --once` to run the job once"
        )
    schedule = settings.schedule
    body = job if job is not None else ScheduledJob(settings, console=console)
    scheduler = build_scheduler(schedule, body)
    stop = threading.Event()
    received: list[int] = []

    def handle_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.info(
                "%s received: stopping after the current run (send it again to stop at once)",
                name,
            )
            stop.set()
            return
        logger.warning(
            "%s received again: stopping at once; the next run reads the input of the "
            "interrupted run again",
            name,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + signum)

    previous = {
        number: signal.signal(number, handle_signal) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        logger.info("scheduler starting: %s", describe(schedule))
        scheduler.start()
        while not stop.wait(WAKE_SECONDS):
            scheduler.wakeup()
        # wait=True lets a run in progress finish before the process exits.
        scheduler.shutdown(wait=True)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    logger.info("scheduler stopped")
    return 0
