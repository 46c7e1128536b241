"""Enrichment of events frames: GeoIP location and autonomous system of caller addresses."""

from pipeline.enrich.geoip import (
    EMBEDDED_ATTRIBUTION,
    GEO_COLUMNS,
    EnrichInfo,
    GeoIP,
    GeoIPSettings,
    embedded_city_db,
    enrich_events,
)

__all__ = [
    "EMBEDDED_ATTRIBUTION",
    "GEO_COLUMNS",
    "EnrichInfo",
    "GeoIP",
    "GeoIPSettings",
    "embedded_city_db",
    "enrich_events",
]
