"""Tests of pipeline.engine.run_once on small log files of the three clouds."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
from rich.console import Console

from detectors.base import (
    Detector,
    DetectorParams,
    HistoryView,
    build_findings,
    empty_findings,
    register,
    registered_detectors,
)
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import COMMAND_LINE_SOURCE, run_once
from pipeline.formats import read_paths
from pipeline.logs import setup_logging
from pipeline.sources import SourceBatch, SourceError, build_source
from pipeline.store.history import History
from pipeline.store.state import State, StateLockedError, state_lock
from pipeline.summary import print_summary

NOW = datetime(2026, 10, 6, 12, 0, tzinfo=UTC)


# Detectors registered for these tests only. Their output depends only on the window, so the
# engine's counting can be asserted exactly.


class EveryReadParams(DetectorParams):
    severity: str = "medium"


class EveryReadDetector(Detector):
    """One finding per read event; records the baseline rows it was given."""

    id = "tests.every_read"
    Params = EveryReadParams
    baseline_rows: ClassVar[list[int]] = []

    @property
    def lookback(self) -> timedelta:
        return timedelta(days=30)

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        type(self).baseline_rows.append(len(history.events()))
        reads = window[window["action"] == "read"]
        if reads.empty:
            return empty_findings()
        params: Any = self.params
        rows = [
            {
                "severity": params.severity,
                "title": f"read of {row.resource}",
                "principal": row.principal,
                "cloud": row.cloud,
                "account": row.account,
                "resources": [row.resource],
                "source_ips": [row.source_ip],
                "first_seen": row.time,
                "last_seen": row.time,
                "event_uids": [row.event_uid],
                "evidence": {"operation": row.operation},
                "baseline": {"summary": "none"},
            }
            for row in reads.itertuples()
        ]
        return build_findings(rows, detector=self)


class BrokenDetector(Detector):
    """Raise on every window."""

    id = "tests.broken"

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        raise RuntimeError("baseline table missing")


for _cls in (EveryReadDetector, BrokenDetector):
    if _cls.id not in registered_detectors():
        register(_cls)


# Fixture records, written from the providers' documented layouts.


def cloudtrail_record(number: int, *, time: str, user: str = "alice") -> dict[str, Any]:
    """Return a Secrets Manager GetSecretValue CloudTrail record."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": "AIDAEXAMPLEUSER0001",
            "arn": f"arn:aws:iam::111122223333:user/{user}",
            "accountId": "111122223333",
            "userName": user,
        },
        "eventTime": time,
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "eu-west-1",
        "sourceIPAddress": "10.1.2.3",
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": {"secretId": f"prod/db-{number}"},
        "responseElements": None,
        "eventID": f"11111111-0000-4000-8000-{number:012d}",
        "eventType": "AwsApiCall",
        "recipientAccountId": "111122223333",
    }


def gcp_record() -> dict[str, Any]:
    """Return a Secret Manager AccessSecretVersion audit log entry."""
    return {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "status": {},
            "authenticationInfo": {"principalEmail": "bob@example.com"},
            "requestMetadata": {"callerIp": "10.9.8.7", "callerSuppliedUserAgent": "grpc-python"},
            "serviceName": "secretmanager.googleapis.com",
            "methodName": "google.cloud.secretmanager.v1.SecretManagerService.AccessSecretVersion",
            "authorizationInfo": [{"permission": "secretmanager.versions.access", "granted": True}],
            "resourceName": "projects/demo-project/secrets/api-key/versions/3",
        },
        "insertId": "1x2y3z",
        "resource": {"type": "audited_resource", "labels": {"project_id": "demo-project"}},
        "timestamp": "2026-10-05T10:00:00.123456789Z",
        "severity": "INFO",
        "logName": "projects/demo-project/logs/cloudaudit.googleapis.com%2Fdata_access",
    }


def azure_record() -> dict[str, Any]:
    """Return a Key Vault SecretGet AuditEvent record."""
    return {
        "time": "2026-10-05T11:00:00.0000000Z",
        "resourceId": "/SUBSCRIPTIONS/0000-1111/RESOURCEGROUPS/RG/PROVIDERS/"
        "MICROSOFT.KEYVAULT/VAULTS/KV-DEMO",
        "operationName": "SecretGet",
        "operationVersion": "7.4",
        "category": "AuditEvent",
        "resultType": "Success",
        "resultSignature": "OK",
        "callerIpAddress": "10.4.4.4",
        "correlationId": "5b1c9d3e-0000-4000-8000-000000000009",
        "identity": {
            "claim": {
                "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn": "carol@example.com"
            }
        },
        "properties": {
            "id": "https://kv-demo.vault.azure.net/secrets/db-password/abc",
            "httpStatusCode": 200,
        },
    }


def write_logs(root: Path) -> Path:
    """Write 3 AWS records (one bad line), 1 GCP and 1 Azure record under ``root``.

    Expected: 5 records read, 4 events, 1 quarantined (invalid_json).
    """
    (root / "aws").mkdir(parents=True)
    lines = [
        json.dumps(cloudtrail_record(1, time="2026-10-05T08:00:00Z")),
        '{"eventVersion": "1.09", "eventID": ',
        json.dumps(cloudtrail_record(2, time="2026-10-05T09:00:00Z")),
    ]
    (root / "aws" / "trail.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "gcp").mkdir()
    (root / "gcp" / "audit.json").write_text(json.dumps([gcp_record()]), encoding="utf-8")
    (root / "azure").mkdir()
    (root / "azure" / "PT1H.json").write_text(json.dumps(azure_record()) + "\n", encoding="utf-8")
    return root


def make_settings(tmp_path: Path, **detectors: dict[str, Any]) -> Settings:
    """Settings reading ``tmp_path/logs`` with GeoIP and console output off."""
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [{"name": "local", "type": "files", "paths": ["logs"]}],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": detectors or {"tests.every_read": {}},
        "alerting": {"console": False, "outbox": False},
    }
    return settings_from_mapping(data, base_dir=tmp_path)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return write_logs(tmp_path / "logs")


@pytest.fixture(autouse=True)
def _reset_baseline_rows() -> None:
    EveryReadDetector.baseline_rows.clear()


def read_findings(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_first_run_counts(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert summary.status == "completed"
    assert summary.problems == []
    assert len(summary.sources) == 1
    source = summary.sources[0]
    assert source.name == "local"
    assert source.files_listed == 3
    assert source.files_read == 3
    assert source.records == 5
    assert source.events == 4
    assert source.quarantined_by_reason == {"invalid_json": 1}
    assert source.records_by_format == {"azure_keyvault": 1, "cloudtrail": 2, "gcp_audit": 1}
    assert summary.events_read == 4
    assert summary.events_new == 4
    assert summary.events_already_seen == 0
    assert summary.history_rows_written == 4
    assert summary.findings_by_detector() == {"tests.every_read": 4}
    assert summary.outputs["findings_written"] == 4
    assert summary.exit_code() == 0


def test_first_run_writes_outputs_and_state(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW)

    findings = read_findings(tmp_path / "out" / "findings.jsonl")
    assert sorted(f["principal"] for f in findings) == [
        "alice",
        "alice",
        "bob@example.com",
        "carol@example.com",
    ]
    assert {f["detector"] for f in findings} == {"tests.every_read"}
    with State(tmp_path / "state" / "state.db") as state:
        assert state.seen_count() == 4
        assert state.ledger_count() == 4
        assert len(state.checkpoints("local")) == 3
        runs = state.runs()
    assert [run["run_id"] for run in runs] == [summary.run_id]
    assert runs[0]["status"] == "completed"
    assert runs[0]["summary"]["events_new"] == 4
    assert len(History(tmp_path / "state" / "history").events()) == 4


def test_quarantine_file_keeps_record(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), now=NOW)

    assert summary.quarantine_file == str(
        tmp_path / "state" / "quarantine" / f"{summary.run_id}.jsonl"
    )
    entries = read_findings(Path(summary.quarantine_file))
    assert len(entries) == 1
    assert entries[0]["origin"] == f"{logs / 'aws' / 'trail.jsonl'} line 2"
    assert entries[0]["reason"] == "invalid_json"
    assert entries[0]["raw"] == '{"eventVersion": "1.09", "eventID": '


def test_second_run_reads_nothing_new(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    second = run_once(settings, now=NOW)

    assert second.status == "completed"
    assert second.sources[0].files_unchanged == 3
    assert second.sources[0].files_read == 0
    assert second.events_new == 0
    assert second.findings_new == 0
    assert second.quarantine_file is None
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4


def test_changed_file_is_deduplicated(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    trail = logs / "aws" / "trail.jsonl"
    with trail.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(cloudtrail_record(3, time="2026-10-05T20:00:00Z")) + "\n")

    second = run_once(settings, now=NOW)

    assert second.sources[0].files_read == 1
    assert second.events_read == 3
    assert second.events_already_seen == 2
    assert second.events_new == 1
    assert second.findings_new == 1
    # The new event's baseline holds the 4 events of the first run.
    assert EveryReadDetector.baseline_rows == [0, 4]
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 5


def test_failing_detector_reported_others_run(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path, **{"tests.broken": {}, "tests.every_read": {}})
    summary = run_once(settings, now=NOW)

    assert summary.status == "completed_with_problems"
    assert summary.problems[0] == "detector tests.broken: RuntimeError: baseline table missing"
    assert summary.problems[1].startswith("detector tests.broken did not check the events from ")
    assert (
        summary.detectors[0].error == "detector tests.broken: RuntimeError: baseline table missing"
    )
    assert summary.findings_by_detector() == {"tests.broken": 0, "tests.every_read": 4}
    assert summary.exit_code() == 3


def test_missing_source_path_reported(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    missing = settings.sources[0].model_copy(update={"name": "gone", "paths": [tmp_path / "no"]})
    settings = settings.model_copy(update={"sources": [missing, *settings.sources]})

    summary = run_once(settings, now=NOW)

    assert summary.sources[0].error == (
        f"log path not found: {tmp_path / 'no'} (check --source or sources[].paths)"
    )
    assert summary.sources[1].events == 4
    assert summary.events_new == 4
    assert summary.exit_code() == 3


def test_output_failure_keeps_findings_pending(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be", encoding="utf-8")

    summary = run_once(settings, now=NOW)

    assert summary.status == "completed_with_problems"
    assert summary.exit_code() == 3
    assert summary.problems[0].startswith(f"outputs: could not write to {blocker}: ")
    assert summary.problems[0].endswith("; the next run writes the 4 findings of this run")
    with State(tmp_path / "state" / "state.db") as state:
        assert state.seen_count() == 4
        assert state.ledger_count() == 4
        assert len(state.pending_outputs()) == 4
        runs = state.runs()
    assert [run["status"] for run in runs] == ["completed_with_problems"]
    assert runs[0]["summary"]["problems"] == summary.problems

    blocker.unlink()
    second = run_once(settings, now=NOW)

    assert second.status == "completed"
    assert second.findings_pending_written == 4
    assert second.findings_new == 0
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4
    with State(tmp_path / "state" / "state.db") as state:
        assert state.pending_outputs() == []


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the engine catches it except the pre-commit rollback."""


def kill(*args: object, **kwargs: object) -> None:
    raise Killed


def test_killed_before_commit_history_once(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    # SIGKILL runs no rollback, so the run's history files stay behind.
    monkeypatch.setattr("pipeline.engine._roll_back", lambda *args: None)
    monkeypatch.setattr(State, "commit_run", kill)
    with pytest.raises(Killed):
        run_once(settings, now=NOW)
    assert len(History(tmp_path / "state" / "history").events()) == 4
    assert not (tmp_path / "out" / "findings.jsonl").exists()
    monkeypatch.undo()

    second = run_once(settings, now=NOW)

    assert second.events_new == 4
    events = History(tmp_path / "state" / "history").events()
    assert len(events) == 4
    assert events["event_uid"].is_unique
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4
    with State(tmp_path / "state" / "state.db") as state:
        statuses = [run["status"] for run in state.runs()]
    assert statuses == ["interrupted", "completed"]


def test_uncommitted_history_removed(tmp_path: Path, logs: Path) -> None:
    history = History(tmp_path / "state" / "history")
    # A run that appended its events to the history and was killed before its commit.
    with State(tmp_path / "state" / "state.db") as state:
        state.record_started_run("20261006T115900Z-dead00", started=NOW)
    history.append(read_paths([logs]).events, "20261006T115900Z-dead00")
    assert len(history.events()) == 4

    summary = run_once(make_settings(tmp_path), now=NOW)

    events = history.events()
    assert summary.history_rows_written == 4
    assert len(events) == 4
    assert events["event_uid"].is_unique
    assert history.run_ids() == {summary.run_id}


def test_unknown_run_history_kept(tmp_path: Path, logs: Path) -> None:
    history = History(tmp_path / "state" / "history")
    history.append(read_paths([logs / "gcp"]).events, "run-from-moved-state")

    run_once(make_settings(tmp_path), now=NOW)

    assert "run-from-moved-state" in history.run_ids()


def test_killed_after_commit_outputs_once(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    monkeypatch.setattr("pipeline.engine.write_outputs", kill)
    with pytest.raises(Killed):
        run_once(settings, now=NOW)
    assert not (tmp_path / "out" / "findings.jsonl").exists()
    monkeypatch.undo()

    second = run_once(settings, now=NOW)

    assert second.events_new == 0
    assert second.findings_new == 0
    assert second.findings_pending_written == 4
    findings = read_findings(tmp_path / "out" / "findings.jsonl")
    assert len(findings) == 4
    assert len({finding["finding_id"] for finding in findings}) == 4
    assert len(History(tmp_path / "state" / "history").events()) == 4


def test_killed_before_marking_one_duplicate(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    monkeypatch.setattr(State, "mark_outputs_written", kill)
    with pytest.raises(Killed):
        run_once(settings, now=NOW)
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4
    monkeypatch.undo()

    second = run_once(settings, now=NOW)
    third = run_once(settings, now=NOW)

    # The ambiguous case: the outputs were written but not marked, so they are written again.
    assert second.findings_pending_written == 4
    assert third.findings_pending_written == 0
    findings = read_findings(tmp_path / "out" / "findings.jsonl")
    assert len(findings) == 8
    assert len({finding["finding_id"] for finding in findings}) == 4


def test_pending_findings_written_intact(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    monkeypatch.setattr("pipeline.engine.write_outputs", kill)
    with pytest.raises(Killed):
        run_once(settings, now=NOW)
    monkeypatch.undo()
    with State(tmp_path / "state" / "state.db") as state:
        stored = {finding_id: json.loads(text) for finding_id, text in state.pending_outputs()}

    run_once(settings, now=NOW)

    written = {f["finding_id"]: f for f in read_findings(tmp_path / "out" / "findings.jsonl")}
    assert written == stored
    assert {f["principal"] for f in written.values()} == {
        "alice",
        "bob@example.com",
        "carol@example.com",
    }


def test_dry_run_leaves_pending(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    monkeypatch.setattr("pipeline.engine.write_outputs", kill)
    with pytest.raises(Killed):
        run_once(settings, now=NOW)
    monkeypatch.undo()

    summary = run_once(settings, now=NOW, dry_run=True)

    assert summary.findings_pending_written == 0
    assert not (tmp_path / "out" / "findings.jsonl").exists()
    with State(tmp_path / "state" / "state.db") as state:
        assert len(state.pending_outputs()) == 4


def test_dry_run_writes_nothing(tmp_path: Path, logs: Path) -> None:
    console = Console(record=True, width=200)
    summary = run_once(make_settings(tmp_path), now=NOW, dry_run=True, console=console)

    assert summary.dry_run is True
    assert summary.events_new == 4
    assert summary.findings_new == 4
    assert summary.quarantine_file is None
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "out").exists()
    assert "carol@example.com" in console.export_text()


def test_sources_override_reads_given_paths(tmp_path: Path, logs: Path) -> None:
    summary = run_once(make_settings(tmp_path), sources_override=[logs / "gcp"], now=NOW)

    assert [source.name for source in summary.sources] == [COMMAND_LINE_SOURCE]
    assert summary.events_new == 1
    assert summary.findings_by_detector() == {"tests.every_read": 1}


def test_locked_state_raises(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    with state_lock(settings.state_dir), pytest.raises(StateLockedError) as caught:
        run_once(settings, now=NOW)
    assert str(caught.value) == (
        f"another keytrail run holds the lock on {settings.state_dir} (pid {os.getpid()}); "
        "wait for it to finish or use a different --state-dir"
    )


def retention_settings(tmp_path: Path, retention_days: int) -> Settings:
    settings = make_settings(tmp_path)
    history = settings.history.model_copy(
        update={"retention_days": retention_days, "seen_retention_days": retention_days}
    )
    return settings.model_copy(update={"history": history})


def test_old_logs_keep_their_history(tmp_path: Path, logs: Path) -> None:
    # The events are from 2026-10-05; the run happens 400 days later with 30 days retention.
    settings = retention_settings(tmp_path, 30)

    summary = run_once(settings, now=NOW + timedelta(days=400))

    assert summary.history_rows_written == 4
    assert len(History(tmp_path / "state" / "history").events()) == 4


def test_retention_counts_from_newest_event(tmp_path: Path, logs: Path) -> None:
    settings = retention_settings(tmp_path, 30)
    run_once(settings, now=NOW)
    later = logs / "aws" / "later.jsonl"
    later.write_text(
        json.dumps(cloudtrail_record(9, time="2026-11-20T10:00:00Z")) + "\n", encoding="utf-8"
    )

    run_once(settings, now=datetime(2026, 11, 21, tzinfo=UTC))

    events = History(tmp_path / "state" / "history").events()
    assert len(events) == 1
    assert events["time"].iloc[0] == pd.Timestamp("2026-11-20T10:00:00Z")


def test_retention_capped_at_run_time(tmp_path: Path, logs: Path) -> None:
    # An event dated after the run time (a skewed clock) must not expire the days before it.
    settings = retention_settings(tmp_path, 30)
    run_once(settings, now=NOW)
    future = logs / "aws" / "future.jsonl"
    future.write_text(
        json.dumps(cloudtrail_record(9, time="2026-11-20T10:00:00Z")) + "\n", encoding="utf-8"
    )

    run_once(settings, now=NOW + timedelta(days=1))

    assert len(History(tmp_path / "state" / "history").events()) == 5


def test_rerun_after_seen_expiry_no_duplicates(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path)
    run_once(settings, now=NOW)
    # 120 days later the seen ids of the first run (30 days retention) are forgotten.
    second = run_once(settings, now=NOW + timedelta(days=120))
    with State(tmp_path / "state" / "state.db") as state:
        assert state.seen_count() == 0

    third = run_once(settings, now=NOW + timedelta(days=121))

    assert second.events_new == 0
    assert third.sources[0].files_unchanged == 3
    assert third.events_new == 0
    assert third.history_rows_written == 0
    assert len(History(tmp_path / "state" / "history").events()) == 4
    assert len(read_findings(tmp_path / "out" / "findings.jsonl")) == 4


def test_no_findings_creates_empty_file(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path, **{"tests.every_read": {"enabled": False}})

    summary = run_once(settings, now=NOW)

    path = tmp_path / "out" / "findings.jsonl"
    assert summary.findings_new == 0
    assert summary.outputs["findings_file"] == str(path)
    assert path.read_bytes() == b""


# Sources that fail: the run goes on, and its summary names the source that is behind and why.


def two_source_settings(tmp_path: Path, logs: Path) -> Settings:
    """Settings with source ``local`` (aws and gcp) and source ``extra`` (azure)."""
    settings = make_settings(tmp_path)
    local = settings.sources[0].model_copy(update={"paths": [logs / "aws", logs / "gcp"]})
    extra = settings.sources[0].model_copy(update={"name": "extra", "paths": [logs / "azure"]})
    return settings.model_copy(update={"sources": [local, extra]})


def stored_checkpoints(tmp_path: Path, source: str) -> list[tuple[str, str, str]]:
    """Return (key, value, updated) rows of ``source`` straight from the checkpoints table."""
    with sqlite3.connect(tmp_path / "state" / "state.db") as conn:
        rows = conn.execute(
            "SELECT key, value, updated FROM checkpoints WHERE source = ? ORDER BY key", (source,)
        ).fetchall()
    return [(str(key), str(value), str(updated)) for key, value, updated in rows]


def test_failed_source_keeps_checkpoints(tmp_path: Path, logs: Path) -> None:
    settings = two_source_settings(tmp_path, logs)
    run_once(settings, now=NOW)
    before = stored_checkpoints(tmp_path, "extra")
    assert len(before) == 1
    (logs / "azure" / "PT1H.json").unlink()
    (logs / "azure").rmdir()
    (logs / "gcp" / "more.json").write_text(json.dumps([gcp_record()]), encoding="utf-8")

    summary = run_once(settings, now=NOW)

    assert stored_checkpoints(tmp_path, "extra") == before
    assert len(stored_checkpoints(tmp_path, "local")) == 3
    assert summary.status == "completed_with_problems"
    assert summary.exit_code() == 3
    assert summary.behind() == [
        {
            "source": "extra",
            "reason": f"log path not found: {logs / 'azure'} (check --source or sources[].paths)",
        }
    ]


def test_behind_in_json_and_console(tmp_path: Path, logs: Path) -> None:
    settings = two_source_settings(tmp_path, logs)
    missing = settings.sources[1].model_copy(update={"paths": [tmp_path / "gone"]})
    settings = settings.model_copy(update={"sources": [settings.sources[0], missing]})
    console = Console(record=True, width=300)

    summary = run_once(settings, now=NOW)
    print_summary(summary, console)

    reason = f"log path not found: {tmp_path / 'gone'} (check --source or sources[].paths)"
    assert summary.to_dict()["behind"] == [{"source": "extra", "reason": reason}]
    text = console.export_text()
    lines = [line for line in text.splitlines() if line.startswith("behind")]
    assert len(lines) == 1
    assert lines[0].split(None, 1)[1] == (
        f"source extra: {reason}; the next run reads the rest from its checkpoints"
    )


class SdkError(Exception):
    """Stands in for a cloud SDK's own exception class, which keytrail does not catch by name."""


class RaisingSource:
    """A source whose read raises ``error``."""

    type: ClassVar[str] = "files"

    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        self.error = error

    def read(self, checkpoints: Any, *, since: Any = None, until: Any = None) -> Any:
        raise self.error


def replace_extra_source(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Make the source named ``extra`` raise ``error``; other sources are built as usual."""
    real_build = build_source

    def build(source_settings: Any) -> Any:
        if source_settings.name == "extra":
            return RaisingSource("extra", error)
        return real_build(source_settings)

    monkeypatch.setattr("pipeline.engine.build_source", build)


def test_unexpected_source_error_reported(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_source_settings(tmp_path, logs)
    replace_extra_source(monkeypatch, SdkError("ThrottlingException: Rate exceeded"))

    summary = run_once(settings, now=NOW)

    assert summary.sources[1].error == "SdkError: ThrottlingException: Rate exceeded"
    assert summary.problems == ["source extra: SdkError: ThrottlingException: Rate exceeded"]
    assert summary.events_new == 3
    assert summary.behind() == [
        {"source": "extra", "reason": "SdkError: ThrottlingException: Rate exceeded"}
    ]
    with State(tmp_path / "state" / "state.db") as state:
        assert state.checkpoints("extra") == {}
        assert len(state.checkpoints("local")) == 2


def test_source_error_message_not_doubled(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_source_settings(tmp_path, logs)
    replace_extra_source(
        monkeypatch, SourceError("extra", "AccessDenied", "grant s3:GetObject on the bucket")
    )

    summary = run_once(settings, now=NOW)

    assert summary.problems == ["source extra: AccessDenied; grant s3:GetObject on the bucket"]
    assert summary.behind() == [
        {
            "source": "extra",
            "reason": "AccessDenied; grant s3:GetObject on the bucket",
        }
    ]


def test_source_os_error_reported(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_source_settings(tmp_path, logs)
    replace_extra_source(monkeypatch, ConnectionResetError(104, "Connection reset by peer"))

    summary = run_once(settings, now=NOW)

    assert summary.problems == ["source extra: [Errno 104] Connection reset by peer"]
    assert summary.events_new == 3


def test_one_line_summary(tmp_path: Path, logs: Path) -> None:
    settings = two_source_settings(tmp_path, logs)
    missing = settings.sources[1].model_copy(update={"paths": [tmp_path / "gone"]})
    settings = settings.model_copy(update={"sources": [settings.sources[0], missing]})

    summary = run_once(settings, now=NOW)

    line = summary.one_line()
    assert line.startswith(
        f"run {summary.run_id} completed_with_problems, 3 events new, 3 findings new, "
        "1 quarantined, sources behind: extra, 1 problems, "
    )
    assert line.endswith(" s")


def test_finish_log_fields_in_json(tmp_path: Path, logs: Path) -> None:
    stream = io.StringIO()
    handler = setup_logging("INFO", "json", stream)
    try:
        summary = run_once(make_settings(tmp_path), now=NOW)
    finally:
        logging.getLogger().removeHandler(handler)

    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    finished = [entry for entry in entries if entry["message"].startswith("run finished: ")]
    assert len(finished) == 1
    assert finished[0]["message"] == f"run finished: {summary.one_line()}"
    assert finished[0]["run_id"] == summary.run_id
    assert finished[0]["status"] == "completed"
    assert finished[0]["events_new"] == 4
    assert finished[0]["findings_new"] == 4
    assert finished[0]["sources_behind"] == []


class PartlyReadSource(RaisingSource):
    """A source that read part of its input and names the rest in ``problems``."""

    def read(self, checkpoints: Any, *, since: Any = None, until: Any = None) -> Any:
        return SourceBatch(
            self.name,
            checkpoints={"2026/10/05": ["a.json.gz"]},
            problems=["b.json.gz: HTTP 503 SlowDown after 5 attempts"],
        )


def test_partly_read_source_behind(
    tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_source_settings(tmp_path, logs)
    real_build = build_source
    monkeypatch.setattr(
        "pipeline.engine.build_source",
        lambda item: (
            PartlyReadSource("extra", RuntimeError()) if item.name == "extra" else real_build(item)
        ),
    )
    console = Console(record=True, width=300)

    summary = run_once(settings, now=NOW)
    print_summary(summary, console)

    assert summary.behind() == [
        {"source": "extra", "reason": "b.json.gz: HTTP 503 SlowDown after 5 attempts"}
    ]
    assert summary.problems == ["source extra: b.json.gz: HTTP 503 SlowDown after 5 attempts"]
    with State(tmp_path / "state" / "state.db") as state:
        assert state.checkpoints("extra") == {"2026/10/05": ["a.json.gz"]}
    text = console.export_text()
    assert [line.split() for line in text.splitlines() if line.startswith("source extra")] == [
        ["source", "extra", "partly", "read"]
    ]


class FlakyDetector(EveryReadDetector):
    """One finding per read, or an error while ``failing`` is set."""

    id = "tests.flaky"
    failing: ClassVar[bool] = False

    def detect(self, window: pd.DataFrame, history: HistoryView, now: pd.Timestamp) -> pd.DataFrame:
        if type(self).failing:
            raise RuntimeError("model file unreadable")
        return super().detect(window, history, now)


if FlakyDetector.id not in registered_detectors():
    register(FlakyDetector)


def add_read(logs: Path, number: int, time: str) -> None:
    """Add one more CloudTrail read in a file of its own."""
    path = logs / "aws" / f"trail-{number}.jsonl"
    path.write_text(json.dumps(cloudtrail_record(number, time=time)) + "\n", encoding="utf-8")


def missed_spans(tmp_path: Path) -> dict[str, Any]:
    with State(tmp_path / "state" / "state.db") as state:
        return state.checkpoints("_missed")


def stored_span(tmp_path: Path) -> tuple[str, str]:
    """Return the first and last event time in the history, as the missed span gives them."""
    times = History(tmp_path / "state" / "history").events(columns=["time"])["time"]
    return times.min().isoformat(), (times.max() + pd.Timedelta(microseconds=1)).isoformat()


def test_missed_events_replayed_next_run(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path, **{"tests.flaky": {}})
    FlakyDetector.failing = True
    try:
        first = run_once(settings, now=NOW)
    finally:
        FlakyDetector.failing = False
    since, until = stored_span(tmp_path)
    add_read(logs, 7, "2026-10-06T10:00:00Z")

    second = run_once(settings, now=NOW)
    third = run_once(settings, now=NOW)

    assert first.exit_code() == 3
    assert first.problems[-1] == (
        f"detector tests.flaky did not check the events from {since} to {until}; "
        "the next run gives them to it again"
    )
    assert second.problems == []
    assert second.replayed == [f"tests.flaky: 4 events from {since} to {until}, 4 new findings"]
    assert second.findings_new == 5
    assert second.findings_by_detector() == {"tests.flaky": 5}
    assert missed_spans(tmp_path) == {}
    assert third.replayed == []
    assert third.findings_new == 0
    titles = sorted(row["title"] for row in read_findings(tmp_path / "out" / "findings.jsonl"))
    # The two AWS reads of the failed run lie more than an hour before the newest event.
    assert titles == [
        "read of https://kv-demo.vault.azure.net/secrets/db-password",
        "read of prod/db-1 (late)",
        "read of prod/db-2 (late)",
        "read of prod/db-7",
        "read of projects/demo-project/secrets/api-key",
    ]


def test_missed_spans_of_failed_runs_merge(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path, **{"tests.flaky": {}, "tests.every_read": {}})
    FlakyDetector.failing = True
    try:
        run_once(settings, now=NOW)
        add_read(logs, 8, "2026-10-06T11:00:00Z")
        second = run_once(settings, now=NOW)
    finally:
        FlakyDetector.failing = False
    since, until = stored_span(tmp_path)
    day_later = (pd.Timestamp(since) + pd.Timedelta(days=1)).isoformat()

    # The merged span is 27 hours: one run replays its first day, the next one the rest.
    third = run_once(settings, now=NOW)
    queued = missed_spans(tmp_path)
    fourth = run_once(settings, now=NOW)

    assert second.problems == [
        "detector tests.flaky: RuntimeError: model file unreadable",
        f"detector tests.flaky did not check the events from {since} to {until}; "
        "the next run gives them to it again",
    ]
    assert third.replayed == [
        f"tests.flaky: 4 events from {since} to {day_later}, 4 new findings; "
        f"{day_later} to {until} stays queued"
    ]
    assert third.findings_by_detector() == {"tests.flaky": 4, "tests.every_read": 0}
    assert queued == {"tests.flaky": {"since": day_later, "until": until}}
    assert fourth.replayed == [f"tests.flaky: 1 event from {day_later} to {until}, 1 new finding"]
    assert fourth.findings_by_detector() == {"tests.flaky": 1, "tests.every_read": 0}
    assert missed_spans(tmp_path) == {}


def test_dry_run_leaves_missed_span_queued(tmp_path: Path, logs: Path) -> None:
    settings = make_settings(tmp_path, **{"tests.flaky": {}})
    FlakyDetector.failing = True
    try:
        run_once(settings, now=NOW)
    finally:
        FlakyDetector.failing = False
    since, until = stored_span(tmp_path)
    add_read(logs, 9, "2026-10-06T12:00:00Z")

    dry = run_once(settings, now=NOW, dry_run=True)

    assert dry.replayed == []
    assert missed_spans(tmp_path) == {"tests.flaky": {"since": since, "until": until}}
