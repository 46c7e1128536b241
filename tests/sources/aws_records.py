"""CloudTrail records and trail object keys for the AWS source tests, written from the formats.

Records follow the CloudTrail record layout (eventVersion 1.09). Keys follow the trail layout
``AWSLogs/[<org-id>/]<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_
<YYYYMMDDTHHmmZ>_<16 characters>.json.gz``, where the time is the delivery time.
"""

from __future__ import annotations

import gzip
import json
from datetime import date, datetime
from typing import Any

__all__ = [
    "ACCOUNT",
    "ORG_ID",
    "OTHER_ACCOUNT",
    "REGION",
    "digest_document",
    "digest_key",
    "kms_decrypt",
    "parameter_read",
    "secret_read",
    "trail_file",
    "trail_key",
]

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
ORG_ID = "o-a1b2c3d4e5"
REGION = "eu-west-1"


def secret_read(
    number: int,
    *,
    time: str,
    account: str = ACCOUNT,
    region: str = REGION,
    user: str = "alice",
) -> dict[str, Any]:
    """Return a Secrets Manager GetSecretValue record with event id ending in ``number``."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "IAMUser",
            "principalId": "AIDAQEXAMPLE00000001",
            "arn": f"arn:aws:iam::{account}:user/{user}",
            "accountId": account,
            "accessKeyId": "AKIAQEXAMPLE00000001",
            "userName": user,
        },
        "eventTime": time,
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "GetSecretValue",
        "awsRegion": region,
        "sourceIPAddress": "198.51.100.7",
        "userAgent": "aws-sdk-go-v2/1.30.0",
        "requestParameters": {"secretId": f"prod/service-{number}"},
        "responseElements": None,
        "requestID": f"2f7c0000-0000-4000-9000-{number:012d}",
        "eventID": f"7d3e0000-0000-4000-8000-{number:012d}",
        "readOnly": True,
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": account,
        "eventCategory": "Management",
    }


def parameter_read(number: int, *, time: str, region: str = REGION) -> dict[str, Any]:
    """Return a Parameter Store GetParameter record (with decryption) by an assumed role."""
    record = secret_read(number, time=time, region=region)
    record["userIdentity"] = {
        "type": "AssumedRole",
        "principalId": "AROAQEXAMPLE00000002:deploy",
        "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/deployer/deploy",
        "accountId": ACCOUNT,
        "sessionContext": {
            "sessionIssuer": {
                "type": "Role",
                "principalId": "AROAQEXAMPLE00000002",
                "arn": f"arn:aws:iam::{ACCOUNT}:role/deployer",
                "accountId": ACCOUNT,
                "userName": "deployer",
            }
        },
    }
    record["eventSource"] = "ssm.amazonaws.com"
    record["eventName"] = "GetParameter"
    record["requestParameters"] = {"name": f"/prod/param-{number}", "withDecryption": True}
    return record


def kms_decrypt(number: int, *, time: str, region: str = REGION) -> dict[str, Any]:
    """Return a KMS Decrypt record that Secrets Manager made for a secret (encryption context)."""
    record = secret_read(number, time=time, region=region)
    record["eventSource"] = "kms.amazonaws.com"
    record["eventName"] = "Decrypt"
    record["sourceIPAddress"] = "secretsmanager.amazonaws.com"
    record["requestParameters"] = {
        "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "encryptionContext": {
            "SecretARN": f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:prod/kms-{number}-AbCdEf",
            "SecretVersionId": "a1b2c3d4-0000-4000-8000-000000000001",
        },
    }
    return record


def trail_file(*records: dict[str, Any]) -> bytes:
    """Return a gzip'd ``{"Records": [...]}`` log file."""
    return gzip.compress(json.dumps({"Records": list(records)}).encode())


def trail_key(
    delivered: datetime,
    unique: str,
    *,
    account: str = ACCOUNT,
    region: str = REGION,
    prefix: str = "",
    org_id: str | None = None,
) -> str:
    """Return the object key a trail gives a log file delivered at ``delivered``."""
    root = f"{prefix}/AWSLogs/" if prefix else "AWSLogs/"
    if org_id:
        root += f"{org_id}/"
    name = f"{account}_CloudTrail_{region}_{delivered:%Y%m%dT%H%MZ}_{unique:0>16}.json.gz"
    return f"{root}{account}/CloudTrail/{region}/{delivered:%Y/%m/%d}/{name}"


def digest_key(delivered: datetime, *, account: str = ACCOUNT, region: str = REGION) -> str:
    """Return the key of a digest file as if it had been copied into the log partition."""
    name = (
        f"{account}_CloudTrail-Digest_{region}_management-trail_{region}_"
        f"{delivered:%Y%m%dT%H%M%SZ}.json.gz"
    )
    return f"AWSLogs/{account}/CloudTrail/{region}/{delivered:%Y/%m/%d}/{name}"


def digest_document(day: date, *, account: str = ACCOUNT) -> bytes:
    """Return a gzip'd digest file: one object naming the log files of an hour."""
    document: dict[str, Any] = {
        "awsAccountId": account,
        "digestStartTime": f"{day.isoformat()}T10:00:00Z",
        "digestEndTime": f"{day.isoformat()}T11:00:00Z",
        "digestS3Bucket": "trail-bucket",
        "digestS3Object": f"AWSLogs/{account}/CloudTrail-Digest/{REGION}/digest.json.gz",
        "digestPublicKeyFingerprint": "0123456789abcdef0123456789abcdef",
        "digestSignatureAlgorithm": "SHA256withRSA",
        "newestEventTime": f"{day.isoformat()}T10:59:00Z",
        "oldestEventTime": f"{day.isoformat()}T10:00:00Z",
        "previousDigestS3Bucket": None,
        "previousDigestS3Object": None,
        "previousDigestHashValue": None,
        "previousDigestHashAlgorithm": None,
        "previousDigestSignature": None,
        "logFiles": [],
    }
    return gzip.compress(json.dumps(document).encode())
