"""Tests of the gcp_logging source against a local entries.list server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import settings_from_mapping
from pipeline.engine import run_once
from pipeline.sources import SourceError, build_source
from pipeline.sources.gcp_logging import GcpLoggingSettings, GcpLoggingSource, build_filter
from pipeline.store.state import State
from tests.sources.gcp_server import LoggingServer
from tests.test_engine import cloudtrail_record

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
DATA_ACCESS = "cloudaudit.googleapis.com%2Fdata_access"
ACTIVITY = "cloudaudit.googleapis.com%2Factivity"


@pytest.fixture(autouse=True)
def _no_default_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the application default chain fail at its first step, before any network probe."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


@pytest.fixture
def server() -> Iterator[LoggingServer]:
    with LoggingServer() as running:
        yield running


def entry(
    project: str,
    number: int,
    *,
    time: str,
    log: str = DATA_ACCESS,
    service: str = "secretmanager.googleapis.com",
) -> dict[str, Any]:
    """Return a Secret Manager audit LogEntry as entries.list returns it."""
    method = "AccessSecretVersion" if log == DATA_ACCESS else "CreateSecret"
    return {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "status": {},
            "authenticationInfo": {"principalEmail": "deploy@example.iam.gserviceaccount.com"},
            "requestMetadata": {"callerIp": "203.0.113.7", "callerSuppliedUserAgent": "gcloud"},
            "serviceName": service,
            "methodName": f"google.cloud.secretmanager.v1.SecretManagerService.{method}",
            "authorizationInfo": [{"permission": "secretmanager.versions.access", "granted": True}],
            "resourceName": f"projects/{project}/secrets/db-{number}/versions/1",
        },
        "insertId": f"{project}-{number:04d}",
        "resource": {"type": "audited_resource", "labels": {"project_id": project}},
        "timestamp": time,
        "severity": "INFO",
        "logName": f"projects/{project}/logs/{log}",
        "receiveTimestamp": time,
    }


def make_source(server: LoggingServer, *projects: str, **settings: Any) -> GcpLoggingSource:
    config = GcpLoggingSettings(
        name="gcp", projects=list(projects or ["alpha"]), api_endpoint=server.url, **settings
    )
    return GcpLoggingSource(config, clock=lambda: NOW)


def add_entries(server: LoggingServer, project: str, count: int, start_minute: int = 0) -> None:
    for number in range(count):
        minute = start_minute + number
        server.add(project, entry(project, number, time=f"2026-12-04T11:{minute:02d}:00.5Z"))


def test_page_chain_followed_to_end(server: LoggingServer) -> None:
    add_entries(server, "alpha", 7)

    batch = make_source(server, page_size=2).read({})

    assert len(server.requests) == 4
    assert [request.get("pageToken") for request in server.requests] == [
        None,
        "offset-2",
        "offset-4",
        "offset-6",
    ]
    assert batch.files_listed == 4
    assert batch.result.records == 7
    assert len(batch.result.events) == 7
    assert batch.result.quarantined == []
    assert batch.problems == []


def test_empty_page_with_token_followed(server: LoggingServer) -> None:
    add_entries(server, "alpha", 3)
    server.state.empty_first_page = True

    batch = make_source(server, page_size=2).read({})

    assert len(server.requests) == 3
    assert batch.result.records == 3


def test_request_filter_and_order(server: LoggingServer) -> None:
    make_source(server, page_size=500).read({})

    (request,) = server.requests
    assert request["resourceNames"] == ["projects/alpha"]
    assert request["orderBy"] == "timestamp asc"
    assert request["pageSize"] == 500
    assert request["filter"] == (
        '(protoPayload.serviceName="secretmanager.googleapis.com")\n'
        'AND (logName="projects/alpha/logs/cloudaudit.googleapis.com%2Factivity" OR '
        'logName="projects/alpha/logs/cloudaudit.googleapis.com%2Fdata_access")\n'
        'AND timestamp>="2026-12-03T12:00:00Z"\n'
        'AND timestamp<"2026-12-04T12:00:00Z"'
    )


def test_filter_lists_every_service() -> None:
    text = build_filter(
        "beta",
        ["secretmanager.googleapis.com", "cloudkms.googleapis.com"],
        datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC),
        datetime(2026, 1, 2, 4, 0, tzinfo=UTC),
    )

    assert text.splitlines()[0] == (
        '(protoPayload.serviceName="secretmanager.googleapis.com" OR '
        'protoPayload.serviceName="cloudkms.googleapis.com")'
    )
    assert text.splitlines()[2] == 'AND timestamp>="2026-01-02T03:04:05.600000Z"'


def test_checkpoint_is_newest_timestamp(server: LoggingServer) -> None:
    add_entries(server, "alpha", 3)
    server.add("alpha", entry("alpha", 50, time="2026-12-04T11:30:00.123456789Z", log=ACTIVITY))

    batch = make_source(server).read({})

    assert batch.checkpoints == {"projects/alpha": {"timestamp": "2026-12-04T11:30:00.123456789Z"}}


def test_next_run_starts_at_checkpoint_minus_lookback(server: LoggingServer) -> None:
    add_entries(server, "alpha", 2)
    source = make_source(server, lookback_minutes=20)
    first = source.read({})
    server.add("alpha", entry("alpha", 9, time="2026-12-04T11:45:00Z"))

    second = source.read(first.checkpoints)

    assert first.checkpoints == {"projects/alpha": {"timestamp": "2026-12-04T11:01:00.500000Z"}}
    assert 'AND timestamp>="2026-12-04T10:41:00.500000Z"' in server.requests[1]["filter"]
    # The overlap re-reads the two entries; the engine drops them by event_uid.
    assert second.result.records == 3
    assert second.checkpoints == {"projects/alpha": {"timestamp": "2026-12-04T11:45:00Z"}}


def test_no_entries_keeps_checkpoint(server: LoggingServer) -> None:
    checkpoints = {"projects/alpha": {"timestamp": "2026-12-04T10:00:00Z"}}

    batch = make_source(server).read(checkpoints)

    assert batch.checkpoints == {}
    assert batch.result.records == 0
    assert batch.files_listed == 1


def test_checkpoint_never_moves_back(server: LoggingServer) -> None:
    server.add("alpha", entry("alpha", 1, time="2026-12-04T11:00:00.123456789Z"))
    stored = {"projects/alpha": {"timestamp": "2026-12-04T11:05:00Z"}}

    same = make_source(server).read(
        {"projects/alpha": {"timestamp": "2026-12-04T11:00:00.123456789Z"}}
    )
    older = make_source(server).read(stored)

    assert same.result.records == 1
    assert same.checkpoints == {}
    assert older.result.records == 1
    assert older.checkpoints == {}


def test_invalid_checkpoint_reads_initial_window(server: LoggingServer) -> None:
    make_source(server, initial_hours=2).read({"projects/alpha": {"timestamp": "yesterday"}})

    assert 'AND timestamp>="2026-12-04T10:00:00Z"' in server.requests[0]["filter"]


def test_project_without_data_access_gets_note(server: LoggingServer) -> None:
    server.add("alpha", entry("alpha", 1, time="2026-12-04T11:00:00Z"))
    server.add("quiet", entry("quiet", 1, time="2026-12-04T11:00:00Z", log=ACTIVITY))

    batch = make_source(server, "alpha", "quiet").read({})

    assert batch.notes == [
        "project quiet returned no Data Access audit entries for secretmanager.googleapis.com "
        "from 2026-12-03T12:00:00Z to 2026-12-04T12:00:00Z. Data Access audit logs are off by "
        "default, so secret reads in this project are probably not logged. Turn on the "
        "DATA_READ log type (and ADMIN_READ for listings and metadata reads) for Secret "
        "Manager in the project's audit config (IAM & Admin > "
        "Audit Logs, or an auditConfigs entry set with `gcloud projects set-iam-policy`)"
    ]
    assert sorted(batch.checkpoints) == ["projects/alpha", "projects/quiet"]


def test_project_with_data_access_has_no_note(server: LoggingServer) -> None:
    server.add("alpha", entry("alpha", 1, time="2026-12-04T11:00:00Z"))

    batch = make_source(server).read({})

    assert batch.notes == []


def test_throttled_read_raises_and_keeps_checkpoint(server: LoggingServer) -> None:
    add_entries(server, "alpha", 5)
    server.fail_next(429)

    with pytest.raises(SourceError) as caught:
        make_source(server).read({"projects/alpha": {"timestamp": "2026-12-04T10:00:00Z"}})

    assert caught.value.source == "gcp"
    assert caught.value.reason == (
        "project alpha: Cloud Logging returned HTTP 429: injected by the test"
    )
    assert caught.value.hint.startswith("the Logging API read quota is used up")
    assert len(server.requests) == 1


def test_failure_on_later_page_raises(server: LoggingServer) -> None:
    add_entries(server, "alpha", 5)
    server.fail_request(2, 503)

    with pytest.raises(SourceError) as caught:
        make_source(server, page_size=2).read({})

    assert caught.value.reason.startswith("project alpha: Cloud Logging returned HTTP 503: ")
    assert len(server.requests) == 2


def test_permission_denied_hint(server: LoggingServer) -> None:
    server.fail_next(403)

    with pytest.raises(SourceError) as caught:
        make_source(server).read({})

    assert "HTTP 403" in caught.value.reason
    assert "roles/logging.privateLogViewer" in caught.value.hint
    assert "logging.privateLogEntries.list" in caught.value.hint


def test_server_error_hint(server: LoggingServer) -> None:
    server.fail_next(500)

    with pytest.raises(SourceError) as caught:
        make_source(server).read({})

    assert "HTTP 500" in caught.value.reason
    assert caught.value.hint == (
        "the Logging API failed on its side; the next run reads from the same checkpoint"
    )


def test_one_failed_project_is_a_problem(server: LoggingServer) -> None:
    add_entries(server, "alpha", 2)
    add_entries(server, "beta", 2)
    add_entries(server, "gamma", 3)
    # beta's request, the second of the run, is refused.
    server.fail_request(2, 403)

    batch = make_source(server, "alpha", "beta", "gamma").read({})

    assert len(batch.problems) == 1
    assert batch.problems[0].startswith("project beta: Cloud Logging returned HTTP 403: ")
    assert "roles/logging.privateLogViewer" in batch.problems[0]
    assert sorted(batch.checkpoints) == ["projects/alpha", "projects/gamma"]
    assert batch.result.records == 5


def test_every_project_failed_raises(server: LoggingServer) -> None:
    server.fail_next(500, 429)

    with pytest.raises(SourceError) as caught:
        make_source(server, "alpha", "beta").read({})

    assert caught.value.reason.startswith("project alpha: Cloud Logging returned HTTP 500: ")
    assert "; project beta: Cloud Logging returned HTTP 429: " in caught.value.reason


def test_backfill_stores_no_checkpoints(server: LoggingServer) -> None:
    add_entries(server, "alpha", 4)

    batch = make_source(server).read(
        {"projects/alpha": {"timestamp": "2026-12-04T11:59:00Z"}},
        since=datetime(2026, 12, 4, 11, 1, tzinfo=UTC),
        until=datetime(2026, 12, 4, 11, 3, tzinfo=UTC),
    )

    assert batch.result.records == 2
    assert batch.checkpoints == {}
    assert 'AND timestamp>="2026-12-04T11:01:00Z"' in server.requests[0]["filter"]
    assert 'AND timestamp<"2026-12-04T11:03:00Z"' in server.requests[0]["filter"]


def test_entry_cap_stops_and_notes(server: LoggingServer) -> None:
    add_entries(server, "alpha", 6)

    batch = make_source(server, page_size=2, max_entries_per_project=3).read({})

    assert len(server.requests) == 2
    assert batch.result.records == 4
    assert batch.checkpoints == {"projects/alpha": {"timestamp": "2026-12-04T11:03:00.500000Z"}}
    assert batch.notes == [
        "project alpha: stopped after 4 entries in 2 pages (max_entries_per_project or "
        "max_pages_per_project) at 2026-12-04T11:03:00.500000Z; the next run continues from there"
    ]


def test_bad_entry_quarantined_with_origin(server: LoggingServer) -> None:
    server.add("alpha", entry("alpha", 1, time="2026-12-04T11:00:00Z"))
    broken = entry("alpha", 2, time="2026-12-04T11:01:00Z")
    broken["protoPayload"]["methodName"] = 17
    server.add("alpha", broken)

    batch = make_source(server).read({})

    assert batch.result.records == 2
    assert len(batch.result.events) == 1
    (quarantined,) = batch.result.quarantined
    assert quarantined.origin == "gcp_logging:projects/alpha page 1 entries[2]"


def test_default_credentials_missing(server: LoggingServer) -> None:
    settings = GcpLoggingSettings(
        name="gcp", projects=["alpha"], api_endpoint="https://127.0.0.1:9"
    )

    with pytest.raises(SourceError) as caught:
        GcpLoggingSource(settings).read({})

    assert caught.value.reason.startswith("no Google Cloud credentials found: ")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.hint
    assert server.requests == []


def test_built_from_settings(server: LoggingServer) -> None:
    source = build_source(
        GcpLoggingSettings(name="gcp", projects=["alpha"], api_endpoint=server.url)
    )

    assert isinstance(source, GcpLoggingSource)
    assert source.read({}).files_listed == 1


@pytest.mark.parametrize("project", ['my"project', "two words", "back\\slash", ""])
def test_settings_reject_unquotable_project(project: str) -> None:
    with pytest.raises(ValidationError):
        GcpLoggingSettings(name="gcp", projects=[project])


def test_settings_reject_repeated_project() -> None:
    with pytest.raises(ValidationError, match="each project may be listed once; repeated: a-1"):
        GcpLoggingSettings(name="gcp", projects=["a-1", "b-2", "a-1"])


def test_engine_keeps_checkpoint_when_throttled(
    server: LoggingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine builds the source with the real clock, so the entries lie in the last hour.
    recent = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    for number in range(3):
        stamp = (recent + timedelta(minutes=number)).isoformat().replace("+00:00", "Z")
        server.add("alpha", entry("alpha", number, time=stamp))
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "trail.json").write_text(
        json.dumps({"Records": [cloudtrail_record(1, time="2026-10-05T08:00:00Z")]}),
        encoding="utf-8",
    )
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [
            {
                "name": "gcp",
                "type": "gcp_logging",
                "projects": ["alpha"],
                "api_endpoint": server.url,
            },
        ],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {},
        "alerting": {"console": False, "outbox": False},
    }
    first = run_once(settings_from_mapping(data, base_dir=tmp_path))
    data["sources"].append({"name": "local", "type": "files", "paths": ["logs"]})
    server.fail_next(429)

    second = run_once(settings_from_mapping(data, base_dir=tmp_path))

    assert first.problems == []
    assert first.events_new == 3
    newest = (recent + timedelta(minutes=2)).isoformat().replace("+00:00", "Z")
    with State(tmp_path / "state" / "state.db", read_only=True) as state:
        assert state.checkpoints("gcp") == {"projects/alpha": {"timestamp": newest}}
        assert len(state.checkpoints("local")) == 1
    assert second.events_new == 1
    assert len(second.problems) == 1
    assert (
        "project alpha: Cloud Logging returned HTTP 429: injected by the test"
        in (second.problems[0])
    )
    (gcp_entry,) = [entry for entry in second.sources if entry.name == "gcp"]
    assert gcp_entry.error is not None
