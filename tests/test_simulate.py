"""Tests of the simulated sample logs: reproducibility, layout, labels and what the reader sees."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.evaluate import load_labels
from pipeline.formats import read_paths
from pipeline.simulate import SimulationReport, generate

PROD = "402857164913"
VAULT_PATH = (
    "resourceId=/SUBSCRIPTIONS/7D1F3C52-6A0E-4B8E-9F21-3C5D8E0A4B17/RESOURCEGROUPS/"
    "RG-PAYMENTS-PROD/PROVIDERS/MICROSOFT.KEYVAULT/VAULTS/KV-PAYMENTS-PROD"
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationReport]:
    out = tmp_path_factory.mktemp("short")
    return out, generate(out, seed=7, days=3)


@pytest.fixture(scope="module")
def month_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationReport]:
    out = tmp_path_factory.mktemp("month")
    return out, generate(out)


def test_same_seed_same_bytes(short_run: tuple[Path, SimulationReport], tmp_path: Path) -> None:
    first, _ = short_run
    generate(tmp_path, seed=7, days=3)
    assert _hashes(tmp_path) == _hashes(first)


def test_other_seed_other_bytes(short_run: tuple[Path, SimulationReport], tmp_path: Path) -> None:
    first, _ = short_run
    generate(tmp_path, seed=8, days=3)
    assert _hashes(tmp_path) != _hashes(first)


def test_days_below_one_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="days must be at least 1, got 0"):
        generate(tmp_path, days=0)


def test_layout_paths(short_run: tuple[Path, SimulationReport]) -> None:
    out, _ = short_run
    trail = out / "aws" / "AWSLogs" / PROD
    logs = sorted((trail / "CloudTrail" / "us-east-1" / "2026" / "10" / "01").glob("*.json.gz"))
    assert logs
    assert logs[0].name.startswith(f"{PROD}_CloudTrail_us-east-1_20261001T")
    assert len(logs[0].name.split("_")[-1]) == len("0123456789abcdef.json.gz")
    assert len(list((trail / "CloudTrail-Digest").rglob("*.json.gz"))) == 2
    assert len(list((trail / "CloudTrail-Insight").rglob("*.json.gz"))) == 1
    assert (trail.parent / "815566230147" / "CloudTrail" / "eu-central-1").is_dir()
    sink = out / "gcp" / "cloudaudit.googleapis.com" / "data_access" / "2026" / "10" / "01"
    assert (sink / "00:00:00_00:59:59_S0.json").is_file()
    assert len(list((out / "gcp" / "gcloud-export").glob("*.json"))) == 1
    blob = out / "azure" / VAULT_PATH / "y=2026" / "m=10" / "d=01" / "h=00" / "m=00" / "PT1H.json"
    assert blob.is_file()
    assert len(list((out / "azure" / "insights-logs-auditevent").rglob("PT1H.json"))) == 1
    assert (out / "labels.json").is_file()
    assert (out / "population.json").is_file()


def test_report_counts(short_run: tuple[Path, SimulationReport]) -> None:
    out, report = short_run
    files = [path for path in out.rglob("*") if path.is_file()]
    assert report.files == len(files)
    assert report.bytes == sum(path.stat().st_size for path in files)
    assert report.principals == 43
    assert len(report.broken) == 3
    assert len(report.incomplete) == 1


def test_native_record_shapes(short_run: tuple[Path, SimulationReport]) -> None:
    out, _ = short_run
    blob = out / "azure" / VAULT_PATH / "y=2026" / "m=10" / "d=01" / "h=00" / "m=00" / "PT1H.json"
    record = json.loads(blob.read_text().splitlines()[0])
    assert record["category"] == "AuditEvent"
    assert record["resultType"] == "Success"
    assert isinstance(record["durationMs"], str)
    assert record["resourceId"] == "/" + VAULT_PATH.removeprefix("resourceId=/")
    sink = out / "gcp" / "cloudaudit.googleapis.com" / "data_access" / "2026" / "10" / "01"
    entry = json.loads((sink / "00:00:00_00:59:59_S0.json").read_text().splitlines()[0])
    assert entry["protoPayload"]["serviceName"] == "secretmanager.googleapis.com"
    assert len(entry["timestamp"].split(".")[1]) == len("123456789Z")
    assert entry["resource"]["type"] == "audited_resource"


def test_month_labels_valid(month_run: tuple[Path, SimulationReport]) -> None:
    out, report = month_run
    labels = load_labels(out / "labels.json")
    assert labels["seed"] == 7
    assert labels["start"] == "2026-10-01"
    assert labels["days"] == 30
    assert len(labels["incidents"]) == 14
    assert len(labels["decoys"]) == 8
    assert len(labels["expected"]) == 1
    assert report.incidents == 14
    assert report.decoys == 8
    assert report.expected == 1


def test_month_incidents_inside_period(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    labels = load_labels(out / "labels.json")
    begin = datetime(2026, 10, 1, tzinfo=UTC)
    end = begin + timedelta(days=30)
    for entry in labels["incidents"] + labels["decoys"] + labels["expected"]:
        start = datetime.fromisoformat(entry["start"])
        finish = datetime.fromisoformat(entry["end"])
        assert begin <= start <= finish < end, entry["id"]


def test_month_incident_detectors(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    labels = load_labels(out / "labels.json")
    expected = {
        "off-hours-maria": ["keytrail.off_hours"],
        "off-hours-lena": ["keytrail.off_hours"],
        "off-hours-holiday-ananya": ["keytrail.off_hours"],
        "new-country-arjun": ["keytrail.new_country"],
        "impossible-travel-jonas": ["keytrail.impossible_travel", "keytrail.new_country"],
        "failure-burst-reporting-etl": ["keytrail.failure_burst"],
        "failure-burst-source-ip": ["keytrail.failure_burst"],
        "volume-spike-checkout": ["keytrail.volume_spike"],
        "mass-retrieval-ci-aws": ["keytrail.mass_retrieval"],
        "mass-retrieval-ci-gcp": ["keytrail.mass_retrieval"],
        "first-seen-slow-reader-priya": ["keytrail.first_seen"],
        "cross-cloud-intruder": ["keytrail.cross_cloud"],
        "off-hours-learned-sofia": ["keytrail.off_hours"],
        "takeover-felix": ["keytrail.risk", "keytrail.isolation_forest"],
    }
    assert {entry["id"]: entry["detectors"] for entry in labels["incidents"]} == expected


def test_month_decoys_and_expected(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    labels = load_labels(out / "labels.json")
    decoys = {entry["id"]: entry["must_not_fire"] for entry in labels["decoys"]}
    expected = {entry["id"]: entry["expected"] for entry in labels["expected"]}
    assert decoys == {
        "decoy-flight-david": [
            "keytrail.impossible_travel",
            "keytrail.new_country",
            "keytrail.off_hours",
        ],
        "decoy-ci-night-deploy": ["keytrail.off_hours"],
        "decoy-misconfigured-invoice-sync": ["keytrail.failure_burst"],
        "decoy-late-sarah": ["keytrail.off_hours"],
        "decoy-quarter-end-batch": ["keytrail.volume_spike"],
        "decoy-new-engineer-noah": ["keytrail.first_seen", "keytrail.risk"],
        "decoy-two-clouds-maria": ["keytrail.cross_cloud"],
        "decoy-night-shift-carlos": ["keytrail.off_hours"],
    }
    assert expected == {
        "expected-night-shift-learning-carlos": ["keytrail.off_hours"],
    }


def test_month_night_shift_split(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    labels = load_labels(out / "labels.json")
    learning = next(e for e in labels["expected"] if e["id"].startswith("expected-night"))
    learned = next(e for e in labels["decoys"] if e["id"] == "decoy-night-shift-carlos")
    # Ten working nights (Columbus Day, 2026-10-12, is a US holiday) before learned hours apply.
    assert learning["start"].startswith("2026-10-01T0")
    assert learning["end"].startswith("2026-10-15T0")
    assert learned["start"].startswith("2026-10-16T0")
    assert learning["end"] < learned["start"]


def test_month_takeover_calls(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    result = read_paths([out / "azure"])
    events = result.events
    felix = events[events["principal"] == "felix.wagner@example.com"]
    odd = felix[felix["user_agent"] == "python-requests/2.32.3"]
    assert len(odd) == 14
    assert int((odd["outcome"] != "success").sum()) == 5
    assert odd["source_ip"].nunique() == 1
    assert odd["source_ip"].iloc[0] not in set(
        felix[felix["user_agent"] != "python-requests/2.32.3"]["source_ip"]
    )


def test_month_mass_retrieval_lists_first(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    events = read_paths([out / "aws"]).events
    ci = events[events["principal"] == "arn:aws:iam::402857164913:role/ci-deploy"]
    day = ci[ci["time"].dt.strftime("%Y-%m-%d") == "2026-10-27"].sort_values("time")
    burst = day[day["time"].dt.hour == 2]
    assert burst["action"].iloc[0] == "list"
    reads = burst[burst["action"] == "read"]
    assert reads["resource"].nunique() == 10


def test_month_population_people(month_run: tuple[Path, SimulationReport]) -> None:
    out, _ = month_run
    rows = json.loads((out / "population.json").read_text())["principals"]
    people = [row for row in rows if row["kind"] == "person"]
    assert len(rows) == 43
    assert len(people) == 22
    assert {row["timezone"] for row in people} == {
        "America/New_York",
        "America/Los_Angeles",
        "Europe/Berlin",
        "Asia/Kolkata",
    }
    assert all(row["holidays_country"] in {"US", "DE", "IN"} for row in people)


def test_reader_sees_three_clouds(short_run: tuple[Path, SimulationReport]) -> None:
    out, report = short_run
    result = read_paths([out / "aws", out / "gcp", out / "azure"])
    clouds = set(result.events["cloud"].unique())
    assert clouds == {"aws", "gcp", "azure"}
    # The gcloud export repeats entries of the sink files; the reader drops those copies.
    assert result.formats["gcp_audit"] == report.records["gcp"] + result.skipped["duplicate"]
    assert result.formats["azure_keyvault"] == report.records["azure"] - 1


def test_reader_quarantines_planted_records(short_run: tuple[Path, SimulationReport]) -> None:
    out, _ = short_run
    result = read_paths([out / "aws", out / "gcp", out / "azure"])
    reasons = sorted(item.reason for item in result.quarantined)
    assert reasons == ["invalid_json", "invalid_json", "invalid_time"]
    origins = sorted(item.origin.removeprefix(str(out) + "/") for item in result.quarantined)
    sink = "gcp/cloudaudit.googleapis.com/data_access/2026/10/02/00:00:00_00:59:59_S0.json"
    assert origins[1:] == [f"{sink} line 3", f"{sink} line 6"]
    assert origins[0].startswith(f"azure/{VAULT_PATH}/y=2026/m=10/d=03/")
    assert result.skipped["incomplete_last_line"] == 1
    assert result.skipped["digest"] == 2
    assert result.skipped["insight"] == 2
