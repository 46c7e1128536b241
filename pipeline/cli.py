"""keytrail reads secret-access audit logs (AWS CloudTrail, GCP Cloud Audit Logs and Azure Key
Vault AuditEvent), normalizes them into one event schema, runs rule and statistical detectors
(off-hours reads, new countries, impossible travel, failure bursts, volume spikes, mass
retrieval, first-seen secrets, cross-cloud reads, an isolation forest and a risk score per
identity), and writes findings and alerts. Start with `keytrail run --source LOG_FOLDER`, or
`keytrail run` in a folder that contains config.yaml.

The logging options --log-level and --log-format are accepted before the command name and
after it: `keytrail --log-format json run` and `keytrail run --log-format json` do the same.

\b
Exit codes:
  0  success
  1  unexpected internal error (the traceback is logged)
  2  bad usage or invalid config
  3  completed with problems: a source could not be read, a detector failed, outputs could not
     be written, or records were quarantined and --fail-on-quarantine was given
  4  another keytrail run holds the lock on the state directory
  5  alert delivery failed: an outbox row became dead, or a delivery waits for a retry
     (`keytrail outbox list` shows them; `keytrail test-alert` also exits 5 when a channel fails)
  141  the reader of stdout closed the pipe early (as with `| head`); no message is printed

`keytrail schedule` exits 0 after SIGTERM or SIGINT once the current run has finished; a second
signal stops it at once with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, ParamSpec, TextIO, TypeVar, cast

import click
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from detectors.base import registered_detectors
from pipeline.alerting.delivery import (
    channel_senders,
    log_env_receivers,
    sample_alert,
    secret_variable_warnings,
)
from pipeline.alerting.escape import clean_line
from pipeline.alerting.outbox import OUTBOX_STATUSES, Outbox, OutboxRow, OutboxStatus
from pipeline.alerting.render import Renderer
from pipeline.alerting.silences import (
    SILENCE_LABELS,
    InvalidSilenceError,
    Silence,
    SilenceNotFoundError,
    SilenceStore,
    format_duration,
    parse_duration,
    parse_expiry,
    parse_matcher,
)
from pipeline.config import (
    Settings,
    check_files,
    config_warnings,
    embedded_defaults,
    load_config,
)
from pipeline.engine import run_once
from pipeline.enrich import GeoIPSettings, enrich_events
from pipeline.errors import ConfigError, KeytrailError
from pipeline.formats import read_paths
from pipeline.formats.base import Quarantined
from pipeline.logs import setup_logging
from pipeline.scheduler import ScheduledJob, serve
from pipeline.schema import ARROW_SCHEMA, COLUMNS
from pipeline.store.state import StateLockedError
from pipeline.summary import print_summary, write_summary_json

__all__ = [
    "EXIT_CONFIG",
    "EXIT_DELIVERY",
    "EXIT_INTERNAL",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "main",
]

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_INTERNAL: Final = 1
EXIT_CONFIG: Final = 2
EXIT_PROBLEMS: Final = 3
EXIT_LOCKED: Final = 4
EXIT_DELIVERY: Final = 5
# 128 + SIGPIPE (13): what a shell reports for a Unix tool stopped by a closed pipe.
EXIT_BROKEN_PIPE: Final = 141

DEFAULT_CONFIG: Final = Path("config.yaml")
PIPED_WIDTH: Final = 400
"""Console width when stdout is not a terminal: wide enough that values are not cut."""

P = ParamSpec("P")
R = TypeVar("R")


def _handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn keytrail errors into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = func(*args, **kwargs)
            # Flush here, so that a reader that closed the pipe early surfaces below instead
            # of at interpreter exit.
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            _quiet_closed_stdout()
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        except ConfigError as exc:
            where = f" {exc.source}" if exc.source else ""
            if len(exc.problems) == 1:
                click.echo(f"error: invalid config{where}: {exc.problems[0]}", err=True)
            else:
                click.echo(f"error: invalid config{where}: {len(exc.problems)} problems", err=True)
                for problem in exc.problems:
                    click.echo(f"  - {problem}", err=True)
            raise SystemExit(EXIT_CONFIG) from None
        except StateLockedError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(EXIT_LOCKED) from None
        except KeytrailError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(EXIT_PROBLEMS) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            logger.exception("unexpected internal error")
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} (the traceback is in the log; "
                "please report it)",
                err=True,
            )
            raise SystemExit(EXIT_INTERNAL) from None

    return wrapper


def _quiet_closed_stdout() -> None:
    """Point stdout at /dev/null after its reader left, so the exit flush cannot fail again.

    A reader such as `head -1` closes the pipe after the lines it needs. Like a Unix tool
    stopped by SIGPIPE, keytrail then exits without an error message.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        # stdout has no file descriptor (a test runner's buffer): nothing is flushed at exit.
        pass


_LOG_LEVELS: Final = ["DEBUG", "INFO", "WARNING", "ERROR"]
_LOG_LEVEL_HELP: Final = "Log level (default: logging.level from the config, else INFO)."
_LOG_FORMAT_HELP: Final = (
    "Log line format on stderr (default: logging.format from the config, else text)."
)


@click.group("keytrail", help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default=None,
    help=_LOG_LEVEL_HELP,
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default=None, help=_LOG_FORMAT_HELP
)
@click.version_option(package_name="keytrail", prog_name="keytrail")
@click.pass_context
def main(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """Group callback: keep the logging options for the subcommand."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}


def _remember_log_option(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Store a logging option given after the command name; it wins over the group option."""
    if value is None:
        return
    assert param.name is not None
    ctx.ensure_object(dict)[param.name] = value


def _log_options(command: Callable[P, R]) -> Callable[P, R]:
    """Accept --log-level and --log-format after the subcommand name as well."""
    command = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default=None,
        expose_value=False,
        callback=_remember_log_option,
        help=_LOG_FORMAT_HELP,
    )(command)
    return click.option(
        "--log-level",
        type=click.Choice(_LOG_LEVELS, case_sensitive=False),
        default=None,
        expose_value=False,
        callback=_remember_log_option,
        help=_LOG_LEVEL_HELP,
    )(command)


def _start_logging(settings: Settings | None = None) -> None:
    """Attach the log handler. Options given on the command line win over the config."""
    ctx = click.get_current_context()
    options = ctx.find_object(dict) or {}
    level = options.get("log_level") or (settings.logging.level if settings else "INFO")
    fmt = options.get("log_format") or (settings.logging.format if settings else "text")
    root = logging.getLogger()
    previous_level = root.level
    handler = setup_logging(level.upper(), fmt)

    def detach() -> None:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    ctx.call_on_close(detach)


def _stdout_console() -> Console:
    """Return the console for stdout.

    A terminal keeps rich's layout at the terminal's width. Piped output (CI, cron logs) gets a
    wide console, so long paths and secret names stay on one line instead of being cut at 80
    columns, and the key/value blocks keep their alignment.
    """
    console = Console()
    if console.is_terminal:
        return console
    # The trimmer implements the write/flush/isatty part of TextIO that rich calls.
    stream = cast(TextIO, _TrailingSpaceTrimmer(sys.stdout))
    return Console(file=stream, width=PIPED_WIDTH, soft_wrap=True)


class _TrailingSpaceTrimmer(io.TextIOBase):
    """A text stream that drops the spaces rich pads table cells with at the end of each line.

    Only used for piped output, which rich writes without colour codes, so the spaces before a
    newline are padding and never part of a value.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_TRAILING_SPACES.sub("\n", text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False


_TRAILING_SPACES: Final = re.compile(r" +\n")


def _load_settings(config_path: Path | None) -> tuple[Settings, str | None]:
    """Load ``--config``, else ./config.yaml, else the embedded defaults without sources.

    Returns:
        the settings and the config file they came from (None for the embedded defaults).

    Raises:
        ConfigError: the config file given or found is missing or invalid.
    """
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    if config_path is not None:
        return load_config(config_path), str(config_path)
    # The shipped sources name sample_logs/ folders beside config.yaml, which do not exist here.
    return embedded_defaults().model_copy(update={"sources": []}), None


def _log_settings_origin(origin: str | None) -> None:
    if origin is None:
        logger.info(
            "no --config given and %s not found in %s: using the built-in defaults",
            DEFAULT_CONFIG,
            Path.cwd(),
        )


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Config file; relative paths in it resolve against its folder. Default: ./config.yaml "
        "if it exists, else the built-in defaults."
    ),
)


def _utc_time_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dt.datetime | None:
    """Parse an ISO 8601 date or time option; a value without a zone is UTC."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"invalid time {value!r}: expected an ISO 8601 date or time such as 2026-10-01 or "
            "2026-10-01T08:00:00Z",
            ctx=ctx,
            param=param,
        ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _run_settings(
    config_path: Path | None,
    sources: tuple[Path, ...],
    state_dir: Path | None,
    output_dir: Path | None,
) -> Settings:
    """Load the settings of a run, apply the folder options, start logging and check files."""
    settings, origin = _load_settings(config_path)
    if origin is None and not sources:
        raise click.UsageError(
            f"no config file: --config was not given and {DEFAULT_CONFIG} is not in {Path.cwd()}; "
            "pass --source PATH (repeatable) to read logs with the built-in defaults, or "
            "--config FILE"
        )
    updates: dict[str, Any] = {}
    if state_dir is not None:
        updates["state_dir"] = state_dir.resolve()
    if output_dir is not None:
        updates["output_dir"] = output_dir.resolve()
    settings = settings.model_copy(update=updates)
    _start_logging(settings)
    _log_settings_origin(origin)
    log_env_receivers(settings.alerting)
    check_files(settings, source=origin or "defaults")
    for warning in config_warnings(settings):
        if sources and warning.startswith("sources"):
            continue
        logger.warning("config %s: %s", origin or "defaults", warning)
    return settings


@main.command()
@_config_option
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Read this file or folder instead of the configured sources (repeatable).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State folder (state.db, history, quarantine); overrides state_dir.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for findings.jsonl and outbox/; overrides output_dir.",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the run summary to this file as one JSON object.",
)
@click.option("--dry-run", is_flag=True, help="Read and detect only: write no outputs or state.")
@click.option(
    "--fail-on-quarantine",
    is_flag=True,
    help="Exit with code 3 when any record was quarantined.",
)
@click.option(
    "--since",
    callback=_utc_time_option,
    help=(
        "Backfill: read the window from this ISO 8601 date or time (inclusive; UTC if no zone), "
        "whatever the checkpoints say. Source checkpoints are not advanced."
    ),
)
@click.option(
    "--until",
    callback=_utc_time_option,
    help="End of the --since window (exclusive; ISO 8601, UTC if no zone). Default: now.",
)
@_log_options
@_handle_errors
def run(
    config_path: Path | None,
    sources: tuple[Path, ...],
    state_dir: Path | None,
    output_dir: Path | None,
    summary_json: Path | None,
    dry_run: bool,
    fail_on_quarantine: bool,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> None:
    """Read new logs, detect, write findings and outputs, and commit state (one run)."""
    if until is not None and since is None:
        raise click.UsageError("--until needs --since: a backfill window needs a start")
    if since is not None and until is not None and since >= until:
        raise click.BadParameter(
            f"{_iso(since)} is not before --until {_iso(until)}", param_hint="'--since'"
        )
    settings = _run_settings(config_path, sources, state_dir, output_dir)
    console = _stdout_console()
    summary = run_once(
        settings,
        sources_override=[path.resolve() for path in sources] or None,
        dry_run=dry_run,
        console=console,
        since=since,
        until=until,
    )
    print_summary(summary, console)
    if summary_json is not None:
        write_summary_json(summary, summary_json)
    code = summary.exit_code(fail_on_quarantine=fail_on_quarantine)
    if code:
        raise SystemExit(code)


@main.command()
@_config_option
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State folder (state.db, history, quarantine); overrides state_dir.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for findings.jsonl and outbox/; overrides output_dir.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Run the job once and exit with the exit code of `keytrail run` (for cron or a "
    "container); needs no schedule section.",
)
@_log_options
@_handle_errors
def schedule(
    config_path: Path | None, state_dir: Path | None, output_dir: Path | None, once: bool
) -> None:
    """Run the job on the schedule from the config until SIGTERM or SIGINT.

    The schedule section sets a cron line (with timezone) or an interval. Each run reads what
    is new since the checkpoints, so after downtime one run catches up. SIGTERM or SIGINT lets
    the current run finish, then exits 0. Runs are logged, not printed as a summary.
    """
    if config_path is None and not DEFAULT_CONFIG.is_file():
        raise click.UsageError(
            f"no config file: --config was not given and {DEFAULT_CONFIG} is not in {Path.cwd()}; "
            "keytrail schedule reads its sources and schedule from a config file"
        )
    settings = _run_settings(config_path, (), state_dir, output_dir)
    console = _stdout_console()
    if once:
        outcome = ScheduledJob(settings, console=console)()
        if outcome.exit_code:
            raise SystemExit(outcome.exit_code)
        return
    raise SystemExit(serve(settings, console=console))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Parquet file to write (replaced if it exists).",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the read counts to this file as one JSON object.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Take the GeoIP settings from this config file (default: the built-in defaults).",
)
@click.option("--no-geoip", is_flag=True, help="Leave the geo columns empty.")
@click.option(
    "--quarantine",
    "quarantine_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Write the quarantined records to this file as JSON lines with origin, reason, detail "
        "and raw (replaced if it exists)."
    ),
)
@_log_options
@_handle_errors
def normalize(
    paths: tuple[Path, ...],
    out: Path,
    summary_json: Path | None,
    config_path: Path | None,
    no_geoip: bool,
    quarantine_path: Path | None,
) -> None:
    """Read log files into one events table (enriched) and write it as Parquet. No state."""
    settings = load_config(config_path) if config_path is not None else None
    _start_logging(settings)
    geoip = settings.enrich.geoip if settings is not None else GeoIPSettings()
    if no_geoip:
        geoip = geoip.model_copy(update={"enabled": False})

    result = read_paths(paths)
    events, info = enrich_events(result.events, geoip)
    table = pa.Table.from_pandas(events[list(COLUMNS)], schema=ARROW_SCHEMA, preserve_index=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, out)

    counts = result.summary()
    counts["geoip_build_date"] = info.geoip_build_date
    counts["output"] = str(out)
    if quarantine_path is not None:
        _write_quarantined(quarantine_path, result.quarantined)
        counts["quarantine_file"] = str(quarantine_path)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    message = (
        f"wrote {len(events)} events from {counts['records']} records in {counts['files']} files "
        f"to {out} ({counts['quarantined']} quarantined"
    )
    if quarantine_path is not None:
        message += f", written to {quarantine_path})"
    elif counts["quarantined"]:
        message += "; pass --quarantine FILE to keep them)"
    else:
        message += ")"
    click.echo(message)


def _write_quarantined(path: Path, items: list[Quarantined]) -> None:
    """Write quarantined records as JSON lines, replacing ``path`` atomically (also when empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")
    os.replace(temporary, path)


@main.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the synthetic logs and labels.json into.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed.")
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Number of days to simulate, from 2026-10-01.",
)
@_log_options
@_handle_errors
def simulate(out: Path, seed: int, days: int) -> None:
    """Generate realistic native-format logs of three clouds with labeled incidents.

    The logs go to OUT/aws, OUT/gcp and OUT/azure; labels.json and population.json go to OUT.
    """
    from pipeline.simulate import generate  # the generator is large and only needed here

    _start_logging()
    report = generate(out, seed=seed, days=days)
    click.echo(report.cli_message())


@main.command()
@_config_option
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Labels of injected incidents (default: sample_logs/labels.json beside the config).",
)
@click.option(
    "--findings",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Findings to score (default: findings.jsonl in the configured output_dir).",
)
@click.option(
    "--now",
    callback=_utc_time_option,
    default=None,
    help=(
        "ISO 8601 time at which allow-list entries expire and silences are active (no zone: "
        "UTC). Default: the end of the labeled period."
    ),
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the scores and removals as one JSON object."
)
@_log_options
@_handle_errors
def evaluate(
    config_path: Path | None,
    labels: Path | None,
    findings: Path | None,
    now: dt.datetime | None,
    as_json: bool,
) -> None:
    """Score findings against the labeled incidents: precision, recall and alerts per day.

    The config's allow-list and the state's silences remove findings first, as in a run. The
    table lists each removal with the entry or silence that made it.
    """
    from pipeline import evaluate as evaluation  # only this command needs it

    settings: Settings | None = None
    origin: str | None = None
    if config_path is not None or labels is None or findings is None or DEFAULT_CONFIG.is_file():
        settings, origin = _load_settings(config_path)
    _start_logging(settings)
    if settings is not None:
        _log_settings_origin(origin)
    if labels is None:
        base = Path(origin).resolve().parent if origin is not None else Path.cwd()
        labels = base / "sample_logs" / "labels.json"
    if findings is None:
        assert settings is not None
        findings = settings.output_dir / "findings.jsonl"
    for name, path in (("labels", labels), ("findings", findings)):
        if not path.is_file():
            raise click.UsageError(f"{name} file not found: {path}; pass --{name} FILE")

    allow_list = settings.alerting.allow_list if settings is not None else []
    silences = (
        evaluation.read_silences(settings.state_dir / "state.db") if settings is not None else []
    )
    report = evaluation.evaluate(
        evaluation.load_findings(findings),
        evaluation.load_labels(labels),
        allow_list=allow_list,
        silences=silences,
        now=now,
    )
    if as_json:
        click.echo(json.dumps(report.to_document(), indent=2, default=str))
        return
    click.echo(f"{findings} against {labels} ({report.days} days)")
    click.echo(report.to_table())


@main.command()
@_config_option
@click.option(
    "--since",
    required=True,
    callback=_utc_time_option,
    help="Start of the replayed window (ISO 8601 date or time, inclusive; no zone: UTC).",
)
@click.option(
    "--until",
    required=True,
    callback=_utc_time_option,
    help="End of the replayed window (ISO 8601 date or time, exclusive; no zone: UTC).",
)
@click.option(
    "--detectors",
    "detector_ids",
    multiple=True,
    help="Detector id to run (repeatable). Default: the detectors the config enables.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the findings as JSON Lines here, for `keytrail evaluate --findings`.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
@_log_options
@_handle_errors
def backtest(
    config_path: Path | None,
    since: dt.datetime,
    until: dt.datetime,
    detector_ids: tuple[str, ...],
    out: Path | None,
    as_json: bool,
) -> None:
    """Replay the stored history between --since and --until through the detectors.

    Each UTC day is the window and the history before it the baseline, as in daily runs.
    Nothing is sent and no state, history or output is written (except --out).
    """
    from pipeline.backtest import backtest as replay  # only this command needs it
    from pipeline.backtest import write_findings

    settings, origin = _load_settings(config_path)
    _start_logging(settings)
    _log_settings_origin(origin)
    known = registered_detectors()
    unknown = [detector_id for detector_id in detector_ids if detector_id not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown detector {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}",
            param_hint="--detectors",
        )
    report = replay(settings, since, until, list(detector_ids) or None)
    if out is not None:
        written = write_findings(out, report.findings)
        logger.info("backtest: wrote %s findings to %s", written, out)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
        return
    click.echo(report.to_table())
    if out is not None:
        click.echo(f"{len(report.findings)} findings written to {out}")


@main.command("validate-config")
@_config_option
@_log_options
@_handle_errors
def validate_config(config_path: Path | None) -> None:
    """Check a config file and the files it names; print every problem (exit code 2) or a summary.

    Warnings (no sources, no enabled detector) go to stderr and do not change the exit code.
    """
    if config_path is None:
        config_path = DEFAULT_CONFIG
    settings = load_config(config_path)
    check_files(settings, source=str(config_path))
    warnings = config_warnings(settings)
    warnings += secret_variable_warnings(settings.alerting, os.environ)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{config_path} is valid: {len(settings.sources)} sources, "
        f"{len(settings.enabled_detectors)} detectors enabled"
    )


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


# --- silences ----------------------------------------------------------------------------------


_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State folder that contains state.db; overrides state_dir from the config.",
)


def _silence_store(config_path: Path | None, state_dir: Path | None) -> SilenceStore:
    """Open the silences of ``--state-dir``, else of the configured (or default) state_dir."""
    if state_dir is None:
        settings, origin = _load_settings(config_path)
        _start_logging(settings)
        _log_settings_origin(origin)
        state_dir = settings.state_dir
    else:
        _start_logging()
    return SilenceStore(state_dir.resolve() / "state.db")


def _duration_option(ctx: click.Context, param: click.Parameter, value: str) -> dt.timedelta:
    try:
        return parse_duration(value)
    except InvalidSilenceError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@main.group()
def silence() -> None:
    """Mute findings for a while: add, list and expire silences (Alertmanager style).

    A silence has matchers, an owner, a reason and a mandatory expiry. It mutes the findings
    that all its matchers match until it expires.
    """


@silence.command("add")
@click.option(
    "--matcher",
    "matchers",
    multiple=True,
    required=True,
    help=(
        "LABEL=VALUE for an exact match or LABEL=~REGEX for a regex that must match the whole "
        f"value (repeatable; all must match). Labels: {', '.join(SILENCE_LABELS)}."
    ),
)
@click.option("--owner", required=True, help="Who is responsible for the silence (an email).")
@click.option("--reason", required=True, help="Why the findings are expected.")
@click.option(
    "--expires",
    required=True,
    help="When the silence ends: a duration from now (4h, 3d, 1w) or an ISO 8601 time (UTC if "
    "no zone).",
)
@click.option(
    "--max-duration",
    default="30d",
    show_default=True,
    callback=_duration_option,
    help="Reject a silence that would last longer than this duration.",
)
@_config_option
@_state_dir_option
@_log_options
@_handle_errors
def silence_add(
    matchers: tuple[str, ...],
    owner: str,
    reason: str,
    expires: str,
    max_duration: dt.timedelta,
    config_path: Path | None,
    state_dir: Path | None,
) -> None:
    """Add a silence and print its id."""
    now = dt.datetime.now(dt.UTC)
    try:
        parsed = [parse_matcher(text) for text in matchers]
    except InvalidSilenceError as exc:
        raise click.BadParameter(str(exc), param_hint="'--matcher'") from None
    try:
        ends_at = parse_expiry(expires, now)
    except InvalidSilenceError as exc:
        raise click.BadParameter(str(exc), param_hint="'--expires'") from None
    if ends_at <= now:
        raise click.BadParameter(
            f"expiry {_iso(ends_at)} is not in the future; give a duration such as 4h or a "
            "later time",
            param_hint="'--expires'",
        )
    for name, value in (("--owner", owner), ("--reason", reason)):
        if not value.strip():
            raise click.BadParameter("must not be empty", param_hint=f"'{name}'")

    store = _silence_store(config_path, state_dir)
    new = Silence(
        matchers=parsed,
        owner=owner,
        reason=reason,
        starts_at=now,
        ends_at=ends_at,
        created_at=now,
    )
    try:
        silence_id = store.add(new, now=now, max_duration=max_duration)
    except InvalidSilenceError as exc:
        raise click.BadParameter(str(exc), param_hint="'--expires'") from None
    click.echo(
        f"added silence {silence_id}, ends {_iso(ends_at)} (in {format_duration(ends_at - now)})"
    )


@silence.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list expired and pending silences.")
@click.option("--json", "as_json", is_flag=True, help="Print the silences as a JSON array.")
@_config_option
@_state_dir_option
@_log_options
@_handle_errors
def silence_list(
    show_all: bool, as_json: bool, config_path: Path | None, state_dir: Path | None
) -> None:
    """List the active silences (all of them with --all)."""
    now = dt.datetime.now(dt.UTC)
    store = _silence_store(config_path, state_dir)
    silences = store.list(active_only=not show_all, now=now)
    if as_json:
        rows = [{**item.model_dump(mode="json"), "status": item.status(now)} for item in silences]
        click.echo(json.dumps(rows, indent=2))
        return
    if not silences:
        click.echo("no silences" if show_all else "no active silences")
        return
    table = Table(title_justify="left")
    for column in ("id", "matchers", "owner", "reason", "ends in"):
        table.add_column(column)
    for item in silences:
        table.add_row(
            item.id,
            " ".join(str(matcher) for matcher in item.matchers),
            item.owner,
            item.reason,
            _ends_in(item, now),
        )
    _stdout_console().print(table)


@silence.command("expire")
@click.argument("silence_id", metavar="ID")
@_config_option
@_state_dir_option
@_log_options
@_handle_errors
def silence_expire(silence_id: str, config_path: Path | None, state_dir: Path | None) -> None:
    """End the silence ID now."""
    now = dt.datetime.now(dt.UTC)
    store = _silence_store(config_path, state_dir)
    try:
        store.expire(silence_id, now)
    except (SilenceNotFoundError, InvalidSilenceError) as exc:
        raise click.BadParameter(str(exc), param_hint="'ID'") from None
    click.echo(f"expired silence {silence_id}")


def _ends_in(item: Silence, now: dt.datetime) -> str:
    status = item.status(now)
    if status == "expired":
        return f"expired {format_duration(now - item.ends_at)} ago"
    if status == "pending":
        starts_in = format_duration(item.starts_at - now)
        return f"{format_duration(item.ends_at - now)} (starts in {starts_in})"
    return format_duration(item.ends_at - now)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- outbox and test alerts --------------------------------------------------------------------


def _outbox(config_path: Path | None, state_dir: Path | None) -> Outbox:
    """Open the outbox of ``--state-dir``, else of the configured (or default) state_dir."""
    if state_dir is None:
        settings, origin = _load_settings(config_path)
        _start_logging(settings)
        _log_settings_origin(origin)
        state_dir = settings.state_dir
    else:
        _start_logging()
    return Outbox(state_dir.resolve() / "state.db")


@main.group()
def outbox() -> None:
    """List and requeue the delivery outbox: one row per (alert, receiver, channel)."""


@outbox.command("list")
@click.option(
    "--status",
    type=click.Choice(list(OUTBOX_STATUSES)),
    help="List only rows with this status (default: all rows).",
)
@click.option("--channel", help="List only rows of this channel (slack, email, webhook, file).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON array.")
@_config_option
@_state_dir_option
@_log_options
@_handle_errors
def outbox_list(
    status: OutboxStatus | None,
    channel: str | None,
    as_json: bool,
    config_path: Path | None,
    state_dir: Path | None,
) -> None:
    """List outbox rows in the order they were queued; channel * means every channel."""
    with _outbox(config_path, state_dir) as box:
        rows = box.list_rows(status, channel=channel)
    if as_json:
        data = [
            {
                "id": row.id,
                "alert_id": row.alert_id,
                "receiver": row.receiver,
                "channel": row.channel,
                "dedup_key": row.dedup_key,
                "status": row.status,
                "attempts": row.attempts,
                "next_attempt_at": _iso(row.next_attempt_at),
                "last_error": row.last_error,
                "remote_id": row.remote_id,
            }
            for row in rows
        ]
        click.echo(json.dumps(data, indent=2))
        return
    if not rows:
        click.echo("no outbox rows")
        return
    for row in rows:
        error = f"  {clean_line(row.last_error)}" if row.last_error else ""
        click.echo(
            f"{row.id}  {row.status:<9}  {clean_line(row.receiver)}/{row.channel}  {row.alert_id}  "
            f"attempts={row.attempts}{error}"
        )


@outbox.command("retry")
@click.argument("row_ids", nargs=-1, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Queue every dead row again.")
@click.option("--receiver", help="Queue only dead rows of this receiver.")
@click.option("--channel", help="Queue only dead rows of this channel (slack, email, ...).")
@_config_option
@_state_dir_option
@_log_options
@_handle_errors
def outbox_retry(
    row_ids: tuple[int, ...],
    retry_all: bool,
    receiver: str | None,
    channel: str | None,
    config_path: Path | None,
    state_dir: Path | None,
) -> None:
    """Queue dead rows (by ID, or --all) again; the next `keytrail run` sends them.

    Exits 2 when IDs were given and none of them was queued (not found, not dead, or not of
    --receiver or --channel).
    """
    if row_ids and retry_all:
        raise click.UsageError("give outbox row IDs or --all, not both")
    if not row_ids and not retry_all:
        raise click.UsageError("give the IDs of dead outbox rows, or --all for every dead row")
    with _outbox(config_path, state_dir) as box:
        rows = {} if retry_all else box.rows_by_id(row_ids)
        changed = box.retry_dead(
            None if retry_all else row_ids,
            now=dt.datetime.now(dt.UTC),
            receiver=receiver,
            channel=channel,
        )
    click.echo(f"queued {_count_noun(changed, 'dead outbox row')} again")
    if retry_all:
        return
    prefix = "error" if changed == 0 else "warning"
    for problem in _retry_skips(row_ids, rows, receiver, channel):
        click.echo(f"{prefix}: {problem}", err=True)
    if changed == 0:
        raise SystemExit(EXIT_CONFIG)


def _retry_skips(
    row_ids: tuple[int, ...],
    rows: dict[int, OutboxRow],
    receiver: str | None,
    channel: str | None,
) -> list[str]:
    """Describe each requested row that `outbox retry` did not queue, and why."""
    problems = []
    for row_id in dict.fromkeys(row_ids):
        row = rows.get(row_id)
        if row is None:
            problems.append(f"outbox row {row_id} not found; `keytrail outbox list` shows the IDs")
        elif row.status != "dead":
            problems.append(f"outbox row {row_id} not queued: it is {row.status}, not dead")
        elif receiver is not None and row.receiver != receiver:
            problems.append(
                f"outbox row {row_id} not queued: its receiver is {clean_line(row.receiver)}, "
                f"not {clean_line(receiver)}"
            )
        elif channel is not None and row.channel != channel:
            problems.append(
                f"outbox row {row_id} not queued: its channel is {row.channel}, not "
                f"{clean_line(channel)}"
            )
    return problems


def _count_noun(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"


@main.command("test-alert")
@click.option("--receiver", required=True, help="Name of the receiver under alerting.receivers.")
@_config_option
@_log_options
@_handle_errors
def test_alert(receiver: str, config_path: Path | None) -> None:
    """Send a sample alert through each channel of one receiver now and print each result."""
    settings, origin = _load_settings(config_path)
    _start_logging(settings)
    _log_settings_origin(origin)
    log_env_receivers(settings.alerting)
    try:
        receiver_settings = settings.alerting.receiver(receiver)
    except KeyError:
        known = ", ".join(settings.alerting.receiver_names())
        raise click.UsageError(
            f"receiver {receiver!r} not found; known receivers: {known}"
        ) from None
    now = dt.datetime.now(dt.UTC)
    sends = channel_senders(
        receiver_settings,
        settings.alerting,
        Renderer(settings.alerting.templates_dir),
        settings.output_dir,
        now,
    )
    alert = sample_alert(now)
    failed = False
    for channel, send in sends.items():
        delivery = send(alert)
        failed = failed or delivery.status != "delivered"
        click.echo(f"{channel}: {delivery.status}: {clean_line(delivery.detail)}")
    if failed:
        raise SystemExit(EXIT_DELIVERY)
