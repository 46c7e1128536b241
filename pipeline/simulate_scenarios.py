"""Labeled incidents and decoys injected into the simulated routine.

Scenario dates are fixed in October 2026 (the default simulated month) because several depend
on the calendar: the holiday incident falls on Dussehra, an Indian public holiday, and the
travel decoy spans the US Columbus Day weekend. :func:`pipeline.simulate.generate` keeps only
the scenarios that lie inside the simulated period.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import numpy as np

from pipeline.simulate_population import Access, Principal

__all__ = ["Scenario", "build_scenarios"]

OFF_HOURS: Final = "keytrail.off_hours"
NEW_COUNTRY: Final = "keytrail.new_country"
IMPOSSIBLE_TRAVEL: Final = "keytrail.impossible_travel"
FAILURE_BURST: Final = "keytrail.failure_burst"
FIRST_SEEN: Final = "keytrail.first_seen"
RISK: Final = "keytrail.risk"
VOLUME_SPIKE: Final = "keytrail.volume_spike"
ISOLATION_FOREST: Final = "keytrail.isolation_forest"

LocalToUs = Callable[[date, time, str], int]


@dataclass
class Scenario:
    """One injected incident (``detectors`` set), decoy (``must_not_fire`` set) or expected span.

    An expected span (``expected`` set) injects nothing: it labels routine activity that a
    detector flags by design, such as the days before a learned baseline applies.
    ``may_fire`` lists detectors whose findings on an incident are correct but not required.
    """

    id: str
    kind: str
    principal: Principal | None
    cloud: str
    description: str
    detectors: list[str] = field(default_factory=list)
    must_not_fire: list[str] = field(default_factory=list)
    accesses: list[Access] = field(default_factory=list)
    source_ip: str | None = None
    # (principal key, start, end) spans whose routine calls this scenario replaces.
    cleared: list[tuple[str, int, int]] = field(default_factory=list)
    principals: list[str] = field(default_factory=list)
    may_fire: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    # (start, end) in epoch microseconds for a scenario without calls of its own.
    span: tuple[int, int] | None = None

    @property
    def start_us(self) -> int:
        """Time of the first injected call (or the span's start), in epoch microseconds."""
        if self.span is not None and not self.accesses:
            return self.span[0]
        return min(access.time_us for access in self.accesses)

    @property
    def end_us(self) -> int:
        """Time of the last injected call (or the span's end), in epoch microseconds."""
        if self.span is not None and not self.accesses:
            return self.span[1]
        return max(access.time_us for access in self.accesses)

    def replaces(self, access: Access) -> bool:
        """Return True when ``access`` is a routine call inside a span this scenario clears."""
        return any(
            access.principal.key == key and start <= access.time_us < end
            for key, start, end in self.cleared
        )

    def label(self) -> dict[str, Any]:
        """Return the labels.json entry."""
        entry: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "principal": self.principal.key if self.principal else None,
            "cloud": self.cloud,
            "start": _iso(self.start_us),
            "end": _iso(self.end_us),
        }
        if self.principal and self.principal.aliases:
            entry["aliases"] = list(self.principal.aliases)
        if self.principals:
            entry["principals"] = list(self.principals)
        if self.source_ip:
            entry["source_ip"] = self.source_ip
        if self.detectors:
            entry["detectors"] = list(self.detectors)
            if self.may_fire:
                entry["may_fire"] = list(self.may_fire)
        elif self.expected:
            entry["expected"] = list(self.expected)
        else:
            entry["must_not_fire"] = list(self.must_not_fire)
        entry["description"] = self.description
        return entry


def _iso(time_us: int) -> str:
    moment = datetime.fromtimestamp(time_us // 1_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock(text: str) -> time:
    hours, minutes = text.split(":")[:2]
    seconds = text.split(":")[2] if text.count(":") == 2 else "0"
    return time(int(hours), int(minutes), int(seconds))


def _reads(
    rng: np.random.Generator,
    principal: Principal,
    day: date,
    clocks: list[str],
    ip: str,
    to_us: LocalToUs,
) -> list[Access]:
    zone = principal.timezone
    calls = []
    for index, clock in enumerate(clocks):
        secret = principal.secrets[index % len(principal.secrets)]
        moment = to_us(day, _clock(clock), zone) + int(rng.integers(0, 1_000_000))
        calls.append(Access(moment, principal, "read", (secret,), "success", ip))
    return calls


def _whole_local_days(
    principal: Principal, first: date, last: date, to_us: LocalToUs
) -> tuple[str, int, int]:
    start = to_us(first, time(0, 0), principal.timezone)
    end = to_us(last + timedelta(days=1), time(0, 0), principal.timezone)
    return (principal.key, start, end)


def build_scenarios(
    rng: np.random.Generator,
    population: dict[str, Principal],
    attacker_ips: dict[str, Any],
    to_us: LocalToUs,
) -> list[Scenario]:
    """Build every incident and decoy of the default month."""
    scenarios: list[Scenario] = []

    maria = population["maria.lopez"]
    scenarios.append(
        Scenario(
            "off-hours-maria",
            "off_hours",
            maria,
            "gcp",
            "maria.lopez (New York) reads four secrets between 03:05 and 03:40 local time on "
            "a Tuesday, from her usual address.",
            detectors=[OFF_HOURS],
            accesses=_reads(
                rng,
                maria,
                date(2026, 10, 13),
                ["3:05", "3:14", "3:26", "3:38"],
                maria.ips[0],
                to_us,
            ),
        )
    )

    lena = population["lena.fischer"]
    scenarios.append(
        Scenario(
            "off-hours-lena",
            "off_hours",
            lena,
            "aws",
            "lena.fischer (Berlin, AWS IAM Identity Center session) reads four secrets between "
            "02:20 and 02:55 local time on a Thursday.",
            detectors=[OFF_HOURS],
            accesses=_reads(
                rng, lena, date(2026, 10, 22), ["2:20", "2:31", "2:44", "2:52"], lena.ips[0], to_us
            ),
        )
    )

    ananya = population["ananya.das"]
    scenarios.append(
        Scenario(
            "off-hours-holiday-ananya",
            "off_hours",
            ananya,
            "gcp",
            "ananya.das (Kolkata) reads three secrets at 11:00 local time on Dussehra, "
            "a public holiday in India (2026-10-20).",
            detectors=[OFF_HOURS],
            accesses=_reads(
                rng, ananya, date(2026, 10, 20), ["11:02", "11:15", "11:40"], ananya.ips[0], to_us
            ),
        )
    )

    arjun = population["arjun.banerjee"]
    trip_day = date(2026, 10, 21)
    scenarios.append(
        Scenario(
            "new-country-arjun",
            "new_country",
            arjun,
            "azure",
            "arjun.banerjee (Kolkata, three weeks of history from India) reads five secrets "
            "during his working hours from an address in Amsterdam, Netherlands.",
            detectors=[NEW_COUNTRY],
            accesses=_reads(
                rng,
                arjun,
                trip_day,
                ["10:05", "11:20", "13:45", "14:30", "15:10"],
                attacker_ips["amsterdam"][0],
                to_us,
            ),
            cleared=[_whole_local_days(arjun, trip_day, trip_day, to_us)],
        )
    )

    jonas = population["jonas.weber"]
    travel_day = date(2026, 10, 14)
    travel_reads = _reads(rng, jonas, travel_day, ["10:30"], jonas.ips[0], to_us)
    travel_reads += _reads(
        rng, jonas, travel_day, ["12:00", "12:07", "12:19"], attacker_ips["sao_paulo"], to_us
    )
    scenarios.append(
        Scenario(
            "impossible-travel-jonas",
            "impossible_travel",
            jonas,
            "gcp",
            "jonas.weber reads a secret from Berlin at 10:30 local time, then three secrets "
            "from São Paulo, Brazil 90 minutes later (about 10,000 km, a country he never used).",
            detectors=[IMPOSSIBLE_TRAVEL, NEW_COUNTRY],
            accesses=travel_reads,
            cleared=[
                (
                    jonas.key,
                    to_us(travel_day, time(10, 0), jonas.timezone),
                    to_us(travel_day + timedelta(days=1), time(0, 0), jonas.timezone),
                )
            ],
        )
    )

    etl = population["gcp-reporting-etl"]
    guess_ip = attacker_ips["bucharest"]
    burst_start = to_us(date(2026, 10, 27), time(14, 2, 10), "UTC")
    pool = (
        "bigquery-export-key",
        "looker-client-secret",
        "salesforce-refresh-token",
        "warehouse-db-password",
        "etl-sftp-password",
        "ads-api-developer-token",
        "crm-webhook-secret",
        "backup-gpg-passphrase",
    )
    guesses = [
        Access(
            burst_start + index * 18_000_000 + int(rng.integers(0, 900_000)),
            etl,
            "read",
            (pool[index % len(pool)],),
            "denied",
            guess_ip,
        )
        for index in range(15)
    ]
    guesses.append(
        Access(burst_start + 380_000_000, etl, "read", ("invoice-api-token",), "success", guess_ip)
    )
    scenarios.append(
        Scenario(
            "failure-burst-reporting-etl",
            "failure_burst",
            etl,
            "gcp",
            "The reporting-etl service account is denied 15 times (status 7) across 8 secrets "
            "within 5 minutes from one public address in Bucharest, then reads a ninth secret "
            "successfully: credential guessing with a stolen key.",
            detectors=[FAILURE_BURST],
            may_fire=[FIRST_SEEN, RISK, VOLUME_SPIKE, ISOLATION_FOREST],
            accesses=guesses,
            source_ip=guess_ip,
        )
    )

    spray_ip = attacker_ips["amsterdam"][1]
    sprayed = [
        population[handle]
        for handle in ("az-batch-jobs", "az-svc-reporting", "az-web-frontend", "az-billing-export")
    ]
    spray_start = to_us(date(2026, 10, 29), time(21, 40, 5), "UTC")
    spray = []
    for index in range(12):
        target = sprayed[index % len(sprayed)]
        secret = target.secrets[index % len(target.secrets)]
        moment = spray_start + index * 30_000_000 + int(rng.integers(0, 2_000_000))
        spray.append(Access(moment, target, "read", (secret,), "denied", spray_ip))
    scenarios.append(
        Scenario(
            "failure-burst-source-ip",
            "failure_burst",
            None,
            "azure",
            "One public address in Amsterdam is refused (HTTP 403) 12 times in 6 minutes while "
            "presenting tokens of four different Azure identities, three denials each.",
            detectors=[FAILURE_BURST],
            may_fire=[RISK],
            accesses=spray,
            source_ip=spray_ip,
            principals=[target.key for target in sprayed],
        )
    )

    scenarios.extend(_decoys(rng, population, attacker_ips, to_us))
    return scenarios


def _decoys(
    rng: np.random.Generator,
    population: dict[str, Principal],
    attacker_ips: dict[str, Any],
    to_us: LocalToUs,
) -> list[Scenario]:
    decoys: list[Scenario] = []

    david = population["david.kim"]
    flight_day = date(2026, 10, 8)
    next_day = flight_day + timedelta(days=1)
    west = "America/Los_Angeles"
    trip = _reads(rng, david, flight_day, ["8:31", "9:02", "9:30"], david.ips[0], to_us)
    sf_ip = attacker_ips["san_francisco"]
    trip += _reads(rng, david, flight_day, ["17:30", "18:02", "18:28"], sf_ip, to_us)
    trip += _reads(
        rng, david, next_day, ["11:20", "13:05", "15:40", "17:10", "18:25"], sf_ip, to_us
    )
    decoys.append(
        Scenario(
            "decoy-flight-david",
            "travel_same_country",
            david,
            "aws",
            "david.kim reads from New York at 09:30, flies to San Francisco and reads from there "
            f"8 hours later (about 4,130 km, about 516 km/h), inside New York business hours "
            f"({west} 14:30-15:30 and next day 08:20-15:25).",
            must_not_fire=[IMPOSSIBLE_TRAVEL, NEW_COUNTRY, OFF_HOURS],
            accesses=trip,
            cleared=[_whole_local_days(david, flight_day, next_day, to_us)],
        )
    )

    ci = population["aws-ci-deploy"]
    deploy_day = date(2026, 10, 6)
    deploy = [
        Access(
            to_us(deploy_day, time(3, 0, 4 + 3 * index), "UTC"),
            ci,
            "read",
            (secret,),
            "success",
            ci.ips[0],
        )
        for index, secret in enumerate(ci.secrets)
    ]
    decoys.append(
        Scenario(
            "decoy-ci-night-deploy",
            "ci_night_deploy",
            ci,
            "aws",
            "The ci-deploy role reads its deploy secrets at 03:00 UTC; roles are not people, "
            "so off-hours rules do not apply.",
            must_not_fire=[OFF_HOURS],
            accesses=deploy,
        )
    )

    invoice = population["gcp-invoice-sync"]
    broken_day = date(2026, 10, 19)
    outage_start = to_us(broken_day, time(13, 0), "UTC")
    outage = [
        Access(
            outage_start + index * 300_000_000 + int(rng.integers(0, 20_000_000)),
            invoice,
            "read",
            invoice.secrets[:1],
            "denied",
            invoice.ips[0],
        )
        for index in range(24)
    ]
    outage.append(
        Access(
            outage_start + 7_320_000_000,
            invoice,
            "read",
            invoice.secrets[:1],
            "success",
            invoice.ips[0],
        )
    )
    decoys.append(
        Scenario(
            "decoy-misconfigured-invoice-sync",
            "recurring_denials",
            invoice,
            "gcp",
            "invoice-sync lost its IAM binding: one denial every 5 minutes for 2 hours (at most "
            "3 in any 10 minutes), then access is restored and reads succeed again.",
            must_not_fire=[FAILURE_BURST],
            accesses=outage,
            cleared=[(invoice.key, outage_start, outage_start + 7_400_000_000)],
        )
    )

    sarah = population["sarah.oconnor"]
    decoys.append(
        Scenario(
            "decoy-late-sarah",
            "working_late",
            sarah,
            "azure",
            "sarah.oconnor (New York) reads a secret at 18:30 local time, inside business "
            "hours (08:00-19:00).",
            must_not_fire=[OFF_HOURS],
            accesses=_reads(rng, sarah, date(2026, 10, 7), ["18:30"], sarah.ips[0], to_us),
        )
    )
    return decoys
