"""Tests for the Azure Key Vault audit formats (storage records and Log Analytics rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from pipeline.formats import get_format, read_bytes, read_paths
from pipeline.formats.azure_keyvault import (
    canonical_vault_resource,
    keyvault_action,
    normalize_claims,
    resolve_azure_outcome,
    resolve_azure_principal,
)

FIXTURES = Path(__file__).parent / "fixtures"
VAULT = "https://kv-test.vault.azure.net"
RESOURCE_ID = (
    "/SUBSCRIPTIONS/AB12CD34-0000-4000-8000-000000000001/RESOURCEGROUPS/RG"
    "/PROVIDERS/MICROSOFT.KEYVAULT/VAULTS/KV-TEST"
)
UPN_URI = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn"
OID_URI = "http://schemas.microsoft.com/identity/claims/objectidentifier"


def audit_event(**overrides: Any) -> dict[str, Any]:
    """Return a SecretGet AuditEvent record as a storage blob stores it, with overrides."""
    record: dict[str, Any] = {
        "time": "2025-02-03T04:05:06.7654321Z",
        "category": "AuditEvent",
        "operationName": "SecretGet",
        "resultType": "Success",
        "resultSignature": "OK",
        "correlationId": "9a8b7c6d-0000-4000-8000-000000000001",
        "callerIpAddress": "81.2.69.160",
        "identity": {"claim": {"upn": "ana@contoso.example", "oid": "11111111-0000-4000-8000-0"}},
        "properties": {
            "id": f"{VAULT}/secrets/db/0123456789abcdef",
            "requestUri": f"{VAULT}/secrets/db/0123456789abcdef?api-version=7.4",
            "httpStatusCode": 200,
            "clientInfo": "azsdk-go-azsecrets/v1.1.0",
        },
        "resourceId": RESOURCE_ID,
        "durationMs": "5",
    }
    record.update(overrides)
    return record


def first_value(events: pd.DataFrame, column: str) -> Any:
    return events[column].iloc[0]


def read_one(record: dict[str, Any]) -> pd.DataFrame:
    result = read_bytes(orjson.dumps(record), "memory")
    assert result.quarantined == []
    return result.events


# --- matches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "format_id", "record"),
    [
        (
            "audit event",
            "azure_keyvault",
            {"category": "AuditEvent", "operationName": "X", "time": "t"},
        ),
        (
            "uncategorized vault record",
            "azure_keyvault",
            {
                "resourceId": "/subscriptions/s/providers/Microsoft.KeyVault/vaults/v",
                "operationName": "SecretGet",
            },
        ),
        (
            "diagnostics row by type",
            "azure_diagnostics",
            {
                "TimeGenerated": "t",
                "OperationName": "SecretGet",
                "Type": "AzureDiagnostics",
                "ResourceProvider": "MICROSOFT.KEYVAULT",
            },
        ),
        (
            "diagnostics row without type",
            "azure_diagnostics",
            {
                "TimeGenerated": "t",
                "OperationName": "SecretGet",
                "Category": "AuditEvent",
                "id_s": "x",
            },
        ),
        (
            "resource-specific row by type",
            "azure_kv_resource_specific",
            {"TimeGenerated": "t", "OperationName": "SecretGet", "Type": "AZKVAuditLogs"},
        ),
        (
            "resource-specific row without type",
            "azure_kv_resource_specific",
            {
                "TimeGenerated": "t",
                "OperationName": "SecretGet",
                "Identity": "{}",
                "HttpStatusCode": 200,
            },
        ),
    ],
)
def test_matches_positive(name: str, format_id: str, record: dict[str, Any]) -> None:
    assert get_format(format_id).matches(record), name


@pytest.mark.parametrize(
    ("name", "record"),
    [
        (
            "activity log record",
            {
                "category": "Administrative",
                "operationName": "Microsoft.KeyVault/vaults/secrets/getSecret/action",
                "resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/v",
                "time": "2025-01-01T00:00:00Z",
            },
        ),
        (
            "activity log without category",
            {
                "operationName": "Microsoft.KeyVault/vaults/delete",
                "resourceId": "/subscriptions/s/providers/Microsoft.KeyVault/vaults/v",
            },
        ),
        (
            "policy evaluation category",
            {"category": "AzurePolicyEvaluationDetails", "operationName": "X", "time": "t"},
        ),
        (
            "storage diagnostics row",
            {"TimeGenerated": "t", "OperationName": "GetBlob", "Type": "StorageBlobLogs"},
        ),
        (
            "other provider diagnostics row",
            {
                "TimeGenerated": "t",
                "OperationName": "X",
                "Type": "AzureDiagnostics",
                "ResourceProvider": "MICROSOFT.SQL",
            },
        ),
        ("gcp entry", {"protoPayload": {"serviceName": "x", "methodName": "y"}}),
    ],
)
def test_matches_negative(name: str, record: dict[str, Any]) -> None:
    for format_id in ("azure_keyvault", "azure_diagnostics", "azure_kv_resource_specific"):
        assert not get_format(format_id).matches(record), f"{name} matched {format_id}"


def test_activity_log_record_quarantined() -> None:
    record = {
        "time": "2025-01-01T00:00:00Z",
        "category": "Administrative",
        "operationName": "Microsoft.KeyVault/vaults/secrets/getSecret/action",
        "resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/v",
        "resultType": "Success",
    }
    result = read_bytes(orjson.dumps(record), "memory")
    assert [q.reason for q in result.quarantined] == ["unknown_format"]


# --- claims and principal -----------------------------------------------------------------

CLAIM_CASES: list[tuple[Any, ...]] = [
    (
        "short names",
        {"claim": {"upn": "a@b.example", "oid": "o1"}},
        {"upn": "a@b.example", "oid": "o1"},
    ),
    (
        "uri names",
        {"claim": {UPN_URI: "a@b.example", OID_URI: "o1"}},
        {"upn": "a@b.example", "oid": "o1"},
    ),
    ("claims plural", {"claims": {"appid": "app1"}}, {"appid": "app1"}),
    (
        "json text",
        '{"claim": {"appid": "app1", "idtyp": "app"}}',
        {"appid": "app1", "idtyp": "app"},
    ),
    ("claim as json text", {"claim": '{"oid": "o1"}'}, {"oid": "o1"}),
    (
        "log analytics column names",
        {
            "http_schemas_xmlsoap_org_ws_2005_05_identity_claims_upn": "a@b.example",
            "http_schemas_microsoft_com_identity_claims_objectidentifier": "o1",
        },
        {"upn": "a@b.example", "oid": "o1"},
    ),
    (
        "empty values dropped",
        {"claim": {"upn": "", "oid": None, "appid": "app1"}},
        {"appid": "app1"},
    ),
    ("empty object", {}, {}),
    ("empty text", "", {}),
    ("invalid json text", "{not json", {}),
    ("missing", None, {}),
]


@pytest.mark.parametrize(("name", "raw", "expected"), CLAIM_CASES, ids=[c[0] for c in CLAIM_CASES])
def test_normalize_claims(name: str, raw: Any, expected: dict[str, str]) -> None:
    assert normalize_claims(raw) == expected


MIRID = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-api"

PRINCIPAL_CASES: list[tuple[Any, ...]] = [
    # (name, claims, status, principal, type, principal_arn, principal_id)
    (
        "user",
        {"upn": "ana@contoso.example", "oid": "o1", "appid": "a1"},
        200,
        "ana@contoso.example",
        "user",
        "ana@contoso.example",
        "o1",
    ),
    (
        "guest prefix",
        {"upn": "live.com#username@outlook.com", "oid": "o1"},
        200,
        "username@outlook.com",
        "user",
        "live.com#username@outlook.com",
        "o1",
    ),
    (
        "external guest upn kept",
        {"upn": "bob_fabrikam.com#EXT#@contoso.onmicrosoft.com"},
        200,
        "bob_fabrikam.com#EXT#@contoso.onmicrosoft.com",
        "user",
        "bob_fabrikam.com#EXT#@contoso.onmicrosoft.com",
        None,
    ),
    (
        "managed identity",
        {"xms_mirid": MIRID, "appid": "a1", "oid": "o1", "idtyp": "app"},
        200,
        "id-api",
        "managed_identity",
        MIRID,
        "o1",
    ),
    (
        "application",
        {"appid": "a1", "idtyp": "app", "appidacr": "2"},
        200,
        "a1",
        "application",
        None,
        "a1",
    ),
    (
        "application with object id",
        {"appid": "a1", "oid": "o1"},
        200,
        "a1",
        "application",
        None,
        "o1",
    ),
    ("object id only", {"oid": "o1"}, 200, "o1", "unknown", None, "o1"),
    ("anonymous 401", {}, 401, "anonymous", "anonymous", None, None),
    ("nothing without status", {}, None, "unknown", "unknown", None, None),
    ("nothing with 403", {}, 403, "unknown", "unknown", None, None),
]


@pytest.mark.parametrize(
    ("name", "claims", "status", "principal", "principal_type", "arn", "principal_id"),
    PRINCIPAL_CASES,
    ids=[c[0] for c in PRINCIPAL_CASES],
)
def test_resolve_azure_principal(
    name: str,
    claims: dict[str, str],
    status: int | None,
    principal: str,
    principal_type: str,
    arn: str | None,
    principal_id: str | None,
) -> None:
    resolved = resolve_azure_principal(claims, status)
    assert resolved["principal"] == principal
    assert resolved["principal_type"] == principal_type
    assert resolved["principal_arn"] == arn
    assert resolved["principal_id"] == principal_id


# --- outcome ------------------------------------------------------------------------------

OUTCOME_CASES: list[tuple[Any, ...]] = [
    # (name, status, resultType, resultSignature, description, outcome, reason, code, message)
    ("ok", 200, "Success", "OK", None, "success", None, None, None),
    ("no content", 204, "Success", "NoContent", None, "success", None, None, None),
    (
        "unauthorized despite success",
        401,
        "Success",
        "Unauthorized",
        None,
        "failure",
        "denied",
        "401",
        "Unauthorized",
    ),
    (
        "forbidden",
        403,
        "Success",
        "Forbidden",
        "Caller is not authorized",
        "failure",
        "denied",
        "403",
        "Caller is not authorized",
    ),
    ("not found", 404, "Success", "NotFound", None, "failure", "not_found", "404", "NotFound"),
    (
        "throttled",
        429,
        "Success",
        "TooManyRequests",
        None,
        "failure",
        "throttled",
        "429",
        "TooManyRequests",
    ),
    ("bad request", 400, "Success", "BadRequest", None, "failure", "invalid", "400", "BadRequest"),
    ("conflict", 409, "Success", "Conflict", None, "failure", "invalid", "409", "Conflict"),
    (
        "server error",
        500,
        "Success",
        "InternalServerError",
        None,
        "failure",
        "error",
        "500",
        "InternalServerError",
    ),
    (
        "no status, reason phrase",
        None,
        "Success",
        "Forbidden",
        None,
        "failure",
        "denied",
        "Forbidden",
        "Forbidden",
    ),
    (
        "no status, spaced reason",
        None,
        "Success",
        "Not Found",
        None,
        "failure",
        "not_found",
        "Not Found",
        "Not Found",
    ),
    (
        "no status, numeric signature",
        None,
        "Success",
        "404",
        None,
        "failure",
        "not_found",
        "404",
        "404",
    ),
    ("no status, ok signature", None, None, "OK", None, "success", None, None, None),
    ("result type only success", None, "Succeeded", None, None, "success", None, None, None),
    ("result type only failure", None, "Failure", None, None, "failure", "error", None, None),
    ("nothing", None, None, None, None, "unknown", None, None, None),
]


@pytest.mark.parametrize(
    (
        "name",
        "status",
        "result_type",
        "signature",
        "description",
        "outcome",
        "reason",
        "code",
        "message",
    ),
    OUTCOME_CASES,
    ids=[c[0] for c in OUTCOME_CASES],
)
def test_resolve_azure_outcome(
    name: str,
    status: int | None,
    result_type: str | None,
    signature: str | None,
    description: str | None,
    outcome: str,
    reason: str | None,
    code: str | None,
    message: str | None,
) -> None:
    resolved = resolve_azure_outcome(status, result_type, signature, description)
    assert resolved["outcome"] == outcome
    assert resolved["failure_reason"] == reason
    assert resolved["error_code"] == code
    assert resolved["error_message"] == message


# --- resources and actions ----------------------------------------------------------------

RESOURCE_CASES: list[tuple[Any, ...]] = [
    (
        "secret with version",
        f"{VAULT}/secrets/db/abc123",
        None,
        None,
        (f"{VAULT}/secrets/db", "abc123"),
    ),
    (
        "upper-case host",
        "https://KV-Test.Vault.Azure.Net/secrets/db",
        None,
        None,
        (f"{VAULT}/secrets/db", None),
    ),
    (
        "request uri with query",
        None,
        f"{VAULT}/secrets/db/?api-version=7.4",
        None,
        (f"{VAULT}/secrets/db", None),
    ),
    ("deleted secret", f"{VAULT}/deletedsecrets/db", None, None, (f"{VAULT}/secrets/db", None)),
    (
        "key operation",
        None,
        f"{VAULT}/keys/k1/v1/decrypt?api-version=7.4",
        None,
        (f"{VAULT}/keys/k1", "v1"),
    ),
    ("vault id", f"{VAULT}/", None, None, (VAULT, None)),
    ("collection list", None, f"{VAULT}/secrets?api-version=7.4", None, (VAULT, None)),
    (
        "sovereign cloud",
        "https://kv1.vault.azure.cn/secrets/s",
        None,
        None,
        ("https://kv1.vault.azure.cn/secrets/s", None),
    ),
    (
        "control plane uri falls back to resource id",
        None,
        "https://control-prod-wus.vaultcore.azure.net/subscriptions/x/vaults/kv?api-version=1",
        RESOURCE_ID,
        (VAULT, None),
    ),
    ("nothing", None, None, None, (None, None)),
    ("not a url", "secret-name", None, None, (None, None)),
]


@pytest.mark.parametrize(
    ("name", "object_id", "request_uri", "resource_id", "expected"),
    RESOURCE_CASES,
    ids=[c[0] for c in RESOURCE_CASES],
)
def test_canonical_vault_resource(
    name: str,
    object_id: str | None,
    request_uri: str | None,
    resource_id: str | None,
    expected: tuple[str | None, str | None],
) -> None:
    assert canonical_vault_resource(object_id, request_uri, resource_id) == expected


@pytest.mark.parametrize(
    ("operation", "action"),
    [
        ("SecretGet", "read"),
        ("SecretBackup", "read"),
        ("SecretList", "list"),
        ("SecretListVersions", "list"),
        ("SecretListDeleted", "list"),
        ("VaultGet", "describe"),
        ("KeyGet", "describe"),
        ("CertificateGet", "describe"),
        ("SecretSet", "write"),
        ("SecretRecover", "write"),
        ("SecretRestore", "write"),
        ("SecretDelete", "delete"),
        ("SecretPurge", "delete"),
        ("KeyDecrypt", "decrypt"),
        ("KeyUnwrap", "decrypt"),
        ("KeyRotate", "rotate"),
        ("VaultPatch", "policy"),
        ("VaultPut", "policy"),
        ("Authentication", "other"),
        ("KeySign", "other"),
        (None, "other"),
    ],
)
def test_keyvault_action(operation: str | None, action: str) -> None:
    assert keyvault_action(operation) == action


# --- files --------------------------------------------------------------------------------


def test_pt1h_blob_with_incomplete_last_line() -> None:
    result = read_paths([FIXTURES / "azure_pt1h.json"])
    assert result.records == 4
    assert result.quarantined == []
    assert dict(result.skipped) == {"incomplete_last_line": 1}
    events = result.events
    assert list(events["operation"]) == ["SecretGet", "SecretList", "SecretPurge", "KeyDecrypt"]
    assert list(events["log_format"].unique()) == ["azure_keyvault"]
    assert events["event_uid"].nunique() == 4

    managed = events.iloc[0].to_dict()
    assert managed["time"] == pd.Timestamp("2025-04-10T07:00:01.123456Z")
    assert managed["cloud"] == "azure"
    assert managed["service"] == "keyvault"
    assert managed["action"] == "read"
    assert managed["outcome"] == "success"
    assert managed["principal"] == "id-orders-api"
    assert managed["principal_type"] == "managed_identity"
    assert managed["principal_id"] == "3c1f6a2e-8d4b-4f71-b2a9-5e0c7d9f1a36"
    assert managed["account"] == "5f2c1a9e-7b3d-4c8e-9a10-2b4d6f8e0c13"
    assert managed["region"] == "westeurope"
    assert managed["resource"] == "https://kv-orders-prod.vault.azure.net/secrets/sql-conn"
    assert managed["resource_version"] == "6d2f0b8e41a94c7d8e3f5a1b2c4d6e8f"
    assert managed["source_ip"] == "10.20.3.4"
    assert managed["source_kind"] == "private"
    assert managed["user_agent"].startswith("azsdk-python-keyvault-secrets/4.8.0")
    assert managed["origin"].endswith("azure_pt1h.json line 1")

    denied = events.iloc[1].to_dict()
    assert denied["outcome"] == "failure"
    assert denied["failure_reason"] == "denied"
    assert denied["error_code"] == "403"
    assert denied["resource"] == "https://kv-orders-prod.vault.azure.net"

    purge = events.iloc[2].to_dict()
    assert purge["action"] == "delete"
    assert purge["resource"] == "https://kv-orders-prod.vault.azure.net/secrets/legacy-smtp"

    throttled = events.iloc[3].to_dict()
    assert throttled["failure_reason"] == "throttled"
    assert throttled["principal_type"] == "application"


def test_log_analytics_value_export() -> None:
    result = read_paths([FIXTURES / "azure_loganalytics_value.json"])
    assert result.records == 3
    assert result.quarantined == []
    assert dict(result.formats) == {"azure_kv_resource_specific": 2, "azure_diagnostics": 1}
    text_identity, object_identity, diagnostics = (
        result.events.iloc[i].to_dict() for i in range(3)
    )

    assert text_identity["log_format"] == "azure_kv_resource_specific"
    assert text_identity["principal"] == "mallory@contoso.example"
    assert text_identity["principal_type"] == "user"
    assert text_identity["failure_reason"] == "not_found"
    assert text_identity["error_code"] == "404"
    assert text_identity["error_message"] == "Secret not found: old-token"
    assert text_identity["source_ip"] == "2a01:111:f400:7e00::5"
    assert text_identity["account"] == "5f2c1a9e-7b3d-4c8e-9a10-2b4d6f8e0c13"
    assert text_identity["user_agent"] == "curl/8.5.0"
    assert text_identity["origin"].endswith("value[1]")

    assert object_identity["principal_type"] == "application"
    assert object_identity["action"] == "write"
    assert object_identity["resource_version"] == "a1b2c3d4e5f60718293a4b5c6d7e8f90"

    assert diagnostics["log_format"] == "azure_diagnostics"
    assert diagnostics["principal"] == "eve@contoso.example"
    assert diagnostics["principal_id"] == "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d"
    assert diagnostics["action"] == "delete"
    assert diagnostics["outcome"] == "success"
    assert diagnostics["account"] == "5f2c1a9e-7b3d-4c8e-9a10-2b4d6f8e0c13"
    assert diagnostics["user_agent"] == "PowerShell/7.4.1 Az.KeyVault/5.2.0"


def test_same_event_same_uid_across_shapes() -> None:
    storage = audit_event()
    diagnostics = {
        "TimeGenerated": "2025-02-03T04:05:06.7654321Z",
        "OperationName": "SecretGet",
        "ResultType": "Success",
        "ResultSignature": "OK",
        "CorrelationId": "9A8B7C6D-0000-4000-8000-000000000001",
        "CallerIPAddress": "81.2.69.160",
        "identity_claim_upn_s": "ana@contoso.example",
        "identity_claim_oid_g": "11111111-0000-4000-8000-0",
        "id_s": f"{VAULT}/secrets/db/0123456789abcdef",
        "httpStatusCode_d": 200,
        "ResourceProvider": "MICROSOFT.KEYVAULT",
        "ResourceId": RESOURCE_ID,
        "Type": "AzureDiagnostics",
    }
    resource_specific = {
        "TimeGenerated": "2025-02-03T04:05:06.765432100Z",
        "OperationName": "SecretGet",
        "CorrelationId": "9a8b7c6d-0000-4000-8000-000000000001",
        "CallerIpAddress": "81.2.69.160",
        "Identity": {"claim": {"upn": "ana@contoso.example", "oid": "11111111-0000-4000-8000-0"}},
        "Id": f"{VAULT}/secrets/db/0123456789abcdef",
        "HttpStatusCode": 200,
        "Type": "AZKVAuditLogs",
    }
    uids = {
        first_value(read_one(record), "event_uid")
        for record in (storage, diagnostics, resource_specific)
    }
    assert len(uids) == 1


def test_event_uid_differs_by_correlation_id() -> None:
    other = audit_event(correlationId="9a8b7c6d-0000-4000-8000-000000000002")
    assert first_value(read_one(audit_event()), "event_uid") != first_value(
        read_one(other), "event_uid"
    )


def test_properties_as_json_text() -> None:
    record = audit_event(properties=orjson.dumps(audit_event()["properties"]).decode())
    row = read_one(record).iloc[0].to_dict()
    assert row["resource"] == f"{VAULT}/secrets/db"
    assert row["outcome"] == "success"


def test_minimal_record_does_not_crash() -> None:
    record = {"time": "2025-02-03T04:05:06Z", "category": "AuditEvent", "operationName": "VaultGet"}
    row = read_one(record).iloc[0].to_dict()
    assert row["principal"] == "unknown"
    assert row["outcome"] == "unknown"
    assert row["source_kind"] == "missing"
    assert pd.isna(row["resource"])
    assert pd.isna(row["account"])


def test_missing_time_quarantined() -> None:
    record = audit_event()
    del record["time"]
    result = read_bytes(orjson.dumps(record), "memory")
    assert [q.reason for q in result.quarantined] == ["invalid_time"]

    record.pop("category")
    result = read_bytes(orjson.dumps(record), "memory")
    assert [q.reason for q in result.quarantined] == ["invalid_time"]


def test_status_code_as_text_and_float() -> None:
    text_status = audit_event()
    text_status["properties"] = dict(text_status["properties"], httpStatusCode="403")
    assert first_value(read_one(text_status), "failure_reason") == "denied"
    float_status = audit_event()
    float_status["properties"] = dict(float_status["properties"], httpStatusCode=404.0)
    assert first_value(read_one(float_status), "failure_reason") == "not_found"


# --- fields of the wrong JSON type ------------------------------------------------------------

AZURE_WRONG_TYPE_CASES = [
    (
        "status code text",
        {"properties": {"httpStatusCode": "forbidden", "id": f"{VAULT}/secrets/db"}},
        "field properties.httpStatusCode: expected a whole number or numeric text, "
        "found text that is not a whole number",
    ),
    (
        "status code object",
        {"properties": {"httpStatusCode": {"value": 403}}},
        "field properties.httpStatusCode: expected a whole number or numeric text, found object",
    ),
    (
        "status code boolean",
        {"properties": {"httpStatusCode": True}},
        "field properties.httpStatusCode: expected a whole number or numeric text, found boolean",
    ),
    (
        "identity array",
        {"identity": ["ana@contoso.example"]},
        "field identity: expected an object or its JSON text, found array",
    ),
    (
        "identity text not JSON",
        {"identity": "ana@contoso.example"},
        "field identity: expected an object or its JSON text, found text that is not JSON",
    ),
    (
        "properties number",
        {"properties": 5},
        "field properties: expected an object or its JSON text, found number",
    ),
    (
        "object id number",
        {"properties": {"httpStatusCode": 200, "id": 12}},
        "field properties.id: expected a string, found number",
    ),
    (
        "time number",
        {"time": 1738555506},
        "field time: expected a string, found number",
    ),
]


@pytest.mark.parametrize(
    ("case", "overrides", "detail"),
    AZURE_WRONG_TYPE_CASES,
    ids=[case[0] for case in AZURE_WRONG_TYPE_CASES],
)
def test_wrong_type_quarantined(case: str, overrides: dict[str, Any], detail: str) -> None:
    record = audit_event(**overrides)
    result = read_bytes(orjson.dumps(record), "memory")
    assert result.records == 1
    assert len(result.events) == 0
    assert [(q.reason, q.detail) for q in result.quarantined] == [
        ("invalid_record", f"azure_keyvault: {detail}")
    ]
    assert result.quarantined[0].raw == orjson.dumps(record).decode()


def test_status_code_numeric_text_accepted() -> None:
    events = read_one(
        audit_event(properties={"httpStatusCode": "403", "id": f"{VAULT}/secrets/db"})
    )
    assert first_value(events, "outcome") == "failure"
    assert first_value(events, "failure_reason") == "denied"


def test_diagnostics_status_code_wrong_type() -> None:
    row = {
        "TimeGenerated": "2025-02-03T04:05:06.765Z",
        "OperationName": "SecretGet",
        "ResourceProvider": "MICROSOFT.KEYVAULT",
        "Category": "AuditEvent",
        "httpStatusCode_d": [403],
        "id_s": f"{VAULT}/secrets/db/01",
    }
    result = read_bytes(orjson.dumps(row), "memory")
    assert [(q.reason, q.detail) for q in result.quarantined] == [
        (
            "invalid_record",
            "azure_diagnostics: field httpStatusCode_d: expected a whole number or numeric text, "
            "found array",
        )
    ]


def test_wrong_type_location_null() -> None:
    events = read_one(audit_event(location={"name": "westeurope"}))
    assert pd.isna(first_value(events, "region"))
