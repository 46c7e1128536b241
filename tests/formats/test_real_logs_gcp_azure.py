"""Read every public GCP and Azure sample log and check the exact counts per file.

The samples are real records that other projects published (documentation examples, parser and
detection-rule tests), kept in a real_logs folder beside this repository. The tests are skipped
when that folder is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from pipeline.formats import read_paths
from pipeline.formats.azure_keyvault import normalize_claims, resolve_azure_principal
from pipeline.formats.gcp_audit import resolve_gcp_outcome, resolve_gcp_principal
from pipeline.formats.ip import classify_address
from pipeline.schema import check_events

REAL_LOGS = Path(__file__).parents[2].parent / "shared" / "real_logs"

pytestmark = pytest.mark.skipif(not REAL_LOGS.is_dir(), reason=f"{REAL_LOGS} not found")

# file name -> (events, records, quarantined by reason, skipped by kind)
EXPECTED: dict[str, tuple[int, int, dict[str, int], dict[str, int]]] = {
    "gcp/elastic-integrations__gcp-audit__test-iamcredentials-googleapis-com.log": (
        0,
        1,
        {},
        {"not_secret_activity": 1},
    ),
    "gcp/elastic-integrations__gcp-audit__test-sdh-3695.log": (
        0,
        1,
        {},
        {"not_secret_activity": 1},
    ),
    "gcp/panther-analysis__gcp_iam_sa_get_access_token_privesc__tests.jsonl": (
        0,
        3,
        {},
        {"not_secret_activity": 3},
    ),
    "gcp/panther-analysis__gcp_kms_rules__tests.jsonl": (0, 10, {}, {"not_secret_activity": 10}),
    "gcp/panther-analysis__gcp_vpc_sc_violation__tests.jsonl": (
        0,
        2,
        {},
        {"not_secret_activity": 2},
    ),
    "gcp/stratus-red-team__docs__gcp.credential-access.secretmanager-retrieve-secrets__example.json": (
        1,
        1,
        {},
        {},
    ),
    "azure/google-secops-docs__azure-keyvault-audit-parser__sample1-storage-auditevent-401.json": (
        1,
        1,
        {},
        {},
    ),
    "azure/google-secops-docs__azure-keyvault-audit-parser__sample2-AzureDiagnostics-SecretGet.json": (
        1,
        1,
        {},
        {},
    ),
    "azure/microsoftdocs-azure-docs__key-vault-general-logging-md__records-example.json": (
        1,
        1,
        {},
        {},
    ),
    # Azure Activity log records about vaults: no keytrail format reads the Activity log.
    "azure/panther-analysis__azure_keyvault_monitoractivity_rules__tests.jsonl": (
        0,
        21,
        {"unknown_format": 21},
        {},
    ),
}


def sample_files() -> list[str]:
    if not REAL_LOGS.is_dir():
        return []
    return sorted(
        str(path.relative_to(REAL_LOGS))
        for folder in ("gcp", "azure")
        for path in (REAL_LOGS / folder).iterdir()
        if path.is_file()
    )


def load_first(name: str) -> dict[str, Any]:
    """Return the first record of a sample file (JSON document or first JSON line)."""
    data = (REAL_LOGS / name).read_bytes()
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = orjson.loads(data.splitlines()[0])
    if isinstance(value, dict) and isinstance(value.get("records"), list):
        value = value["records"][0]
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("name", sample_files())
def test_real_log_counts(name: str) -> None:
    assert name in EXPECTED, f"new sample {name}: add its expected counts"
    events, records, quarantined, skipped = EXPECTED[name]
    result = read_paths([REAL_LOGS / name])
    summary = result.summary()
    assert summary["events"] == events
    assert summary["records"] == records
    assert summary["quarantined_by_reason"] == quarantined
    assert summary["skipped_by_kind"] == skipped
    assert check_events(result.events) == []


def test_every_expected_file_present() -> None:
    assert sorted(EXPECTED) == sample_files()


def test_stratus_trimmed_secret_access() -> None:
    name = "gcp/stratus-red-team__docs__gcp.credential-access.secretmanager-retrieve-secrets__example.json"
    row = read_paths([REAL_LOGS / name]).events.iloc[0].to_dict()
    assert row["operation"] == "AccessSecretVersion"
    assert row["action"] == "read"
    assert row["outcome"] == "success"
    # No authenticationInfo in the trimmed record.
    assert row["principal"] == "unknown"
    assert row["principal_type"] == "unknown"
    assert row["account"] == "victim-project"
    assert row["resource"] == "projects/victim-project/secrets/stratus-red-team-retrieve-secret-8"
    assert row["resource_version"] == "latest"
    # No timestamp: the request time is used.
    assert row["time"] == pd.Timestamp("2025-02-02T22:56:34.343726Z")
    assert row["source_ip"] == "7.7.7.7"


def test_workload_identity_principal() -> None:
    record = load_first(
        "gcp/elastic-integrations__gcp-audit__test-iamcredentials-googleapis-com.log"
    )
    payload = record["protoPayload"]
    resolved = resolve_gcp_principal(
        payload["authenticationInfo"], payload["metadata"]["identityDelegationChain"]
    )
    subject = (
        "principal://iam.googleapis.com/projects/project-id/locations/global/"
        "workloadIdentityPools/..."
    )
    assert resolved["principal"] == subject
    assert resolved["principal_type"] == "federated"
    assert resolved["principal_arn"] == subject
    assert resolved["principal_id"] == (
        "projects/-/serviceAccounts/made-up-ci-account@project-id.iam.gserviceaccount.com"
    )


def test_private_caller_ip_and_empty_status() -> None:
    record = load_first("gcp/elastic-integrations__gcp-audit__test-sdh-3695.log")
    payload = record["protoPayload"]
    assert classify_address(payload["requestMetadata"]["callerIp"]) == (None, "internal")
    outcome = resolve_gcp_outcome(payload["status"], payload["authorizationInfo"])
    assert outcome["outcome"] == "success"
    assert resolve_gcp_principal(payload["authenticationInfo"])["principal_type"] == "user"


def test_kms_failed_precondition_outcome() -> None:
    lines = (REAL_LOGS / "gcp/panther-analysis__gcp_kms_rules__tests.jsonl").read_bytes()
    record = orjson.loads(lines.splitlines()[2])
    outcome = resolve_gcp_outcome(record["protoPayload"]["status"])
    assert outcome["failure_reason"] == "invalid"
    assert outcome["error_code"] == "9"
    assert outcome["error_message"] == "key is not enabled, current state is: DISABLED."


def test_signjwt_not_granted_is_denied() -> None:
    name = "gcp/panther-analysis__gcp_iam_sa_get_access_token_privesc__tests.jsonl"
    record = orjson.loads((REAL_LOGS / name).read_bytes().splitlines()[1])
    payload = record["protoPayload"]
    outcome = resolve_gcp_outcome(payload["status"], payload["authorizationInfo"])
    assert outcome["outcome"] == "failure"
    assert outcome["failure_reason"] == "denied"


def test_azure_401_with_empty_identity() -> None:
    name = (
        "azure/google-secops-docs__azure-keyvault-audit-parser__sample1-storage-auditevent-401.json"
    )
    record = load_first(name)
    assert resolve_azure_principal(normalize_claims(record["identity"]), 401)["principal_type"] == (
        "anonymous"
    )
    row = read_paths([REAL_LOGS / name]).events.iloc[0].to_dict()
    assert row["operation"] == "Authentication"
    assert row["action"] == "other"
    assert row["outcome"] == "failure"
    assert row["failure_reason"] == "denied"
    assert row["error_code"] == "401"
    assert row["principal"] == "anonymous"
    assert row["resource"] == "https://example-vault.vault.azure.net"
    assert row["account"] == "00000000-0000-0000-0000-000000000000"


def test_azure_uri_claim_names() -> None:
    name = "azure/microsoftdocs-azure-docs__key-vault-general-logging-md__records-example.json"
    claims = normalize_claims(load_first(name)["identity"])
    assert claims == {
        "oid": "d9da5048-2737-4770-bd64-XXXXXXXXXXXX",
        "upn": "live.com#username@outlook.com",
        "appid": "1950a258-227b-4e31-a9cf-XXXXXXXXXXXX",
    }
    row = read_paths([REAL_LOGS / name]).events.iloc[0].to_dict()
    assert row["principal"] == "username@outlook.com"
    assert row["principal_type"] == "user"
    assert row["principal_id"] == "d9da5048-2737-4770-bd64-XXXXXXXXXXXX"
    assert row["operation"] == "VaultGet"
    assert row["action"] == "describe"
    assert row["resource"] == "https://contosokeyvault.vault.azure.net"
    assert row["account"] == "361da5d4-a47a-4c79-afdd-xxxxxxxxxxxx"
    assert row["source_kind"] == "public"


def test_azure_diagnostics_row() -> None:
    name = "azure/google-secops-docs__azure-keyvault-audit-parser__sample2-AzureDiagnostics-SecretGet.json"
    result = read_paths([REAL_LOGS / name])
    assert dict(result.formats) == {"azure_diagnostics": 1}
    row = result.events.iloc[0].to_dict()
    assert row["log_format"] == "azure_diagnostics"
    assert row["operation"] == "SecretGet"
    assert row["action"] == "read"
    assert row["outcome"] == "success"
    assert row["principal_type"] == "application"
    assert row["principal"] == "00000000-0000-0000-0000-000000000000"
    assert row["resource"] == "https://example-vault.vault.azure.net/secrets/example-secret"
    assert row["resource_version"] == "00000000000000000000000000000000"
    assert row["source_kind"] == "private"
    assert row["user_agent"].startswith("azsdk-net-Security.KeyVault.Secrets/4.3.0")
