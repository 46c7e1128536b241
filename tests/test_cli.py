"""Tests of the keytrail command: run, normalize, validate-config and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import EXIT_CONFIG, EXIT_LOCKED, EXIT_OK, EXIT_PROBLEMS, main
from pipeline.schema import ARROW_SCHEMA
from pipeline.store.state import state_lock
from tests.test_engine import write_logs

CONFIG = """\
state_dir: state
output_dir: out
sources:
  - {name: local, type: files, paths: [logs]}
enrich: {geoip: {enabled: false}}
detectors:
  tests.every_read: {enabled: true}
alerting: {console: false, outbox: false}
logging: {level: WARNING}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_logs(tmp_path / "logs")
    (tmp_path / "config.yaml").write_text(CONFIG, encoding="utf-8")
    return tmp_path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_run_writes_findings_and_summary(workdir: Path) -> None:
    summary_path = workdir / "summary.json"

    code, stdout, _ = invoke(
        "run", "--config", str(workdir / "config.yaml"), "--summary-json", str(summary_path)
    )

    assert code == EXIT_OK
    assert "keytrail run" in stdout
    printed = [line.rstrip() for line in stdout.splitlines()]
    assert "source local" in printed
    assert "  records          5" in printed
    assert "  quarantined      1" in printed
    assert "    invalid_json   1" in printed
    assert "  tests.every_read         4    4" in printed
    assert "events      4 read, 4 new, 0 already seen" in printed
    lines = (workdir / "out" / "findings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["records_read"] == 5
    assert summary["events_read"] == 4
    assert summary["events_new"] == 4
    assert summary["quarantined"] == 1
    assert summary["quarantined_by_reason"] == {"invalid_json": 1}
    assert summary["skipped_by_kind"] == {}
    assert summary["findings_by_detector"] == {"tests.every_read": 4}
    assert summary["status"] == "completed"


def test_second_run_finds_nothing_new(workdir: Path) -> None:
    config = str(workdir / "config.yaml")
    invoke("run", "--config", config)
    summary_path = workdir / "second.json"

    code, _, _ = invoke("run", "--config", config, "--summary-json", str(summary_path))

    assert code == EXIT_OK
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["events_new"] == 0
    assert summary["findings_by_detector"] == {"tests.every_read": 0}


def test_run_overrides_dirs_and_sources(workdir: Path) -> None:
    code, _, _ = invoke(
        "run",
        "--config",
        str(workdir / "config.yaml"),
        "--source",
        str(workdir / "logs" / "gcp"),
        "--state-dir",
        str(workdir / "other-state"),
        "--output-dir",
        str(workdir / "other-out"),
    )

    assert code == EXIT_OK
    assert (workdir / "other-state" / "state.db").exists()
    lines = (workdir / "other-out" / "findings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1


def test_fail_on_quarantine_exit_code(workdir: Path) -> None:
    code, _, _ = invoke(
        "run", "--config", str(workdir / "config.yaml"), "--fail-on-quarantine", "--dry-run"
    )

    assert code == EXIT_PROBLEMS


def test_detector_failure_exit_code(workdir: Path) -> None:
    config = workdir / "config.yaml"
    config.write_text(
        CONFIG.replace(
            "  tests.every_read: {enabled: true}\n",
            "  tests.every_read: {enabled: true}\n  tests.broken: {enabled: true}\n",
        ),
        encoding="utf-8",
    )

    code, stdout, _ = invoke("run", "--config", str(config))

    assert code == EXIT_PROBLEMS
    assert "detector tests.broken: RuntimeError: baseline table missing" in stdout


def test_lock_held_exit_code(workdir: Path) -> None:
    with state_lock(workdir / "state"):
        code, _, stderr = invoke("run", "--config", str(workdir / "config.yaml"))

    assert code == EXIT_LOCKED
    assert stderr.startswith(f"error: another keytrail run holds the lock on {workdir / 'state'}")


def test_missing_config_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"

    code, _, stderr = invoke("run", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr == (
        f"error: invalid config {path}: config file not found: {path}; pass --config FILE or "
        "run from the folder that contains config.yaml\n"
    )


def test_validate_config_valid(workdir: Path) -> None:
    path = workdir / "config.yaml"

    code, stdout, _ = invoke("validate-config", "--config", str(path))

    assert code == EXIT_OK
    assert stdout == f"{path} is valid: 1 sources, 1 detectors enabled\n"


def test_validate_config_lists_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "state_dirr: x\nhistory: {retention_days: -1}\nsources: []\ndetectors: {}\n",
        encoding="utf-8",
    )

    code, _, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr.splitlines() == [
        f"error: invalid config {path}: 2 problems",
        "  - history.retention_days: Input should be greater than or equal to 1 (found: -1)",
        "  - state_dirr: unknown key; allowed keys: state_dir, output_dir, sources, enrich, "
        "history, detectors, alerting, logging",
    ]


def test_validate_config_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# nothing configured yet\n", encoding="utf-8")

    code, _, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr == (
        f"error: invalid config {path}: config file is empty; expected at least the keys "
        "sources and detectors (see the config.yaml shipped with keytrail)\n"
    )


def test_validate_config_missing_geoip_db(workdir: Path) -> None:
    path = workdir / "config.yaml"
    path.write_text(
        CONFIG.replace("{enabled: false}", "{city_db: /nonexistent.mmdb}"), encoding="utf-8"
    )

    code, _, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr == (
        f"error: invalid config {path}: enrich.geoip.city_db: file not found: "
        "/nonexistent.mmdb; expected the path of a MaxMind DB (.mmdb) file\n"
    )


def test_validate_config_warns_empty_lists(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("sources: []\ndetectors: {}\nenrich: {geoip: {enabled: false}}\n")

    code, stdout, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_OK
    assert stdout == f"{path} is valid: 0 sources, 0 detectors enabled\n"
    assert stderr.splitlines() == [
        "warning: sources is empty: `keytrail run` reads only the paths given with --source",
        "warning: detectors: no detector is listed, so runs record events but produce no findings",
    ]


def test_run_symlink_loop_and_fifo(workdir: Path) -> None:
    loop = workdir / "logs" / "loop"
    loop.mkdir()
    (loop / "self").symlink_to("self")
    os.mkfifo(workdir / "logs" / "pipe.json")
    summary_path = workdir / "summary.json"

    code, _, _ = invoke(
        "run", "--config", str(workdir / "config.yaml"), "--summary-json", str(summary_path)
    )

    # Quarantined and skipped paths are counted; only --fail-on-quarantine makes them an error.
    assert code == EXIT_OK
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["quarantined_by_reason"] == {"invalid_json": 1, "unreadable_file": 1}
    assert summary["skipped_by_kind"] == {"not_a_regular_file": 1}
    assert summary["events_new"] == 4


def test_bad_option_exit_code(workdir: Path) -> None:
    code, _, stderr = invoke("run", "--no-such-option")

    assert code == EXIT_CONFIG
    assert stderr.splitlines()[0] == "Usage: keytrail run [OPTIONS]"
    assert stderr.splitlines()[-1] == "Error: No such option '--no-such-option'."


def test_normalize_writes_parquet(workdir: Path) -> None:
    out = workdir / "events.parquet"
    summary_path = workdir / "normalize.json"

    code, stdout, _ = invoke(
        "normalize",
        str(workdir / "logs"),
        "--out",
        str(out),
        "--summary-json",
        str(summary_path),
        "--no-geoip",
    )

    assert code == EXIT_OK
    assert stdout == f"wrote 4 events from 5 records in 3 files to {out} (1 quarantined)\n"
    table = pq.read_table(out)
    assert table.num_rows == 4
    assert table.schema.remove_metadata().equals(ARROW_SCHEMA)
    counts = json.loads(summary_path.read_text(encoding="utf-8"))
    assert counts["quarantined_by_reason"] == {"invalid_json": 1}
    assert counts["records_by_format"] == {"azure_keyvault": 1, "cloudtrail": 2, "gcp_audit": 1}


def test_help_documents_exit_codes() -> None:
    code, stdout, _ = invoke("--help")

    assert code == EXIT_OK
    assert "4  another keytrail run holds the lock on the state directory" in stdout
