"""Slack and email rendering: escaping, autoescape, limits and template overrides."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.alerting.alerts import Alert, alerts_from_findings, finding_records
from pipeline.alerting.escape import BACKTICK_STANDIN
from pipeline.alerting.render import (
    SLACK_MAX_BLOCKS,
    Renderer,
    TemplateOutputError,
    email_subject,
    enforce_slack_limits,
)
from pipeline.errors import ConfigError
from tests.alerting.conftest import burst_row, off_hours_row, travel_row

MakeFindings = Callable[..., pd.DataFrame]


def _one_alert(make_findings: MakeFindings, **overrides: object) -> Alert:
    alerts = alerts_from_findings(make_findings(travel_row(**overrides)))
    assert len(alerts) == 1
    return alerts[0]


def _all_texts(message: dict[str, object]) -> list[str]:
    texts: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("text"), str):
                texts.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(message)
    return texts


# Slack ----------------------------------------------------------------------------------------


def test_slack_structure_for_one_finding(make_findings: MakeFindings) -> None:
    message = Renderer().render_slack(_one_alert(make_findings))
    kinds = [block["type"] for block in message["blocks"]]
    assert kinds == ["header", "section", "section", "divider", "section", "context", "context"]
    header = message["blocks"][0]["text"]
    assert header == {
        "type": "plain_text",
        "text": "HIGH: alice read prod/db from Berlin and New York 1.5 hours apart",
        "emoji": False,
    }
    fields = [field["text"] for field in message["blocks"][1]["fields"]]
    assert fields[0] == "*Who*\n`arn:aws:sts::123456789012:assumed-role/Admin/alice` (role)"
    assert fields[3] == ("*When*\n2026-10-10 01:12:00 UTC to 2026-10-10 02:42:30 UTC\n2 events")
    why = message["blocks"][2]["text"]["text"]
    assert why.startswith("*Why this is unusual*\n• from: Berlin, DE (198.51.100.7)\n")
    assert "*Baseline*\n30-day: read only from DE\n• countries 30d: DE" in why
    assert message["blocks"][5]["elements"][0]["text"] == (
        "To silence it for a while: keytrail silence add"
        " --matcher detector=keytrail.impossible_travel"
        " --matcher principal=arn:aws:sts::123456789012:assumed-role/Admin/alice"
        " --owner YOU --reason WHY --expires 1d."
        " To tune: detectors.keytrail.impossible_travel or alerting.allow_list in config.yaml."
    )
    footer = message["blocks"][6]["elements"][0]["text"]
    assert "MITRE ATT&amp;CK T1078.004" in footer
    assert "GeoIP database 2026-09-01" in footer


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("<!channel>", "&lt;!channel&gt;"),
        ("<@U1>", "&lt;@U1&gt;"),
        ("ops&dev", "ops&amp;dev"),
        ("<http://a|b>", "&lt;http://a|b&gt;"),
        ("x`y", f"x{BACKTICK_STANDIN}y"),
        ("{{ 7 * 7 }}", "{{ 7 * 7 }}"),
    ],
)
def test_slack_escapes_principal(make_findings: MakeFindings, value: str, escaped: str) -> None:
    message = Renderer().render_slack(_one_alert(make_findings, principal=value))
    who = message["blocks"][1]["fields"][0]["text"]
    assert who == f"*Who*\n`{escaped}` (role)"
    for text in _all_texts(message):
        assert "<" not in text


def test_slack_does_not_evaluate_braces(make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings, title="{{ 7 * 7 }} {% raw %}")
    message = Renderer().render_slack(alert)
    assert message["blocks"][0]["text"]["text"] == "HIGH: {{ 7 * 7 }} {% raw %}"


def test_slack_escapes_evidence_and_title(make_findings: MakeFindings) -> None:
    alert = _one_alert(
        make_findings,
        title="read by <!here>",
        evidence={"user_agent": "<http://evil.example|Click to verify>"},
    )
    message = Renderer().render_slack(alert)
    assert message["blocks"][0]["text"]["text"] == "HIGH: read by &lt;!here&gt;"
    why = message["blocks"][2]["text"]["text"]
    assert "• user agent: &lt;http://evil.example|Click to verify&gt;" in why


def test_slack_truncates_long_value(make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings, evidence={"error_message": "E" * 10_000})
    message = Renderer().render_slack(alert)
    why = message["blocks"][2]["text"]["text"]
    assert len(why) <= 3000
    assert why.endswith(" more characters")
    removed = int(why.rsplit("… ", 1)[1].split(" ")[0])
    assert len(why) - len(f"… {removed} more characters") + removed == len(
        "*Why this is unusual*\n• error message: "
    ) + 10_000 + len("\n\n*Baseline*\n30-day: read only from DE\n• countries 30d: DE")


def test_slack_header_capped_at_150(make_findings: MakeFindings) -> None:
    message = Renderer().render_slack(_one_alert(make_findings, title="T" * 400))
    assert len(message["blocks"][0]["text"]["text"]) <= 150


def test_slack_80_findings_fit_50_blocks(make_findings: MakeFindings) -> None:
    rows = [travel_row(event_uids=[f"ev-{n}"], title=f"finding {n}") for n in range(80)]
    alert = Alert.from_findings(finding_records(make_findings(*rows)))
    message = Renderer().render_slack(alert)
    blocks = message["blocks"]
    assert len(blocks) == SLACK_MAX_BLOCKS
    finding_sections = [b for b in blocks if b["type"] == "section" and "text" in b][:-1]
    shown = len(finding_sections)
    # Seven blocks are not findings: header, fields, "more" line, divider, steps, two contexts.
    assert shown == SLACK_MAX_BLOCKS - 7
    more = next(b for b in blocks if b["type"] == "context")["elements"][0]["text"]
    assert more == (
        f"{80 - shown} more findings are not shown; whoever runs keytrail has them in "
        "findings.jsonl, under the finding ids listed below"
    )


def test_enforce_limits_splits_fields_and_caps_blocks() -> None:
    message = {
        "text": "t",
        "blocks": [
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f"f{n}"} for n in range(23)]},
            *({"type": "divider"} for _ in range(60)),
        ],
    }
    limited = enforce_slack_limits(message)
    blocks = limited["blocks"]
    assert [len(b["fields"]) for b in blocks[:3]] == [10, 10, 3]
    assert len(blocks) == 50
    assert blocks[-1]["elements"][0]["text"] == "14 more blocks left out"


def test_enforce_limits_replaces_empty_text() -> None:
    message = {"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": ""}}]}
    assert enforce_slack_limits(message)["blocks"][0]["text"]["text"] == "-"


# Templates ------------------------------------------------------------------------------------


def test_user_template_overrides_packaged(tmp_path: Path, make_findings: MakeFindings) -> None:
    (tmp_path / "slack.json.j2").write_text(
        '{"blocks": [{"type": "section", "text": {"type": "mrkdwn", '
        '"text": {{ ("custom " ~ alert.principal) | tojson }}}}]}'
    )
    renderer = Renderer(tmp_path)
    message = renderer.render_slack(_one_alert(make_findings, principal="<@U1>"))
    assert message == {
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "custom &lt;@U1&gt;"}}]
    }
    assert renderer.template_path("slack.json.j2") == str(tmp_path / "slack.json.j2")
    # Templates the user did not copy still come from the package.
    assert renderer.template_path("email.txt.j2").endswith(
        "pipeline/alerting/templates/email.txt.j2"
    )


def test_invalid_json_template_raises(tmp_path: Path, make_findings: MakeFindings) -> None:
    (tmp_path / "slack.json.j2").write_text('{"blocks": [{"text": "{{ alert.principal }}"}]}')
    with pytest.raises(TemplateOutputError, match="rendered invalid JSON for alert"):
        Renderer(tmp_path).render_slack(_one_alert(make_findings, principal='a"b'))


def test_template_error_names_file(tmp_path: Path, make_findings: MakeFindings) -> None:
    (tmp_path / "email.txt.j2").write_text("line one\n{{ alert.no_such_field }}\n")
    with pytest.raises(TemplateOutputError) as caught:
        Renderer(tmp_path).render_text(_one_alert(make_findings))
    message = str(caught.value)
    assert message.startswith(f"template {tmp_path / 'email.txt.j2'} line 2 failed to render: ")
    assert "'dict object' has no attribute 'no_such_field'" in message


def test_missing_templates_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.templates_dir: .* is not a folder"):
        Renderer(tmp_path / "nope")


def test_html_autoescape_any_name(tmp_path: Path, make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings, principal="<script>alert(1)</script>")
    html = Renderer().render_html(alert)
    assert "<script>" not in html
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>" in html
    # A user template with no .html in its name is still escaped.
    (tmp_path / "email.html.j2").write_text("{% include 'part.j2' %}")
    (tmp_path / "part.j2").write_text("<b>{{ alert.principal }}</b>")
    assert Renderer(tmp_path).render_html(alert) == ("<b>&lt;script&gt;alert(1)&lt;/script&gt;</b>")


def test_text_template_is_not_escaped(make_findings: MakeFindings) -> None:
    text = Renderer().render_text(_one_alert(make_findings, principal="ops&dev <x>"))
    assert "Who:    ops&dev <x> (role)" in text


# Email ----------------------------------------------------------------------------------------


def test_subject_crlf_injection_is_one_line(make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings, title="read\r\nBcc: attacker@example.com\r\n\r\nbody")
    subject = email_subject(alert)
    assert subject == (
        "[keytrail] HIGH: read Bcc: attacker@example.com body "
        "(arn:aws:sts::123456789012:assumed-role/Admin/alice)"
    )
    message = Renderer().render_email(alert, sender="k@example.org", recipients=["s@example.org"])
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == subject


def test_subject_capped(make_findings: MakeFindings) -> None:
    subject = email_subject(_one_alert(make_findings, title="L" * 1000))
    assert len(subject) == 180
    assert subject.endswith("…")


def test_email_parts_and_headers(make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings)
    now = dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.UTC)
    message = Renderer().render_email(
        alert, sender="keytrail@example.org", recipients=["a@example.org", "b@example.org"], now=now
    )
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in parsed.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert parsed["X-Keytrail-Alert"] == alert.dedup_key
    assert parsed["From"] == "keytrail@example.org"
    assert parsed["To"] == "a@example.org, b@example.org"
    assert parsed["Date"] == "Sat, 10 Oct 2026 03:00:00 +0000"
    message_id = str(parsed["Message-ID"])
    assert message_id.startswith(f"<{alert.alert_id}.")
    assert message_id.endswith("@example.org>")
    plain = parsed.get_body(("plain",))
    assert plain is not None
    assert "What to do next:" in plain.get_content()


def test_off_hours_gcp_email_steps(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(off_hours_row(), detector="off_hours"))[0]
    text = Renderer().render_text(alert)
    assert "  - local time: 2026-10-10 03:12 Europe/Berlin" in text
    assert "  - 30-day: read on 22 days, all between 08:00 and 18:00 local" in text
    assert (
        "     $ gcloud secrets versions add db-password --project=shop-prod "
        "--data-file=new-value.txt"
    ) in text
    assert json.dumps(text)  # renders to a plain str


def test_where_pairs_places_and_addresses(make_findings: MakeFindings) -> None:
    alert = _one_alert(make_findings)
    renderer = Renderer()
    text = renderer.render_text(alert)
    assert (
        "Where:  Berlin, DE (198.51.100.7); New York, US (203.0.113.9); aws 123456789012\n"
    ) in text
    html = renderer.render_html(alert)
    assert (
        "Berlin, DE (<code>198.51.100.7</code>); New York, US (<code>203.0.113.9</code>)"
    ) in html
    fields = renderer.render_slack(alert)["blocks"][1]["fields"]
    assert fields[2]["text"] == (
        "*Where*\nBerlin, DE (`198.51.100.7`)\nNew York, US (`203.0.113.9`)\n\naws 123456789012"
    )


def test_where_lists_countries_without_address(make_findings: MakeFindings) -> None:
    row = off_hours_row(source_ips=["192.0.2.10", "192.0.2.11"], countries=["DE", "FR"])
    alert = alerts_from_findings(make_findings(row, detector="off_hours"))[0]
    text = Renderer().render_text(alert)
    assert "Where:  192.0.2.10; 192.0.2.11; countries DE, FR; gcp shop-prod\n" in text


def test_subject_skips_principal_in_title(make_findings: MakeFindings) -> None:
    title = "arn:aws:sts::123456789012:assumed-role/Admin/alice read 3 secrets"
    assert email_subject(_one_alert(make_findings, title=title)) == f"[keytrail] HIGH: {title}"


def test_subject_without_principal(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(burst_row(), detector="burst"))[0]
    assert email_subject(alert) == (
        "[keytrail] HIGH: 12 failed secret accesses by source IP 203.0.113.66 in 5 min"
    )


def test_address_burst_who_lists_principals(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(burst_row(), detector="burst"))[0]
    renderer = Renderer()
    text = renderer.render_text(alert)
    assert "Who:    3 principals from 203.0.113.66: mi-batch, mi-web, svc-reports\n" in text
    assert "None" not in text
    html = renderer.render_html(alert)
    assert (
        "3 principals from 203.0.113.66: <code>mi-batch</code>, <code>mi-web</code>, "
        "<code>svc-reports</code>"
    ) in html
    fields = renderer.render_slack(alert)["blocks"][1]["fields"]
    assert fields[0]["text"] == (
        "*Who*\n3 principals from 203.0.113.66\n`mi-batch`, `mi-web`, `svc-reports`"
    )


def test_why_hides_empty_evidence(make_findings: MakeFindings) -> None:
    evidence = {
        "reasons": ["outside business hours"],
        "holiday": None,
        "zero_gap": False,
        "asns": [],
        "reads": 3,
    }
    row = off_hours_row(evidence=evidence)
    alert = alerts_from_findings(make_findings(row, detector="off_hours"))[0]
    text = Renderer().render_text(alert)
    why = text.split("Why this is unusual:\n", 1)[1].split("Baseline:", 1)[0]
    assert why == "  - reasons: outside business hours\n  - reads: 3\n"


def test_slack_fallback_text_has_no_emphasis(make_findings: MakeFindings) -> None:
    message = Renderer().render_slack(_one_alert(make_findings, title="*boss* read _prod_db_"))
    assert message["text"].endswith("HIGH: \u2217boss\u2217 read \u02cdprod\u02cddb\u02cd")
    assert message["blocks"][0]["text"]["text"] == "HIGH: *boss* read _prod_db_"


def test_person_title_says_their(make_findings: MakeFindings) -> None:
    title = "bob read 3 secrets outside its usual hours, 2026-10-10 (Europe/Berlin)"
    frame = make_findings(off_hours_row(title=title), detector="off_hours")
    text = Renderer().render_text(alerts_from_findings(frame)[0])
    assert text.startswith(
        "MEDIUM: bob read 3 secrets outside their usual hours, 2026-10-10 (Europe/Berlin)\n"
    )


def test_workload_title_keeps_its(make_findings: MakeFindings) -> None:
    title = "etl read 3 secrets outside its usual hours, 2026-10-10 (UTC)"
    row = off_hours_row(title=title, principal="etl@p.iam.gserviceaccount.com")
    row["principal_type"] = "service_account"
    text = Renderer().render_text(alerts_from_findings(make_findings(row, detector="off_hours"))[0])
    assert text.startswith(f"MEDIUM: {title}\n")
