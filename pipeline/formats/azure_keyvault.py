"""Azure Key Vault audit logs (the ``AuditEvent`` diagnostic category), in three shapes.

- ``azure_keyvault``: records as diagnostic settings write them to a storage account
  (``{"records": [...]}`` blobs, or ``PT1H.json`` with one record per line) or to Event Hubs.
- ``azure_diagnostics``: Log Analytics ``AzureDiagnostics`` rows, with PascalCase columns and
  flattened, type-suffixed ones (``id_s``, ``httpStatusCode_d``, ``identity_claim_upn_s``).
- ``azure_kv_resource_specific``: Log Analytics ``AZKVAuditLogs`` rows, where ``Identity`` is
  an object or its JSON text.

Each shape is read into the same :class:`AuditFields`, and one function builds the row, so the
three shapes of one event produce the same row and the same ``event_uid``. Every Key Vault
audit operation is kept, failed authentications included. Azure Activity log records about
vaults (``category: Administrative``, ARM operation names) are not matched by any of these
formats, so the reader quarantines them as ``unknown_format``: keytrail does not read the
Activity log, and a source that delivers it is misconfigured.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from pipeline.formats.base import LogFormat, RecordError, Row, Skip, register
from pipeline.formats.fields import expect_string, json_type, loose_text
from pipeline.formats.gcp_audit import canonical_time
from pipeline.formats.ip import classify_address

__all__ = [
    "AuditFields",
    "AzureDiagnosticsFormat",
    "AzureKeyVaultFormat",
    "AzureKeyVaultResourceSpecificFormat",
    "canonical_vault_resource",
    "keyvault_action",
    "normalize_claims",
    "resolve_azure_outcome",
    "resolve_azure_principal",
]

logger = logging.getLogger(__name__)

# Key Vault operationName -> action. Names not listed fall back to a prefix rule, then "other".
KEYVAULT_ACTIONS: Final[dict[str, str]] = {
    "SecretGet": "read",
    "SecretBackup": "read",
    "KeyBackup": "read",
    "CertificateBackup": "read",
    "KeyRelease": "read",
    "SecretSet": "write",
    "SecretUpdate": "write",
    "SecretRestore": "write",
    "SecretRecover": "write",
    "KeyCreate": "write",
    "KeyImport": "write",
    "KeyUpdate": "write",
    "KeyRestore": "write",
    "KeyRecover": "write",
    "CertificateCreate": "write",
    "CertificateImport": "write",
    "CertificateUpdate": "write",
    "CertificateRestore": "write",
    "CertificateRecover": "write",
    "SecretDelete": "delete",
    "SecretPurge": "delete",
    "KeyDelete": "delete",
    "KeyPurge": "delete",
    "CertificateDelete": "delete",
    "CertificatePurge": "delete",
    "VaultDelete": "delete",
    "VaultPurge": "delete",
    "KeyDecrypt": "decrypt",
    "KeyUnwrap": "decrypt",
    "KeyRotate": "rotate",
    "VaultGet": "describe",
    "KeyGet": "describe",
    "CertificateGet": "describe",
    "SecretGetDeleted": "describe",
    "KeyGetDeleted": "describe",
    "CertificateGetDeleted": "describe",
    "VaultPut": "policy",
    "VaultPatch": "policy",
    "VaultAccessPolicyChangedEventGridNotification": "policy",
    "Authentication": "other",
}
_ACTION_PREFIXES: Final = (
    ("SecretList", "list"),
    ("KeyList", "list"),
    ("CertificateList", "list"),
    ("VaultList", "list"),
    ("CertificatePolicy", "describe"),
    ("CertificateIssuer", "describe"),
)

# Short names for the claims that carry the caller's identity, by the last part of the name.
_CLAIM_ALIASES: Final[dict[str, str]] = {
    "objectidentifier": "oid",
    "upn": "upn",
    "tenantid": "tid",
    "appid": "appid",
}
_CLAIM_COLUMN_SUFFIX: Final = re.compile(r"_(s|g|d|b)$")
_SUBSCRIPTION: Final = re.compile(r"/subscriptions/([^/]+)", re.I)
_VAULT_NAME: Final = re.compile(r"/vaults/([^/]+)", re.I)
# Data-plane hosts of Key Vault and Managed HSM in the public and sovereign clouds.
_VAULT_HOST: Final = re.compile(
    r"^[a-z0-9-]+\.(vault|managedhsm)\.(azure\.net|azure\.cn|usgovcloudapi\.net|"
    r"microsoftazure\.de)$"
)
# Collections in a Key Vault URL. Deleted objects map to the live collection, so a purge or
# recover lands on the same resource as the reads before it.
_COLLECTIONS: Final[dict[str, str]] = {
    "secrets": "secrets",
    "keys": "keys",
    "certificates": "certificates",
    "deletedsecrets": "secrets",
    "deletedkeys": "keys",
    "deletedcertificates": "certificates",
    "storage": "storage",
}


@dataclass(frozen=True)
class AuditFields:
    """The fields of one Key Vault audit event, whatever shape it was stored in."""

    time: str | None
    operation: str | None
    status_code: int | None
    result_type: str | None
    result_signature: str | None
    result_description: str | None
    correlation_id: str | None
    caller_ip: str | None
    claims: dict[str, str] = field(default_factory=dict)
    object_id: str | None = None
    request_uri: str | None = None
    resource_id: str | None = None
    subscription_id: str | None = None
    location: str | None = None
    user_agent: str | None = None


def normalize_claims(raw: Any) -> dict[str, str]:
    """Return the identity claims of a record under short names (``upn``, ``oid``, ``appid``).

    ``raw`` may be the record's ``identity`` object (claims under ``claim``, or ``claims`` as
    some exporters write it), the claims themselves, or either as JSON text. Full claim URIs
    such as ``http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn`` and their Log
    Analytics column forms (``..._claims_upn_s``) are shortened. Empty values are dropped.
    """
    if isinstance(raw, (str, bytes)):
        try:
            raw = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            return {}
    if not isinstance(raw, Mapping):
        return {}
    inner = raw.get("claim", raw.get("claims"))
    if isinstance(inner, (str, bytes)):
        return normalize_claims(inner)
    source = inner if isinstance(inner, Mapping) else raw
    claims: dict[str, str] = {}
    for name, value in source.items():
        text = _text(value)
        if text is None:
            continue
        claims[_claim_name(str(name))] = text
    return claims


def resolve_azure_principal(
    claims: Mapping[str, str], status_code: int | None = None
) -> dict[str, str | None]:
    """Resolve who made a Key Vault call from its identity claims (see :func:`normalize_claims`).

    A UPN is a ``user`` (a guest's ``live.com#`` prefix removed). A managed identity resource
    id (``xms_mirid``) is a ``managed_identity`` named by the last part of that id. An app id
    alone is an ``application``. An object id alone is ``unknown`` with the object id as the
    principal. No claims at all is ``anonymous`` on HTTP 401, when the caller did not
    authenticate, and ``unknown`` otherwise.

    Returns:
        ``principal``, ``principal_type``, ``principal_arn`` (the raw UPN or managed identity
        resource id) and ``principal_id`` (the object id, else the app id).
    """
    upn = claims.get("upn")
    oid = claims.get("oid")
    appid = claims.get("appid")
    mirid = claims.get("xms_mirid")
    principal_id = oid or appid

    if upn is not None:
        return _principal(_strip_guest_prefix(upn), "user", upn, principal_id)
    if mirid is not None:
        name = mirid.rstrip("/").rsplit("/", 1)[-1] or mirid
        return _principal(name, "managed_identity", mirid, principal_id)
    if appid is not None:
        return _principal(appid, "application", None, principal_id)
    if oid is not None:
        return _principal(oid, "unknown", None, oid)
    if status_code == 401:
        return _principal("anonymous", "anonymous", None, None)
    return _principal("unknown", "unknown", None, None)


def resolve_azure_outcome(
    status_code: int | None,
    result_type: str | None = None,
    result_signature: str | None = None,
    result_description: str | None = None,
) -> dict[str, str | None]:
    """Resolve whether a Key Vault call succeeded, trusting the HTTP status first.

    ``resultType`` is ``Success`` even for 401, 403 and 404 responses, so it is used only
    when the record has no status code, after ``resultSignature`` (an HTTP reason phrase such
    as ``Forbidden``, or a status number). 2xx and 3xx are successes; 401 and 403 denied;
    404 not_found; 429 throttled; other 4xx invalid; 5xx error. ``error_code`` is the status
    code as text, or the signature when there is no code, and ``error_message`` is the
    result description or else the signature. Both are null on success.

    Returns:
        ``outcome``, ``failure_reason``, ``error_code`` and ``error_message``.
    """
    message = result_description or result_signature
    code = status_code
    if code is None and result_signature is not None:
        code = _as_int(result_signature) or _STATUS_BY_REASON.get(_squash(result_signature))
    if code is not None:
        reason = _failure_reason(code)
        if reason is None:
            return _outcome("success", None, None, None)
        error_code = str(status_code) if status_code is not None else result_signature
        return _outcome("failure", reason, error_code, message)

    verdict = _squash(result_type or "")
    if verdict in {"success", "succeeded"}:
        return _outcome("success", None, None, None)
    if verdict in {"failure", "failed"}:
        return _outcome("failure", "error", result_signature, message)
    return _outcome("unknown", None, result_signature, message)


def canonical_vault_resource(
    object_id: str | None, request_uri: str | None, resource_id: str | None
) -> tuple[str | None, str | None]:
    """Return (resource, version) for the vault object a call touched.

    ``https://v.vault.azure.net/secrets/name/3f2a...`` becomes
    ``("https://v.vault.azure.net/secrets/name", "3f2a...")``, with the host lower-cased and
    query strings dropped. A call on the vault itself, or on a whole collection such as a
    secret list, returns the vault URL. The object id is tried first, then the request URI,
    then the vault name in the Azure resource id.
    """
    for uri in (object_id, request_uri):
        parsed = _parse_vault_uri(uri)
        if parsed is not None:
            return parsed
    match = _VAULT_NAME.search(resource_id or "")
    if match:
        # NOTE: the resource id does not name the cloud, so the public-cloud host is assumed.
        return f"https://{match.group(1).lower()}.vault.azure.net", None
    return None, None


def keyvault_action(operation: str | None) -> str:
    """Return the schema action for a Key Vault operationName (``other`` when unknown)."""
    if not operation:
        return "other"
    action = KEYVAULT_ACTIONS.get(operation)
    if action is not None:
        return action
    for prefix, prefixed_action in _ACTION_PREFIXES:
        if operation.startswith(prefix):
            return prefixed_action
    return "other"


class _KeyVaultShape(LogFormat):
    """Shared normalization: subclasses read their shape into :class:`AuditFields`."""

    cloud = "azure"

    @abstractmethod
    def read_fields(self, record: Mapping[str, Any]) -> AuditFields:
        """Read one record of this shape into the common fields."""

    def normalize(self, record: Mapping[str, Any], origin: str) -> list[Row] | Skip:
        """Turn one Key Vault audit record into one event row."""
        return [build_row(self.read_fields(record), self.id, origin)]


@register
class AzureKeyVaultFormat(_KeyVaultShape):
    """Key Vault ``AuditEvent`` records from storage-account blobs or Event Hubs."""

    id = "azure_keyvault"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Accept AuditEvent records, and uncategorized records with a vault resource id."""
        category = record.get("category")
        if category == "AuditEvent":
            return "operationName" in record
        if category is not None:
            return False
        resource_id = record.get("resourceId")
        operation = record.get("operationName")
        return (
            isinstance(resource_id, str)
            and "/VAULTS/" in resource_id.upper()
            and isinstance(operation, str)
            and "/" not in operation
        )

    def read_fields(self, record: Mapping[str, Any]) -> AuditFields:
        """Read the camelCase record, with HTTP details under ``properties``."""
        properties = record.get("properties")
        if isinstance(properties, (str, bytes)):
            properties = _loads_object(properties)
        if properties is not None and not isinstance(properties, Mapping):
            raise RecordError(
                "properties", f"expected an object or its JSON text, found {json_type(properties)}"
            )
        properties = properties or {}
        return AuditFields(
            time=_string(record, "time"),
            operation=_string(record, "operationName"),
            status_code=_status_code(properties.get("httpStatusCode"), "properties.httpStatusCode"),
            result_type=_string(record, "resultType"),
            result_signature=_string(record, "resultSignature"),
            result_description=_string(record, "resultDescription"),
            correlation_id=_string(record, "correlationId"),
            caller_ip=_string(record, "callerIpAddress"),
            claims=_identity_claims(record.get("identity"), "identity"),
            object_id=_string(properties, "id", "properties.id"),
            request_uri=_string(properties, "requestUri", "properties.requestUri"),
            resource_id=_string(record, "resourceId"),
            subscription_id=None,
            location=_loose(record.get("location")),
            user_agent=_loose(properties.get("clientInfo")),
        )


@register
class AzureDiagnosticsFormat(_KeyVaultShape):
    """Key Vault rows of the Log Analytics ``AzureDiagnostics`` table."""

    id = "azure_diagnostics"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Accept AzureDiagnostics rows from Key Vault (by Type, or by Key Vault columns)."""
        if "TimeGenerated" not in record or "OperationName" not in record:
            return False
        row_type = record.get("Type")
        if row_type is not None and row_type != "AzureDiagnostics":
            return False
        provider = str(record.get("ResourceProvider") or "").upper()
        if provider == "MICROSOFT.KEYVAULT":
            return True
        return record.get("Category") == "AuditEvent" and (
            "id_s" in record or "requestUri_s" in record or "httpStatusCode_d" in record
        )

    def read_fields(self, record: Mapping[str, Any]) -> AuditFields:
        """Read the flattened row: claims come from ``identity_claim_*`` columns."""
        # Columns are named identity_claim_<claim>_<type suffix>, such as identity_claim_oid_g.
        claims = normalize_claims(
            {
                _CLAIM_COLUMN_SUFFIX.sub("", name.removeprefix("identity_claim_")): value
                for name, value in record.items()
                if name.startswith("identity_claim_")
            }
        )
        return AuditFields(
            time=_string(record, "TimeGenerated"),
            operation=_string(record, "OperationName"),
            status_code=_status_code(record.get("httpStatusCode_d"), "httpStatusCode_d"),
            result_type=_string(record, "ResultType"),
            result_signature=_string(record, "ResultSignature"),
            result_description=_string(record, "ResultDescription"),
            correlation_id=_string(record, "CorrelationId"),
            caller_ip=_string(record, "CallerIPAddress"),
            claims=claims,
            object_id=_string(record, "id_s"),
            request_uri=_string(record, "requestUri_s"),
            resource_id=_string(record, "ResourceId") or _string(record, "_ResourceId"),
            subscription_id=_string(record, "SubscriptionId"),
            location=_loose(record.get("Location") or record.get("location_s")),
            user_agent=_loose(record.get("clientInfo_s")),
        )


@register
class AzureKeyVaultResourceSpecificFormat(_KeyVaultShape):
    """Rows of the Log Analytics resource-specific ``AZKVAuditLogs`` table."""

    id = "azure_kv_resource_specific"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Accept AZKVAuditLogs rows (by Type, or by the table's own column names)."""
        row_type = record.get("Type")
        if row_type is not None:
            return row_type == "AZKVAuditLogs"
        return (
            "TimeGenerated" in record
            and "OperationName" in record
            and ("CallerIpAddress" in record or "HttpStatusCode" in record)
            and "Identity" in record
        )

    def read_fields(self, record: Mapping[str, Any]) -> AuditFields:
        """Read the typed row: ``Identity`` is an object or JSON text."""
        return AuditFields(
            time=_string(record, "TimeGenerated"),
            operation=_string(record, "OperationName"),
            status_code=_status_code(record.get("HttpStatusCode"), "HttpStatusCode"),
            result_type=_string(record, "ResultType"),
            result_signature=_string(record, "ResultSignature"),
            result_description=_string(record, "ResultDescription"),
            correlation_id=_string(record, "CorrelationId"),
            caller_ip=_string(record, "CallerIpAddress"),
            claims=_identity_claims(record.get("Identity"), "Identity"),
            object_id=_string(record, "Id"),
            request_uri=_string(record, "RequestUri"),
            resource_id=_string(record, "_ResourceId") or _string(record, "ResourceId"),
            subscription_id=_string(record, "_SubscriptionId") or _string(record, "SubscriptionId"),
            location=_loose(record.get("Location")),
            user_agent=_loose(record.get("ClientInfo")),
        )


def build_row(fields: AuditFields, log_format: str, origin: str) -> Row:
    """Build the event row for one Key Vault audit event."""
    principal = resolve_azure_principal(fields.claims, fields.status_code)
    outcome = resolve_azure_outcome(
        fields.status_code,
        fields.result_type,
        fields.result_signature,
        fields.result_description,
    )
    resource, version = canonical_vault_resource(
        fields.object_id, fields.request_uri, fields.resource_id
    )
    source_ip, source_kind = classify_address(fields.caller_ip)
    return {
        "event_uid": _event_uid(fields, principal),
        "time": fields.time,
        "cloud": "azure",
        "log_format": log_format,
        "service": "keyvault",
        "operation": fields.operation,
        "action": keyvault_action(fields.operation),
        **outcome,
        **principal,
        "account": _subscription(fields),
        "region": fields.location,
        "resource": resource,
        "resource_version": version,
        "source_ip": source_ip,
        "source_kind": source_kind,
        "source_raw": fields.caller_ip,
        "user_agent": fields.user_agent,
        "origin": origin,
    }


_STATUS_BY_REASON: Final[dict[str, int]] = {
    "ok": 200,
    "created": 201,
    "accepted": 202,
    "nocontent": 204,
    "badrequest": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "notfound": 404,
    "conflict": 409,
    "toomanyrequests": 429,
    "internalservererror": 500,
    "serviceunavailable": 503,
}


def _failure_reason(code: int) -> str | None:
    if code < 400:
        return None
    if code in (401, 403):
        return "denied"
    if code == 404:
        return "not_found"
    if code == 429:
        return "throttled"
    if code < 500:
        return "invalid"
    return "error"


def _outcome(
    outcome: str, reason: str | None, code: str | None, message: str | None
) -> dict[str, str | None]:
    return {
        "outcome": outcome,
        "failure_reason": reason,
        "error_code": code,
        "error_message": message,
    }


def _principal(
    principal: str, principal_type: str, arn: str | None, principal_id: str | None
) -> dict[str, str | None]:
    return {
        "principal": principal,
        "principal_type": principal_type,
        "principal_arn": arn,
        "principal_id": principal_id,
    }


def _strip_guest_prefix(upn: str) -> str:
    # Accounts from another identity provider are logged as "<provider>#<upn>", for example
    # "live.com#someone@outlook.com". "#EXT#" inside a guest UPN is part of the name and kept.
    provider, separator, rest = upn.partition("#")
    if separator and "@" not in provider and rest and not rest.startswith("EXT#"):
        return rest
    return upn


def _claim_name(name: str) -> str:
    last = re.split(r"[/_]claims[/_]", name.lower())[-1]
    return _CLAIM_ALIASES.get(last, last)


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _parse_vault_uri(uri: str | None) -> tuple[str, str | None] | None:
    if not uri:
        return None
    try:
        parts = urlsplit(uri.strip())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not _VAULT_HOST.match(host):
        return None
    vault = f"https://{host}"
    segments = [segment for segment in parts.path.split("/") if segment]
    if len(segments) < 2:
        return vault, None
    collection = _COLLECTIONS.get(segments[0].lower())
    if collection is None:
        return vault, None
    version = segments[2] if len(segments) > 2 else None
    return f"{vault}/{collection}/{segments[1]}", version


def _subscription(fields: AuditFields) -> str | None:
    if fields.subscription_id:
        return fields.subscription_id.lower()
    match = _SUBSCRIPTION.search(fields.resource_id or "")
    return match.group(1).lower() if match else None


def _event_uid(fields: AuditFields, principal: Mapping[str, str | None]) -> str:
    """Hash the fields that identify one Key Vault call, because Azure logs no record id.

    Time, correlation id, operation, caller identity, object id and caller address, with the
    time in one spelling, so the blob record and the Log Analytics row of one call match.
    """
    caller = principal["principal_id"] or principal["principal"]
    parts = [
        canonical_time(fields.time),
        (fields.correlation_id or "").lower(),
        fields.operation,
        caller,
        fields.object_id,
        fields.caller_ip,
    ]
    joined = "\x1f".join(part or "" for part in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


def _string(record: Mapping[str, Any], key: str, field: str | None = None) -> str | None:
    """Return a string field without surrounding whitespace; RecordError for another type."""
    value = expect_string(record.get(key), field or key)
    return value.strip() or None if value is not None else None


def _loose(value: Any) -> str | None:
    text = loose_text(value)
    return text.strip() or None if text is not None else None


def _status_code(value: Any, field: str) -> int | None:
    """Return an HTTP status code written as a number (200, 200.0) or as numeric text.

    Raises:
        RecordError: the value is of another JSON type, or text or a number that is not a
            whole number, because the status decides whether the call succeeded.
    """
    if value is None or value == "":
        return None
    numeric = isinstance(value, int | float | str) and not isinstance(value, bool)
    code = _as_int(value) if numeric else None
    if code is None:
        found = "text that is not a whole number" if isinstance(value, str) else json_type(value)
        raise RecordError(field, f"expected a whole number or numeric text, found {found}")
    return code


def _identity_claims(value: Any, field: str) -> dict[str, str]:
    """Return the claims of an identity object or its JSON text (see :func:`normalize_claims`).

    Raises:
        RecordError: the value is neither null, an object nor JSON text of an object.
    """
    if isinstance(value, str) and value.strip():
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RecordError(
                field, "expected an object or its JSON text, found text that is not JSON"
            ) from None
        value = parsed
    if value is not None and value != "" and not isinstance(value, Mapping):
        raise RecordError(field, f"expected an object or its JSON text, found {json_type(value)}")
    return normalize_claims(value)


def _loads_object(text: str | bytes) -> Mapping[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    """Return a non-empty string value, or None for a missing, empty or non-scalar value."""
    if value is None or isinstance(value, (Mapping, list)):
        return None
    text = str(value).strip()
    return text or None


def _as_int(value: Any) -> int | None:
    """Return an integer status code from an int, a float such as 200.0, or numeric text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None
