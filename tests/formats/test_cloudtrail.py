"""Tests of the CloudTrail format: record normalization and the column-wise fast path."""

from __future__ import annotations

import gzip
from collections import Counter
from typing import Any

import orjson
import pandas as pd
import pytest

from pipeline.formats import read_bytes
from pipeline.formats.base import FileResult, RecordError, Skip
from pipeline.formats.cloudtrail import (
    CloudTrailFormat,
    _FastEvent,
    _Fields,
    resolve_targets,
)
from pipeline.schema import check_events

ACCOUNT = "444455556666"
SECRET_ARN = f"arn:aws:secretsmanager:eu-central-1:{ACCOUNT}:secret:billing/stripe-Qw3rTy"
KEY_ARN = f"arn:aws:kms:eu-central-1:{ACCOUNT}:key/aaaabbbb-cccc-dddd-eeee-ffff00001111"
USER = {
    "type": "IAMUser",
    "principalId": "AIDAFIXTURE01",
    "arn": f"arn:aws:iam::{ACCOUNT}:user/deploy-bot",
    "accountId": ACCOUNT,
    "accessKeyId": "AKIAFIXTURE01",
    "userName": "deploy-bot",
}
ROLE = {
    "type": "AssumedRole",
    "principalId": "AROAFIXTURE02:job-17",
    "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/reporting/job-17",
    "accountId": ACCOUNT,
    "sessionContext": {
        "sessionIssuer": {
            "type": "Role",
            "arn": f"arn:aws:iam::{ACCOUNT}:role/reporting",
            "userName": "reporting",
        }
    },
}

FORMAT = CloudTrailFormat()


def make_event(
    name: str, source: str = "secretsmanager.amazonaws.com", **fields: Any
) -> dict[str, Any]:
    """Build a CloudTrail event with the usual fields; keyword arguments override them."""
    event: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": USER,
        "eventTime": "2025-04-02T10:15:30Z",
        "eventSource": source,
        "eventName": name,
        "awsRegion": "eu-central-1",
        "sourceIPAddress": "52.94.76.10",
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": None,
        "responseElements": None,
        "requestID": f"req-{name}",
        "eventID": f"evt-{name}",
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }
    event.update(fields)
    return event


def only_row(produced: list[dict[str, Any]] | Skip) -> dict[str, Any]:
    assert isinstance(produced, list)
    assert len(produced) == 1
    return produced[0]


# --- matches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"eventSource": "s3.amazonaws.com"},
        {"eventTime": "2025-01-01T00:00:00Z"},
        {"digestStartTime": "2025-01-01T00:00:00Z", "logFiles": []},
        {"eventType": "AwsCloudTrailInsight"},
        {"detail-type": "AWS API Call via CloudTrail", "detail": {}},
        {"detail-type": "AWS Service Event via CloudTrail", "detail": {}},
    ],
    ids=[
        "event_source",
        "event_time",
        "digest",
        "insight",
        "eventbridge_api",
        "eventbridge_service",
    ],
)
def test_matches_cloudtrail_shapes(record: dict[str, Any]) -> None:
    assert FORMAT.matches(record)


@pytest.mark.parametrize(
    "record",
    [
        {"operationName": "SecretGet", "category": "AuditEvent"},
        {"protoPayload": {}, "insertId": "x"},
        {"detail-type": "EC2 Instance State-change Notification", "detail": {}},
        {"detail-type": "AWS API Call via CloudTrail", "detail": "not-an-object"},
    ],
    ids=["azure", "gcp", "eventbridge_other", "eventbridge_bad_detail"],
)
def test_matches_rejects_other_formats(record: dict[str, Any]) -> None:
    assert not FORMAT.matches(record)


# --- Secrets Manager -----------------------------------------------------------------------


def test_get_secret_value_row() -> None:
    record = make_event(
        "GetSecretValue",
        requestParameters={"secretId": "billing/stripe", "versionStage": "AWSCURRENT"},
    )
    row = only_row(FORMAT.normalize(record, "f.json record 1"))
    assert row == {
        "event_uid": "evt-GetSecretValue",
        "time": "2025-04-02T10:15:30Z",
        "cloud": "aws",
        "log_format": "cloudtrail",
        "service": "secretsmanager",
        "operation": "GetSecretValue",
        "action": "read",
        "outcome": "success",
        "failure_reason": None,
        "error_code": None,
        "error_message": None,
        "principal": "deploy-bot",
        "principal_type": "user",
        "principal_arn": f"arn:aws:iam::{ACCOUNT}:user/deploy-bot",
        "principal_id": "AIDAFIXTURE01",
        "session_name": None,
        "invoked_by": None,
        "account": ACCOUNT,
        "region": "eu-central-1",
        "resource": "billing/stripe",
        "resource_version": "AWSCURRENT",
        "source_ip": "52.94.76.10",
        "source_kind": "public",
        "source_raw": "52.94.76.10",
        "user_agent": "aws-cli/2.15.0",
        "origin": "f.json record 1",
    }


def test_get_secret_value_denied() -> None:
    record = make_event(
        "GetSecretValue",
        userIdentity=ROLE,
        requestParameters={"secretId": SECRET_ARN, "versionId": "v-0001"},
        errorCode="AccessDenied",
        errorMessage="not authorized",
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["outcome"] == "failure"
    assert row["failure_reason"] == "denied"
    assert row["error_code"] == "AccessDenied"
    assert row["resource_version"] == "v-0001"
    assert row["principal"] == f"arn:aws:iam::{ACCOUNT}:role/reporting"
    assert row["session_name"] == "job-17"


def test_batch_get_secret_value_list() -> None:
    record = make_event(
        "BatchGetSecretValue",
        requestParameters={"secretIdList": ["alpha", "beta", "alpha", "gamma"]},
    )
    rows = FORMAT.normalize(record, "o")
    assert isinstance(rows, list)
    assert [row["resource"] for row in rows] == ["alpha", "beta", "gamma"]
    assert {row["event_uid"] for row in rows} == {"evt-BatchGetSecretValue"}
    assert {row["action"] for row in rows} == {"read"}


def test_batch_get_secret_value_filters() -> None:
    record = make_event(
        "BatchGetSecretValue",
        requestParameters={
            "filters": [
                {"key": "tag-key", "values": ["team"]},
                {"key": "name", "values": ["prod/", "stage/"]},
            ]
        },
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["resource"] == "filters:tag-key=team;name=prod/,stage/"


def test_batch_filters_with_returned_arns() -> None:
    record = make_event(
        "BatchGetSecretValue",
        requestParameters={"filters": [{"key": "tag-key", "values": ["team"]}]},
        responseElements={"secretValues": [{"aRN": SECRET_ARN}, {"aRN": SECRET_ARN + "2"}]},
    )
    rows = FORMAT.normalize(record, "o")
    assert isinstance(rows, list)
    assert [row["resource"] for row in rows] == [SECRET_ARN, SECRET_ARN + "2"]


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("ListSecrets", "list"),
        ("DescribeSecret", "describe"),
        ("GetResourcePolicy", "describe"),
        ("ListSecretVersionIds", "describe"),
        ("PutSecretValue", "write"),
        ("UpdateSecret", "write"),
        ("CreateSecret", "write"),
        ("RestoreSecret", "write"),
        ("DeleteSecret", "delete"),
        ("RotateSecret", "rotate"),
        ("RotationSucceeded", "rotate"),
        ("CancelRotateSecret", "rotate"),
        ("PutResourcePolicy", "policy"),
        ("DeleteResourcePolicy", "policy"),
        ("TagResource", "other"),
    ],
)
def test_secrets_manager_actions(name: str, action: str) -> None:
    record = make_event(name, requestParameters={"secretId": "billing/stripe"})
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["action"] == action
    assert row["resource"] == (None if name == "ListSecrets" else "billing/stripe")


def test_response_arn_preferred() -> None:
    record = make_event(
        "PutSecretValue",
        requestParameters={"secretId": "billing/stripe"},
        responseElements={"arn": SECRET_ARN, "versionId": "v-0002"},
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["resource"] == SECRET_ARN
    assert row["resource_version"] == "v-0002"


def test_rotation_failed_service_event() -> None:
    record = make_event(
        "RotationFailed",
        userIdentity={"accountId": ACCOUNT, "invokedBy": "secretsmanager.amazonaws.com"},
        sourceIPAddress="secretsmanager.amazonaws.com",
        errorMessage="rotation lambda failed in setSecret",
        additionalEventData={"SecretId": SECRET_ARN},
        eventType="AwsServiceEvent",
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["action"] == "rotate"
    assert row["resource"] == SECRET_ARN
    assert row["outcome"] == "failure"
    assert row["failure_reason"] == "error"
    assert row["principal"] == "secretsmanager.amazonaws.com"
    assert row["principal_type"] == "service"
    assert row["invoked_by"] == "secretsmanager.amazonaws.com"
    assert row["source_kind"] == "cloud_service"
    assert row["source_ip"] is None


def test_unknown_secrets_manager_operation_with_secret() -> None:
    record = make_event(
        "ReplicateSecretToRegions", requestParameters={"secretId": "billing/stripe"}
    )
    assert only_row(FORMAT.normalize(record, "o"))["action"] == "other"


def test_get_random_password_skipped() -> None:
    record = make_event("GetRandomPassword", requestParameters={"passwordLength": 32})
    assert FORMAT.normalize(record, "o") == Skip("not_secret_activity")


# --- SSM Parameter Store -------------------------------------------------------------------


def test_get_parameters_one_row_each() -> None:
    record = make_event(
        "GetParameters",
        source="ssm.amazonaws.com",
        requestParameters={"names": ["/app/db/user", "/app/db/password"], "withDecryption": True},
    )
    rows = FORMAT.normalize(record, "o")
    assert isinstance(rows, list)
    assert [(row["action"], row["resource"]) for row in rows] == [
        ("read", "/app/db/user"),
        ("read", "/app/db/password"),
    ]
    assert [row["service"] for row in rows] == ["ssm", "ssm"]


@pytest.mark.parametrize(
    ("name", "request_parameters", "expected"),
    [
        ("GetParameter", {"name": "/app/token", "withDecryption": False}, [("read", "/app/token")]),
        ("GetParametersByPath", {"path": "/app/", "recursive": True}, [("read", "/app/")]),
        ("GetParameterHistory", {"name": "/app/token"}, [("read", "/app/token")]),
        ("DescribeParameters", {"maxResults": 50}, [("list", None)]),
        ("PutParameter", {"name": "/app/token", "type": "SecureString"}, [("write", "/app/token")]),
        ("DeleteParameter", {"name": "/app/token"}, [("delete", "/app/token")]),
        ("DeleteParameters", {"names": ["/a", "/b"]}, [("delete", "/a"), ("delete", "/b")]),
    ],
)
def test_ssm_actions(
    name: str, request_parameters: dict[str, Any], expected: list[tuple[str, str | None]]
) -> None:
    record = make_event(name, source="ssm.amazonaws.com", requestParameters=request_parameters)
    rows = FORMAT.normalize(record, "o")
    assert isinstance(rows, list)
    assert [(row["action"], row["resource"]) for row in rows] == expected


@pytest.mark.parametrize(
    "name", ["SendCommand", "DescribeInstanceInformation", "GetCommandInvocation", "StartSession"]
)
def test_ssm_non_parameter_skipped(name: str) -> None:
    record = make_event(
        name, source="ssm.amazonaws.com", requestParameters={"instanceIds": ["i-1"]}
    )
    assert FORMAT.normalize(record, "o") == Skip("not_secret_activity")


# --- KMS -----------------------------------------------------------------------------------


def test_decrypt_by_secrets_manager() -> None:
    record = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        userIdentity={**ROLE, "invokedBy": "secretsmanager.amazonaws.com"},
        sourceIPAddress="secretsmanager.amazonaws.com",
        requestParameters={
            "encryptionContext": {"SecretARN": SECRET_ARN, "SecretVersionId": "v-9"}
        },
        resources=[{"ARN": KEY_ARN, "type": "AWS::KMS::Key"}],
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["action"] == "decrypt"
    assert row["resource"] == SECRET_ARN
    assert row["resource_version"] == "v-9"
    assert row["invoked_by"] == "secretsmanager.amazonaws.com"
    assert row["service"] == "kms"


def test_decrypt_tied_by_context_only() -> None:
    record = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        requestParameters={
            "encryptionContext": {
                "PARAMETER_ARN": f"arn:aws:ssm:eu-central-1:{ACCOUNT}:parameter/app/db/password"
            }
        },
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["resource"] == "/app/db/password"
    assert row["invoked_by"] == "ssm.amazonaws.com"


def test_decrypt_flat_parameter_name() -> None:
    record = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        requestParameters={
            "encryptionContext": {
                "PARAMETER_ARN": f"arn:aws:ssm:eu-central-1:{ACCOUNT}:parameter/token"
            }
        },
    )
    assert only_row(FORMAT.normalize(record, "o"))["resource"] == "token"


def test_generate_data_key_for_secret() -> None:
    record = make_event(
        "GenerateDataKey",
        source="kms.amazonaws.com",
        requestParameters={"keyId": KEY_ARN, "encryptionContext": {"SecretARN": SECRET_ARN}},
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["action"] == "other"
    assert row["resource"] == SECRET_ARN


def test_plain_decrypt_uses_key() -> None:
    record = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        requestParameters={"encryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        resources=[{"accountId": ACCOUNT, "ARN": KEY_ARN}],
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["action"] == "decrypt"
    assert row["resource"] == KEY_ARN
    assert row["invoked_by"] is None


def test_plain_decrypt_key_id_fallback() -> None:
    record = make_event(
        "Decrypt", source="kms.amazonaws.com", requestParameters={"keyId": "alias/app"}
    )
    assert only_row(FORMAT.normalize(record, "o"))["resource"] == "alias/app"


@pytest.mark.parametrize("name", ["GenerateDataKey", "Encrypt", "RotateKey", "CreateKey"])
def test_untied_kms_skipped(name: str) -> None:
    record = make_event(name, source="kms.amazonaws.com", requestParameters={"keyId": KEY_ARN})
    assert FORMAT.normalize(record, "o") == Skip("not_secret_activity")


# --- skips, envelopes, missing fields ------------------------------------------------------


def test_digest_skipped() -> None:
    record = {"awsAccountId": ACCOUNT, "digestStartTime": "2025-01-01T00:00:00Z", "logFiles": []}
    assert FORMAT.normalize(record, "o") == Skip("digest")


def test_insight_skipped() -> None:
    record = {
        "eventVersion": "1.07",
        "eventTime": "2025-01-01T00:00:00Z",
        "eventType": "AwsCloudTrailInsight",
    }
    assert FORMAT.normalize(record, "o") == Skip("insight")


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("signin.amazonaws.com", "ConsoleLogin"),
        ("ec2.amazonaws.com", "DescribeInstances"),
        ("sts.amazonaws.com", "AssumeRole"),
        (None, None),
    ],
)
def test_other_services_skipped(source: str | None, name: str | None) -> None:
    record = make_event("x", eventSource=source, eventName=name)
    assert FORMAT.normalize(record, "o") == Skip("not_secret_activity")


def test_eventbridge_envelope() -> None:
    detail = make_event("GetSecretValue", requestParameters={"secretId": "billing/stripe"})
    envelope = {
        "version": "0",
        "id": "eb-envelope-id",
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws.secretsmanager",
        "detail": detail,
    }
    row = only_row(FORMAT.normalize(envelope, "o"))
    assert row["event_uid"] == "evt-GetSecretValue"
    assert row["resource"] == "billing/stripe"


def test_missing_event_time_raises() -> None:
    record = make_event("GetSecretValue", requestParameters={"secretId": "s"})
    del record["eventTime"]
    with pytest.raises(RecordError) as caught:
        FORMAT.normalize(record, "o")
    assert caught.value.field == "eventTime"
    assert caught.value.message == "missing"


def test_missing_event_id_hashed() -> None:
    record = make_event("GetSecretValue", requestParameters={"secretId": "s"})
    del record["eventID"]
    first = only_row(FORMAT.normalize(record, "o"))["event_uid"]
    second = only_row(FORMAT.normalize(dict(record), "o"))["event_uid"]
    other = only_row(FORMAT.normalize({**record, "requestID": "another"}, "o"))["event_uid"]
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 64
    assert first == second
    assert first != other


def test_null_nested_fields() -> None:
    record = make_event(
        "GetSecretValue",
        userIdentity=None,
        requestParameters=None,
        responseElements=None,
        sourceIPAddress=None,
        userAgent=None,
        awsRegion=None,
        recipientAccountId=None,
    )
    row = only_row(FORMAT.normalize(record, "o"))
    assert row["resource"] is None
    assert row["principal"] is None
    assert row["principal_type"] == "unknown"
    assert row["account"] is None
    assert row["source_kind"] == "missing"
    assert row["event_uid"] == "evt-GetSecretValue"


def test_account_from_identity() -> None:
    record = make_event("GetSecretValue", requestParameters={"secretId": "s"})
    del record["recipientAccountId"]
    assert only_row(FORMAT.normalize(record, "o"))["account"] == ACCOUNT


def test_resolve_targets_other_service() -> None:
    assert resolve_targets("s3.amazonaws.com", "GetObject", {}, {}, {}, None, None) == Skip(
        "not_secret_activity"
    )


# --- fast path against the record path -----------------------------------------------------


def fixture_records() -> list[dict[str, Any]]:
    """A file's worth of events covering every branch the fast path resolves."""
    decrypt = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        userIdentity={**ROLE, "invokedBy": "secretsmanager.amazonaws.com"},
        sourceIPAddress="secretsmanager.amazonaws.com",
        requestParameters={
            "encryptionContext": {"SecretARN": SECRET_ARN, "SecretVersionId": "v-1"}
        },
        resources=[{"ARN": KEY_ARN}],
        eventID="evt-decrypt",
    )
    no_uid = make_event("GetSecretValue", requestParameters={"secretId": "no-uid"})
    del no_uid["eventID"]
    return [
        make_event("GetSecretValue", requestParameters={"secretId": SECRET_ARN}, eventID="e1"),
        make_event(
            "GetSecretValue",
            userIdentity=ROLE,
            requestParameters={"secretId": "billing/stripe"},
            errorCode="ResourceNotFoundException",
            errorMessage="not found",
            eventTime="2025-04-02T10:15:31.250Z",
            eventID="e2",
        ),
        make_event(
            "BatchGetSecretValue", requestParameters={"secretIdList": ["a", "b", "c"]}, eventID="e3"
        ),
        make_event(
            "BatchGetSecretValue",
            requestParameters={"filters": [{"key": "tag-key", "values": ["team"]}]},
            eventID="e4",
        ),
        make_event(
            "GetParameters",
            source="ssm.amazonaws.com",
            requestParameters={"names": ["/x/1", "/x/2"]},
            sourceIPAddress="10.1.2.3",
            eventID="e5",
        ),
        decrypt,
        make_event("ListSecrets", eventID="e6", userIdentity=None, sourceIPAddress="AWS Internal"),
        make_event("DescribeInstances", source="ec2.amazonaws.com", eventID="e7"),
        make_event("SendCommand", source="ssm.amazonaws.com", eventID="e8"),
        make_event(
            "GetSecretValue",
            requestParameters={"secretId": "s"},
            eventTime="2025-04-02 10:15:32.123456789",
            eventID="e9",
        ),
        no_uid,
        make_event("GetSecretValue", requestParameters=None, responseElements=None, eventID="e10"),
    ]


def read_both(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[FileResult, FileResult]:
    """Read ``data`` once through the fast path and once with it switched off."""
    fast = read_bytes(data, "trail.json.gz")
    with monkeypatch.context() as patched:
        patched.setattr(CloudTrailFormat, "read_fast", lambda self, data, origin: None)
        slow = read_bytes(data, "trail.json.gz")
    return fast, slow


def test_fast_path_equals_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = gzip.compress(orjson.dumps({"Records": fixture_records()}))
    assert FORMAT.read_fast(gzip.decompress(data), "trail.json.gz") is not None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert fast.summary() == {
        "files": 1,
        "records": 12,
        "events": 13,
        "quarantined": 0,
        "quarantined_by_reason": {},
        "skipped_by_kind": {"not_secret_activity": 2},
        "records_by_format": {"cloudtrail": 12},
    }
    assert check_events(fast.events) == []
    assert fast.events["origin"].iloc[0] == "trail.json.gz Records[1]"


def test_fast_path_pretty_printed_file(monkeypatch: pytest.MonkeyPatch) -> None:
    data = orjson.dumps({"Records": fixture_records()}, option=orjson.OPT_INDENT_2)
    assert FORMAT.read_fast(data, "trail.json") is not None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)


@pytest.mark.parametrize(
    ("records", "expected_quarantine", "expected_skips"),
    [
        ([make_event("GetSecretValue", eventTime=None)], Counter({"invalid_record": 1}), Counter()),
        (
            [make_event("GetSecretValue", eventTime="yesterday")],
            Counter({"invalid_time": 1}),
            Counter(),
        ),
        (
            [{"eventVersion": "1.07", "eventType": "AwsCloudTrailInsight", "eventTime": "x"}],
            Counter(),
            Counter({"insight": 1}),
        ),
        ([make_event("GetSecretValue", awsRegion=7)], Counter(), Counter()),
        (
            [make_event("GetSecretValue"), "not-an-object"],
            Counter({"invalid_record": 1}),
            Counter(),
        ),
    ],
    ids=["missing_time", "bad_time", "insight", "number_region", "non_object_record"],
)
def test_fast_path_declines_odd_files(
    records: list[Any],
    expected_quarantine: Counter[str],
    expected_skips: Counter[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = orjson.dumps({"Records": records})
    assert FORMAT.read_fast(data, "odd.json") is None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert Counter(q.reason for q in fast.quarantined) == expected_quarantine
    assert fast.skipped == expected_skips


@pytest.mark.parametrize(
    "data",
    [
        b'[{"eventName": "GetSecretValue"}]',
        b'{"records": []}',
        b'{"Records": [], "nextToken": "abc"}',
        b'{"Records": [',
    ],
    ids=["array", "lower_case_wrapper", "extra_key", "truncated"],
)
def test_fast_path_other_shapes(data: bytes) -> None:
    assert FORMAT.read_fast(data, "x.json") is None


def test_fast_path_empty_records() -> None:
    result = FORMAT.read_fast(b'{"Records": []}', "empty.json")
    assert result is not None
    assert result.records == 0
    assert len(result.events) == 0


def gap_records() -> list[dict[str, Any]]:
    """Events for branches the first fixture does not reach."""
    no_invoker = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        userIdentity=ROLE,
        sourceIPAddress="ssm.amazonaws.com",
        requestParameters={"encryptionContext": {"PARAMETER_ARN": "arn:aws:ssm:x:1:parameter/a/b"}},
        eventID="g1",
    )
    top_level_invoker = make_event(
        "GetSecretValue",
        requestParameters={"secretId": "top"},
        invokedBy="lambda.amazonaws.com",
        eventID="g2",
    )
    empty_strings = make_event(
        "GetSecretValue",
        requestParameters={"secretId": "blank"},
        awsRegion="",
        userAgent="",
        errorCode="",
        errorMessage="",
        recipientAccountId="",
        sourceIPAddress="",
        eventID="g3",
    )
    from_response = make_event(
        "DescribeSecret",
        requestParameters={"secretId": "short-name"},
        responseElements={"aRN": SECRET_ARN},
        eventID="g4",
    )
    from_additional = make_event(
        "RotationSucceeded",
        eventType="AwsServiceEvent",
        additionalEventData={"SecretId": SECRET_ARN},
        eventID="g5",
    )
    plain_decrypt = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        requestParameters={"keyId": "alias/app"},
        resources=[{"ARN": KEY_ARN}, {"arn": "arn:aws:kms:x:1:alias/app"}],
        eventID="g6",
    )
    nested_detail = make_event(
        "PutSecretValue",
        requestParameters={"secretId": "n", "detail": {"eventType": "AwsCloudTrailInsight"}},
        eventID="g7",
    )
    denied = make_event(
        "GetParameter",
        source="ssm.amazonaws.com",
        requestParameters={"name": "/x/denied"},
        errorCode="AccessDenied",
        errorMessage="User: x is not authorized to perform: ssm:GetParameter",
        eventTime="2025-04-02T10:15:33+02:00",
        eventID="g8",
    )
    repeated = make_event("GetSecretValue", requestParameters={"secretId": "twice"}, eventID="g9")
    return [
        no_invoker,
        top_level_invoker,
        empty_strings,
        from_response,
        from_additional,
        plain_decrypt,
        nested_detail,
        denied,
        repeated,
        dict(repeated),
        make_event("ListSecrets", userIdentity={"type": "AWSService", "invokedBy": "x"}),
    ]


def test_fast_path_equals_record_path_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    data = orjson.dumps({"Records": gap_records()})
    assert FORMAT.read_fast(data, "gaps.json") is not None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert len(fast.events) == 11
    assert check_events(fast.events) == []
    by_uid = fast.events.set_index("event_uid")
    assert by_uid.loc["g1", "invoked_by"] == "ssm.amazonaws.com"
    assert by_uid.loc["g1", "resource"] == "/a/b"
    assert by_uid.loc["g2", "invoked_by"] == "lambda.amazonaws.com"
    assert by_uid.loc["g3", "source_kind"] == "missing"
    assert by_uid.loc["g3", "region"] is pd.NA
    assert by_uid.loc["g3", "user_agent"] is pd.NA
    assert by_uid.loc["g3", "account"] == ACCOUNT
    assert by_uid.loc["g3", "outcome"] == "success"
    assert by_uid.loc["g4", "resource"] == SECRET_ARN
    assert by_uid.loc["g5", "resource"] == SECRET_ARN
    assert by_uid.loc["g6", "resource"] == KEY_ARN
    assert by_uid.loc["g8", "outcome"] == "failure"
    assert by_uid.loc["g8", "failure_reason"] == "denied"
    assert str(by_uid.loc["g8", "time"]) == "2025-04-02 08:15:33+00:00"


def test_fast_path_all_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [
        make_event("DescribeInstances", source="ec2.amazonaws.com", eventID="s1"),
        make_event("AssumeRole", source="sts.amazonaws.com", eventID="s2"),
    ]
    data = orjson.dumps({"Records": records})
    result = FORMAT.read_fast(data, "skip.json")
    assert result is not None
    assert len(result.events) == 0
    assert result.skipped == Counter({"not_secret_activity": 2})
    fast, slow = read_both(data, monkeypatch)
    assert fast.summary() == slow.summary()


def test_fast_path_skipped_record_with_bad_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A skipped call is never turned into a row, so its unparseable time is not quarantined.
    records = [
        make_event("GetSecretValue", requestParameters={"secretId": "a"}, eventID="t1"),
        make_event("DescribeInstances", source="ec2.amazonaws.com", eventTime="soon"),
    ]
    data = orjson.dumps({"Records": records})
    assert FORMAT.read_fast(data, "t.json") is not None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.quarantined == []
    assert fast.skipped == Counter({"not_secret_activity": 1})


@pytest.mark.parametrize(
    "record",
    [
        make_event("GetSecretValue", eventID=17),
        make_event("GetSecretValue", sourceIPAddress=["1.2.3.4"]),
        {"digestStartTime": "2025-04-02T10:00:00Z", "logFiles": []},
        {
            "detail-type": "AWS API Call via CloudTrail",
            "detail": make_event("GetSecretValue", requestParameters={"secretId": "eb"}),
        },
    ],
    ids=["number_event_id", "list_address", "digest", "eventbridge"],
)
def test_fast_path_declines_record_path_shapes(
    record: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = orjson.dumps({"Records": [make_event("GetSecretValue", eventID="ok"), record]})
    assert FORMAT.read_fast(data, "odd.json") is None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)


def test_fast_path_many_events(monkeypatch: pytest.MonkeyPatch) -> None:
    # Enough events that distinct values repeat and batch reads spread rows across the frame.
    records = []
    for index in range(600):
        base = fixture_records() + gap_records()
        event = dict(base[index % len(base)])
        event["eventID"] = f"m{index}"
        event["sourceIPAddress"] = ("52.94.76.10", "10.0.0.7", "AWS Internal")[index % 3]
        records.append(event)
    data = gzip.compress(orjson.dumps({"Records": records}))
    assert FORMAT.read_fast(gzip.decompress(data), "many.json.gz") is not None
    fast, slow = read_both(data, monkeypatch)
    pd.testing.assert_frame_equal(fast.events, slow.events)
    assert fast.summary() == slow.summary()
    assert fast.events["origin"].iloc[-1] == "trail.json.gz Records[600]"


def test_fast_fields_follow_struct_order() -> None:
    # The fast path transposes each decoded struct by position into these named columns.
    assert _Fields._fields == _FastEvent.__struct_fields__


# --- fields of the wrong JSON type ------------------------------------------------------------

# (case, fields merged into a GetSecretValue event, expected quarantine detail). A field that
# decides who, the outcome, the time or the secret must not be coerced: a failed call read as a
# success, or a number read as an account, would be wrong data in every later step.
WRONG_TYPE_CASES = [
    (
        "identity string",
        {"userIdentity": "deploy-bot"},
        "cloudtrail: field userIdentity: expected an object, found string",
    ),
    (
        "identity arn number",
        {"userIdentity": USER | {"arn": 5}},
        "cloudtrail: field userIdentity.arn: expected a string, found number",
    ),
    (
        "issuer arn array",
        {"userIdentity": ROLE | {"sessionContext": {"sessionIssuer": {"arn": ["x"]}}}},
        "cloudtrail: field userIdentity.sessionContext.sessionIssuer.arn: "
        "expected a string, found array",
    ),
    (
        "account number",
        {"recipientAccountId": 1.5},
        "cloudtrail: field recipientAccountId: expected a string, found number",
    ),
    (
        "error code object",
        {"errorCode": {}},
        "cloudtrail: field errorCode: expected a string, found object",
    ),
    (
        "error message boolean",
        {"errorMessage": False},
        "cloudtrail: field errorMessage: expected a string, found boolean",
    ),
    (
        "caller address object",
        {"sourceIPAddress": {}},
        "cloudtrail: field sourceIPAddress: expected a string, found object",
    ),
    (
        "request array",
        {"requestParameters": []},
        "cloudtrail: field requestParameters: expected an object, found array",
    ),
    (
        "secret id object",
        {"requestParameters": {"secretId": {"name": "billing/stripe"}}},
        "cloudtrail: field requestParameters.secretId: expected a string, found object",
    ),
    (
        "event time number",
        {"eventTime": 1743588930},
        "cloudtrail: field eventTime: expected a string, found number",
    ),
    (
        "event id number",
        {"eventID": 17},
        "cloudtrail: field eventID: expected a string, found number",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "detail"), WRONG_TYPE_CASES, ids=[case[0] for case in WRONG_TYPE_CASES]
)
def test_wrong_type_quarantined_record_path(case: str, fields: dict[str, Any], detail: str) -> None:
    record = make_event("GetSecretValue", requestParameters={"secretId": SECRET_ARN}) | fields
    result = read_bytes(orjson.dumps(record) + b"\n", "trail.jsonl")
    assert result.records == 1
    assert len(result.events) == 0
    assert len(result.quarantined) == 1
    entry = result.quarantined[0]
    assert entry.origin == "trail.jsonl"
    assert entry.reason == "invalid_record"
    assert entry.detail == detail
    assert entry.raw == orjson.dumps(record).decode()


@pytest.mark.parametrize(
    ("case", "fields", "detail"), WRONG_TYPE_CASES, ids=[case[0] for case in WRONG_TYPE_CASES]
)
def test_wrong_type_quarantined_records_file(
    case: str, fields: dict[str, Any], detail: str
) -> None:
    good = make_event("GetSecretValue", eventID="good-1", requestParameters={"secretId": "a"})
    record = make_event("GetSecretValue", requestParameters={"secretId": SECRET_ARN}) | fields
    result = read_bytes(orjson.dumps({"Records": [good, record]}), "trail.json")
    assert result.records == 2
    assert result.events["event_uid"].tolist() == ["good-1"]
    assert [(q.origin, q.reason, q.detail) for q in result.quarantined] == [
        ("trail.json Records[2]", "invalid_record", detail)
    ]


@pytest.mark.parametrize(
    ("fields", "column"),
    [({"awsRegion": 5}, "region"), ({"userAgent": {"name": "cli"}}, "user_agent")],
    ids=["region number", "user agent object"],
)
def test_wrong_type_descriptive_field_null(fields: dict[str, Any], column: str) -> None:
    record = make_event("GetSecretValue", requestParameters={"secretId": SECRET_ARN}) | fields
    for data in (orjson.dumps(record) + b"\n", orjson.dumps({"Records": [record]})):
        result = read_bytes(data, "trail.json")
        assert result.quarantined == []
        assert len(result.events) == 1
        assert result.events[column].isna().tolist() == [True]


def test_wrong_type_kms_context() -> None:
    record = make_event(
        "Decrypt",
        source="kms.amazonaws.com",
        requestParameters={"encryptionContext": {"SecretARN": 12}},
    )
    with pytest.raises(RecordError) as raised:
        FORMAT.normalize(record, "memory")
    assert str(raised.value) == (
        "field requestParameters.encryptionContext.SecretARN: expected a string, found number"
    )


def test_wrong_type_ssm_names_item() -> None:
    record = make_event(
        "GetParameters", source="ssm.amazonaws.com", requestParameters={"names": ["/a", 7]}
    )
    with pytest.raises(RecordError) as raised:
        FORMAT.normalize(record, "memory")
    assert str(raised.value) == "field requestParameters.names[]: expected a string, found number"
