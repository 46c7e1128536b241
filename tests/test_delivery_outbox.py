"""`keytrail outbox list|retry` with one outbox row per (alert, receiver, channel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.alerting.alerts import Alert
from pipeline.alerting.channels.base import Delivery
from pipeline.alerting.outbox import Outbox
from pipeline.cli import EXIT_BROKEN_PIPE, main

NOW = datetime(2026, 10, 10, 3, 0, tzinfo=UTC)


def make_alert() -> Alert:
    return Alert.from_findings(
        [
            {
                "finding_id": "finding-1",
                "detector": "tests.every_read",
                "severity": "high",
                "title": "alice read prod/db-1",
                "principal": "alice",
                "resources": ["prod/db-1"],
                "source_ips": ["198.51.100.7"],
                "first_seen": NOW,
                "last_seen": NOW,
                "event_count": 1,
                "dedup_key": "outbox-cli-1",
                "evidence": {},
            }
        ]
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state folder whose alert has a delivered Slack row and a dead email row."""
    folder = tmp_path / "state"
    with Outbox(folder / "state.db") as outbox:
        outbox.enqueue(make_alert(), ["team"], now=NOW, channels={"team": ["slack", "email"]})
        slack_row, email_row = outbox.list_rows()
        outbox.record(slack_row.id, Delivery("delivered", "ok", remote_id="1700.1"), NOW)
        outbox.record(email_row.id, Delivery("failed", "550 5.1.1 unknown user"), NOW)
    return folder


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout


def invoke_with_stderr(*args: str) -> tuple[int, str, str]:
    """Invoke keytrail; the stderr returned has the messages, without the log lines."""
    result = CliRunner().invoke(main, list(args))
    messages = [line for line in result.stderr.splitlines(keepends=True) if " INFO " not in line]
    return result.exit_code, result.stdout, "".join(messages)


def test_outbox_list_shows_channel(state_dir: Path) -> None:
    code, stdout = invoke("outbox", "list", "--state-dir", str(state_dir))

    alert_id = make_alert().alert_id
    assert code == 0
    assert stdout.splitlines() == [
        f"1  delivered  team/slack  {alert_id}  attempts=1",
        f"2  dead       team/email  {alert_id}  attempts=1  550 5.1.1 unknown user",
    ]


def test_outbox_list_json_and_channel_filter(state_dir: Path) -> None:
    code, stdout = invoke(
        "outbox", "list", "--state-dir", str(state_dir), "--channel", "email", "--json"
    )

    rows = json.loads(stdout)
    assert code == 0
    assert [(row["id"], row["receiver"], row["channel"]) for row in rows] == [(2, "team", "email")]
    assert rows[0]["status"] == "dead"


def test_outbox_retry_by_channel(state_dir: Path) -> None:
    code, stdout = invoke(
        "outbox", "retry", "--all", "--channel", "slack", "--state-dir", str(state_dir)
    )
    assert code == 0
    assert stdout == "queued 0 dead outbox rows again\n"

    code, stdout = invoke(
        "outbox", "retry", "--all", "--channel", "email", "--state-dir", str(state_dir)
    )
    assert code == 0
    assert stdout == "queued 1 dead outbox row again\n"
    with Outbox(state_dir / "state.db") as outbox:
        statuses = [(row.channel, row.status, row.attempts) for row in outbox.list_rows()]
    assert statuses == [("slack", "delivered", 1), ("email", "pending", 0)]


def test_outbox_retry_unknown_id_exits_2(state_dir: Path) -> None:
    code, stdout, stderr = invoke_with_stderr(
        "outbox", "retry", "9999", "--state-dir", str(state_dir)
    )
    assert code == 2
    assert stdout == "queued 0 dead outbox rows again\n"
    assert stderr == "error: outbox row 9999 not found; `keytrail outbox list` shows the IDs\n"


def test_outbox_retry_delivered_row_exits_2(state_dir: Path) -> None:
    code, _, stderr = invoke_with_stderr("outbox", "retry", "1", "--state-dir", str(state_dir))
    assert code == 2
    assert stderr == "error: outbox row 1 not queued: it is delivered, not dead\n"


def test_outbox_retry_other_receiver_exits_2(state_dir: Path) -> None:
    code, _, stderr = invoke_with_stderr(
        "outbox", "retry", "2", "--receiver", "pager", "--state-dir", str(state_dir)
    )
    assert code == 2
    assert stderr == "error: outbox row 2 not queued: its receiver is team, not pager\n"


def test_outbox_retry_partly_matched_warns(state_dir: Path) -> None:
    code, stdout, stderr = invoke_with_stderr(
        "outbox", "retry", "2", "1", "9999", "--state-dir", str(state_dir)
    )
    assert code == 0
    assert stdout == "queued 1 dead outbox row again\n"
    assert stderr.splitlines() == [
        "warning: outbox row 1 not queued: it is delivered, not dead",
        "warning: outbox row 9999 not found; `keytrail outbox list` shows the IDs",
    ]


def test_outbox_list_closed_pipe_quiet(state_dir: Path) -> None:
    # The reader closes the pipe before keytrail writes, as `keytrail outbox list | head -0`.
    keytrail = Path(sys.executable).parent / "keytrail"
    command = [str(keytrail), "outbox", "list", "--state-dir", str(state_dir)]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_BROKEN_PIPE
    assert b"BrokenPipeError" not in done.stderr
    assert b"internal error" not in done.stderr
