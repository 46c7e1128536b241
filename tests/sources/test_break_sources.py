"""Hostile and broken API servers against the GCP Logging and LookupEvents sources.

Each test starts a scripted HTTP server on 127.0.0.1 that responds to every request from a
function of the request number, so it can loop page tokens, send invalid JSON or put entries
in the future.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from azure.storage.blob import ContainerClient

from pipeline.sources import SourceBatch, SourceError
from pipeline.sources.cloudtrail_lookup import CloudTrailLookupSettings, CloudTrailLookupSource
from pipeline.sources.gcp_logging import GcpLoggingSettings, GcpLoggingSource
from pipeline.sources.s3 import S3CloudTrailSettings, S3CloudTrailSource
from tests.sources.aws_cloudtrail_server import lookup_event
from tests.sources.aws_records import ACCOUNT, REGION
from tests.sources.aws_records import secret_read as trail_record
from tests.sources.moto_server import (  # noqa: F401 (fixtures)
    aws_env_fixture,
    moto_endpoint_fixture,
    moto_server_fixture,
)
from tests.sources.test_azure_blob import CURRENT as AZURE_CURRENT
from tests.sources.test_azure_blob import (  # noqa: F401 (fixtures)
    append,
    azurite,
    blob_name,
    container,
    lines,
    make_source,
)
from tests.sources.test_gcp_logging import entry
from tests.test_engine import cloudtrail_record

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
AWS_JSON = "application/x-amz-json-1.1"
BUCKET = "trail-bucket"

# Computes (status, content type, body) from the 1-based request number.
Responder = Callable[[int], tuple[int, str, bytes]]


class ScriptedServer:
    """An HTTP server on 127.0.0.1 that responds to each POST from a responder function."""

    def __init__(self, responder: Responder) -> None:
        self.requests: list[bytes] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append(body)
                status, content_type, data = responder(len(server.requests))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[Responder], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(responder: Responder) -> ScriptedServer:
        server = ScriptedServer(responder).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def json_reply(document: Any, content_type: str = "application/json") -> tuple[int, str, bytes]:
    return 200, content_type, json.dumps(document).encode()


# GCP Cloud Logging


@pytest.fixture
def _gcp_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


def gcp_source(server: ScriptedServer, **settings: Any) -> GcpLoggingSource:
    config = GcpLoggingSettings(
        name="gcp", projects=["alpha"], api_endpoint=server.url, timeout_seconds=5, **settings
    )
    return GcpLoggingSource(config, clock=lambda: NOW)


@pytest.mark.usefixtures("_gcp_env")
def test_gcp_repeated_page_token_stops(serve: Callable[[Responder], ScriptedServer]) -> None:
    page = {"entries": [entry("alpha", 1, time="2026-12-04T11:00:00Z")], "nextPageToken": "same"}
    # Safety net: end the loop after 50 requests if the source does not.
    server = serve(lambda number: json_reply(page if number < 50 else {}))

    with pytest.raises(SourceError) as caught:
        gcp_source(server).read({})

    assert len(server.requests) == 2
    assert caught.value.reason == (
        "project alpha: Cloud Logging returned the page token of an earlier page (or an "
        "invalid one) on page 2"
    )
    assert caught.value.hint == "the next run reads from the same checkpoint"


@pytest.mark.usefixtures("_gcp_env")
def test_gcp_repeated_token_other_project_read(
    serve: Callable[[Responder], ScriptedServer],
) -> None:
    # Requests 1 and 2 read project alpha, which loops its token. Request 3 reads project beta.
    looping = {"nextPageToken": "same"}
    good = {"entries": [entry("beta", 1, time="2026-12-04T11:00:00Z")]}
    server = serve(lambda number: json_reply(looping if number <= 2 else good))
    config = GcpLoggingSettings(
        name="gcp", projects=["alpha", "beta"], api_endpoint=server.url, timeout_seconds=5
    )

    batch = GcpLoggingSource(config, clock=lambda: NOW).read({})

    assert len(server.requests) == 3
    assert batch.result.records == 1
    assert batch.checkpoints == {"projects/beta": {"timestamp": "2026-12-04T11:00:00Z"}}
    assert batch.problems == [
        "project alpha: Cloud Logging returned the page token of an earlier page (or an "
        "invalid one) on page 2; the next run reads from the same checkpoint"
    ]


@pytest.mark.usefixtures("_gcp_env")
def test_gcp_endless_empty_pages_capped(serve: Callable[[Responder], ScriptedServer]) -> None:
    server = serve(lambda number: json_reply({"nextPageToken": f"token-{number}"}))

    batch = gcp_source(server, max_pages_per_project=5).read({})

    assert len(server.requests) == 5
    assert batch.result.records == 0
    assert batch.checkpoints == {}
    assert batch.problems == []
    assert batch.notes[-1] == (
        "project alpha: stopped after 0 entries in 5 pages (max_entries_per_project or "
        "max_pages_per_project); the next run reads from the same checkpoint"
    )


@pytest.mark.usefixtures("_gcp_env")
@pytest.mark.parametrize(("document", "kind"), [([1, 2], "list"), ("entries", "str"), (7, "int")])
def test_gcp_non_object_response_rejected(
    serve: Callable[[Responder], ScriptedServer], document: Any, kind: str
) -> None:
    server = serve(lambda number: json_reply(document))

    with pytest.raises(SourceError) as caught:
        gcp_source(server).read({})

    assert caught.value.reason == (
        f"project alpha: Cloud Logging returned a JSON {kind} where an entries.list response "
        "object was expected"
    )
    assert caught.value.hint == "check that api_endpoint points at the Cloud Logging API"


@pytest.mark.usefixtures("_gcp_env")
def test_gcp_invalid_json_is_source_error(serve: Callable[[Responder], ScriptedServer]) -> None:
    server = serve(lambda number: (200, "application/json", b'{"entries": [ '))

    with pytest.raises(SourceError) as caught:
        gcp_source(server).read({})

    assert caught.value.reason.startswith(
        "project alpha: request to Cloud Logging failed: JSONDecodeError: "
    )


@pytest.mark.usefixtures("_gcp_env")
def test_gcp_future_entry_checkpoint_clamped(
    serve: Callable[[Responder], ScriptedServer],
) -> None:
    entries = [
        entry("alpha", 1, time="2026-12-04T11:00:00Z"),
        entry("alpha", 2, time="2099-01-01T00:00:00Z"),
    ]
    server = serve(lambda number: json_reply({"entries": entries}))

    batch = gcp_source(server).read({})

    assert batch.result.records == 2
    assert batch.checkpoints == {"projects/alpha": {"timestamp": "2026-12-04T12:00:00Z"}}


# CloudTrail LookupEvents


def lookup_source(server: ScriptedServer, **settings: Any) -> CloudTrailLookupSource:
    config = CloudTrailLookupSettings(
        name="trail",
        regions=["eu-west-1"],
        event_sources=["secretsmanager.amazonaws.com"],
        endpoint_url=server.url,
        max_attempts=1,
        **settings,
    )
    return CloudTrailLookupSource(config, clock=lambda: NOW, sleep=lambda seconds: None)


def secret_read(number: int, moment: datetime) -> dict[str, Any]:
    record = cloudtrail_record(number, time=moment.isoformat().replace("+00:00", "Z"))
    return lookup_event(record, moment)


@pytest.mark.usefixtures("aws_env")
def test_lookup_endless_fresh_tokens_capped(serve: Callable[[Responder], ScriptedServer]) -> None:
    server = serve(
        lambda number: json_reply({"Events": [], "NextToken": f"token-{number}"}, AWS_JSON)
    )

    with pytest.raises(SourceError) as caught:
        lookup_source(server, max_pages=4).read({})

    assert len(server.requests) == 4
    assert caught.value.reason == (
        "LookupEvents had more than 4 pages for secretsmanager.amazonaws.com"
    )
    assert caught.value.hint == (
        "raise max_pages, or lower initial_days or lookback_minutes; the next run queries the "
        "region again"
    )


@pytest.mark.usefixtures("aws_env")
def test_lookup_unparseable_event_time(serve: Callable[[Responder], ScriptedServer]) -> None:
    event = secret_read(1, NOW - timedelta(minutes=5))
    event["EventTime"] = "not a time"
    server = serve(lambda number: json_reply({"Events": [event]}, AWS_JSON))

    with pytest.raises(SourceError) as caught:
        lookup_source(server).read({})

    assert caught.value.reason == (
        "LookupEvents in eu-west-1 returned a response that could not be parsed: Invalid "
        'timestamp "not a time": Unknown string format: not a time'
    )
    assert caught.value.hint == "check endpoint_url; the next run queries the region again"


@pytest.mark.usefixtures("aws_env")
def test_lookup_events_object_not_list(serve: Callable[[Responder], ScriptedServer]) -> None:
    server = serve(lambda number: json_reply({"Events": {"EventId": "x"}}, AWS_JSON))

    with pytest.raises(SourceError) as caught:
        lookup_source(server).read({})

    assert caught.value.reason.startswith(
        "LookupEvents in eu-west-1 returned a response that could not be parsed: "
    )


@pytest.mark.usefixtures("aws_env")
def test_lookup_future_event_checkpoint_clamped(
    serve: Callable[[Responder], ScriptedServer],
) -> None:
    events = [
        secret_read(1, NOW - timedelta(minutes=5)),
        secret_read(2, datetime(2099, 1, 1, tzinfo=UTC)),
    ]
    server = serve(lambda number: json_reply({"Events": events}, AWS_JSON))

    batch = lookup_source(server).read({})

    assert batch.result.records == 2
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-12-04T12:00:00Z"}}


@pytest.mark.usefixtures("aws_env")
def test_lookup_invalid_cloudtrail_event_quarantined(
    serve: Callable[[Responder], ScriptedServer],
) -> None:
    broken = secret_read(1, NOW - timedelta(minutes=6))
    broken["CloudTrailEvent"] = '{"eventVersion": "1.09", '
    good = secret_read(2, NOW - timedelta(minutes=5))
    server = serve(lambda number: json_reply({"Events": [good, broken]}, AWS_JSON))

    batch = lookup_source(server).read({})

    assert batch.result.records == 2
    assert len(batch.result.events) == 1
    assert [item.reason for item in batch.result.quarantined] == ["invalid_json"]
    assert batch.result.quarantined[0].origin.startswith(
        "cloudtrail:LookupEvents eu-west-1 secretsmanager.amazonaws.com page 1"
    )
    assert batch.checkpoints == {"eu-west-1": {"newest_event_time": "2026-12-04T11:55:00Z"}}


# CloudTrail in S3

S3_NOW = datetime(2026, 10, 6, 12, 0, tzinfo=UTC)
DAY_PREFIX = f"AWSLogs/{ACCOUNT}/CloudTrail/{REGION}/2026/10/06/"


@pytest.fixture
def bucket(moto_endpoint: str) -> Any:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


def trail_document(*numbers: int) -> bytes:
    records = [trail_record(number, time="2026-10-06T10:00:00Z") for number in numbers]
    return json.dumps({"Records": records}).encode()


def s3_source(endpoint: str) -> S3CloudTrailSource:
    settings = S3CloudTrailSettings(
        name="trail", bucket=BUCKET, endpoint_url=endpoint, max_attempts=1
    )
    return S3CloudTrailSource(settings, clock=lambda: S3_NOW)


def event_ids(batch: SourceBatch) -> list[str]:
    return sorted(uid[-2:] for uid in batch.result.events["event_uid"])


def test_s3_odd_key_names_read(moto_endpoint: str, bucket: Any) -> None:
    names = {
        "has space ü+%20.json.gz": 1,
        "a/../dots.json.gz": 2,
        "./dot.json.gz": 3,
    }
    for name, number in names.items():
        body = gzip.compress(trail_document(number))
        bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX + name, Body=body)
    bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX, Body=b"")

    batch = s3_source(moto_endpoint).read({})

    assert event_ids(batch) == ["01", "02", "03"]
    assert batch.problems == []
    assert batch.files_listed == 3
    objects = batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]
    assert sorted(objects) == ["dot.json.gz", "dots.json.gz", "has space ü+%20.json.gz"]


def test_s3_empty_and_uncompressed_objects(moto_endpoint: str, bucket: Any) -> None:
    bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX + "empty.json.gz", Body=b"")
    bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX + "plain.json.gz", Body=trail_document(4))

    batch = s3_source(moto_endpoint).read({})

    assert event_ids(batch) == ["04"]
    assert batch.problems == []
    assert batch.result.quarantined == []
    objects = batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["objects"]
    assert sorted(objects) == ["empty.json.gz", "plain.json.gz"]


def test_s3_zero_padded_gzip_read(moto_endpoint: str, bucket: Any) -> None:
    body = gzip.compress(trail_document(5)) + b"\x00" * 16
    bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX + "padded.json.gz", Body=body)

    batch = s3_source(moto_endpoint).read({})

    assert event_ids(batch) == ["05"]
    assert batch.problems == []
    assert batch.checkpoints[f"{ACCOUNT}/{REGION}/2026-10-06"]["attempts"] == {}


def test_s3_garbage_after_gzip_member_corrupt(moto_endpoint: str, bucket: Any) -> None:
    body = gzip.compress(trail_document(6)) + b"\x00\x00junk"
    bucket.put_object(Bucket=BUCKET, Key=DAY_PREFIX + "junk.json.gz", Body=body)

    batch = s3_source(moto_endpoint).read({})

    assert event_ids(batch) == []
    assert batch.problems == [
        f"s3://{BUCKET}/{DAY_PREFIX}junk.json.gz: invalid gzip data: Error -3 while "
        "decompressing data: incorrect header check (attempt 1 of 3); read again next run"
    ]


# Azure Key Vault logs in Blob Storage

PAST_HOUR = AZURE_CURRENT - timedelta(hours=2)


def commit(checkpoints: dict[str, Any], batch: SourceBatch) -> dict[str, Any]:
    """Apply a batch's checkpoint changes as the engine's commit does."""
    updated = {**checkpoints, **batch.checkpoints}
    for key in batch.checkpoints_removed:
        updated.pop(key, None)
    return updated


def test_azure_blob_emptied_then_refilled(container: ContainerClient) -> None:  # noqa: F811 (fixture)
    name = blob_name(PAST_HOUR)
    append(container, name, lines(PAST_HOUR, range(3)))
    source = make_source(container)
    checkpoints = commit({}, source.read({}))

    container.delete_blob(name)
    container.get_blob_client(name).create_append_blob()
    emptied = source.read(checkpoints)
    checkpoints = commit(checkpoints, emptied)

    assert emptied.problems == []
    assert emptied.result.records == 0
    assert emptied.checkpoints == {"read_until": "2026-12-04T12:40:00+00:00"}

    append(container, name, lines(PAST_HOUR, range(10, 12)))
    refilled = source.read(checkpoints)

    assert refilled.problems == []
    assert refilled.result.records == 2
    assert refilled.checkpoints[f"{container.container_name}/{name}"]["offset"] == len(
        lines(PAST_HOUR, range(10, 12))
    )


def test_azure_bom_and_crlf_lines_read(container: ContainerClient) -> None:  # noqa: F811 (fixture)
    data = b"\xef\xbb\xbf" + lines(PAST_HOUR, range(2)).replace(b"\n", b"\r\n")
    append(container, blob_name(PAST_HOUR), data)

    batch = make_source(container).read({})

    assert batch.problems == []
    assert batch.result.records == 2
    assert len(batch.result.events) == 2
    assert batch.result.quarantined == []


def test_azure_blob_outside_layout_ignored(container: ContainerClient) -> None:  # noqa: F811 (fixture)
    append(container, blob_name(PAST_HOUR), lines(PAST_HOUR, range(1)))
    append(container, "resourceId=/SUBSCRIPTIONS/X/odd/PT1H.json", lines(PAST_HOUR, range(5, 6)))

    batch = make_source(container).read({})

    assert batch.files_listed == 1
    assert batch.result.records == 1
    assert batch.problems == []
