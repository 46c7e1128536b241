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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import pandas as pd

from detectors.base import FINDING_COLUMNS, SEVERITIES, severity_rank
from pipeline.alerting.runbooks import Step, next_steps, silence_hint

__all__ = [
    "Alert",
    "Location",
    "alerts_from_findings",
    "finding_records",
    "format_time",
    "iso_utc",
    "person_wording",
    "summary_items",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

_LIST_FIELDS: Final = ("resources", "source_ips", "countries", "event_uids", "mitre")
_TIME_FIELDS: Final = ("first_seen", "last_seen")
# Evidence keys left out of the "why" list because the alert shows them elsewhere: locations in
# the "where" line, event ids in the top events and the finding's details, principal ARNs in
# the "who" line. findings.jsonl keeps them.
_SHOWN_ELSEWHERE: Final = frozenset(
    {"locations", "principal_arns", "event_uid", "event_uids", "event_uids_listed"}
)
# Maximum number of list items shown in the "why" list; the rest are counted.
_MAX_LISTED: Final = 5
_ISO_TIME_RE: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$"
)
# Key suffixes that carry a unit: ``distance_km: 10253.7`` reads ``distance: 10253.7 km``.
_UNIT_SUFFIXES: Final = (
    ("_kmh", "km/h"),
    ("_km", "km"),
    ("_seconds", "s"),
    ("_minutes", "min"),
    ("_hours", "h"),
    ("_days", "days"),
)
# Principal types that name a person, so titles use "their" instead of "its".
_PEOPLE: Final = frozenset({"user", "federated"})
# Phrases detectors write with "its" for every principal, and their form for a person.
_PERSON_PHRASES: Final = (
    ("outside its usual hours", "outside their usual hours"),
    ("unlike its own history", "unlike their own history"),
)


@dataclass(frozen=True)
class Location:
    """A source address with the place GeoIP gave it (``None`` where unknown)."""

    ip: str
    city: str | None = None
    country: str | None = None

    @property
    def place(self) -> str:
        """The place as ``City, CC``, ``CC`` or an empty string."""
        return ", ".join(part for part in (self.city, self.country) if part)

    @property
    def text(self) -> str:
        """The address with its place, such as ``Berlin, DE (198.51.100.7)``."""
        return f"{self.place} ({self.ip})" if self.place else self.ip


@dataclass(frozen=True)
class Alert:
    """One message to a person about one or more findings.

    ``findings`` contains finding dicts as returned by :func:`finding_records`. The other fields
    are derived from them by :meth:`from_findings`: lists are the sorted union over findings,
    ``severity`` is the highest, and times span all findings.

    ``principal`` joins the principals the findings name, and is empty when none names one (a
    failure burst from one address across several principals). ``principals`` lists every
    principal involved, including those only in the evidence. ``who`` is the text to show for
    the actor: the principal, or the source address and how many principals used it.
    ``locations`` lists each source address once with its city and country.
    ``top_events`` contains up to a few event dicts behind the findings, most telling first
    (see :mod:`pipeline.alerting.top_events`); it is empty until the planner fills it in.
    """

    alert_id: str
    severity: str
    title: str
    detector: str
    principal: str
    findings: list[dict[str, Any]]
    dedup_key: str
    who: str = ""
    principals: list[str] = field(default_factory=list)
    locations: list[Location] = field(default_factory=list)
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
    top_events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_findings(cls, findings: Sequence[Mapping[str, Any]]) -> Alert:
        """Build an alert from finding dicts (at least one).

        Raises:
            ValueError: if ``findings`` is empty.
        """
        if not findings:
            raise ValueError("an alert needs at least one finding; got none")
        items = [dict(finding) for finding in findings]
        for item in items:
            # NOTE: detectors write "its" for every principal; people get "their" here, in
            # the alert only (findings.jsonl keeps the detector's title).
            item["title"] = person_wording(str(item["title"]), item.get("principal_type"))
        items.sort(key=lambda f: (-severity_rank(f["severity"]), str(f["finding_id"])))
        finding_ids = sorted(str(f["finding_id"]) for f in items)
        detectors = sorted({str(f["detector"]) for f in items})
        principals = sorted({str(f["principal"]) for f in items if f.get("principal")})
        first_times = [f["first_seen"] for f in items if f.get("first_seen") is not None]
        last_times = [f["last_seen"] for f in items if f.get("last_seen") is not None]

        if len(items) == 1:
            title = str(items[0]["title"])
            dedup_key = str(items[0].get("dedup_key") or _digest("finding", *finding_ids))
        else:
            actors = ", ".join(principals) or "unnamed principals"
            title = f"{len(items)} findings from {', '.join(detectors)} for {actors}"
            keys = sorted({str(f.get("dedup_key") or f["finding_id"]) for f in items})
            # Findings that share one key (the same activity on several days) keep that key,
            # so the repeat interval treats the merged alert like each of them alone.
            dedup_key = keys[0] if len(keys) == 1 else _digest("group", *keys)

        source_ips = _union(items, "source_ips")
        involved = _involved_principals(items)
        alert = cls(
            alert_id=_digest("alert", *finding_ids),
            severity=items[0]["severity"],
            title=title,
            detector=", ".join(detectors),
            principal=", ".join(principals),
            findings=items,
            dedup_key=dedup_key,
            who=_who(principals, involved, source_ips),
            principals=involved,
            locations=_locations(items),
            resources=_union(items, "resources"),
            source_ips=source_ips,
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
        hints = sorted({silence_hint(detector, alert.principal or None) for detector in detectors})
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
    """Flatten an ``evidence`` or ``baseline`` dict into ``(label, text)`` pairs for display.

    A ``summary`` key comes first, the others keep their order. Labels are the keys with
    spaces for underscores (``distinct secrets``). A place (a dict with ``ip``, ``city`` or
    ``country``) reads ``Berlin, DE (198.51.100.7) at 2026-10-14 08:30:00 UTC``, other nested
    dicts read ``label value, label value``, lists are comma-separated (dicts in a list are
    separated by semicolons) and cut after five items with a count of the rest, and times use
    :func:`format_time`.

    Only what helps a reader is kept: values that are missing, empty or ``False`` are left
    out (also inside nested dicts), and so are event ids, principal ARNs, ``locations``
    (shown as the alert's "where") and a ``pairs`` list with one pair, which repeats ``from``
    and ``to``.
    """
    keys = [key for key in values if _worth_showing(key, values)]
    if "summary" in keys:
        keys.remove("summary")
        keys.insert(0, "summary")
    items = [_with_unit(key, values[key]) for key in keys]
    return [(key, text) for key, text in items if text]


def _with_unit(key: Any, value: Any) -> tuple[str, str]:
    """Return the label and text of a top-level value, moving a unit suffix to the number."""
    text = _display(value)
    number = isinstance(_plain(value), (int, float)) and not isinstance(_plain(value), bool)
    for suffix, unit in _UNIT_SUFFIXES:
        name = str(key)
        if number and name.endswith(suffix) and len(name) > len(suffix):
            return _label(name.removesuffix(suffix)), f"{text} {unit}"
    return _label(key), text


def person_wording(text: str, principal_type: Any) -> str:
    """Replace "its" with "their" in the known detector phrases when a person is meant."""
    if principal_type not in _PEOPLE:
        return text
    for workload, person in _PERSON_PHRASES:
        text = text.replace(workload, person)
    return text


def _label(key: Any) -> str:
    return "summary" if key == "summary" else str(key).replace("_", " ")


def _hidden_key(key: Any) -> bool:
    name = str(key)
    return name in _SHOWN_ELSEWHERE or name.endswith(("_uid", "_uids"))


def _worth_showing(key: Any, values: Mapping[str, Any]) -> bool:
    value = _plain(values[key])
    if _hidden_key(key) or _is_empty(value):
        return False
    if key == "pairs" and isinstance(value, list) and len(value) == 1:
        return not ("from" in values and "to" in values)
    return True


def _is_empty(value: Any) -> bool:
    value = _plain(value)
    if value is None or value is False or value == "":
        return True
    return isinstance(value, (Mapping, list, tuple, set, frozenset)) and len(value) == 0


def _display(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        if any(key in value for key in ("ip", "city", "country")):
            return _place(value)
        pairs = [
            (_label(key), _display(item))
            for key, item in value.items()
            if not _hidden_key(key) and not _is_empty(item)
        ]
        return ", ".join(f"{label} {text}" for label, text in pairs if text)
    if isinstance(value, (list, tuple, set, frozenset)):
        texts = [text for text in (_display(item) for item in value) if text]
        separator = "; " if any(isinstance(_plain(item), Mapping) for item in value) else ", "
        listed = separator.join(texts[:_MAX_LISTED])
        if len(texts) > _MAX_LISTED:
            listed += f" and {len(texts) - _MAX_LISTED} more"
        return listed
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else ""
    if isinstance(value, str) and _ISO_TIME_RE.match(value):
        return format_time(_utc_datetime(value))
    return str(value)


def _place(value: Mapping[str, Any]) -> str:
    """Show a location dict as ``City, CC (ip)``, followed by ``at <time>`` when it has one."""
    where = ", ".join(str(value[key]) for key in ("city", "country") if value.get(key))
    ip = value.get("ip")
    if ip:
        where = f"{where} ({ip})" if where else str(ip)
    time = _display(value.get("time"))
    return f"{where} at {time}" if time else where


def _involved_principals(items: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return the principals the findings name, plus those listed in their evidence."""
    names: set[str] = set()
    for item in items:
        if item.get("principal"):
            names.add(str(item["principal"]))
        listed = _plain((item.get("evidence") or {}).get("principals"))
        if isinstance(listed, list):
            names.update(str(name) for name in listed if name)
    return sorted(names)


def _who(principals: Sequence[str], involved: Sequence[str], source_ips: Sequence[str]) -> str:
    if principals:
        return ", ".join(principals)
    address = ", ".join(source_ips) or "an unknown address"
    if not involved:
        return f"unknown principal from {address}"
    count = len(involved)
    return f"{count} principal{'s' if count != 1 else ''} from {address}"


def _locations(items: Iterable[Mapping[str, Any]]) -> list[Location]:
    """Pair each source address with its city and country.

    The places come from the evidence: a ``locations`` list, or the ``from``/``to`` places and
    ``pairs`` of impossible travel. An address without a place there gets the finding's
    country when the finding has exactly one country, and no place otherwise.
    """
    found: dict[str, Location] = {}

    def add(place: Any) -> None:
        place = _plain(place)
        if not isinstance(place, Mapping) or not place.get("ip"):
            return
        ip = str(place["ip"])
        city = str(place["city"]) if place.get("city") else None
        country = str(place["country"]) if place.get("country") else None
        known = found.get(ip)
        if known is None or (not known.place and (city or country)):
            found[ip] = Location(ip, city, country)

    for item in items:
        evidence = item.get("evidence") or {}
        places = [*(_plain(evidence.get("locations")) or [])]
        places += [evidence.get("from"), evidence.get("to")]
        for pair in _plain(evidence.get("pairs")) or []:
            if isinstance(pair, Mapping):
                places += [pair.get("from"), pair.get("to")]
        for place in places:
            add(place)
        countries = [str(country) for country in item.get("countries") or []]
        only_country = countries[0] if len(countries) == 1 else None
        for ip in item.get("source_ips") or []:
            add({"ip": ip, "country": only_country})
    return list(found.values())


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
