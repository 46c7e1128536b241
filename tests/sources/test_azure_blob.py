"""Tests of the azure_blob source against Azurite, started by these tests on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.storage.blob import BlobServiceClient, ContainerClient
from pydantic import ValidationError

from pipeline.config import settings_from_mapping
from pipeline.engine import run_once
from pipeline.sources import SourceError, build_source
from pipeline.sources.azure_blob import (
    READ_UNTIL,
    AzureBlobSettings,
    AzureBlobSource,
    hour_of_blob,
)
from pipeline.store.state import State
from tests.sources.azurite import DEV_ACCOUNT, free_port, running_azurite

NOW = datetime(2026, 12, 4, 12, 40, tzinfo=UTC)
ENV = "KEYTRAIL_TEST_AZURE_STORAGE"
SUBSCRIPTION = "0000AAAA-1111-2222-3333-444455556666"
_container_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_azurite(tmp_path_factory.mktemp("azurite")) as connection:
        yield connection


@pytest.fixture
def container(azurite: str, monkeypatch: pytest.MonkeyPatch) -> ContainerClient:
    """A new, empty container of its own for each test."""
    monkeypatch.setenv(ENV, azurite)
    service = BlobServiceClient.from_connection_string(azurite, retry_total=0)
    client = service.get_container_client(f"auditevent-{next(_container_numbers)}")
    client.create_container()
    return client


def vault_folder(vault: str = "KV-PAYMENTS") -> str:
    return (
        f"resourceId=/SUBSCRIPTIONS/{SUBSCRIPTION}/RESOURCEGROUPS/RG-SECRETS/PROVIDERS/"
        f"MICROSOFT.KEYVAULT/VAULTS/{vault}/"
    )


def blob_name(hour: datetime, vault: str = "KV-PAYMENTS") -> str:
    return f"{vault_folder(vault)}y={hour:%Y}/m={hour:%m}/d={hour:%d}/h={hour:%H}/m=00/PT1H.json"


def record_line(number: int, hour: datetime, vault: str = "KV-PAYMENTS") -> bytes:
    """Return one Key Vault SecretGet AuditEvent as a PT1H.json line (with its newline)."""
    record = {
        "time": f"{hour + timedelta(minutes=number % 60):%Y-%m-%dT%H:%M:%S}.1234567Z",
        "category": "AuditEvent",
        "operationName": "SecretGet",
        "resultType": "Success",
        "resultSignature": "OK",
        "durationMs": "12",
        "callerIpAddress": "198.51.100.20",
        "correlationId": f"7f3c0000-0000-4000-8000-{number:012d}",
        "resourceId": (
            f"/SUBSCRIPTIONS/{SUBSCRIPTION}/RESOURCEGROUPS/RG-SECRETS/PROVIDERS/"
            f"MICROSOFT.KEYVAULT/VAULTS/{vault}"
        ),
        "identity": {"claim": {"appid": "11111111-2222-3333-4444-555555555555"}},
        "properties": {
            "id": f"https://{vault.lower()}.vault.azure.net/secrets/db-{number}/0123abcd",
            "httpStatusCode": 200,
            "clientInfo": "azsdk-python-keyvault-secrets/4.8.0",
        },
    }
    return json.dumps(record).encode() + b"\n"


def lines(hour: datetime, numbers: range) -> bytes:
    return b"".join(record_line(number, hour) for number in numbers)


def append(container: ContainerClient, name: str, data: bytes) -> None:
    blob = container.get_blob_client(name)
    if not blob.exists():
        blob.create_append_blob()
    blob.append_block(data)


def make_source(container: ContainerClient, **settings: Any) -> AzureBlobSource:
    config = AzureBlobSettings(
        name="kv",
        container=container.container_name,
        connection_string_env=ENV,
        retries=0,
        **settings,
    )
    return AzureBlobSource(config, clock=lambda: NOW)


def make_source_named(container: str) -> AzureBlobSource:
    config = AzureBlobSettings(name="kv", container=container, connection_string_env=ENV, retries=0)
    return AzureBlobSource(config, clock=lambda: NOW)


CURRENT = datetime(2026, 12, 4, 12, tzinfo=UTC)
"""The hour that NOW lies in: its blob is still being appended."""


def test_first_read_takes_complete_lines(container: ContainerClient) -> None:
    data = lines(CURRENT, range(3))
    append(container, blob_name(CURRENT), data)

    batch = make_source(container).read({})

    assert batch.files_listed == 1
    assert batch.result.records == 3
    assert len(batch.result.events) == 3
    assert batch.problems == []
    key = f"{container.container_name}/{blob_name(CURRENT)}"
    marker = batch.checkpoints[key]
    assert marker["offset"] == len(data)
    assert marker["size"] == len(data)
    properties = container.get_blob_client(blob_name(CURRENT)).get_blob_properties()
    assert marker["etag"] == properties.etag.strip('"')
    assert marker["created"] == properties.creation_time.isoformat()
    assert batch.checkpoints[READ_UNTIL] == NOW.isoformat()


def test_append_between_runs_reads_only_new_lines(container: ContainerClient) -> None:
    first_part = lines(CURRENT, range(3))
    append(container, blob_name(CURRENT), first_part)
    source = make_source(container)
    first = source.read({})
    append(container, blob_name(CURRENT), lines(CURRENT, range(3, 5)))

    second = source.read(first.checkpoints)

    assert second.result.records == 2
    assert len(second.result.events) == 2
    assert second.files_unchanged == 0
    key = f"{container.container_name}/{blob_name(CURRENT)}"
    assert second.checkpoints[key]["offset"] == len(first_part) + len(lines(CURRENT, range(3, 5)))


def test_unchanged_blob_not_read_again(container: ContainerClient) -> None:
    append(container, blob_name(CURRENT), lines(CURRENT, range(2)))
    source = make_source(container)
    first = source.read({})

    second = source.read(first.checkpoints)

    assert second.files_listed == 1
    assert second.files_unchanged == 1
    assert second.result.records == 0
    assert list(second.checkpoints) == [READ_UNTIL]


def test_half_written_line_waits_until_complete(container: ContainerClient) -> None:
    complete = lines(CURRENT, range(2))
    cut_line = record_line(2, CURRENT)
    append(container, blob_name(CURRENT), complete + cut_line[:40])
    source = make_source(container)
    key = f"{container.container_name}/{blob_name(CURRENT)}"

    first = source.read({})
    unchanged = source.read(first.checkpoints)
    append(container, blob_name(CURRENT), cut_line[40:] + record_line(3, CURRENT))
    finished = source.read(first.checkpoints)

    assert first.result.records == 2
    assert first.result.quarantined == []
    assert first.checkpoints[key]["offset"] == len(complete)
    assert first.checkpoints[key]["size"] == len(complete) + 40
    assert unchanged.files_unchanged == 1
    assert unchanged.result.records == 0
    assert finished.result.records == 2
    assert len(finished.result.events) == 2
    assert finished.result.quarantined == []
    assert finished.checkpoints[key]["offset"] == len(complete) + len(cut_line) + len(
        record_line(3, CURRENT)
    )


def test_settled_hour_reads_last_line_without_newline(container: ContainerClient) -> None:
    earlier = datetime(2026, 12, 4, 10, tzinfo=UTC)
    data = lines(earlier, range(2)) + record_line(2, earlier).rstrip(b"\n")
    append(container, blob_name(earlier), data)

    batch = make_source(container).read({})

    assert batch.result.records == 3
    assert batch.checkpoints[f"{container.container_name}/{blob_name(earlier)}"]["offset"] == len(
        data
    )


def test_cut_line_of_settled_hour_quarantined(container: ContainerClient) -> None:
    earlier = datetime(2026, 12, 4, 10, tzinfo=UTC)
    append(container, blob_name(earlier), lines(earlier, range(2)) + b'{"time": "2026-12-04T10')

    batch = make_source(container).read({})

    assert batch.result.records == 3
    assert len(batch.result.events) == 2
    (quarantined,) = batch.result.quarantined
    assert quarantined.origin == f"{container.container_name}/{blob_name(earlier)} line 3"


def test_broken_line_quarantined_with_offset(container: ContainerClient) -> None:
    first_part = lines(CURRENT, range(2))
    append(container, blob_name(CURRENT), first_part)
    source = make_source(container)
    first = source.read({})
    append(container, blob_name(CURRENT), b'{"time": 12, "category": \n' + record_line(5, CURRENT))

    second = source.read(first.checkpoints)

    assert second.result.records == 2
    assert len(second.result.events) == 1
    (quarantined,) = second.result.quarantined
    assert quarantined.origin == (
        f"{container.container_name}/{blob_name(CURRENT)} from byte {len(first_part)} line 1"
    )


def test_replaced_shorter_blob_read_from_start(container: ContainerClient) -> None:
    append(container, blob_name(CURRENT), lines(CURRENT, range(4)))
    source = make_source(container)
    first = source.read({})
    container.delete_blob(blob_name(CURRENT))
    replacement = lines(CURRENT, range(10, 11))
    append(container, blob_name(CURRENT), replacement)

    second = source.read(first.checkpoints)

    assert second.result.records == 1
    assert second.checkpoints[f"{container.container_name}/{blob_name(CURRENT)}"]["offset"] == len(
        replacement
    )


def test_replaced_longer_blob_found_by_tail_hash(container: ContainerClient) -> None:
    append(container, blob_name(CURRENT), lines(CURRENT, range(2)))
    source = make_source(container)
    first = source.read({})
    container.delete_blob(blob_name(CURRENT))
    replacement = lines(CURRENT, range(20, 25))
    append(container, blob_name(CURRENT), replacement)
    # A replacement that kept the creation time differs only in the bytes before the offset.
    key = f"{container.container_name}/{blob_name(CURRENT)}"
    created = container.get_blob_client(blob_name(CURRENT)).get_blob_properties().creation_time
    checkpoints = dict(first.checkpoints)
    checkpoints[key] = {**first.checkpoints[key], "created": created.isoformat()}

    second = source.read(checkpoints)

    assert second.result.records == 5
    assert second.checkpoints[key]["offset"] == len(replacement)


def test_old_hours_not_listed(container: ContainerClient) -> None:
    hours = [datetime(2026, 12, 4, hour, tzinfo=UTC) for hour in (12, 11, 9, 8)]
    yesterday = datetime(2026, 12, 3, 23, tzinfo=UTC)
    for hour in [*hours, yesterday]:
        append(container, blob_name(hour), lines(hour, range(1)))
    # The previous run ended at 12:35, so a look-back of 3 hours starts at 09:35.
    checkpoints = {READ_UNTIL: (NOW - timedelta(minutes=5)).isoformat()}

    batch = make_source(container, lookback_hours=3).read(checkpoints)

    assert batch.files_listed == 3
    assert batch.result.records == 3
    assert sorted(key for key in batch.checkpoints if key != READ_UNTIL) == sorted(
        f"{container.container_name}/{blob_name(hour)}" for hour in hours[:3]
    )


def test_downtime_lists_every_hour_since_last_run(container: ContainerClient) -> None:
    yesterday = datetime(2026, 12, 3, 23, tzinfo=UTC)
    append(container, blob_name(yesterday), lines(yesterday, range(2)))
    append(container, blob_name(CURRENT), lines(CURRENT, range(1)))
    checkpoints = {READ_UNTIL: datetime(2026, 12, 4, 1, tzinfo=UTC).isoformat()}

    batch = make_source(container, lookback_hours=3).read(checkpoints)

    assert batch.files_listed == 2
    assert batch.result.records == 3


def test_expired_checkpoints_removed(container: ContainerClient) -> None:
    append(container, blob_name(CURRENT), lines(CURRENT, range(1)))
    name = container.container_name
    old_key = f"{name}/{blob_name(datetime(2026, 12, 4, 5, tzinfo=UTC))}"
    edge_key = f"{name}/{blob_name(datetime(2026, 12, 4, 8, tzinfo=UTC))}"
    kept_key = f"{name}/{blob_name(datetime(2026, 12, 4, 9, tzinfo=UTC))}"
    marker = {"offset": 10, "etag": '"0x1"', "size": 10, "created": "x", "tail_sha256": "00"}
    checkpoints = {
        READ_UNTIL: (NOW - timedelta(minutes=5)).isoformat(),
        old_key: marker,
        edge_key: marker,
        kept_key: marker,
    }

    batch = make_source(container, lookback_hours=3).read(checkpoints)

    assert batch.checkpoints_removed == sorted([old_key, edge_key])


def test_discovery_finds_every_vault(container: ContainerClient) -> None:
    for vault in ("KV-PAYMENTS", "KV-SEARCH"):
        append(container, blob_name(CURRENT, vault), record_line(1, CURRENT, vault))
    container.upload_blob("README.txt", b"not a log")

    batch = make_source(container).read({})

    assert batch.files_listed == 2
    assert batch.result.records == 2


def test_resource_ids_limit_vaults(container: ContainerClient) -> None:
    for vault in ("KV-PAYMENTS", "KV-SEARCH"):
        append(container, blob_name(CURRENT, vault), record_line(1, CURRENT, vault))
    resource_id = (
        f"/subscriptions/{SUBSCRIPTION.lower()}/resourceGroups/rg-secrets/providers/"
        "Microsoft.KeyVault/vaults/kv-search"
    )

    batch = make_source(container, resource_ids=[resource_id]).read({})

    assert batch.files_listed == 1
    assert next(iter(batch.checkpoints)).endswith(
        "/VAULTS/KV-SEARCH/y=2026/m=12/d=04/h=12/m=00/PT1H.json"
    )


def test_backfill_reads_whole_blobs_without_checkpoints(container: ContainerClient) -> None:
    append(container, blob_name(CURRENT), lines(CURRENT, range(3)))
    source = make_source(container)
    first = source.read({})

    batch = source.read(
        first.checkpoints,
        since=datetime(2026, 12, 4, 11, 30, tzinfo=UTC),
        until=datetime(2026, 12, 4, 12, 30, tzinfo=UTC),
    )

    assert batch.result.records == 3
    assert batch.checkpoints == {}
    assert batch.checkpoints_removed == []


def test_missing_container_raises(container: ContainerClient) -> None:
    config = AzureBlobSettings(name="kv", container="no-such-container", connection_string_env=ENV)

    with pytest.raises(SourceError) as caught:
        AzureBlobSource(config, clock=lambda: NOW).read({})

    assert caught.value.reason.startswith(
        "cannot list container no-such-container: HTTP 404 ContainerNotFound: "
    )
    assert "diagnostic setting" in caught.value.hint


def test_wrong_key_raises_with_role_hint(
    container: ContainerClient, azurite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = azurite.replace("AccountKey=Eby8", "AccountKey=Xby8")
    monkeypatch.setenv(ENV, wrong)

    with pytest.raises(SourceError) as caught:
        make_source(container).read({})

    assert caught.value.reason.startswith(
        f"cannot list container {container.container_name}: HTTP 403"
    )
    assert "Storage Blob Data Reader" in caught.value.hint
    assert wrong not in str(caught.value)


def test_connection_error_redacts_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    closed_port = free_port()
    monkeypatch.setenv(
        ENV,
        f"BlobEndpoint=http://127.0.0.1:{closed_port}/{DEV_ACCOUNT};"
        "SharedAccessSignature=sv=2022-11-02&sp=rl&sig=SIGNATURE0123456789abcdef",
    )

    with pytest.raises(SourceError) as caught:
        make_source_named("insights-logs-auditevent").read({})

    assert caught.value.reason.startswith(
        "cannot list container insights-logs-auditevent: ServiceRequestError: "
    )
    assert "SIGNATURE0123456789abcdef" not in str(caught.value)
    assert caught.value.hint == (
        "check the network path to the storage account; the next run retries"
    )


def test_error_message_signature_redacted() -> None:
    source = make_source_named("insights-logs-auditevent")
    failure = ServiceRequestError(
        "Max retries exceeded with url: /c?restype=container&comp=list&sv=2022-11-02"
        "&sig=abc%2Bdef123&sp=rl (Caused by NewConnectionError)\nsecond line"
    )

    error = source._storage_error("cannot list", failure)

    assert error.reason == (
        "cannot list container insights-logs-auditevent: ServiceRequestError: Max retries "
        "exceeded with url: /c?restype=container&comp=list&sv=2022-11-02&sig=REDACTED&sp=rl "
        "(Caused by NewConnectionError)"
    )


def test_missing_connection_string_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    config = AzureBlobSettings(name="kv", connection_string_env=ENV)

    with pytest.raises(SourceError) as caught:
        AzureBlobSource(config).read({})

    assert caught.value.reason == (
        f"no storage account configured: environment variable {ENV} is not set and "
        "account_url is empty"
    )


def test_invalid_connection_string_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "not-a-connection-string")
    config = AzureBlobSettings(name="kv", connection_string_env=ENV)

    with pytest.raises(SourceError) as caught:
        AzureBlobSource(config).read({})

    assert caught.value.reason == f"the connection string in environment variable {ENV} is invalid"
    assert "not-a-connection-string" not in str(caught.value)


def test_missing_package_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)
    config = AzureBlobSettings(name="kv", connection_string_env=ENV)

    with pytest.raises(SourceError) as caught:
        AzureBlobSource(config).read({})

    assert caught.value.reason.startswith("azure-storage-blob is not installed")
    assert caught.value.hint == "install the Azure extra: pip install 'keytrail[azure]'"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (blob_name(CURRENT), CURRENT),
        ("resourceId=/X/y=2026/m=02/d=30/h=01/m=00/PT1H.json", None),
        ("resourceId=/X/y=2026/m=02/d=03/PT1H.json", None),
        ("y=2026/m=02/d=03/h=23/m=00/PT1H.json", datetime(2026, 2, 3, 23, tzinfo=UTC)),
    ],
)
def test_hour_of_blob(name: str, expected: datetime | None) -> None:
    assert hour_of_blob(name) == expected


def test_settings_reject_bad_container() -> None:
    with pytest.raises(ValidationError):
        AzureBlobSettings(name="kv", container="Insights_Logs")


def test_engine_run_reads_appended_lines(
    container: ContainerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine builds the source with the real clock, so the blob is in the current hour.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    append(container, blob_name(hour), lines(hour, range(2)))
    data: dict[str, Any] = {
        "state_dir": "state",
        "output_dir": "out",
        "sources": [
            {
                "name": "keyvault",
                "type": "azure_blob",
                "container": container.container_name,
                "connection_string_env": ENV,
                "retries": 0,
            }
        ],
        "enrich": {"geoip": {"enabled": False}},
        "detectors": {},
        "alerting": {"console": False, "outbox": False},
    }
    settings = settings_from_mapping(data, base_dir=tmp_path)
    assert isinstance(build_source(settings.sources[0]), AzureBlobSource)

    first = run_once(settings)
    append(container, blob_name(hour), lines(hour, range(2, 3)))
    second = run_once(settings)

    assert first.problems == []
    assert first.sources[0].records == 2
    assert first.events_new == 2
    assert second.sources[0].records == 1
    assert second.events_new == 1
    with State(tmp_path / "state" / "state.db", read_only=True) as state:
        stored = state.checkpoints("keyvault")
    key = f"{container.container_name}/{blob_name(hour)}"
    assert stored[key]["offset"] == len(lines(hour, range(3)))
