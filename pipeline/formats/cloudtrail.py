"""AWS CloudTrail: Secrets Manager, SSM Parameter Store and KMS calls as event rows.

Accepts single CloudTrail events (from S3 ``Records`` files, LookupEvents or JSON Lines
exports), EventBridge envelopes around them, digest files and Insight events (both skipped with
a count). Calls that do not touch a secret (sign-ins, EC2, STS, ``ssm:SendCommand``) are skipped
as ``not_secret_activity``.

Two paths produce the same frame: :meth:`CloudTrailFormat.normalize` turns one record into rows,
and :meth:`CloudTrailFormat.read_fast` decodes a whole ``{"Records": [...]}`` file with msgspec
and resolves the nested parts (identity, request, caller address) once per distinct value.
:meth:`CloudTrailFormat.fast_batch` does the same for several files and builds one frame.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import msgspec
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.formats.aws_identity import resolve_aws_outcome, resolve_aws_principal
from pipeline.formats.base import (
    BatchResult,
    FastBatch,
    FileResult,
    LogFormat,
    RecordError,
    Row,
    Skip,
    register,
)
from pipeline.formats.fields import expect_array, expect_object, expect_string, loose_text
from pipeline.formats.ip import classify_address
from pipeline.schema import COLUMNS, empty_events, parse_times

__all__ = ["CloudTrailFormat", "resolve_targets"]

logger = logging.getLogger(__name__)

SECRETS_MANAGER: Final = "secretsmanager.amazonaws.com"
SSM: Final = "ssm.amazonaws.com"
KMS: Final = "kms.amazonaws.com"

Target = tuple[str, str | None, str | None]
"""The effect of one call on one secret: ``(action, resource, resource_version)``."""

_EVENTBRIDGE_DETAIL_TYPES: Final = (
    "AWS API Call via CloudTrail",
    "AWS Service Event via CloudTrail",
)
_DIGEST_KEYS: Final = ("digestStartTime", "logFiles", "digestS3Object")
_EVENT_KEYS: Final = ("eventSource", "eventName", "eventVersion", "eventTime")

_SECRETS_MANAGER_ACTIONS: Final = {
    "GetSecretValue": "read",
    "BatchGetSecretValue": "read",
    "ListSecrets": "list",
    "DescribeSecret": "describe",
    "GetResourcePolicy": "describe",
    "ListSecretVersionIds": "describe",
    "PutSecretValue": "write",
    "UpdateSecret": "write",
    "CreateSecret": "write",
    "RestoreSecret": "write",
    "UpdateSecretVersionStage": "write",
    "DeleteSecret": "delete",
    "RotateSecret": "rotate",
    "RotationSucceeded": "rotate",
    "RotationFailed": "rotate",
    "RotationStarted": "rotate",
    "CancelRotateSecret": "rotate",
    "PutResourcePolicy": "policy",
    "DeleteResourcePolicy": "policy",
    "TagResource": "other",
    "UntagResource": "other",
}
_LIST_OPERATIONS: Final = frozenset({"ListSecrets", "DescribeParameters"})

# SSM operation -> (action, request field naming the parameter(s)). Only Parameter Store calls.
_SSM_ACTIONS: Final = {
    "GetParameter": ("read", "name"),
    "GetParameters": ("read", "names"),
    "GetParametersByPath": ("read", "path"),
    "GetParameterHistory": ("read", "name"),
    "DescribeParameters": ("list", None),
    "PutParameter": ("write", "name"),
    "LabelParameterVersion": ("other", "name"),
    "UnlabelParameterVersion": ("other", "name"),
    "DeleteParameter": ("delete", "name"),
    "DeleteParameters": ("delete", "names"),
}

# KMS operations kept when their encryption context ties them to a secret or parameter.
# Encrypt and GenerateDataKey happen when the service stores a new version. They are "other",
# so the principal's own write call is not counted a second time.
_KMS_TIED_ACTIONS: Final = {
    "Decrypt": "decrypt",
    "Encrypt": "other",
    "GenerateDataKey": "other",
    "GenerateDataKeyWithoutPlaintext": "other",
    "ReEncrypt": "other",
}
_SECRET_STORE_SERVICES: Final = frozenset({SECRETS_MANAGER, SSM})
_ARN_KEYS: Final = ("arn", "aRN", "ARN")


@register
class CloudTrailFormat(LogFormat):
    """AWS CloudTrail events (``log_format`` ``cloudtrail``)."""

    id = "cloudtrail"
    cloud = "aws"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Return True for a CloudTrail event, EventBridge envelope, digest or Insight event."""
        if any(key in record for key in _EVENT_KEYS):
            return True
        if any(key in record for key in _DIGEST_KEYS):
            return True
        if record.get("eventType") == "AwsCloudTrailInsight" or "insightDetails" in record:
            return True
        return _eventbridge_detail(record) is not None

    def normalize(self, record: Mapping[str, Any], origin: str) -> list[Row] | Skip:
        """Turn one CloudTrail event into one row per secret it touched, or a :class:`Skip`.

        Raises:
            RecordError: the event names a secret-store call but has no ``eventTime``, or a
                field that decides the caller, outcome, time or secret has the wrong JSON type.
                ``awsRegion`` and ``userAgent`` of the wrong type become null instead.
        """
        detail = _eventbridge_detail(record)
        if detail is not None:
            record = detail
        if any(key in record for key in _DIGEST_KEYS):
            return Skip("digest")
        if record.get("eventType") == "AwsCloudTrailInsight" or "insightDetails" in record:
            return Skip("insight")

        identity = expect_object(record.get("userIdentity"), "userIdentity")
        principal = resolve_aws_principal(identity)
        event_source = expect_string(record.get("eventSource"), "eventSource")
        event_name = expect_string(record.get("eventName"), "eventName")
        source_raw = expect_string(record.get("sourceIPAddress"), "sourceIPAddress")
        source_ip, source_kind = classify_address(source_raw)
        invoked_by = _invoked_by(identity, record, source_raw, source_kind)
        resolved = resolve_targets(
            event_source,
            event_name,
            expect_object(record.get("requestParameters"), "requestParameters"),
            expect_object(record.get("responseElements"), "responseElements"),
            expect_object(record.get("additionalEventData"), "additionalEventData"),
            expect_array(record.get("resources"), "resources"),
            invoked_by,
        )
        if isinstance(resolved, Skip):
            return resolved
        targets, invoked_by = resolved

        time = expect_string(record.get("eventTime"), "eventTime")
        if time is None:
            raise RecordError("eventTime", "missing")
        error_code = expect_string(record.get("errorCode"), "errorCode")
        error_message = expect_string(record.get("errorMessage"), "errorMessage")
        outcome, failure_reason = resolve_aws_outcome(error_code, error_message)
        event_id = expect_string(record.get("eventID"), "eventID")
        account = expect_string(record.get("recipientAccountId"), "recipientAccountId")
        common: Row = {
            "event_uid": event_id or _fallback_uid(record, principal),
            "time": time,
            "cloud": "aws",
            "log_format": self.id,
            "service": _service(event_source),
            "operation": event_name,
            "outcome": outcome,
            "failure_reason": failure_reason,
            "error_code": error_code,
            "error_message": error_message,
            **principal,
            "invoked_by": invoked_by,
            "account": account or _text(identity.get("accountId")),
            "region": loose_text(record.get("awsRegion")),
            "source_ip": source_ip,
            "source_kind": source_kind,
            "source_raw": source_raw,
            "user_agent": loose_text(record.get("userAgent")),
            "origin": origin,
        }
        return [
            {**common, "action": action, "resource": resource, "resource_version": version}
            for action, resource, version in targets
        ]

    def read_fast(self, data: bytes, origin: str) -> FileResult | None:
        """Read a ``{"Records": [...]}`` file column-wise; None for any other shape.

        Also returns None when any record needs the record path: a missing ``eventTime``, a
        digest, Insight or EventBridge record, a top-level value of an unexpected JSON type, or
        a secret-store call whose time does not parse. Quarantine entries and their origins then
        come from one place.

        Raises:
            RecordError: a nested part (``userIdentity``, ``requestParameters``, ...) has a JSON
                type the record path rejects. The reader then reads the file record by record.
        """
        if not _RECORDS_PREFIX.match(data[:256]):
            return None
        part = _decode_records_file(data, origin)
        if part is None:
            return None
        built = _build_batch([part])
        if built is None:
            return None
        result = built.files[0]
        assert result is not None
        result.events = built.events
        return result

    def fast_batch(self) -> FastBatch:
        """Return a collector that builds one frame for many ``{"Records": [...]}`` files."""
        return _RecordsBatch()


_RECORDS_PREFIX: Final = re.compile(rb'\A\s*\{\s*"Records"\s*:')


def resolve_targets(
    event_source: str | None,
    event_name: str | None,
    request: Mapping[str, Any],
    response: Mapping[str, Any],
    additional: Mapping[str, Any],
    resources: Any,
    invoked_by: str | None,
) -> tuple[list[Target], str | None] | Skip:
    """Decide which secrets one call touched and how.

    Args:
        event_source: ``eventSource``, for example ``secretsmanager.amazonaws.com``.
        event_name: ``eventName``, the API operation.
        request: ``requestParameters`` (empty when null).
        response: ``responseElements`` (empty when null).
        additional: ``additionalEventData`` (empty when null).
        resources: the event's ``resources`` list as logged, or None.
        invoked_by: the AWS service that made the call for the principal, if known.

    Returns:
        The targets and the ``invoked_by`` value to store (a KMS call tied to a secret gets the
        secret store's service name), or ``Skip("not_secret_activity")``.
    """
    targets: list[Target] | None = None
    if event_source == SECRETS_MANAGER:
        targets = _secrets_manager_targets(event_name or "", request, response, additional)
    elif event_source == SSM:
        targets = _ssm_targets(event_name or "", request)
    elif event_source == KMS:
        return _kms_targets(event_name or "", request, resources, invoked_by)
    if targets is None:
        return Skip("not_secret_activity")
    return targets, invoked_by


def _secrets_manager_targets(
    name: str,
    request: Mapping[str, Any],
    response: Mapping[str, Any],
    additional: Mapping[str, Any],
) -> list[Target] | None:
    action = _SECRETS_MANAGER_ACTIONS.get(name)
    secret_id = _request_text(request, "secretId")
    if action is None:
        # An operation added after this table was written still counts when it names a secret.
        return [("other", secret_id, None)] if secret_id else None
    if name == "BatchGetSecretValue":
        return _batch_targets(request, response)
    if name in _LIST_OPERATIONS:
        return [(action, None, None)]

    resource = _first_arn(response) or secret_id or _request_text(request, "name")
    resource = resource or expect_string(additional.get("SecretId"), "additionalEventData.SecretId")
    version = _request_text(request, "versionId") or _request_text(request, "versionStage")
    version = version or expect_string(response.get("versionId"), "responseElements.versionId")
    return [(action, resource, version)]


def _request_text(request: Mapping[str, Any], key: str) -> str | None:
    return expect_string(request.get(key), f"requestParameters.{key}")


def _batch_targets(request: Mapping[str, Any], response: Mapping[str, Any]) -> list[Target]:
    """Build one target per secret that a BatchGetSecretValue call names."""
    id_list = expect_array(request.get("secretIdList"), "requestParameters.secretIdList")
    if id_list:
        field = "requestParameters.secretIdList[]"
        names = dict.fromkeys(text for item in id_list if (text := expect_string(item, field)))
        return [("read", name, None) for name in names]
    returned = response.get("secretValues")
    if isinstance(returned, list):
        arns = dict.fromkeys(arn for item in returned if (arn := _first_arn(_mapping(item))))
        if arns:
            return [("read", arn, None) for arn in arns]
    filters = request.get("filters")
    if isinstance(filters, list) and filters:
        # NOTE: CloudTrail logs a filter-based batch read without the secrets it returned, so
        # the row's resource is the filter itself, for example "filters:tag-key=team".
        return [("read", _describe_filters(filters), None)]
    return [("read", None, None)]


def _describe_filters(filters: list[Any]) -> str:
    parts = []
    for item in filters:
        entry = _mapping(item)
        values = entry.get("values")
        joined = ",".join(str(v) for v in values) if isinstance(values, list) else ""
        parts.append(f"{entry.get('key')}={joined}")
    return "filters:" + ";".join(parts)


def _ssm_targets(name: str, request: Mapping[str, Any]) -> list[Target] | None:
    spec = _SSM_ACTIONS.get(name)
    if spec is None:
        return None
    action, field = spec
    if field is None:
        return [(action, None, None)]
    value = request.get(field)
    if isinstance(value, list):
        item_field = f"requestParameters.{field}[]"
        names = dict.fromkeys(text for item in value if (text := expect_string(item, item_field)))
        return [(action, item, None) for item in names] or [(action, None, None)]
    return [(action, _request_text(request, field), None)]


def _kms_targets(
    name: str, request: Mapping[str, Any], resources: Any, invoked_by: str | None
) -> tuple[list[Target], str | None] | Skip:
    action = _KMS_TIED_ACTIONS.get(name)
    if action is None:
        return Skip("not_secret_activity")
    context = expect_object(request.get("encryptionContext"), "requestParameters.encryptionContext")
    secret = _context_text(context, "SecretARN")
    parameter = _parameter_name(_context_text(context, "PARAMETER_ARN")) or _context_text(
        context, "aws:ssm:parameter-name"
    )
    if secret or parameter:
        service = SECRETS_MANAGER if secret else SSM
        if invoked_by not in _SECRET_STORE_SERVICES:
            invoked_by = service
        version = _context_text(context, "SecretVersionId")
        return [(action, secret or parameter, version)], invoked_by
    if name != "Decrypt":
        return Skip("not_secret_activity")
    return [("decrypt", _kms_key(request, resources), None)], invoked_by


def _context_text(context: Mapping[str, Any], key: str) -> str | None:
    return expect_string(context.get(key), f"requestParameters.encryptionContext.{key}")


def _kms_key(request: Mapping[str, Any], resources: Any) -> str | None:
    if isinstance(resources, list):
        for item in resources:
            entry = expect_object(item, "resources[]")
            arn = expect_string(entry.get("ARN"), "resources[].ARN") or expect_string(
                entry.get("arn"), "resources[].arn"
            )
            if arn and ":key/" in arn:
                return arn
    return _request_text(request, "keyId")


def _parameter_name(arn: str | None) -> str | None:
    """Return the parameter name in an SSM parameter ARN.

    A hierarchical name (``/app/db``) appears in the ARN without its leading slash
    (``parameter/app/db``); a flat name has no slash at all.
    """
    if not arn or ":parameter/" not in arn:
        return None
    name = arn.split(":parameter/", 1)[1]
    return "/" + name if "/" in name else name


def _invoked_by(
    identity: Mapping[str, Any],
    record: Mapping[str, Any],
    source_raw: str | None,
    source_kind: str,
) -> str | None:
    """Return the AWS service that made the call for the principal, if the record names one."""
    named = _text(identity.get("invokedBy")) or expect_string(record.get("invokedBy"), "invokedBy")
    if named:
        return named
    if source_kind == "cloud_service":
        return source_raw
    return None


def _service(event_source: str | None) -> str | None:
    if event_source is None:
        return None
    return event_source.removesuffix(".amazonaws.com")


def _fallback_uid(record: Mapping[str, Any], principal: Mapping[str, str | None]) -> str:
    # NOTE: without eventID the uid is a hash of fields that identify the call. Two identical
    # calls in the same second by the same principal without a requestID would collide.
    parts = (
        str(record.get("eventTime") or ""),
        str(record.get("eventName") or ""),
        principal.get("principal_arn") or principal.get("principal") or "",
        str(record.get("requestID") or ""),
    )
    return "sha256:" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _eventbridge_detail(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    detail_type = record.get("detail-type")
    detail = record.get("detail")
    if not isinstance(detail_type, str) or not isinstance(detail, Mapping):
        return None
    if any(name in detail_type for name in _EVENTBRIDGE_DETAIL_TYPES):
        return detail
    return None


def _first_arn(value: Mapping[str, Any]) -> str | None:
    for key in _ARN_KEYS:
        text = value.get(key)
        if isinstance(text, str) and text.startswith("arn:"):
            return text
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    """Return a scalar as a non-empty string, or None (empty strings become None)."""
    if value is None or isinstance(value, Mapping | list):
        return None
    text = value if isinstance(value, str) else str(value)
    return text or None


# ---------------------------------------------------------------------------------------------
# Fast path: a whole {"Records": [...]} file, decoded with msgspec into typed structs. Each field
# is read once into a column. The nested parts (identity, request, response, resources), the
# caller address, the error pair and the event time are resolved once per distinct value with
# the record path's own functions, and mapped back to the rows with integer codes.

_ABSENT: Final = msgspec.Raw(b"")
_INSIGHT: Final = "AwsCloudTrailInsight"
# CloudTrail writes eventTime in this form; anything else goes through parse_times.
_CLOUDTRAIL_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_LARGE_STRING: Final = pa.large_string()
# The frames built here outlive the file, and the intermediate arrays do not. In Arrow's default
# mimalloc pool the freed intermediates fragment the retained pages: read_paths on the 1M-record
# set of benchmarks/ingest.py peaked at about 1,260 MB with mimalloc and 1,080 MB with the
# system allocator (pyarrow 26, Linux, glibc).
_POOL: Final = pa.system_memory_pool()


class _FastEvent(msgspec.Struct):
    """The fields of one CloudTrail event that the fast path reads; nested parts stay raw."""

    eventTime: str | None = None
    eventID: str | None = None
    eventSource: str | None = None
    eventName: str | None = None
    eventType: str | None = None
    awsRegion: str | None = None
    sourceIPAddress: str | None = None
    userAgent: str | None = None
    errorCode: str | None = None
    errorMessage: str | None = None
    recipientAccountId: str | None = None
    requestID: str | None = None
    invokedBy: str | None = None
    userIdentity: msgspec.Raw = _ABSENT
    requestParameters: msgspec.Raw = _ABSENT
    responseElements: msgspec.Raw = _ABSENT
    additionalEventData: msgspec.Raw = _ABSENT
    resources: msgspec.Raw = _ABSENT
    # Present only on records the record path handles (Insight, digest, EventBridge envelope).
    insightDetails: msgspec.Raw = _ABSENT
    detail: msgspec.Raw = _ABSENT
    digestStartTime: msgspec.Raw = _ABSENT
    digestS3Object: msgspec.Raw = _ABSENT
    logFiles: msgspec.Raw = _ABSENT


class _Fields(NamedTuple):
    """The fields of :class:`_FastEvent` as columns, in its field order."""

    eventTime: tuple[str | None, ...]
    eventID: tuple[str | None, ...]
    eventSource: tuple[str | None, ...]
    eventName: tuple[str | None, ...]
    eventType: tuple[str | None, ...]
    awsRegion: tuple[str | None, ...]
    sourceIPAddress: tuple[str | None, ...]
    userAgent: tuple[str | None, ...]
    errorCode: tuple[str | None, ...]
    errorMessage: tuple[str | None, ...]
    recipientAccountId: tuple[str | None, ...]
    requestID: tuple[str | None, ...]
    invokedBy: tuple[str | None, ...]
    userIdentity: tuple[msgspec.Raw, ...]
    requestParameters: tuple[msgspec.Raw, ...]
    responseElements: tuple[msgspec.Raw, ...]
    additionalEventData: tuple[msgspec.Raw, ...]
    resources: tuple[msgspec.Raw, ...]
    insightDetails: tuple[msgspec.Raw, ...]
    detail: tuple[msgspec.Raw, ...]
    digestStartTime: tuple[msgspec.Raw, ...]
    digestS3Object: tuple[msgspec.Raw, ...]
    logFiles: tuple[msgspec.Raw, ...]


class _RecordsFile(msgspec.Struct, forbid_unknown_fields=True):
    Records: list[_FastEvent]


_RECORDS_DECODER: Final = msgspec.json.Decoder(_RecordsFile)

# Caller resolved from one distinct raw userIdentity: the five principal columns, then the
# identity's invokedBy and accountId.
_Who = tuple[str | None, str | None, str | None, str | None, str | None, str | None, str | None]
_PRINCIPAL_COLUMNS: Final = (
    "principal",
    "principal_type",
    "principal_arn",
    "principal_id",
    "session_name",
)

# Resolutions are pure functions of these keys, so they are kept across files. A cache that grows
# past _MAX_CACHED entries loses its older half. When the caches were emptied at 50,000 entries,
# the peak memory of benchmarks/ingest.py was about 30 MB higher than at 5,000.
_MAX_CACHED: Final = 10_000
_WHO_CACHE: dict[bytes, _Who] = {}
_TARGET_CACHE: dict[tuple[Any, ...], tuple[list[Target], str | None] | Skip] = {}
_ADDRESS_CACHE: dict[str | None, tuple[str | None, str]] = {}
# Columns with one value in every row (a constant, or null) are slices of one array per value
# and type, shared by every file's frame, so they take no memory per row.
_SHARED_COLUMNS: dict[tuple[str | None, pa.DataType], pa.Array] = {}
_SHARED_MIN_ROWS: Final = 16_384
_NESTED_SEPARATOR: Final = b"\x1e"
# The events of the per-file counts in a BatchResult. Nothing modifies it.
_NO_EVENTS: Final = empty_events()


def _load_raw(raw: bytes) -> Any:
    return orjson.loads(raw) if raw else None


def _resolve_who(raw: bytes) -> _Who:
    who = _WHO_CACHE.get(raw)
    if who is not None:
        return who
    # The record path's type checks: a RecordError makes read_fast decline the file.
    identity = expect_object(_load_raw(raw), "userIdentity")
    principal = resolve_aws_principal(identity)
    who = (
        principal["principal"],
        principal["principal_type"],
        principal["principal_arn"],
        principal["principal_id"],
        principal["session_name"],
        _text(identity.get("invokedBy")),
        _text(identity.get("accountId")),
    )
    _WHO_CACHE[raw] = who
    return who


def _evict_older_half(cache: dict[Any, Any]) -> None:
    """Remove the older half of ``cache`` when it contains more than ``_MAX_CACHED`` entries."""
    if len(cache) <= _MAX_CACHED:
        return
    # dicts keep insertion order, so the first keys are the oldest.
    for key in list(cache)[: len(cache) // 2]:
        del cache[key]


def _classify_address_cached(raw: str | None) -> tuple[str | None, str]:
    address = _ADDRESS_CACHE.get(raw)
    if address is None:
        address = classify_address(raw)
        _ADDRESS_CACHE[raw] = address
    return address


def _shared_column(value: str | None, kind: pa.DataType, rows: int) -> pa.Array:
    """Return ``rows`` copies of ``value`` (null when None) as a slice of a shared array.

    A slice from offset 0 shares the shared array's buffers, and pandas wraps it without a copy.
    """
    key = (value, kind)
    shared = _SHARED_COLUMNS.get(key)
    if shared is None or len(shared) < rows:
        size = max(rows, _SHARED_MIN_ROWS, 2 * len(shared) if shared is not None else 0)
        if value is None:
            shared = pa.nulls(size, kind, memory_pool=_POOL)
        else:
            shared = pa.repeat(pa.scalar(value, kind), size, memory_pool=_POOL)
        _SHARED_COLUMNS[key] = shared
    return shared.slice(0, rows)


def _resolve_targets_cached(
    source: str | None, name: str | None, nested: bytes, invoked_by: str | None
) -> tuple[list[Target], str | None] | Skip:
    key = (source, name, nested, invoked_by)
    resolved = _TARGET_CACHE.get(key)
    if resolved is None:
        request, response, additional, resources = nested.split(_NESTED_SEPARATOR)
        resolved = resolve_targets(
            source,
            name,
            expect_object(_load_raw(request), "requestParameters"),
            expect_object(_load_raw(response), "responseElements"),
            expect_object(_load_raw(additional), "additionalEventData"),
            expect_array(_load_raw(resources), "resources"),
            invoked_by,
        )
        _TARGET_CACHE[key] = resolved
    return resolved


def _needs_record_path(fields: _Fields) -> bool:
    """Return True when a record is an Insight event, a digest or an EventBridge envelope."""
    return (
        _INSIGHT in fields.eventType
        or any(fields.insightDetails)
        or any(fields.detail)
        or any(fields.digestStartTime)
        or any(fields.digestS3Object)
        or any(fields.logFiles)
    )


class _Part(NamedTuple):
    """One decoded ``Records`` file waiting for its frame."""

    fields: _Columns | None
    """None for a file without records."""
    records: int
    origin: str


def _decode_records_file(data: bytes, origin: str) -> _Part | None:
    """Decode a CloudTrail ``Records`` file into columns, or return None to use the record path."""
    # msgspec skips fields it does not decode without checking their bytes, while the record
    # path rejects invalid UTF-8 anywhere in the file. isascii() is cheap and allocates nothing,
    # so the full check runs only on files with non-ASCII bytes.
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    enabled = gc.isenabled()
    # The decode creates many small objects but no reference cycles, so the cyclic garbage
    # collector would run many times and free nothing.
    gc.disable()
    try:
        try:
            events = _RECORDS_DECODER.decode(data).Records
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if not events:
            return _Part(None, 0, origin)
        # zip transposes the structs into one tuple per field in C, which is cheaper than one
        # list comprehension per field.
        fields = _Fields(*zip(*map(msgspec.structs.astuple, events), strict=True))
        records = len(events)
        del events
        if _needs_record_path(fields) or not all(fields.eventTime):
            return None
        return _Part(_columns(fields), records, origin)
    finally:
        if enabled:
            gc.enable()


class _RecordsBatch(FastBatch):
    """Decoded ``Records`` files whose frame is built once, by :meth:`finish`."""

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self._records = 0

    @property
    def records(self) -> int:
        return self._records

    def add(self, data: bytes, origin: str) -> bool:
        if not _RECORDS_PREFIX.match(data[:256]):
            return False
        part = _decode_records_file(data, origin)
        if part is None:
            return False
        self._parts.append(part)
        self._records += part.records
        return True

    def finish(self) -> BatchResult:
        parts = self._parts
        self._parts = []
        self._records = 0
        try:
            built = _build_batch(parts)
        except (RecordError, ValueError) as exc:
            logger.debug("cloudtrail fast path declined a batch of %d files: %s", len(parts), exc)
            built = None
        if built is not None:
            return built

        # Rare: find the files that need the record path by building each file on its own.
        files: list[FileResult | None] = []
        frames = []
        row_files = []
        for index, part in enumerate(parts):
            try:
                single = _build_batch([part])
            except (RecordError, ValueError) as exc:
                logger.debug("cloudtrail fast path declined %s: %s", part.origin, exc)
                single = None
            if single is None:
                files.append(None)
                continue
            files.append(single.files[0])
            if len(single.events):
                frames.append(single.events)
                row_files.append(np.full(len(single.events), index, dtype=np.int64))

        if not frames:
            return BatchResult(files, empty_events(), np.zeros(0, dtype=np.int64))
        events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return BatchResult(files, events, np.concatenate(row_files))


class _Columns(NamedTuple):
    """The columns of a decoded file that the frame is built from.

    The raw nested parts are copied out of the file's text, so the text can be freed while the
    file waits in a batch.
    """

    eventTime: tuple[str | None, ...]
    eventID: tuple[str | None, ...]
    eventSource: tuple[str | None, ...]
    eventName: tuple[str | None, ...]
    awsRegion: tuple[str | None, ...]
    sourceIPAddress: tuple[str | None, ...]
    userAgent: tuple[str | None, ...]
    errorCode: tuple[str | None, ...]
    errorMessage: tuple[str | None, ...]
    recipientAccountId: tuple[str | None, ...]
    requestID: tuple[str | None, ...]
    invokedBy: tuple[str | None, ...]
    userIdentity: Sequence[bytes]
    nested: Sequence[bytes]
    """The four nested parts of a call, joined into one key. JSON text never contains a raw
    control character such as the separator, so the key splits back into the four parts."""


def _columns(fields: _Fields) -> _Columns:
    nested = zip(
        fields.requestParameters,
        fields.responseElements,
        fields.additionalEventData,
        fields.resources,
        strict=True,
    )
    return _Columns(
        eventTime=fields.eventTime,
        eventID=fields.eventID,
        eventSource=fields.eventSource,
        eventName=fields.eventName,
        awsRegion=fields.awsRegion,
        sourceIPAddress=fields.sourceIPAddress,
        userAgent=fields.userAgent,
        errorCode=fields.errorCode,
        errorMessage=fields.errorMessage,
        recipientAccountId=fields.recipientAccountId,
        requestID=fields.requestID,
        invokedBy=fields.invokedBy,
        userIdentity=list(map(bytes, fields.userIdentity)),
        nested=list(map(_NESTED_SEPARATOR.join, nested)),
    )


def _concat_columns(parts: list[_Part]) -> _Columns:
    """Join the columns of several files into one column per field."""
    decoded = [part.fields for part in parts if part.fields is not None]
    if len(decoded) == 1:
        return decoded[0]
    return _Columns(
        *(tuple(itertools.chain.from_iterable(columns)) for columns in zip(*decoded, strict=True))
    )


def _factorize(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Return an int64 code per value and the distinct values.

    None is a value like any other, and an empty string becomes None, as in :func:`_text`.
    """
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    distinct = [value if value != "" else None for value in uniques]
    codes = codes.astype(np.int64, copy=False)
    missing = codes < 0
    if missing.any():
        codes = np.where(missing, len(distinct), codes)
        distinct.append(None)
    return codes, distinct


def _combine(*codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return a code per distinct combination of ``codes`` and the first row of each one."""
    combined = codes[0]
    for more in codes[1:]:
        combined, _ = pd.factorize(combined * (int(more.max()) + 1) + more)
        combined = combined.astype(np.int64, copy=False)
    first = np.empty(int(combined.max()) + 1, dtype=np.int64)
    # Assigning in reverse order leaves each combination's first row in place.
    first[combined[::-1]] = np.arange(len(combined) - 1, -1, -1, dtype=np.int64)
    return combined, first


def _strings(values: Sequence[str | None]) -> pa.Array:
    """Convert to an Arrow string array; empty strings become null, as in :func:`_text`."""
    # pyarrow converts a list noticeably faster than a tuple.
    listed = values if isinstance(values, list) else list(values)
    array = pa.array(listed, type=_LARGE_STRING)
    if "" in listed:
        array = pc.if_else(pc.equal(array, ""), pa.scalar(None, _LARGE_STRING), array)
    return array


class _Explode:
    """The mapping from output rows to the records and targets they come from."""

    def __init__(self, key_codes: np.ndarray, target_counts: np.ndarray, offsets: np.ndarray):
        counts = target_counts[key_codes]
        self.rows = int(counts.sum())
        self.record = np.repeat(np.arange(len(key_codes), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        position = np.arange(self.rows, dtype=np.int64) - np.repeat(starts, counts)
        self.target = pa.array(offsets[key_codes[self.record]] + position)
        self.key = pa.array(key_codes[self.record])
        self._record_indices = pa.array(self.record)

    def take(self, per_record: pa.Array) -> pa.Array:
        """Repeat a per-record column to one value per output row."""
        return pc.take(per_record, self._record_indices, memory_pool=_POOL)

    def take_distinct(self, distinct: list[Any], codes: np.ndarray) -> pa.Array:
        """Map per-record ``codes`` into ``distinct`` values, one per output row."""
        indices = pa.array(codes[self.record].astype(np.int32))
        return pc.take(_strings(distinct), indices, memory_pool=_POOL)


def _build_batch(parts: list[_Part]) -> BatchResult | None:
    """Build the frame of several decoded files at once, or return None to use the record path.

    None means that a secret-store call in some file has a time that does not parse. The
    Arrow calls cost about the same for 5,000 rows as for 50,000, so one build per batch of
    files spreads that fixed cost.

    Raises:
        RecordError: a nested part of some file has a JSON type the record path rejects.
    """
    files: list[FileResult | None] = []
    for part in parts:
        counts = FileResult(events=_NO_EVENTS, files=1, records=part.records)
        counts.formats["cloudtrail"] = part.records
        files.append(counts)
    if not any(part.records for part in parts):
        return BatchResult(files, empty_events(), np.zeros(0, dtype=np.int64))
    fields = _concat_columns(parts)
    record_counts = np.array([part.records for part in parts], dtype=np.int64)
    record_starts = np.cumsum(record_counts) - record_counts
    file_of_record = np.repeat(np.arange(len(parts), dtype=np.int64), record_counts)

    for cache in (_WHO_CACHE, _TARGET_CACHE, _ADDRESS_CACHE):
        _evict_older_half(cache)

    identity_codes, identities = _factorize(fields.userIdentity)
    whos = [_resolve_who(raw) for raw in identities]
    address_codes, raw_addresses = _factorize(fields.sourceIPAddress)
    addresses = [_classify_address_cached(raw) for raw in raw_addresses]
    invoked_by_codes, invokers = _invoked_by_codes(
        fields, identity_codes, whos, address_codes, raw_addresses, addresses
    )

    source_codes, sources = _factorize(fields.eventSource)
    name_codes, names = _factorize(fields.eventName)
    nested_codes, nested = _factorize(fields.nested)
    key_codes, key_first = _combine(source_codes, name_codes, nested_codes, invoked_by_codes)
    # Python-level indexing is much faster with lists of ints than with numpy scalars.
    source_list = source_codes.tolist()
    name_list = name_codes.tolist()
    nested_list = nested_codes.tolist()
    invoked_by_list = invoked_by_codes.tolist()
    resolved = [
        _resolve_targets_cached(
            sources[source_list[first]],
            names[name_list[first]],
            nested[nested_list[first]],
            invokers[invoked_by_list[first]],
        )
        for first in key_first.tolist()
    ]

    target_counts = np.zeros(len(resolved), dtype=np.int64)
    skip_kinds: dict[str, list[int]] = {}
    stored_invokers: list[str | None] = []
    flat_targets: list[Target] = []
    for key, outcome in enumerate(resolved):
        if isinstance(outcome, Skip):
            skip_kinds.setdefault(outcome.kind, []).append(key)
            stored_invokers.append(None)
            continue
        targets, stored_invoked_by = outcome
        target_counts[key] = len(targets)
        stored_invokers.append(stored_invoked_by)
        flat_targets.extend(targets)
    _count_skipped(files, skip_kinds, key_codes, file_of_record, len(resolved))
    offsets = np.cumsum(target_counts) - target_counts
    explode = _Explode(key_codes, target_counts, offsets)
    if explode.rows == 0:
        return BatchResult(files, empty_events(), np.zeros(0, dtype=np.int64))

    times, invalid_times = _parse_event_times(fields.eventTime)
    if invalid_times[explode.record].any():
        return None
    row_files = file_of_record[explode.record]

    columns: dict[str, pa.Array] = {
        "event_uid": explode.take(_event_uids(fields, identity_codes, whos)),
        "time": explode.take(times),
        "cloud": _shared_column("aws", _LARGE_STRING, explode.rows),
        "log_format": _shared_column("cloudtrail", _LARGE_STRING, explode.rows),
        "service": explode.take_distinct([_service(source) for source in sources], source_codes),
        "operation": explode.take_distinct(names, name_codes),
    }
    for column, position in (("action", 0), ("resource", 1), ("resource_version", 2)):
        targets = _strings([target[position] for target in flat_targets])
        columns[column] = pc.take(targets, explode.target, memory_pool=_POOL)
    columns.update(_outcome_columns(fields, explode))
    for column, position in zip(_PRINCIPAL_COLUMNS, range(5), strict=True):
        columns[column] = explode.take_distinct([who[position] for who in whos], identity_codes)
    columns["invoked_by"] = pc.take(_strings(stored_invokers), explode.key, memory_pool=_POOL)
    columns["account"] = pc.coalesce(
        explode.take(_strings(fields.recipientAccountId)),
        explode.take_distinct([who[6] for who in whos], identity_codes),
        memory_pool=_POOL,
    )
    columns["region"] = explode.take(_strings(fields.awsRegion))
    columns["source_ip"] = explode.take_distinct([a[0] for a in addresses], address_codes)
    columns["source_kind"] = explode.take_distinct([a[1] for a in addresses], address_codes)
    columns["source_raw"] = explode.take_distinct(raw_addresses, address_codes)
    columns["user_agent"] = explode.take(_strings(fields.userAgent))
    columns["origin"] = _origins(parts, row_files, explode.record - record_starts[row_files] + 1)
    return BatchResult(files, _assemble_frame(columns, explode.rows), row_files)


def _count_skipped(
    files: list[FileResult | None],
    skip_kinds: dict[str, list[int]],
    key_codes: np.ndarray,
    file_of_record: np.ndarray,
    key_count: int,
) -> None:
    """Add each file's skipped records to its counts, by the kind of skip of their call."""
    for kind, keys in skip_kinds.items():
        skipped_key = np.zeros(key_count, dtype=bool)
        skipped_key[keys] = True
        per_file = np.bincount(file_of_record[skipped_key[key_codes]], minlength=len(files))
        for index in np.flatnonzero(per_file).tolist():
            counts = files[index]
            assert counts is not None
            counts.skipped[kind] += int(per_file[index])


def _origins(parts: list[_Part], row_files: np.ndarray, numbers: np.ndarray) -> pa.Array:
    """Return ``"<file> Records[<n>]"`` per row, ``n`` counting the file's records from 1."""
    if len(parts) == 1:
        prefix: pa.Array | pa.Scalar = pa.scalar(f"{parts[0].origin} Records[", _LARGE_STRING)
    else:
        prefixes = _strings([f"{part.origin} Records[" for part in parts])
        prefix = pc.take(prefixes, pa.array(row_files), memory_pool=_POOL)
    return pc.binary_join_element_wise(
        prefix,
        pc.cast(pa.array(numbers), _LARGE_STRING),
        pa.scalar("]", _LARGE_STRING),
        pa.scalar("", _LARGE_STRING),
        memory_pool=_POOL,
    )


def _invoked_by_codes(
    fields: _Columns,
    identity_codes: np.ndarray,
    whos: list[_Who],
    address_codes: np.ndarray,
    raw_addresses: list[str | None],
    addresses: list[tuple[str | None, str]],
) -> tuple[np.ndarray, list[str | None]]:
    """Return a code per record for the service that made the call, and the distinct values."""
    top_level_codes, top_level = _factorize(fields.invokedBy)
    caller_codes, caller_first = _combine(identity_codes, top_level_codes, address_codes)
    identity_list = identity_codes.tolist()
    top_level_list = top_level_codes.tolist()
    address_list = address_codes.tolist()
    per_caller: list[str | None] = []
    for first in caller_first.tolist():
        address = address_list[first]
        named = whos[identity_list[first]][5] or top_level[top_level_list[first]]
        if named is None and addresses[address][1] == "cloud_service":
            named = raw_addresses[address]
        per_caller.append(named)
    caller_invoker_codes, invokers = _factorize(per_caller)
    return caller_invoker_codes[caller_codes], invokers


def _event_uids(fields: _Columns, identity_codes: np.ndarray, whos: list[_Who]) -> pa.Array:
    if all(fields.eventID):
        return pa.array(list(fields.eventID), type=_LARGE_STRING, memory_pool=_POOL)
    uids = list(fields.eventID)
    for index, uid in enumerate(uids):
        if not uid:
            record = {
                "eventTime": fields.eventTime[index],
                "eventName": fields.eventName[index],
                "requestID": fields.requestID[index],
            }
            who = whos[identity_codes[index]]
            uids[index] = _fallback_uid(record, {"principal": who[0], "principal_arn": who[2]})
    return pa.array(uids, type=_LARGE_STRING, memory_pool=_POOL)


def _outcome_columns(fields: _Columns, explode: _Explode) -> dict[str, pa.Array]:
    code_codes, codes = _factorize(fields.errorCode)
    message_codes, messages = _factorize(fields.errorMessage)
    pair_codes, pair_first = _combine(code_codes, message_codes)
    outcomes = [
        _outcome(codes[code_codes[first]], messages[message_codes[first]]) for first in pair_first
    ]
    return {
        "outcome": explode.take_distinct([outcome for outcome, _ in outcomes], pair_codes),
        "failure_reason": explode.take_distinct([reason for _, reason in outcomes], pair_codes),
        "error_code": explode.take_distinct(codes, code_codes),
        "error_message": explode.take_distinct(messages, message_codes),
    }


def _assemble_frame(columns: dict[str, pa.Array], rows: int) -> pd.DataFrame:
    """Build the events frame in schema column order and dtypes; absent columns are null."""
    arrays = [
        columns[name] if name in columns else _shared_column(None, kind, rows)
        for name, kind in _ARROW_COLUMNS.items()
    ]
    table = pa.Table.from_arrays(arrays, names=list(_ARROW_COLUMNS))
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get, use_threads=False, memory_pool=_POOL)


# The schema's Arrow types, with strings as large_string: pandas converts its Arrow-backed
# strings to that type.
_ARROW_COLUMNS: Final = {
    name: _LARGE_STRING if kind == pa.string() else kind for name, kind in COLUMNS.items()
}
_PANDAS_TYPES: Final = {_LARGE_STRING: pd.StringDtype("pyarrow"), pa.int64(): pd.Int64Dtype()}


def _parse_event_times(values: Sequence[str | None]) -> tuple[pa.Array, np.ndarray]:
    """Parse event times with Arrow, falling back to :func:`parse_times` for other forms.

    Returns the times as Arrow ``timestamp[us, UTC]`` and a mask of the values that do not parse.
    """
    text = pa.array(list(values), type=pa.string())
    parsed = pc.strptime(text, format=_CLOUDTRAIL_TIME_FORMAT, unit="us", error_is_null=True)
    # Arrow's strptime rejects hour 24, minute 60, month 13 and day 32, but rolls a day past
    # the month's end and seconds 60 and 61 forward (2026-02-30 becomes 2026-03-02). A value
    # counts as parsed only if it is in the fixed 20-character form and its day and second
    # survived; parse_times gets the rest and rejects them as the record path does.
    fixed = pc.fill_null(pc.equal(pc.utf8_length(text), 20), False)
    safe = pc.if_else(fixed, text, "0000-00-00T00:00:00Z")
    exact = fixed
    for start, component in ((8, pc.day), (17, pc.second)):
        written = pc.cast(pc.utf8_slice_codeunits(safe, start, start + 2), pa.int64())
        exact = pc.and_(exact, pc.equal(written, component(parsed)))
    exact = pc.fill_null(exact, False).to_numpy(zero_copy_only=False)
    naive = parsed.to_numpy(zero_copy_only=False).astype("datetime64[us]")
    naive[~exact] = np.datetime64("NaT")
    failed = np.isnat(naive)
    invalid = np.zeros(len(values), dtype=bool)
    if failed.any():
        others, others_invalid = parse_times(text.filter(pa.array(failed)).to_pylist())
        naive[failed] = others.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        invalid[failed] = others_invalid | others.isna().to_numpy()
    return pa.array(naive, type=pa.timestamp("us", tz="UTC")), invalid


def _outcome(code: str | None, message: str | None) -> tuple[str, str | None]:
    if not code and not message:
        return "success", None
    return resolve_aws_outcome(code or None, message or None)
