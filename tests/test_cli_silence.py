"""Tests of `keytrail silence add | list | expire` against a temporary state folder."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.alerting.silences import SilenceStore
from pipeline.cli import EXIT_CONFIG, EXIT_OK, main

ADD = (
    "silence",
    "add",
    "--matcher",
    "detector=keytrail.off_hours",
    "--matcher",
    "principal=~ci-.*",
    "--owner",
    "alice@example.com",
    "--reason",
    "deploy window",
)
ADDED = re.compile(r"added silence ([0-9a-f]{8}), ends \S+Z \(in (\S+)\)")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--log-level", "WARNING", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def add(state_dir: Path, expires: str = "4h") -> str:
    code, stdout, stderr = invoke(*ADD, "--expires", expires, "--state-dir", str(state_dir))
    assert code == EXIT_OK, stderr
    found = ADDED.fullmatch(stdout.strip())
    assert found is not None, stdout
    return found.group(1)


def test_add_stores_silence(state_dir: Path) -> None:
    code, stdout, _ = invoke(*ADD, "--expires", "4h", "--state-dir", str(state_dir))

    assert code == EXIT_OK
    found = ADDED.fullmatch(stdout.strip())
    assert found is not None
    assert found.group(2) in {"4h", "3h 59m"}
    [stored] = SilenceStore(state_dir / "state.db").list(active_only=False)
    assert stored.id == found.group(1)
    assert [str(matcher) for matcher in stored.matchers] == [
        "detector=keytrail.off_hours",
        "principal=~ci-.*",
    ]
    assert stored.owner == "alice@example.com"
    assert stored.reason == "deploy window"
    assert stored.ends_at - stored.starts_at == dt.timedelta(hours=4)


def test_add_list_expire_round_trip(state_dir: Path) -> None:
    silence_id = add(state_dir)

    code, stdout, _ = invoke("silence", "list", "--state-dir", str(state_dir))
    assert code == EXIT_OK
    rows = [line.rstrip() for line in stdout.splitlines()]
    assert re.fullmatch(r"\W*id\W+matchers\W+owner\W+reason\W+ends in\W*", rows[1]) is not None
    assert re.fullmatch(
        rf"\W*{silence_id}\W+detector=keytrail\.off_hours principal=~ci-\.\*\W+"
        r"alice@example\.com\W+deploy window\W+(3h 59m|4h)\W*",
        rows[3],
    )

    code, stdout, _ = invoke("silence", "expire", silence_id, "--state-dir", str(state_dir))
    assert code == EXIT_OK
    assert stdout == f"expired silence {silence_id}\n"

    code, stdout, _ = invoke("silence", "list", "--state-dir", str(state_dir))
    assert code == EXIT_OK
    assert stdout == "no active silences\n"

    code, stdout, _ = invoke("silence", "list", "--all", "--json", "--state-dir", str(state_dir))
    assert code == EXIT_OK
    [row] = json.loads(stdout)
    assert row["id"] == silence_id
    assert row["status"] == "expired"
    assert row["matchers"] == [
        {"label": "detector", "value": "keytrail.off_hours", "regex": False},
        {"label": "principal", "value": "ci-.*", "regex": True},
    ]


def test_list_json_active(state_dir: Path) -> None:
    silence_id = add(state_dir, expires="2d")

    code, stdout, _ = invoke("silence", "list", "--json", "--state-dir", str(state_dir))

    assert code == EXIT_OK
    [row] = json.loads(stdout)
    assert row["id"] == silence_id
    assert row["status"] == "active"
    assert row["owner"] == "alice@example.com"
    assert row["reason"] == "deploy window"


def test_list_all_empty(state_dir: Path) -> None:
    code, stdout, _ = invoke("silence", "list", "--all", "--state-dir", str(state_dir))

    assert code == EXIT_OK
    assert stdout == "no silences\n"


def test_state_dir_from_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("state_dir: kept\nsources: []\ndetectors: {}\n", encoding="utf-8")

    code, _, stderr = invoke(*ADD, "--expires", "1h", "--config", str(config))

    assert code == EXIT_OK, stderr
    assert len(SilenceStore(tmp_path / "kept" / "state.db").active()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--matcher", "user=bob"],
            "Invalid value for '--matcher': invalid matcher 'user=bob': unknown label; expected "
            "one of detector, principal, cloud, account, severity, resource, source_ip",
        ),
        (
            ["--matcher", "principal=~ci-("],
            "Invalid value for '--matcher': invalid matcher 'principal=~ci-(': invalid regular "
            "expression 'ci-(' for label principal: missing ), unterminated subpattern at "
            "position 3",
        ),
        (
            ["--expires", "2020-01-01T00:00:00Z"],
            "Invalid value for '--expires': expiry 2020-01-01T00:00:00Z is not in the future; "
            "give a duration such as 4h or a later time",
        ),
        (
            ["--expires", "31d"],
            "Invalid value for '--expires': silence would last 31d, longer than the maximum 30d; "
            "choose an earlier expiry",
        ),
        (
            ["--expires", "soon"],
            "Invalid value for '--expires': invalid expiry 'soon': expected a duration such as "
            "4h, 3d or 1w, or an ISO 8601 time such as 2026-12-31T18:00:00Z",
        ),
        (
            ["--expires", "2h", "--max-duration", "1h"],
            "Invalid value for '--expires': silence would last 2h, longer than the maximum 1h; "
            "choose an earlier expiry",
        ),
        (
            ["--expires", "2h", "--reason", "  "],
            "Invalid value for '--reason': must not be empty",
        ),
    ],
)
def test_add_rejects(state_dir: Path, extra: list[str], message: str) -> None:
    args = [
        "silence",
        "add",
        "--matcher",
        "cloud=aws",
        "--owner",
        "alice@example.com",
        "--reason",
        "deploy window",
        "--state-dir",
        str(state_dir),
    ]
    if "--expires" not in extra:
        args += ["--expires", "4h"]

    code, stdout, stderr = invoke(*args, *extra)

    assert code == EXIT_CONFIG
    assert stdout == ""
    assert stderr.splitlines()[-1] == f"Error: {message}"
    assert (
        not (state_dir / "state.db").exists()
        or SilenceStore(state_dir / "state.db").list(active_only=False) == []
    )


@pytest.mark.parametrize("missing", ["--owner", "--reason", "--expires", "--matcher"])
def test_add_requires_option(state_dir: Path, missing: str) -> None:
    values = {
        "--matcher": "cloud=aws",
        "--owner": "alice@example.com",
        "--reason": "deploy window",
        "--expires": "4h",
    }
    args = ["silence", "add", "--state-dir", str(state_dir)]
    for option, value in values.items():
        if option != missing:
            args += [option, value]

    code, _, stderr = invoke(*args)

    assert code == EXIT_CONFIG
    assert f"Missing option '{missing}'" in stderr


def test_expire_unknown_id(state_dir: Path) -> None:
    code, stdout, stderr = invoke("silence", "expire", "deadbeef", "--state-dir", str(state_dir))

    assert code == EXIT_CONFIG
    assert stdout == ""
    assert stderr.splitlines()[-1] == (
        f"Error: Invalid value for 'ID': silence 'deadbeef' not found in "
        f"{(state_dir / 'state.db').resolve()}; `keytrail silence list --all` shows every id"
    )


def test_expire_twice(state_dir: Path) -> None:
    silence_id = add(state_dir)
    invoke("silence", "expire", silence_id, "--state-dir", str(state_dir))

    code, _, stderr = invoke("silence", "expire", silence_id, "--state-dir", str(state_dir))

    assert code == EXIT_CONFIG
    assert stderr.splitlines()[-1].startswith(
        f"Error: Invalid value for 'ID': silence {silence_id} already expired at "
    )
