"""Alerts built from findings, and the next steps per detector and cloud."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from pipeline.alerting.alerts import (
    Alert,
    Location,
    alerts_from_findings,
    finding_records,
    iso_utc,
    person_wording,
    summary_items,
)
from pipeline.alerting.runbooks import Step
from tests.alerting.conftest import burst_row, off_hours_row, travel_row

MakeFindings = Callable[..., pd.DataFrame]


def test_alert_ids_deterministic(make_findings: MakeFindings) -> None:
    first = alerts_from_findings(make_findings(travel_row(), off_hours_row()))
    again = alerts_from_findings(make_findings(off_hours_row(), travel_row()))
    assert [a.alert_id for a in first] == [a.alert_id for a in again]
    assert len({a.alert_id for a in first}) == 2
    assert all(len(a.alert_id) == 20 for a in first)


def test_alert_id_changes_with_events(make_findings: MakeFindings) -> None:
    one = alerts_from_findings(make_findings(travel_row()))[0]
    other = alerts_from_findings(make_findings(travel_row(event_uids=["ev-9"])))[0]
    assert one.alert_id != other.alert_id


def test_alerts_sorted_by_severity(make_findings: MakeFindings) -> None:
    frame = pd.concat(
        [
            make_findings(off_hours_row(), detector="off_hours"),
            make_findings(travel_row()),
        ],
        ignore_index=True,
    )
    assert [a.severity for a in alerts_from_findings(frame)] == ["high", "medium"]


def test_single_finding_alert_fields(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(travel_row()))[0]
    assert alert.severity == "high"
    assert alert.detector == "keytrail.impossible_travel"
    assert alert.principal == "arn:aws:sts::123456789012:assumed-role/Admin/alice"
    assert alert.resources == [
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf"
    ]
    assert alert.source_ips == ["198.51.100.7", "203.0.113.9"]
    assert alert.countries == ["DE", "US"]
    assert alert.first_seen == dt.datetime(2026, 10, 10, 1, 12, tzinfo=dt.UTC)
    assert alert.last_seen == dt.datetime(2026, 10, 10, 2, 42, 30, 250000, tzinfo=dt.UTC)
    assert alert.event_count == 2
    assert alert.dedup_key == alert.findings[0]["dedup_key"]
    assert alert.silence_hint == (
        "To silence it for a while: keytrail silence add"
        " --matcher detector=keytrail.impossible_travel"
        " --matcher principal=arn:aws:sts::123456789012:assumed-role/Admin/alice"
        " --owner YOU --reason WHY --expires 1d."
        " To tune: detectors.keytrail.impossible_travel or alerting.allow_list in config.yaml."
    )


def test_grouped_alert_derives_from_all(make_findings: MakeFindings) -> None:
    records = finding_records(
        make_findings(
            travel_row(severity="medium", source_ips=["192.0.2.1"], countries=["FR"]),
            travel_row(event_uids=["ev-3"], resources=["arn:aws:secretsmanager:x:1:secret:b"]),
        )
    )
    alert = Alert.from_findings(records)
    assert alert.severity == "high"
    assert alert.findings[0]["severity"] == "high"
    assert alert.countries == ["DE", "FR", "US"]
    assert alert.source_ips == ["192.0.2.1", "198.51.100.7", "203.0.113.9"]
    assert alert.event_count == 3
    assert alert.title == (
        "2 findings from keytrail.impossible_travel for "
        "arn:aws:sts::123456789012:assumed-role/Admin/alice"
    )
    assert alert.alert_id == Alert.from_findings(list(reversed(records))).alert_id


def test_from_findings_rejects_empty() -> None:
    with pytest.raises(ValueError, match="an alert needs at least one finding; got none"):
        Alert.from_findings([])


def test_finding_records_missing_column(make_findings: MakeFindings) -> None:
    frame = make_findings(travel_row()).drop(columns=["baseline"])
    with pytest.raises(ValueError, match=r"missing columns \['baseline'\]"):
        finding_records(frame)


def test_summary_items_summary_first() -> None:
    items = summary_items({"reads": 3, "summary": "usually 0", "when": {"a": 1.5, "b": None}})
    assert items == [("summary", "usually 0"), ("reads", "3"), ("when", "a 1.5")]


def test_summary_items_hide_empty_and_false() -> None:
    evidence = {
        "reasons": ["holiday"],
        "holiday": None,
        "asns": [],
        "as_orgs": [],
        "note": "",
        "zero_gap": False,
        "failures": 0,
        "operations": {"SecretGet": 5, "AccessSecretVersion": None},
        "locations": [{"ip": "192.0.2.1", "city": "Berlin", "country": "DE"}],
    }
    assert summary_items(evidence) == [
        ("reasons", "holiday"),
        ("failures", "0"),
        ("operations", "SecretGet 5"),
    ]


def test_summary_items_place_reads_as_text() -> None:
    evidence = {
        "from": {
            "ip": "2001:db8::7",
            "city": "Berlin",
            "country": "DE",
            "time": "2026-10-14T08:30:00Z",
            "event_uid": "5e4b86debb922b7d",
        },
        "to": {"ip": "198.51.100.9", "time": "2026-10-14T10:00:00+00:00"},
        "speed_kmh": 6835.6,
    }
    assert summary_items(evidence) == [
        ("from", "Berlin, DE (2001:db8::7) at 2026-10-14 08:30:00 UTC"),
        ("to", "198.51.100.9 at 2026-10-14 10:00:00 UTC"),
        ("speed", "6835.6 km/h"),
    ]


def test_summary_items_units_follow_numbers() -> None:
    evidence: dict[str, Any] = {
        "distance_km": 10253.7,
        "span_seconds": 251.3,
        "window_minutes": 10.0,
        "lookback_days": 30,
        "speed_kmh": "unknown",
        "flagged_pairs": 1,
    }
    assert summary_items(evidence) == [
        ("distance", "10253.7 km"),
        ("span", "251.3 s"),
        ("window", "10 min"),
        ("lookback", "30 days"),
        ("speed kmh", "unknown"),
        ("flagged pairs", "1"),
    ]


def test_summary_items_drop_ids_and_arns() -> None:
    evidence = {
        "event_uids": ["a1", "b2"],
        "principal_arns": ["arn:aws:iam::123456789012:user/alice"],
        "success_after": {"resource": "prod/db", "event_uid": "c3", "minutes_after_burst": 2.1},
        "distinct_secrets": 3,
    }
    assert summary_items(evidence) == [
        ("success after", "resource prod/db, minutes after burst 2.1"),
        ("distinct secrets", "3"),
    ]


def test_summary_items_long_list_counted() -> None:
    secrets = [f"prod/key-{number}" for number in range(8)]
    rows = [{"resource": "prod/a", "reads": 1}, {"resource": "prod/b", "reads": 2}]
    assert summary_items({"secrets": secrets, "new_secrets": rows}) == [
        ("secrets", "prod/key-0, prod/key-1, prod/key-2, prod/key-3, prod/key-4 and 3 more"),
        ("new secrets", "resource prod/a, reads 1; resource prod/b, reads 2"),
    ]


def test_person_wording_for_people_only() -> None:
    title = "ana read 2 secrets outside its usual hours, 2026-10-05 (UTC)"
    assert person_wording(title, "user") == (
        "ana read 2 secrets outside their usual hours, 2026-10-05 (UTC)"
    )
    assert person_wording(title, "federated").count("their") == 1
    assert person_wording(title, "service_account") == title
    assert person_wording(title, None) == title


def test_summary_items_one_pair_omitted() -> None:
    place = {"ip": "192.0.2.1", "city": "Berlin"}
    other = {"ip": "198.51.100.2", "city": "Tokyo"}
    evidence = {"from": place, "to": other, "pairs": [{"from": place, "to": other}]}
    assert [key for key, _ in summary_items(evidence)] == ["from", "to"]


def test_summary_items_several_pairs_kept() -> None:
    place = {"ip": "192.0.2.1", "city": "Berlin"}
    other = {"ip": "198.51.100.2", "city": "Tokyo"}
    pairs = [{"from": place, "to": other}, {"from": other, "to": place}]
    evidence = {"from": place, "to": other, "pairs": pairs}
    assert [key for key, _ in summary_items(evidence)] == ["from", "to", "pairs"]


def test_locations_from_travel_places(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(travel_row()))[0]
    assert alert.locations == [
        Location("198.51.100.7", "Berlin", "DE"),
        Location("203.0.113.9", "New York", "US"),
    ]
    assert [location.text for location in alert.locations] == [
        "Berlin, DE (198.51.100.7)",
        "New York, US (203.0.113.9)",
    ]


def test_locations_single_country_fallback(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(off_hours_row(), detector="off_hours"))[0]
    assert alert.locations == [Location("192.0.2.10", None, "DE")]
    assert alert.locations[0].text == "DE (192.0.2.10)"


def test_locations_two_countries_no_places(make_findings: MakeFindings) -> None:
    row = off_hours_row(source_ips=["192.0.2.10", "192.0.2.11"], countries=["DE", "FR"])
    alert = alerts_from_findings(make_findings(row, detector="off_hours"))[0]
    assert alert.locations == [Location("192.0.2.10"), Location("192.0.2.11")]
    assert alert.locations[0].text == "192.0.2.10"


def test_address_burst_has_no_principal(make_findings: MakeFindings) -> None:
    alert = alerts_from_findings(make_findings(burst_row(), detector="burst"))[0]
    assert alert.principal == ""
    assert alert.who == "3 principals from 203.0.113.66"
    assert alert.principals == ["mi-batch", "mi-web", "svc-reports"]
    assert alert.findings[0]["principal"] is None
    assert alert.locations == [Location("203.0.113.66", "Amsterdam", "NL")]


def test_iso_utc_adds_z() -> None:
    value = dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert iso_utc(value) == "2026-10-10T01:00:00Z"
    assert iso_utc(dt.datetime(2026, 1, 2, 3, 4, 5, 6)) == "2026-01-02T03:04:05.000006Z"


# Next steps ----------------------------------------------------------------------------------


def _steps(make_findings: MakeFindings, row: dict[str, object], detector: str) -> list[Step]:
    return alerts_from_findings(make_findings(row, detector=detector))[0].next_steps


def _commands(steps: list[Step]) -> list[str]:
    return [command for step in steps for command in step.commands]


def test_travel_aws_role_steps(make_findings: MakeFindings) -> None:
    steps = _steps(make_findings, travel_row(), "travel")
    assert steps[0].text.startswith(
        "Confirm with arn:aws:sts::123456789012:assumed-role/Admin/alice whether they are "
        "travelling or using a VPN (seen in Berlin, DE and then in New York, US)."
    )
    assert _commands(steps) == [
        "aws iam put-role-policy --role-name Admin --policy-name AWSRevokeOlderSessions "
        "--policy-document file://revoke-older-sessions.json",
        "aws secretsmanager rotate-secret "
        "--secret-id arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf",
        "aws secretsmanager put-secret-value "
        "--secret-id arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf "
        "--secret-string file://new-value.txt",
        "aws cloudtrail lookup-events --lookup-attributes "
        "AttributeKey=Username,AttributeValue=alice "
        "--start-time 2026-10-09T01:12:00Z --end-time 2026-10-11T02:42:30Z",
    ]
    assert steps[2].text.endswith(
        "For a Secrets Manager secret, rotate-secret works only if rotation is configured on "
        "it (a rotation Lambda function or managed rotation); otherwise store a new value "
        "with put-secret-value."
    )


def test_off_hours_gcp_user_steps(make_findings: MakeFindings) -> None:
    steps = _steps(make_findings, off_hours_row(), "off_hours")
    assert steps[0].text.startswith(
        "Ask bob@example.com whether the reads at 2026-10-10 03:12 Europe/Berlin were theirs"
    )
    assert "Google Admin console" in steps[2].text
    assert _commands(steps) == [
        "gcloud secrets versions add db-password --project=shop-prod --data-file=new-value.txt",
        "gcloud secrets versions disable OLD_VERSION --secret=db-password --project=shop-prod",
        'gcloud logging read \'protoPayload.authenticationInfo.principalEmail="bob@example.com"'
        ' AND timestamp>="2026-10-09T01:12:00Z" AND timestamp<="2026-10-11T01:20:00Z"\' '
        "--project=shop-prod",
        'gcloud logging read \'protoPayload.requestMetadata.callerIp="192.0.2.10"'
        ' AND timestamp>="2026-10-09T01:12:00Z" AND timestamp<="2026-10-11T01:20:00Z"\' '
        "--project=shop-prod",
    ]
    assert not any("--freshness" in command for command in _commands(steps))


def test_azure_user_and_vault_steps(make_findings: MakeFindings) -> None:
    row = travel_row(
        cloud="azure",
        principal="carol@contoso.example",
        principal_type="user",
        resources=["https://kv-prod.vault.azure.net/secrets/db-conn/0123abcd"],
        source_ips=["203.0.113.9"],
    )
    assert _commands(_steps(make_findings, row, "travel")) == [
        "az rest --method POST --url "
        "https://graph.microsoft.com/v1.0/users/carol@contoso.example/revokeSignInSessions",
        "az keyvault secret set --vault-name kv-prod --name db-conn --file new-value.txt",
        "az keyvault secret set-attributes --vault-name kv-prod --name db-conn "
        "--version OLD_VERSION --enabled false",
        "az monitor log-analytics query --workspace WORKSPACE_ID --analytics-query "
        '\'AzureDiagnostics | where CallerIPAddress == "203.0.113.9" and TimeGenerated '
        "between (datetime(2026-10-09T01:12:00Z) .. datetime(2026-10-11T02:42:30Z))'",
    ]


def test_commands_quote_hostile_names(make_findings: MakeFindings) -> None:
    row = travel_row(
        principal="arn:aws:iam::123456789012:user/x;rm -rf ~",
        principal_type="user",
        resources=["arn:aws:ssm:eu-west-1:123456789012:parameter/prod/$(id)"],
        source_ips=["not-an-ip", "198.51.100.7"],
    )
    commands = _commands(_steps(make_findings, row, "travel"))
    assert commands[0] == "aws iam list-access-keys --user-name 'x;rm -rf ~'"
    assert (
        "aws ssm put-parameter --name '/prod/$(id)' --type SecureString --overwrite "
        "--value file://new-value.txt"
    ) in commands


def test_failure_burst_skips_rotation(make_findings: MakeFindings) -> None:
    from detectors.base import Detector

    class Burst(Detector):
        id = "keytrail.failure_burst"

        def detect(self, window, history, now):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    from detectors.base import build_findings

    frame = build_findings([travel_row()], detector=Burst())
    steps = alerts_from_findings(frame)[0].next_steps
    assert steps[0].text.startswith("Find out why arn:aws:sts::123456789012:assumed-role/Admin")
    assert not any("rotate-secret" in command for command in _commands(steps))


def test_address_burst_steps_name_address(make_findings: MakeFindings) -> None:
    steps = _steps(make_findings, burst_row(), "burst")
    texts = [step.text for step in steps]
    assert texts[0].startswith("Find out why the caller at 203.0.113.66 was refused so often.")
    assert texts[1] == (
        "Check whether any read by the caller at 203.0.113.66 succeeded after the failures "
        "(keytrail found none shortly after the burst). If one did, rotate that secret."
    )
    assert texts[3] == (
        "Check each principal that called from 203.0.113.66: mi-batch, mi-web, svc-reports. "
        "Revoke the credentials of every one that is not expected to call from there."
    )
    assert not any("None" in text or "principals of" in text for text in texts)
    assert texts[-1].startswith("Review other activity from 203.0.113.66 between")


def test_burst_success_step_names_read(make_findings: MakeFindings) -> None:
    success = {
        "principal": "mi-web",
        "time": "2026-10-29T21:46:00Z",
        "event_uid": "ok-1",
        "resource": "https://kv-pay.vault.azure.net/secrets/ledger-key",
        "source_ip": "203.0.113.66",
        "minutes_after_burst": 1.0,
    }
    row = burst_row(evidence={**burst_row()["evidence"], "success_after": success})
    steps = _steps(make_findings, row, "burst")
    assert steps[1].text == (
        "A read succeeded after the failures: mi-web read "
        "https://kv-pay.vault.azure.net/secrets/ledger-key from 203.0.113.66 at "
        "2026-10-29T21:46:00Z, 1 min after the last failure (event ok-1). Treat that secret as "
        "exposed and rotate it unless the read is explained."
    )
    assert steps[1].commands[0] == (
        "az keyvault secret set --vault-name kv-pay --name ledger-key --file new-value.txt"
    )


def test_aws_federated_role_from_arn(make_findings: MakeFindings) -> None:
    arn = "arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_Dev_0a1b/bob@example.com"
    row = off_hours_row(
        cloud="aws",
        principal_type="federated",
        resources=["prod/db"],
        evidence={"principal_arns": [arn]},
    )
    steps = _steps(make_findings, row, "off_hours")
    assert steps[2].text.startswith(
        "Sign bob@example.com out in the identity provider, then revoke the sessions of the "
        "IAM role AWSReservedSSO_Dev_0a1b they assumed."
    )
    assert steps[2].commands == (
        "aws iam put-role-policy --role-name AWSReservedSSO_Dev_0a1b "
        "--policy-name AWSRevokeOlderSessions "
        "--policy-document file://revoke-older-sessions.json",
    )


def test_aws_federated_without_arn_placeholder(make_findings: MakeFindings) -> None:
    row = off_hours_row(cloud="aws", principal_type="federated", resources=["prod/db"])
    steps = _steps(make_findings, row, "off_hours")
    assert "--role-name ROLE_NAME " in steps[2].commands[0]


def test_unknown_detector_generic_step(make_findings: MakeFindings) -> None:
    from detectors.base import Detector, build_findings

    class Other(Detector):
        id = "keytrail.something_new"

        def detect(self, window, history, now):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    frame = build_findings([travel_row(cloud=None)], detector=Other())
    steps = alerts_from_findings(frame)[0].next_steps
    assert steps[0].text.startswith("Confirm with arn:aws:sts::123456789012:assumed-role/Admin")
    assert steps[1].text == (
        "Revoke the active sessions and keys of "
        "arn:aws:sts::123456789012:assumed-role/Admin/alice in its cloud account."
    )
    assert steps[-1].text == (
        "Review other activity from 198.51.100.7, 203.0.113.9 between 2026-10-09T01:12:00Z "
        "and 2026-10-11T02:42:30Z (a day either side of the finding)."
    )


def test_public_api_names() -> None:
    import pipeline.alerting as alerting

    assert alerting.__all__ == [
        "Alert",
        "OutputReport",
        "OutputSettings",
        "Renderer",
        "Step",
        "TemplateOutputError",
        "alerts_from_findings",
        "email_subject",
        "escape_mrkdwn",
        "finding_records",
        "findings_to_json_lines",
        "header_text",
        "next_steps",
        "render_console",
        "silence_hint",
        "truncate",
        "write_outputs",
    ]
    for name in alerting.__all__:
        assert getattr(alerting, name) is not None
