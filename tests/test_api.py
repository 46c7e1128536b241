"""The analyst API: public names, reading logs, history queries, findings, explain, detectors.run."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from rich.console import Console

import detectors
import pipeline
from detectors.base import FINDING_COLUMNS
from pipeline.config import Settings
from pipeline.errors import ConfigError, DetectorError, InputError
from pipeline.schema import COLUMNS, events_from_rows
from pipeline.sources import FilesSourceSettings
from pipeline.store.history import History
from pipeline.store.state import State

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FOLDERS = [ROOT / "sample_logs" / cloud for cloud in ("aws", "gcp", "azure")]

# Findings per detector of the default config's run over sample_logs, 34 in all. Besides the
# labeled incidents, off_hours counts 10 expected findings (a night-shift engineer's first
# nights), and volume_spike the quarter-end batch decoy, which the allow-list keeps out of
# alerts but not out of findings.jsonl.
DEMO_FINDINGS = {
    "keytrail.cross_cloud": 1,
    "keytrail.failure_burst": 2,
    "keytrail.first_seen": 7,
    "keytrail.impossible_travel": 1,
    "keytrail.isolation_forest": 2,
    "keytrail.mass_retrieval": 2,
    "keytrail.new_country": 2,
    "keytrail.off_hours": 14,
    "keytrail.risk": 1,
    "keytrail.volume_spike": 2,
}


def test_pipeline_public_names() -> None:
    assert pipeline.__all__ == [
        "Explanation",
        "HistoryQuery",
        "explain",
        "export",
        "findings",
        "history",
        "load_config",
        "read_logs",
        "run_once",
    ]
    for name in pipeline.__all__:
        assert callable(getattr(pipeline, name)), name


def test_pipeline_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="module 'pipeline' has no attribute 'nothing'"):
        _ = pipeline.nothing


def test_detectors_public_names() -> None:
    assert detectors.__all__ == [
        "FINDING_COLUMNS",
        "SEVERITIES",
        "Detector",
        "DetectorParams",
        "FrameHistory",
        "HistoryView",
        "build_findings",
        "empty_findings",
        "get_detector",
        "registered_detectors",
        "run",
    ]
    for name in detectors.__all__:
        assert hasattr(detectors, name), name


# Fixtures


def cloudtrail_record(event_id: str, time: str, secret: str, **changes: Any) -> dict[str, Any]:
    """Return a CloudTrail GetSecretValue record by IAM user alice from a private address."""
    record: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": "AIDAEXAMPLE0001",
            "arn": "arn:aws:iam::111122223333:user/alice",
            "accountId": "111122223333",
            "userName": "alice",
        },
        "eventTime": time,
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": "eu-west-1",
        "sourceIPAddress": "10.1.2.3",
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": {"secretId": secret},
        "responseElements": None,
        "requestID": f"req-{event_id}",
        "eventID": event_id,
        "readOnly": True,
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": "111122223333",
        "eventCategory": "Management",
    }
    record.update(changes)
    return record


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    """Two CloudTrail files (one gzip'd) with three events, and one file that is not JSON."""
    folder = tmp_path / "logs"
    folder.mkdir()
    first = {
        "Records": [
            cloudtrail_record("evt-2", "2026-03-02T11:00:00Z", "prod/api/key"),
            cloudtrail_record("evt-1", "2026-03-02T10:00:00Z", "prod/db/password"),
        ]
    }
    (folder / "a.json").write_text(json.dumps(first), encoding="utf-8")
    second = {"Records": [cloudtrail_record("evt-3", "2026-03-03T09:30:00Z", "prod/db/password")]}
    (folder / "b.json.gz").write_bytes(gzip.compress(json.dumps(second).encode()))
    (folder / "notes.txt").write_text("not a log\n", encoding="utf-8")
    return folder


def history_rows() -> pd.DataFrame:
    """Five events over two days and two clouds, one of them denied."""
    base = {"account": "111122223333", "action": "read", "outcome": "success"}
    rows = [
        {"event_uid": "e1", "time": "2026-05-01T08:00:00Z", "cloud": "aws", "principal": "alice",
         "resource": "prod/db", "operation": "GetSecretValue", "source_ip": "10.0.0.1"},
        {"event_uid": "e2", "time": "2026-05-01T08:30:00Z", "cloud": "aws", "principal": "alice",
         "resource": "prod/api", "operation": "GetSecretValue", "source_ip": "10.0.0.1"},
        {"event_uid": "e3", "time": "2026-05-01T23:59:59Z", "cloud": "gcp", "principal": "bob",
         "resource": "projects/p/secrets/s", "operation": "AccessSecretVersion",
         "outcome": "failure", "failure_reason": "denied"},
        {"event_uid": "e4", "time": "2026-05-02T00:00:00Z", "cloud": "gcp", "principal": "bob",
         "resource": "projects/p/secrets/s", "operation": "AccessSecretVersion"},
        {"event_uid": "e5", "time": "2026-05-02T12:00:00Z", "cloud": "aws", "principal": "o'hara",
         "resource": "prod/db", "operation": "GetSecretValue"},
    ]  # fmt: skip
    return events_from_rows([{**base, **row} for row in rows])


@pytest.fixture
def small_history(tmp_path: Path) -> Iterator[pipeline.HistoryQuery]:
    root = tmp_path / "state" / "history"
    History(root).append(history_rows(), "run-1")
    query = pipeline.HistoryQuery(root)
    yield query
    query.close()


def demo_config(work: Path) -> Settings:
    return pipeline.load_config(base_dir=ROOT, state_dir=work / "state", output_dir=work / "out")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Run the shipped defaults once over sample_logs, with state in a temporary folder."""
    config = demo_config(tmp_path_factory.mktemp("demo"))
    pipeline.run_once(config, console=Console(quiet=True))
    return config


@pytest.fixture(scope="module")
def demo_events() -> pd.DataFrame:
    return pipeline.read_logs(SAMPLE_FOLDERS, progress=False)


# load_config


def test_load_config_defaults_resolve_base_dir(tmp_path: Path) -> None:
    config = pipeline.load_config(base_dir=tmp_path)

    assert config.state_dir == tmp_path.resolve() / ".keytrail"
    source = config.sources[0]
    assert isinstance(source, FilesSourceSettings)
    assert source.name == "sample_logs"
    assert source.paths[0] == tmp_path.resolve() / "sample_logs" / "aws"


def test_load_config_overrides_state_dir(tmp_path: Path) -> None:
    config = pipeline.load_config(ROOT / "config.yaml", state_dir=tmp_path / "s")

    assert config.state_dir == (tmp_path / "s").resolve()
    assert config.output_dir == ROOT / ".keytrail" / "output"


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        pipeline.load_config(tmp_path / "absent.yaml")


# read_logs


def test_read_logs_folder_sorted_by_time(log_folder: Path) -> None:
    events = pipeline.read_logs(log_folder, progress=False)

    assert list(events.columns) == list(COLUMNS)
    assert events["event_uid"].tolist() == ["evt-1", "evt-2", "evt-3"]
    assert events["principal"].tolist() == ["alice", "alice", "alice"]
    assert str(events["time"].dtype) == "datetime64[us, UTC]"


def test_read_logs_returns_quarantine(log_folder: Path) -> None:
    events, quarantined = pipeline.read_logs(log_folder, return_quarantine=True, progress=True)

    assert len(events) == 3
    assert list(quarantined.columns) == ["origin", "reason", "detail", "raw"]
    assert quarantined["reason"].tolist() == ["not_json"]
    assert quarantined["origin"].tolist() == [str(log_folder / "notes.txt")]


def test_read_logs_since_until(log_folder: Path) -> None:
    events = pipeline.read_logs(
        log_folder, since="2026-03-02T10:30:00", until=datetime(2026, 3, 3, 9, 30, tzinfo=UTC)
    )

    assert events["event_uid"].tolist() == ["evt-2"]


def test_read_logs_geoip_fills_public_rows(tmp_path: Path) -> None:
    record = cloudtrail_record("evt-9", "2026-03-02T10:00:00Z", "s", sourceIPAddress="8.8.8.8")
    (tmp_path / "one.json").write_text(json.dumps({"Records": [record]}), encoding="utf-8")

    enriched = pipeline.read_logs(tmp_path / "one.json")
    plain = pipeline.read_logs(tmp_path / "one.json", geoip=False)

    assert enriched["source_kind"].tolist() == ["public"]
    assert enriched["geo_country"].notna().tolist() == [True]
    assert plain["geo_country"].isna().tolist() == [True]


def test_read_logs_named_source(log_folder: Path, tmp_path: Path) -> None:
    config = pipeline.load_config(base_dir=tmp_path)
    config = config.model_copy(
        update={"sources": [config.sources[0].model_copy(update={"paths": [log_folder]})]}
    )

    events = pipeline.read_logs("sample_logs", config=config, geoip=False)

    assert len(events) == 3


def test_read_logs_unknown_name(tmp_path: Path) -> None:
    config = pipeline.load_config(base_dir=tmp_path)

    with pytest.raises(InputError) as caught:
        pipeline.read_logs("nowhere", config=config)

    assert str(caught.value) == (
        "'nowhere' is neither an existing path nor a source of the config (sources: sample_logs)"
    )


def test_read_logs_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="log path not found"):
        pipeline.read_logs(tmp_path / "absent")


# history


def test_history_events_match_parquet_reader(small_history: pipeline.HistoryQuery) -> None:
    expected = History(small_history.root).events()

    frame = small_history.events()

    pd.testing.assert_frame_equal(frame, expected)
    assert frame["event_uid"].tolist() == ["e1", "e2", "e3", "e4", "e5"]


def test_history_events_range_columns_where(small_history: pipeline.HistoryQuery) -> None:
    frame = small_history.events(
        since="2026-05-01T08:30:00Z",
        until="2026-05-02T12:00:00Z",
        columns=["event_uid", "principal"],
        where="cloud = 'gcp' OR principal = 'alice'",
    )

    assert list(frame.columns) == ["event_uid", "principal"]
    assert frame["event_uid"].tolist() == ["e2", "e3", "e4"]
    assert str(frame["principal"].dtype) == "string"


def test_history_events_rejects_unknown_column(small_history: pipeline.HistoryQuery) -> None:
    with pytest.raises(ValueError, match=r"unknown history columns \['date'\]"):
        small_history.events(columns=["date"])


def test_history_events_rejects_statement_in_where(small_history: pipeline.HistoryQuery) -> None:
    with pytest.raises(ValueError, match="where must be one condition"):
        small_history.events(where="true; DROP VIEW events")


def test_history_sql_groups_by_partition(small_history: pipeline.HistoryQuery) -> None:
    result = small_history.sql(
        "SELECT date, cloud, count(*) AS n, min(time) AS first FROM events "
        "GROUP BY ALL ORDER BY date, cloud"
    )

    assert result["cloud"].tolist() == ["aws", "gcp", "aws", "gcp"]
    assert result["n"].tolist() == [2, 1, 1, 1]
    assert result["first"].tolist()[1] == pd.Timestamp("2026-05-01T23:59:59Z")
    assert str(result["first"].dtype) == "datetime64[us, UTC]"


def test_history_sql_parameters(small_history: pipeline.HistoryQuery) -> None:
    result = small_history.sql(
        "SELECT event_uid FROM events WHERE principal = $who", params={"who": "o'hara"}
    )

    assert result["event_uid"].tolist() == ["e5"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("COPY (SELECT 1) TO 'out.csv'", "expected a SELECT or EXPLAIN statement, found COPY"),
        ("CREATE TABLE t AS SELECT 1", "expected a SELECT or EXPLAIN statement, found CREATE"),
        ("SET TimeZone = 'Europe/Berlin'", "expected a SELECT or EXPLAIN statement, found SET"),
        ("SELECT 1; SELECT 2", "expected one SQL statement, found 2"),
        ("SELEC 1", "invalid SQL"),
    ],
)
def test_history_sql_read_only(
    small_history: pipeline.HistoryQuery, query: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        small_history.sql(query)


def test_history_sql_unknown_column(small_history: pipeline.HistoryQuery) -> None:
    with pytest.raises(duckdb.Error):
        small_history.sql("SELECT nothing FROM events")


def test_history_rollup_view_counts_hours(small_history: pipeline.HistoryQuery) -> None:
    result = small_history.sql(
        "SELECT hour, principal, sum(count) AS n FROM rollup GROUP BY ALL ORDER BY hour"
    )

    assert result["hour"].tolist() == [
        pd.Timestamp("2026-05-01T08:00:00Z"),
        pd.Timestamp("2026-05-01T23:00:00Z"),
        pd.Timestamp("2026-05-02T00:00:00Z"),
        pd.Timestamp("2026-05-02T12:00:00Z"),
    ]
    assert result["n"].tolist() == [2, 1, 1, 1]


def test_history_rollup_method_matches_frame(small_history: pipeline.HistoryQuery) -> None:
    expected = detectors.FrameHistory(history_rows()).rollup(columns=["principal", "count"])

    result = small_history.rollup(columns=["principal", "count"])

    assert dict(zip(result["principal"], result["count"], strict=True)) == dict(
        zip(expected["principal"], expected["count"], strict=True)
    )
    assert dict(zip(result["principal"], result["count"], strict=True)) == {
        "alice": 2,
        "bob": 2,
        "o'hara": 1,
    }


def test_history_empty_then_appended(tmp_path: Path) -> None:
    root = tmp_path / "history"
    with pipeline.HistoryQuery(root) as query:
        empty = query.events()
        counted = query.sql("SELECT count(*) AS n FROM events")
        History(root).append(history_rows(), "run-1")
        after = query.sql("SELECT count(*) AS n FROM events")

    assert list(empty.columns) == list(COLUMNS)
    assert len(empty) == 0
    assert counted["n"].tolist() == [0]
    assert after["n"].tolist() == [5]


def test_history_of_config(tmp_path: Path) -> None:
    config = pipeline.load_config(base_dir=tmp_path, state_dir=tmp_path / "kt")

    assert pipeline.history(config).root == (tmp_path / "kt").resolve() / "history"


# findings


def test_findings_of_demo(demo: Settings) -> None:
    found = pipeline.findings(demo)

    assert list(found.columns) == list(FINDING_COLUMNS)
    assert found["detector"].value_counts().to_dict() == DEMO_FINDINGS
    assert found["first_seen"].is_monotonic_increasing
    assert str(found["last_seen"].dtype) == "datetime64[us, UTC]"


def test_findings_since_until(demo: Settings) -> None:
    found = pipeline.findings(demo, since="2026-10-20", until="2026-10-23")

    assert found["detector"].tolist() == [
        "keytrail.off_hours",
        "keytrail.new_country",
        "keytrail.off_hours",
        "keytrail.cross_cloud",
    ]


def test_findings_include_pending_and_skip_duplicates(tmp_path: Path) -> None:
    config = pipeline.load_config(base_dir=tmp_path)
    finding = {
        "finding_id": "f1",
        "detector": "keytrail.off_hours",
        "severity": "medium",
        "principal": "alice",
        "first_seen": "2026-05-01T08:00:00Z",
        "last_seen": "2026-05-01T09:00:00Z",
        "event_count": 2,
        "event_uids": ["e1", "e2"],
    }
    pending = {**finding, "finding_id": "f2", "first_seen": "2026-05-01T07:00:00Z"}
    config.output_dir.mkdir(parents=True)
    line = json.dumps(finding) + "\n"
    (config.output_dir / "findings.jsonl").write_text(line + line, encoding="utf-8")
    with State(config.state_dir / "state.db") as state:
        state.commit_run(
            "run-1",
            started=datetime(2026, 5, 1, tzinfo=UTC),
            events=history_rows().iloc[:0],
            findings=pd.DataFrame(
                [{"finding_id": "f2", "detector": "keytrail.off_hours", "dedup_key": "k2"}]
            ),
            checkpoints={},
            summary={},
            pending_outputs={"f2": json.dumps(pending)},
        )

    found = pipeline.findings(config)

    assert found["finding_id"].tolist() == ["f2", "f1"]
    assert found["event_count"].tolist() == [2, 2]


def test_findings_without_state(tmp_path: Path) -> None:
    found = pipeline.findings(pipeline.load_config(base_dir=tmp_path))

    assert list(found.columns) == list(FINDING_COLUMNS)
    assert len(found) == 0


# explain


def test_explain_demo_off_hours(demo: Settings) -> None:
    found = pipeline.findings(demo)
    finding = found[found["principal"] == "maria.lopez@example.com"].iloc[0]

    explained = pipeline.explain(finding, demo)

    assert sorted(explained.events["event_uid"]) == sorted(finding["event_uids"])
    assert explained.events["time"].is_monotonic_increasing
    assert len(explained.events) == 4
    assert explained.evidence["local_times"] == ["03:05", "03:14", "03:26", "03:38"]
    assert explained.baseline["off_hours_days"] == 0
    assert set(explained.baseline_events["principal"]) == {"maria.lopez@example.com"}
    assert explained.baseline_events["time"].max() < finding["first_seen"]
    assert repr(explained).splitlines()[0] == f"medium keytrail.off_hours: {finding['title']}"


def test_explain_by_id_matches_row(demo: Settings) -> None:
    finding = pipeline.findings(demo).iloc[-1]

    by_id = pipeline.explain(str(finding["finding_id"]), demo)

    assert by_id.finding["finding_id"] == finding["finding_id"]
    assert sorted(by_id.events["event_uid"].unique()) == sorted(finding["event_uids"])


def test_explain_unknown_id(demo: Settings) -> None:
    with pytest.raises(KeyError, match="finding 'nope' not found"):
        pipeline.explain("nope", demo)


def test_explain_html_escapes_log_text() -> None:
    events = history_rows()
    finding = {
        "detector": "keytrail.off_hours",
        "severity": "high",
        "title": "<script>alert(1)</script>",
        "principal": "o'hara",
        "first_seen": pd.Timestamp("2026-05-02T12:00:00Z"),
        "last_seen": pd.Timestamp("2026-05-02T12:00:00Z"),
        "event_uids": ["e5"],
        "evidence": {"note": "<b>x</b>"},
        "baseline": {},
    }

    explained = pipeline.explain(finding, history=events)
    page = explained._repr_html_()

    assert explained.events["event_uid"].tolist() == ["e5"]
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


# detectors.run


def test_run_matches_demo_findings(demo: Settings, demo_events: pd.DataFrame) -> None:
    found = detectors.run(demo_events)

    assert list(found.columns) == list(FINDING_COLUMNS)
    assert found["detector"].value_counts().to_dict() == DEMO_FINDINGS
    assert set(found["finding_id"]) == set(pipeline.findings(demo)["finding_id"])


def test_run_params_replace_config_values(demo_events: pd.DataFrame) -> None:
    found = detectors.run(
        demo_events,
        detectors=["keytrail.failure_burst"],
        params={"keytrail.failure_burst": {"min_failures": 13}},
    )

    assert found["principal"].tolist() == ["reporting-etl@kt-data-5522.iam.gserviceaccount.com"]
    assert found["event_count"].tolist() == [15]


def test_run_history_before_window_only(demo_events: pd.DataFrame) -> None:
    alone = detectors.run(demo_events, detectors=["keytrail.new_country"])
    with_itself = detectors.run(
        demo_events, history=demo_events, detectors=["keytrail.new_country"]
    )

    assert with_itself["finding_id"].tolist() == alone["finding_id"].tolist()


def test_run_with_history_query(small_history: pipeline.HistoryQuery) -> None:
    window = history_rows().iloc[3:]

    found = detectors.run(window, history=small_history, detectors=["keytrail.failure_burst"])

    assert len(found) == 0


def test_run_invalid_param_message(demo_events: pd.DataFrame) -> None:
    with pytest.raises(ConfigError) as caught:
        detectors.run(
            demo_events,
            detectors=["keytrail.failure_burst"],
            params={"keytrail.failure_burst": {"min_failures": 0, "colour": "red"}},
        )

    assert caught.value.problems == [
        "detectors.keytrail.failure_burst.min_failures: Input should be greater than or equal "
        "to 2 (found: 0)",
        "detectors.keytrail.failure_burst.colour: unknown key; allowed keys: min_failures, "
        "window_minutes, reasons, keys, high_distinct_secrets, success_within_minutes",
    ]


def test_run_unknown_detector(demo_events: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"detectors\.keytrail\.nothing: unknown detector"):
        detectors.run(demo_events, detectors=["keytrail.nothing"])


def test_run_params_for_detector_not_run(demo_events: pd.DataFrame) -> None:
    with pytest.raises(ValueError) as caught:
        detectors.run(
            demo_events,
            detectors=["keytrail.off_hours"],
            params={"keytrail.failure_burst": {"min_failures": 5}},
        )

    assert str(caught.value) == (
        "params given for detectors that do not run: keytrail.failure_burst; "
        "running: keytrail.off_hours"
    )


def test_run_empty_frame() -> None:
    found = detectors.run(history_rows().iloc[:0])

    assert list(found.columns) == list(FINDING_COLUMNS)
    assert len(found) == 0


def test_run_wraps_detector_exception() -> None:
    broken = history_rows().drop(columns=["outcome"])

    with pytest.raises(DetectorError, match=r"keytrail\.failure_burst.*KeyError"):
        detectors.run(broken, detectors=["keytrail.failure_burst"])


def test_detector_alone_matches_run(demo_events: pd.DataFrame) -> None:
    detector = detectors.get_detector("keytrail.failure_burst")(min_failures=13)
    now = pd.Timestamp("2026-11-01T00:00:00Z")

    alone = detector.detect(demo_events, detectors.FrameHistory(), now)
    through_run = detectors.run(
        demo_events,
        detectors=["keytrail.failure_burst"],
        params={"keytrail.failure_burst": {"min_failures": 13}},
        now=now,
    )

    assert alone["finding_id"].tolist() == through_run["finding_id"].tolist()
