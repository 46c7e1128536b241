"""Synthetic secret-access events for benchmarks, built with numpy and Arrow dictionaries.

A fixed population reads secrets across the three clouds: 1,600 workloads whose volumes follow
a Zipf-like law (a few services make most reads, at any hour) and 400 people who read during
their working hours. Each principal keeps its own few secrets and source addresses, so the
hourly rollup is much smaller than the events, as in a real account. Two percent of reads fail.
Building a million events takes about a second: strings are dictionary indices until Arrow
casts them once per column.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.schema import ARROW_SCHEMA

__all__ = ["Population"]

_WORKLOADS: Final = 1_600
_PEOPLE: Final = 400
_SECRETS_PER_CLOUD: Final = 3_000
_ADDRESSES: Final = 6_000
_FAILURE_SHARE: Final = 0.02
_CLOUDS: Final = {
    "aws": ("cloudtrail", "secretsmanager", "GetSecretValue", "111122223333", "eu-central-1"),
    "gcp": (
        "gcp_audit",
        "secretmanager",
        "google.cloud.secretmanager.v1.SecretManagerService.AccessSecretVersion",
        "shop-prod",
        "global",
    ),
    "azure": (
        "azure_keyvault",
        "keyvault",
        "SecretGet",
        "00000000-1111-2222-3333-444444444444",
        "westeurope",
    ),
}
_COUNTRIES: Final = ("US", "DE", "IE", "JP", "IN", "BR", "GB", "FR")
# User agents by cloud: workloads use SDKs, people a command line tool or the console.
_AGENTS: Final = {
    "aws": (
        "Boto3/1.35.{n} md/Botocore#1.35.{n} ua/2.0 os/linux#5.10 md/arch#x86_64 lang/python#3.12.4",
        "aws-sdk-go-v2/1.30.{n} os/linux lang/go#1.22.5 md/GOOS#linux md/GOARCH#amd64",
        "aws-sdk-java/2.26.{n} Linux/5.10 OpenJDK_64-Bit_Server_VM/21.0.3 Java/21.0.3",
        "aws-cli/2.17.{n} md/awscrt#0.20.11 ua/2.0 os/macos#23.5.0 md/arch#arm64 lang/python#3.11.9",
    ),
    "gcp": (
        "grpc-python/1.64.{n} grpc-c/41.0.0 (linux; chttp2) gl-python/3.12.4 gapic/2.20.0",
        "google-api-go-client/0.5 Terraform/1.8.{n} terraform-provider-google/5.36.0",
        "google-cloud-sdk gcloud/482.0.{n} command/gcloud.secrets.versions.access",
    ),
    "azure": (
        "azsdk-python-keyvault-secrets/4.8.{n} Python/3.12.4 (Linux-5.15-x86_64-with-glibc2.35)",
        "azsdk-net-Security.KeyVault.Secrets/4.6.{n} (.NET 8.0.6; Ubuntu 22.04.4 LTS)",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0.0.{n}",
    ),
}
_TYPES_BY_CLOUD: Final = {
    "aws": ("role", "federated"),
    "gcp": ("service_account", "user"),
    "azure": ("service_principal", "user"),
}


class Population:
    """A fixed set of principals with their secrets, addresses and daily habits."""

    def __init__(self, seed: int = 5) -> None:
        rng = np.random.default_rng(seed)
        self._rng = rng
        count = _WORKLOADS + _PEOPLE
        self.is_person = np.arange(count) >= _WORKLOADS
        self.cloud = rng.choice(3, size=count, p=[0.6, 0.25, 0.15])
        clouds = list(_CLOUDS)
        names = []
        for index in range(count):
            cloud = clouds[self.cloud[index]]
            if self.is_person[index]:
                names.append(f"person{index:04d}@example.com")
            elif cloud == "aws":
                names.append(f"arn:aws:iam::111122223333:role/service-{index:04d}")
            elif cloud == "gcp":
                names.append(f"svc-{index:04d}@shop-prod.iam.gserviceaccount.com")
            else:
                names.append(f"app-{index:04d}")
        self.names = np.array(names, dtype=object)
        kinds = [
            _TYPES_BY_CLOUD[clouds[cloud]][int(person)]
            for cloud, person in zip(self.cloud, self.is_person, strict=True)
        ]
        self.types = np.array(kinds, dtype=object)
        weights = 1.0 / np.arange(1, _WORKLOADS + 1) ** 0.9
        weights = np.concatenate([weights / weights.sum() * 0.97, np.full(_PEOPLE, 0.03 / _PEOPLE)])
        self.weights = weights / weights.sum()
        # Each principal reads from its own slice of the secrets of its cloud.
        self.secret_count = np.where(
            self.is_person, rng.integers(3, 12, count), rng.integers(1, 5, count)
        )
        self.secret_first = rng.integers(0, _SECRETS_PER_CLOUD - 12, count)
        self.address_count = np.where(
            self.is_person, rng.integers(1, 4, count), rng.integers(1, 3, count)
        )
        self.address_first = rng.integers(0, _ADDRESSES - 4, count)
        self.address_country = rng.integers(0, len(_COUNTRIES), _ADDRESSES)
        self.address_asn = rng.integers(64_500, 65_500, _ADDRESSES)
        self.addresses = np.array(
            [
                f"{(n >> 16) % 200 + 11}.{(n >> 8) % 256}.{n % 256}.{n % 250 + 1}"
                for n in range(_ADDRESSES)
            ],
            dtype=object,
        )
        self.secrets = {cloud: np.array(_secret_names(cloud), dtype=object) for cloud in clouds}
        # People work around 09:00-18:00 UTC, each with their own start hour.
        self.start_hour = rng.integers(6, 11, count)
        # User agents come from a generator of their own, so adding them left every other
        # column as it was. Each principal uses one or two agents of its cloud's list, each
        # in one of four patch versions.
        agents = np.random.default_rng(seed + 1)
        self.agents = np.array(
            [
                template.format(n=version)
                for cloud in clouds
                for template in _AGENTS[cloud]
                for version in range(4)
            ],
            dtype=object,
        )
        offsets = np.cumsum([0, *(len(_AGENTS[cloud]) * 4 for cloud in clouds)])
        choices = np.array([len(_AGENTS[cloud]) * 4 for cloud in clouds])[self.cloud]
        self.agent_first = offsets[self.cloud] + agents.integers(0, 1 << 20, count) % choices
        self.agent_span = np.where(self.is_person, 2, 1)
        self.agent_choices = choices
        self.agent_offset = offsets[self.cloud]
        self._agent_seed = seed + 2

    def events(self, start: pd.Timestamp, day: int, count: int) -> pd.DataFrame:
        """Return ``count`` events of day ``day`` after ``start``, as a typed events frame."""
        rng = np.random.default_rng(int(self._rng.integers(1 << 30)) + day)
        principal = rng.choice(len(self.names), size=count, p=self.weights)
        person = self.is_person[principal]
        seconds = rng.integers(0, 86_400, count)
        working = self.start_hour[principal] * 3600 + rng.integers(0, 9 * 3600, count)
        seconds = np.where(person, working, seconds)
        base = (start + pd.Timedelta(days=day)).value // 1000
        micros = base + seconds * 1_000_000 + rng.integers(0, 1_000_000, count)
        # Events arrive in time order, as a day of logs does; History.append then needs no sort.
        order = np.argsort(micros, kind="stable")
        principal = principal[order]
        times = pa.array(micros[order], pa.int64())

        cloud = self.cloud[principal]
        secret = (
            self.secret_first[principal]
            + rng.integers(0, 1 << 20, count) % self.secret_count[principal]
        )
        address = (
            self.address_first[principal]
            + rng.integers(0, 1 << 20, count) % self.address_count[principal]
        )
        failed = rng.random(count) < _FAILURE_SHARE
        pick = np.random.default_rng(self._agent_seed + day).integers(0, 2, count)
        pick = pick % self.agent_span[principal]
        agent = (
            self.agent_offset[principal]
            + (self.agent_first[principal] - self.agent_offset[principal] + pick)
            % self.agent_choices[principal]
        )
        clouds = list(_CLOUDS)

        columns: dict[str, pa.Array] = {
            "event_uid": pa.compute.binary_join_element_wise(
                pa.scalar(f"bench-{day:03d}-"), pa.array(np.arange(count)).cast(pa.string()), ""
            ),
            "time": times.cast(pa.timestamp("us", tz="UTC")),
            "principal": _strings(principal, self.names),
            "principal_type": _strings(principal, self.types),
            "source_ip": _strings(address, self.addresses),
            "geo_country": _strings(
                self.address_country[address], np.array(_COUNTRIES, dtype=object)
            ),
            "asn": pa.array(self.address_asn[address], pa.int64()),
            "outcome": _strings(
                failed.astype(np.int64), np.array(["success", "failure"], dtype=object)
            ),
            "failure_reason": _strings(
                failed.astype(np.int64), np.array([None, "denied"], dtype=object)
            ),
            "user_agent": _strings(agent, self.agents),
            "source_kind": pa.array(np.full(count, "public", dtype=object), pa.string()),
            "action": pa.array(np.full(count, "read", dtype=object), pa.string()),
        }
        for position, name in enumerate(
            ("cloud", "log_format", "service", "operation", "account", "region")
        ):
            values = np.array(
                [
                    cloud_name if position == 0 else _CLOUDS[cloud_name][position - 1]
                    for cloud_name in clouds
                ],
                dtype=object,
            )
            columns[name] = _strings(cloud, values)
        resource_index = cloud * _SECRETS_PER_CLOUD + secret
        every_secret = np.concatenate([self.secrets[name] for name in clouds])
        columns["resource"] = _strings(resource_index, every_secret)
        arrays = [columns.get(field.name, pa.nulls(count, field.type)) for field in ARROW_SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)
        frame = table.to_pandas(
            types_mapper={pa.string(): pd.StringDtype("pyarrow"), pa.int64(): pd.Int64Dtype()}.get
        )
        return frame


def _strings(codes: np.ndarray, values: np.ndarray) -> pa.Array:
    """Return ``values[codes]`` as an Arrow string array, cast once from a dictionary."""
    dictionary = pa.array(values, pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), dictionary).cast(pa.string())


def _secret_names(cloud: str) -> list[str]:
    if cloud == "aws":
        return [
            f"arn:aws:secretsmanager:eu-central-1:111122223333:secret:prod/app-{n:04d}/db"
            for n in range(_SECRETS_PER_CLOUD)
        ]
    if cloud == "gcp":
        return [f"projects/shop-prod/secrets/app-{n:04d}-key" for n in range(_SECRETS_PER_CLOUD)]
    return [f"https://shop.vault.azure.net/secrets/app-{n:04d}" for n in range(_SECRETS_PER_CLOUD)]
