"""Tests of choosing, storing and rendering the top events of an alert."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pandas as pd
import pytest

from detectors.base import build_findings
from pipeline.alerting.alerts import Alert
from pipeline.alerting.channels.webhook import build_payload
from pipeline.alerting.delivery import AlertingSettings, alert_from_payload, plan_alerts
from pipeline.alerting.outbox import alert_payload
from pipeline.alerting.render import Renderer
from pipeline.alerting.top_events import (
    MAX_USER_AGENT_CHARS,
    TOP_EVENT_FIELDS,
    select_top_events,
    with_top_events,
)
from pipeline.schema import events_from_rows
from tests.alerting.conftest import DETECTORS

NOW = dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.UTC)
SENDER = "keytrail@example.com"


def event(number: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "event_uid": f"ev-{number}",
        "time": f"2026-10-10T01:{number:02d}:00Z",
        "cloud": "aws",
        "operation": "GetSecretValue",
        "action": "read",
        "outcome": "success",
        "principal": "alice",
        "resource": f"prod/db-{number}",
        "source_ip": "198.51.100.7",
        "geo_country": "DE",
        "user_agent": "aws-cli/2.15.0",
    }
    row.update(overrides)
    return row


def uids(picked: list[dict[str, Any]]) -> list[str]:
    return [item["event_uid"] for item in picked]


def finding(event_uids: list[str], resources: list[str], **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "severity": "high",
        "title": "alice read secrets at night",
        "principal": "alice",
        "principal_type": "user",
        "cloud": "aws",
        "account": "111122223333",
        "resources": resources,
        "source_ips": ["198.51.100.7"],
        "countries": ["DE"],
        "first_seen": pd.Timestamp("2026-10-10T01:00:00Z"),
        "last_seen": pd.Timestamp("2026-10-10T01:30:00Z"),
        "event_uids": event_uids,
        "evidence": {"reads": len(event_uids)},
        "baseline": {},
    }
    row.update(overrides)
    return row


def findings_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return build_findings(list(rows), detector=DETECTORS["off_hours"])


# Selection ------------------------------------------------------------------------------------


def test_select_puts_failures_first() -> None:
    rows = events_from_rows(
        [event(1), event(2), event(3, outcome="failure", error_code="AccessDenied")]
    )

    picked = select_top_events(rows, 3)

    assert uids(picked) == ["ev-3", "ev-1", "ev-2"]


def test_select_prefers_new_secrets_and_addresses() -> None:
    rows = events_from_rows(
        [
            event(1),
            event(2, resource="prod/db-1", source_ip="198.51.100.8"),
            event(3, resource="prod/db-1"),
            event(4, resource="prod/db-4", source_ip="203.0.113.9"),
        ]
    )

    picked = select_top_events(rows, 4)

    # ev-4 adds a secret and an address; ev-2 adds an address; ev-3 adds nothing but differs
    # from ev-1 only in time, so it is a repeat and left out.
    assert uids(picked) == ["ev-1", "ev-4", "ev-2"]


def test_select_drops_repeats_keeping_earliest() -> None:
    rows = events_from_rows(
        [event(5, resource="a"), event(2, resource="a"), event(9, resource="a")]
    )

    picked = select_top_events(rows, 5)

    assert uids(picked) == ["ev-2"]


def test_select_respects_limit() -> None:
    rows = events_from_rows([event(number) for number in range(1, 30)])

    assert len(select_top_events(rows, 5)) == 5
    assert select_top_events(rows, 0) == []


def test_select_event_fields_and_values() -> None:
    agent = "Mozilla/5.0 " + "x" * 300
    rows = events_from_rows([event(1, user_agent=agent, geo_country=None, error_code=None)])

    (picked,) = select_top_events(rows, 5)

    assert tuple(picked) == TOP_EVENT_FIELDS
    assert picked["time"] == dt.datetime(2026, 10, 10, 1, 1, tzinfo=dt.UTC)
    assert picked["operation"] == "GetSecretValue"
    assert picked["resource"] == "prod/db-1"
    assert picked["source_ip"] == "198.51.100.7"
    assert picked["country"] is None
    assert picked["error_code"] is None
    assert len(picked["user_agent"]) == MAX_USER_AGENT_CHARS
    assert picked["user_agent"].endswith("…")


def test_select_empty_frame() -> None:
    assert select_top_events(events_from_rows([]), 5) == []


# Attaching to alerts --------------------------------------------------------------------------


def alert_for(event_uids: list[str], resources: list[str]) -> Alert:
    frame = findings_frame(finding(event_uids, resources))
    plan = plan_alerts(frame, AlertingSettings(), [], NOW)
    return plan.alerts[0][1][0]


def test_with_top_events_uses_only_the_alerts_events() -> None:
    alert = alert_for(["ev-1", "ev-3"], ["prod/db-1", "prod/db-3"])
    events = events_from_rows([event(1), event(2), event(3)])

    ((receiver, (filled,)),) = with_top_events([("team", [alert])], events, 5)

    assert receiver == "team"
    assert uids(filled.top_events) == ["ev-1", "ev-3"]
    assert alert.top_events == []


def test_with_top_events_keeps_named_secrets_of_one_event() -> None:
    alert = alert_for(["ev-1"], ["prod/db-1"])
    events = events_from_rows([event(1), event(1, resource="prod/other")])

    ((_, (filled,)),) = with_top_events([("team", [alert])], events, 5)

    assert [item["resource"] for item in filled.top_events] == ["prod/db-1"]


def test_with_top_events_without_events_leaves_alerts_empty() -> None:
    alert = alert_for(["ev-1"], ["prod/db-1"])

    ((_, (filled,)),) = with_top_events([("team", [alert])], None, 5)

    assert filled.top_events == []


def test_plan_alerts_fills_top_events_up_to_setting() -> None:
    frame = findings_frame(finding([f"ev-{n}" for n in range(1, 9)], []))
    events = events_from_rows([event(n) for n in range(1, 9)])
    settings = AlertingSettings(top_events=3)

    plan = plan_alerts(frame, settings, [], NOW, events=events)

    (alert,) = plan.alerts[0][1]
    assert uids(alert.top_events) == ["ev-1", "ev-2", "ev-3"]


def test_top_events_setting_bounds() -> None:
    assert AlertingSettings().top_events == 5
    with pytest.raises(ValueError, match="less than or equal to 20"):
        AlertingSettings(top_events=21)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        AlertingSettings(top_events=-1)


def test_top_events_survive_outbox_payload() -> None:
    alert = alert_for(["ev-1", "ev-2"], ["prod/db-1", "prod/db-2"])
    events = events_from_rows([event(1), event(2, outcome="failure", error_code="Denied")])
    ((_, (filled,)),) = with_top_events([("team", [alert])], events, 5)

    stored = json.loads(json.dumps(alert_payload(filled)))
    rebuilt = alert_from_payload(stored)

    assert rebuilt.top_events == filled.top_events
    assert rebuilt.top_events[0]["time"] == dt.datetime(2026, 10, 10, 1, 2, tzinfo=dt.UTC)


# Rendering ------------------------------------------------------------------------------------

HOSTILE_AGENT = "<!channel> `x` <https://evil.example|Console></script>\r\nBcc: x@evil.example"


@pytest.fixture
def hostile_alert() -> Alert:
    alert = alert_for(["ev-1", "ev-2"], ["prod/db-1", "prod/db-2"])
    events = events_from_rows(
        [
            event(1),
            event(2, outcome="failure", error_code="AccessDenied", user_agent=HOSTILE_AGENT),
        ]
    )
    ((_, (filled,)),) = with_top_events([("team", [alert])], events, 5)
    return filled


def test_slack_lists_top_events_escaped(hostile_alert: Alert) -> None:
    message = Renderer().render_slack(hostile_alert)

    texts = [
        block["text"]["text"]
        for block in message["blocks"]
        if block["type"] == "section" and "text" in block
    ]
    (top,) = [text for text in texts if text.startswith("*Top events*")]
    lines = top.splitlines()
    assert lines[0] == "*Top events* (2 of 2)"
    assert lines[1].startswith(
        "• 2026-10-10 01:02:00 UTC: GetSecretValue on `prod/db-2` from `198.51.100.7` (DE), "
        "*failure* AccessDenied, agent `&lt;!channel&gt; ˋxˋ &lt;https://evil.example|Console"
    )
    assert lines[2] == (
        "• 2026-10-10 01:01:00 UTC: GetSecretValue on `prod/db-1` from `198.51.100.7` (DE), "
        "success, agent `aws-cli/2.15.0`"
    )
    assert "<!channel>" not in json.dumps(message)
    assert len(message["blocks"]) <= 50


def test_email_lists_top_events_escaped(hostile_alert: Alert) -> None:
    message = Renderer().render_email(
        hostile_alert, sender=SENDER, recipients=["secops@example.com"], now=NOW
    )

    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert text_part is not None and html_part is not None
    text = str(text_part.get_content())
    html = str(html_part.get_content())
    assert "Top events (2 of 2):\n" in text
    assert (
        "  - 2026-10-10 01:01:00 UTC: GetSecretValue on prod/db-1 from 198.51.100.7 (DE), "
        "success, agent aws-cli/2.15.0\n"
    ) in text
    assert "failure AccessDenied, agent <!channel> `x`" in text
    assert "\nBcc:" not in text
    assert "Top events (2 of 2)</h4>" in html
    assert "<td><strong>failure</strong> AccessDenied</td>" in html
    assert "&lt;/script&gt;" in html
    assert "</script>" not in html
    assert message["Bcc"] is None


def test_webhook_payload_has_top_events(hostile_alert: Alert) -> None:
    payload = build_payload(hostile_alert)

    assert [item["event_uid"] for item in payload["top_events"]] == ["ev-2", "ev-1"]
    assert payload["top_events"][1] == {
        "event_uid": "ev-1",
        "time": "2026-10-10T01:01:00Z",
        "operation": "GetSecretValue",
        "resource": "prod/db-1",
        "source_ip": "198.51.100.7",
        "country": "DE",
        "user_agent": "aws-cli/2.15.0",
        "outcome": "success",
        "error_code": None,
        "principal": "alice",
    }


def test_alert_without_top_events_renders_no_section() -> None:
    alert = dataclasses.replace(alert_for(["ev-1"], ["prod/db-1"]), top_events=[])

    message = Renderer().render_slack(alert)
    html = Renderer().render_html(alert)

    assert "Top events" not in json.dumps(message)
    assert "Top events" not in html
