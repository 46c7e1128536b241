"""Who made an AWS call and whether it worked: CloudTrail ``userIdentity`` and error codes.

These are the hard cases of the CloudTrail format, kept as small pure functions so that the
record path and the column-wise fast path share them and tests can table them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from pipeline.formats.fields import expect_object, expect_string

__all__ = ["resolve_aws_outcome", "resolve_aws_principal"]

# IAM Identity Center creates its roles under this path and with this name prefix; the role
# session name of such a role is the person's Identity Center user name.
_SSO_ROLE_PREFIX: Final = "AWSReservedSSO_"
_SSO_ROLE_PATH: Final = "/aws-reserved/sso.amazonaws.com/"
_EMAIL: Final = re.compile(r"^[^@\s/]+@[^@\s/]+\.[^@\s/]+$")
_ASSUMED_ROLE_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):sts::(?P<account>[^:]*):assumed-role/(?P<role>[^/]+)/(?P<session>.+)$"
)

_DENIED_CODES: Final = frozenset(
    {
        "UnauthorizedOperation",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
_NOT_FOUND_CODES: Final = frozenset(
    {
        "ResourceNotFoundException",
        "ParameterNotFound",
        "ParameterVersionNotFound",
        "NotFoundException",
        "NoSuchEntity",
        "NoSuchEntityException",
    }
)
_THROTTLED_CODES: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "ThrottledException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
_INVALID_CODES: Final = frozenset(
    {
        "ValidationException",
        "InvalidRequestException",
        "InvalidCiphertextException",
        "IncorrectKeyException",
        "InvalidKeyUsageException",
        "MalformedPolicyDocumentException",
    }
)


def resolve_aws_principal(user_identity: Mapping[str, Any] | None) -> dict[str, str | None]:
    """Resolve a CloudTrail ``userIdentity`` into the event schema's principal columns.

    ``principal`` is the person where one is known (IAM user name, Identity Center or SAML
    session name), else the workload (the role ARN, the AWS service). An ``IAMUser`` whose ARN
    is an assumed-role ARN, which AWS's own Secrets Manager examples contain, is resolved by
    its ARN.

    Returns:
        A dict with ``principal``, ``principal_type``, ``principal_arn``, ``principal_id`` and
        ``session_name``; values are None where the record does not name them.

    Raises:
        RecordError: an identity field is not a string, or a nested part is not an object.
    """
    identity = user_identity if isinstance(user_identity, Mapping) else {}
    kind = _identity_text(identity, "type")
    arn = _identity_text(identity, "arn")
    principal_id = _identity_text(identity, "principalId")
    account = _identity_text(identity, "accountId")
    user_name = _identity_text(identity, "userName")
    invoked_by = _identity_text(identity, "invokedBy")
    resolved: dict[str, str | None] = {
        "principal": None,
        "principal_type": "unknown",
        "principal_arn": arn,
        "principal_id": principal_id,
        "session_name": None,
    }

    assumed = _ASSUMED_ROLE_ARN.match(arn) if arn else None
    if kind == "AssumedRole" or (assumed and kind in {None, "IAMUser", "Unknown"}):
        _resolve_assumed_role(identity, assumed, resolved)
    elif kind == "IAMUser":
        resolved["principal"] = user_name or _arn_last_part(arn) or principal_id
        resolved["principal_type"] = "user"
    elif kind == "Root":
        resolved["principal"] = arn or (f"arn:aws:iam::{account}:root" if account else None)
        resolved["principal_type"] = "root"
    elif kind in {"SAMLUser", "WebIdentityUser"}:
        resolved["principal"] = user_name or principal_id
        resolved["principal_type"] = "federated"
    elif kind == "FederatedUser":
        resolved["principal"] = arn or principal_id
        resolved["principal_type"] = "federated"
        resolved["session_name"] = _arn_last_part(arn)
    elif kind == "IdentityCenterUser":
        resolved["principal"] = user_name or _identity_center_user(identity) or principal_id
        resolved["principal_type"] = "federated"
    elif kind == "AWSService" or (kind is None and invoked_by):
        resolved["principal"] = invoked_by or principal_id
        resolved["principal_type"] = "service"
    elif kind == "AWSAccount":
        resolved["principal"] = account or principal_id
        resolved["principal_type"] = "unknown"
    else:
        # "Unknown" (for example a console sign-in with a user name that does not exist) and
        # types added after this code was written.
        resolved["principal"] = user_name or arn or principal_id
    return resolved


def _resolve_assumed_role(
    identity: Mapping[str, Any], assumed: re.Match[str] | None, resolved: dict[str, str | None]
) -> None:
    session_context = expect_object(identity.get("sessionContext"), "userIdentity.sessionContext")
    issuer = expect_object(
        session_context.get("sessionIssuer"), "userIdentity.sessionContext.sessionIssuer"
    )
    issuer_arn = expect_string(issuer.get("arn"), "userIdentity.sessionContext.sessionIssuer.arn")
    session = assumed.group("session") if assumed else None
    if session is None:
        principal_id = resolved["principal_id"] or ""
        session = principal_id.split(":", 1)[1] if ":" in principal_id else None
    role_name = assumed.group("role") if assumed else _arn_last_part(issuer_arn)
    role_arn = issuer_arn
    if role_arn is None and assumed:
        role_arn = (
            f"arn:{assumed.group('partition')}:iam::{assumed.group('account')}:role/{role_name}"
        )

    resolved["session_name"] = session
    is_sso = bool(role_name and role_name.startswith(_SSO_ROLE_PREFIX)) or bool(
        issuer_arn and _SSO_ROLE_PATH in issuer_arn
    )
    if session and (is_sso or _EMAIL.match(session)):
        resolved["principal"] = session
        resolved["principal_type"] = "federated"
    else:
        resolved["principal"] = role_arn or resolved["principal_arn"] or resolved["principal_id"]
        resolved["principal_type"] = "role"


def _identity_center_user(identity: Mapping[str, Any]) -> str | None:
    on_behalf = expect_object(identity.get("onBehalfOf"), "userIdentity.onBehalfOf")
    return expect_string(on_behalf.get("userId"), "userIdentity.onBehalfOf.userId")


def resolve_aws_outcome(
    error_code: str | None, error_message: str | None
) -> tuple[str, str | None]:
    """Classify a CloudTrail call's result from its ``errorCode`` and ``errorMessage``.

    Returns:
        ``(outcome, failure_reason)``: ``("success", None)`` when neither field is present,
        else ``"failure"`` with ``denied``, ``not_found``, ``throttled``, ``invalid`` or
        ``error``. A message without a code (Secrets Manager ``RotationFailed``, console
        sign-in failures) is a failure with reason ``error``.
    """
    code = (error_code or "").strip()
    if not code:
        if error_message and error_message.strip():
            return "failure", "error"
        return "success", None
    # EC2 prefixes some codes with "Client." or "Server."; KMS sometimes with "KMS.".
    bare = code.split(".", 1)[1] if code.startswith(("Client.", "Server.", "KMS.")) else code
    if bare.startswith("AccessDenied") or "Unauthorized" in bare or bare in _DENIED_CODES:
        return "failure", "denied"
    if bare in _NOT_FOUND_CODES or bare.endswith(("NotFoundException", "NotFound")):
        return "failure", "not_found"
    if bare in _THROTTLED_CODES:
        return "failure", "throttled"
    if bare in _INVALID_CODES or bare.startswith("InvalidParameter"):
        return "failure", "invalid"
    return "failure", "error"


def _identity_text(identity: Mapping[str, Any], key: str) -> str | None:
    return expect_string(identity.get(key), f"userIdentity.{key}")


def _arn_last_part(arn: str | None) -> str | None:
    if not arn:
        return None
    resource = arn.split(":", 5)[-1]
    return resource.rsplit("/", 1)[-1] or None
