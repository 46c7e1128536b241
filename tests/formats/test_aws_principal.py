"""Table tests of CloudTrail identity and outcome resolution."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.formats.aws_identity import resolve_aws_outcome, resolve_aws_principal

ACCOUNT = "210987654321"

SSO_ISSUER = {
    "type": "Role",
    "principalId": "AROAEXAMPLESSO",
    "arn": f"arn:aws:iam::{ACCOUNT}:role/aws-reserved/sso.amazonaws.com/eu-west-1/"
    "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b",
    "accountId": ACCOUNT,
    "userName": "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b",
}

PRINCIPAL_CASES: list[tuple[str, dict[str, Any] | None, dict[str, str | None]]] = [
    (
        "iam_user_with_user_name",
        {
            "type": "IAMUser",
            "principalId": "AIDAEXAMPLE1",
            "arn": f"arn:aws:iam::{ACCOUNT}:user/ops/maria",
            "accountId": ACCOUNT,
            "userName": "maria",
        },
        {
            "principal": "maria",
            "principal_type": "user",
            "principal_arn": f"arn:aws:iam::{ACCOUNT}:user/ops/maria",
            "principal_id": "AIDAEXAMPLE1",
            "session_name": None,
        },
    ),
    (
        "iam_user_name_from_arn",
        {"type": "IAMUser", "arn": f"arn:aws:iam::{ACCOUNT}:user/ops/maria"},
        {
            "principal": "maria",
            "principal_type": "user",
            "principal_arn": f"arn:aws:iam::{ACCOUNT}:user/ops/maria",
            "principal_id": None,
            "session_name": None,
        },
    ),
    (
        "iam_user_without_arn",
        {"type": "IAMUser", "principalId": "AIDAEXAMPLE2", "accessKeyId": "", "userName": "li"},
        {
            "principal": "li",
            "principal_type": "user",
            "principal_arn": None,
            "principal_id": "AIDAEXAMPLE2",
            "session_name": None,
        },
    ),
    (
        "assumed_role_with_issuer",
        {
            "type": "AssumedRole",
            "principalId": "AROAEXAMPLE3:batch-7",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/etl-runner/batch-7",
            "sessionContext": {
                "sessionIssuer": {
                    "type": "Role",
                    "arn": f"arn:aws:iam::{ACCOUNT}:role/service/etl-runner",
                    "userName": "etl-runner",
                }
            },
        },
        {
            "principal": f"arn:aws:iam::{ACCOUNT}:role/service/etl-runner",
            "principal_type": "role",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/etl-runner/batch-7",
            "principal_id": "AROAEXAMPLE3:batch-7",
            "session_name": "batch-7",
        },
    ),
    (
        "assumed_role_empty_issuer",
        {
            "type": "AssumedRole",
            "principalId": "AROAEXAMPLE4:i-0abc1234def567890",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/web-node/i-0abc1234def567890",
            "sessionContext": {"sessionIssuer": {}, "attributes": {"mfaAuthenticated": "false"}},
        },
        {
            "principal": f"arn:aws:iam::{ACCOUNT}:role/web-node",
            "principal_type": "role",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/web-node/i-0abc1234def567890",
            "principal_id": "AROAEXAMPLE4:i-0abc1234def567890",
            "session_name": "i-0abc1234def567890",
        },
    ),
    (
        "assumed_role_without_session_context",
        {
            "type": "AssumedRole",
            "arn": f"arn:aws-us-gov:sts::{ACCOUNT}:assumed-role/deployer/ci-42",
        },
        {
            "principal": f"arn:aws-us-gov:iam::{ACCOUNT}:role/deployer",
            "principal_type": "role",
            "principal_arn": f"arn:aws-us-gov:sts::{ACCOUNT}:assumed-role/deployer/ci-42",
            "principal_id": None,
            "session_name": "ci-42",
        },
    ),
    (
        "sso_session_email",
        {
            "type": "AssumedRole",
            "principalId": "AROAEXAMPLESSO:ana@example.org",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/"
            "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b/ana@example.org",
            "sessionContext": {"sessionIssuer": SSO_ISSUER},
        },
        {
            "principal": "ana@example.org",
            "principal_type": "federated",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/"
            "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b/ana@example.org",
            "principal_id": "AROAEXAMPLESSO:ana@example.org",
            "session_name": "ana@example.org",
        },
    ),
    (
        "sso_session_user_name",
        {
            "type": "AssumedRole",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/"
            "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b/ana.silva",
            "sessionContext": {"sessionIssuer": SSO_ISSUER},
        },
        {
            "principal": "ana.silva",
            "principal_type": "federated",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/"
            "AWSReservedSSO_ReadOnly_1a2b3c4d5e6f7a8b/ana.silva",
            "principal_id": None,
            "session_name": "ana.silva",
        },
    ),
    (
        "saml_role_session_email",
        {
            "type": "AssumedRole",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/okta-admins/tom@example.net",
        },
        {
            "principal": "tom@example.net",
            "principal_type": "federated",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/okta-admins/tom@example.net",
            "principal_id": None,
            "session_name": "tom@example.net",
        },
    ),
    (
        "iam_user_type_assumed_role_arn",
        {
            "type": "IAMUser",
            "principalId": "AROAEXAMPLE5:kim",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/Admin/kim",
            "invokedBy": "secretsmanager.amazonaws.com",
        },
        {
            "principal": f"arn:aws:iam::{ACCOUNT}:role/Admin",
            "principal_type": "role",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/Admin/kim",
            "principal_id": "AROAEXAMPLE5:kim",
            "session_name": "kim",
        },
    ),
    (
        "saml_user",
        {"type": "SAMLUser", "principalId": "SAMLEXAMPLE:jo", "userName": "jo@example.com"},
        {
            "principal": "jo@example.com",
            "principal_type": "federated",
            "principal_arn": None,
            "principal_id": "SAMLEXAMPLE:jo",
            "session_name": None,
        },
    ),
    (
        "web_identity_user",
        {"type": "WebIdentityUser", "principalId": "accounts.google.com:app:1234"},
        {
            "principal": "accounts.google.com:app:1234",
            "principal_type": "federated",
            "principal_arn": None,
            "principal_id": "accounts.google.com:app:1234",
            "session_name": None,
        },
    ),
    (
        "federated_user",
        {
            "type": "FederatedUser",
            "principalId": f"{ACCOUNT}:partner-tool",
            "arn": f"arn:aws:sts::{ACCOUNT}:federated-user/partner-tool",
        },
        {
            "principal": f"arn:aws:sts::{ACCOUNT}:federated-user/partner-tool",
            "principal_type": "federated",
            "principal_arn": f"arn:aws:sts::{ACCOUNT}:federated-user/partner-tool",
            "principal_id": f"{ACCOUNT}:partner-tool",
            "session_name": "partner-tool",
        },
    ),
    (
        "root_with_arn",
        {"type": "Root", "principalId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:root"},
        {
            "principal": f"arn:aws:iam::{ACCOUNT}:root",
            "principal_type": "root",
            "principal_arn": f"arn:aws:iam::{ACCOUNT}:root",
            "principal_id": ACCOUNT,
            "session_name": None,
        },
    ),
    (
        "root_without_arn",
        {"type": "Root", "accountId": ACCOUNT},
        {
            "principal": f"arn:aws:iam::{ACCOUNT}:root",
            "principal_type": "root",
            "principal_arn": None,
            "principal_id": None,
            "session_name": None,
        },
    ),
    (
        "aws_service",
        {"type": "AWSService", "invokedBy": "lambda.amazonaws.com"},
        {
            "principal": "lambda.amazonaws.com",
            "principal_type": "service",
            "principal_arn": None,
            "principal_id": None,
            "session_name": None,
        },
    ),
    (
        "only_invoked_by",
        {"accountId": ACCOUNT, "invokedBy": "secretsmanager.amazonaws.com"},
        {
            "principal": "secretsmanager.amazonaws.com",
            "principal_type": "service",
            "principal_arn": None,
            "principal_id": None,
            "session_name": None,
        },
    ),
    (
        "aws_account",
        {"type": "AWSAccount", "principalId": "AIDAOTHER", "accountId": "999988887777"},
        {
            "principal": "999988887777",
            "principal_type": "unknown",
            "principal_arn": None,
            "principal_id": "AIDAOTHER",
            "session_name": None,
        },
    ),
    (
        "unknown_type",
        {"type": "Unknown", "principalId": "ghost", "userName": "no-such-user"},
        {
            "principal": "no-such-user",
            "principal_type": "unknown",
            "principal_arn": None,
            "principal_id": "ghost",
            "session_name": None,
        },
    ),
    (
        "identity_missing",
        None,
        {
            "principal": None,
            "principal_type": "unknown",
            "principal_arn": None,
            "principal_id": None,
            "session_name": None,
        },
    ),
]


@pytest.mark.parametrize(
    ("identity", "expected"),
    [(identity, expected) for _, identity, expected in PRINCIPAL_CASES],
    ids=[name for name, _, _ in PRINCIPAL_CASES],
)
def test_resolve_principal(
    identity: dict[str, Any] | None, expected: dict[str, str | None]
) -> None:
    assert resolve_aws_principal(identity) == expected


def test_resolve_principal_ignores_non_mapping() -> None:
    resolved = resolve_aws_principal("not-an-identity")  # type: ignore[arg-type]
    assert resolved["principal"] is None
    assert resolved["principal_type"] == "unknown"


OUTCOME_CASES = [
    ("no_error", None, None, ("success", None)),
    ("empty_code", "", None, ("success", None)),
    ("access_denied", "AccessDenied", "User is not authorized", ("failure", "denied")),
    ("access_denied_exception", "AccessDeniedException", None, ("failure", "denied")),
    ("kms_access_denied", "KMS.AccessDeniedException", None, ("failure", "denied")),
    ("ec2_unauthorized", "Client.UnauthorizedOperation", None, ("failure", "denied")),
    ("unauthorized_inside", "UnauthorizedAccess", None, ("failure", "denied")),
    ("expired_token", "ExpiredTokenException", None, ("failure", "denied")),
    ("resource_not_found", "ResourceNotFoundException", None, ("failure", "not_found")),
    ("parameter_not_found", "ParameterNotFound", None, ("failure", "not_found")),
    ("parameter_version_not_found", "ParameterVersionNotFound", None, ("failure", "not_found")),
    ("trail_not_found", "TrailNotFoundException", None, ("failure", "not_found")),
    ("throttling", "ThrottlingException", "Rate exceeded", ("failure", "throttled")),
    ("too_many_requests", "TooManyRequestsException", None, ("failure", "throttled")),
    ("request_limit", "RequestLimitExceeded", None, ("failure", "throttled")),
    ("validation", "ValidationException", None, ("failure", "invalid")),
    ("invalid_parameter", "InvalidParameterException", None, ("failure", "invalid")),
    ("invalid_request", "InvalidRequestException", None, ("failure", "invalid")),
    ("invalid_ciphertext", "InvalidCiphertextException", None, ("failure", "invalid")),
    ("decryption_failure", "DecryptionFailure", None, ("failure", "error")),
    ("internal_error", "InternalServiceError", None, ("failure", "error")),
    ("message_only", None, "Error when executing lambda", ("failure", "error")),
    ("blank_message_only", None, "  ", ("success", None)),
]


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [(code, message, expected) for _, code, message, expected in OUTCOME_CASES],
    ids=[name for name, _, _, _ in OUTCOME_CASES],
)
def test_resolve_outcome(
    code: str | None, message: str | None, expected: tuple[str, str | None]
) -> None:
    assert resolve_aws_outcome(code, message) == expected
