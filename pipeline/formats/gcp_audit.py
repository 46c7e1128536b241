"""Google Cloud Audit Logs (``LogEntry`` records whose payload is an ``AuditLog``).

Entries may come as ``gcloud logging read --format=json`` writes them (an array), as log sinks
export them (one entry per line) or as the Logging API returns them (``{"entries": [...]}``,
which the reader unwraps). Panther's copies are read too: they rename ``@type`` to ``at_type``
or ``at_sign_type`` and write timestamps with a space. Only Secret Manager calls and Cloud KMS
decrypts become events, and every other audited call is skipped as ``not_secret_activity``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pipeline.formats.base import LogFormat, RecordError, Row, Skip, register
from pipeline.formats.fields import (
    expect_array,
    expect_object,
    expect_string,
    json_type,
    loose_text,
)
from pipeline.formats.ip import classify_address

__all__ = [
    "AUDIT_LOG_TYPE",
    "GcpAuditFormat",
    "canonical_time",
    "resolve_gcp_outcome",
    "resolve_gcp_principal",
    "split_gcp_resource",
]

logger = logging.getLogger(__name__)

AUDIT_LOG_TYPE: Final = "type.googleapis.com/google.cloud.audit.AuditLog"
# Keys that carry the payload type: the protobuf JSON name and Panther's renamed copies.
_TYPE_KEYS: Final = ("@type", "at_type", "at_sign_type")

SECRET_MANAGER_SERVICE: Final = "secretmanager.googleapis.com"
KMS_SERVICE: Final = "cloudkms.googleapis.com"

# Secret Manager method (last dotted part of methodName, same in v1 and v1beta1) -> action.
SECRET_MANAGER_ACTIONS: Final[dict[str, str]] = {
    "AccessSecretVersion": "read",
    "ListSecrets": "list",
    "ListSecretVersions": "list",
    "GetSecret": "describe",
    "GetSecretVersion": "describe",
    "GetIamPolicy": "describe",
    "TestIamPermissions": "describe",
    "CreateSecret": "write",
    "AddSecretVersion": "write",
    "UpdateSecret": "write",
    "EnableSecretVersion": "write",
    "DisableSecretVersion": "write",
    "DeleteSecret": "delete",
    "DestroySecretVersion": "delete",
    "SetIamPolicy": "policy",
}
# Cloud KMS methods that turn ciphertext back into plaintext. Encrypt, key management and IAM
# calls on keys are not secret reads and are skipped.
KMS_DECRYPT_METHODS: Final = frozenset({"Decrypt", "AsymmetricDecrypt", "RawDecrypt"})

# google.rpc.Code values -> failure_reason. Codes not listed here are "error".
_FAILURE_BY_CODE: Final[dict[int, str]] = {
    3: "invalid",  # INVALID_ARGUMENT
    5: "not_found",  # NOT_FOUND
    6: "invalid",  # ALREADY_EXISTS, a request that conflicts with the current state
    7: "denied",  # PERMISSION_DENIED
    8: "throttled",  # RESOURCE_EXHAUSTED
    9: "invalid",  # FAILED_PRECONDITION
    11: "invalid",  # OUT_OF_RANGE
    16: "denied",  # UNAUTHENTICATED
}

_TIMESTAMP: Final = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]00:?00)?$"
)
_PROJECT_IN_NAME: Final = re.compile(r"(?:^|/)projects/([^/]+)")
_LOCATION_IN_NAME: Final = re.compile(r"(?:^|/)locations/([^/]+)")
# Secret Manager resource names, global or regional, optionally naming a version.
_SECRET_NAME: Final = re.compile(
    r"^(?P<secret>projects/[^/]+(?:/locations/[^/]+)?/secrets/[^/]+)(?:/versions/(?P<version>[^/]+))?"
)
_KMS_KEY_NAME: Final = re.compile(
    r"^(?P<key>projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+)"
    r"(?:/cryptoKeyVersions/(?P<version>[^/]+))?"
)
# Google-managed service agents: service-<project number>@..., <project number>@cloudservices...,
# and every address in a gcp-sa-* domain.
_SERVICE_AGENT: Final = re.compile(
    r"^(service-\d{6,}[@-]|\d+@cloudservices\.gserviceaccount\.com$)|@gcp-sa-[^@]*$", re.I
)


def canonical_time(value: Any) -> str | None:
    """Return a provider timestamp in one spelling, so one event read twice gets one id.

    UTC timestamps with ``T`` or a space, 0 to 9 fractional digits and ``Z``, ``+00:00`` or no
    zone become ``YYYY-MM-DDTHH:MM:SS.fffffffffZ``. Anything else is returned stripped but
    unchanged, and None stays None.
    """
    if value is None:
        return None
    text = str(value).strip()
    match = _TIMESTAMP.match(text)
    if match is None:
        return text
    date, clock, fraction, _zone = match.groups()
    return f"{date}T{clock}.{(fraction or '').ljust(9, '0')}Z"


def resolve_gcp_principal(
    authentication_info: Mapping[str, Any] | None,
    delegation_chain: Sequence[Any] | None = None,
) -> dict[str, str | None]:
    """Resolve who made a call from ``protoPayload.authenticationInfo``.

    Args:
        authentication_info: the ``authenticationInfo`` object, or None when the entry has none.
        delegation_chain: ``protoPayload.metadata.identityDelegationChain`` when present.

    Returns:
        ``principal``, ``principal_type``, ``principal_arn`` and ``principal_id``. A person's
        email is a ``user``. A ``*.gserviceaccount.com`` address is a ``service_account``, or a
        ``service`` when it is a Google-managed service agent. A workload identity federation
        subject (``principal://``, ``principalSet://``) is ``federated``. With no identity the
        principal is ``"unknown"``. ``principal_arn`` is ``principalSubject`` or else
        ``principalEmail``. ``principal_id`` is the first identity in the delegation chain when
        the call was made by impersonating a service account.

    Raises:
        RecordError: ``authenticationInfo`` is not an object, or its principal is not a string.
    """
    info = expect_object(authentication_info, "protoPayload.authenticationInfo")
    email = _strip(expect_string(info.get("principalEmail"), _AUTH + ".principalEmail"))
    subject = _strip(expect_string(info.get("principalSubject"), _AUTH + ".principalSubject"))
    first_delegate = _first_delegate(info.get("serviceAccountDelegationInfo"), delegation_chain)

    if email is not None:
        principal, principal_type = email, _email_type(email)
    elif subject is not None:
        principal, principal_type = _subject_identity(subject)
    else:
        principal, principal_type = "unknown", "unknown"

    return {
        "principal": principal,
        "principal_type": principal_type,
        "principal_arn": subject or email,
        "principal_id": first_delegate,
    }


def resolve_gcp_outcome(status: Any, authorization_info: Any = None) -> dict[str, str | None]:
    """Resolve whether a call succeeded from ``protoPayload.status`` and ``authorizationInfo``.

    A missing or empty status, or code 0, is a success unless an ``authorizationInfo`` entry
    has ``granted: false``, which is a denial. Other codes are google.rpc.Code values mapped
    to ``failure_reason`` (7 and 16 denied, 5 not_found, 8 throttled, 3, 6, 9 and 11 invalid,
    the rest error). ``error_code`` is the numeric code as text, such as ``"7"``, and
    ``error_message`` is ``status.message``.

    Returns:
        ``outcome``, ``failure_reason``, ``error_code`` and ``error_message``.

    Raises:
        RecordError: ``status`` is not an object, its ``code`` is not an integer, its
            ``message`` not a string, ``authorizationInfo`` not an array or a ``granted``
            value not a boolean.
    """
    status_map = expect_object(status, "protoPayload.status")
    message = _strip(expect_string(status_map.get("message"), "protoPayload.status.message"))
    code = _status_code(status_map.get("code"))

    if code is None or code == 0:
        # Proto3 JSON omits a zero code, so a status with only a message is still OK.
        if _any_denied(authorization_info):
            return _outcome("failure", "denied", None, message)
        return _outcome("success", None, None, None)
    return _outcome("failure", _FAILURE_BY_CODE.get(code, "error"), str(code), message)


def split_gcp_resource(name: str | None) -> tuple[str | None, str | None]:
    """Split a Secret Manager or Cloud KMS resource name into (resource, version).

    ``projects/p/secrets/s/versions/3`` becomes ``("projects/p/secrets/s", "3")`` and a KMS
    ``.../cryptoKeys/k/cryptoKeyVersions/1`` becomes the key and ``"1"``. A project (or
    project and location), the parent of list calls, is returned whole with no version. Other
    names are returned unchanged.
    """
    if not name:
        return None, None
    name = name.strip("/")
    secret = _SECRET_NAME.match(name)
    if secret:
        return secret.group("secret"), secret.group("version")
    key = _KMS_KEY_NAME.match(name)
    if key:
        return key.group("key"), key.group("version")
    return name, None


@register
class GcpAuditFormat(LogFormat):
    """Cloud Audit Logs ``LogEntry`` records for Secret Manager and Cloud KMS decrypts."""

    id = "gcp_audit"
    cloud = "gcp"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Accept a LogEntry whose payload is an AuditLog, by its type or its fields."""
        payload = _payload(record)
        if payload is None:
            return False
        if any(payload.get(key) == AUDIT_LOG_TYPE for key in _TYPE_KEYS):
            return True
        return "serviceName" in payload and "methodName" in payload

    def normalize(self, record: Mapping[str, Any], origin: str) -> list[Row] | Skip:
        """Turn one audit entry into one event row, or skip a call that touches no secret."""
        payload = _payload(record) or {}
        service_name = _strip(expect_string(payload.get("serviceName"), "protoPayload.serviceName"))
        method = _short_method(
            _strip(expect_string(payload.get("methodName"), "protoPayload.methodName"))
        )

        if service_name == SECRET_MANAGER_SERVICE:
            service = "secretmanager"
            # NOTE: methods missing from the table (new API calls) are kept as "other".
            action = SECRET_MANAGER_ACTIONS.get(method or "", "other")
        elif service_name == KMS_SERVICE and method in KMS_DECRYPT_METHODS:
            service, action = "kms", "decrypt"
        else:
            return Skip("not_secret_activity")

        labels = _mapping(_mapping(record.get("resource")).get("labels"))
        request_metadata = expect_object(
            payload.get("requestMetadata"), "protoPayload.requestMetadata"
        )
        resource_name = _resource_name(payload, labels)
        resource, version = split_gcp_resource(resource_name)
        principal = resolve_gcp_principal(
            payload.get("authenticationInfo"),
            _mapping(payload.get("metadata")).get("identityDelegationChain"),
        )
        outcome = resolve_gcp_outcome(payload.get("status"), payload.get("authorizationInfo"))
        caller = _strip(
            expect_string(
                request_metadata.get("callerIp") or request_metadata.get("callerIP"),
                "protoPayload.requestMetadata.callerIp",
            )
        )
        source_ip, source_kind = classify_address(caller)
        # The request time is when the call happened and receiveTimestamp is when Logging got
        # the entry, so the request time is preferred when the entry has no timestamp.
        attributes = expect_object(
            request_metadata.get("requestAttributes"),
            "protoPayload.requestMetadata.requestAttributes",
        )
        time = (
            _strip(expect_string(record.get("timestamp"), "timestamp"))
            or _strip(
                expect_string(
                    attributes.get("time"), "protoPayload.requestMetadata.requestAttributes.time"
                )
            )
            or _strip(expect_string(record.get("receiveTimestamp"), "receiveTimestamp"))
        )
        insert_id = _strip(expect_string(record.get("insertId"), "insertId"))

        row: Row = {
            "event_uid": _event_uid(
                record, payload, time, principal["principal"], caller, insert_id
            ),
            "time": time,
            "cloud": self.cloud,
            "log_format": self.id,
            "service": service,
            "operation": method,
            "action": action,
            **outcome,
            **principal,
            "account": _project(labels, resource_name, _text(record.get("logName"))),
            "region": _region(labels, resource_name),
            "resource": resource,
            "resource_version": version,
            "source_ip": source_ip,
            "source_kind": source_kind,
            "source_raw": caller,
            "user_agent": _strip(loose_text(request_metadata.get("callerSuppliedUserAgent"))),
            "origin": origin,
        }
        return [row]


def _payload(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    payload = record.get("protoPayload")
    if isinstance(payload, Mapping):
        return payload
    # Some pipelines re-emit audit entries as structured logs with the AuditLog in jsonPayload.
    payload = record.get("jsonPayload")
    if isinstance(payload, Mapping) and any(payload.get(k) == AUDIT_LOG_TYPE for k in _TYPE_KEYS):
        return payload
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    """Return a non-empty string value, or None for a missing, empty or non-scalar value."""
    if value is None or isinstance(value, (Mapping, list)):
        return None
    text = str(value).strip()
    return text or None


def _status_code(value: Any) -> int | None:
    """Return ``status.code`` as an int; proto3 JSON writes an int32 as a number or digit text."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise RecordError("protoPayload.status.code", f"expected an integer, found {json_type(value)}")


def _strip(value: str | None) -> str | None:
    """Return a string without surrounding whitespace, None when nothing is left."""
    if value is None:
        return None
    return value.strip() or None


# Field path prefix of the caller's identity in an audit entry.
_AUTH: Final = "protoPayload.authenticationInfo"


def _short_method(method: str | None) -> str | None:
    if method is None:
        return None
    return method.rsplit(".", 1)[-1]


def _email_type(email: str) -> str:
    lowered = email.lower()
    if not lowered.endswith(".gserviceaccount.com"):
        return "user"
    if _SERVICE_AGENT.search(lowered):
        return "service"
    return "service_account"


def _subject_identity(subject: str) -> tuple[str, str]:
    kind, _, value = subject.partition(":")
    if subject.startswith(("principal://", "principalSet://")):
        return subject, "federated"
    if kind == "user" and value:
        return value, "user"
    if kind == "serviceAccount" and value:
        return value, _email_type(value)
    return subject, "unknown"


def _first_delegate(delegation_info: Any, delegation_chain: Sequence[Any] | None) -> str | None:
    """Return the identity that started an impersonation chain, if the entry names one."""
    if isinstance(delegation_info, list):
        for entry in delegation_info:
            entry = _mapping(entry)
            for key in ("firstPartyPrincipal", "thirdPartyPrincipal"):
                party = _mapping(entry.get(key))
                found = _text(party.get("principalEmail")) or _text(party.get("principalSubject"))
                if found is None:
                    claims = _mapping(party.get("thirdPartyClaims"))
                    found = _text(claims.get("subject")) or _text(claims.get("principal"))
                if found is not None:
                    return found
            found = _text(entry.get("principalSubject"))
            if found is not None:
                return found
    if isinstance(delegation_chain, list):
        for item in delegation_chain:
            found = _text(item)
            if found is not None:
                return found
    return None


def _any_denied(authorization_info: Any) -> bool:
    entries = expect_array(authorization_info, "protoPayload.authorizationInfo") or []
    denied = False
    for item in entries:
        entry = expect_object(item, "protoPayload.authorizationInfo[]")
        granted = entry.get("granted")
        if granted is not None and not isinstance(granted, bool):
            raise RecordError(
                "protoPayload.authorizationInfo[].granted",
                f"expected a boolean, found {json_type(granted)}",
            )
        denied = denied or granted is False
    return denied


def _outcome(
    outcome: str, reason: str | None, code: str | None, message: str | None
) -> dict[str, str | None]:
    return {
        "outcome": outcome,
        "failure_reason": reason,
        "error_code": code,
        "error_message": message,
    }


def _resource_name(payload: Mapping[str, Any], labels: Mapping[str, Any]) -> str | None:
    """Return the most specific resource name the entry gives, in order of trust."""
    name = _strip(expect_string(payload.get("resourceName"), "protoPayload.resourceName"))
    if name:
        return name
    name = _text(_mapping(payload.get("request")).get("name"))
    if name:
        return name
    for item in payload.get("authorizationInfo") or []:
        item = _mapping(item)
        name = _text(item.get("resource")) or _text(
            _mapping(item.get("resourceAttributes")).get("name")
        )
        if name:
            return name
    project = _text(labels.get("project_id"))
    secret = _text(labels.get("secret_id"))
    if project and secret:
        return f"projects/{project}/secrets/{secret}"
    return None


def _project(
    labels: Mapping[str, Any], resource_name: str | None, log_name: str | None
) -> str | None:
    project = _text(labels.get("project_id"))
    if project:
        return project
    for name in (resource_name, log_name):
        match = _PROJECT_IN_NAME.search(name or "")
        if match and match.group(1) != "-":
            return match.group(1)
    # Organization and folder log names (organizations/123/logs/...) name no project.
    return None


def _region(labels: Mapping[str, Any], resource_name: str | None) -> str | None:
    location = _text(labels.get("location"))
    if location:
        return location
    match = _LOCATION_IN_NAME.search(resource_name or "")
    return match.group(1) if match else None


def _event_uid(
    record: Mapping[str, Any],
    payload: Mapping[str, Any],
    time: str | None,
    principal: str | None,
    caller: str | None,
    insert_id: str | None,
) -> str:
    """Hash insertId, logName and timestamp, the triple that identifies a LogEntry.

    Cloud Logging treats entries of one project with the same timestamp and insertId as
    duplicates (LogEntry.insertId in the Logging API reference), so the triple names one entry
    however it was exported.
    """
    if insert_id is not None:
        parts = [insert_id, _text(record.get("logName")), canonical_time(record.get("timestamp"))]
    else:
        # NOTE: without insertId, two identical calls by one caller in the same nanosecond
        # get the same id and are deduplicated into one event.
        parts = [
            canonical_time(time),
            _text(payload.get("serviceName")),
            _text(payload.get("methodName")),
            _text(payload.get("resourceName")),
            principal,
            caller,
        ]
    joined = "\x1f".join(part or "" for part in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]
