"""Tests of the keytrail command: run, normalize, validate-config and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import EXIT_CONFIG, EXIT_DELIVERY, EXIT_LOCKED, EXIT_OK, EXIT_PROBLEMS, main
from pipeline.schema import ARROW_SCHEMA
from pipeline.store.state import state_lock
from tests.test_delivery import SlackPeer
from tests.test_delivery import slack_peer as slack_peer  # the fixture
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
    assert "  tests.every_read         4    4                   -" in printed
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
        "history, detectors, alerting, logging, schedule",
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


MAIL_RECEIVER = (
    "sources: []\ndetectors: {}\nenrich: {geoip: {enabled: false}}\n"
    "alerting:\n"
    "  receivers:\n"
    "    mail:\n"
    "      email: {host: smtp.example.com, port: 465, security: starttls,\n"
    "              sender: keytrail@example.com, recipients: [soc@example.com]}\n"
    "  routing: {default_receiver: mail}\n"
)


def test_validate_config_smtp_port_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MAIL_RECEIVER, encoding="utf-8")

    code, _, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr.startswith(
        f"error: invalid config {path}: alerting.receivers.mail: email.security: port 465 "
        "expects implicit TLS but security is 'starttls'; set security: tls, or use port 587 "
        "with starttls"
    )


def test_validate_config_smtp_port_fits(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MAIL_RECEIVER.replace("security: starttls", "security: tls"))

    code, stdout, _ = invoke("validate-config", "--config", str(path))

    assert code == EXIT_OK
    assert stdout == f"{path} is valid: 0 sources, 0 detectors enabled\n"


def test_validate_config_warns_unset_secret_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KT_TEST_HOOK", raising=False)
    monkeypatch.setenv("KT_TEST_SMTP_PASSWORD", "set-in-this-shell")
    path = tmp_path / "config.yaml"
    path.write_text(
        MAIL_RECEIVER.replace("port: 465, security: starttls", "username: keytrail")
        .replace("sender:", "password_env: KT_TEST_SMTP_PASSWORD, sender:")
        .replace("  routing:", "    chat: {slack: {webhook_url_env: KT_TEST_HOOK}}\n  routing:"),
        encoding="utf-8",
    )

    code, stdout, stderr = invoke("validate-config", "--config", str(path))

    assert code == EXIT_OK
    assert stdout == f"{path} is valid: 0 sources, 0 detectors enabled\n"
    assert stderr.splitlines()[2:] == [
        "warning: alerting.receivers.chat.slack.webhook_url_env: environment variable "
        "KT_TEST_HOOK is not set here; the receiver's deliveries fail until it is set where "
        "`keytrail run` runs",
    ]


def test_backtest_unknown_detector_names_flag(workdir: Path) -> None:
    code, _, stderr = invoke(
        "backtest",
        "--config",
        str(workdir / "config.yaml"),
        "--since",
        "2026-10-01",
        "--until",
        "2026-10-02",
        "--detectors",
        "keytrail.nope",
    )

    assert code == EXIT_CONFIG
    assert "Error: Invalid value for --detectors: unknown detector 'keytrail.nope'; " in stderr
    assert "known: keytrail.cross_cloud, keytrail.failure_burst," in stderr
    assert "detectors.run" not in stderr


def test_config_help_without_source_hint() -> None:
    # Only `run` has --source; the shared --config help must not send readers to it.
    for command in ("schedule", "evaluate", "backtest", "validate-config", "test-alert"):
        code, stdout, _ = invoke(command, "--help")
        assert code == EXIT_OK, command
        assert "give --source" not in stdout, command


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
    assert stdout == (
        f"wrote 4 events from 5 records in 3 files to {out} "
        "(1 quarantined; pass --quarantine FILE to keep them)\n"
    )
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


def test_run_without_config_uses_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = write_logs(tmp_path / "logs")
    monkeypatch.chdir(tmp_path)

    code, stdout, stderr = invoke(
        "run",
        "--source",
        str(logs),
        "--state-dir",
        str(tmp_path / "state"),
        "--output-dir",
        str(tmp_path / "out"),
        "--log-level",
        "INFO",
    )

    assert code == EXIT_OK
    assert (
        f"INFO pipeline.cli: no --config given and config.yaml not found in {tmp_path}: "
        "using the built-in defaults"
    ) in stderr
    words = [" ".join(line.split()) for line in stdout.splitlines()]
    assert "events 4 read, 4 new, 0 already seen" in words
    assert (tmp_path / "state" / "state.db").is_file()
    assert (tmp_path / "out" / "findings.jsonl").is_file()


def test_run_without_config_needs_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    code, stdout, stderr = invoke("run")

    assert code == EXIT_CONFIG
    assert stdout == ""
    assert stderr.splitlines()[-1] == (
        f"Error: no config file: --config was not given and config.yaml is not in {tmp_path}; "
        "pass --source PATH (repeatable) to read logs with the built-in defaults, or "
        "--config FILE"
    )
    assert not (tmp_path / ".keytrail").exists()


def test_run_prefers_config_in_folder(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)

    code, _, _ = invoke("run")

    assert code == EXIT_OK
    assert len((workdir / "out" / "findings.jsonl").read_text(encoding="utf-8").splitlines()) == 4


def test_evaluate_without_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text('{"incidents": [], "decoys": []}', encoding="utf-8")
    findings = tmp_path / "findings.jsonl"
    findings.write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    code, stdout, stderr = invoke(
        "evaluate", "--labels", str(labels), "--findings", str(findings), "--json"
    )

    assert code == EXIT_OK, stderr
    assert isinstance(json.loads(stdout), dict)


def test_evaluate_missing_explicit_config(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    code, _, stderr = invoke("evaluate", "--config", str(path))

    assert code == EXIT_CONFIG
    assert stderr.startswith(f"error: invalid config {path}: config file not found: {path}")


def test_run_without_findings_creates_file(workdir: Path) -> None:
    (workdir / "empty").mkdir()

    code, stdout, _ = invoke(
        "run", "--config", str(workdir / "config.yaml"), "--source", str(workdir / "empty")
    )

    path = workdir / "out" / "findings.jsonl"
    assert code == EXIT_OK
    assert f"outputs   0 findings appended to {path}" in stdout.splitlines()
    assert path.read_bytes() == b""


def test_piped_output_keeps_long_paths(workdir: Path) -> None:
    output_dir = workdir / ("a-very-long-output-folder-name-" * 3) / "out"

    code, stdout, _ = invoke(
        "run", "--config", str(workdir / "config.yaml"), "--output-dir", str(output_dir)
    )

    assert code == EXIT_OK
    lines = stdout.splitlines()
    assert f"outputs     4 findings appended to {output_dir / 'findings.jsonl'}" in lines
    assert [line for line in lines if line != line.rstrip()] == []


def test_normalize_quarantine_file(workdir: Path) -> None:
    out = workdir / "events.parquet"
    quarantine = workdir / "bad" / "quarantined.jsonl"

    code, stdout, _ = invoke(
        "normalize",
        str(workdir / "logs"),
        "--out",
        str(out),
        "--no-geoip",
        "--quarantine",
        str(quarantine),
    )

    assert code == EXIT_OK
    assert stdout == (
        f"wrote 4 events from 5 records in 3 files to {out} "
        f"(1 quarantined, written to {quarantine})\n"
    )
    entries = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert len(entries) == 1
    assert sorted(entries[0]) == ["detail", "origin", "raw", "reason"]
    assert entries[0]["origin"] == f"{workdir / 'logs' / 'aws' / 'trail.jsonl'} line 2"
    assert entries[0]["reason"] == "invalid_json"
    assert entries[0]["raw"] == '{"eventVersion": "1.09", "eventID": '


def test_log_format_after_command(workdir: Path) -> None:
    code, _, stderr = invoke(
        "run",
        "--config",
        str(workdir / "config.yaml"),
        "--log-format",
        "json",
        "--log-level",
        "INFO",
    )

    assert code == EXIT_OK
    records = [json.loads(line) for line in stderr.splitlines()]
    assert any(record.get("message", "").startswith("run ") for record in records)


def test_log_option_after_command_wins(workdir: Path) -> None:
    code, _, stderr = invoke(
        "--log-level",
        "INFO",
        "run",
        "--config",
        str(workdir / "config.yaml"),
        "--log-level",
        "ERROR",
    )

    assert code == EXIT_OK
    assert stderr == ""


def test_help_describes_keytrail() -> None:
    code, stdout, _ = invoke("--help")

    assert code == EXIT_OK
    assert "``" not in stdout
    assert "keytrail reads secret-access audit logs" in stdout
    assert "`keytrail --log-format json run` and `keytrail" in stdout


def test_subcommand_help_lists_log_options() -> None:
    for command in ("run", "normalize", "simulate", "evaluate", "validate-config"):
        code, stdout, _ = invoke(command, "--help")

        assert code == EXIT_OK
        assert "--log-level" in stdout, command
        assert "--log-format" in stdout, command


def test_simulate_prints_run_command(tmp_path: Path) -> None:
    out = tmp_path / "sim"

    code, stdout, _ = invoke("simulate", "--out", str(out), "--days", "3")

    assert code == EXIT_OK
    lines = stdout.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("wrote 403 files (")
    assert lines[0].count("wrote") == 1
    assert lines[1] == "run keytrail on them with:"
    state = out / ".keytrail"
    assert lines[2] == (
        f"  keytrail run --source {out / 'aws'} --source {out / 'gcp'} --source {out / 'azure'} "
        f"--state-dir {state} --output-dir {state}/output"
    )
    assert lines[3] == (
        f"  keytrail evaluate --labels {out / 'labels.json'} "
        f"--findings {state}/output/findings.jsonl"
    )
    assert lines[4] == (
        "warning: no labeled incident falls in 2026-10-01 to 2026-10-03; the incidents are "
        "placed on fixed days of October 2026, so simulate at least 30 days from 2026-10-01 "
        "(--days 30) to get them"
    )


SLACK_CONFIG = CONFIG.replace(
    "alerting: {console: false, outbox: false}\n",
    "alerting:\n"
    "  console: false\n"
    "  receivers:\n"
    "    team: {slack: {webhook_url_env: KEYTRAIL_TEST_SLACK_WEBHOOK_URL, max_retries: 0}}\n"
    "    files: {file: {}}\n"
    "  routing: {default_receiver: team, group_by: ['...']}\n",
)


@pytest.fixture
def slack_workdir(workdir: Path, slack_peer: type[SlackPeer]) -> Path:
    (workdir / "config.yaml").write_text(SLACK_CONFIG, encoding="utf-8")
    return workdir


def test_run_dead_delivery_exit_code(slack_workdir: Path, slack_peer: type[SlackPeer]) -> None:
    slack_peer.statuses = [404]
    code, _, _ = invoke("run", "--config", str(slack_workdir / "config.yaml"))

    assert code == EXIT_DELIVERY
    assert len(slack_peer.bodies) == 4


def test_outbox_list_and_retry(slack_workdir: Path, slack_peer: type[SlackPeer]) -> None:
    config = str(slack_workdir / "config.yaml")
    slack_peer.statuses = [404]
    invoke("run", "--config", config)

    code, stdout, _ = invoke("outbox", "list", "--config", config, "--status", "dead", "--json")
    rows = json.loads(stdout)
    assert code == 0
    assert len(rows) == 1
    assert rows[0]["receiver"] == "team"
    assert rows[0]["attempts"] == 1

    code, stdout, _ = invoke("outbox", "retry", "--config", config, str(rows[0]["id"]))
    assert code == 0
    assert stdout == "queued 1 dead outbox row again\n"

    code, _, _ = invoke("run", "--config", config)
    assert code == 0
    assert len(slack_peer.bodies) == 5
    _, stdout, _ = invoke("outbox", "list", "--config", config, "--status", "pending")
    assert stdout == "no outbox rows\n"


def test_outbox_retry_needs_ids_or_all(slack_workdir: Path) -> None:
    code, _, stderr = invoke("outbox", "retry", "--config", str(slack_workdir / "config.yaml"))

    assert code == 2
    assert "Error: give the IDs of dead outbox rows, or --all for every dead row" in stderr


def test_outbox_retry_ids_and_all_rejected(slack_workdir: Path) -> None:
    config = str(slack_workdir / "config.yaml")
    code, _, stderr = invoke("outbox", "retry", "--config", config, "--all", "1")

    assert code == 2
    assert "Error: give outbox row IDs or --all, not both" in stderr


def test_test_alert_sends_each_channel(slack_workdir: Path, slack_peer: type[SlackPeer]) -> None:
    config = str(slack_workdir / "config.yaml")
    code, stdout, _ = invoke("test-alert", "--config", config, "--receiver", "team")

    assert code == 0
    assert stdout.startswith("slack: delivered: ")
    assert len(slack_peer.bodies) == 1

    code, stdout, _ = invoke("test-alert", "--config", config, "--receiver", "files")
    assert code == 0
    assert stdout.startswith("file: delivered: wrote ")
    assert len(list((slack_workdir / "out" / "outbox").glob("*.eml"))) == 1


def test_test_alert_failure_exit_code(slack_workdir: Path, slack_peer: type[SlackPeer]) -> None:
    slack_peer.statuses = [404]
    code, stdout, _ = invoke(
        "test-alert", "--config", str(slack_workdir / "config.yaml"), "--receiver", "team"
    )

    assert code == EXIT_DELIVERY
    assert stdout.startswith("slack: failed: ")


def test_test_alert_unknown_receiver(slack_workdir: Path) -> None:
    code, _, stderr = invoke(
        "test-alert", "--config", str(slack_workdir / "config.yaml"), "--receiver", "nobody"
    )

    assert code == 2
    assert "receiver 'nobody' not found; known receivers: files, outbox-files, team" in stderr
