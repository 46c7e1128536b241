"""Ingest every public AWS sample log and check the exact counts per file.

Records without ``eventTime`` (Panther rule-test fragments) are quarantined as
``invalid_record``: the format rejects them with ``RecordError("eventTime", "missing")`` before
any row exists, so they never reach the time check that yields ``invalid_time``.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pipeline.formats import read_paths
from pipeline.formats.aws_identity import resolve_aws_principal

REAL_LOGS = Path(__file__).parents[2].parent / "shared" / "real_logs" / "aws"
if not REAL_LOGS.is_dir():
    pytest.skip(f"real logs folder not found: {REAL_LOGS}", allow_module_level=True)

# file -> (records, events, quarantined by reason, skipped by kind)
EXPECTED: dict[str, tuple[int, int, dict[str, int], dict[str, int]]] = {
    "awsdocs-cloudtrail-guide__console-sign-in-events__Records-file.json": (
        1,
        0,
        {},
        {"not_secret_activity": 1},
    ),
    "awsdocs-cloudtrail-guide__console-sign-in-events__examples.jsonl": (
        9,
        0,
        {},
        {"not_secret_activity": 9},
    ),
    "awsdocs-cloudtrail-guide__digest-file-structure__example1.json": (1, 0, {}, {"digest": 1}),
    "awsdocs-cloudtrail-guide__log-file-examples__Records-files.jsonl": (
        8,
        0,
        {},
        {"not_secret_activity": 6, "insight": 2},
    ),
    "awsdocs-cloudtrail-guide__non-api-aws-service-events__kms-RotateKey.json": (
        1,
        0,
        {},
        {"not_secret_activity": 1},
    ),
    "awsdocs-secrets-manager__retrieve-ct-entries__RotationFailed-example.json": (1, 1, {}, {}),
    "awsdocs-secrets-manager__security-encryption__kms-events-invokedBy-secretsmanager.jsonl": (
        2,
        2,
        {},
        {},
    ),
    "elastic-integrations__aws-cloudtrail__test-cloudtrail-digest-json.log": (
        1,
        0,
        {},
        {"digest": 1},
    ),
    "elastic-integrations__aws-cloudtrail__test-get-secret-value-json.log": (1, 1, {}, {}),
    # Three GetParameters records share one eventID; their 27 names hold 11 distinct ones.
    "panther-analysis__aws_ssm_decrypt_ssm_params__tests.jsonl": (5, 13, {}, {"duplicate": 16}),
    "panther-analysis__secretsmanager-retrieve-rules__tests.jsonl": (
        6,
        1,
        {"invalid_record": 5},
        {},
    ),
    "stratus-red-team__detonation-logs__aws.credential-access.ec2-steal-instance-credentials.json": (
        45,
        0,
        {},
        {"not_secret_activity": 45},
    ),
    "stratus-red-team__detonation-logs__aws.credential-access.secretsmanager-batch-retrieve-secrets.json": (
        5,
        5,
        {},
        {},
    ),
    "stratus-red-team__detonation-logs__aws.credential-access.secretsmanager-retrieve-secrets.json": (
        21,
        21,
        {},
        {},
    ),
    "stratus-red-team__detonation-logs__aws.initial-access.console-login-without-mfa.json": (
        1,
        0,
        {},
        {"not_secret_activity": 1},
    ),
}


def test_every_file_has_expectation() -> None:
    names = sorted(path.name for path in REAL_LOGS.iterdir() if path.is_file())
    assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_log_counts(name: str) -> None:
    records, events, quarantined, skipped = EXPECTED[name]
    summary = read_paths([REAL_LOGS / name]).summary()
    assert summary["records"] == records
    assert summary["events"] == events
    assert summary["quarantined_by_reason"] == quarantined
    assert summary["skipped_by_kind"] == skipped


def test_real_logs_values() -> None:
    events = read_paths([REAL_LOGS]).events
    rotation = events[events["operation"] == "RotationFailed"].iloc[0]
    assert rotation["resource"] == (
        "arn:aws:secretsmanager:us-east-2:123456789012:secret:MyDatabaseSecret-a1b2c3"
    )
    assert rotation["failure_reason"] == "error"
    decrypt = events[events["operation"] == "Decrypt"].iloc[0]
    assert decrypt["invoked_by"] == "secretsmanager.amazonaws.com"
    assert decrypt["action"] == "decrypt"
    assert (
        decrypt["resource"]
        == "arn:aws:secretsmanager:us-east-2:111122223333:secret:test-secret-a1b2c3"
    )
    batch = events[events["operation"] == "BatchGetSecretValue"]
    assert set(batch["resource"]) == {"filters:tag-key=StratusRedTeam"}
    stratus = events[events["user_agent"].str.startswith("stratus-red-team_").fillna(False)]
    assert set(stratus["source_kind"]) == {"invalid", "public"}
    denied = events[events["error_code"] == "AccessDenied"].iloc[0]
    assert str(denied["time"]) == "2024-10-17 21:48:45+00:00"
    assert denied["failure_reason"] == "denied"


def _identity(name: str, line: int = 0) -> dict[str, object]:
    text = (REAL_LOGS / name).read_text()
    if name.endswith(".jsonl"):
        record = orjson.loads(text.splitlines()[line])
    else:
        document = orjson.loads(text)
        record = document[line] if isinstance(document, list) else document
    identity = record["userIdentity"]
    assert isinstance(identity, dict)
    return identity


PRINCIPALS = [
    (
        "elastic-integrations__aws-cloudtrail__test-get-secret-value-json.log",
        0,
        ("test@elastic.co", "user", None),
    ),
    (
        "panther-analysis__secretsmanager-retrieve-rules__tests.jsonl",
        0,
        ("evil.genius", "federated", "evil.genius"),
    ),
    (
        "panther-analysis__aws_ssm_decrypt_ssm_params__tests.jsonl",
        0,
        ("bobson.dugnutt", "federated", "bobson.dugnutt"),
    ),
    (
        "awsdocs-secrets-manager__security-encryption__kms-events-invokedBy-secretsmanager.jsonl",
        1,
        ("arn:aws:iam::111122223333:role/Admin", "role", "user01"),
    ),
    (
        "awsdocs-secrets-manager__retrieve-ct-entries__RotationFailed-example.json",
        0,
        ("secretsmanager.amazonaws.com", "service", None),
    ),
    (
        "awsdocs-cloudtrail-guide__console-sign-in-events__examples.jsonl",
        1,
        ("anaya", "user", None),
    ),
    (
        "awsdocs-cloudtrail-guide__console-sign-in-events__examples.jsonl",
        4,
        ("arn:aws:iam::111122223333:root", "root", None),
    ),
    (
        "stratus-red-team__detonation-logs__aws.credential-access.ec2-steal-instance-credentials.json",
        5,
        (
            "arn:aws:iam::017622104382:role/stratus-red-team-ec2-steal-credentials-role",
            "role",
            "i-786a3A8B5C0d92eF4",
        ),
    ),
]


@pytest.mark.parametrize(("name", "line", "expected"), PRINCIPALS)
def test_real_principals(name: str, line: int, expected: tuple[str, str, str | None]) -> None:
    resolved = resolve_aws_principal(_identity(name, line))
    assert (resolved["principal"], resolved["principal_type"], resolved["session_name"]) == expected
