"""Allow-lists, routes and grouping: which findings become which alerts for which receiver.

The vocabulary follows Prometheus Alertmanager. An allow-list entry removes expected findings
before routing (with a required reason, an optional owner and an optional expiry). A route
matches findings by label and sends them to a named receiver; the first matching route wins
unless it sets ``continue: true``. ``group_by`` bundles the findings a receiver gets into
alerts.

Configuration shape (YAML)::

    allow_list:
      - detectors: [keytrail.off_hours]
        principals: ["arn:aws:sts::123456789012:assumed-role/Deploy/*"]
        cidrs: [10.20.0.0/16]
        reason: nightly deploy job reads the database secret
        owner: platform@example.com
        expires: 2027-01-31T00:00:00Z
    routing:
      default_receiver: security-team
      group_by: [detector, principal]
      routes:
        - match: {severity_at_least: high}
          receiver: pager
          continue: true
        - match: {cloud: [gcp, azure], detector: keytrail.off_hours}
          receiver: cloud-team
          group_by: [detector, account]
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import logging
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Annotated, Any, Final

import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from detectors.base import SEVERITIES, severity_rank
from pipeline.alerting.alerts import Alert, finding_records

__all__ = [
    "ALLOWED_BY",
    "EACH_FINDING",
    "GROUP_LABELS",
    "MATCH_LABELS",
    "AllowEntry",
    "Route",
    "RoutingSettings",
    "apply_allow_list",
    "expired_entries",
    "expired_warning",
    "group_alerts",
    "merge_same_dedup_key",
    "route",
    "route_alerts",
]

logger = logging.getLogger(__name__)

ALLOWED_BY: Final = "allowed_by"
"""Column added to the removed findings: ``entry <index>: <reason>`` of the first entry that
matched, where ``<index>`` is the entry's 0-based position in the allow-list."""

MATCH_LABELS: Final = (
    "detector",
    "severity",
    "cloud",
    "account",
    "principal_type",
    "severity_at_least",
)
"""Labels a route's ``match`` accepts. All but ``severity_at_least`` compare a finding column
with one value or a list of values; ``severity_at_least`` takes one severity."""

GROUP_LABELS: Final = (
    "detector",
    "severity",
    "principal",
    "principal_type",
    "cloud",
    "account",
    "dedup_key",
)
"""Finding columns ``group_by`` accepts. ``["..."]`` puts every finding in its own alert and
``[]`` puts all findings of a receiver in one alert, as in Alertmanager."""

EACH_FINDING: Final = "..."
_DEFAULT_GROUP_BY: Final = ("detector", "principal")

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- allow-lists -------------------------------------------------------------------------------


class AllowEntry(_Strict):
    """One allow-list entry: findings it matches are removed before routing.

    A finding matches when its detector is in ``detectors`` and every condition that is set
    is true (at least one must be set):

    - ``principals``: the finding's principal matches one of the globs (``fnmatch``, case
      sensitive). A finding without a principal (a failure burst from one address across
      several principals) never matches.
    - ``cidrs``: every address in ``source_ips`` lies inside one of the networks. A finding
      without addresses never matches.
    - ``user_agents``: every user agent in the finding's ``evidence.user_agents`` matches one
      of the globs. Only detectors that put ``user_agents`` in their evidence can match, so an
      entry with this condition removes nothing from the others.
    - ``accounts``: the finding's account (AWS account id, GCP project, Azure subscription) is
      one of these, compared exactly.

    ``expires`` is an ISO 8601 time; a value without a zone counts as UTC. The entry covers
    activity before that moment: it removes a finding whose events all lie before ``expires``,
    even when the events are read later (late delivery, a backfill, a replay), and never one
    with an event at or after it. Once the run time passes ``expires``,
    :func:`expired_entries` lists the entry so the config can be cleaned up.
    """

    detectors: list[NonEmptyText] = Field(min_length=1)
    principals: list[NonEmptyText] | None = None
    cidrs: list[IPNetwork] | None = None
    user_agents: list[NonEmptyText] | None = None
    accounts: list[NonEmptyText] | None = None
    reason: NonEmptyText
    owner: NonEmptyText | None = None
    expires: dt.datetime | None = None

    @field_validator("cidrs", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                networks.append(ipaddress.ip_network(str(item), strict=True))
            except ValueError as error:
                raise ValueError(
                    f"invalid CIDR {item!r} ({error}); expected a network such as "
                    "10.0.0.0/8 or 2001:db8::/32 with no host bits set"
                ) from None
        return networks

    @field_validator("expires")
    @classmethod
    def _expires_utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        return None if value is None else _utc(value)

    @model_validator(mode="after")
    def _needs_condition(self) -> AllowEntry:
        conditions = (self.principals, self.cidrs, self.user_agents, self.accounts)
        if all(condition is None for condition in conditions):
            raise ValueError(
                "an allow-list entry needs at least one of principals, cidrs, user_agents, "
                "accounts; without one it would remove every finding of its detectors"
            )
        return self

    def is_expired(self, now: dt.datetime) -> bool:
        """Return whether the entry has expired at ``now`` (a naive ``now`` counts as UTC)."""
        return self.expires is not None and self.expires <= _utc(now)


def expired_entries(
    entries: Sequence[AllowEntry], now: dt.datetime
) -> list[tuple[int, AllowEntry]]:
    """List the expired entries with their 0-based positions, for the run summary."""
    return [(index, entry) for index, entry in enumerate(entries) if entry.is_expired(now)]


def expired_warning(expired: Sequence[tuple[int, AllowEntry]]) -> str:
    """Describe expired entries, named by index and reason, and what they still remove."""
    names = "; ".join(
        f"entry {index} ({entry.reason}) at {_iso(entry.expires)}" for index, entry in expired
    )
    if len(expired) == 1:
        head = f"1 allow-list entry has expired: {names}. It still removes"
    else:
        head = f"{len(expired)} allow-list entries have expired: {names}. They still remove"
    return (
        f"{head} findings whose events all lie before the expiry, but none with later "
        "events; delete expired entries from the config once no older logs are read again"
    )


def _iso(moment: dt.datetime | None) -> str:
    return "" if moment is None else moment.isoformat().replace("+00:00", "Z")


def apply_allow_list(
    findings: pd.DataFrame, entries: Sequence[AllowEntry], *, now: dt.datetime
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split findings into those kept and those an allow-list entry removes.

    An entry with ``expires`` removes only findings whose ``last_seen`` lies before it (see
    :class:`AllowEntry`); ``now`` decides which entries the warning lists as expired. A finding
    that several entries match is credited to the first of them.

    Returns:
        ``(kept, removed)``, both with a fresh index. ``removed`` has the extra column
        :data:`ALLOWED_BY` (``entry 2: <reason>``).
    """
    frame = findings.reset_index(drop=True)
    credit = pd.Series(None, index=frame.index, dtype=object)
    for index, entry in enumerate(entries):
        if frame.empty:
            continue
        matched = _entry_mask(frame, entry) & credit.isna()
        if entry.expires is not None:
            matched &= _before(frame, entry.expires, now)
        credit[matched] = f"entry {index}: {entry.reason}"

    expired = expired_entries(entries, now)
    if expired:
        logger.warning("%s", expired_warning(expired))

    removed_mask = credit.notna()
    kept = frame[~removed_mask].reset_index(drop=True)
    removed = frame[removed_mask].copy()
    removed[ALLOWED_BY] = credit[removed_mask].astype(object)
    removed = removed.reset_index(drop=True)
    logger.info("allow-list removed %s of %s findings", len(removed), len(frame))
    return kept, removed


def _before(frame: pd.DataFrame, moment: dt.datetime, now: dt.datetime) -> pd.Series:
    """Mark findings whose last event lies before ``moment`` (the run time when unknown)."""
    if "last_seen" not in frame.columns:
        return pd.Series(_utc(now) < moment, index=frame.index)
    last = pd.to_datetime(frame["last_seen"], utc=True, format="ISO8601").fillna(
        pd.Timestamp(_utc(now))
    )
    return pd.Series((last < pd.Timestamp(moment)).to_numpy(dtype=bool), index=frame.index)


def _entry_mask(frame: pd.DataFrame, entry: AllowEntry) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    if "*" not in entry.detectors:
        mask &= frame["detector"].isin(entry.detectors)
    if entry.principals is not None:
        mask &= _glob_mask(frame["principal"], entry.principals)
    if entry.accounts is not None:
        mask &= frame["account"].isin(entry.accounts)
    if entry.cidrs is not None:
        networks = entry.cidrs
        mask &= _all_values_mask(frame["source_ips"], lambda ip: _inside(ip, networks))
    if entry.user_agents is not None:
        agents = frame["evidence"].map(_evidence_user_agents)
        pattern = _glob_regex(entry.user_agents)
        mask &= _all_values_mask(agents, lambda agent: pattern.match(agent) is not None)
    return mask


def _glob_regex(globs: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


def _glob_mask(values: pd.Series, globs: Sequence[str]) -> pd.Series:
    """Return where ``values`` match one of ``globs``; missing values never match."""
    pattern = _glob_regex(globs)
    matched = {value for value in values.dropna().unique() if pattern.match(str(value))}
    return values.isin(matched) & values.notna()


def _all_values_mask(lists: pd.Series, accepts: Callable[[str], bool]) -> pd.Series:
    """Return where a row's list is non-empty and ``accepts`` every item of it.

    Each distinct item is tested once and the result mapped back to the rows.
    """
    items = lists.explode().dropna().astype(str)
    verdicts = {item: accepts(item) for item in items.unique()}
    per_row = items.map(verdicts).astype(bool).groupby(level=0).all()
    return per_row.reindex(lists.index, fill_value=False).astype(bool)


def _inside(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _evidence_user_agents(evidence: Any) -> list[str]:
    if not isinstance(evidence, dict):
        return []
    agents = evidence.get("user_agents")
    if isinstance(agents, str):
        return [agents]
    if isinstance(agents, (list, tuple)):
        return [str(agent) for agent in agents if agent is not None]
    return []


# --- routes ------------------------------------------------------------------------------------


class Route(_Strict):
    """A route: findings that match every label in ``match`` go to ``receiver``.

    ``match`` maps a label of :data:`MATCH_LABELS` to one value or a list of values (any of
    them matches). An empty ``match`` matches every finding. A finding whose column is empty
    never matches a label on that column. ``continue`` (``continue_`` in Python) lets the
    finding also reach later matching routes. ``group_by`` defaults to the
    :class:`RoutingSettings` ``group_by``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    match: dict[str, str | list[str]] = Field(default_factory=dict)
    receiver: NonEmptyText
    continue_: bool = Field(default=False, alias="continue")
    group_by: list[str] | None = None

    @field_validator("match")
    @classmethod
    def _check_match(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for label, expected in value.items():
            if label not in MATCH_LABELS:
                raise ValueError(
                    f"unknown label {label!r}; expected one of {', '.join(MATCH_LABELS)}"
                )
            values = [expected] if isinstance(expected, str) else expected
            if not values:
                raise ValueError(f"label {label!r} has an empty list of values")
            if label == "severity_at_least" and not isinstance(expected, str):
                raise ValueError("severity_at_least takes one severity, not a list")
            if label in ("severity", "severity_at_least"):
                bad = [item for item in values if item not in SEVERITIES]
                if bad:
                    raise ValueError(
                        f"label {label!r}: invalid severity {bad[0]!r}; "
                        f"expected one of {', '.join(SEVERITIES)}"
                    )
        return value

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _valid_group_by(value)

    def matches(self, findings: pd.DataFrame) -> pd.Series:
        """Return a boolean mask of the findings this route matches."""
        mask = pd.Series(True, index=findings.index)
        for label, expected in self.match.items():
            if label == "severity_at_least":
                ranks = findings["severity"].map(severity_rank)
                mask &= ranks >= severity_rank(str(expected))
                continue
            values = [expected] if isinstance(expected, str) else list(expected)
            mask &= findings[label].isin(values) & findings[label].notna()
        return mask


class RoutingSettings(_Strict):
    """The routing tree: ``routes`` in order, then ``default_receiver`` for the rest.

    ``default_receiver`` is required so that no finding is dropped by routing. To discard
    findings on purpose, add an allow-list entry (which records a reason and an owner) or
    route them to a receiver with no channels.
    """

    routes: list[Route] = Field(default_factory=list)
    default_receiver: NonEmptyText
    group_by: list[str] = Field(default_factory=lambda: list(_DEFAULT_GROUP_BY))

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, value: list[str]) -> list[str]:
        return _valid_group_by(value)


def route(findings: pd.DataFrame, settings: RoutingSettings) -> list[tuple[str, pd.DataFrame]]:
    """Assign each finding to its receivers.

    A finding goes to the receiver of the first route that matches it and, while the matched
    routes set ``continue``, to those of later matching routes. A finding that no route
    matches goes to ``default_receiver``. A receiver reached by several routes gets each
    finding once.

    Returns:
        One ``(receiver, findings)`` pair per receiver that received findings, in the order
        of first appearance (routes in order, then the default receiver).
    """
    merged: dict[str, pd.DataFrame] = {}
    for receiver, _group_by, part in _assign(findings, settings):
        known = merged.get(receiver)
        if known is None:
            merged[receiver] = part
        else:
            fresh = part[~part["finding_id"].isin(known["finding_id"])]
            merged[receiver] = pd.concat([known, fresh], ignore_index=True)
    return list(merged.items())


def route_alerts(
    findings: pd.DataFrame, settings: RoutingSettings
) -> list[tuple[str, list[Alert]]]:
    """Route findings and group each route's share into alerts with that route's ``group_by``.

    A finding that reaches the same receiver through several routes is grouped by the first
    of those routes only.

    Returns:
        One ``(receiver, alerts)`` pair per receiver, in the order :func:`route` uses, with
        the alerts ordered as :func:`group_alerts` orders them.
    """
    alerts: dict[str, list[Alert]] = {}
    delivered: dict[str, set[str]] = {}
    for receiver, group_by, part in _assign(findings, settings):
        seen = delivered.setdefault(receiver, set())
        fresh = part[~part["finding_id"].isin(seen)]
        seen.update(str(finding_id) for finding_id in fresh["finding_id"])
        if not fresh.empty:
            alerts.setdefault(receiver, []).extend(group_alerts(fresh, group_by))
    return [
        (receiver, _sorted_alerts(merge_same_dedup_key(items)))
        for receiver, items in alerts.items()
    ]


def merge_same_dedup_key(alerts: Sequence[Alert]) -> list[Alert]:
    """Merge alerts that share a ``dedup_key`` into one alert built from all their findings.

    Within one run, a receiver gets one alert per dedup key. Otherwise the repeat interval
    would hold back the second alert as already sent, and its findings would never reach
    anyone. The merged alert combines counts, times, secrets, addresses and findings; its top
    events are chosen later from all of them.

    Returns:
        The alerts in their original order, each merged alert at the place of its first part.
    """
    by_key: dict[str, list[Alert]] = {}
    for alert in alerts:
        by_key.setdefault(alert.dedup_key, []).append(alert)
    merged = []
    for key, parts in by_key.items():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        findings = [finding for part in parts for finding in part.findings]
        merged.append(Alert.from_findings(findings))
        logger.debug("merged %s alerts with dedup key %s", len(parts), key)
    return merged


def _assign(
    findings: pd.DataFrame, settings: RoutingSettings
) -> list[tuple[str, list[str], pd.DataFrame]]:
    """Return ``(receiver, group_by, findings)`` per route that matched, then the default."""
    frame = findings.reset_index(drop=True)
    open_rows = pd.Series(True, index=frame.index)
    matched_any = pd.Series(False, index=frame.index)
    shares = []
    for position, item in enumerate(settings.routes):
        hit = open_rows & item.matches(frame)
        if hit.any():
            group_by = settings.group_by if item.group_by is None else item.group_by
            shares.append((item.receiver, group_by, frame[hit].reset_index(drop=True)))
            logger.debug("route %s (%s) matched %s findings", position, item.receiver, hit.sum())
        matched_any |= hit
        if not item.continue_:
            open_rows &= ~hit
    rest = frame[~matched_any]
    if not rest.empty:
        shares.append((settings.default_receiver, settings.group_by, rest.reset_index(drop=True)))
    logger.debug("%s findings went to the default receiver", len(rest))
    return shares


# --- grouping ----------------------------------------------------------------------------------


def group_alerts(findings: pd.DataFrame, group_by: Sequence[str]) -> list[Alert]:
    """Bundle findings into one alert per distinct ``group_by`` value.

    Findings without a principal (a failure burst from one address across several
    principals) each make their own alert when ``group_by`` contains ``principal``. Other
    empty values group together. ``["..."]`` gives one alert per finding and ``[]`` one
    alert for all findings.

    Returns:
        Alerts ordered by severity (highest first), then by ``first_seen`` (earliest first),
        then by alert id.

    Raises:
        ValueError: if ``group_by`` names a column outside :data:`GROUP_LABELS`.
    """
    labels = _valid_group_by(list(group_by))
    if findings.empty:
        return []
    frame = findings.reset_index(drop=True)
    keys = _group_keys(frame, labels)
    alerts = [
        Alert.from_findings(finding_records(frame.loc[rows]))
        for rows in keys.groupby(keys, sort=False).groups.values()
    ]
    logger.debug("grouped %s findings into %s alerts by %s", len(frame), len(alerts), labels)
    return _sorted_alerts(alerts)


def _group_keys(frame: pd.DataFrame, labels: list[str]) -> pd.Series:
    """Return one key per finding. Findings with equal keys share an alert."""
    if labels == [EACH_FINDING]:
        return frame["finding_id"].astype(str)
    if not labels:
        return pd.Series("", index=frame.index, dtype=object)

    columns: list[pd.Series] = [frame[label] for label in labels]
    if "principal" in labels:
        # A missing principal keys on the finding itself so that bursts never merge.
        columns.append(frame["finding_id"].where(frame["principal"].isna(), ""))
    keys: list[Hashable] = []
    for values in zip(*columns, strict=True):
        keys.append(tuple(None if pd.isna(value) else str(value) for value in values))
    return pd.Series(keys, index=frame.index, dtype=object)


def _sorted_alerts(alerts: list[Alert]) -> list[Alert]:
    latest = dt.datetime.max.replace(tzinfo=dt.UTC)
    return sorted(
        alerts,
        key=lambda a: (-severity_rank(a.severity), a.first_seen or latest, a.alert_id),
    )


def _valid_group_by(labels: list[str]) -> list[str]:
    if EACH_FINDING in labels:
        if labels != [EACH_FINDING]:
            raise ValueError(f"{EACH_FINDING!r} must be the only group_by label; got {labels}")
        return labels
    unknown = [label for label in labels if label not in GROUP_LABELS]
    if unknown:
        raise ValueError(
            f"unknown group_by label {unknown[0]!r}; expected one of "
            f"{', '.join(GROUP_LABELS)} or {EACH_FINDING!r} alone"
        )
    return labels


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
