"""Generate realistic secret-access audit logs for three clouds, with labeled incidents.

:func:`generate` writes native-layout AWS CloudTrail, GCP Cloud Audit Logs and Azure Key Vault
files for a simulated organisation of about 40 principals. Beside them it writes
``labels.json`` (the injected incidents and the decoys that must not fire) and
``population.json`` (each principal's kind, time zone and holiday calendar).

The same seed always produces the same bytes with the same GeoIP database. NOTE: a newer
dbip-city-lite file can place a candidate address elsewhere, which changes the drawn addresses.

People read secrets only on working days between 08:00 and 19:00 local time, from addresses
in their home city, and not on their country's public holidays. Workloads read on schedules
from private or internal addresses. Everything outside that routine is a labeled scenario.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import holidays
import numpy as np

from pipeline.simulate_baselines import (
    build_baseline_scenarios,
    build_newcomers,
    newcomer_routines,
)
from pipeline.simulate_formats import AwsWriter, AzureWriter, GcpWriter, iter_sizes
from pipeline.simulate_geo import GeoPicker
from pipeline.simulate_population import Access, Principal, build_population
from pipeline.simulate_scenarios import Scenario, build_scenarios

__all__ = ["SimulationReport", "generate", "local_to_us"]

logger = logging.getLogger(__name__)

# People work between these local times; every routine read falls inside them.
WORKDAY_START: Final = time(8, 0)
WORKDAY_END: Final = time(19, 0)
# Subfolders of the output folder that hold one cloud's logs each.
LOG_FOLDERS: Final = ("aws", "gcp", "azure")
# Share of working days a person is away (leave, sick days).
ABSENCE_RATE: Final = 0.08


@dataclass
class SimulationReport:
    """Counts of the files, records and labels that :func:`generate` wrote."""

    out: Path
    seed: int
    start: date
    days: int
    files: int = 0
    bytes: int = 0
    records: dict[str, int] = field(default_factory=dict)
    principals: int = 0
    incidents: int = 0
    decoys: int = 0
    expected: int = 0
    broken: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a one-line summary of the counts for logs and the CLI."""
        records = ", ".join(f"{cloud} {count}" for cloud, count in self.records.items())
        return (
            f"{self.files} files ({self.bytes / 1e6:.1f} MB) in {self.out}: records {records}; "
            f"{self.principals} principals, {self.incidents} incidents, {self.decoys} decoys, "
            f"{self.expected} expected spans, "
            f"{len(self.broken)} broken records"
        )

    def log_folders(self) -> list[Path]:
        """Return the folders that hold the logs, without ``labels.json`` and ``population.json``."""
        return [self.out / cloud for cloud in LOG_FOLDERS]

    def cli_message(self) -> str:
        """Return what ``keytrail simulate`` prints: the counts, the command to run and warnings.

        The command names the log folders one by one, because ``keytrail run --source OUT``
        would also read ``labels.json`` and ``population.json`` and quarantine them as
        ``unknown_format``.
        """
        sources = " ".join(f"--source {shlex.quote(str(folder))}" for folder in self.log_folders())
        state = shlex.quote(str(self.out / ".keytrail"))
        labels = shlex.quote(str(self.out / "labels.json"))
        lines = [
            f"wrote {self.summary()}",
            "run keytrail on them with:",
            f"  keytrail run {sources} --state-dir {state} --output-dir {state}/output",
            f"  keytrail evaluate --labels {labels} --findings {state}/output/findings.jsonl",
        ]
        if not self.incidents:
            end = self.start + timedelta(days=self.days - 1)
            lines.append(
                f"warning: no labeled incident falls in {self.start} to {end}; the incidents "
                "are placed on fixed days of October 2026, so simulate at least 30 days from "
                "2026-10-01 (--days 30) to get them"
            )
        return "\n".join(lines)


def local_to_us(day: date, clock: time, timezone: str) -> int:
    """Convert a local date and wall-clock time to epoch microseconds (UTC)."""
    moment = datetime.combine(day, clock, tzinfo=ZoneInfo(timezone))
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def _holiday_calendar(country: str, start: date, days: int) -> set[date]:
    end = start + timedelta(days=days)
    calendar = holidays.country_holidays(country, years=range(start.year, end.year + 1))
    return {day for day in calendar if start <= day < end}


def _person_routine(
    rng: np.random.Generator, person: Principal, start: date, days: int
) -> list[Access]:
    """Draw a person's working-day reads: home addresses, business hours, no holidays."""
    days_off = _holiday_calendar(person.holidays_country or "US", start, days)
    accesses: list[Access] = []
    for offset in range(days):
        day = start + timedelta(days=offset)
        absent = rng.random() < ABSENCE_RATE
        if day.weekday() >= 5 or day in days_off or absent:
            continue
        begin_h = rng.uniform(8.25, 10.0)
        end_h = rng.uniform(15.5, 18.5)
        count = 2 + int(rng.poisson(4))
        for hour in np.sort(rng.uniform(begin_h, end_h, size=count)):
            seconds = int(hour * 3600)
            clock = time(seconds // 3600, (seconds % 3600) // 60, seconds % 60)
            accesses.append(_person_call(rng, person, local_to_us(day, clock, person.timezone)))
    return accesses


def _person_call(rng: np.random.Generator, person: Principal, time_us: int, ip: str = "") -> Access:
    draw = rng.random()
    operation = "describe"
    if draw < 0.8:
        operation = "read"
    elif draw < 0.9:
        operation = "list"
    if person.cloud == "azure" and operation == "describe":
        operation = "read"
    outcome_draw = rng.random()
    outcome = "success"
    if outcome_draw < 0.02:
        outcome = "denied"
    elif outcome_draw < 0.03:
        outcome = "not_found"
    secret = person.secrets[int(rng.integers(len(person.secrets)))]
    address = ip or person.ips[0 if rng.random() < 0.7 else 1]
    jitter = int(rng.integers(0, 1_000_000))
    return Access(time_us + jitter, person, operation, (secret,), outcome, address)


def _workload_routine(
    rng: np.random.Generator, workload: Principal, start: date, days: int
) -> list[Access]:
    """Draw a workload's scheduled reads, or a CI principal's deploys at any hour."""
    accesses: list[Access] = []
    begin = local_to_us(start, time(0, 0), "UTC")
    if workload.kind == "ci":
        for offset in range(days):
            for _ in range(int(rng.poisson(1.5))):
                moment = begin + offset * 86_400_000_000 + int(rng.integers(0, 86_400_000_000))
                secrets = workload.secrets
                for index, secret in enumerate(secrets):
                    accesses.append(
                        Access(
                            moment + index * 2_100_000,
                            workload,
                            "read",
                            (secret,),
                            "success",
                            workload.ips[0],
                        )
                    )
        return accesses
    if workload.interval_hours == 0:
        return accesses
    for hour in range(0, days * 24, workload.interval_hours):
        seconds = hour * 3600 + workload.minute * 60 + int(rng.integers(0, 50))
        moment = begin + seconds * 1_000_000 + int(rng.integers(0, 1_000_000))
        outcome = "not_found" if rng.random() < 0.004 else "success"
        if workload.operation in ("batch_read", "params_read"):
            picked = workload.secrets[: workload.reads_per_run]
            accesses.append(
                Access(moment, workload, workload.operation, picked, outcome, workload.ips[0])
            )
        else:
            for index in range(workload.reads_per_run):
                secret = workload.secrets[(hour + index) % len(workload.secrets)]
                accesses.append(
                    Access(
                        moment + index * 400_000,
                        workload,
                        "read",
                        (secret,),
                        outcome,
                        workload.ips[0],
                    )
                )
        if workload.cloud == "aws" and rng.random() < 0.25:
            accesses.append(
                Access(moment - 800_000, workload, "whoami", (), "success", workload.ips[0])
            )
    return accesses


def _aws_noise(
    rng: np.random.Generator, people: list[Principal], start: date, days: int
) -> list[Access]:
    """Add non-secret calls (EC2 DescribeInstances) that AWS people make during work hours."""
    accesses: list[Access] = []
    for person in people:
        if person.cloud != "aws":
            continue
        for offset in range(days):
            day = start + timedelta(days=offset)
            if day.weekday() >= 5 or rng.random() < 0.6:
                continue
            clock = time(int(rng.integers(10, 16)), int(rng.integers(0, 60)))
            moment = local_to_us(day, clock, person.timezone)
            accesses.append(
                Access(moment, person, "describe_instances", (), "success", person.ips[0])
            )
    return accesses


def _period_day(start: date, days: int, offset: int) -> date:
    """Return ``start + offset`` days, or the last simulated day when the period is shorter."""
    return start + timedelta(days=min(offset, days - 1))


def _population_document(population: dict[str, Principal]) -> list[dict[str, Any]]:
    rows = []
    for handle, principal in population.items():
        rows.append(
            {
                "handle": handle,
                "principal": principal.key,
                "aliases": principal.aliases,
                "kind": principal.kind,
                "principal_type": principal.principal_type,
                "cloud": principal.cloud,
                "scope": principal.scope,
                "timezone": principal.timezone if principal.kind == "person" else None,
                "holidays_country": principal.holidays_country,
                "home_city": principal.city,
                "addresses": principal.ips,
            }
        )
    return rows


def _label_document(scenarios: list[Scenario], seed: int, start: date, days: int) -> dict[str, Any]:
    incidents = [scenario.label() for scenario in scenarios if scenario.detectors]
    expected = [scenario.label() for scenario in scenarios if scenario.expected]
    decoys = [
        scenario.label()
        for scenario in scenarios
        if not scenario.detectors and not scenario.expected
    ]
    return {
        "seed": seed,
        "start": start.isoformat(),
        "days": days,
        "incidents": incidents,
        "decoys": decoys,
        "expected": expected,
    }


def _baseline_scenarios(
    seed: int,
    population: dict[str, Principal],
    attacker_ips: dict[str, Any],
    accesses: list[Access],
    start: date,
    days: int,
) -> list[Scenario]:
    """Add the principals, routines and scenarios of the learning detectors.

    They draw from a second generator seeded with ``[seed, 1]``, so the calls of the older
    scenarios stay as they were. The newcomers join ``population`` and their routine calls
    are appended to ``accesses``.
    """
    rng = np.random.default_rng([seed, 1])
    geo = GeoPicker(rng)
    try:
        taken = [address for principal in population.values() for address in principal.ips]
        taken += [attacker_ips["bucharest"], attacker_ips["sao_paulo"]]
        taken += [attacker_ips["san_francisco"], *attacker_ips["amsterdam"]]
        geo.reserve(taken)
        newcomers = build_newcomers(rng, geo, population)
    finally:
        geo.close()
    population.update(newcomers.principals)
    routine = newcomer_routines(rng, population, start, days, _person_routine, local_to_us)
    accesses.extend(routine)
    return build_baseline_scenarios(rng, population, newcomers, routine, local_to_us)


def generate(
    out: Path, *, seed: int = 7, days: int = 30, start: date = date(2026, 10, 1)
) -> SimulationReport:
    """Write simulated logs, labels and the population under ``out``.

    Args:
        out: Output folder; ``aws/``, ``gcp/``, ``azure/``, ``labels.json`` and
            ``population.json`` are written inside it (existing files are overwritten).
        seed: Seed of the numpy random generator; one seed always yields the same bytes.
        days: Number of days to simulate, starting at ``start`` (UTC midnight).
        start: First simulated day.

    Returns:
        Counts of files, bytes, records per cloud, incidents and decoys.

    Raises:
        ValueError: ``days`` is smaller than 1.
        InputError: the GeoIP database is missing or places too few candidate addresses.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    geo = GeoPicker(rng)
    try:
        population = build_population(rng, geo)
        attacker_ips = {
            "bucharest": geo.pick("bucharest", 1)[0],
            "amsterdam": geo.pick("amsterdam", 2),
            "sao_paulo": geo.pick("sao_paulo", 1)[0],
            "san_francisco": geo.pick("san_francisco", 1)[0],
        }
    finally:
        geo.close()

    accesses: list[Access] = []
    people = [p for p in population.values() if p.kind == "person"]
    for principal in population.values():
        if principal.kind == "person":
            accesses.extend(_person_routine(rng, principal, start, days))
        else:
            accesses.extend(_workload_routine(rng, principal, start, days))
    accesses.extend(_aws_noise(rng, people, start, days))
    legacy = population["az-report-archiver"]
    begin = local_to_us(start, time(0, 0), "UTC")
    for index, secret in enumerate(legacy.secrets):
        moment = begin + (17 * 60 + index * 7) * 1_000_000
        accesses.append(Access(moment, legacy, "read", (secret,), "success", legacy.ips[0]))

    period_end = begin + days * 86_400_000_000
    scenarios = build_scenarios(rng, population, attacker_ips, local_to_us)
    scenarios += _baseline_scenarios(seed, population, attacker_ips, accesses, start, days)
    scenarios = [
        scenario
        for scenario in scenarios
        if begin <= scenario.start_us and scenario.end_us < period_end
    ]
    for scenario in scenarios:
        accesses = [a for a in accesses if not scenario.replaces(a)]
        accesses.extend(scenario.accesses)
    accesses.sort(key=lambda a: (a.time_us, a.principal.key, a.operation))
    accesses = [a for a in accesses if begin <= a.time_us < period_end]

    aws, gcp, azure = AwsWriter(rng, out), GcpWriter(rng, out), AzureWriter(rng, out)
    for access in accesses:
        cloud = access.principal.cloud
        if cloud == "aws":
            aws.add(access)
        elif cloud == "gcp":
            gcp.add(access)
        else:
            azure.add(access)

    paths = aws.write()
    paths += gcp.write(_period_day(start, days, 1), _period_day(start, days, 4))
    paths += azure.write(_period_day(start, days, 2))

    labels = _label_document(scenarios, seed, start, days)
    (out / "labels.json").write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")
    population_rows = _population_document(population)
    (out / "population.json").write_text(
        json.dumps({"principals": population_rows}, indent=2, ensure_ascii=False) + "\n"
    )
    paths += [out / "labels.json", out / "population.json"]

    report = SimulationReport(
        out=out,
        seed=seed,
        start=start,
        days=days,
        files=len(paths),
        bytes=iter_sizes(paths),
        records={"aws": aws.records, "gcp": gcp.records, "azure": azure.records},
        principals=len(population),
        incidents=len(labels["incidents"]),
        decoys=len(labels["decoys"]),
        expected=len(labels["expected"]),
        broken=gcp.broken + azure.broken,
        incomplete=azure.incomplete,
    )
    kinds = Counter(a.principal.cloud for a in accesses)
    logger.info("simulated %s calls (%s); %s", len(accesses), dict(kinds), report.summary())
    return report
