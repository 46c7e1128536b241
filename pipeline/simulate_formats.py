"""Render simulated calls as AWS CloudTrail, GCP Cloud Audit Logs and Azure Key Vault records.

Each writer lays the files out as the provider delivers them: CloudTrail's gzip'd
``{"Records": [...]}`` objects under ``AWSLogs/``, a Cloud Logging sink's hourly JSON Lines
files, and Azure diagnostic settings' hourly ``PT1H.json`` blobs. Output is byte-for-byte
reproducible for one seed: JSON keys keep insertion order and gzip headers carry no time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np

from pipeline.simulate_population import (
    AWS_ACCOUNTS,
    AZURE_TENANT,
    AZURE_VAULTS,
    GCP_PROJECTS,
    Access,
    Principal,
)

__all__ = ["AwsWriter", "AzureWriter", "GcpWriter", "dumps", "iso_time"]

_TRAIL_NAME: Final = "org-trail"
_ALNUM: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def dumps(value: Any) -> str:
    """Serialize compactly, keeping key order and non-ASCII text as written."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def iso_time(time_us: int, digits: int = 0, extra: str = "") -> str:
    """Format epoch microseconds as ISO 8601 UTC with ``digits`` fractional digits and ``Z``."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=time_us)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        fraction = (f"{moment.microsecond:06d}" + extra + "000")[:digits]
        text += "." + fraction
    return text + "Z"


def _uuid(rng: np.random.Generator) -> str:
    text = "".join(f"{int(v):x}" for v in rng.integers(0, 16, size=32))
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{'89ab'[int(rng.integers(0, 4))]}{text[17:20]}-{text[20:]}"


def _random_text(rng: np.random.Generator, length: int) -> str:
    return "".join(_ALNUM[int(v)] for v in rng.integers(0, len(_ALNUM), size=length))


def _gzip(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def _hour_key(time_us: int) -> datetime:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=time_us)
    return moment.replace(minute=0, second=0, microsecond=0)


# ---------------------------------------------------------------------------------------------
# AWS CloudTrail


class AwsWriter:
    """Render calls as CloudTrail records and write S3-style log, digest and Insight files."""

    def __init__(self, rng: np.random.Generator, out: Path) -> None:
        self._rng = rng
        self._root = out / "aws" / "AWSLogs"
        # (account, region, hour) -> records
        self._files: dict[tuple[str, str, datetime], list[dict[str, Any]]] = defaultdict(list)
        self.records = 0

    def add(self, access: Access) -> None:
        """Render one call (and the KMS Decrypt that Secrets Manager makes for a read)."""
        principal = access.principal
        account = AWS_ACCOUNTS[principal.scope]
        key = (account, principal.region, _hour_key(access.time_us))
        record = self._api_call(access, account)
        self._files[key].append(record)
        if access.outcome == "success" and access.operation in ("read", "batch_read"):
            for offset, secret in enumerate(access.secrets):
                self._files[key].append(self._kms_decrypt(access, account, secret, offset))

    def _identity(self, principal: Principal, account: str, time_us: int) -> dict[str, Any]:
        if principal.aws_identity == "IAMUser":
            return {
                "type": "IAMUser",
                "principalId": principal.aws_principal_id,
                "arn": f"arn:aws:iam::{account}:user/{principal.aws_name}",
                "accountId": account,
                "accessKeyId": principal.aws_access_key,
                "userName": principal.aws_name,
            }
        role_path = "aws-reserved/sso.amazonaws.com/" if principal.aws_identity == "SSO" else ""
        created = iso_time(time_us - 1_800_000_000 - (time_us % 900_000_000))
        return {
            "type": "AssumedRole",
            "principalId": f"{principal.aws_principal_id}:{principal.aws_session}",
            "arn": f"arn:aws:sts::{account}:assumed-role/{principal.aws_name}/{principal.aws_session}",
            "accountId": account,
            "accessKeyId": principal.aws_access_key,
            "sessionContext": {
                "sessionIssuer": {
                    "type": "Role",
                    "principalId": principal.aws_principal_id,
                    "arn": f"arn:aws:iam::{account}:role/{role_path}{principal.aws_name}",
                    "accountId": account,
                    "userName": principal.aws_name,
                },
                "webIdFederationData": {},
                "attributes": {"creationDate": created, "mfaAuthenticated": "false"},
            },
        }

    def _secret_arn(self, access: Access, account: str, secret: str) -> str:
        suffix = hashlib.sha256(secret.encode()).hexdigest()[:6]
        return (
            f"arn:aws:secretsmanager:{access.principal.region}:{account}:secret:{secret}-{suffix}"
        )

    def _api_call(self, access: Access, account: str) -> dict[str, Any]:
        principal = access.principal
        source, event_name, request = _AWS_OPERATIONS[access.operation](access)
        record: dict[str, Any] = {
            "eventVersion": "1.09" if self._rng.random() < 0.5 else "1.08",
            "userIdentity": self._identity(principal, account, access.time_us),
            "eventTime": iso_time(access.time_us),
            "eventSource": source,
            "eventName": event_name,
            "awsRegion": principal.region,
            "sourceIPAddress": access.ip,
            "userAgent": principal.user_agent,
        }
        if access.outcome == "denied":
            arn = self._secret_arn(access, account, access.secrets[0]) if access.secrets else "*"
            actor = record["userIdentity"]["arn"]
            action = f"{source.split('.')[0]}:{event_name}"
            record["errorCode"] = "AccessDeniedException"
            record["errorMessage"] = (
                f"User: {actor} is not authorized to perform: {action} on resource: {arn} "
                f"because no identity-based policy allows the {action} action"
            )
        elif access.outcome == "not_found":
            record["errorCode"] = "ResourceNotFoundException"
            record["errorMessage"] = "Secrets Manager can't find the specified secret."
        record["requestParameters"] = request
        record["responseElements"] = None
        record["requestID"] = _uuid(self._rng)
        record["eventID"] = _uuid(self._rng)
        record["readOnly"] = access.operation not in ("write",)
        record["eventType"] = "AwsApiCall"
        record["managementEvent"] = True
        record["recipientAccountId"] = account
        record["eventCategory"] = "Management"
        record["tlsDetails"] = {
            "tlsVersion": "TLSv1.3",
            "cipherSuite": "TLS_AES_128_GCM_SHA256",
            "clientProvidedHostHeader": f"{source.split('.')[0]}.{principal.region}.amazonaws.com",
        }
        return record

    def _kms_decrypt(
        self, access: Access, account: str, secret: str, offset: int
    ) -> dict[str, Any]:
        principal = access.principal
        region = principal.region
        key_id = f"arn:aws:kms:{region}:{account}:key/{_KMS_KEYS[account]}"
        identity = self._identity(principal, account, access.time_us)
        identity["invokedBy"] = "secretsmanager.amazonaws.com"
        return {
            "eventVersion": "1.09",
            "userIdentity": identity,
            "eventTime": iso_time(access.time_us + offset * 1000),
            "eventSource": "kms.amazonaws.com",
            "eventName": "Decrypt",
            "awsRegion": region,
            "sourceIPAddress": "secretsmanager.amazonaws.com",
            "userAgent": "secretsmanager.amazonaws.com",
            "requestParameters": {
                "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "encryptionContext": {
                    "SecretARN": self._secret_arn(access, account, secret),
                    "SecretVersionId": _uuid(self._rng),
                },
            },
            "responseElements": None,
            "requestID": _uuid(self._rng),
            "eventID": _uuid(self._rng),
            "readOnly": True,
            "resources": [{"accountId": account, "type": "AWS::KMS::Key", "ARN": key_id}],
            "eventType": "AwsApiCall",
            "managementEvent": True,
            "recipientAccountId": account,
            "eventCategory": "Management",
        }

    def write(self) -> list[Path]:
        """Write every log file plus the digest and Insight examples; return the paths."""
        written: list[Path] = []
        first_prod_files: list[tuple[str, str, datetime, str]] = []
        for (account, region, hour), records in sorted(self._files.items(), key=lambda kv: kv[0]):
            records.sort(key=lambda r: r["eventTime"])
            delivered = hour + timedelta(hours=1, minutes=int(self._rng.integers(2, 12)))
            name = (
                f"{account}_CloudTrail_{region}_{delivered:%Y%m%dT%H%MZ}_"
                f"{_random_text(self._rng, 16)}.json.gz"
            )
            folder = self._root / account / "CloudTrail" / region / f"{delivered:%Y/%m/%d}"
            text = dumps({"Records": records})
            written.append(_write(folder / name, _gzip(text)))
            self.records += len(records)
            if (
                account == AWS_ACCOUNTS["prod"]
                and region == "us-east-1"
                and len(first_prod_files) < 2
            ):
                first_prod_files.append((account, region, delivered, text))
        for index, (account, region, delivered, text) in enumerate(first_prod_files):
            written.append(self._write_digest(account, region, delivered, text, written, index))
        if self._files:
            written.append(self._write_insight())
        return written

    def _write_digest(
        self,
        account: str,
        region: str,
        delivered: datetime,
        text: str,
        written: list[Path],
        index: int,
    ) -> Path:
        end = delivered + timedelta(minutes=30)
        start = end - timedelta(hours=1)
        folder_key = f"AWSLogs/{account}/CloudTrail-Digest/{region}/{end:%Y/%m/%d}/"
        name = f"{account}_CloudTrail-Digest_{region}_{_TRAIL_NAME}_{region}_{end:%Y%m%dT%H%M%SZ}.json.gz"
        log_key = f"AWSLogs/{written[index].relative_to(self._root).as_posix()}"
        records = json.loads(text)["Records"]
        previous_end = start
        digest: dict[str, Any] = {
            "awsAccountId": account,
            "digestStartTime": iso_time(int(start.timestamp() * 1_000_000)),
            "digestEndTime": iso_time(int(end.timestamp() * 1_000_000)),
            "digestS3Bucket": "keytrail-demo-cloudtrail",
            "digestS3Object": folder_key + name,
            "digestPublicKeyFingerprint": _random_text(self._rng, 32).lower(),
            "digestSignatureAlgorithm": "SHA256withRSA",
            "newestEventTime": records[-1]["eventTime"],
            "oldestEventTime": records[0]["eventTime"],
            "previousDigestS3Bucket": "keytrail-demo-cloudtrail" if index else None,
            "previousDigestS3Object": (
                f"{folder_key}{account}_CloudTrail-Digest_{region}_{_TRAIL_NAME}_{region}_"
                f"{previous_end:%Y%m%dT%H%M%SZ}.json.gz"
                if index
                else None
            ),
            "previousDigestHashValue": hashlib.sha256(str(index).encode()).hexdigest()
            if index
            else None,
            "previousDigestHashAlgorithm": "SHA-256" if index else None,
            "previousDigestSignature": _random_text(self._rng, 512).lower() if index else None,
            "logFiles": [
                {
                    "s3Bucket": "keytrail-demo-cloudtrail",
                    "s3Object": log_key,
                    # CloudTrail hashes the uncompressed log file content.
                    "hashValue": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                    "hashAlgorithm": "SHA-256",
                    "newestEventTime": records[-1]["eventTime"],
                    "oldestEventTime": records[0]["eventTime"],
                }
            ],
        }
        path = self._root.parent / folder_key / name
        return _write(path, _gzip(dumps(digest)))

    def _write_insight(self) -> Path:
        account = AWS_ACCOUNTS["prod"]
        region = "us-east-1"
        first_hour = min(hour for _, _, hour in self._files)
        start = first_hour + timedelta(days=min(4, len({h.date() for _, _, h in self._files}) - 1))
        start = start.replace(hour=14, minute=10)
        shared = _uuid(self._rng)
        records = []
        for state, minutes in (("Start", 0), ("End", 20)):
            statistics: dict[str, Any] = {
                "baseline": {"average": 0.0416666667},
                "insight": {"average": 4.2},
            }
            if state == "End":
                statistics["insightDuration"] = 20
            records.append(
                {
                    "eventVersion": "1.08",
                    "eventTime": iso_time(
                        int((start + timedelta(minutes=minutes)).timestamp() * 1e6)
                    ),
                    "awsRegion": region,
                    "eventID": _uuid(self._rng),
                    "eventType": "AwsCloudTrailInsight",
                    "recipientAccountId": account,
                    "sharedEventID": shared,
                    "insightDetails": {
                        "state": state,
                        "eventSource": "secretsmanager.amazonaws.com",
                        "eventName": "GetSecretValue",
                        "insightType": "ApiCallRateInsight",
                        "insightContext": {"statistics": statistics},
                    },
                    "eventCategory": "Insight",
                }
            )
        delivered = start + timedelta(minutes=35)
        name = (
            f"{account}_CloudTrail-Insight_{region}_{delivered:%Y%m%dT%H%MZ}_"
            f"{_random_text(self._rng, 16)}.json.gz"
        )
        folder = self._root / account / "CloudTrail-Insight" / region / f"{delivered:%Y/%m/%d}"
        return _write(folder / name, _gzip(dumps({"Records": records})))


_KMS_KEYS: Final = {
    AWS_ACCOUNTS["prod"]: "7c1e2f4a-93b5-4d68-a0e1-5b3c9d2f8e47",
    AWS_ACCOUNTS["data"]: "e2a9c4d1-6f37-4b80-9c15-3d7e0a8b2f64",
}


def _aws_read(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return "secretsmanager.amazonaws.com", "GetSecretValue", {"secretId": access.secrets[0]}


def _aws_batch(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return (
        "secretsmanager.amazonaws.com",
        "BatchGetSecretValue",
        {"secretIdList": list(access.secrets)},
    )


def _aws_list(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return "secretsmanager.amazonaws.com", "ListSecrets", {"maxResults": 100}


def _aws_describe(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return "secretsmanager.amazonaws.com", "DescribeSecret", {"secretId": access.secrets[0]}


def _aws_write(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return (
        "secretsmanager.amazonaws.com",
        "PutSecretValue",
        {"secretId": access.secrets[0], "clientRequestToken": "rotation-" + access.secrets[0][-8:]},
    )


def _aws_param(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return (
        "ssm.amazonaws.com",
        "GetParameter",
        {"name": "/" + access.secrets[0], "withDecryption": True},
    )


def _aws_params(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    names = ["/" + secret for secret in access.secrets]
    return "ssm.amazonaws.com", "GetParameters", {"names": names, "withDecryption": True}


def _aws_whoami(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return "sts.amazonaws.com", "GetCallerIdentity", None


def _aws_instances(access: Access) -> tuple[str, str, dict[str, Any] | None]:
    return (
        "ec2.amazonaws.com",
        "DescribeInstances",
        {"instancesSet": {}, "filterSet": {"items": [{"name": "tag:Name", "valueSet": {}}]}},
    )


_AWS_OPERATIONS: Final = {
    "read": _aws_read,
    "batch_read": _aws_batch,
    "list": _aws_list,
    "describe": _aws_describe,
    "write": _aws_write,
    "param_read": _aws_param,
    "params_read": _aws_params,
    "whoami": _aws_whoami,
    "describe_instances": _aws_instances,
}


# ---------------------------------------------------------------------------------------------
# GCP Cloud Audit Logs


_GCP_METHODS: Final = {
    # operation -> (method, permission, resource level)
    "read": ("AccessSecretVersion", "secretmanager.versions.access", "version"),
    "list": ("ListSecrets", "secretmanager.secrets.list", "project"),
    "describe": ("GetSecret", "secretmanager.secrets.get", "secret"),
}


class GcpWriter:
    """Render calls as Cloud Audit Logs LogEntry records and write sink-export files."""

    def __init__(self, rng: np.random.Generator, out: Path) -> None:
        self._rng = rng
        self._root = out / "gcp"
        self._hours: dict[datetime, list[tuple[int, str, dict[str, Any]]]] = defaultdict(list)
        self.records = 0
        self.broken: list[str] = []

    def add(self, access: Access) -> None:
        """Render one call into the hourly file it belongs to."""
        nanos = f"{int(self._rng.integers(0, 1000)):03d}"
        entry = self._entry(access, nanos)
        self._hours[_hour_key(access.time_us)].append((access.time_us, nanos, entry))

    def _entry(self, access: Access, nanos: str) -> dict[str, Any]:
        principal = access.principal
        project = principal.scope
        number = GCP_PROJECTS[project]
        method, permission, level = _GCP_METHODS[access.operation]
        secret = access.secrets[0] if access.secrets else ""
        version = str(1 + int(hashlib.sha256(secret.encode()).digest()[0]) % 6)
        if level == "version":
            resource = f"projects/{number}/secrets/{secret}/versions/{version}"
            request_type = "AccessSecretVersionRequest"
        elif level == "secret":
            resource = f"projects/{number}/secrets/{secret}"
            request_type = "GetSecretRequest"
        else:
            resource = f"projects/{number}"
            request_type = "ListSecretsRequest"
        full_method = f"google.cloud.secretmanager.v1.SecretManagerService.{method}"
        granted = access.outcome != "denied"
        status: dict[str, Any] = {}
        if access.outcome == "denied":
            status = {
                "code": 7,
                "message": f"Permission '{permission}' denied for resource '{resource}' "
                "(or it may not exist).",
            }
        elif access.outcome == "not_found":
            status = {
                "code": 5,
                "message": f"Secret Version [{resource}] not found or has no versions.",
            }
        time_text = iso_time(access.time_us, 9, nanos)
        receive_us = access.time_us + int(self._rng.integers(80_000, 900_000))
        receive_text = iso_time(receive_us, 9, f"{int(self._rng.integers(0, 1000)):03d}")
        request_metadata: dict[str, Any] = {
            "callerIp": access.ip,
            "callerSuppliedUserAgent": principal.user_agent,
            "requestAttributes": {"time": time_text, "auth": {}},
            "destinationAttributes": {},
        }
        proto: dict[str, Any] = {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "status": status,
            "authenticationInfo": {"principalEmail": principal.key},
            "requestMetadata": request_metadata,
            "serviceName": "secretmanager.googleapis.com",
            "methodName": full_method,
            "authorizationInfo": [
                {
                    "resource": resource,
                    "permission": permission,
                    "granted": granted,
                    "resourceAttributes": {
                        "service": "secretmanager.googleapis.com",
                        "name": resource,
                        "type": "secretmanager.googleapis.com/"
                        + {"version": "SecretVersion", "secret": "Secret", "project": "Project"}[
                            level
                        ],
                    },
                    "permissionType": "DATA_READ" if level == "version" else "ADMIN_READ",
                }
            ],
            "resourceName": resource,
            "request": {
                "@type": f"type.googleapis.com/google.cloud.secretmanager.v1.{request_type}",
                ("parent" if level == "project" else "name"): resource,
            },
            "resourceLocation": {"currentLocations": ["global"]},
        }
        return {
            "protoPayload": proto,
            "insertId": _random_text(self._rng, 12).lower(),
            "resource": {
                "type": "audited_resource",
                "labels": {
                    "project_id": project,
                    "service": "secretmanager.googleapis.com",
                    "method": full_method,
                },
            },
            "timestamp": time_text,
            "severity": "ERROR" if status else "INFO",
            "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2Fdata_access",
            "receiveTimestamp": receive_text,
        }

    def write(self, broken_day: date | None, export_day: date | None) -> list[Path]:
        """Write hourly sink files and one ``gcloud logging read`` export; return the paths.

        The first file of ``broken_day`` with at least four entries gets two invalid JSON lines
        (lines 3 and 6), recorded in :attr:`broken`. ``export_day`` selects the day of project
        kt-prod-3817 copied into the gcloud export file.
        """
        written: list[Path] = []
        broken_hour = min(
            (
                hour
                for hour, items in self._hours.items()
                if hour.date() == broken_day and len(items) >= 4
            ),
            default=None,
        )
        folder = self._root / "cloudaudit.googleapis.com" / "data_access"
        exported: list[dict[str, Any]] = []
        for hour, items in sorted(self._hours.items(), key=lambda kv: kv[0]):
            items.sort(key=lambda item: (item[0], item[1]))
            lines = [dumps(entry) for _, _, entry in items]
            self.records += len(lines)
            name = f"{hour:%H}:00:00_{hour:%H}:59:59_S0.json"
            if hour == broken_hour:
                lines.insert(4, lines[3][: len(lines[3]) // 2])
                lines.insert(2, lines[1].replace('"protoPayload":{', '"protoPayload":{{', 1))
                relative = f"gcp/cloudaudit.googleapis.com/data_access/{hour:%Y/%m/%d}/{name}"
                self.broken.append(f"{relative} line 3: invalid JSON (doubled brace)")
                self.broken.append(f"{relative} line 6: invalid JSON (record cut in half)")
            written.append(
                _write(folder / f"{hour:%Y/%m/%d}" / name, ("\n".join(lines) + "\n").encode())
            )
            if export_day is not None and hour.date() == export_day:
                exported.extend(
                    entry
                    for _, _, entry in items
                    if entry["logName"].startswith("projects/kt-prod-3817/")
                )
        if exported:
            # gcloud prints newest entries first, as a pretty-printed JSON array.
            exported.reverse()
            text = json.dumps(exported, indent=2, ensure_ascii=False) + "\n"
            name = f"secret-access-kt-prod-3817-{export_day:%Y-%m-%d}.json"
            written.append(_write(self._root / "gcloud-export" / name, text.encode()))
        return written


# ---------------------------------------------------------------------------------------------
# Azure Key Vault


_AZURE_OPERATIONS: Final = {
    # operation -> (operationName, HTTP method, object kind)
    "read": ("SecretGet", "GET", "secrets"),
    "list": ("SecretList", "GET", "secrets"),
    "write": ("SecretSet", "PUT", "secrets"),
    "decrypt": ("KeyDecrypt", "POST", "keys"),
    "describe": ("SecretListVersions", "GET", "secrets"),
}
_AZURE_RESULTS: Final = {
    "success": (200, "OK", ""),
    "denied": (
        403,
        "Forbidden",
        "Caller is not authorized to perform action on resource. If role assignments, deny "
        "assignments or role definitions were changed recently, please observe propagation time.",
    ),
    "not_found": (404, "NotFound", "Secret not found"),
    "unauthorized": (401, "Unauthorized", "Unauthorized"),
}
_CLAIM_URI: Final = {
    "oid": "http://schemas.microsoft.com/identity/claims/objectidentifier",
    "upn": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn",
    "tid": "http://schemas.microsoft.com/identity/claims/tenantid",
}


class AzureWriter:
    """Render calls as Key Vault AuditEvent records and write ``PT1H.json`` blobs."""

    LEGACY_VAULT: Final = "KV-LEGACY-REPORTS"

    def __init__(self, rng: np.random.Generator, out: Path) -> None:
        self._rng = rng
        self._root = out / "azure"
        self._blobs: dict[tuple[str, datetime], list[tuple[int, dict[str, Any]]]] = defaultdict(
            list
        )
        self.records = 0
        self.broken: list[str] = []
        self.incomplete: list[str] = []

    def add(self, access: Access) -> None:
        """Render one call into the hourly blob of its vault."""
        record = self._record(access)
        key = (access.principal.scope, _hour_key(access.time_us))
        self._blobs[key].append((access.time_us, record))

    def _claims(self, principal: Principal) -> dict[str, Any]:
        if principal.kind == "person":
            claims = {
                "oid": principal.azure_oid,
                "upn": principal.key,
                "appid": principal.azure_appid,
                "tid": AZURE_TENANT,
                "idtyp": "user",
            }
            if principal.azure_claim_style == "uri":
                claims = {_CLAIM_URI.get(name, name): value for name, value in claims.items()}
            return claims
        claims = {
            "oid": principal.azure_oid,
            "appid": principal.azure_appid,
            "tid": AZURE_TENANT,
            "idtyp": "app",
        }
        if principal.azure_mirid:
            claims["xms_mirid"] = principal.azure_mirid
            claims["xms_az_rid"] = principal.azure_mirid
        return claims

    def _record(self, access: Access) -> dict[str, Any]:
        principal = access.principal
        vault = AZURE_VAULTS[principal.scope]
        operation_name, _method, kind = _AZURE_OPERATIONS[access.operation]
        status, signature, description = _AZURE_RESULTS[access.outcome]
        secret = access.secrets[0] if access.secrets else ""
        version = hashlib.sha256((vault.name + secret).encode()).hexdigest()[:32]
        if access.operation == "list":
            object_id = f"https://{vault.host}/{kind}"
            uri = f"https://{vault.host}/{kind}?api-version=7.5"
        elif access.operation in ("read", "decrypt") and access.outcome == "success":
            object_id = f"https://{vault.host}/{kind}/{secret}/{version}"
            uri = f"https://{vault.host}/{kind}/{secret}/?api-version=7.5"
        else:
            object_id = f"https://{vault.host}/{kind}/{secret}"
            uri = f"https://{vault.host}/{kind}/{secret}/?api-version=7.5"
        properties: dict[str, Any] = {
            "id": object_id,
            "clientInfo": principal.user_agent,
            "httpStatusCode": status,
            "requestUri": uri,
            "isAccessPolicyMatch": access.outcome == "success",
            "isRbacAuthorized": False,
            "tlsVersion": "TLS1.2",
        }
        return {
            "time": iso_time(access.time_us, 7, f"{int(self._rng.integers(0, 10))}"),
            "category": "AuditEvent",
            "operationName": operation_name,
            # Key Vault writes "Success" whenever the service returned a response, even 401/403/404.
            "resultType": "Success",
            "correlationId": _uuid(self._rng),
            "callerIpAddress": access.ip,
            "identity": {}
            if access.outcome == "unauthorized"
            else {"claim": self._claims(principal)},
            "properties": properties,
            "resourceId": vault.resource_id,
            "operationVersion": "7.5",
            "resultSignature": signature,
            "resultDescription": description,
            "durationMs": str(int(self._rng.integers(3, 90))),
            "location": vault.location,
        }

    def write(self, bad_time_day: date | None) -> list[Path]:
        """Write the blobs; return the paths.

        In the first KV-PAYMENTS-PROD blob of ``bad_time_day`` with two or more records, the
        second record gets a time that is not a timestamp (recorded in :attr:`broken`). The
        newest blob of the period ends with a half-written record, as a blob still being
        appended does, and the legacy vault is written in the older ``{"records": [...]}`` layout.
        """
        written: list[Path] = []
        keys = sorted(self._blobs)
        bad_time_key = min(
            (
                key
                for key in keys
                if key[0] == "KV-PAYMENTS-PROD"
                and key[1].date() == bad_time_day
                and len(self._blobs[key]) >= 2
            ),
            default=None,
        )
        last_key = (
            max(keys, key=lambda key: (key[1], key[0] == "KV-PLATFORM-SHARED")) if keys else None
        )
        for key in keys:
            vault_name, hour = key
            items = sorted(self._blobs[key], key=lambda item: item[0])
            records = [record for _, record in items]
            self.records += len(records)
            vault = AZURE_VAULTS[vault_name]
            partition = f"y={hour:%Y}/m={hour:%m}/d={hour:%d}/h={hour:%H}/m=00/PT1H.json"
            relative = f"azure/resourceId={vault.resource_id}/{partition}"
            if key == bad_time_key:
                records[1]["time"] = f"{hour:%Y-%m-%d}T{hour:%H}:61:75.0000000Z"
                self.broken.append(f"{relative} line 2: invalid time {records[1]['time']}")
            if vault_name == self.LEGACY_VAULT:
                path = self._root / "insights-logs-auditevent" / ("resourceId=" + vault.resource_id)
                written.append(
                    _write(path / partition, (dumps({"records": records}) + "\n").encode())
                )
                continue
            lines = [dumps(record) for record in records]
            text = "\n".join(lines) + "\n"
            if key == last_key:
                text = "\n".join([*lines[:-1], lines[-1][: len(lines[-1]) // 2]])
                self.incomplete.append(f"{relative} line {len(lines)}: incomplete last line")
            path = self._root / ("resourceId=" + vault.resource_id) / partition
            written.append(_write(path, text.encode()))
        return written


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def iter_sizes(paths: Iterable[Path]) -> int:
    """Return the total size in bytes of ``paths``."""
    return sum(path.stat().st_size for path in paths)
