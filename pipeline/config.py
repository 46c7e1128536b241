"""Load config.yaml into typed settings.

Every model forbids unknown keys, so a misspelt key is an error rather than a silently ignored
setting. :func:`load_config` collects every problem in the file and raises one
:class:`~pipeline.errors.ConfigError` whose lines each name the key path, what is accepted and
the value found. Relative paths resolve against the folder of the config file.

``sources`` and ``detectors`` are required keys, so an empty or half-written file is an error
rather than a run that reads and detects nothing. Writing them empty (``sources: []``, only
``--source`` paths are read; ``detectors: {}``, nothing is detected) is accepted, and
:func:`config_warnings` reports it. Integer and boolean settings are strict: YAML ``true`` is not
accepted as the number 1, and ``1`` or ``"yes"`` is not accepted as a boolean.

Detector entries hold ``enabled`` plus the detector's own parameters. The parameters are checked
by constructing the registered detector class, so a bad parameter fails at load time. Only
detectors listed in the config run: a detector added by an upgrade stays off until it is listed.

No setting contains a secret. Credentials for later channels and sources come from environment
variables or secret files.
"""

from __future__ import annotations

import logging
import os
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Importing the package registers the built-in detectors, which validation looks up.
import detectors  # noqa: F401
from detectors.base import Detector, get_detector, registered_detectors
from pipeline.alerting.delivery import (
    AlertingSettings,
    resolve_receiver_paths,
    with_env_receivers,
)
from pipeline.alerting.silences import InvalidSilenceError, parse_duration
from pipeline.enrich import GeoIP, GeoIPSettings
from pipeline.errors import ConfigError
from pipeline.sources import AnySourceSettings, FilesSourceSettings

__all__ = [
    "DEFAULT_CONFIG",
    "DetectorSettings",
    "EnrichSettings",
    "FilesSourceSettings",
    "HistorySettings",
    "LoggingSettings",
    "ScheduleSettings",
    "Settings",
    "build_detectors",
    "check_files",
    "config_warnings",
    "embedded_defaults",
    "load_config",
    "settings_from_mapping",
]

logger = logging.getLogger(__name__)

# The settings of the shipped config.yaml, as data. `embedded_defaults` builds them for notebooks
# and tests that have no config file.
DEFAULT_CONFIG: dict[str, Any] = {
    "state_dir": ".keytrail",
    "output_dir": ".keytrail/output",
    "sources": [
        {
            "name": "sample_logs",
            "type": "files",
            "paths": ["sample_logs/aws", "sample_logs/gcp", "sample_logs/azure"],
        }
    ],
    "enrich": {"geoip": {"enabled": True, "city_db": None, "asn_db": None, "max_age_days": 90}},
    "history": {"retention_days": 400, "seen_retention_days": 30},
    "detectors": {
        "keytrail.off_hours": {
            "enabled": True,
            "timezone": "UTC",
            "business_hours": "08:00-19:00",
            "business_days": ["mon", "tue", "wed", "thu", "fri"],
            "holidays_country": None,
            "principal_types": ["user", "federated", "root"],
            "min_reads": 1,
            "baseline_days": 30,
            "habit_days": 4,
            "high_distinct_secrets": 5,
            "baseline": "both",
            "learning_days": 28,
            "min_learning_days": 10,
            "neighbour_weight": 0.5,
            "same_hour_weight": 0.5,
            "min_support": 1.0,
            "slack_hours": 1,
            "overrides": [
                {
                    "match": "maria.lopez@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {
                    "match": "david.kim@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {
                    "match": "sarah.oconnor@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {"match": "tbecker", "timezone": "America/New_York", "holidays_country": "US"},
                {
                    "match": "priya.shah@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {
                    "match": "kevin.nguyen@example.com",
                    "timezone": "America/Los_Angeles",
                    "holidays_country": "US",
                },
                {
                    "match": "emily.chen@example.com",
                    "timezone": "America/Los_Angeles",
                    "holidays_country": "US",
                },
                {
                    "match": "jake.miller@example.com",
                    "timezone": "America/Los_Angeles",
                    "holidays_country": "US",
                },
                {"match": "obrown", "timezone": "America/Los_Angeles", "holidays_country": "US"},
                {
                    "match": "jonas.weber@example.com",
                    "timezone": "Europe/Berlin",
                    "holidays_country": "DE",
                },
                {
                    "match": "lena.fischer@example.com",
                    "timezone": "Europe/Berlin",
                    "holidays_country": "DE",
                },
                {
                    "match": "felix.wagner@example.com",
                    "timezone": "Europe/Berlin",
                    "holidays_country": "DE",
                },
                {"match": "aschmidt", "timezone": "Europe/Berlin", "holidays_country": "DE"},
                {
                    "match": "max.hoffmann@example.com",
                    "timezone": "Europe/Berlin",
                    "holidays_country": "DE",
                },
                {
                    "match": "arjun.banerjee@example.com",
                    "timezone": "Asia/Kolkata",
                    "holidays_country": "IN",
                },
                {
                    "match": "ananya.das@example.com",
                    "timezone": "Asia/Kolkata",
                    "holidays_country": "IN",
                },
                {
                    "match": "rahul.sen@example.com",
                    "timezone": "Asia/Kolkata",
                    "holidays_country": "IN",
                },
                {
                    "match": "sneha.roy@example.com",
                    "timezone": "Asia/Kolkata",
                    "holidays_country": "IN",
                },
                {
                    "match": "noah.park@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {
                    "match": "carlos.ruiz@example.com",
                    "timezone": "America/New_York",
                    "holidays_country": "US",
                },
                {
                    "match": "sofia.rossi@example.com",
                    "timezone": "Europe/Berlin",
                    "holidays_country": "DE",
                },
            ],
            "account_overrides": [],
        },
        "keytrail.isolation_forest": {
            "enabled": True,
            "features": [
                "reads",
                "distinct_secrets",
                "failures",
                "distinct_ips",
                "countries",
                "asns",
                "new_secret_share",
                "hour_sin",
                "hour_cos",
            ],
            "baseline_days": 14,
            "contamination": 0.005,
            "n_estimators": 100,
            "max_fit_vectors": 20000,
            "random_state": 0,
            "jitter": 1.0,
            "min_history_hours": 24,
            "min_events": 10,
            "min_feature_z": 3.0,
            "top_features": 3,
            "principal_types": None,
            "severity": "medium",
            "refit_hours": 24,
        },
        "keytrail.new_country": {
            "enabled": True,
            "lookback_days": 30,
            "min_history_days": 7,
            "min_history_events": 5,
            "deny_countries": [],
            "severity": "medium",
        },
        "keytrail.impossible_travel": {
            "enabled": True,
            "max_speed_kmh": 900,
            "min_distance_km": 500,
            "max_pairs_in_evidence": 20,
        },
        "keytrail.failure_burst": {
            "enabled": True,
            "min_failures": 10,
            "window_minutes": 10,
            "reasons": ["denied", "not_found"],
            "keys": ["principal", "source_ip"],
            "high_distinct_secrets": 5,
            "success_within_minutes": 30,
        },
        "keytrail.volume_spike": {
            "enabled": True,
            "baseline_days": 30,
            "bucket_hours": 24,
            "min_count": 20,
            "min_ratio": 3,
            "threshold": 5,
            "min_history_days": 7,
            "levels": ["principal", "secret"],
            "top_secrets": 5,
            "medium_ratio": 5,
            "high_ratio": 10,
        },
        "keytrail.mass_retrieval": {
            "enabled": True,
            "windows": [{"minutes": 10, "min_distinct": 20}, {"minutes": 60, "min_distinct": 26}],
            "high_distinct": 50,
            "sequence": True,
            "sequence_minutes": 15,
            "sequence_min_reads": 5,
            "list_operations": ["GetParametersByPath"],
            "usual_days": 3,
            "lookback_days": 30,
        },
        "keytrail.cross_cloud": {
            "enabled": True,
            "window_minutes": 60,
            "lookback_days": 30,
            "min_history_days": 7,
            "keys": ["person", "source_ip"],
        },
        "keytrail.first_seen": {
            "enabled": True,
            "lookback_days": 30,
            "learning_days": 14,
            "sensitive_resources": ["*root*", "*admin*", "*pci*", "*signing-key*"],
            "severity": "low",
            "sensitive_severity": "high",
            "sensitive_during_learning": False,
        },
        "keytrail.risk": {
            "enabled": True,
            "threshold": 10,
            "half_life_hours": 24,
            "weights": {
                "new_asn": 3,
                "new_country": 3,
                "first_seen_secret": 2,
                "new_hour_of_week": 2,
                "access_denied": 2,
                "new_user_agent": 1.5,
                "dormant_return": 2,
            },
            "lookback_days": 30,
            "learning_days": 14,
            "user_agent_days": 7,
            "max_signals_per_hour": 2,
            "high_score": 20,
            "critical_score": 40,
        },
    },
    "alerting": {
        "console": True,
        "outbox": True,
        "min_severity": "low",
        "templates_dir": None,
        "top_events": 5,
        "allow_list": [
            {
                "detectors": ["keytrail.volume_spike"],
                "principals": ["mi-batch-jobs"],
                "reason": "quarter-end close runs the batch jobs every 40 minutes on 2026-10-30",
                "owner": "platform@example.com",
                "expires": "2026-11-02T00:00:00Z",
            }
        ],
    },
    "logging": {"level": "INFO", "format": "text"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrichSettings(_Strict):
    """Enrichment of caller addresses."""

    geoip: GeoIPSettings = Field(default_factory=GeoIPSettings)


class HistorySettings(_Strict):
    """How long events are kept.

    ``retention_days`` applies to the Parquet history and counts back from the newest event
    time in the history, at most the run time, so a run over old logs keeps what it wrote.
    ``seen_retention_days`` is how long seen event ids are kept for deduplication, counted back
    from the run time. It must cover the longest overlap with which a source re-delivers events.
    """

    retention_days: int = Field(default=400, ge=1)
    seen_retention_days: int = Field(default=30, ge=1)

    @model_validator(mode="after")
    def _seen_within_retention(self) -> HistorySettings:
        if self.seen_retention_days > self.retention_days:
            raise ValueError(
                f"seen_retention_days ({self.seen_retention_days}) must not exceed "
                f"retention_days ({self.retention_days})"
            )
        return self


class DetectorSettings(BaseModel):
    """One entry under ``detectors``: ``enabled`` plus the detector's own parameters."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True

    @property
    def params(self) -> dict[str, Any]:
        """The detector's parameters: every key except ``enabled``."""
        return dict(self.model_extra or {})


class LoggingSettings(_Strict):
    """Log level and line format of the command-line tool."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class ScheduleSettings(_Strict):
    """The trigger of ``keytrail schedule``: a crontab line or a fixed interval.

    ``cron`` is a five-field crontab line (minute hour day month weekday) read in ``timezone``.
    The time zone is required with it, so the run hours do not depend on the server's zone.
    ``interval`` is a duration such as ``5m`` or ``1h``. A run that starts later than
    ``misfire_grace_time`` after its planned time (the machine slept, the previous run took
    long) is skipped, and the next one reads everything since the checkpoints.
    ``jitter`` delays each run by a random time up to that duration. ``run_at_start`` runs the
    job as soon as the scheduler starts, which catches up after downtime.
    """

    cron: str | None = None
    interval: timedelta | None = None
    timezone: str | None = None
    misfire_grace_time: timedelta = timedelta(hours=1)
    jitter: timedelta | None = None
    run_at_start: bool = True

    @field_validator("interval", "misfire_grace_time", "jitter", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except InvalidSilenceError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; expected an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleSettings:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("set exactly one of cron (a crontab line) and interval (such as 5m)")
        if self.cron is not None:
            if self.timezone is None:
                raise ValueError(
                    "timezone is required with cron: the IANA name the crontab hours are read in, "
                    "such as UTC or Europe/Berlin"
                )
            try:
                CronTrigger.from_crontab(self.cron, timezone=self.timezone)
            except ValueError as exc:
                raise ValueError(f"invalid cron {self.cron!r}: {exc}") from None
            weekdays = self.cron.split()[4]
            if any(character.isdigit() for character in weekdays):
                # APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0, so a
                # number would silently shift the runs by one day.
                raise ValueError(
                    f"invalid cron {self.cron!r}: write the weekday field with names such as "
                    "mon-fri or sun, not numbers, because APScheduler 3 counts 0 as Monday "
                    "where crontab counts 0 as Sunday"
                )
        return self


class Settings(_Strict):
    """Everything one keytrail run needs, with paths already resolved."""

    state_dir: Path = Path(".keytrail")
    output_dir: Path = Path(".keytrail/output")
    sources: list[AnySourceSettings] = Field(default_factory=list)
    enrich: EnrichSettings = Field(default_factory=EnrichSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    detectors: dict[str, DetectorSettings] = Field(default_factory=dict)
    alerting: AlertingSettings = Field(default_factory=AlertingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    schedule: ScheduleSettings | None = None

    @property
    def enabled_detectors(self) -> list[str]:
        """Ids of the detectors that are listed and enabled, in config order."""
        return [name for name, entry in self.detectors.items() if entry.enabled]


def load_config(path: str | Path) -> Settings:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or has invalid settings. The
            error lists every problem found, one per line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {path}; pass --config FILE or run from the folder that "
            "contains config.yaml",
            source=str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc), source=str(path)) from None
    if data is None or data == {}:
        raise ConfigError(
            "config file is empty; expected at least the keys sources and detectors "
            "(see the config.yaml shipped with keytrail)",
            source=str(path),
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"top level: expected a mapping of settings, found {type(data).__name__}",
            source=str(path),
        )
    settings = settings_from_mapping(data, base_dir=path.resolve().parent, source=str(path))
    logger.debug("loaded config %s", path)
    return settings


def embedded_defaults(base_dir: str | Path | None = None) -> Settings:
    """Return the settings of the shipped config.yaml, paths resolved against ``base_dir``.

    ``base_dir`` defaults to the current folder.
    """
    base = Path.cwd() if base_dir is None else Path(base_dir)
    return settings_from_mapping(DEFAULT_CONFIG, base_dir=base.resolve(), source="defaults")


def settings_from_mapping(
    data: dict[str, Any],
    *,
    base_dir: Path,
    source: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate parsed config data and resolve its relative paths against ``base_dir``.

    When the data defines no ``alerting.receivers``, the ``slack`` and ``email`` receivers
    that ``KEYTRAIL_SLACK_*`` and ``KEYTRAIL_SMTP_*`` variables in ``environ`` (default
    ``os.environ``) describe are added; see
    :func:`pipeline.alerting.delivery.with_env_receivers`.

    Raises:
        ConfigError: with one line per problem, or per invalid environment variable.
    """
    problems: list[str] = [
        f"{key}: missing; {hint}" for key, hint in _REQUIRED_KEYS.items() if key not in data
    ]
    settings: Settings | None = None
    coerced = _coerced_values(Settings, data)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, Settings, prefix=(), skip=coerced))
    problems.extend(f"{_dotted(loc)}: {message}" for loc, message in coerced.items())
    raw_detectors = data.get("detectors")
    if isinstance(raw_detectors, dict):
        problems.extend(_detector_problems(raw_detectors))
    if settings is not None:
        problems.extend(_duplicate_source_names(settings))
    if problems:
        raise ConfigError(problems, source=source)
    assert settings is not None
    settings = _resolve_paths(settings, base_dir)
    alerting = with_env_receivers(settings.alerting, os.environ if environ is None else environ)
    return settings.model_copy(update={"alerting": alerting})


_REQUIRED_KEYS: dict[str, str] = {
    "sources": "list the log folders to read, or write `sources: []` to read only --source paths",
    "detectors": "list the detectors to run, or write `detectors: {}` to run none",
}


def config_warnings(settings: Settings) -> list[str]:
    """Return warnings about valid settings that make a run do little: no sources, no detectors."""
    warnings = []
    if not settings.sources:
        warnings.append("sources is empty: `keytrail run` reads only the paths given with --source")
    if not settings.enabled_detectors:
        listed = "no detector is listed" if not settings.detectors else "every detector is disabled"
        warnings.append(f"detectors: {listed}, so runs record events but produce no findings")
    return warnings


def check_files(settings: Settings, *, source: str | None = None) -> None:
    """Check that the files the settings name exist and can be opened, as a run needs them.

    The GeoIP databases are opened the same way a run opens them.

    Raises:
        ConfigError: with one line per missing or invalid file.
    """
    problems = []
    if settings.enrich.geoip.enabled:
        try:
            GeoIP.from_settings(settings.enrich.geoip).close()
        except ConfigError as exc:
            problems.extend(exc.problems)
    templates = settings.alerting.templates_dir
    if templates is not None and not templates.is_dir():
        problems.append(f"alerting.templates_dir: folder not found: {templates}")
    if problems:
        raise ConfigError(problems, source=source)


def build_detectors(settings: Settings) -> list[Detector]:
    """Construct the enabled detectors with their configured parameters, in config order."""
    return [
        get_detector(name)(**settings.detectors[name].params) for name in settings.enabled_detectors
    ]


def _detector_problems(raw: dict[str, Any]) -> list[str]:
    """Check each detector entry against its registered class (unknown ids and bad params)."""
    problems = []
    known = registered_detectors()
    for name, entry in raw.items():
        if name not in known:
            listed = ", ".join(sorted(known)) or "none registered"
            problems.append(f"detectors.{name}: unknown detector; known: {listed}")
            continue
        if not isinstance(entry, dict):
            # The Settings model already reported the wrong type of this entry.
            continue
        params = {key: value for key, value in entry.items() if key != "enabled"}
        prefix = ("detectors", name)
        coerced = _coerced_values(known[name].Params, params)
        try:
            known[name](**params)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, known[name].Params, prefix, skip=coerced))
        except (TypeError, ValueError) as exc:
            problems.append(f"detectors.{name}: invalid parameters: {exc}")
        problems.extend(f"{_dotted(prefix + loc)}: {message}" for loc, message in coerced.items())
    return problems


def _coerced_values(model: type[BaseModel], data: dict[str, Any]) -> dict[tuple[Any, ...], str]:
    """Return key path -> message for values that lax validation would coerce between types.

    Pydantic's default (lax) mode turns YAML ``true`` into the integer 1 and ``1`` or ``"yes"``
    into True. Validating again in strict mode finds those values. Its other strict-mode errors
    (a string for a path, for example) are expected for YAML input and ignored.
    """
    try:
        model.model_validate(data, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
    else:
        return {}
    coerced = {}
    for error in errors:
        found = error.get("input")
        if error["type"] in ("int_type", "float_type") and _lax_number(found):
            expected = "an integer" if error["type"] == "int_type" else "a number"
        elif error["type"] == "bool_type" and _lax_bool(found):
            expected = "true or false"
        else:
            continue
        kind = _TYPE_NAMES.get(type(found), type(found).__name__)
        coerced[tuple(error["loc"])] = f"expected {expected}, found {kind} {_short(found)}"
    return coerced


_TYPE_NAMES: dict[type, str] = {bool: "boolean", str: "string", int: "integer", float: "number"}

# Strings that pydantic's lax mode accepts as booleans (pydantic 2 documentation, "Conversion
# Table"). Other strings fail lax validation with pydantic's own message.
_LAX_BOOL_STRINGS: frozenset[str] = frozenset(
    {"0", "1", "f", "t", "n", "y", "no", "yes", "off", "on", "false", "true"}
)


def _lax_number(value: Any) -> bool:
    """Return True for a boolean, or a string that lax validation would read as a number."""
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _lax_bool(value: Any) -> bool:
    """Return True for a number, or a string that lax validation would read as a boolean."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and value.strip().lower() in _LAX_BOOL_STRINGS


def _duplicate_source_names(settings: Settings) -> list[str]:
    problems = []
    seen: set[str] = set()
    for index, source in enumerate(settings.sources):
        if source.name.startswith("_"):
            problems.append(
                f"sources[{index}].name: {source.name!r} starts with an underscore; such names "
                "are reserved for keytrail's own checkpoints, so rename the source"
            )
        if source.name in seen:
            problems.append(
                f"sources[{index}].name: duplicate source name {source.name!r}; "
                "each source needs its own name because checkpoints are kept per name"
            )
        seen.add(source.name)
    return problems


def _pydantic_problems(
    exc: ValidationError,
    model: type[BaseModel],
    prefix: tuple[str, ...],
    skip: Mapping[tuple[Any, ...], str] | None = None,
) -> list[str]:
    """Return one line per validation error, except at the key paths in ``skip``."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if skip and loc in skip:
            continue
        key_model, key_loc = model, loc
        if len(loc) > 2 and loc[0] == "sources" and loc[2] in _SOURCE_MODELS:
            # A source's errors carry its ``type`` value after the index; the user never wrote
            # that level, so it is left out of the key path.
            key_model, key_loc = _SOURCE_MODELS[loc[2]], loc[3:]
            loc = loc[:2] + loc[3:]
        path = _dotted(prefix + loc)
        if error["type"] == "union_tag_invalid":
            problems.append(
                f"{path}.type: unknown source type (found: {_short(_source_type_of(error))}); "
                f"accepted: {', '.join(_SOURCE_MODELS)}"
            )
            continue
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(key_model, key_loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            problems.append(f"{path}: unknown key{hint}")
            continue
        found = error.get("input")
        message = error["msg"]
        if error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        problems.append(f"{path}: {message} (found: {_short(found)})")
    return problems


_SOURCE_MODELS: dict[str, type[BaseModel]] = {
    model.model_fields["type"].default: model
    for model in (
        typing.get_args(member)[0]
        for member in typing.get_args(typing.get_args(AnySourceSettings)[0])
    )
}


def _source_type_of(error: Any) -> Any:
    found = error.get("input")
    return found.get("type") if isinstance(found, dict) else found


def _dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "top level"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping with keys " + ", ".join(map(str, value)) if value else "{}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Return the field names of the model found by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap_annotation(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field is not None else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap_annotation(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap_annotation(annotation: Any) -> Any:
    """Strip ``X | None`` down to ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _resolve_paths(settings: Settings, base_dir: Path) -> Settings:
    def resolve(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else base_dir / path

    sources = [
        source.model_copy(update={"paths": [resolve(p) for p in source.paths]})
        if isinstance(source, FilesSourceSettings)
        else source
        for source in settings.sources
    ]
    geoip = settings.enrich.geoip.model_copy(
        update={
            "city_db": resolve(settings.enrich.geoip.city_db),
            "asn_db": resolve(settings.enrich.geoip.asn_db),
        }
    )
    receivers = {
        name: resolve_receiver_paths(receiver, base_dir)
        for name, receiver in settings.alerting.receivers.items()
    }
    alerting = settings.alerting.model_copy(
        update={"templates_dir": resolve(settings.alerting.templates_dir), "receivers": receivers}
    )
    return settings.model_copy(
        update={
            "state_dir": resolve(settings.state_dir),
            "output_dir": resolve(settings.output_dir),
            "sources": sources,
            "enrich": settings.enrich.model_copy(update={"geoip": geoip}),
            "alerting": alerting,
        }
    )
