"""Caller addresses as the clouds log them, turned into ``source_ip`` and ``source_kind``.

Audit logs put many things in the caller-address field: IPv4 and IPv6 addresses, either with a
port, IPv6 zone ids, IPv4-mapped IPv6, provider hostnames (``secretsmanager.amazonaws.com``),
keywords (``AWS Internal``, ``private``, ``gce-internal-ip``) and invalid strings. Only valid
addresses reach ``source_ip``; the raw value is kept in ``source_raw`` by the formats.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import numpy as np
import pandas as pd

__all__ = ["classify_address", "classify_addresses"]

_INTERNAL_KEYWORDS = frozenset({"aws internal", "private", "gce-internal-ip", "internal"})
_SERVICE_SUFFIXES = (
    ".amazonaws.com",
    ".amazonaws.com.cn",
    ".googleapis.com",
    ".google.com",
    ".azure.com",
    ".windows.net",
    ".microsoft.com",
)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", re.I)
_BRACKETED = re.compile(r"^\[(?P<host>[^\]]+)\](:\d{1,5})?$")
_V4_WITH_PORT = re.compile(r"^(?P<host>\d{1,3}(\.\d{1,3}){3}):\d{1,5}$")
_CLASS_E = ipaddress.ip_network("240.0.0.0/4")


@lru_cache(maxsize=65_536)
def classify_address(raw: str | None) -> tuple[str | None, str]:
    """Return ``(source_ip, source_kind)`` for one logged caller address.

    ``source_kind`` is one of ``public``, ``private``, ``cloud_service``, ``internal``,
    ``invalid`` or ``missing``; ``source_ip`` is a canonical address string for ``public`` and
    ``private`` and None otherwise. Class E (240.0.0.0/4), multicast, unspecified and
    zero-padded addresses are ``invalid``: they cannot be a real caller.
    """
    if raw is None:
        return None, "missing"
    text = str(raw).strip()
    if not text or text in {"-", "null", "None"}:
        return None, "missing"
    if text.lower() in _INTERNAL_KEYWORDS:
        return None, "internal"

    host = text
    bracketed = _BRACKETED.match(host)
    if bracketed:
        host = bracketed.group("host")
    else:
        with_port = _V4_WITH_PORT.match(host)
        if with_port:
            host = with_port.group("host")
    host = host.split("%", 1)[0]  # IPv6 zone id, meaningless off the host that logged it

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        lowered = text.lower().rstrip(".")
        if _HOSTNAME.match(lowered) and lowered.endswith(_SERVICE_SUFFIXES):
            return None, "cloud_service"
        return None, "invalid"

    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified:
        return None, "invalid"
    if isinstance(address, ipaddress.IPv4Address) and address in _CLASS_E:
        return None, "invalid"
    if address.is_global:
        return str(address), "public"
    return str(address), "private"


def classify_addresses(raw: pd.Series) -> pd.DataFrame:
    """Classify a column of raw addresses, once per distinct value.

    Returns a frame with ``source_ip`` and ``source_kind`` aligned to ``raw``'s index.
    """
    codes, uniques = pd.factorize(raw, use_na_sentinel=True)
    classified = [classify_address(None if pd.isna(value) else str(value)) for value in uniques]
    # factorize marks nulls with -1, which indexes the trailing "missing" entry added here.
    ips = np.array([ip for ip, _ in classified] + [None], dtype=object)
    kinds = np.array([kind for _, kind in classified] + ["missing"], dtype=object)
    string = pd.StringDtype("pyarrow")
    return pd.DataFrame(
        {
            "source_ip": pd.array(ips[codes], dtype=string),
            "source_kind": pd.array(kinds[codes], dtype=string),
        },
        index=raw.index,
    )
