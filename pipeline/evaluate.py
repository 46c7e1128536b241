"""Score detector findings against the labeled incidents, decoys and expected spans of a simulation.

A finding matches a label when all three hold:

- its ``detector`` is one of the label's detectors (``detectors`` or ``may_fire`` of an
  incident, ``must_not_fire`` of a decoy, ``expected`` of an expected span);
- its ``principal`` equals the label's ``principal``, one of its ``aliases`` or one of its
  ``principals`` (compared case-insensitively), or the label has a ``source_ip`` that is
  among the finding's ``source_ips`` (for findings keyed by caller address);
- ``[first_seen, last_seen]`` overlaps ``[start, end]`` widened by the tolerance (1 hour by
  default) on both sides.

Before scoring, the alerting filters run as in ``keytrail run``: the allow-list entries not
expired at ``now`` and the silences active at ``now`` remove findings, and each removal is
reported with the entry or silence and the labels the finding matched. ``now`` defaults to the
end of the labeled period. Scores count only the findings left, the alerts.

Per detector, a true positive is an alert that matches an incident, through ``detectors`` or
``may_fire`` (a correct finding that the incident does not require). An expected finding
matches an expected span (routine activity the detector flags by design, such as a learning
period) and no incident; it is neither true nor false. Every other alert is a false positive.
A false negative is an incident that lists the detector in ``detectors`` and has no matching
alert. A finding that lies wholly outside the labeled period (``start`` plus ``days``) is not
scored, because no label covers it; the report counts such findings in ``outside_period``. Precision is TP / (TP + FP), or None without such alerts. Recall is found incidents /
expected incidents, or None when no incident lists the detector. A decoy violation is an alert
that matches a decoy; it is also a false positive unless it matches an incident.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pandas as pd

from pipeline.alerting.routing import ALLOWED_BY, AllowEntry, apply_allow_list
from pipeline.alerting.silences import SILENCED_BY, Silence, apply_silences
from pipeline.errors import InputError, StateError

__all__ = [
    "DEFAULT_TOLERANCE",
    "DetectorScore",
    "EvaluationReport",
    "Removal",
    "evaluate",
    "load_findings",
    "load_labels",
    "read_silences",
]

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE: Final = dt.timedelta(hours=1)
_INCIDENT_KEYS: Final = ("id", "principal", "start", "end", "detectors")
_DECOY_KEYS: Final = ("id", "principal", "start", "end", "must_not_fire")
_EXPECTED_KEYS: Final = ("id", "principal", "start", "end", "expected")
_SECTIONS: Final = (
    ("incidents", _INCIDENT_KEYS),
    ("decoys", _DECOY_KEYS),
    ("expected", _EXPECTED_KEYS),
)


@dataclass
class DetectorScore:
    """Counts and rates of one detector; ``days`` is the length of the evaluated period."""

    detector: str
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    expected: int = 0
    findings: int = 0
    allowed: int = 0
    silenced: int = 0
    incidents: int = 0
    days: int = 0
    found: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    decoy_violations: list[str] = field(default_factory=list)

    @property
    def alerts(self) -> int:
        """Findings left after the allow-list and silences."""
        return self.findings - self.allowed - self.silenced

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP), or None when no alert was a true or false positive."""
        judged = self.true_positives + self.false_positives
        if judged == 0:
            return None
        return self.true_positives / judged

    @property
    def recall(self) -> float | None:
        """Found incidents / expected incidents, or None when no incident expects the detector."""
        if self.incidents == 0:
            return None
        return len(self.found) / self.incidents

    @property
    def alerts_per_day(self) -> float | None:
        """Alerts divided by the days of the evaluated period, or None without a period."""
        if self.days <= 0:
            return None
        return self.alerts / self.days

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready scores."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "expected": self.expected,
            "findings": self.findings,
            "allowed": self.allowed,
            "silenced": self.silenced,
            "alerts": self.alerts,
            "alerts_per_day": self.alerts_per_day,
            "incidents": self.incidents,
            "found": list(self.found),
            "missed": list(self.missed),
            "decoy_violations": list(self.decoy_violations),
        }


@dataclass(frozen=True)
class Removal:
    """A finding that the allow-list or a silence removed, and the labels it matched."""

    finding_id: str
    detector: str
    principal: str | None
    first_seen: str
    removed_by: str
    labels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready removal."""
        return {
            "finding_id": self.finding_id,
            "detector": self.detector,
            "principal": self.principal,
            "first_seen": self.first_seen,
            "removed_by": self.removed_by,
            "labels": list(self.labels),
        }


@dataclass
class EvaluationReport:
    """Scores per detector, the decoys that fired and the findings the filters removed."""

    scores: dict[str, DetectorScore]
    decoy_violations: list[dict[str, str]] = field(default_factory=list)
    removed: list[Removal] = field(default_factory=list)
    days: int = 0
    outside_period: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return ``{detector id: scores}`` sorted by detector id."""
        return {detector: self.scores[detector].to_json() for detector in sorted(self.scores)}

    def to_document(self) -> dict[str, Any]:
        """Return the scores, the decoy violations and the removals as one JSON-ready object."""
        return {
            "days": self.days,
            "outside_period": self.outside_period,
            "detectors": self.to_json(),
            "decoy_violations": list(self.decoy_violations),
            "removed": [removal.to_json() for removal in self.removed],
        }

    def to_table(self) -> str:
        """Return a plain-text table, one line per detector, then misses, removals and decoys."""
        header = (
            f"{'detector':<26} {'precision':>9} {'recall':>6} {'TP':>3} {'FP':>3} {'FN':>3} "
            f"{'expected':>8} {'allowed':>7} {'silenced':>8} {'alerts':>6} {'alerts/day':>10}"
        )
        lines = [header, "-" * len(header)]
        for detector in sorted(self.scores):
            score = self.scores[detector]
            lines.append(
                f"{detector:<26} {_rate(score.precision):>9} {_rate(score.recall):>6} "
                f"{score.true_positives:>3} {score.false_positives:>3} "
                f"{score.false_negatives:>3} {score.expected:>8} {score.allowed:>7} "
                f"{score.silenced:>8} {score.alerts:>6} {_rate(score.alerts_per_day):>10}"
            )
        for detector in sorted(self.scores):
            for incident in self.scores[detector].missed:
                lines.append(f"missed: {incident} ({detector})")
        for removal in self.removed:
            matched = ", ".join(removal.labels) or "no label"
            lines.append(
                f"removed by {removal.removed_by}: {removal.detector} finding "
                f"{removal.finding_id} ({removal.principal or '-'}, {removal.first_seen}; "
                f"matched {matched})"
            )
        if self.decoy_violations:
            for violation in self.decoy_violations:
                lines.append(
                    f"decoy fired: {violation['decoy']} by {violation['detector']} "
                    f"(finding {violation['finding_id']})"
                )
        else:
            lines.append("decoy violations: none")
        if self.outside_period:
            noun = "finding" if self.outside_period == 1 else "findings"
            lines.append(f"not scored: {self.outside_period} {noun} outside the labeled period")
        return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def load_labels(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a labels.json file.

    Raises:
        InputError: the file is missing, is not JSON, or an incident, decoy or expected span
            lacks a key.
    """
    file = Path(path)
    try:
        labels = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"labels file not found: {file} (run `keytrail simulate` first)") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"labels file {file} is not valid JSON: {exc}") from exc
    if not isinstance(labels, dict):
        raise InputError(
            f"labels file {file}: expected a JSON object, found {type(labels).__name__}"
        )
    for section, keys in _SECTIONS:
        entries = labels.get(section, [])
        if not isinstance(entries, list):
            raise InputError(f"labels file {file}: {section!r} must be a list")
        for index, entry in enumerate(entries):
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise InputError(
                    f"labels file {file}: {section}[{index}] is missing {', '.join(missing)}"
                )
    return labels


def load_findings(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read findings written one JSON object per line (findings.jsonl); blank lines are skipped.

    Raises:
        InputError: the file is missing or a line is not a JSON object.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"findings file not found: {file} (run `keytrail run` first)") from exc
    findings = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"findings file {file} line {number} is not valid JSON: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise InputError(f"findings file {file} line {number}: expected a JSON object")
        findings.append(value)
    return findings


def read_silences(state_db: str | os.PathLike[str]) -> list[Silence]:
    """Read every silence of a ``state.db`` through a read-only connection.

    A missing file has no silences. Unlike :class:`pipeline.alerting.silences.SilenceStore`,
    this creates no file and changes no schema, so evaluating never writes state.

    Raises:
        StateError: the file is not a readable keytrail state database.
    """
    path = Path(state_db)
    if not path.is_file():
        return []
    # The row layout and parser belong to the silence store; reusing them keeps one format.
    from pipeline.alerting.silences import _COLUMNS, _silence_from_row

    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open state database {path} read-only: {exc}") from None
    try:
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'silences'"
        ).fetchall()
        if not tables:
            return []
        rows = conn.execute(f"SELECT {_COLUMNS} FROM silences ORDER BY created_at, id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StateError(f"cannot read silences from {path}: {exc}") from None
    finally:
        conn.close()
    return [_silence_from_row(row) for row in rows]


@dataclass(frozen=True)
class _Label:
    id: str
    detectors: frozenset[str]
    principals: frozenset[str]
    source_ip: str | None
    start: pd.Timestamp
    end: pd.Timestamp


def _to_time(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _parse_labels(entries: Iterable[Mapping[str, Any]], *detector_keys: str) -> list[_Label]:
    parsed = []
    for entry in entries:
        names = [entry.get("principal"), *entry.get("aliases", []), *entry.get("principals", [])]
        detectors = {name for key in detector_keys for name in entry.get(key, [])}
        parsed.append(
            _Label(
                id=str(entry["id"]),
                detectors=frozenset(detectors),
                principals=frozenset(str(name).casefold() for name in names if name),
                source_ip=entry.get("source_ip"),
                start=_to_time(entry["start"]),
                end=_to_time(entry["end"]),
            )
        )
    return parsed


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(item) for item in value]
    except TypeError:
        return []


def _matches(finding: Mapping[str, Any], label: _Label, tolerance: dt.timedelta) -> bool:
    if finding.get("detector") not in label.detectors:
        return False
    principal = finding.get("principal")
    same_principal = isinstance(principal, str) and principal.casefold() in label.principals
    same_source = label.source_ip is not None and label.source_ip in _as_list(
        finding.get("source_ips")
    )
    if not (same_principal or same_source):
        return False
    first = _to_time(finding["first_seen"])
    last = _to_time(finding.get("last_seen") or finding["first_seen"])
    return first <= label.end + tolerance and last >= label.start - tolerance


def _finding_frame(findings: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    if isinstance(findings, pd.DataFrame):
        frame = findings.reset_index(drop=True)
    else:
        frame = pd.DataFrame([dict(row) for row in findings])
    if "finding_id" not in frame.columns:
        frame["finding_id"] = [f"#{index + 1}" for index in range(len(frame))]
    for column in ("detector", "principal", "account", "source_ips", "evidence"):
        if column not in frame.columns:
            frame[column] = None
    return frame


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(key): value for key, value in row.items()} for row in frame.to_dict("records")]


def _period_days(labels: Mapping[str, Any], frame: pd.DataFrame) -> int:
    days = labels.get("days")
    if isinstance(days, int) and days > 0:
        return days
    if frame.empty or "first_seen" not in frame.columns:
        return 0
    return int(pd.to_datetime(frame["first_seen"], utc=True).dt.floor("D").nunique())


def _inside_period(frame: pd.DataFrame, labels: Mapping[str, Any]) -> tuple[pd.DataFrame, int]:
    """Drop the findings that lie wholly outside the labeled period; return them counted."""
    end = _period_end(labels)
    if end is None or frame.empty or "first_seen" not in frame.columns:
        return frame, 0
    start = end - dt.timedelta(days=int(labels["days"]))
    first = pd.to_datetime(frame["first_seen"], utc=True, format="ISO8601")
    last = pd.to_datetime(frame.get("last_seen", frame["first_seen"]), utc=True, format="ISO8601")
    inside = ((last >= start) & (first < end)).to_numpy(dtype=bool)
    return frame[inside].reset_index(drop=True), int((~inside).sum())


def _period_end(labels: Mapping[str, Any]) -> dt.datetime | None:
    start, days = labels.get("start"), labels.get("days")
    if not isinstance(start, str) or not isinstance(days, int):
        return None
    try:
        first = dt.date.fromisoformat(start)
    except ValueError:
        return None
    return dt.datetime.combine(first + dt.timedelta(days=days), dt.time(0), tzinfo=dt.UTC)


def _filter(
    frame: pd.DataFrame,
    allow_list: Sequence[AllowEntry],
    silences: Sequence[Silence],
    now: dt.datetime,
) -> tuple[pd.DataFrame, list[tuple[dict[str, Any], str]]]:
    """Apply the allow-list, then the silences; return the kept findings and the removed ones."""
    if frame.empty:
        return frame, []
    kept, allowed = apply_allow_list(frame, allow_list, now=now)
    kept, silenced = apply_silences(kept, silences, now)
    removed = [(row, f"allow-list {row[ALLOWED_BY]}") for row in _rows(allowed)]
    removed += [(row, f"silence {row[SILENCED_BY]}") for row in _rows(silenced)]
    return kept, removed


def evaluate(
    findings: pd.DataFrame | Sequence[Mapping[str, Any]],
    labels: Mapping[str, Any],
    *,
    tolerance: dt.timedelta = DEFAULT_TOLERANCE,
    allow_list: Sequence[AllowEntry] = (),
    silences: Sequence[Silence] = (),
    now: dt.datetime | None = None,
) -> EvaluationReport:
    """Score ``findings`` against the incidents, decoys and expected spans in ``labels``.

    Args:
        findings: A findings frame or a list of finding dicts (as in findings.jsonl). Each needs
            ``detector``, ``principal``, ``first_seen``; ``last_seen``, ``source_ips``,
            ``finding_id``, ``account`` and ``evidence`` are used when present.
        labels: The labels document (see :func:`load_labels`).
        tolerance: How far outside a label's window a finding may lie and still match.
        allow_list: Allow-list entries (``alerting.allow_list`` of the config), applied first.
        silences: Silences (see :func:`read_silences`); those active at ``now`` apply.
        now: The time at which allow-list entries expire and silences are active; default:
            the end of the labeled period (``start`` plus ``days``), else the current time.

    Returns:
        Scores for every detector named by a finding or a label, and the removals.
    """
    moment = now or _period_end(labels) or dt.datetime.now(dt.UTC)
    incidents = _parse_labels(labels.get("incidents", []), "detectors")
    extras = _parse_labels(labels.get("incidents", []), "may_fire")
    decoys = _parse_labels(labels.get("decoys", []), "must_not_fire")
    expected = _parse_labels(labels.get("expected", []), "expected")
    frame = _finding_frame(findings)
    days = _period_days(labels, frame)
    frame, outside = _inside_period(frame, labels)

    detectors = {str(name) for name in frame["detector"]} if len(frame) else set()
    for label in (*incidents, *extras, *decoys, *expected):
        detectors.update(label.detectors)
    scores = {detector: DetectorScore(detector, days=days) for detector in detectors}
    for incident in incidents:
        for detector in incident.detectors:
            scores[detector].incidents += 1
    for row in _rows(frame):
        scores[str(row.get("detector"))].findings += 1

    kept, removed = _filter(frame, allow_list, silences, moment)
    removals = []
    for row, removed_by in removed:
        detector = str(row.get("detector"))
        if removed_by.startswith("allow-list"):
            scores[detector].allowed += 1
        else:
            scores[detector].silenced += 1
        matched = [
            label.id
            for label in (*incidents, *extras, *decoys, *expected)
            if _matches(row, label, tolerance)
        ]
        removals.append(
            Removal(
                finding_id=str(row.get("finding_id")),
                detector=detector,
                principal=row.get("principal"),
                first_seen=_to_time(row["first_seen"]).strftime("%Y-%m-%dT%H:%M:%SZ"),
                removed_by=removed_by,
                labels=tuple(dict.fromkeys(matched)),
            )
        )

    found: dict[str, set[str]] = {detector: set() for detector in detectors}
    violations: list[dict[str, str]] = []
    for row in _rows(kept):
        detector = str(row.get("detector"))
        score = scores[detector]
        required = [incident.id for incident in incidents if _matches(row, incident, tolerance)]
        optional = [incident.id for incident in extras if _matches(row, incident, tolerance)]
        if required or optional:
            score.true_positives += 1
            found[detector].update(required)
        elif any(_matches(row, span, tolerance) for span in expected):
            score.expected += 1
        else:
            score.false_positives += 1
        for decoy in decoys:
            if _matches(row, decoy, tolerance):
                violations.append(
                    {"decoy": decoy.id, "detector": detector, "finding_id": str(row["finding_id"])}
                )
                if decoy.id not in score.decoy_violations:
                    score.decoy_violations.append(decoy.id)

    for incident in incidents:
        for detector in sorted(incident.detectors):
            if incident.id in found[detector]:
                scores[detector].found.append(incident.id)
            else:
                scores[detector].missed.append(incident.id)
                scores[detector].false_negatives += 1
    report = EvaluationReport(
        scores=scores,
        decoy_violations=violations,
        removed=removals,
        days=days,
        outside_period=outside,
    )
    logger.info(
        "evaluated %s findings against %s incidents, %s decoys and %s expected spans: "
        "%s removed by filters, %s decoy violations",
        len(frame),
        len(incidents),
        len(decoys),
        len(expected),
        len(removals),
        len(violations),
    )
    return report
