"""Measure CloudTrail ingest: gzip'd ``Records`` files to the events frame.

Generates realistic CloudTrail files once (reused when present), then runs each measurement in
its own Python process, pinned to one CPU, so that its peak resident memory (``VmHWM``) and
CPU time are its own:

* ``keytrail``: :func:`pipeline.formats.read_paths` on every file.
* ``baseline``: ``json.load`` plus ``pandas.json_normalize`` per file, on the first
  ``--baseline-files`` files; its rate is per record, so it is comparable with the full run.

Run from the repository root::

    .venv/bin/python benchmarks/ingest.py --records 1000000 --files 200
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
ACCOUNT = "111122223333"
REGIONS = ("us-east-1", "us-east-1", "us-west-2", "eu-west-1")
SECRETS = [f"prod/app-{n:03d}/db" for n in range(300)]
PARAMETERS = [f"/prod/service-{n:03d}/api-key" for n in range(300)]
# Callers come from a limited set of hosts and NAT gateways: public and private addresses.
_ADDRESS_RNG = random.Random(7)
ADDRESSES = [
    f"{_ADDRESS_RNG.choice((203, 198, 10, 52))}.{_ADDRESS_RNG.randrange(256)}."
    f"{_ADDRESS_RNG.randrange(256)}.{_ADDRESS_RNG.randrange(1, 255)}"
    for _ in range(5_000)
]
USER_AGENTS = (
    "aws-cli/2.15.30 Python/3.11.8 Linux/6.1.0 exe/x86_64.ubuntu.22 prompt/off",
    "Boto3/1.34.69 md/Botocore#1.34.69 ua/2.0 os/linux#6.1.0 lang/python#3.12.2",
    "aws-sdk-go-v2/1.26.0 os/linux lang/go#1.22.1 md/GOOS#linux api/secretsmanager#1.28.0",
    "secretsmanager.amazonaws.com",
)


def _secret_arn(name: str, region: str) -> str:
    return f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{name}-AbCdEf"


def _identities(rng: random.Random) -> list[dict[str, Any]]:
    """A fixed population of callers: IAM users, workload roles, SSO people, a service."""
    identities: list[dict[str, Any]] = []
    for n in range(40):
        identities.append(
            {
                "type": "IAMUser",
                "principalId": f"AIDA{n:016d}",
                "arn": f"arn:aws:iam::{ACCOUNT}:user/user{n:02d}",
                "accountId": ACCOUNT,
                "accessKeyId": f"AKIA{n:016d}",
                "userName": f"user{n:02d}",
            }
        )
    for n in range(60):
        role = f"app-{n:02d}-task-role"
        session = f"i-{rng.getrandbits(48):012x}" if n % 2 else f"session-{n}"
        identities.append(_assumed_role(role, session, f"AROA{n:016d}", path="/"))
    for n in range(40):
        role = "AWSReservedSSO_Developer_0123456789abcdef"
        path = "/aws-reserved/sso.amazonaws.com/"
        identities.append(
            _assumed_role(role, f"person{n:02d}@example.com", "AROASSO0000000001", path)
        )
    return identities


def _assumed_role(role: str, session: str, role_id: str, path: str) -> dict[str, Any]:
    return {
        "type": "AssumedRole",
        "principalId": f"{role_id}:{session}",
        "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{session}",
        "accountId": ACCOUNT,
        "accessKeyId": f"ASIA{abs(hash(session)) % 10**16:016d}",
        "sessionContext": {
            "sessionIssuer": {
                "type": "Role",
                "principalId": role_id,
                "arn": f"arn:aws:iam::{ACCOUNT}:role{path}{role}",
                "accountId": ACCOUNT,
                "userName": role,
            },
            "attributes": {"creationDate": "2025-03-01T08:00:00Z", "mfaAuthenticated": "false"},
        },
    }


def _event(rng: random.Random, identities: list[dict[str, Any]], when: datetime) -> dict[str, Any]:
    region = rng.choice(REGIONS)
    identity = rng.choice(identities)
    event: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": identity,
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "awsRegion": region,
        "sourceIPAddress": rng.choice(ADDRESSES),
        "userAgent": rng.choice(USER_AGENTS[:3]),
        "requestParameters": None,
        "responseElements": None,
        "requestID": str(uuid.UUID(int=rng.getrandbits(128))),
        "eventID": str(uuid.UUID(int=rng.getrandbits(128))),
        "readOnly": True,
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
    }
    roll = rng.random()
    if roll < 0.45:
        event.update(eventSource="secretsmanager.amazonaws.com", eventName="GetSecretValue")
        request: dict[str, Any] = {"secretId": _secret_arn(rng.choice(SECRETS), region)}
        if rng.random() < 0.2:
            request["versionStage"] = "AWSPREVIOUS"
        event["requestParameters"] = request
        error = rng.random()
        if error < 0.03:
            event["errorCode"] = "AccessDeniedException"
            event["errorMessage"] = (
                "User is not authorized to perform: secretsmanager:GetSecretValue"
            )
        elif error < 0.04:
            event["errorCode"] = "ResourceNotFoundException"
            event["errorMessage"] = "Secrets Manager can't find the specified secret."
    elif roll < 0.50:
        event.update(eventSource="secretsmanager.amazonaws.com", eventName="BatchGetSecretValue")
        names = rng.sample(SECRETS, rng.randint(2, 5))
        event["requestParameters"] = {"secretIdList": names}
    elif roll < 0.65:
        name = rng.choice(PARAMETERS)
        event.update(eventSource="ssm.amazonaws.com", eventName="GetParameter")
        event["requestParameters"] = {"name": name, "withDecryption": True}
        event["resources"] = [
            {"accountId": ACCOUNT, "ARN": f"arn:aws:ssm:{region}:{ACCOUNT}:parameter{name}"}
        ]
    elif roll < 0.70:
        names = rng.sample(PARAMETERS, rng.randint(2, 4))
        event.update(eventSource="ssm.amazonaws.com", eventName="GetParameters")
        event["requestParameters"] = {"names": names, "withDecryption": rng.random() < 0.5}
    elif roll < 0.85:
        secret = rng.choice(SECRETS)
        event.update(eventSource="kms.amazonaws.com", eventName="Decrypt")
        identity = dict(identity, invokedBy="secretsmanager.amazonaws.com")
        event["userIdentity"] = identity
        event["sourceIPAddress"] = "secretsmanager.amazonaws.com"
        event["userAgent"] = "secretsmanager.amazonaws.com"
        event["requestParameters"] = {
            "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "encryptionContext": {
                "SecretARN": _secret_arn(secret, region),
                "SecretVersionId": "00000000-1111-2222-3333-444444444444",
            },
        }
        event["resources"] = [
            {
                "accountId": ACCOUNT,
                "type": "AWS::KMS::Key",
                "ARN": f"arn:aws:kms:{region}:{ACCOUNT}:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            }
        ]
    elif roll < 0.87:
        event.update(eventSource="secretsmanager.amazonaws.com", eventName="ListSecrets")
        event["requestParameters"] = {"maxResults": 100}
    elif roll < 0.94:
        event.update(eventSource="ec2.amazonaws.com", eventName="DescribeInstances")
        event["requestParameters"] = {"instancesSet": {}, "filterSet": {}}
    else:
        event.update(eventSource="sts.amazonaws.com", eventName="AssumeRole")
        event["requestParameters"] = {
            "roleArn": f"arn:aws:iam::{ACCOUNT}:role/app-01-task-role",
            "roleSessionName": "session-1",
        }
    return event


def generate(data_dir: Path, records: int, files: int) -> list[Path]:
    """Write ``files`` gzip'd ``Records`` files holding ``records`` events in total."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / f"generated-{records}-{files}.json"
    paths = [data_dir / f"{ACCOUNT}_CloudTrail_{n:05d}.json.gz" for n in range(files)]
    if marker.exists() and all(path.exists() for path in paths):
        return paths
    for old in data_dir.glob("*.json.gz"):
        old.unlink()
    rng = random.Random(20250301)
    identities = _identities(rng)
    start = datetime(2025, 3, 1, tzinfo=UTC)
    per_file = records // files
    for n, path in enumerate(paths):
        count = per_file + (1 if n < records % files else 0)
        base = start + timedelta(minutes=5 * n)
        events = [
            _event(rng, identities, base + timedelta(seconds=rng.randrange(300)))
            for _ in range(count)
        ]
        path.write_bytes(gzip.compress(json.dumps({"Records": events}).encode(), 6))
    marker.write_text(json.dumps({"records": records, "files": files}))
    return paths


def _measure(kind: str, data_dir: Path, files: int) -> dict[str, Any]:
    """Run one measurement in this process, pinned to one CPU, and return its numbers."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    paths = sorted(data_dir.glob("*.json.gz"))[:files]
    # Imports happen before the clock starts: the figures are for reading, not start-up.
    import pandas as pd

    from benchmarks.memory import peak_mb

    if kind == "keytrail":
        from pipeline.formats import read_paths

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if kind == "keytrail":
        result = read_paths(paths)
        records, rows = result.records, len(result.events)
    else:
        frames = []
        records = 0
        for path in paths:
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                document = json.load(handle)
            records += len(document["Records"])
            frames.append(pd.json_normalize(document["Records"]))
        rows = len(pd.concat(frames, ignore_index=True))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kind": kind,
        "cpu": cpu,
        "files": len(paths),
        "records": records,
        "rows": rows,
        "seconds": seconds,
        "peak_mb": peak_mb(),
        "user_s": after.ru_utime - before.ru_utime,
        "system_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }


def _run_child(kind: str, data_dir: Path, files: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--measure",
        kind,
        "--data-dir",
        str(data_dir),
        "--files",
        str(files),
    ]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", type=int, default=1_000_000, help="events to generate in total"
    )
    parser.add_argument("--files", type=int, default=200, help="number of gzip'd Records files")
    parser.add_argument(
        "--baseline-files",
        type=int,
        default=20,
        help="files the json_normalize baseline reads (it is slow)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder for the generated files (reused when they match)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="times to run the keytrail measurement; the summary reports the median by seconds",
    )
    parser.add_argument("--measure", choices=("keytrail", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Runs as a script, so the repository root is not on sys.path by default.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    if args.measure:
        print(json.dumps(_measure(args.measure, args.data_dir, args.files)))
        return

    started = time.perf_counter()
    generate(args.data_dir, args.records, args.files)
    print(
        f"data: {args.records:,} records in {args.files} files under {args.data_dir} "
        f"({time.perf_counter() - started:.1f} s to generate or check)"
    )

    load_before = os.getloadavg()[0]
    runs = []
    for number in range(1, max(1, args.runs) + 1):
        runs.append(_run_child("keytrail", args.data_dir, args.files))
        print(
            f"keytrail run {number}: {runs[-1]['seconds']:.2f} s, "
            f"{runs[-1]['records'] / runs[-1]['seconds']:,.0f} records/s, "
            f"peak {runs[-1]['peak_mb']:.0f} MB"
        )
    ours = sorted(runs, key=lambda numbers: numbers["seconds"])[len(runs) // 2]
    baseline = _run_child("baseline", args.data_dir, min(args.baseline_files, args.files))
    print(
        f"{'measurement':<34}{'files':>6}{'records':>11}{'rows':>11}{'seconds':>9}"
        f"{'records/s':>11}{'peak MB':>9}"
    )
    for label, numbers in (("keytrail read_paths", ours), ("json.load + json_normalize", baseline)):
        rate = numbers["records"] / numbers["seconds"]
        print(
            f"{label:<34}{numbers['files']:>6}{numbers['records']:>11,}{numbers['rows']:>11,}"
            f"{numbers['seconds']:>9.2f}{rate:>11,.0f}{numbers['peak_mb']:>9.0f}"
        )
    print(
        f"baseline read {baseline['files']} of {args.files} files; its records/s is per record "
        "and its peak MB is for that subset only"
    )
    print(
        f"keytrail: pinned to CPU {ours['cpu']}, user {ours['user_s']:.2f} s, system "
        f"{ours['system_s']:.2f} s, {ours['minor_faults']:,} minor page faults; "
        f"1-minute load average before the run {load_before:.2f}"
    )
    summary = {
        "records": ours["records"],
        "events": ours["rows"],
        "seconds": round(ours["seconds"], 3),
        "records_per_s": round(ours["records"] / ours["seconds"]),
        "peak_mb": round(ours["peak_mb"]),
        "user_s": round(ours["user_s"], 2),
        "system_s": round(ours["system_s"], 2),
        "load_average_before": round(load_before, 2),
        "runs": len(runs),
        "max_peak_mb": round(max(numbers["peak_mb"] for numbers in runs)),
        "baseline_records": baseline["records"],
        "baseline_records_per_s": round(baseline["records"] / baseline["seconds"]),
        "baseline_peak_mb": round(baseline["peak_mb"]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
