"""Alerts: what a person receives, built from one or more findings.

This version makes one alert per finding (:func:`alerts_from_findings`). An :class:`Alert`
still carries a list of findings and derives its summary fields from all of them, so that
grouping findings by detector and principal can reuse the alert and its templates unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import pandas as pd

from detectors.base import FINDING_COLUMNS, SEVERITIES, severity_rank
from pipeline.alerting.runbooks import Step, next_steps, silence_hint

__all__ = [
    "Alert",
    "alerts_from_findings",
    "finding_records",
    "format_time",
    "iso_utc",
    "summary_items",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

_LIST_FIELDS: Final = ("resources", "source_ips", "countries", "event_uids", "mitre")
_TIME_FIELDS: Final = ("first_seen", "last_seen")


@dataclass(frozen=True)
class Alert:
    """One message to a person about one or more findings.

    ``findings`` contains finding dicts as returned by :func:`finding_records`. The other fields
    are derived from them by :meth:`from_findings`: lists are the sorted union over findings,
    ``severity`` is the highest, and times span all findings.
    """

    alert_id: str
    severity: str
    title: str
    detector: str
    principal: str
    findings: list[dict[str, Any]]
    dedup_key: str
    resources: list[str] = field(default_factory=list)
    source_ips: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    clouds: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    mitre: list[str] = field(default_factory=list)
    geoip_build_dates: list[str] = field(default_factory=list)
    first_seen: dt.datetime | None = None
    last_seen: dt.datetime | None = None
    event_count: int = 0
    next_steps: list[Step] = field(default_factory=list)
    silence_hint: str = ""

    @classmethod
    def from_findings(cls, findings: Sequence[Mapping[str, Any]]) -> Alert:
        """Build an alert from finding dicts (at least one).

        Raises:
            ValueError: if ``findings`` is empty.
        """
        if not findings:
            raise ValueError("an alert needs at least one finding; got none")
        items = [dict(finding) for finding in findings]
        items.sort(key=lambda f: (-severity_rank(f["severity"]), str(f["finding_id"])))
        finding_ids = sorted(str(f["finding_id"]) for f in items)
        detectors = sorted({str(f["detector"]) for f in items})
        principals = sorted({str(f["principal"]) for f in items})
        first_times = [f["first_seen"] for f in items if f.get("first_seen") is not None]
        last_times = [f["last_seen"] for f in items if f.get("last_seen") is not None]

        if len(items) == 1:
            title = str(items[0]["title"])
            dedup_key = str(items[0].get("dedup_key") or _digest("finding", *finding_ids))
        else:
            title = f"{len(items)} findings from {', '.join(detectors)} for {', '.join(principals)}"
            keys = sorted({str(f.get("dedup_key") or f["finding_id"]) for f in items})
            dedup_key = _digest("group", *keys)

        alert = cls(
            alert_id=_digest("alert", *finding_ids),
            severity=items[0]["severity"],
            title=title,
            detector=", ".join(detectors),
            principal=", ".join(principals),
            findings=items,
            dedup_key=dedup_key,
            resources=_union(items, "resources"),
            source_ips=_union(items, "source_ips"),
            countries=_union(items, "countries"),
            clouds=_distinct(items, "cloud"),
            accounts=_distinct(items, "account"),
            mitre=_union(items, "mitre"),
            geoip_build_dates=_distinct(items, "geoip_build_date"),
            first_seen=min(first_times) if first_times else None,
            last_seen=max(last_times) if last_times else None,
            event_count=sum(int(f.get("event_count") or 0) for f in items),
        )
        steps = next_steps(alert)
        hints = sorted({silence_hint(detector) for detector in detectors})
        return replace(alert, next_steps=steps, silence_hint=" ".join(hints))


def alerts_from_findings(findings: pd.DataFrame) -> list[Alert]:
    """Make one alert per finding, ordered by severity (highest first), then by alert id."""
    alerts = [Alert.from_findings([record]) for record in finding_records(findings)]
    alerts.sort(key=lambda a: (-severity_rank(a.severity), a.alert_id))
    logger.debug("built %s alerts from %s findings", len(alerts), len(findings))
    return alerts


def finding_records(findings: pd.DataFrame) -> list[dict[str, Any]]:
    """Convert a findings frame to plain Python dicts, one per row.

    Missing values become ``None``, list columns become lists of strings, ``evidence`` and
    ``baseline`` become dicts, and times become timezone-aware UTC datetimes.

    Raises:
        ValueError: if a column of :data:`detectors.base.FINDING_COLUMNS` is missing or a
            severity is not one of :data:`detectors.base.SEVERITIES`.
    """
    missing = [name for name in FINDING_COLUMNS if name not in findings.columns]
    if missing:
        raise ValueError(f"findings frame is missing columns {missing}; expected {FINDING_COLUMNS}")
    records = []
    for row in findings[list(FINDING_COLUMNS)].to_dict(orient="records"):
        record = {str(key): _plain(value) for key, value in row.items()}
        for name in _LIST_FIELDS:
            record[name] = [str(item) for item in record[name] or [] if item is not None]
        for name in ("evidence", "baseline"):
            value = record[name]
            record[name] = dict(value) if isinstance(value, Mapping) else {}
        for name in _TIME_FIELDS:
            record[name] = _utc_datetime(record[name])
        if record["severity"] not in SEVERITIES:
            raise ValueError(
                f"finding {record['finding_id']}: invalid severity {record['severity']!r}; "
                f"expected one of {SEVERITIES}"
            )
        record["event_count"] = int(record["event_count"] or 0)
        records.append(record)
    return records


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` to types :func:`json.dumps` accepts without loss of meaning.

    Datetimes become ISO 8601 UTC strings ending in ``Z``, NumPy scalars and arrays become
    Python numbers and lists, sets become sorted lists, and NaN, NaT and ``pd.NA`` become
    ``None``.
    """
    value = _plain(value)
    if isinstance(value, dt.datetime):
        return iso_utc(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(item) for item in value), key=str)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def iso_utc(value: dt.datetime) -> str:
    """Format a datetime as ISO 8601 in UTC with a ``Z`` suffix (naive values count as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    text = value.astimezone(dt.UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def format_time(value: dt.datetime | None) -> str:
    """Format a datetime for people: ``2026-10-10 01:12:05 UTC`` (empty for ``None``)."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary_items(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten an ``evidence`` or ``baseline`` dict into ``(key, text)`` pairs for display.

    A ``summary`` key comes first, the others keep their order. Nested dicts become
    ``key=value`` lists, lists become comma-separated text, and times use :func:`format_time`.
    """
    keys = list(values)
    if "summary" in values:
        keys.remove("summary")
        keys.insert(0, "summary")
    return [(str(key), _display(values[key])) for key in keys]


def _display(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={_display(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_display(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else ""
    return str(value)


def _plain(value: Any) -> Any:
    """Turn pandas and NumPy values into plain Python ones (missing values into ``None``)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _utc_datetime(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    result: dt.datetime = stamp.to_pydatetime()
    return result


def _union(items: Iterable[Mapping[str, Any]], name: str) -> list[str]:
    return sorted({str(value) for item in items for value in item.get(name) or []})


def _distinct(items: Iterable[Mapping[str, Any]], name: str) -> list[str]:
    return sorted({str(item[name]) for item in items if item.get(name) not in (None, "")})


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]
