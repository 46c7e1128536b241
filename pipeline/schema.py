"""The event schema: one row per secret touched, the same columns for every cloud.

Field meaning follows OCSF API Activity (class 6003) where OCSF has a home for it. Names are
short and flat so analysts can type them. Strings use pandas' Arrow-backed string dtype, times
are ``datetime64[us, UTC]``, and :data:`ARROW_SCHEMA` is the declared Parquet schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "ACTIONS",
    "ARROW_SCHEMA",
    "CLOUDS",
    "COLUMNS",
    "FAILURE_REASONS",
    "HUMAN_PRINCIPAL_TYPES",
    "OUTCOMES",
    "PRINCIPAL_TYPES",
    "SOURCE_KINDS",
    "check_events",
    "empty_events",
    "events_from_rows",
    "parse_times",
]

CLOUDS: Final = ("aws", "gcp", "azure")
ACTIONS: Final = (
    "read",
    "list",
    "describe",
    "write",
    "delete",
    "rotate",
    "decrypt",
    "policy",
    "other",
)
OUTCOMES: Final = ("success", "failure", "unknown")
FAILURE_REASONS: Final = ("denied", "not_found", "throttled", "invalid", "error")
PRINCIPAL_TYPES: Final = (
    "user",
    "role",
    "service_account",
    "service",
    "federated",
    "root",
    "application",
    "managed_identity",
    "anonymous",
    "unknown",
)
# Principal types that stand for a person rather than a workload.
HUMAN_PRINCIPAL_TYPES: Final = frozenset({"user", "federated", "root"})
SOURCE_KINDS: Final = ("public", "private", "cloud_service", "internal", "invalid", "missing")

_STRING = pa.string()
_TIME = pa.timestamp("us", tz="UTC")

# Column name -> Arrow type, in display order.
COLUMNS: Final[dict[str, pa.DataType]] = {
    "event_uid": _STRING,
    "time": _TIME,
    "cloud": _STRING,
    "log_format": _STRING,
    "service": _STRING,
    "operation": _STRING,
    "action": _STRING,
    "outcome": _STRING,
    "failure_reason": _STRING,
    "error_code": _STRING,
    "error_message": _STRING,
    "principal": _STRING,
    "principal_type": _STRING,
    "principal_arn": _STRING,
    "principal_id": _STRING,
    "session_name": _STRING,
    "invoked_by": _STRING,
    "account": _STRING,
    "region": _STRING,
    "resource": _STRING,
    "resource_version": _STRING,
    "source_ip": _STRING,
    "source_kind": _STRING,
    "source_raw": _STRING,
    "user_agent": _STRING,
    "geo_country": _STRING,
    "geo_city": _STRING,
    "geo_lat": pa.float64(),
    "geo_lon": pa.float64(),
    "asn": pa.int64(),
    "as_org": _STRING,
    "origin": _STRING,
}
"""Every column of the events frame. ``invoked_by`` names the AWS service (for example
``secretsmanager.amazonaws.com``) that made the call on the principal's behalf, so a KMS Decrypt
done by Secrets Manager is not counted as a second read by a person."""

ARROW_SCHEMA: Final = pa.schema([pa.field(name, kind) for name, kind in COLUMNS.items()])

_STRING_DTYPE = pd.StringDtype("pyarrow")
_PANDAS_DTYPES: Final[dict[str, Any]] = {
    name: (
        "datetime64[us, UTC]"
        if kind == _TIME
        else "float64"
        if kind == pa.float64()
        else "Int64"
        if kind == pa.int64()
        else _STRING_DTYPE
    )
    for name, kind in COLUMNS.items()
}


def empty_events() -> pd.DataFrame:
    """Return an events frame with every column and no rows."""
    return pd.DataFrame(
        {name: pd.Series([], dtype=dtype) for name, dtype in _PANDAS_DTYPES.items()}
    )


def parse_times(values: Iterable[Any]) -> tuple[pd.Series, np.ndarray]:
    """Parse timestamps as the clouds write them into UTC, vectorized.

    Accepts ISO 8601 with ``T`` or a space between date and time, 0 to 9 fractional digits
    (truncated to microseconds), ``Z``, a numeric offset, or no zone (read as UTC).

    Returns:
        The parsed times as ``datetime64[us, UTC]`` and a boolean array that is True where a
        value was present but could not be parsed.
    """
    raw = pd.Series(list(values), dtype=_STRING_DTYPE)
    text = raw.str.strip().str.replace(" ", "T", n=1, regex=False)
    # Keep at most 6 fractional digits: pandas and Arrow stop at microseconds here.
    text = text.str.replace(r"(\.\d{6})\d+", r"\1", regex=True)
    parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    parsed = parsed.astype("datetime64[us, UTC]")
    invalid = (parsed.isna() & raw.notna()).to_numpy(dtype=bool)
    return parsed, invalid


def events_from_rows(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a typed events frame from row dictionaries.

    Missing keys become nulls. ``time`` may be a string (parsed with :func:`parse_times`) or a
    datetime. Raises ``ValueError`` when a time cannot be parsed, because formats are expected
    to quarantine such records before building rows.
    """
    rows = list(rows)
    if not rows:
        return empty_events()
    data: dict[str, Any] = {}
    for name, dtype in _PANDAS_DTYPES.items():
        column = [row.get(name) for row in rows]
        if name == "time":
            times, invalid = parse_times(column)
            if invalid.any():
                first = int(np.flatnonzero(invalid)[0])
                raise ValueError(
                    f"invalid time {column[first]!r} in row from {rows[first].get('origin')}"
                )
            data[name] = times
        else:
            data[name] = pd.Series(column, dtype=dtype)
    return pd.DataFrame(data)


def check_events(frame: pd.DataFrame) -> list[str]:
    """Return the problems that keep ``frame`` from being a valid events frame (empty if none)."""
    problems = []
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    for name, expected in (
        ("cloud", CLOUDS),
        ("action", ACTIONS),
        ("outcome", OUTCOMES),
        ("failure_reason", FAILURE_REASONS),
        ("principal_type", PRINCIPAL_TYPES),
        ("source_kind", SOURCE_KINDS),
    ):
        if name not in frame.columns:
            continue
        values = frame[name].dropna()
        unknown = sorted(set(values) - set(expected))
        if unknown:
            problems.append(
                f"column {name}: unexpected values {unknown}; expected one of {expected}"
            )
    if "time" in frame.columns and str(frame["time"].dtype) != "datetime64[us, UTC]":
        problems.append(f"column time: dtype {frame['time'].dtype}, expected datetime64[us, UTC]")
    if "event_uid" in frame.columns and frame["event_uid"].isna().any():
        problems.append("column event_uid: null values")
    return problems
