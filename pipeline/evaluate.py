"""Score detector findings against the labeled incidents and decoys of a simulation.

A finding matches an incident when all three hold:

- its ``detector`` is one of the incident's ``detectors``;
- its ``principal`` equals the incident's ``principal``, one of its ``aliases`` or one of its
  ``principals`` (compared case-insensitively), or the incident has a ``source_ip`` that is
  among the finding's ``source_ips`` (for findings keyed by caller address);
- ``[first_seen, last_seen]`` overlaps ``[start, end]`` widened by the tolerance (1 hour by
  default) on both sides.

Per detector, a true positive is a finding that matches at least one incident, a false positive
is a finding that matches none, and a false negative is an incident that lists the detector but
has no matching finding. Precision is TP / (TP + FP), or None when the detector produced no
findings. Recall is found incidents / expected incidents, or None when no incident expects
the detector. A decoy violation is a finding that matches a decoy (same rules, with the decoy's
``must_not_fire`` in place of ``detectors``); it also counts as a false positive.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pandas as pd

from pipeline.errors import InputError

__all__ = [
    "DEFAULT_TOLERANCE",
    "DetectorScore",
    "EvaluationReport",
    "evaluate",
    "load_findings",
    "load_labels",
]

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE: Final = timedelta(hours=1)
_INCIDENT_KEYS: Final = ("id", "principal", "start", "end", "detectors")
_DECOY_KEYS: Final = ("id", "principal", "start", "end", "must_not_fire")


@dataclass
class DetectorScore:
    """Counts and rates of one detector."""

    detector: str
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    findings: int = 0
    incidents: int = 0
    found: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    decoy_violations: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP), or None when the detector produced no findings."""
        if self.findings == 0:
            return None
        return self.true_positives / self.findings

    @property
    def recall(self) -> float | None:
        """Found incidents / expected incidents, or None when no incident expects the detector."""
        if self.incidents == 0:
            return None
        return len(self.found) / self.incidents

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready scores."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "findings": self.findings,
            "incidents": self.incidents,
            "found": list(self.found),
            "missed": list(self.missed),
            "decoy_violations": list(self.decoy_violations),
        }


@dataclass
class EvaluationReport:
    """Scores per detector and the decoys that fired."""

    scores: dict[str, DetectorScore]
    decoy_violations: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return ``{detector id: scores}`` sorted by detector id."""
        return {detector: self.scores[detector].to_json() for detector in sorted(self.scores)}

    def to_table(self) -> str:
        """Return a plain-text table, one line per detector, then the decoy violations."""
        header = f"{'detector':<28} {'precision':>9} {'recall':>7} {'TP':>4} {'FP':>4} {'FN':>4} {'findings':>8} {'incidents':>9}"
        lines = [header, "-" * len(header)]
        for detector in sorted(self.scores):
            score = self.scores[detector]
            lines.append(
                f"{detector:<28} {_rate(score.precision):>9} {_rate(score.recall):>7} "
                f"{score.true_positives:>4} {score.false_positives:>4} {score.false_negatives:>4} "
                f"{score.findings:>8} {score.incidents:>9}"
            )
        missed = [(d, i) for d in sorted(self.scores) for i in self.scores[d].missed]
        for detector, incident in missed:
            lines.append(f"missed: {incident} ({detector})")
        if self.decoy_violations:
            for violation in self.decoy_violations:
                lines.append(
                    f"decoy fired: {violation['decoy']} by {violation['detector']} "
                    f"(finding {violation['finding_id']})"
                )
        else:
            lines.append("decoy violations: none")
        return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def load_labels(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a labels.json file.

    Raises:
        InputError: the file is missing, is not JSON, or an incident or decoy lacks a key.
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
    for section, keys in (("incidents", _INCIDENT_KEYS), ("decoys", _DECOY_KEYS)):
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


def _parse_labels(entries: Iterable[Mapping[str, Any]], detector_key: str) -> list[_Label]:
    parsed = []
    for entry in entries:
        names = [entry.get("principal"), *entry.get("aliases", []), *entry.get("principals", [])]
        parsed.append(
            _Label(
                id=str(entry["id"]),
                detectors=frozenset(entry.get(detector_key, [])),
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


def _matches(finding: Mapping[str, Any], label: _Label, tolerance: timedelta) -> bool:
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


def _finding_rows(findings: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(findings, pd.DataFrame):
        return [
            {str(key): value for key, value in row.items()}
            for row in findings.to_dict(orient="records")
        ]
    return [dict(row) for row in findings]


def evaluate(
    findings: pd.DataFrame | Sequence[Mapping[str, Any]],
    labels: Mapping[str, Any],
    *,
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> EvaluationReport:
    """Score ``findings`` against the incidents and decoys in ``labels``.

    Args:
        findings: A findings frame or a list of finding dicts (as in findings.jsonl). Each needs
            ``detector``, ``principal``, ``first_seen``; ``last_seen``, ``source_ips`` and
            ``finding_id`` are used when present.
        labels: The labels document (see :func:`load_labels`).
        tolerance: How far outside an incident's window a finding may lie and still match.

    Returns:
        Scores for every detector named by a finding, an incident or a decoy.
    """
    incidents = _parse_labels(labels.get("incidents", []), "detectors")
    decoys = _parse_labels(labels.get("decoys", []), "must_not_fire")
    rows = _finding_rows(findings)

    detectors = {str(row.get("detector")) for row in rows}
    for label in (*incidents, *decoys):
        detectors.update(label.detectors)
    scores = {detector: DetectorScore(detector) for detector in detectors}
    for incident in incidents:
        for detector in incident.detectors:
            scores[detector].incidents += 1

    found: dict[str, set[str]] = {detector: set() for detector in detectors}
    violations: list[dict[str, str]] = []
    for index, row in enumerate(rows):
        detector = str(row.get("detector"))
        score = scores[detector]
        score.findings += 1
        matched = [incident.id for incident in incidents if _matches(row, incident, tolerance)]
        if matched:
            score.true_positives += 1
            found[detector].update(matched)
        else:
            score.false_positives += 1
        finding_id = str(row.get("finding_id") or f"#{index + 1}")
        for decoy in decoys:
            if _matches(row, decoy, tolerance):
                violations.append(
                    {"decoy": decoy.id, "detector": detector, "finding_id": finding_id}
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
    report = EvaluationReport(scores=scores, decoy_violations=violations)
    logger.info(
        "evaluated %s findings against %s incidents and %s decoys: %s decoy violations",
        len(rows),
        len(incidents),
        len(decoys),
        len(violations),
    )
    return report
