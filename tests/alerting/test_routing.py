"""Allow-lists, routes and grouping of findings into alerts."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from detectors.base import FINDING_COLUMNS
from pipeline.alerting.routing import (
    ALLOWED_BY,
    GROUP_LABELS,
    AllowEntry,
    Route,
    RoutingSettings,
    apply_allow_list,
    expired_entries,
    expired_warning,
    group_alerts,
    route,
    route_alerts,
)
from tests.alerting.conftest import burst_row, off_hours_row, travel_row

MakeFindings = Callable[..., pd.DataFrame]

NOW = pd.Timestamp("2026-11-01T00:00:00Z")
ALICE = "arn:aws:sts::123456789012:assumed-role/Admin/alice"
BOB = "bob@example.com"
CAROL = "arn:aws:sts::123456789012:assumed-role/Admin/carol"


@pytest.fixture
def mixed(make_findings: MakeFindings) -> pd.DataFrame:
    """Return travel (aws, high), off-hours (gcp, medium) and burst (azure, high) findings."""
    return pd.concat(
        [
            make_findings(travel_row()),
            make_findings(off_hours_row(), detector="off_hours"),
            make_findings(burst_row(), detector="burst"),
        ],
        ignore_index=True,
    )


def entry(**fields: Any) -> AllowEntry:
    values: dict[str, Any] = {"detectors": ["*"], "reason": "expected in tests"}
    values.update(fields)
    return AllowEntry.model_validate(values)


def error_fields(error: pytest.ExceptionInfo[ValidationError]) -> list[tuple[Any, ...]]:
    return [tuple(item["loc"]) for item in error.value.errors()]


# --- allow-list: matching ----------------------------------------------------------------------


def test_allow_principal_glob_removes(mixed: pd.DataFrame) -> None:
    kept, removed = apply_allow_list(
        mixed, [entry(principals=["arn:aws:sts::*:assumed-role/Admin/*"])], now=NOW
    )
    assert list(removed["principal"]) == [ALICE]
    assert list(kept["detector"]) == ["keytrail.off_hours", "keytrail.failure_burst"]


def test_allow_principal_glob_no_match(mixed: pd.DataFrame) -> None:
    kept, removed = apply_allow_list(mixed, [entry(principals=["*/Admin/mallory"])], now=NOW)
    assert len(removed) == 0
    assert len(kept) == 3


def test_allow_principal_glob_case_sensitive(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(principals=["BOB@example.com"])], now=NOW)
    assert len(removed) == 0


def test_allow_principal_skips_null_principal(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(principals=["*"])], now=NOW)
    assert sorted(removed["principal"]) == [ALICE, BOB]


def test_allow_cidr_all_inside(mixed: pd.DataFrame) -> None:
    both = entry(cidrs=["198.51.100.0/24", "203.0.113.0/28"])
    _, removed = apply_allow_list(mixed, [both], now=NOW)
    assert list(removed["detector"]) == ["keytrail.impossible_travel"]


def test_allow_cidr_one_outside_kept(mixed: pd.DataFrame) -> None:
    # 203.0.113.9 of the travel finding lies outside, so one inside address is not enough.
    kept, removed = apply_allow_list(mixed, [entry(cidrs=["198.51.100.0/24"])], now=NOW)
    assert len(removed) == 0
    assert len(kept) == 3


def test_allow_cidr_ipv6(make_findings: MakeFindings) -> None:
    frame = make_findings(travel_row(source_ips=["2001:db8::7", "2001:db8:0:1::9"]))
    _, removed = apply_allow_list(frame, [entry(cidrs=["2001:db8::/48"])], now=NOW)
    assert len(removed) == 1


def test_allow_cidr_no_addresses_kept(make_findings: MakeFindings) -> None:
    frame = make_findings(travel_row(source_ips=[]))
    kept, removed = apply_allow_list(frame, [entry(cidrs=["0.0.0.0/0"])], now=NOW)
    assert len(kept) == 1
    assert len(removed) == 0


def test_allow_by_account(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(accounts=["shop-prod"])], now=NOW)
    assert list(removed["principal"]) == [BOB]


def test_allow_account_needs_exact(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(accounts=["shop-*"])], now=NOW)
    assert len(removed) == 0


def test_allow_conditions_all_required(mixed: pd.DataFrame) -> None:
    wrong_account = entry(principals=[BOB], accounts=["123456789012"])
    _, removed = apply_allow_list(mixed, [wrong_account], now=NOW)
    assert len(removed) == 0


def test_allow_per_detector(mixed: pd.DataFrame) -> None:
    only_burst = entry(detectors=["keytrail.failure_burst"], cidrs=["0.0.0.0/0"])
    _, removed = apply_allow_list(mixed, [only_burst], now=NOW)
    assert list(removed["detector"]) == ["keytrail.failure_burst"]


def test_allow_other_detector_kept(mixed: pd.DataFrame) -> None:
    travel_only = entry(detectors=["keytrail.impossible_travel"], principals=[BOB])
    kept, removed = apply_allow_list(mixed, [travel_only], now=NOW)
    assert len(removed) == 0
    assert BOB in list(kept["principal"])


def test_allow_wildcard_detector(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(cidrs=["0.0.0.0/0"])], now=NOW)
    assert list(removed["detector"]) == [
        "keytrail.impossible_travel",
        "keytrail.off_hours",
        "keytrail.failure_burst",
    ]


def test_allow_user_agent_from_evidence(make_findings: MakeFindings) -> None:
    evidence = {"user_agents": ["aws-cli/2.15.0 Python/3.11", "aws-cli/2.13.1 Python/3.11"]}
    frame = make_findings(travel_row(evidence=evidence), off_hours_row())
    _, removed = apply_allow_list(frame, [entry(user_agents=["aws-cli/*"])], now=NOW)
    assert list(removed["principal"]) == [ALICE]


def test_allow_user_agent_one_differs(make_findings: MakeFindings) -> None:
    evidence = {"user_agents": ["aws-cli/2.15.0", "python-requests/2.31"]}
    frame = make_findings(travel_row(evidence=evidence))
    _, removed = apply_allow_list(frame, [entry(user_agents=["aws-cli/*"])], now=NOW)
    assert len(removed) == 0


def test_allow_user_agent_absent_kept(mixed: pd.DataFrame) -> None:
    _, removed = apply_allow_list(mixed, [entry(user_agents=["*"])], now=NOW)
    assert len(removed) == 0


# --- allow-list: expiry and bookkeeping --------------------------------------------------------


def test_allow_entry_expired_before_the_activity_ignored(mixed: pd.DataFrame) -> None:
    # Bob's finding ends 2026-10-10T01:20:00Z; the entry stopped covering activity before that.
    old = entry(accounts=["shop-prod"], expires="2026-10-10T01:00:00Z")
    kept, removed = apply_allow_list(mixed, [old], now=NOW)
    assert len(removed) == 0
    assert len(kept) == 3


def test_allow_expiry_at_last_event_is_expired(mixed: pd.DataFrame) -> None:
    boundary = entry(accounts=["shop-prod"], expires="2026-10-10T01:20:00Z")
    _, removed = apply_allow_list(mixed, [boundary], now=NOW)
    assert len(removed) == 0


def test_allow_entry_covers_activity_before_expiry_read_later(mixed: pd.DataFrame) -> None:
    # Run a month after the entry expired (a backfill or late logs): the activity it covered
    # is still removed, and the entry is listed as expired for clean-up.
    covering = entry(accounts=["shop-prod"], expires="2026-10-11T00:00:00Z")
    later = pd.Timestamp("2026-12-01T00:00:00Z")
    _, removed = apply_allow_list(mixed, [covering], now=later)
    assert list(removed["principal"]) == [BOB]
    assert expired_entries([covering], later) == [(0, covering)]


def test_allow_unexpired_entry_applies(mixed: pd.DataFrame) -> None:
    later = entry(accounts=["shop-prod"], expires="2026-11-01T00:00:01+00:00")
    _, removed = apply_allow_list(mixed, [later], now=NOW)
    assert list(removed["principal"]) == [BOB]


def test_expired_entries_listed() -> None:
    entries = [
        entry(accounts=["a"], expires="2026-10-01T00:00:00Z"),
        entry(accounts=["b"]),
        entry(accounts=["c"], expires="2027-01-01T00:00:00Z"),
        entry(accounts=["d"], expires="2026-11-01T01:00:00+02:00"),
    ]
    expired = expired_entries(entries, NOW.to_pydatetime())
    assert [index for index, _ in expired] == [0, 3]
    assert expired[1][1].accounts == ["d"]


def test_expires_naive_counts_as_utc() -> None:
    naive = entry(accounts=["a"], expires="2026-11-01T00:00:00")
    assert naive.expires == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert naive.is_expired(dt.datetime(2026, 11, 1))
    assert not naive.is_expired(dt.datetime(2026, 10, 31, 23, 59))


def test_removed_carries_allowed_by(mixed: pd.DataFrame) -> None:
    entries = [
        entry(accounts=["nobody"], reason="unused"),
        entry(principals=[BOB], reason="bob runs the nightly export", owner="data@example.com"),
        entry(principals=["*"], reason="catch-all"),
    ]
    kept, removed = apply_allow_list(mixed, entries, now=NOW)
    assert list(removed.columns) == [*FINDING_COLUMNS, ALLOWED_BY]
    assert list(kept.columns) == list(FINDING_COLUMNS)
    by_principal = dict(zip(removed["principal"], removed[ALLOWED_BY], strict=True))
    assert by_principal == {
        ALICE: "entry 2: catch-all",
        BOB: "entry 1: bob runs the nightly export",
    }
    assert list(kept["detector"]) == ["keytrail.failure_burst"]


def test_allow_empty_inputs(make_findings: MakeFindings, mixed: pd.DataFrame) -> None:
    kept, removed = apply_allow_list(mixed, [], now=NOW)
    assert len(kept) == 3
    assert list(removed.columns) == [*FINDING_COLUMNS, ALLOWED_BY]
    assert len(removed) == 0
    empty = mixed.iloc[0:0]
    kept, removed = apply_allow_list(empty, [entry(principals=["*"])], now=NOW)
    assert len(kept) == 0
    assert ALLOWED_BY in removed.columns


def test_expired_entries_logged(mixed: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    old = entry(accounts=["x"], expires="2026-01-01T00:00:00Z")
    with caplog.at_level("WARNING", logger="pipeline.alerting.routing"):
        apply_allow_list(mixed, [entry(accounts=["y"]), old], now=NOW)
    assert caplog.messages == [
        "1 allow-list entry has expired: entry 1 (expected in tests) at 2026-01-01T00:00:00Z. "
        "It still removes findings whose events all lie before the expiry, but none with "
        "later events; delete expired entries from the config once no older logs are read "
        "again"
    ]


def test_expired_entries_plural_names_each() -> None:
    entries = [
        entry(accounts=["x"], reason="old deploy", expires="2026-01-01T00:00:00Z"),
        entry(accounts=["y"], reason="still valid"),
        entry(accounts=["z"], reason="migration", expires="2026-02-01T12:00:00+02:00"),
    ]
    text = expired_warning(expired_entries(entries, NOW.to_pydatetime()))
    assert text.startswith(
        "2 allow-list entries have expired: entry 0 (old deploy) at 2026-01-01T00:00:00Z; "
        "entry 2 (migration) at 2026-02-01T10:00:00Z. They still remove findings"
    )


# --- allow-list: validation --------------------------------------------------------------------


def test_allow_bad_cidr_names_field() -> None:
    with pytest.raises(ValidationError) as error:
        entry(cidrs=["10.0.0.0/8", "10.0.0.300/24"])
    assert error_fields(error) == [("cidrs",)]
    assert "invalid CIDR '10.0.0.300/24'" in str(error.value)


def test_allow_cidr_host_bits_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        entry(cidrs=["10.1.2.3/8"])
    assert error_fields(error) == [("cidrs",)]
    assert "has host bits set" in str(error.value)


def test_allow_empty_reason_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        entry(principals=["x"], reason="   ")
    assert error_fields(error) == [("reason",)]


def test_allow_missing_reason_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        AllowEntry.model_validate({"detectors": ["*"], "principals": ["x"]})
    assert error_fields(error) == [("reason",)]
    assert error.value.errors()[0]["type"] == "missing"


def test_allow_needs_condition() -> None:
    with pytest.raises(ValidationError) as error:
        entry()
    assert "needs at least one of principals, cidrs, user_agents, accounts" in str(error.value)


def test_allow_unknown_key_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        entry(principals=["x"], principal=["y"])
    assert error_fields(error) == [("principal",)]
    assert error.value.errors()[0]["type"] == "extra_forbidden"


def test_allow_empty_detectors_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        entry(principals=["x"], detectors=[])
    assert error_fields(error) == [("detectors",)]


def test_allow_bad_expires_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        entry(principals=["x"], expires="next tuesday")
    assert error_fields(error) == [("expires",)]


# --- routes ------------------------------------------------------------------------------------


def receivers_of(routed: list[tuple[str, pd.DataFrame]]) -> dict[str, list[str]]:
    return {receiver: list(frame["detector"]) for receiver, frame in routed}


def settings(*routes: dict[str, Any], **fields: Any) -> RoutingSettings:
    values: dict[str, Any] = {"default_receiver": "security", "routes": list(routes)}
    values.update(fields)
    return RoutingSettings.model_validate(values)


def test_route_first_match_wins(mixed: pd.DataFrame) -> None:
    tree = settings(
        {"match": {"cloud": "aws"}, "receiver": "aws-team"},
        {"match": {"severity": "high"}, "receiver": "pager"},
    )
    assert receivers_of(route(mixed, tree)) == {
        "aws-team": ["keytrail.impossible_travel"],
        "pager": ["keytrail.failure_burst"],
        "security": ["keytrail.off_hours"],
    }


def test_route_continue_reaches_later(mixed: pd.DataFrame) -> None:
    tree = settings(
        {"match": {"cloud": "aws"}, "receiver": "aws-team", "continue": True},
        {"match": {"severity": "high"}, "receiver": "pager"},
        {"match": {"cloud": "aws"}, "receiver": "never"},
    )
    assert receivers_of(route(mixed, tree)) == {
        "aws-team": ["keytrail.impossible_travel"],
        "pager": ["keytrail.impossible_travel", "keytrail.failure_burst"],
        "security": ["keytrail.off_hours"],
    }


def test_route_continue_python_name() -> None:
    item = Route.model_validate({"receiver": "pager", "continue_": True})
    assert item.continue_ is True
    assert item.model_dump(by_alias=True)["continue"] is True


def test_route_severity_at_least(mixed: pd.DataFrame) -> None:
    tree = settings({"match": {"severity_at_least": "medium"}, "receiver": "pager"})
    assert receivers_of(route(mixed, tree)) == {
        "pager": ["keytrail.impossible_travel", "keytrail.off_hours", "keytrail.failure_burst"]
    }
    tree = settings({"match": {"severity_at_least": "high"}, "receiver": "pager"})
    assert receivers_of(route(mixed, tree)) == {
        "pager": ["keytrail.impossible_travel", "keytrail.failure_burst"],
        "security": ["keytrail.off_hours"],
    }


def test_route_severity_at_least_critical_none(mixed: pd.DataFrame) -> None:
    tree = settings({"match": {"severity_at_least": "critical"}, "receiver": "pager"})
    assert [receiver for receiver, _ in route(mixed, tree)] == ["security"]


def test_route_default_receiver(mixed: pd.DataFrame) -> None:
    tree = settings({"match": {"cloud": "oracle"}, "receiver": "nobody"})
    routed = route(mixed, tree)
    assert [receiver for receiver, _ in routed] == ["security"]
    assert len(routed[0][1]) == 3


def test_route_list_values_and_labels(mixed: pd.DataFrame) -> None:
    tree = settings(
        {
            "match": {"cloud": ["gcp", "azure"], "detector": "keytrail.failure_burst"},
            "receiver": "cloud-team",
        }
    )
    assert receivers_of(route(mixed, tree)) == {
        "cloud-team": ["keytrail.failure_burst"],
        "security": ["keytrail.impossible_travel", "keytrail.off_hours"],
    }


def test_route_empty_column_never_matches(mixed: pd.DataFrame) -> None:
    # The burst finding has no principal_type, so neither value list includes it.
    tree = settings({"match": {"principal_type": ["role", "user"]}, "receiver": "iam"})
    assert receivers_of(route(mixed, tree)) == {
        "iam": ["keytrail.impossible_travel", "keytrail.off_hours"],
        "security": ["keytrail.failure_burst"],
    }


def test_route_empty_match_catches_all(mixed: pd.DataFrame) -> None:
    tree = settings({"receiver": "everything"})
    assert [receiver for receiver, _ in route(mixed, tree)] == ["everything"]


def test_route_receiver_gets_finding_once(mixed: pd.DataFrame) -> None:
    tree = settings(
        {"match": {"cloud": "aws"}, "receiver": "pager", "continue": True},
        {"match": {"severity": "high"}, "receiver": "pager"},
    )
    routed = dict(route(mixed, tree))
    assert list(routed["pager"]["detector"]) == [
        "keytrail.impossible_travel",
        "keytrail.failure_burst",
    ]


def test_route_empty_findings(mixed: pd.DataFrame) -> None:
    assert route(mixed.iloc[0:0], settings()) == []


def test_route_unknown_label_names_field() -> None:
    with pytest.raises(ValidationError) as error:
        settings({"match": {"sev": "high"}, "receiver": "pager"})
    assert error_fields(error) == [("routes", 0, "match")]
    assert "unknown label 'sev'; expected one of detector, severity" in str(error.value)


def test_route_bad_severity_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        settings({"match": {"severity_at_least": "urgent"}, "receiver": "pager"})
    assert error_fields(error) == [("routes", 0, "match")]
    assert "invalid severity 'urgent'" in str(error.value)


def test_route_severity_at_least_list_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        Route.model_validate({"match": {"severity_at_least": ["high"]}, "receiver": "x"})
    assert "severity_at_least takes one severity, not a list" in str(error.value)


def test_route_missing_receiver_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        settings({"match": {"cloud": "aws"}})
    assert error_fields(error) == [("routes", 0, "receiver")]


def test_route_unknown_key_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        settings({"receiver": "x", "matchers": {}})
    assert error_fields(error) == [("routes", 0, "matchers")]


def test_default_receiver_required() -> None:
    with pytest.raises(ValidationError) as error:
        RoutingSettings.model_validate({"routes": []})
    assert error_fields(error) == [("default_receiver",)]


def test_group_by_unknown_label_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        settings({"receiver": "x", "group_by": ["detector", "resources"]})
    assert error_fields(error) == [("routes", 0, "group_by")]
    assert "unknown group_by label 'resources'" in str(error.value)


def test_group_labels_are_finding_columns() -> None:
    assert set(GROUP_LABELS) <= set(FINDING_COLUMNS)


# --- grouping ----------------------------------------------------------------------------------


def test_group_merges_same_principal(make_findings: MakeFindings) -> None:
    frame = make_findings(
        travel_row(event_uids=["ev-1"], first_seen=pd.Timestamp("2026-10-10T03:00:00Z")),
        travel_row(event_uids=["ev-2"]),
        travel_row(
            principal=CAROL,
            event_uids=["ev-3"],
            first_seen=pd.Timestamp("2026-10-10T01:30:00Z"),
        ),
    )
    alerts = group_alerts(frame, ["detector", "principal"])
    assert [alert.principal for alert in alerts] == [ALICE, CAROL]
    assert [len(alert.findings) for alert in alerts] == [2, 1]
    assert alerts[0].event_count == 2
    assert alerts[0].title == f"2 findings from keytrail.impossible_travel for {ALICE}"


def test_group_keeps_detectors_apart(make_findings: MakeFindings) -> None:
    frame = pd.concat(
        [
            make_findings(travel_row(principal=BOB)),
            make_findings(off_hours_row(), detector="off_hours"),
        ],
        ignore_index=True,
    )
    assert len(group_alerts(frame, ["detector", "principal"])) == 2
    assert len(group_alerts(frame, ["principal"])) == 1


def test_group_null_principal_not_merged(make_findings: MakeFindings) -> None:
    frame = make_findings(
        burst_row(source_ips=["203.0.113.67"], event_uids=["c-1", "c-2"]),
        burst_row(first_seen=pd.Timestamp("2026-10-29T21:39:00Z")),
        detector="burst",
    )
    alerts = group_alerts(frame, ["detector", "principal"])
    assert len(alerts) == 2
    assert [alert.source_ips for alert in alerts] == [["203.0.113.66"], ["203.0.113.67"]]
    assert [alert.event_count for alert in alerts] == [12, 2]


def test_group_null_account_merged(make_findings: MakeFindings) -> None:
    frame = make_findings(
        travel_row(account=None, event_uids=["ev-1"]),
        travel_row(account=None, principal=CAROL, event_uids=["ev-3"]),
    )
    assert len(group_alerts(frame, ["account"])) == 1


def test_group_order_severity_then_first_seen(make_findings: MakeFindings) -> None:
    frame = pd.concat(
        [
            make_findings(off_hours_row(severity="critical")),
            make_findings(travel_row(first_seen=pd.Timestamp("2026-10-11T00:00:00Z"))),
            make_findings(burst_row(), detector="burst"),
            make_findings(travel_row(principal=CAROL, severity="low")),
        ],
        ignore_index=True,
    )
    alerts = group_alerts(frame, ["detector", "principal"])
    assert [(alert.severity, alert.who) for alert in alerts] == [
        ("critical", BOB),
        ("high", ALICE),
        ("high", "3 principals from 203.0.113.66"),
        ("low", CAROL),
    ]


def test_group_each_finding_and_all(make_findings: MakeFindings) -> None:
    frame = make_findings(travel_row(event_uids=["ev-1"]), travel_row(event_uids=["ev-2"]))
    assert len(group_alerts(frame, ["..."])) == 2
    assert len(group_alerts(frame, [])) == 1


def test_group_empty_frame(mixed: pd.DataFrame) -> None:
    assert group_alerts(mixed.iloc[0:0], ["detector"]) == []


def test_group_bad_label_raises(mixed: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=re.escape("unknown group_by label 'source_ips'")):
        group_alerts(mixed, ["source_ips"])
    with pytest.raises(ValueError, match=re.escape("'...' must be the only group_by label")):
        group_alerts(mixed, ["...", "detector"])


def test_route_alerts_uses_route_group_by(make_findings: MakeFindings) -> None:
    frame = pd.concat(
        [
            make_findings(
                travel_row(event_uids=["ev-1"]),
                travel_row(event_uids=["ev-2"], resources=["prod/api-key"]),
            ),
            make_findings(off_hours_row(), detector="off_hours"),
        ],
        ignore_index=True,
    )
    tree = settings(
        {"match": {"cloud": "aws"}, "receiver": "aws-team", "group_by": ["..."]},
        group_by=["cloud"],
    )
    routed = route_alerts(frame, tree)
    assert [(receiver, len(alerts)) for receiver, alerts in routed] == [
        ("aws-team", 2),
        ("security", 1),
    ]
    assert routed[1][1][0].principal == BOB


# --- one alert per dedup key -------------------------------------------------------------------


def test_route_alerts_merges_same_dedup_key(make_findings: MakeFindings) -> None:
    # The same reads on three nights share a dedup key: one alert carries all three, so the
    # repeat interval cannot hold back the later nights as already sent.
    nights = [
        off_hours_row(
            event_uids=[f"ev-{day}"],
            first_seen=pd.Timestamp(f"2026-10-{day}T01:12:00Z"),
            last_seen=pd.Timestamp(f"2026-10-{day}T01:40:00Z"),
            source_ips=[f"192.0.2.{day}"],
            event_count=2,
        )
        for day in (5, 14, 15)
    ]
    frame = make_findings(*nights, detector="off_hours")
    assert frame["dedup_key"].nunique() == 1

    [(receiver, alerts)] = route_alerts(frame, settings(group_by=["..."]))
    assert receiver == "security"
    assert len(alerts) == 1
    merged = alerts[0]
    assert merged.dedup_key == frame["dedup_key"].iloc[0]
    assert len(merged.findings) == 3
    assert merged.event_count == 6
    assert merged.source_ips == ["192.0.2.14", "192.0.2.15", "192.0.2.5"]
    assert merged.first_seen == pd.Timestamp("2026-10-05T01:12:00Z")
    assert merged.last_seen == pd.Timestamp("2026-10-15T01:40:00Z")
    assert merged.title == "3 findings from keytrail.off_hours for bob@example.com"


def test_route_alerts_keeps_other_keys_apart(make_findings: MakeFindings) -> None:
    frame = make_findings(
        off_hours_row(event_uids=["ev-1"]),
        off_hours_row(event_uids=["ev-2"], resources=["projects/shop-prod/secrets/api-key"]),
        detector="off_hours",
    )
    [(_, alerts)] = route_alerts(frame, settings(group_by=["..."]))
    assert len(alerts) == 2
    assert sorted(alert.dedup_key for alert in alerts) == sorted(frame["dedup_key"])


def test_merge_same_dedup_key_per_receiver(make_findings: MakeFindings) -> None:
    frame = make_findings(
        off_hours_row(event_uids=["ev-1"]),
        off_hours_row(event_uids=["ev-2"], first_seen=pd.Timestamp("2026-10-11T01:12:00Z")),
        detector="off_hours",
    )
    routed = route_alerts(
        frame,
        settings(
            {"match": {"cloud": "gcp"}, "receiver": "pager", "continue": True},
            {"match": {"cloud": "gcp"}, "receiver": "cloud-team"},
            group_by=["..."],
        ),
    )
    assert [(receiver, len(alerts)) for receiver, alerts in routed] == [
        ("pager", 1),
        ("cloud-team", 1),
    ]
    assert [len(alerts[0].findings) for _, alerts in routed] == [2, 2]
