"""Top events: the few events behind an alert that show a reader what happened.

Findings carry only ``event_uids``, so the engine hands the run's window of events to alert
planning, and :func:`with_top_events` copies up to ``limit`` event rows into each alert. The
rows travel in the outbox payload, so a delivery retried by a later run still shows them.

The most telling events come first. Repeats of one (operation, secret, address, outcome,
user agent) are dropped, keeping the earliest. Then events are picked one at a time: a
failure before a success, then the event that adds the most secrets and addresses not shown
yet, then the earlier one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd

from pipeline.alerting.alerts import Alert

__all__ = [
    "DEFAULT_TOP_EVENTS",
    "MAX_TOP_EVENTS",
    "MAX_USER_AGENT_CHARS",
    "TOP_EVENT_FIELDS",
    "select_top_events",
    "top_events_from_payload",
    "with_top_events",
]

logger = logging.getLogger(__name__)

DEFAULT_TOP_EVENTS: Final = 5
MAX_TOP_EVENTS: Final = 20
"""Upper bound of ``alerting.top_events``; more rows would crowd the Slack message."""

MAX_USER_AGENT_CHARS: Final = 100
"""User agents longer than this are cut and end with "…"; a full one is in the history."""

TOP_EVENT_FIELDS: Final = (
    "event_uid",
    "time",
    "operation",
    "resource",
    "source_ip",
    "country",
    "user_agent",
    "outcome",
    "error_code",
    "principal",
)
"""Keys of each top event dict. ``time`` is a UTC datetime (ISO 8601 text in payloads),
``country`` the GeoIP country code, and missing values are ``None``."""

# Event column -> top event key, for the columns that are renamed.
_RENAMED: Final = {"geo_country": "country"}
_REPEAT_KEY: Final = ("operation", "resource", "source_ip", "outcome", "user_agent")


def with_top_events(
    alerts_by_receiver: Sequence[tuple[str, list[Alert]]],
    events: pd.DataFrame | None,
    limit: int = DEFAULT_TOP_EVENTS,
) -> list[tuple[str, list[Alert]]]:
    """Return the ``(receiver, alerts)`` pairs with each alert's ``top_events`` filled in.

    ``events`` is the run's window in the event schema. The events of all alerts are looked up
    in one pass, so the cost grows with the window once, not once per alert. An alert whose
    events are not in ``events`` (for example events read by an earlier run) keeps an empty
    list, and so does every alert when ``events`` is None or ``limit`` is 0.
    """
    if events is None or events.empty or limit <= 0:
        return [(receiver, list(alerts)) for receiver, alerts in alerts_by_receiver]
    needed: set[str] = set()
    for _, alerts in alerts_by_receiver:
        for alert in alerts:
            needed.update(_uids(alert))
    relevant = events[events["event_uid"].isin(needed).to_numpy(dtype=bool)]
    by_uid = relevant.set_index("event_uid", drop=False).sort_index()

    chosen: dict[str, list[dict[str, Any]]] = {}
    result = []
    for receiver, alerts in alerts_by_receiver:
        filled = []
        for alert in alerts:
            if alert.alert_id not in chosen:
                rows = _alert_rows(by_uid, alert)
                chosen[alert.alert_id] = select_top_events(rows, limit)
            filled.append(dataclasses.replace(alert, top_events=chosen[alert.alert_id]))
        result.append((receiver, filled))
    logger.debug("top events chosen for %s alerts from %s events", len(chosen), len(relevant))
    return result


def select_top_events(rows: pd.DataFrame, limit: int = DEFAULT_TOP_EVENTS) -> list[dict[str, Any]]:
    """Pick up to ``limit`` rows of ``rows`` (event schema), most telling first.

    See the module docstring for the order. Returns dicts with :data:`TOP_EVENT_FIELDS`.
    """
    if rows.empty or limit <= 0:
        return []
    frame = rows.sort_values(["time", "event_uid"], kind="stable")
    frame = frame.drop_duplicates(subset=list(_REPEAT_KEY), keep="first").reset_index(drop=True)

    # Greedy choice over arrays, so a window of many events costs a few vector passes. The
    # score is 3 for a failure plus 1 per secret and per address not listed yet; argmax takes
    # the first (earliest) row of the highest score.
    failure = (frame["outcome"] == "failure").fillna(False).to_numpy(dtype=bool)
    resource_codes, resource_values = pd.factorize(frame["resource"], use_na_sentinel=False)
    address_codes, address_values = pd.factorize(frame["source_ip"], use_na_sentinel=False)
    resource_listed = np.zeros(len(resource_values), dtype=bool)
    address_listed = np.zeros(len(address_values), dtype=bool)
    available = np.ones(len(frame), dtype=bool)
    chosen: list[int] = []
    while len(chosen) < min(limit, len(frame)):
        score = 3 * failure.astype(np.int64)
        score += ~resource_listed[resource_codes]
        score += ~address_listed[address_codes]
        score[~available] = -1
        best = int(np.argmax(score))
        chosen.append(best)
        available[best] = False
        resource_listed[resource_codes[best]] = True
        address_listed[address_codes[best]] = True
    records = frame.iloc[chosen].to_dict(orient="records")
    return [_event_dict(record) for record in records]


def top_events_from_payload(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild top events stored as JSON: ``time`` is parsed back to a UTC datetime."""
    events = []
    for item in items:
        event = {name: item.get(name) for name in TOP_EVENT_FIELDS}
        if event["time"]:
            event["time"] = pd.Timestamp(event["time"]).tz_convert(dt.UTC).to_pydatetime()
        events.append(event)
    return events


def _uids(alert: Alert) -> list[str]:
    return [str(uid) for finding in alert.findings for uid in finding.get("event_uids") or []]


def _alert_rows(by_uid: pd.DataFrame, alert: Alert) -> pd.DataFrame:
    """Return the event rows of ``alert``: its events, on the secrets its findings name.

    One event that touched several secrets has one row per secret, so rows on secrets the
    findings do not name are left out, unless that would leave none.
    """
    uids = by_uid.index.intersection(pd.Index(sorted(set(_uids(alert)))))
    rows = by_uid.loc[uids]
    if alert.resources and not rows.empty:
        named = rows["resource"].isin(alert.resources).to_numpy(dtype=bool)
        if named.any():
            rows = rows[named]
    return rows.reset_index(drop=True)


def _event_dict(record: Mapping[Any, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for column in ("event_uid", "time", "operation", "resource", "source_ip", "geo_country"):
        event[_RENAMED.get(column, column)] = _plain(record.get(column))
    for column in ("user_agent", "outcome", "error_code", "principal"):
        event[column] = _plain(record.get(column))
    if isinstance(event["time"], pd.Timestamp):
        event["time"] = event["time"].to_pydatetime()
    agent = event["user_agent"]
    if isinstance(agent, str) and len(agent) > MAX_USER_AGENT_CHARS:
        event["user_agent"] = agent[: MAX_USER_AGENT_CHARS - 1] + "…"
    return {name: event[name] for name in TOP_EVENT_FIELDS}


def _plain(value: Any) -> Any:
    """Return ``value`` with pandas' missing markers (NA, NaT, NaN) as None."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        return value
    return value
