"""Principals, routines and labeled scenarios for the detectors that learn baselines.

These cover ``keytrail.volume_spike``, ``keytrail.mass_retrieval``, ``keytrail.first_seen``,
``keytrail.cross_cloud``, the learned hours of ``keytrail.off_hours``,
``keytrail.isolation_forest`` and ``keytrail.risk``. Everything here draws from its own random
generator, so adding it left the calls of the older scenarios unchanged.

Some detectors flag routine activity by design while they learn: a night-shift engineer is
judged against the office-hours schedule until ``keytrail.off_hours`` has
:data:`LEARNED_HOURS_MIN_DAYS` earlier days of reads. Such spans are labeled ``expected``,
which ``keytrail evaluate`` counts apart from true and false positives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

import holidays
import numpy as np

from pipeline.simulate_geo import GeoPicker
from pipeline.simulate_population import SECRETS, Access, Principal, build_person
from pipeline.simulate_scenarios import LocalToUs, Scenario

__all__ = [
    "LEARNED_HOURS_MIN_DAYS",
    "NEW_ENGINEER_START",
    "Newcomers",
    "build_baseline_scenarios",
    "build_newcomers",
    "newcomer_routines",
]

VOLUME_SPIKE: Final = "keytrail.volume_spike"
MASS_RETRIEVAL: Final = "keytrail.mass_retrieval"
FIRST_SEEN: Final = "keytrail.first_seen"
CROSS_CLOUD: Final = "keytrail.cross_cloud"
OFF_HOURS: Final = "keytrail.off_hours"
ISOLATION_FOREST: Final = "keytrail.isolation_forest"
RISK: Final = "keytrail.risk"

# Days with reads that keytrail.off_hours needs before a principal's learned hours apply
# (its min_learning_days default); earlier days are judged against the office-hours schedule.
LEARNED_HOURS_MIN_DAYS: Final = 10
# The new engineer's first working day, a Monday.
NEW_ENGINEER_START: Final = date(2026, 10, 19)
# The user agent of the account takeover: a script, not the victim's Azure CLI.
TAKEOVER_USER_AGENT: Final = "python-requests/2.32.3"
_DAY_US: Final = 86_400_000_000
_MINUTE_US: Final = 60_000_000

PersonRoutine = Callable[[np.random.Generator, Principal, date, int], list[Access]]


@dataclasses.dataclass
class Newcomers:
    """The principals added for the learning detectors, and addresses drawn for scenarios."""

    principals: dict[str, Principal]
    intruder_los_angeles: str
    intruder_berlin: str


def build_newcomers(
    rng: np.random.Generator, geo: GeoPicker, population: dict[str, Principal]
) -> Newcomers:
    """Build the new engineer, the night-shift engineer, the morning reader and maria's AWS.

    ``geo`` must already hold every address of ``population`` as reserved.
    """
    noah = build_person(
        rng, geo, "noah.park", "new_york", "America/New_York", "US", "gcp", "kt-prod-3817"
    )
    noah.secrets = SECRETS["gcp:kt-prod-3817"][:6]
    carlos = build_person(
        rng, geo, "carlos.ruiz", "new_york", "America/New_York", "US", "gcp", "kt-data-5522"
    )
    sofia = build_person(
        rng, geo, "sofia.rossi", "berlin", "Europe/Berlin", "DE", "azure", "KV-PLATFORM-SHARED"
    )
    maria = population["maria.lopez"]
    maria_aws = build_person(
        rng,
        geo,
        "maria.lopez",
        "new_york",
        "America/New_York",
        "US",
        "aws",
        "prod",
        region="us-east-1",
        aws_identity="SSO",
    )
    # The same laptop and home connection as her Google Cloud reads.
    maria_aws.ips = list(maria.ips)
    return Newcomers(
        principals={
            "noah.park": noah,
            "carlos.ruiz": carlos,
            "sofia.rossi": sofia,
            "maria.lopez-aws": maria_aws,
        },
        intruder_los_angeles=geo.pick("los_angeles", 1)[0],
        intruder_berlin=geo.pick("berlin", 1)[0],
    )


def _local_time(rng: np.random.Generator, first_hour: float, last_hour: float) -> time:
    seconds = int(rng.uniform(first_hour, last_hour) * 3600)
    return time(seconds // 3600, (seconds % 3600) // 60, seconds % 60)


def _working_days(person: Principal, start: date, days: int) -> list[date]:
    end = start + timedelta(days=days)
    country = person.holidays_country or "US"
    calendar = holidays.country_holidays(country, years=range(start.year, end.year + 1))
    every_day = [start + timedelta(days=offset) for offset in range(days)]
    return [day for day in every_day if day.weekday() < 5 and day not in calendar]


def _fixed_hours_routine(
    rng: np.random.Generator,
    person: Principal,
    start: date,
    days: int,
    hours: tuple[float, float],
    to_us: LocalToUs,
) -> list[Access]:
    """Draw 2 to 4 reads of the person's secrets on each working day, inside ``hours`` (local)."""
    accesses = []
    for day in _working_days(person, start, days):
        for _ in range(2 + int(rng.integers(0, 3))):
            moment = to_us(day, _local_time(rng, *hours), person.timezone)
            secret = person.secrets[int(rng.integers(len(person.secrets)))]
            accesses.append(Access(moment, person, "read", (secret,), "success", person.ips[0]))
    return accesses


def _two_cloud_routine(
    rng: np.random.Generator,
    gcp: Principal,
    aws: Principal,
    start: date,
    days: int,
    to_us: LocalToUs,
) -> list[Access]:
    """Draw one Google Cloud read and two AWS reads within 15 minutes on each working day.

    On the first working day the AWS reads come at 09:00 and the Google Cloud read at 16:00,
    so the clouds are hours apart. On later days they are minutes apart.
    """
    accesses = []
    for index, day in enumerate(_working_days(aws, start, days)):
        if index == 0:
            aws_start = to_us(day, time(9, 0), aws.timezone)
            gcp_moment = to_us(day, time(16, 0), gcp.timezone)
        else:
            gcp_moment = to_us(day, _local_time(rng, 10.0, 16.0), gcp.timezone)
            aws_start = gcp_moment + int(rng.integers(2, 8)) * _MINUTE_US
        secret = gcp.secrets[int(rng.integers(len(gcp.secrets)))]
        accesses.append(Access(gcp_moment, gcp, "read", (secret,), "success", gcp.ips[0]))
        for offset in range(2):
            secret = aws.secrets[int(rng.integers(len(aws.secrets)))]
            moment = aws_start + offset * int(rng.integers(1, 7)) * _MINUTE_US
            accesses.append(Access(moment, aws, "read", (secret,), "success", aws.ips[0]))
    return accesses


def newcomer_routines(
    rng: np.random.Generator,
    population: dict[str, Principal],
    start: date,
    days: int,
    person_routine: PersonRoutine,
    to_us: LocalToUs,
) -> list[Access]:
    """Draw the routine calls of the principals that :func:`build_newcomers` added."""
    accesses: list[Access] = []
    joined = (NEW_ENGINEER_START - start).days
    if joined < days:
        first = max(joined, 0)
        accesses += person_routine(
            rng, population["noah.park"], start + timedelta(days=first), days - first
        )
    # The night-shift engineer reads between 01:30 and 03:30 New York time.
    accesses += _fixed_hours_routine(rng, population["carlos.ruiz"], start, days, (1.5, 3.5), to_us)
    # The morning reader checks the platform vault between 09:00 and 10:30 Berlin time.
    accesses += _fixed_hours_routine(
        rng, population["sofia.rossi"], start, days, (9.0, 10.5), to_us
    )
    accesses += _two_cloud_routine(
        rng, population["maria.lopez"], population["maria.lopez-aws"], start, days, to_us
    )
    return accesses


def _reads_at(
    rng: np.random.Generator,
    principal: Principal,
    day: date,
    clocks: list[time],
    secrets: tuple[str, ...],
    ip: str,
    to_us: LocalToUs,
    outcome: str = "success",
) -> list[Access]:
    return [
        Access(
            to_us(day, clock, principal.timezone) + int(rng.integers(0, 1_000_000)),
            principal,
            "read",
            (secrets[index % len(secrets)],),
            outcome,
            ip,
        )
        for index, clock in enumerate(clocks)
    ]


def _local_days_span(
    principal: Principal, first: date, last: date, to_us: LocalToUs
) -> tuple[int, int]:
    """Return the epoch-microsecond span from ``first`` 00:00 to ``last`` 23:59:59 local time."""
    begin = to_us(first, time(0, 0), principal.timezone)
    end = to_us(last + timedelta(days=1), time(0, 0), principal.timezone) - 1_000_000
    return begin, end


def _unread(principal: Principal, count: int) -> tuple[str, ...]:
    pool = SECRETS[f"{principal.cloud}:{principal.scope}"]
    return tuple(secret for secret in pool if secret not in principal.secrets)[:count]


def _learning_split(
    accesses: list[Access], principal: Principal
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Split a principal's reads at its first day judged by learned hours.

    Returns the (first, last) times before that day and from it, or None when it never comes.
    """
    zone = ZoneInfo(principal.timezone)
    times = sorted(access.time_us for access in accesses if access.principal is principal)
    days = sorted({_local_date(moment, zone) for moment in times})
    if len(days) <= LEARNED_HOURS_MIN_DAYS:
        return None
    learned_from = days[LEARNED_HOURS_MIN_DAYS]
    before = [moment for moment in times if _local_date(moment, zone) < learned_from]
    after = [moment for moment in times if _local_date(moment, zone) >= learned_from]
    return (before[0], before[-1]), (after[0], after[-1])


def _local_date(time_us: int, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(time_us / 1_000_000, tz=UTC).astimezone(zone).date()


def build_baseline_scenarios(
    rng: np.random.Generator,
    population: dict[str, Principal],
    newcomers: Newcomers,
    routine: list[Access],
    to_us: LocalToUs,
) -> list[Scenario]:
    """Build the incidents, decoys and expected spans of the learning detectors.

    ``routine`` holds the newcomers' routine calls, from which the decoys take their spans.
    """
    scenarios = _volume_scenarios(rng, population, to_us)
    scenarios += _mass_retrieval_scenarios(rng, population, to_us)
    scenarios += _first_seen_scenarios(rng, population, to_us)
    scenarios += _cross_cloud_scenarios(rng, population, newcomers, routine, to_us)
    scenarios += _learned_hours_scenarios(rng, population, routine, to_us)
    scenarios.append(_takeover(rng, population, newcomers, to_us))
    return scenarios


def _volume_scenarios(
    rng: np.random.Generator, population: dict[str, Principal], to_us: LocalToUs
) -> list[Scenario]:
    checkout = population["gcp-checkout"]
    spike_day = date(2026, 10, 23)
    spike_start = to_us(spike_day, time(13, 5), "UTC")
    spike = [
        Access(
            spike_start + index * 36_000_000 + int(rng.integers(0, 5_000_000)),
            checkout,
            "read",
            (checkout.secrets[index % len(checkout.secrets)],),
            "success",
            checkout.ips[0],
        )
        for index in range(400)
    ]
    batch = population["az-batch-jobs"]
    close_day = date(2026, 10, 30)
    close_start = to_us(close_day, time(0, 0), "UTC")
    runs = []
    for run in range(36):
        moment = close_start + run * 40 * _MINUTE_US + batch.minute * 1_000_000
        for index in range(batch.reads_per_run):
            secret = batch.secrets[(run + index) % len(batch.secrets)]
            runs.append(
                Access(moment + index * 400_000, batch, "read", (secret,), "success", batch.ips[0])
            )
    return [
        Scenario(
            "volume-spike-checkout",
            "volume_spike",
            checkout,
            "gcp",
            "The checkout service account, which reads one secret an hour (24 a day), reads its "
            "three secrets 400 times between 13:05 and 17:05 UTC on Friday 2026-10-23.",
            detectors=[VOLUME_SPIKE],
            may_fire=[ISOLATION_FOREST, RISK],
            accesses=spike,
        ),
        Scenario(
            "decoy-quarter-end-batch",
            "quarter_end_batch",
            batch,
            "azure",
            "mi-batch-jobs runs every 40 minutes instead of every 2 hours on Friday 2026-10-30, "
            "the last working day of a fiscal quarter that ends on 31 October: 72 reads instead "
            "of 24. The allow-list entry for quarter-end close in config.yaml removes the finding.",
            must_not_fire=[VOLUME_SPIKE],
            accesses=runs,
            cleared=[(batch.key, close_start, close_start + _DAY_US)],
        ),
    ]


def _enumerate_then_read(
    rng: np.random.Generator, principal: Principal, start_us: int, secrets: tuple[str, ...]
) -> list[Access]:
    calls = [Access(start_us, principal, "list", (), "success", principal.ips[0])]
    for index, secret in enumerate(secrets):
        moment = start_us + 20_000_000 + index * 14_000_000 + int(rng.integers(0, 3_000_000))
        calls.append(Access(moment, principal, "read", (secret,), "success", principal.ips[0]))
    return calls


def _mass_retrieval_scenarios(
    rng: np.random.Generator, population: dict[str, Principal], to_us: LocalToUs
) -> list[Scenario]:
    aws_ci = population["aws-ci-deploy"]
    gcp_ci = population["gcp-cloudbuild"]
    aws_secrets = SECRETS["aws:prod"]
    gcp_secrets = SECRETS["gcp:kt-data-5522"]
    return [
        Scenario(
            "mass-retrieval-ci-aws",
            "mass_retrieval",
            aws_ci,
            "aws",
            "The ci-deploy role, which reads its 3 deploy secrets, calls ListSecrets at 02:14 UTC "
            f"on Tuesday 2026-10-27 and reads all {len(aws_secrets)} secrets of the prod "
            "account in the next 3 minutes: a pipeline running an attacker's job.",
            detectors=[MASS_RETRIEVAL],
            may_fire=[FIRST_SEEN, RISK, ISOLATION_FOREST, VOLUME_SPIKE],
            accesses=_enumerate_then_read(
                rng, aws_ci, to_us(date(2026, 10, 27), time(2, 14), "UTC"), aws_secrets
            ),
        ),
        Scenario(
            "mass-retrieval-ci-gcp",
            "mass_retrieval",
            gcp_ci,
            "gcp",
            "The Cloud Build service account, which reads its 3 build secrets, lists the secrets "
            f"of kt-data-5522 at 19:40 UTC on Wednesday 2026-10-28 and reads all "
            f"{len(gcp_secrets)} of them in the next 3 minutes.",
            detectors=[MASS_RETRIEVAL],
            may_fire=[FIRST_SEEN, RISK, ISOLATION_FOREST, VOLUME_SPIKE],
            accesses=_enumerate_then_read(
                rng, gcp_ci, to_us(date(2026, 10, 28), time(19, 40), "UTC"), gcp_secrets
            ),
        ),
    ]


def _first_seen_scenarios(
    rng: np.random.Generator, population: dict[str, Principal], to_us: LocalToUs
) -> list[Scenario]:
    priya = population["priya.shah"]
    extra = _unread(priya, 6)
    slow = []
    for offset, day in enumerate((date(2026, 10, 27), date(2026, 10, 28), date(2026, 10, 29))):
        pair = extra[2 * offset : 2 * offset + 2]
        slow += _reads_at(rng, priya, day, [time(11, 12), time(14, 37)], pair, priya.ips[0], to_us)
    noah = population["noah.park"]
    first_week = _local_days_span(
        noah, NEW_ENGINEER_START, NEW_ENGINEER_START + timedelta(days=4), to_us
    )
    return [
        Scenario(
            "first-seen-slow-reader-priya",
            "first_seen",
            priya,
            "gcp",
            "priya.shah, who reads the same 4 secrets every day, also reads two secrets she never "
            "read before on each of 2026-10-27, 10-28 and 10-29 (New York business hours): a "
            f"slow collection of {', '.join(extra)}.",
            detectors=[FIRST_SEEN],
            may_fire=[RISK],
            accesses=slow,
        ),
        Scenario(
            "decoy-new-engineer-noah",
            "new_engineer",
            noah,
            "gcp",
            "noah.park joins on Monday 2026-10-19; every read of his first week is a first read "
            "of a secret. He is inside keytrail.first_seen's 14-day learning period.",
            must_not_fire=[FIRST_SEEN, RISK],
            span=first_week,
        ),
    ]


def _cross_cloud_scenarios(
    rng: np.random.Generator,
    population: dict[str, Principal],
    newcomers: Newcomers,
    routine: list[Access],
    to_us: LocalToUs,
) -> list[Scenario]:
    kevin = population["kevin.nguyen"]
    emily = population["emily.chen"]
    address = newcomers.intruder_los_angeles
    day = date(2026, 10, 22)
    calls = _reads_at(rng, kevin, day, [time(14, 10), time(14, 16)], kevin.secrets, address, to_us)
    calls += _reads_at(rng, emily, day, [time(14, 41), time(14, 49)], emily.secrets, address, to_us)
    maria_aws = population["maria.lopez-aws"]
    maria_days = sorted(access.time_us for access in routine if access.principal is maria_aws)
    scenarios = [
        Scenario(
            "cross-cloud-intruder",
            "cross_cloud",
            None,
            "aws",
            "One address in Los Angeles reads two AWS secrets as kevin.nguyen at 14:10 and, "
            "31 minutes later, two Google Cloud secrets as emily.chen (Thursday 2026-10-22, "
            "Los Angeles business hours, the victims' own city).",
            detectors=[CROSS_CLOUD],
            may_fire=[RISK, FIRST_SEEN],
            accesses=calls,
            source_ip=address,
            principals=[kevin.key, emily.key],
        )
    ]
    if not maria_days:
        return scenarios
    scenarios.append(
        Scenario(
            "decoy-two-clouds-maria",
            "two_clouds_daily",
            maria_aws,
            "aws",
            "maria.lopez reads one Google Cloud secret and, minutes later, two AWS secrets "
            "(IAM Identity Center session) on every working day from the same home address; "
            "on her first day the two clouds are hours apart.",
            must_not_fire=[CROSS_CLOUD],
            span=(maria_days[0], maria_days[-1]),
        )
    )
    return scenarios


def _learned_hours_scenarios(
    rng: np.random.Generator,
    population: dict[str, Principal],
    routine: list[Access],
    to_us: LocalToUs,
) -> list[Scenario]:
    sofia = population["sofia.rossi"]
    odd = _reads_at(
        rng,
        sofia,
        date(2026, 10, 29),
        [time(16, 40), time(16, 48), time(16, 55)],
        sofia.secrets,
        sofia.ips[0],
        to_us,
    )
    scenarios = [
        Scenario(
            "off-hours-learned-sofia",
            "off_pattern",
            sofia,
            "azure",
            "sofia.rossi (Berlin), who reads only between 09:00 and 10:30, reads three secrets "
            "at 16:40-16:55 on Thursday 2026-10-29: inside business hours, outside her own "
            "pattern.",
            detectors=[OFF_HOURS],
            may_fire=[RISK, ISOLATION_FOREST],
            accesses=odd,
        )
    ]
    carlos = population["carlos.ruiz"]
    split = _learning_split(routine, carlos)
    if split is None:
        return scenarios
    learning, learned = split
    scenarios.append(
        Scenario(
            "expected-night-shift-learning-carlos",
            "learning",
            carlos,
            "gcp",
            f"carlos.ruiz's first {LEARNED_HOURS_MIN_DAYS} nights: too few days for learned "
            "hours, so keytrail.off_hours judges his 02:00 reads against office hours.",
            expected=[OFF_HOURS],
            span=learning,
        )
    )
    scenarios.append(
        Scenario(
            "decoy-night-shift-carlos",
            "night_shift",
            carlos,
            "gcp",
            "carlos.ruiz (New York) works nights and reads secrets between 01:30 and 03:30 on "
            "every working day; from his 11th night his learned hours cover them.",
            must_not_fire=[OFF_HOURS],
            span=learned,
        )
    )
    return scenarios


def _takeover(
    rng: np.random.Generator,
    population: dict[str, Principal],
    newcomers: Newcomers,
    to_us: LocalToUs,
) -> Scenario:
    felix = population["felix.wagner"]
    intruder = dataclasses.replace(felix, user_agent=TAKEOVER_USER_AGENT)
    address = newcomers.intruder_berlin
    day = date(2026, 10, 27)
    new_secrets = _unread(felix, 4)
    calls = _reads_at(
        rng,
        intruder,
        day,
        [time(16, 12), time(16, 19), time(16, 31)],
        new_secrets[2:],
        address,
        to_us,
        outcome="denied",
    )
    calls += _reads_at(
        rng,
        intruder,
        day,
        [time(16, 24), time(16, 36), time(16, 44)],
        new_secrets[:2],
        address,
        to_us,
    )
    calls += _reads_at(
        rng,
        intruder,
        day,
        [time(16, 27), time(16, 41), time(16, 50), time(16, 57)],
        felix.secrets,
        address,
        to_us,
    )
    calls += _reads_at(
        rng,
        intruder,
        day,
        [time(17, 6), time(17, 22)],
        new_secrets[2:],
        address,
        to_us,
        outcome="denied",
    )
    calls += _reads_at(
        rng, intruder, day, [time(17, 14), time(17, 31)], new_secrets[1:3], address, to_us
    )
    return Scenario(
        "takeover-felix",
        "account_takeover",
        felix,
        "azure",
        "Someone with felix.wagner's token reads from a new Berlin address with a new user agent "
        f"({TAKEOVER_USER_AGENT}) at 16:12-17:31 on Tuesday 2026-10-27: 5 denials, 3 secrets he "
        "never read, 4 of his usual ones. Each signal alone is weak.",
        detectors=[RISK, ISOLATION_FOREST],
        may_fire=[FIRST_SEEN, OFF_HOURS],
        accesses=calls,
        source_ip=address,
    )
