"""The ``keytrail`` command.

\b
Exit codes:
  0  success
  1  unexpected internal error (the traceback is logged)
  2  bad usage or invalid config
  3  completed with problems: a source could not be read, a detector failed, outputs could not
     be written, or records were quarantined and --fail-on-quarantine was given
  4  another keytrail run holds the lock on the state directory
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import click
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from pipeline.config import Settings, check_files, config_warnings, load_config
from pipeline.engine import run_once
from pipeline.enrich import GeoIPSettings, enrich_events
from pipeline.errors import ConfigError, KeytrailError
from pipeline.formats import read_paths
from pipeline.logs import setup_logging
from pipeline.schema import ARROW_SCHEMA, COLUMNS
from pipeline.store.state import StateLockedError
from pipeline.summary import print_summary, write_summary_json

__all__ = [
    "EXIT_CONFIG",
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

DEFAULT_CONFIG: Final = Path("config.yaml")

P = ParamSpec("P")
R = TypeVar("R")


def _handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn keytrail errors into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
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


@click.group("keytrail", help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Log level (default: logging.level from the config, else INFO).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format on stderr (default: logging.format from the config, else text).",
)
@click.version_option(package_name="keytrail", prog_name="keytrail")
@click.pass_context
def main(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """Group callback: keep the logging options for the subcommand."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}


def _start_logging(settings: Settings | None = None) -> None:
    """Attach the log handler. Options given on the command line win over the config."""
    ctx = click.get_current_context()
    options = ctx.find_object(dict) or {}
    level = options.get("log_level") or (settings.logging.level if settings else "INFO")
    fmt = options.get("log_format") or (settings.logging.format if settings else "text")
    root = logging.getLogger()
    previous_level = root.level
    handler = setup_logging(level, fmt)

    def detach() -> None:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    ctx.call_on_close(detach)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Config file; relative paths in it resolve against its folder.",
)


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
@_handle_errors
def run(
    config_path: Path,
    sources: tuple[Path, ...],
    state_dir: Path | None,
    output_dir: Path | None,
    summary_json: Path | None,
    dry_run: bool,
    fail_on_quarantine: bool,
) -> None:
    """Read new logs, detect, write findings and outputs, and commit state (one run)."""
    settings = load_config(config_path)
    updates: dict[str, Any] = {}
    if state_dir is not None:
        updates["state_dir"] = state_dir.resolve()
    if output_dir is not None:
        updates["output_dir"] = output_dir.resolve()
    settings = settings.model_copy(update=updates)
    _start_logging(settings)
    check_files(settings, source=str(config_path))
    for warning in config_warnings(settings):
        if sources and warning.startswith("sources"):
            continue
        logger.warning("config %s: %s", config_path, warning)

    console = Console()
    summary = run_once(
        settings,
        sources_override=[path.resolve() for path in sources] or None,
        dry_run=dry_run,
        console=console,
    )
    print_summary(summary, console)
    if summary_json is not None:
        write_summary_json(summary, summary_json)
    code = summary.exit_code(fail_on_quarantine=fail_on_quarantine)
    if code:
        raise SystemExit(code)


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
@_handle_errors
def normalize(
    paths: tuple[Path, ...],
    out: Path,
    summary_json: Path | None,
    config_path: Path | None,
    no_geoip: bool,
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
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    click.echo(
        f"wrote {len(events)} events from {counts['records']} records in {counts['files']} files "
        f"to {out} ({counts['quarantined']} quarantined)"
    )


@main.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the synthetic logs and labels.json into.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed.")
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True, help="Days.")
@_handle_errors
def simulate(out: Path, seed: int, days: int) -> None:
    """Generate realistic native-format logs of three clouds with labeled incidents."""
    from pipeline.simulate import generate  # the generator is large and only needed here

    _start_logging()
    report = generate(out, seed=seed, days=days)
    click.echo(f"wrote synthetic logs to {out}: {report.summary()}")


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
@click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
@_handle_errors
def evaluate(config_path: Path, labels: Path | None, findings: Path | None, as_json: bool) -> None:
    """Score findings against the labeled incidents: precision and recall per detector."""
    from pipeline import evaluate as evaluation  # only this command needs it

    settings = None
    if labels is None or findings is None:
        settings = load_config(config_path)
    _start_logging(settings)
    if labels is None:
        labels = config_path.resolve().parent / "sample_logs" / "labels.json"
    if findings is None:
        assert settings is not None
        findings = settings.output_dir / "findings.jsonl"
    for name, path in (("labels", labels), ("findings", findings)):
        if not path.is_file():
            raise click.UsageError(f"{name} file not found: {path}; pass --{name} FILE")

    report = evaluation.evaluate(evaluation.load_findings(findings), evaluation.load_labels(labels))
    scores = report.to_json()
    if as_json:
        click.echo(json.dumps(scores, indent=2, default=str))
        return
    table = Table(title=f"{findings} against {labels}", title_justify="left")
    for column in ("detector", "precision", "recall", "TP", "FP", "FN"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for detector_id, score in scores.items():
        if not isinstance(score, dict):
            continue
        table.add_row(
            detector_id,
            _ratio(score.get("precision")),
            _ratio(score.get("recall")),
            str(score.get("true_positives")),
            str(score.get("false_positives")),
            str(score.get("false_negatives")),
        )
    Console().print(table)


@main.command("validate-config")
@_config_option
@_handle_errors
def validate_config(config_path: Path) -> None:
    """Check a config file and the files it names; print every problem (exit code 2) or a summary.

    Warnings (no sources, no enabled detector) go to stderr and do not change the exit code.
    """
    settings = load_config(config_path)
    check_files(settings, source=str(config_path))
    for warning in config_warnings(settings):
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{config_path} is valid: {len(settings.sources)} sources, "
        f"{len(settings.enabled_detectors)} detectors enabled"
    )


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"
