"""Tests of replaying stored history through the detectors, one day at a time."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from pipeline.backtest import _day_windows, backtest, write_findings
from pipeline.cli import main
from pipeline.config import Settings, settings_from_mapping
from pipeline.engine import run_once
from pipeline.errors import InputError
from pipeline.evaluate import load_findings
from pipeline.simulate import generate

START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
DAYS = 4
OFF = "keytrail.off_hours"
FIRST = "keytrail.first_seen"
CROSS = "keytrail.cross_cloud"
BURST = "keytrail.failure_burst"
DETECTORS: dict[str, dict[str, Any]] = {
    # The default UTC schedule flags the New York and Los Angeles people every day.
    OFF: {"enabled": True},
    FIRST: {"enabled": True, "learning_days": 0},
    # Runs but cannot fire: four days are fewer than its min_history_days (7).
    CROSS: {"enabled": True, "lookback_days": 0},
    BURST: {"enabled": True, "min_failures": 3},
}


def _settings(logs: Path, work: Path, **alerting: Any) -> Settings:
    data = {
        "state_dir": str(work / "state"),
        "output_dir": str(work / "out"),
        "sources": [
            {
                "name": "simulated",
                "type": "files",
                "paths": [str(logs / "aws"), str(logs / "gcp"), str(logs / "azure")],
            }
        ],
        "enrich": {"geoip": {"enabled": True}},
        "detectors": DETECTORS,
        "alerting": {"console": False, **alerting},
    }
    return settings_from_mapping(data, base_dir=work, environ={})


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    generate(out, days=DAYS)
    return out


@pytest.fixture(scope="module")
def daily(
    logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, list[dict[str, int]]]:
    """Run keytrail once per day (a backfill window each) and keep each run's new findings."""
    settings = _settings(logs, tmp_path_factory.mktemp("daily"))
    per_day = []
    for offset in range(DAYS):
        since = START + dt.timedelta(days=offset)
        until = since + dt.timedelta(days=1)
        summary = run_once(settings, since=since, until=until, now=until)
        per_day.append({entry.id: entry.new_findings for entry in summary.detectors})
    return settings, per_day


def _tree(root: Path) -> dict[str, str]:
    # SQLite may leave its shared-memory index (-shm) and write-ahead log (-wal) next to the
    # database after a read-only connection. They are not part of the stored state.
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.endswith(("-shm", "-wal"))
    }


def test_backtest_equals_daily_runs(daily: tuple[Settings, list[dict[str, int]]]) -> None:
    settings, per_day = daily
    written = load_findings(settings.output_dir / "findings.jsonl")

    report = backtest(settings, START, START + dt.timedelta(days=DAYS))

    assert len(written) > 20
    assert sorted(report.findings["finding_id"]) == sorted(row["finding_id"] for row in written)
    assert [day.findings for day in report.days] == per_day
    assert [day.day for day in report.days] == [
        (START + dt.timedelta(days=offset)).date() for offset in range(DAYS)
    ]
    assert {row["detector"] for row in written} >= {OFF, FIRST}


@pytest.mark.parametrize("rollups", ["current", "missing"])
def test_backtest_writes_no_state(
    daily: tuple[Settings, list[dict[str, int]]], rollups: str
) -> None:
    settings, _ = daily
    if rollups == "missing":
        # A history whose rollups must be rebuilt: the backtest builds them in memory only.
        shutil.rmtree(settings.state_dir / "history" / "rollup")
    before_state = _tree(settings.state_dir)
    before_out = _tree(settings.output_dir)

    backtest(settings, START, START + dt.timedelta(days=DAYS))

    assert _tree(settings.state_dir) == before_state
    assert _tree(settings.output_dir) == before_out


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        type(self).received.append(self.rfile.read(length))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """Serve a webhook on 127.0.0.1 and return a file holding its URL and the bodies it got."""
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url_file = tmp_path / "webhook-url"
    url_file.write_text(f"http://127.0.0.1:{server.server_address[1]}/hook\n", encoding="utf-8")
    try:
        yield url_file, _Hook.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_backtest_sends_nothing(
    logs: Path, tmp_path: Path, webhook: tuple[Path, list[bytes]]
) -> None:
    url_file, received = webhook
    receivers = {"hook": {"webhook": {"url_file": str(url_file)}}}
    settings = _settings(
        logs, tmp_path / "work", receivers=receivers, routing={"default_receiver": "hook"}
    )
    first_day = START + dt.timedelta(days=1)
    run_once(settings, since=START, until=first_day, now=first_day)
    sent_by_run = len(received)

    report = backtest(settings, START, first_day + dt.timedelta(days=1))

    assert sent_by_run > 0
    assert len(received) == sent_by_run
    assert sum(report.totals("alerts").values()) > 0


def test_backtest_rejects_empty_window(daily: tuple[Settings, list[dict[str, int]]]) -> None:
    settings, _ = daily
    with pytest.raises(ValueError, match="the backtest window is empty: since 2026-10-02"):
        backtest(settings, START + dt.timedelta(days=1), START + dt.timedelta(days=1))


def test_backtest_without_history(logs: Path, tmp_path: Path) -> None:
    settings = _settings(logs, tmp_path)
    with pytest.raises(InputError, match=r"no history in .*; run `keytrail run`"):
        backtest(settings, START, START + dt.timedelta(days=1))
    assert not (tmp_path / "state").exists()


def test_backtest_detector_subset(daily: tuple[Settings, list[dict[str, int]]]) -> None:
    settings, per_day = daily

    report = backtest(settings, START, START + dt.timedelta(days=DAYS), [FIRST])

    assert report.detectors == [FIRST]
    assert set(report.findings["detector"]) == {FIRST}
    assert [day.findings for day in report.days] == [{FIRST: day[FIRST]} for day in per_day]


def test_day_windows_cut_at_midnight() -> None:
    since = dt.datetime(2026, 10, 2, 12, tzinfo=dt.UTC)
    until = dt.datetime(2026, 10, 4, 6, tzinfo=dt.UTC)
    assert _day_windows(since, until) == [
        (since, dt.datetime(2026, 10, 3, tzinfo=dt.UTC)),
        (dt.datetime(2026, 10, 3, tzinfo=dt.UTC), dt.datetime(2026, 10, 4, tzinfo=dt.UTC)),
        (dt.datetime(2026, 10, 4, tzinfo=dt.UTC), until),
    ]


def test_write_findings_round_trip(
    daily: tuple[Settings, list[dict[str, int]]], tmp_path: Path
) -> None:
    settings, _ = daily
    report = backtest(settings, START, START + dt.timedelta(days=2), [OFF])
    path = tmp_path / "findings.jsonl"

    count = write_findings(path, report.findings)

    rows = load_findings(path)
    assert count == len(report.findings) == len(rows)
    assert [row["finding_id"] for row in rows] == list(report.findings["finding_id"])
    assert rows[0]["first_seen"].endswith("Z")


def test_cli_backtest_out_feeds_evaluate(
    daily: tuple[Settings, list[dict[str, int]]], logs: Path, tmp_path: Path
) -> None:
    settings, _ = daily
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(settings.state_dir),
                "output_dir": str(tmp_path / "unused"),
                "sources": [],
                "detectors": DETECTORS,
                "alerting": {"console": False},
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "replayed.jsonl"
    runner = CliRunner()

    replay = runner.invoke(
        main,
        [
            "backtest",
            *("--config", str(config), "--since", "2026-10-01", "--until", "2026-10-03"),
            *("--detectors", OFF, "--out", str(out)),
        ],
    )
    scored = runner.invoke(
        main,
        [
            "evaluate",
            *("--config", str(config), "--labels", str(logs / "labels.json")),
            *("--findings", str(out), "--json"),
        ],
    )

    assert replay.exit_code == 0, replay.stderr
    lines = replay.stdout.splitlines()
    assert lines[0].startswith("backtest 2026-10-01 00:00 to 2026-10-03 00:00 UTC: 2 days, ")
    assert lines[1].split() == ["detector", "findings", "alerts", "alerts/day", "max/day"]
    assert lines[3].split()[0] == OFF
    assert lines[-1] == f"{len(load_findings(out))} findings written to {out}"
    assert scored.exit_code == 0, scored.stderr
    document = json.loads(scored.stdout)
    assert document["detectors"][OFF]["findings"] == len(load_findings(out))
    assert not (tmp_path / "unused").exists()


def test_cli_backtest_json(daily: tuple[Settings, list[dict[str, int]]], tmp_path: Path) -> None:
    settings, per_day = daily
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(settings.state_dir),
                "sources": [],
                "detectors": DETECTORS,
                "alerting": {"console": False},
            }
        ),
        encoding="utf-8",
    )

    result = CliRunner().invoke(
        main,
        [
            "backtest",
            *("--config", str(config), "--since", "2026-10-01", "--until", "2026-10-05"),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["since"] == "2026-10-01T00:00:00+00:00"
    assert document["detectors"] == [OFF, FIRST, CROSS, BURST]
    assert [day["findings"] for day in document["days"]] == per_day
    assert document["findings"] == {
        detector: sum(day[detector] for day in per_day) for detector in document["detectors"]
    }
