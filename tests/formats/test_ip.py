"""Tests of caller-address classification: one logged address to ``source_ip`` and ``source_kind``."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.formats.ip import classify_address, classify_addresses

CASES = [
    ("52.94.76.10", ("52.94.76.10", "public")),
    ("10.4.5.6", ("10.4.5.6", "private")),
    ("127.0.0.1", ("127.0.0.1", "private")),
    ("100.64.1.2", ("100.64.1.2", "private")),
    ("2600:1f18:4b3:ef00::1", ("2600:1f18:4b3:ef00::1", "public")),
    ("2600:1F18:04B3:EF00:0:0:0:1", ("2600:1f18:4b3:ef00::1", "public")),
    ("fd12:3456::7", ("fd12:3456::7", "private")),
    ("[2600:1f18:4b3:ef00::1]:443", ("2600:1f18:4b3:ef00::1", "public")),
    ("[fd12:3456::7]", ("fd12:3456::7", "private")),
    ("52.94.76.10:8443", ("52.94.76.10", "public")),
    ("::ffff:52.94.76.10", ("52.94.76.10", "public")),
    ("::ffff:10.0.0.9", ("10.0.0.9", "private")),
    ("fe80::1%eth0", ("fe80::1", "private")),
    ("secretsmanager.amazonaws.com", (None, "cloud_service")),
    ("SSM.AMAZONAWS.COM.", (None, "cloud_service")),
    ("secretmanager.googleapis.com", (None, "cloud_service")),
    ("AWS Internal", (None, "internal")),
    ("private", (None, "internal")),
    ("gce-internal-ip", (None, "internal")),
    ("225.01.00.16", (None, "invalid")),
    ("253.201.144.253", (None, "invalid")),
    ("224.0.0.251", (None, "invalid")),
    ("0.0.0.0", (None, "invalid")),
    ("::", (None, "invalid")),
    ("999.1.1.1", (None, "invalid")),
    ("build-agent.example.com", (None, "invalid")),
    ("not an address", (None, "invalid")),
    ("amazonaws.com.attacker.net", (None, "invalid")),
    ("", (None, "missing")),
    ("   ", (None, "missing")),
    ("-", (None, "missing")),
    (None, (None, "missing")),
]


@pytest.mark.parametrize(("raw", "expected"), CASES, ids=[repr(raw) for raw, _ in CASES])
def test_classify_address_table(raw: str | None, expected: tuple[str | None, str]) -> None:
    assert classify_address(raw) == expected


def test_classify_address_strips_whitespace() -> None:
    assert classify_address(" 52.94.76.10\n") == ("52.94.76.10", "public")


def test_classify_addresses_aligned_with_nulls() -> None:
    raw = pd.Series(
        ["52.94.76.10", None, "AWS Internal", "52.94.76.10", "10.0.0.1:5000", None],
        index=[10, 11, 12, 13, 14, 15],
        dtype=pd.StringDtype("pyarrow"),
    )
    classified = classify_addresses(raw)
    assert list(classified.index) == [10, 11, 12, 13, 14, 15]
    assert list(classified.columns) == ["source_ip", "source_kind"]
    assert classified["source_ip"].tolist() == [
        "52.94.76.10",
        pd.NA,
        pd.NA,
        "52.94.76.10",
        "10.0.0.1",
        pd.NA,
    ]
    assert classified["source_kind"].tolist() == [
        "public",
        "missing",
        "internal",
        "public",
        "private",
        "missing",
    ]
    assert classified["source_ip"].dtype == pd.StringDtype("pyarrow")
    assert classified["source_kind"].dtype == pd.StringDtype("pyarrow")


def test_classify_addresses_object_series() -> None:
    raw = pd.Series([None, "gce-internal-ip", "2600:1f18::5"], dtype=object)
    classified = classify_addresses(raw)
    assert classified["source_kind"].tolist() == ["missing", "internal", "public"]
    assert classified["source_ip"].tolist() == [pd.NA, pd.NA, "2600:1f18::5"]


def test_classify_addresses_empty() -> None:
    classified = classify_addresses(pd.Series([], dtype=pd.StringDtype("pyarrow")))
    assert len(classified) == 0
    assert list(classified.columns) == ["source_ip", "source_kind"]
