"""Tests of the SQLite run state and the state-directory lock."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from detectors.base import empty_findings
from pipeline.errors import StateError
from pipeline.schema import events_from_rows
from pipeline.store.state import (
    SCHEMA_VERSION,
    DetectorState,
    State,
    StateLockedError,
    state_lock,
)

STARTED = datetime(2026, 10, 6, 12, 0, tzinfo=UTC)


def events(*uids: str, time: str = "2026-10-05T08:00:00Z") -> pd.DataFrame:
    return events_from_rows(
        {"event_uid": uid, "time": time, "cloud": "aws", "resource": f"secret-{uid}"}
        for uid in uids
    )


def findings(*ids: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"finding_id": list(ids), "dedup_key": [f"key-{i}" for i in ids], "detector": "tests.x"}
    )


def commit(
    state: State, run_id: str, uids: tuple[str, ...] = (), ids: tuple[str, ...] = ()
) -> None:
    state.commit_run(
        run_id,
        started=STARTED,
        events=events(*uids) if uids else events_from_rows([]),
        findings=findings(*ids) if ids else empty_findings(),
        checkpoints={"local": {"/logs/a.json": {"size": 10, "mtime_ns": 1}}},
        summary={"events_new": len(uids)},
    )


def test_filter_new_events_drops_seen(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", uids=("a", "b"))
        new = state.filter_new_events(events("a", "b", "c"))
    assert new["event_uid"].tolist() == ["c"]


def test_filter_new_events_empty_state(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        new = state.filter_new_events(events("a", "b"))
    assert new["event_uid"].tolist() == ["a", "b"]


def test_filter_new_findings_drops_ledger(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", ids=("f1",))
        new = state.filter_new_findings(findings("f1", "f2"))
    assert new["finding_id"].tolist() == ["f2"]


def test_commit_stores_everything(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", uids=("a", "b"), ids=("f1",))
        assert state.seen_count() == 2
        assert state.ledger_count() == 1
        assert state.checkpoints("local") == {"/logs/a.json": {"size": 10, "mtime_ns": 1}}
        runs = state.runs()
    assert len(runs) == 1
    assert runs[0]["run_id"] == "run-1"
    assert runs[0]["started"] == "2026-10-06T12:00:00.000000Z"
    assert runs[0]["status"] == "completed"
    assert runs[0]["summary"] == {"events_new": 2}


def test_commit_failure_stores_nothing(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        with pytest.raises(StateError) as caught:
            state.commit_run(
                "run-1",
                started=STARTED,
                events=events("a", "b"),
                findings=findings("f1"),
                # The second checkpoint cannot be encoded, after the other rows were inserted.
                checkpoints={"local": {"/a": {"size": 1}, "/b": {"size": object()}}},
                summary={},
            )
        assert str(caught.value).startswith(
            f"could not commit run run-1 to {tmp_path / 'state.db'}: "
        )
        assert state.seen_count() == 0
        assert state.ledger_count() == 0
        assert state.checkpoints("local") == {}
        assert state.runs() == []


def test_checkpoints_upsert(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1")
        state.commit_run(
            "run-2",
            started=STARTED,
            events=events_from_rows([]),
            findings=empty_findings(),
            checkpoints={"local": {"/logs/a.json": {"size": 20, "mtime_ns": 2}}},
            summary={},
        )
        assert state.checkpoints("local") == {"/logs/a.json": {"size": 20, "mtime_ns": 2}}
        assert state.checkpoints("other") == {}


def test_state_persists_across_opens(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", uids=("a",))
    with State(tmp_path / "state.db") as state:
        assert state.seen_count() == 1
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_expire_seen_keeps_recent(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", uids=("old",))
        state.commit_run(
            "run-2",
            started=STARTED,
            events=events("new", time="2026-10-06T08:00:00Z"),
            findings=empty_findings(),
            checkpoints={},
            summary={},
        )
        removed = state.expire_seen(datetime(2026, 10, 6, 13, 0, tzinfo=UTC))
        assert removed == 2
        assert state.seen_count() == 0


def test_expire_seen_keeps_late_runs(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1", uids=("old",))
        # The run started after the cutoff, so its ids stay although the events are older.
        removed = state.expire_seen(datetime(2026, 10, 6, 0, 0, tzinfo=UTC))
        assert removed == 0
        assert state.seen_count() == 1


def test_newer_schema_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StateError) as caught:
        State(path)
    assert str(caught.value) == (
        f"state database {path} has schema version {SCHEMA_VERSION + 1}, newer than this "
        f"keytrail supports ({SCHEMA_VERSION}); upgrade keytrail"
    )


def test_corrupt_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as caught:
        State(path)
    assert str(caught.value).startswith(f"cannot open state database {path}: ")


def test_read_only_missing_file(tmp_path: Path) -> None:
    with State(tmp_path / "none" / "state.db", read_only=True) as state:
        assert state.filter_new_events(events("a"))["event_uid"].tolist() == ["a"]
        with pytest.raises(StateError):
            commit(state, "run-1")
    assert not (tmp_path / "none").exists()


def test_lock_held_raises(tmp_path: Path) -> None:
    with state_lock(tmp_path), pytest.raises(StateLockedError) as caught, state_lock(tmp_path):
        pass
    assert str(caught.value) == (
        f"another keytrail run holds the lock on {tmp_path} (pid {os.getpid()}); "
        "wait for it to finish or use a different --state-dir"
    )


def test_lock_released_after_block(tmp_path: Path) -> None:
    with state_lock(tmp_path) as path:
        assert path.read_text(encoding="ascii") == f"{os.getpid()}\n"
    with state_lock(tmp_path):
        pass
    assert (tmp_path / "lock").read_text(encoding="ascii") == ""


def test_commit_queues_pending_outputs(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        state.commit_run(
            "run-1",
            started=STARTED,
            events=events("a"),
            findings=findings("f1", "f2"),
            checkpoints={},
            summary={},
            pending_outputs={"f1": '{"finding_id": "f1"}', "f2": '{"finding_id": "f2"}'},
        )
        assert state.pending_outputs() == [
            ("f1", '{"finding_id": "f1"}'),
            ("f2", '{"finding_id": "f2"}'),
        ]
        assert state.ledger_count() == 2


def test_mark_outputs_written_clears_pending(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        state.commit_run(
            "run-1",
            started=STARTED,
            events=events("a"),
            findings=findings("f1", "f2"),
            checkpoints={},
            summary={},
            pending_outputs={"f1": "{}", "f2": "{}"},
        )
        assert state.mark_outputs_written(["f1"]) == 1
        assert state.mark_outputs_written(["f1"]) == 0
        assert state.pending_outputs() == [("f2", "{}")]
    with State(tmp_path / "state.db") as state:
        assert state.pending_outputs() == [("f2", "{}")]


def test_failed_commit_queues_nothing(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        with pytest.raises(StateError):
            state.commit_run(
                "run-1",
                started=STARTED,
                events=events("a"),
                findings=findings("f1"),
                checkpoints={"local": {"/b": {"size": object()}}},
                summary={},
                pending_outputs={"f1": "{}"},
            )
        assert state.pending_outputs() == []


def test_commit_rejects_uncommitted_status(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state, pytest.raises(ValueError) as caught:
        state.commit_run(
            "run-1",
            started=STARTED,
            events=events("a"),
            findings=empty_findings(),
            checkpoints={},
            summary={},
            status="started",
        )
    assert str(caught.value) == (
        "invalid commit status 'started'; expected one of ('completed', 'completed_with_problems')"
    )


def test_started_run_is_uncommitted(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        state.record_started_run("run-1", started=STARTED)
        state.record_started_run("run-2", started=STARTED)
        state.record_failed_run("run-3", started=STARTED, error="outputs could not be written")
        commit(state, "run-2")

        assert state.uncommitted_runs() == {"run-1", "run-3"}
        assert state.mark_runs_interrupted(["run-1", "run-2", "run-3"]) == 1
        statuses = {run["run_id"]: run["status"] for run in state.runs()}
    assert statuses == {"run-1": "interrupted", "run-2": "completed", "run-3": "failed"}


def test_update_run_replaces_status(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        commit(state, "run-1")
        state.update_run("run-1", status="completed_with_problems", summary={"problems": ["x"]})
        runs = state.runs()
    assert runs[0]["status"] == "completed_with_problems"
    assert runs[0]["summary"] == {"problems": ["x"]}


def test_version_1_database_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE findings_ledger (finding_id TEXT PRIMARY KEY, dedup_key TEXT, "
            "detector TEXT NOT NULL, first_written TEXT NOT NULL, run_id TEXT NOT NULL);"
            "INSERT INTO findings_ledger VALUES ('f0', 'k', 'tests.x', '2026-01-01', 'run-0');"
            "PRAGMA user_version=1;"
        )

    with State(path) as state:
        # Findings of version 1 were written before their commit, so none is pending.
        assert state.pending_outputs() == []
        assert state.ledger_count() == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def fitted(detector: str = "keytrail.isolation_forest", **state: object) -> DetectorState:
    return DetectorState(
        detector=detector,
        params_hash="abc123",
        fitted_through=datetime(2026, 10, 5, 8, 0, tzinfo=UTC),
        state={"medians": [1.5, 2.0], **state},
    )


def test_detector_state_absent(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        assert state.detector_state("keytrail.isolation_forest") is None


def test_detector_state_saved_with_commit(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        state.commit_run(
            "run-1",
            started=datetime(2026, 10, 5, 9, 0, tzinfo=UTC),
            events=events("e1"),
            findings=findings(),
            checkpoints={},
            summary={},
            detector_states=[fitted()],
        )
    with State(tmp_path / "state.db", read_only=True) as state:
        assert state.detector_state("keytrail.isolation_forest") == fitted()


def test_detector_state_replaced(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        state.save_detector_states("run-1", [fitted(version=1)])
        state.save_detector_states("run-2", [fitted(version=2)])
        stored = state.detector_state("keytrail.isolation_forest")
    assert stored is not None
    assert stored.state == {"medians": [1.5, 2.0], "version": 2}


def test_detector_state_rolled_back_with_commit(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:

        def fail(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(StateError, match="could not commit run run-1"):
            state.commit_run(
                "run-1",
                started=datetime(2026, 10, 5, 9, 0, tzinfo=UTC),
                events=events("e1"),
                findings=findings(),
                checkpoints={},
                summary={},
                in_transaction=fail,
                detector_states=[fitted()],
            )
        assert state.detector_state("keytrail.isolation_forest") is None


def test_detector_state_rejects_nan(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        with pytest.raises(StateError, match="Out of range float values are not JSON compliant"):
            state.save_detector_states("run-1", [fitted(score=float("nan"))])
        assert state.detector_state("keytrail.isolation_forest") is None
