"""Measure the detection step: every enabled detector over a large window and a month of history.

Generates, once, a Parquet history of ``--days`` days at ``--events-per-day`` events a day,
written through :meth:`pipeline.store.history.History.append` (so with its hourly rollup), and
a window of ``--window-events`` events on the day after it. Both are cached under
``benchmarks/.cache`` and reused when the sizes match.

Then each enabled detector of ``config.yaml`` runs in its own Python process through the
engine's detection step (:func:`pipeline.engine._baseline` and :func:`pipeline.engine._detect`,
with an empty state database, so statistical detectors fit), and one more process runs all of
them together. Each process is pinned to one CPU, with one thread for Arrow, BLAS and OpenMP.
Time is wall-clock ``time.perf_counter`` around the detection step. Memory is the process's
peak resident set size (``VmHWM`` of ``/proc/self/status``, MiB), reported both
before the step (imports and the loaded window) and at its end. A process that passes
``--max-mb`` resident or ``--timeout`` seconds is killed and reported as failed.

Run from the repository root::

    .venv/bin/python benchmarks/detect.py

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
TARGET_SECONDS = 15.0
TARGET_MB = 3072.0
HISTORY_START = "2026-09-01T00:00:00Z"
# One thread everywhere, so the figures are those of one core.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ARROW_NUM_THREADS": "1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    parser.add_argument(
        "--events-per-day", type=int, default=1_000_000, help="history events a day"
    )
    parser.add_argument("--window-events", type=int, default=1_000_000, help="events in the window")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml", help="config file")
    parser.add_argument("--only", help="run only this detector id (skips the all-detector run)")
    parser.add_argument(
        "--max-mb",
        type=float,
        default=8192,
        help="kill a measured process whose resident memory passes this many MiB (default 8192)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="kill a measured process after this many seconds"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    history_dir, window_dir = _cache_dirs(args.days, args.events_per_day, args.window_events)
    if args.child is not None:
        _child(args.child, args.config, history_dir, window_dir)
        return

    generated = _ensure_data(args.days, args.events_per_day, args.window_events)
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config

    enabled = load_config(args.config).enabled_detectors
    targets = [args.only] if args.only else [*enabled, "all"]
    figures: dict[str, dict[str, Any]] = {}
    for target in targets:
        if target == "all":
            # The run of all detectors leaves out those that failed alone and lists them.
            failed = [name for name, row in figures.items() if "failed" in row]
            figures[target] = _run_child(f"all:{','.join(failed)}", args)
            figures[target]["left_out"] = failed
        else:
            figures[target] = _run_child(target, args)
        _print_row(target, figures[target])

    total = figures.get("all")
    result = {
        "history_days": args.days,
        "history_events": args.days * args.events_per_day,
        "window_events": args.window_events,
        "generated_seconds": generated,
        "detectors": {name: figures[name] for name in targets if name != "all"},
        "total": total,
        "target_seconds": TARGET_SECONDS,
        "target_mb": TARGET_MB,
        "within_target": None
        if total is None or "failed" in total
        else total["seconds"] <= TARGET_SECONDS and total["peak_mb"] <= TARGET_MB,
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))


def _cache_dirs(days: int, per_day: int, window: int) -> tuple[Path, Path]:
    return (
        CACHE / f"history-{days}x{per_day}",
        CACHE / f"window-{window}-after-{days}",
    )


def _ensure_data(days: int, per_day: int, window: int) -> float | None:
    """Generate the cached history and window unless complete copies exist.

    Returns:
        Seconds spent generating, or None when both were cached.
    """
    history_dir, window_dir = _cache_dirs(days, per_day, window)
    if (history_dir / "complete").exists() and (window_dir / "complete").exists():
        return None
    sys.path.insert(0, str(ROOT))
    import shutil

    from benchmarks.population import Population
    from pipeline.store.history import History

    clock = time.perf_counter()
    population = Population(seed=5)
    for folder in (history_dir, window_dir):
        if folder.exists():
            shutil.rmtree(folder)
    history = History(history_dir)
    start = _timestamp(HISTORY_START)
    for day in range(days):
        day_clock = time.perf_counter()
        frame = population.events(start, day, per_day)
        history.append(frame, f"bench-{day:03d}")
        print(
            f"history day {day + 1}/{days}: {len(frame):,} events in "
            f"{time.perf_counter() - day_clock:.1f} s",
            file=sys.stderr,
        )
    (history_dir / "complete").write_text("")
    window_frame = population.events(start, days, window)
    History(window_dir).append(window_frame, "window")
    (window_dir / "complete").write_text("")
    seconds = round(time.perf_counter() - clock, 1)
    print(f"generated in {seconds} s", file=sys.stderr)
    return seconds


def _timestamp(text: str) -> Any:
    import pandas as pd

    return pd.Timestamp(text)


def _run_child(target: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--days",
        str(args.days),
        "--events-per-day",
        str(args.events_per_day),
        "--window-events",
        str(args.window_events),
        "--config",
        str(args.config),
        "--child",
        target,
    ]
    environment = os.environ | SINGLE_THREAD_ENV
    with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=errors)
        clock = time.perf_counter()
        killed = None
        while child.poll() is None:
            resident = _resident_mb(child.pid)
            if resident > args.max_mb:
                killed = f"killed at {resident:.0f} MiB resident (limit {args.max_mb:.0f})"
            elif time.perf_counter() - clock > args.timeout:
                killed = f"killed after {args.timeout:.0f} s"
            if killed:
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
        elapsed = round(time.perf_counter() - clock, 1)
        if killed is not None:
            return {"failed": f"{killed}, {elapsed} s after start"}
        output.seek(0)
        errors.seek(0)
        if child.returncode != 0:
            return {"failed": errors.read().strip().splitlines()[-1]}
        return dict(json.loads(output.read().strip().splitlines()[-1]))


def _resident_mb(pid: int) -> float:
    """Return the resident set size of ``pid`` in MiB from /proc (0 when it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _print_row(target: str, figures: dict[str, Any]) -> None:
    if "failed" in figures:
        print(f"{target:28} failed: {figures['failed']}", flush=True)
        return
    report = figures.get("report") or {}
    if figures.get("left_out"):
        report = {"left_out": figures["left_out"]}
    skipped = {
        name: count for name, count in report.items() if name.startswith(("skipped", "left_out"))
    }
    print(
        f"{target:28} {figures['seconds']:7.2f} s  peak {figures['peak_mb']:7.0f} MiB  "
        f"(before {figures['before_mb']:5.0f})  findings {figures['findings']:6}  {skipped or ''}",
        flush=True,
    )


def _child(target: str, config: Path, history_dir: Path, window_dir: Path) -> None:
    """Run the detection step for one detector (or ``all``) and print one JSON line."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sys.path.insert(0, str(ROOT))
    import pyarrow as pa

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    from benchmarks.memory import peak_mb
    from pipeline.config import load_config
    from pipeline.engine import _baseline, _detect
    from pipeline.store.history import History
    from pipeline.store.state import DetectorState, State
    from pipeline.summary import RunSummary

    settings = load_config(config)
    if target.startswith("all:"):
        left_out = set(target.removeprefix("all:").split(","))
        kept = {name: entry for name, entry in settings.detectors.items() if name not in left_out}
        settings = settings.model_copy(update={"detectors": kept})
    else:
        settings = settings.model_copy(update={"detectors": {target: settings.detectors[target]}})
    window = History(window_dir).events()
    now = window["time"].max()
    before = peak_mb()

    with tempfile.TemporaryDirectory() as folder:
        summary = RunSummary(run_id="benchmark", started=datetime.now(UTC))
        fitted: list[DetectorState] = []
        with State(Path(folder) / "state.db") as state:
            clock = time.perf_counter()
            baseline = _baseline(History(history_dir), window)
            findings = _detect(settings, window, baseline, now, state, summary, fitted)
            seconds = time.perf_counter() - clock
    errors = [entry.error for entry in summary.detectors if entry.error]
    if errors:
        raise SystemExit("; ".join(errors))
    reports = {entry.id: entry.report for entry in summary.detectors}
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_mb": round(peak_mb(), 1),
                "before_mb": round(before, 1),
                "findings": len(findings),
                "detector_seconds": {entry.id: entry.seconds for entry in summary.detectors},
                "report": reports.get(target, {}),
                "history_reads": getattr(baseline, "reads", None),
            }
        )
    )


if __name__ == "__main__":
    main()
