"""AWS CloudTrail: Secrets Manager, SSM Parameter Store and KMS calls as event rows.

Accepts single CloudTrail events (from S3 ``Records`` files, LookupEvents or JSON Lines
exports), EventBridge envelopes around them, digest files and Insight events (both skipped with
a count). Calls that do not touch a secret (sign-ins, EC2, STS, ``ssm:SendCommand``) are skipped
as ``not_secret_activity``.

Two paths produce the same frame: :meth:`CloudTrailFormat.normalize` turns one record into rows,
and :meth:`CloudTrailFormat.read_fast` decodes a whole ``{"Records": [...]}`` file with msgspec
and resolves the nested parts (identity, request, caller address) once per distinct value.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Mapping
from functools import cache
from typing import Any, Final

import msgspec
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.formats.aws_identity import resolve_aws_outcome, resolve_aws_principal
from pipeline.formats.base import FileResult, LogFormat, RecordError, Row, Skip, register
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
            RecordError: the event names a secret-store call but has no ``eventTime``.
        """
        detail = _eventbridge_detail(record)
        if detail is not None:
            record = detail
        if any(key in record for key in _DIGEST_KEYS):
            return Skip("digest")
        if record.get("eventType") == "AwsCloudTrailInsight" or "insightDetails" in record:
            return Skip("insight")

        identity = _mapping(record.get("userIdentity"))
        source_raw = _text(record.get("sourceIPAddress"))
        source_ip, source_kind = classify_address(source_raw)
        invoked_by = _invoked_by(identity, record, source_raw, source_kind)
        resolved = resolve_targets(
            _text(record.get("eventSource")),
            _text(record.get("eventName")),
            _mapping(record.get("requestParameters")),
            _mapping(record.get("responseElements")),
            _mapping(record.get("additionalEventData")),
            record.get("resources"),
            invoked_by,
        )
        if isinstance(resolved, Skip):
            return resolved
        targets, invoked_by = resolved

        time = record.get("eventTime")
        if time is None or time == "":
            raise RecordError("eventTime", "missing")
        principal = resolve_aws_principal(identity)
        outcome, failure_reason = resolve_aws_outcome(
            _text(record.get("errorCode")), _text(record.get("errorMessage"))
        )
        common: Row = {
            "event_uid": _text(record.get("eventID")) or _fallback_uid(record, principal),
            "time": time if isinstance(time, str) else str(time),
            "cloud": "aws",
            "log_format": self.id,
            "service": _service(_text(record.get("eventSource"))),
            "operation": _text(record.get("eventName")),
            "outcome": outcome,
            "failure_reason": failure_reason,
            "error_code": _text(record.get("errorCode")),
            "error_message": _text(record.get("errorMessage")),
            **principal,
            "invoked_by": invoked_by,
            "account": _text(record.get("recipientAccountId")) or _text(identity.get("accountId")),
            "region": _text(record.get("awsRegion")),
            "source_ip": source_ip,
            "source_kind": source_kind,
            "source_raw": source_raw,
            "user_agent": _text(record.get("userAgent")),
            "origin": origin,
        }
        return [
            {**common, "action": action, "resource": resource, "resource_version": version}
            for action, resource, version in targets
        ]

    def read_fast(self, data: bytes, origin: str) -> FileResult | None:
        """Read a ``{"Records": [...]}`` file column-wise; None for any other shape.

        Also returns None when any record needs the record path: a missing ``eventTime``, a
        digest or Insight record, a value of an unexpected JSON type, or a time that does not
        parse. Quarantine entries and their origins then come from one place.
        """
        if not _RECORDS_PREFIX.match(data[:256]):
            return None
        return _read_records_file(data, origin)


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
    secret_id = _text(request.get("secretId"))
    if action is None:
        # An operation added after this table was written still counts when it names a secret.
        return [("other", secret_id, None)] if secret_id else None
    if name == "BatchGetSecretValue":
        return _batch_targets(request, response)
    if name in _LIST_OPERATIONS:
        return [(action, None, None)]

    resource = _first_arn(response) or secret_id or _text(request.get("name"))
    resource = resource or _text(additional.get("SecretId"))
    version = _text(request.get("versionId")) or _text(request.get("versionStage"))
    version = version or _text(response.get("versionId"))
    return [(action, resource, version)]


def _batch_targets(request: Mapping[str, Any], response: Mapping[str, Any]) -> list[Target]:
    """Build one target per secret that a BatchGetSecretValue call names."""
    id_list = request.get("secretIdList")
    if isinstance(id_list, list) and id_list:
        names = dict.fromkeys(text for item in id_list if (text := _text(item)))
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
        names = dict.fromkeys(text for item in value if (text := _text(item)))
        return [(action, item, None) for item in names] or [(action, None, None)]
    return [(action, _text(value), None)]


def _kms_targets(
    name: str, request: Mapping[str, Any], resources: Any, invoked_by: str | None
) -> tuple[list[Target], str | None] | Skip:
    action = _KMS_TIED_ACTIONS.get(name)
    if action is None:
        return Skip("not_secret_activity")
    context = _mapping(request.get("encryptionContext"))
    secret = _text(context.get("SecretARN"))
    parameter = _parameter_name(_text(context.get("PARAMETER_ARN"))) or _text(
        context.get("aws:ssm:parameter-name")
    )
    if secret or parameter:
        service = SECRETS_MANAGER if secret else SSM
        if invoked_by not in _SECRET_STORE_SERVICES:
            invoked_by = service
        return [(action, secret or parameter, _text(context.get("SecretVersionId")))], invoked_by
    if name != "Decrypt":
        return Skip("not_secret_activity")
    return [("decrypt", _kms_key(request, resources), None)], invoked_by


def _kms_key(request: Mapping[str, Any], resources: Any) -> str | None:
    if isinstance(resources, list):
        for item in resources:
            entry = _mapping(item)
            arn = _text(entry.get("ARN")) or _text(entry.get("arn"))
            if arn and ":key/" in arn:
                return arn
    return _text(request.get("keyId"))


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
    named = _text(identity.get("invokedBy")) or _text(record.get("invokedBy"))
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
        text = _text(value.get(key))
        if text and text.startswith("arn:"):
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
# Fast path: a whole {"Records": [...]} file, decoded with msgspec into the fields used above.

_ABSENT: Final = msgspec.Raw(b"")
_INSIGHT: Final = "AwsCloudTrailInsight"
# CloudTrail writes eventTime in this form; anything else goes through parse_times.
_CLOUDTRAIL_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


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


class _RecordsFile(msgspec.Struct, forbid_unknown_fields=True):
    Records: list[_FastEvent]


_RECORDS_DECODER: Final = msgspec.json.Decoder(_RecordsFile)

# Caller resolved from one distinct raw userIdentity: the five principal columns, then the
# identity's invokedBy and accountId.
_Who = tuple[str | None, str | None, str | None, str | None, str | None, str | None, str | None]


# Resolutions are pure functions of these keys, so they are kept across files; both caches are
# emptied when either grows past _MAX_CACHED entries.
_MAX_CACHED: Final = 200_000
_WHO_CACHE: dict[bytes, _Who] = {}
_TARGET_CACHE: dict[tuple[Any, ...], tuple[list[Target], str | None] | Skip] = {}


def _load_raw(raw: bytes) -> Any:
    return orjson.loads(raw) if raw else None


def _resolve_who(raw: bytes) -> _Who:
    identity = _mapping(_load_raw(raw))
    principal = resolve_aws_principal(identity)
    return (
        principal["principal"],
        principal["principal_type"],
        principal["principal_arn"],
        principal["principal_id"],
        principal["session_name"],
        _text(identity.get("invokedBy")),
        _text(identity.get("accountId")),
    )


def _needs_record_path(event: _FastEvent) -> bool:
    return (
        not event.eventTime
        or event.eventType == _INSIGHT
        or bool(event.insightDetails)
        or bool(event.detail)
        or bool(event.digestStartTime)
        or bool(event.digestS3Object)
        or bool(event.logFiles)
    )


def _read_records_file(data: bytes, origin: str) -> FileResult | None:
    """Read a CloudTrail ``Records`` file column-wise, or return None to use the record path."""
    enabled = gc.isenabled()
    # The decode and the walk create many small objects but no reference cycles, so the cyclic
    # garbage collector would run many times and free nothing.
    gc.disable()
    try:
        try:
            events = _RECORDS_DECODER.decode(data).Records
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return _build_result(events, origin)
    finally:
        if enabled:
            gc.enable()


def _build_result(events: list[_FastEvent], origin: str) -> FileResult | None:
    result = FileResult(files=1, records=len(events))
    result.formats["cloudtrail"] = len(events)
    who_cache = _WHO_CACHE
    target_cache = _TARGET_CACHE
    if len(who_cache) > _MAX_CACHED or len(target_cache) > _MAX_CACHED:
        who_cache.clear()
        target_cache.clear()
    skipped: Counter[str] = Counter()

    kept: list[_FastEvent] = []
    kept_index: list[int] = []
    whos: list[_Who] = []
    addresses: list[tuple[str | None, str]] = []
    invokers: list[str | None] = []
    row_record: list[int] = []
    row_targets: list[Target] = []

    for index, event in enumerate(events):
        if _needs_record_path(event):
            return None
        source_raw = event.sourceIPAddress or None
        address = classify_address(source_raw)
        identity_raw = bytes(event.userIdentity)
        who = who_cache.get(identity_raw)
        if who is None:
            who = who_cache[identity_raw] = _resolve_who(identity_raw)
        invoked_by = who[5] or event.invokedBy or None
        if invoked_by is None and address[1] == "cloud_service":
            invoked_by = source_raw
        key = (
            event.eventSource,
            event.eventName,
            bytes(event.requestParameters),
            bytes(event.responseElements),
            bytes(event.additionalEventData),
            bytes(event.resources),
            invoked_by,
        )
        resolved = target_cache.get(key)
        if resolved is None:
            resolved = target_cache[key] = resolve_targets(
                event.eventSource or None,
                event.eventName or None,
                _mapping(_load_raw(key[2])),
                _mapping(_load_raw(key[3])),
                _mapping(_load_raw(key[4])),
                _load_raw(key[5]),
                invoked_by,
            )
        if isinstance(resolved, Skip):
            skipped[resolved.kind] += 1
            continue
        targets, stored_invoked_by = resolved
        position = len(kept)
        kept.append(event)
        kept_index.append(index)
        whos.append(who)
        addresses.append(address)
        invokers.append(stored_invoked_by)
        for target in targets:
            row_record.append(position)
            row_targets.append(target)

    result.skipped.update(skipped)
    if not row_targets:
        return result
    events_frame = _build_frame(
        kept, kept_index, whos, addresses, invokers, row_record, row_targets, origin
    )
    if events_frame is None:
        return None
    result.events = events_frame
    return result


def _build_frame(
    kept: list[_FastEvent],
    kept_index: list[int],
    whos: list[_Who],
    addresses: list[tuple[str | None, str]],
    invokers: list[str | None],
    row_record: list[int],
    row_targets: list[Target],
    origin: str,
) -> pd.DataFrame | None:
    times = _parse_event_times([event.eventTime for event in kept])
    if times is None:
        return None
    outcomes = [_outcome(event.errorCode, event.errorMessage) for event in kept]
    per_record: dict[str, list[Any]] = {
        "event_uid": [
            event.eventID or _fallback_uid(_uid_fields(event), _who_names(who))
            for event, who in zip(kept, whos, strict=True)
        ],
        "service": [_service(event.eventSource or None) for event in kept],
        "operation": [event.eventName or None for event in kept],
        "outcome": [outcome for outcome, _ in outcomes],
        "failure_reason": [reason for _, reason in outcomes],
        "error_code": [event.errorCode or None for event in kept],
        "error_message": [event.errorMessage or None for event in kept],
        "principal": [who[0] for who in whos],
        "principal_type": [who[1] for who in whos],
        "principal_arn": [who[2] for who in whos],
        "principal_id": [who[3] for who in whos],
        "session_name": [who[4] for who in whos],
        "invoked_by": invokers,
        "account": [
            event.recipientAccountId or who[6] for event, who in zip(kept, whos, strict=True)
        ],
        "region": [event.awsRegion or None for event in kept],
        "source_ip": [address[0] for address in addresses],
        "source_kind": [address[1] for address in addresses],
        "source_raw": [event.sourceIPAddress or None for event in kept],
        "user_agent": [event.userAgent or None for event in kept],
        "origin": [f"{origin} Records[{index + 1}]" for index in kept_index],
    }
    table = pa.table(
        {name: pa.array(values, type=pa.string()) for name, values in per_record.items()}
    )
    if len(row_record) != len(kept):
        table = table.take(pa.array(row_record, type=pa.int64()))
        times = times.take(row_record).reset_index(drop=True)
    rows = len(row_record)
    targets = {
        "action": [target[0] for target in row_targets],
        "resource": [target[1] for target in row_targets],
        "resource_version": [target[2] for target in row_targets],
        "cloud": ["aws"] * rows,
        "log_format": ["cloudtrail"] * rows,
    }
    for name, values in targets.items():
        table = table.append_column(name, pa.array(values, type=pa.string()))
    strings = table.to_pandas(types_mapper=_STRING_TYPES.get)
    columns: dict[str, Any] = {}
    for name, dtype in _event_dtypes().items():
        if name == "time":
            columns[name] = times
        elif name in strings.columns:
            columns[name] = strings[name]
        else:
            columns[name] = pd.Series([None] * rows, dtype=dtype)
    return pd.DataFrame(columns)


_STRING_TYPES: Final = {pa.string(): pd.StringDtype("pyarrow")}


@cache
def _event_dtypes() -> dict[str, Any]:
    """Return the pandas dtype of every events column, in column order."""
    template = empty_events()
    return {name: template[name].dtype for name in COLUMNS}


def _parse_event_times(values: list[str | None]) -> pd.Series | None:
    """Parse event times with Arrow, falling back to :func:`parse_times` for other forms.

    Returns None when a time cannot be parsed, so that the record path quarantines it.
    """
    text = pa.array(values, type=pa.string())
    parsed = pc.strptime(text, format=_CLOUDTRAIL_TIME_FORMAT, unit="us", error_is_null=True)
    times = parsed.cast(pa.timestamp("us", tz="UTC")).to_pandas()
    failed = times.isna().to_numpy()
    if failed.any():
        others, invalid = parse_times(text.filter(pa.array(failed)).to_pylist())
        if invalid.any():
            return None
        times = times.copy()
        times[failed] = others.to_numpy()
    return times.astype("datetime64[us, UTC]")


def _outcome(code: str | None, message: str | None) -> tuple[str, str | None]:
    if not code and not message:
        return "success", None
    return resolve_aws_outcome(code or None, message or None)


def _uid_fields(event: _FastEvent) -> dict[str, Any]:
    return {
        "eventTime": event.eventTime,
        "eventName": event.eventName,
        "requestID": event.requestID,
    }


def _who_names(who: _Who) -> dict[str, str | None]:
    return {"principal": who[0], "principal_arn": who[2]}
