"""Tests for the Google Cloud Audit Logs format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from pipeline.formats import RecordError, get_format, read_bytes, read_paths
from pipeline.formats.gcp_audit import (
    AUDIT_LOG_TYPE,
    canonical_time,
    resolve_gcp_outcome,
    resolve_gcp_principal,
    split_gcp_resource,
)

FIXTURES = Path(__file__).parent / "fixtures"
SECRET_MANAGER = "google.cloud.secretmanager.v1.SecretManagerService."


def audit_entry(**payload: Any) -> dict[str, Any]:
    """Return a minimal Secret Manager AccessSecretVersion entry, with payload overrides."""
    proto: dict[str, Any] = {
        "@type": AUDIT_LOG_TYPE,
        "serviceName": "secretmanager.googleapis.com",
        "methodName": SECRET_MANAGER + "AccessSecretVersion",
        "resourceName": "projects/shop/secrets/api-key/versions/4",
        "authenticationInfo": {"principalEmail": "dev@example.org"},
        "requestMetadata": {"callerIp": "81.2.69.160"},
    }
    proto.update(payload)
    return {
        "insertId": "abc123",
        "logName": "projects/shop/logs/cloudaudit.googleapis.com%2Fdata_access",
        "timestamp": "2025-01-02T03:04:05.123456789Z",
        "protoPayload": proto,
    }


def first_value(events: pd.DataFrame, column: str) -> Any:
    return events[column].iloc[0]


def read_one(record: dict[str, Any]) -> pd.DataFrame:
    result = read_bytes(orjson.dumps(record), "memory")
    assert result.quarantined == []
    return result.events


# --- matches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("proto payload type", {"protoPayload": {"@type": AUDIT_LOG_TYPE}}),
        ("panther at_type", {"protoPayload": {"at_type": AUDIT_LOG_TYPE}}),
        ("panther at_sign_type", {"protoPayload": {"at_sign_type": AUDIT_LOG_TYPE}}),
        ("service and method", {"protoPayload": {"serviceName": "x", "methodName": "y"}}),
        ("json payload type", {"jsonPayload": {"@type": AUDIT_LOG_TYPE}}),
    ],
)
def test_matches_positive(name: str, record: dict[str, Any]) -> None:
    assert get_format("gcp_audit").matches(record), name


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("application json log", {"jsonPayload": {"message": "started"}}),
        ("text log", {"textPayload": "hello", "insertId": "1"}),
        ("payload not an object", {"protoPayload": "AuditLog"}),
        ("other proto type", {"protoPayload": {"@type": "type.googleapis.com/Other"}}),
        ("cloudtrail event", {"eventVersion": "1.08", "eventSource": "kms.amazonaws.com"}),
        ("key vault event", {"category": "AuditEvent", "operationName": "SecretGet"}),
    ],
)
def test_matches_negative(name: str, record: dict[str, Any]) -> None:
    assert not get_format("gcp_audit").matches(record), name


# --- principal ----------------------------------------------------------------------------

PRINCIPAL_CASES: list[tuple[Any, ...]] = [
    # (name, authenticationInfo, delegation chain, principal, type, principal_arn, principal_id)
    (
        "person",
        {"principalEmail": "ana@example.org"},
        None,
        "ana@example.org",
        "user",
        "ana@example.org",
        None,
    ),
    (
        "user service account",
        {"principalEmail": "app@shop.iam.gserviceaccount.com"},
        None,
        "app@shop.iam.gserviceaccount.com",
        "service_account",
        "app@shop.iam.gserviceaccount.com",
        None,
    ),
    (
        "default compute account",
        {"principalEmail": "123456789012-compute@developer.gserviceaccount.com"},
        None,
        "123456789012-compute@developer.gserviceaccount.com",
        "service_account",
        "123456789012-compute@developer.gserviceaccount.com",
        None,
    ),
    (
        "gcp-sa service agent",
        {"principalEmail": "service-123456789012@gcp-sa-secretmanager.iam.gserviceaccount.com"},
        None,
        "service-123456789012@gcp-sa-secretmanager.iam.gserviceaccount.com",
        "service",
        "service-123456789012@gcp-sa-secretmanager.iam.gserviceaccount.com",
        None,
    ),
    (
        "storage agent without at sign",
        {"principalEmail": "service-111111111111-gs-project-accounts.iam.gserviceaccount.com"},
        None,
        "service-111111111111-gs-project-accounts.iam.gserviceaccount.com",
        "service",
        "service-111111111111-gs-project-accounts.iam.gserviceaccount.com",
        None,
    ),
    (
        "cloudservices agent",
        {"principalEmail": "123456789012@cloudservices.gserviceaccount.com"},
        None,
        "123456789012@cloudservices.gserviceaccount.com",
        "service",
        "123456789012@cloudservices.gserviceaccount.com",
        None,
    ),
    (
        "email and subject",
        {"principalEmail": "ana@example.org", "principalSubject": "user:ana@example.org"},
        None,
        "ana@example.org",
        "user",
        "user:ana@example.org",
        None,
    ),
    (
        "workload identity subject only",
        {
            "principalSubject": "principal://iam.googleapis.com/projects/1/locations/global/"
            "workloadIdentityPools/ci/subject/build-7",
            "serviceAccountDelegationInfo": [{}],
        },
        ["projects/-/serviceAccounts/ci@shop.iam.gserviceaccount.com"],
        "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/"
        "subject/build-7",
        "federated",
        "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/"
        "subject/build-7",
        "projects/-/serviceAccounts/ci@shop.iam.gserviceaccount.com",
    ),
    (
        "principal set subject",
        {"principalSubject": "principalSet://iam.googleapis.com/pool"},
        None,
        "principalSet://iam.googleapis.com/pool",
        "federated",
        "principalSet://iam.googleapis.com/pool",
        None,
    ),
    (
        "user subject only",
        {"principalSubject": "user:ana@example.org"},
        None,
        "ana@example.org",
        "user",
        "user:ana@example.org",
        None,
    ),
    (
        "service account subject only",
        {"principalSubject": "serviceAccount:app@shop.iam.gserviceaccount.com"},
        None,
        "app@shop.iam.gserviceaccount.com",
        "service_account",
        "serviceAccount:app@shop.iam.gserviceaccount.com",
        None,
    ),
    (
        "unrecognised subject",
        {"principalSubject": "example_principal_subject"},
        None,
        "example_principal_subject",
        "unknown",
        "example_principal_subject",
        None,
    ),
    (
        "impersonation by a person",
        {
            "principalEmail": "app@shop.iam.gserviceaccount.com",
            "serviceAccountDelegationInfo": [
                {"firstPartyPrincipal": {"principalEmail": "ana@example.org"}},
                {"firstPartyPrincipal": {"principalEmail": "mid@shop.iam.gserviceaccount.com"}},
            ],
        },
        None,
        "app@shop.iam.gserviceaccount.com",
        "service_account",
        "app@shop.iam.gserviceaccount.com",
        "ana@example.org",
    ),
    (
        "third party delegate",
        {
            "principalEmail": "app@shop.iam.gserviceaccount.com",
            "serviceAccountDelegationInfo": [
                {
                    "thirdPartyPrincipal": {
                        "thirdPartyClaims": {"subject": "system:serviceaccount:ns:sa"}
                    }
                }
            ],
        },
        None,
        "app@shop.iam.gserviceaccount.com",
        "service_account",
        "app@shop.iam.gserviceaccount.com",
        "system:serviceaccount:ns:sa",
    ),
    ("empty authentication info", {}, None, "unknown", "unknown", None, None),
    ("missing authentication info", None, None, "unknown", "unknown", None, None),
    ("empty email", {"principalEmail": ""}, None, "unknown", "unknown", None, None),
]


@pytest.mark.parametrize(
    ("name", "info", "chain", "principal", "principal_type", "arn", "principal_id"),
    PRINCIPAL_CASES,
    ids=[case[0] for case in PRINCIPAL_CASES],
)
def test_resolve_gcp_principal(
    name: str,
    info: dict[str, Any] | None,
    chain: list[str] | None,
    principal: str,
    principal_type: str,
    arn: str | None,
    principal_id: str | None,
) -> None:
    resolved = resolve_gcp_principal(info, chain)
    assert resolved["principal"] == principal
    assert resolved["principal_type"] == principal_type
    assert resolved["principal_arn"] == arn
    assert resolved["principal_id"] == principal_id


# --- outcome ------------------------------------------------------------------------------

OUTCOME_CASES: list[tuple[Any, ...]] = [
    # (name, status, authorizationInfo, outcome, failure_reason, error_code, error_message)
    ("status missing", None, None, "success", None, None, None),
    ("status empty", {}, None, "success", None, None, None),
    ("code zero", {"code": 0}, None, "success", None, None, None),
    ("message without code", {"message": "done"}, None, "success", None, None, None),
    ("granted true", {}, [{"granted": True}], "success", None, None, None),
    (
        "authorization without granted",
        {},
        [{"resourceAttributes": {}}],
        "success",
        None,
        None,
        None,
    ),
    ("granted false", {}, [{"granted": True}, {"granted": False}], "failure", "denied", None, None),
    (
        "permission denied",
        {"code": 7, "message": "Permission denied"},
        None,
        "failure",
        "denied",
        "7",
        "Permission denied",
    ),
    ("unauthenticated", {"code": 16}, None, "failure", "denied", "16", None),
    (
        "not found",
        {"code": 5, "message": "Secret [x] not found"},
        None,
        "failure",
        "not_found",
        "5",
        "Secret [x] not found",
    ),
    ("resource exhausted", {"code": 8}, None, "failure", "throttled", "8", None),
    ("invalid argument", {"code": 3}, None, "failure", "invalid", "3", None),
    ("already exists", {"code": 6}, None, "failure", "invalid", "6", None),
    (
        "failed precondition",
        {"code": 9, "message": "key is not enabled"},
        None,
        "failure",
        "invalid",
        "9",
        "key is not enabled",
    ),
    ("out of range", {"code": 11}, None, "failure", "invalid", "11", None),
    ("internal", {"code": 13}, None, "failure", "error", "13", None),
    ("unavailable", {"code": 14}, None, "failure", "error", "14", None),
    ("code as text", {"code": "7"}, None, "failure", "denied", "7", None),
]


@pytest.mark.parametrize(
    ("name", "status", "authorization", "outcome", "reason", "code", "message"),
    OUTCOME_CASES,
    ids=[case[0] for case in OUTCOME_CASES],
)
def test_resolve_gcp_outcome(
    name: str,
    status: Any,
    authorization: Any,
    outcome: str,
    reason: str | None,
    code: str | None,
    message: str | None,
) -> None:
    resolved = resolve_gcp_outcome(status, authorization)
    assert resolved["outcome"] == outcome
    assert resolved["failure_reason"] == reason
    assert resolved["error_code"] == code
    assert resolved["error_message"] == message


# A status that cannot be read must not become a success, so these raise RecordError.
WRONG_TYPE_OUTCOME_CASES = [
    (
        "status string",
        "broken",
        None,
        "field protoPayload.status: expected an object, found string",
    ),
    (
        "code enum name",
        {"code": "PERMISSION_DENIED"},
        None,
        "field protoPayload.status.code: expected an integer, found string",
    ),
    (
        "code fraction",
        {"code": 7.5},
        None,
        "field protoPayload.status.code: expected an integer, found number",
    ),
    (
        "code boolean",
        {"code": True},
        None,
        "field protoPayload.status.code: expected an integer, found boolean",
    ),
    (
        "code object",
        {"code": {}},
        None,
        "field protoPayload.status.code: expected an integer, found object",
    ),
    (
        "message number",
        {"code": 7, "message": 3},
        None,
        "field protoPayload.status.message: expected a string, found number",
    ),
    (
        "authorization object",
        None,
        {"granted": False},
        "field protoPayload.authorizationInfo: expected an array, found object",
    ),
    (
        "granted text",
        None,
        [{"granted": "false"}],
        "field protoPayload.authorizationInfo[].granted: expected a boolean, found string",
    ),
]


@pytest.mark.parametrize(
    ("name", "status", "authorization", "message"),
    WRONG_TYPE_OUTCOME_CASES,
    ids=[case[0] for case in WRONG_TYPE_OUTCOME_CASES],
)
def test_resolve_gcp_outcome_wrong_type(
    name: str, status: Any, authorization: Any, message: str
) -> None:
    with pytest.raises(RecordError) as raised:
        resolve_gcp_outcome(status, authorization)
    assert str(raised.value) == message


# --- resource names and times -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("projects/p/secrets/s/versions/3", ("projects/p/secrets/s", "3")),
        ("projects/p/secrets/s/versions/latest", ("projects/p/secrets/s", "latest")),
        ("projects/p/secrets/s", ("projects/p/secrets/s", None)),
        (
            "projects/p/locations/eu/secrets/s/versions/1",
            ("projects/p/locations/eu/secrets/s", "1"),
        ),
        ("projects/p", ("projects/p", None)),
        (
            "projects/p/locations/us/keyRings/r/cryptoKeys/k/cryptoKeyVersions/2",
            ("projects/p/locations/us/keyRings/r/cryptoKeys/k", "2"),
        ),
        (
            "projects/p/locations/us/keyRings/r/cryptoKeys/k",
            ("projects/p/locations/us/keyRings/r/cryptoKeys/k", None),
        ),
        ("/projects/p/secrets/s/", ("projects/p/secrets/s", None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_split_gcp_resource(name: str | None, expected: tuple[str | None, str | None]) -> None:
    assert split_gcp_resource(name) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-12-15 15:40:47.284488263", "2025-12-15T15:40:47.284488263Z"),
        ("2025-12-15T15:40:47.284488263Z", "2025-12-15T15:40:47.284488263Z"),
        ("2025-12-15T15:40:47Z", "2025-12-15T15:40:47.000000000Z"),
        ("2025-12-15T15:40:47.5+00:00", "2025-12-15T15:40:47.500000000Z"),
        ("yesterday", "yesterday"),
        (None, None),
    ],
)
def test_canonical_time(raw: str | None, expected: str | None) -> None:
    assert canonical_time(raw) == expected


# --- normalize ----------------------------------------------------------------------------


def test_normalize_full_denied_access() -> None:
    result = read_paths([FIXTURES / "gcp_gcloud_read.json"])
    events = result.events
    assert result.summary()["records"] == 6
    assert result.summary()["quarantined"] == 0
    assert dict(result.skipped) == {"not_secret_activity": 1}
    assert len(events) == 5

    denied = events.iloc[0].to_dict()
    assert denied["time"] == pd.Timestamp("2025-03-04T08:15:42.118204Z")
    assert denied["cloud"] == "gcp"
    assert denied["log_format"] == "gcp_audit"
    assert denied["service"] == "secretmanager"
    assert denied["operation"] == "AccessSecretVersion"
    assert denied["action"] == "read"
    assert denied["outcome"] == "failure"
    assert denied["failure_reason"] == "denied"
    assert denied["error_code"] == "7"
    assert denied["error_message"].startswith("Permission 'secretmanager.versions.access' denied")
    assert denied["principal"] == "mallory@example.org"
    assert denied["principal_type"] == "user"
    assert denied["account"] == "payments-prod"
    assert denied["resource"] == "projects/payments-prod/secrets/stripe-api-key"
    assert denied["resource_version"] == "latest"
    assert denied["source_ip"] == "2a02:c7c:5e1a:100::17"
    assert denied["source_kind"] == "public"
    assert denied["source_raw"] == "2a02:c7c:5e1a:100::17"
    assert denied["user_agent"] == (
        "google-cloud-sdk gcloud/467.0.0 command/gcloud.secrets.versions.access"
    )
    assert denied["origin"].endswith("gcp_gcloud_read.json record 1")
    assert len(denied["event_uid"]) == 32


def test_normalize_internal_caller_and_delegation() -> None:
    events = read_paths([FIXTURES / "gcp_gcloud_read.json"]).events
    row = events.iloc[1].to_dict()
    assert row["principal"] == "checkout@payments-prod.iam.gserviceaccount.com"
    assert row["principal_type"] == "service_account"
    assert row["principal_id"] == "deploy-bot@ci-tools.iam.gserviceaccount.com"
    assert row["source_raw"] == "gce-internal-ip"
    assert row["source_kind"] == "internal"
    assert pd.isna(row["source_ip"])
    assert row["resource_version"] == "7"
    assert row["time"] == pd.Timestamp("2025-03-04T08:16:03.402915Z")


def test_normalize_list_kms_and_regional_secret() -> None:
    events = read_paths([FIXTURES / "gcp_gcloud_read.json"]).events
    listing, decrypt, throttled = (events.iloc[i].to_dict() for i in (2, 3, 4))
    assert listing["operation"] == "ListSecrets"
    assert listing["action"] == "list"
    assert listing["resource"] == "projects/payments-prod"

    assert decrypt["service"] == "kms"
    assert decrypt["action"] == "decrypt"
    assert decrypt["principal_type"] == "service"
    assert decrypt["region"] == "europe-west1"
    assert decrypt["resource"] == (
        "projects/payments-prod/locations/europe-west1/keyRings/app/cryptoKeys/payload-key"
    )
    assert decrypt["resource_version"] == "3"
    assert decrypt["source_kind"] == "internal"
    assert pd.isna(decrypt["user_agent"])

    assert throttled["operation"] == "AddSecretVersion"
    assert throttled["action"] == "write"
    assert throttled["failure_reason"] == "throttled"
    assert throttled["error_code"] == "8"
    assert throttled["region"] == "europe-west4"
    assert (
        throttled["resource"]
        == "projects/payments-prod/locations/europe-west4/secrets/webhook-token"
    )


def test_sink_export_dedup_and_unknown_line() -> None:
    result = read_paths([FIXTURES / "gcp_sink_export.jsonl"])
    assert result.records == 4
    assert len(result.events) == 2
    assert dict(result.skipped) == {"duplicate": 1}
    assert [q.reason for q in result.quarantined] == ["unknown_format"]
    assert result.quarantined[0].origin.endswith("gcp_sink_export.jsonl line 4")
    assert list(result.events["operation"]) == ["DeleteSecret", "DestroySecretVersion"]
    assert list(result.events["failure_reason"].fillna("-")) == ["-", "invalid"]
    assert list(result.events["resource_version"].fillna("-")) == ["-", "2"]


def test_entries_api_response() -> None:
    result = read_paths([FIXTURES / "gcp_entries_api.json"])
    assert result.records == 2
    assert result.quarantined == []
    federated, policy = (result.events.iloc[i].to_dict() for i in (0, 1))
    assert federated["principal_type"] == "federated"
    assert federated["principal"].startswith(
        "principal://iam.googleapis.com/projects/123456789012/"
    )
    # No timestamp in the entry: the request time is used.
    assert federated["time"] == pd.Timestamp("2025-03-06T12:00:00Z")
    assert federated["origin"].endswith("entries[1]")
    assert policy["action"] == "policy"
    assert policy["principal_arn"] == "user:bob@example.org"


def test_not_secret_activity_skipped() -> None:
    record = audit_entry(serviceName="compute.googleapis.com", methodName="v1.compute.disks.get")
    result = read_bytes(orjson.dumps(record), "memory")
    assert dict(result.skipped) == {"not_secret_activity": 1}
    assert len(result.events) == 0


def test_kms_encrypt_skipped() -> None:
    record = audit_entry(serviceName="cloudkms.googleapis.com", methodName="Encrypt")
    result = read_bytes(orjson.dumps(record), "memory")
    assert dict(result.skipped) == {"not_secret_activity": 1}


def test_unlisted_secret_manager_method_is_other() -> None:
    events = read_one(audit_entry(methodName=SECRET_MANAGER + "ListLocations"))
    assert first_value(events, "operation") == "ListLocations"
    assert first_value(events, "action") == "other"


@pytest.mark.parametrize(
    ("name", "method", "action"),
    [
        ("access", "AccessSecretVersion", "read"),
        ("list versions", "ListSecretVersions", "list"),
        ("get secret", "GetSecret", "describe"),
        ("get policy", "GetIamPolicy", "describe"),
        ("create", "CreateSecret", "write"),
        ("disable version", "DisableSecretVersion", "write"),
        ("enable version", "EnableSecretVersion", "write"),
        ("delete", "DeleteSecret", "delete"),
        ("destroy version", "DestroySecretVersion", "delete"),
        ("set policy", "SetIamPolicy", "policy"),
        (
            "v1beta1 access",
            "google.cloud.secretmanager.v1beta1.SecretManagerService.AccessSecretVersion",
            "read",
        ),
    ],
)
def test_secret_manager_actions(name: str, method: str, action: str) -> None:
    full = method if "." in method else SECRET_MANAGER + method
    events = read_one(audit_entry(methodName=full))
    assert first_value(events, "action") == action, name


def test_time_fallback_order() -> None:
    record = audit_entry(requestMetadata={"requestAttributes": {"time": "2025-01-02T03:04:06Z"}})
    record["receiveTimestamp"] = "2025-01-02T03:04:09Z"
    del record["timestamp"]
    assert first_value(read_one(record), "time") == pd.Timestamp("2025-01-02T03:04:06Z")

    del record["protoPayload"]["requestMetadata"]
    assert first_value(read_one(record), "time") == pd.Timestamp("2025-01-02T03:04:09Z")


def test_missing_time_quarantined() -> None:
    record = audit_entry()
    del record["timestamp"]
    result = read_bytes(orjson.dumps(record), "memory")
    assert [q.reason for q in result.quarantined] == ["invalid_time"]
    assert len(result.events) == 0


def test_minimal_entry_does_not_crash() -> None:
    record = {
        "timestamp": "2025-01-02T03:04:05Z",
        "protoPayload": {
            "serviceName": "secretmanager.googleapis.com",
            "methodName": SECRET_MANAGER + "GetSecret",
        },
    }
    row = read_one(record).iloc[0].to_dict()
    assert row["principal"] == "unknown"
    assert row["principal_type"] == "unknown"
    assert row["source_kind"] == "missing"
    assert row["outcome"] == "success"
    assert pd.isna(row["resource"])
    assert pd.isna(row["account"])


def test_account_from_resource_and_log_names() -> None:
    from_resource = read_one(audit_entry())
    assert first_value(from_resource, "account") == "shop"

    record = audit_entry(resourceName=None)
    record["logName"] = "projects/other/logs/cloudaudit.googleapis.com%2Fdata_access"
    assert first_value(read_one(record), "account") == "other"

    record["logName"] = "organizations/123/logs/cloudaudit.googleapis.com%2Fdata_access"
    assert pd.isna(first_value(read_one(record), "account"))


def test_panther_caller_ip_key() -> None:
    events = read_one(audit_entry(requestMetadata={"callerIP": "1.2.3.4"}))
    assert first_value(events, "source_ip") == "1.2.3.4"


def test_event_uid_same_for_panther_spelling() -> None:
    native = audit_entry()
    panther = audit_entry()
    panther["timestamp"] = "2025-01-02 03:04:05.123456789"
    panther["protoPayload"]["at_sign_type"] = panther["protoPayload"].pop("@type")
    assert first_value(read_one(native), "event_uid") == first_value(read_one(panther), "event_uid")


def test_event_uid_differs_by_insert_id() -> None:
    other = audit_entry()
    other["insertId"] = "abc124"
    assert first_value(read_one(audit_entry()), "event_uid") != first_value(
        read_one(other), "event_uid"
    )


def test_event_uid_without_insert_id() -> None:
    first = audit_entry()
    del first["insertId"]
    second = audit_entry(requestMetadata={"callerIp": "81.2.69.161"})
    del second["insertId"]
    first_uid = first_value(read_one(first), "event_uid")
    assert first_uid == first_value(read_one(first), "event_uid")
    assert first_uid != first_value(read_one(second), "event_uid")


# --- fields of the wrong JSON type ------------------------------------------------------------

WRONG_TYPE_ENTRY_CASES = [
    (
        "authentication string",
        {"authenticationInfo": "dev@example.org"},
        "field protoPayload.authenticationInfo: expected an object, found string",
    ),
    (
        "principal email number",
        {"authenticationInfo": {"principalEmail": 42}},
        "field protoPayload.authenticationInfo.principalEmail: expected a string, found number",
    ),
    (
        "status code text",
        {"status": {"code": "denied"}},
        "field protoPayload.status.code: expected an integer, found string",
    ),
    (
        "caller address array",
        {"requestMetadata": {"callerIp": ["81.2.69.160"]}},
        "field protoPayload.requestMetadata.callerIp: expected a string, found array",
    ),
    (
        "resource name object",
        {"resourceName": {"name": "projects/shop/secrets/api-key"}},
        "field protoPayload.resourceName: expected a string, found object",
    ),
]


@pytest.mark.parametrize(
    ("case", "payload", "detail"),
    WRONG_TYPE_ENTRY_CASES,
    ids=[case[0] for case in WRONG_TYPE_ENTRY_CASES],
)
def test_wrong_type_entry_quarantined(case: str, payload: dict[str, Any], detail: str) -> None:
    entry = audit_entry(**payload)
    result = read_bytes(orjson.dumps(entry), "entry.json")
    assert result.records == 1
    assert len(result.events) == 0
    assert [(q.reason, q.detail) for q in result.quarantined] == [
        ("invalid_record", f"gcp_audit: {detail}")
    ]
    assert result.quarantined[0].raw == orjson.dumps(entry).decode()


def test_wrong_type_timestamp_quarantined() -> None:
    entry = audit_entry() | {"timestamp": 1735787045}
    result = read_bytes(orjson.dumps(entry), "entry.json")
    assert [(q.reason, q.detail) for q in result.quarantined] == [
        ("invalid_record", "gcp_audit: field timestamp: expected a string, found number")
    ]


def test_status_code_digit_text_accepted() -> None:
    # Proto3 JSON accepts an int32 written as a number or as a decimal string.
    events = read_one(audit_entry(status={"code": "7"}))
    assert first_value(events, "outcome") == "failure"
    assert first_value(events, "failure_reason") == "denied"
    assert first_value(events, "error_code") == "7"


def test_wrong_type_user_agent_null() -> None:
    events = read_one(
        audit_entry(requestMetadata={"callerIp": "81.2.69.160", "callerSuppliedUserAgent": 3})
    )
    assert pd.isna(first_value(events, "user_agent"))
