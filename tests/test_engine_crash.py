"""Crash safety of a run, with real processes: killed at each step, and two runs at once.

The runs killed at a crash point are child processes forked from a multiprocessing
``forkserver`` that has imported keytrail once, because ten fresh interpreters importing pandas
take too long for the suite. The other children are real ``keytrail`` command lines. Their
bootstrap code registers the test detectors first (``tests.every_read`` from
tests/test_engine.py and ``tests.gate``, which blocks until the test creates a release file),
so a test decides when a run may go on without sleeping for a guessed time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.engine import CRASH_EXIT_CODE, CRASH_POINT_VARIABLE, CRASH_POINTS, run_once
from pipeline.store.history import History
from pipeline.store.state import State
from tests.test_engine import write_logs

REPOSITORY = Path(__file__).resolve().parents[1]

CHILD_BOOTSTRAP = """
import os
import sys
import time
from pathlib import Path

import tests.test_engine  # registers tests.every_read
from detectors.base import Detector, empty_findings, register


class GateDetector(Detector):
    id = "tests.gate"

    def detect(self, window, history, now):
        Path(os.environ["KEYTRAIL_TEST_GATE_REACHED"]).touch()
        release = Path(os.environ["KEYTRAIL_TEST_GATE_RELEASE"])
        while not release.exists():
            time.sleep(0.02)
        return empty_findings()


register(GateDetector)

from pipeline.cli import main

main(sys.argv[1:], prog_name="keytrail")
"""
"""Child code: register the test detectors, then run the keytrail command line."""

DEADLINE_SECONDS = 60.0
"""Upper bound for a child to reach a point; only a hung test waits this long."""

_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def reap_children() -> Iterator[None]:
    """Kill and wait for the children a failed test left running (modules import this)."""
    yield
    while _STARTED:
        child = _STARTED.pop()
        if child.poll() is None:
            child.kill()
        child.wait()


def start_child(
    arguments: Sequence[str],
    folder: Path,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``keytrail ARGUMENTS`` in ``folder``, stdout and stderr going to files there."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEYTRAIL_")}
    env["PYTHONPATH"] = str(REPOSITORY)
    env["KEYTRAIL_TEST_GATE_REACHED"] = str(folder / "gate-reached")
    env["KEYTRAIL_TEST_GATE_RELEASE"] = str(folder / "gate-release")
    env.update(extra_env or {})
    with (folder / "stdout.txt").open("wb") as out, (folder / "stderr.txt").open("wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_BOOTSTRAP, *arguments],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=err,
        )
    _STARTED.append(child)
    return child


def wait_for(condition: Any, description: str) -> None:
    """Poll ``condition()`` until it is true; fail the test after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {description}")
        time.sleep(0.02)


def finish(child: subprocess.Popen[bytes]) -> int:
    try:
        return child.wait(timeout=DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail(f"child {child.pid} did not exit")


def write_config(folder: Path, detectors: Mapping[str, Any], **extra: Any) -> Path:
    """Write config.yaml reading ``folder/logs``, GeoIP off, outbox files on, console off."""
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": dict(detectors),
        "alerting": {"console": False, "outbox": True},
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def outcome(folder: Path) -> dict[str, Any]:
    """Return what runs left behind: history rows, findings lines, outbox files, state counts."""
    findings_file = folder / "out" / "findings.jsonl"
    lines = findings_file.read_text(encoding="utf-8").splitlines() if findings_file.exists() else []
    outbox = folder / "out" / "outbox"
    with State(folder / "state" / "state.db") as state:
        runs = state.runs()
        seen = state.seen_count()
        ledger = state.ledger_count()
        pending = len(state.pending_outputs())
    events = History(folder / "state" / "history").events()
    return {
        "history_rows": len(events),
        "history_unique_uids": events["event_uid"].nunique(),
        "findings_lines": len(lines),
        "finding_ids": sorted({json.loads(line)["finding_id"] for line in lines}),
        "outbox_files": sorted(path.name for path in outbox.iterdir()) if outbox.exists() else [],
        "seen": seen,
        "ledger": ledger,
        "pending": pending,
        "run_statuses": [run["status"] for run in runs],
        "quarantine_files": len(list((folder / "state" / "quarantine").glob("*.jsonl"))),
    }


def forkserver() -> Any:
    """Return the forkserver context, its server preloaded with keytrail and the test detector."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.test_engine_crash"])
    return context


def run_in_child(config: str, crash_point: str | None) -> None:
    """Run once in a forked child, ended by os._exit at ``crash_point`` when one is given."""
    if crash_point is not None:
        os.environ[CRASH_POINT_VARIABLE] = crash_point
    summary = run_once(load_config(config))
    if summary.status != "completed":
        raise SystemExit(f"run ended {summary.status}: {summary.problems}")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Run one uninterrupted child and one child per crash point, all at once.

    Returns crash point (or ``uninterrupted``) -> its folder and :func:`outcome` right after
    the child exited. The tests then give each crashed folder one normal run in this process.
    """
    context = forkserver()
    root = tmp_path_factory.mktemp("crash")
    folders: dict[str, Path] = {}
    children = {}
    for name in ("uninterrupted", *CRASH_POINTS):
        folder = root / name
        write_logs(folder / "logs")
        config = write_config(folder, {"tests.every_read": {}})
        point = None if name == "uninterrupted" else name
        children[name] = context.Process(target=run_in_child, args=(str(config), point))
        children[name].start()
        folders[name] = folder
    for child in children.values():
        child.join(DEADLINE_SECONDS)
        if child.exitcode is None:
            child.kill()
            child.join()
    codes = {name: child.exitcode for name, child in children.items()}
    for child in children.values():
        child.close()
    expected = {name: CRASH_EXIT_CODE for name in CRASH_POINTS} | {"uninterrupted": 0}
    assert codes == expected
    return {name: (folder, outcome(folder)) for name, folder in folders.items()}


def test_uninterrupted_run_outcome(crashed: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    result = crashed["uninterrupted"][1]

    # write_logs: 4 events, 4 read events, so 4 findings and 4 alerts of 2 files each.
    assert result["history_rows"] == 4
    assert result["findings_lines"] == 4
    assert len(result["finding_ids"]) == 4
    assert len(result["outbox_files"]) == 8
    assert result["seen"] == 4
    assert result["ledger"] == 4
    assert result["pending"] == 0
    assert result["run_statuses"] == ["completed"]


# What each crash point leaves: (run statuses, history rows, findings lines, pending outputs,
# outbox files, quarantine files). write_logs has one invalid line, so a run that read its
# sources has written one quarantine file.
LEFT_AT_CRASH = {
    "after_pending_outputs": ([], 0, 0, 0, 0, 0),
    "after_read": ([], 0, 0, 0, 0, 1),
    "after_history": (["started"], 4, 0, 0, 0, 1),
    "before_commit": (["started"], 4, 0, 0, 0, 1),
    "after_commit": (["completed"], 4, 0, 4, 0, 1),
    "before_mark_written": (["completed"], 4, 4, 4, 0, 1),
    "after_outputs": (["completed"], 4, 4, 0, 0, 1),
    "after_delivery": (["completed"], 4, 4, 0, 8, 1),
    "after_expire": (["completed"], 4, 4, 0, 8, 1),
}


def test_crash_table_covers_every_point() -> None:
    assert list(LEFT_AT_CRASH) == list(CRASH_POINTS)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_point_leaves_state(
    crashed: dict[str, tuple[Path, dict[str, Any]]], point: str
) -> None:
    left = crashed[point][1]
    statuses, history_rows, findings_lines, pending, outbox_files, quarantine = LEFT_AT_CRASH[point]

    assert left["run_statuses"] == statuses
    assert left["history_rows"] == history_rows
    assert left["findings_lines"] == findings_lines
    assert left["pending"] == pending
    assert len(left["outbox_files"]) == outbox_files
    assert left["quarantine_files"] == quarantine


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_then_run_loses_nothing(
    crashed: dict[str, tuple[Path, dict[str, Any]]], point: str
) -> None:
    folder = crashed[point][0]
    expected = crashed["uninterrupted"][1]

    summary = run_once(load_config(folder / "config.yaml"))

    assert summary.status == "completed"
    result = outcome(folder)
    assert result["history_rows"] == expected["history_rows"]
    assert result["history_unique_uids"] == expected["history_unique_uids"]
    assert result["finding_ids"] == expected["finding_ids"]
    assert result["outbox_files"] == expected["outbox_files"]
    assert result["seen"] == expected["seen"]
    assert result["ledger"] == expected["ledger"]
    assert result["pending"] == 0
    if point == "before_mark_written":
        # The one ambiguous case: findings.jsonl was written but not marked, so the next run
        # writes each of its findings once more.
        assert result["findings_lines"] == 2 * expected["findings_lines"]
    else:
        assert result["findings_lines"] == expected["findings_lines"]


def test_crash_point_unset_runs_normally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_logs(tmp_path / "logs")
    config = write_config(tmp_path, {"tests.every_read": {}})
    monkeypatch.setenv(CRASH_POINT_VARIABLE, "no_such_point")

    summary = run_once(load_config(config))

    assert summary.status == "completed"
    assert summary.findings_new == 4


# Two runs at once on one state directory.


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copy sample_logs and the shipped config.yaml, with tests.gate as the only detector.

    The built-in detectors are left out: this test is about the lock, and they only add time.
    """
    folder = tmp_path_factory.mktemp("two-runs")
    shutil.copytree(REPOSITORY / "sample_logs", folder / "sample_logs")
    data = yaml.safe_load((REPOSITORY / "config.yaml").read_text(encoding="utf-8"))
    data["detectors"] = {"tests.gate": {}}
    data.pop("schedule", None)
    (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return folder


def test_two_runs_only_one_commits(sample_copy: Path) -> None:
    arguments = ["run", "--config", str(sample_copy / "config.yaml")]
    # Each child keeps its output and gate files in its own folder, and both use the state
    # directory of the one config. The child that takes the lock waits at its gate.
    children = {}
    for name in ("first", "second"):
        (sample_copy / name).mkdir()
        children[name] = (start_child(arguments, sample_copy / name), sample_copy / name)
    first, second = children["first"][0], children["second"][0]

    wait_for(
        lambda: first.poll() is not None or second.poll() is not None,
        "one of the two runs to exit",
    )
    loser_name = "first" if first.poll() is not None else "second"
    winner_name = "second" if loser_name == "first" else "first"
    loser, loser_folder = children[loser_name]
    winner, winner_folder = children[winner_name]
    wait_for(
        lambda: (winner_folder / "gate-reached").exists() or winner.poll() is not None,
        "the run holding the lock to reach its detectors",
    )
    assert winner.poll() is None, (winner_folder / "stderr.txt").read_text(encoding="utf-8")
    (winner_folder / "gate-release").touch()

    assert finish(winner) == 0
    assert finish(loser) == 4
    state_dir = sample_copy / ".keytrail"
    stderr = (loser_folder / "stderr.txt").read_text(encoding="utf-8")
    assert stderr.endswith(
        f"error: another keytrail run holds the lock on {state_dir} (pid {winner.pid}); wait "
        "for it to finish or use a different --state-dir\n"
    )
    assert not (loser_folder / "gate-reached").exists()
    with State(state_dir / "state.db") as state:
        runs = state.runs()
        seen = state.seen_count()
    assert len(runs) == 1
    assert runs[0]["status"] == "completed"
    # Every event was stored once, by the one run that committed. An event that names several
    # secrets is one row per secret with one event_uid.
    events = History(state_dir / "history").events()
    assert len(events) > 0
    assert runs[0]["summary"]["events_new"] == len(events)
    assert runs[0]["summary"]["history_rows_written"] == len(events)
    assert events["event_uid"].nunique() == seen


def test_sigkill_equivalent_releases_lock(tmp_path: Path) -> None:
    # os._exit at a crash point leaves the lock file behind; the kernel released the lock.
    write_logs(tmp_path / "logs")
    config = write_config(tmp_path, {"tests.every_read": {}})
    child = forkserver().Process(target=run_in_child, args=(str(config), "after_history"))
    child.start()
    child.join(DEADLINE_SECONDS)
    assert child.exitcode == CRASH_EXIT_CODE
    assert (tmp_path / "state" / "lock").exists()

    summary = run_once(load_config(config))

    assert summary.status == "completed"
    assert summary.history_rows_written == 4
    with State(tmp_path / "state" / "state.db") as state:
        statuses = [run["status"] for run in state.runs()]
    assert statuses == ["interrupted", "completed"]
