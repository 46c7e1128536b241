"""Tests of config.yaml loading: validation messages, detector params and path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.base import get_detector, registered_detectors
from pipeline.config import (
    build_detectors,
    check_files,
    config_warnings,
    embedded_defaults,
    load_config,
)
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# The two required keys, written empty, for tests about other settings.
REQUIRED = "sources: []\ndetectors: {}\n"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    return caught.value.problems


def test_shipped_config_loads() -> None:
    settings = load_config(REPO / "config.yaml")

    assert settings.state_dir == REPO / ".keytrail"
    assert settings.output_dir == REPO / ".keytrail" / "output"
    assert [source.name for source in settings.sources] == ["sample_logs"]
    assert settings.sources[0].paths == [
        REPO / "sample_logs" / "aws",
        REPO / "sample_logs" / "gcp",
        REPO / "sample_logs" / "azure",
    ]
    assert settings.enabled_detectors == [
        "keytrail.off_hours",
        "keytrail.isolation_forest",
        "keytrail.new_country",
        "keytrail.impossible_travel",
        "keytrail.failure_burst",
        "keytrail.volume_spike",
        "keytrail.mass_retrieval",
        "keytrail.cross_cloud",
        "keytrail.first_seen",
        "keytrail.risk",
    ]
    assert settings.history.retention_days == 400
    assert settings.history.seen_retention_days == 30
    assert settings.logging.format == "text"


def test_embedded_defaults_match_shipped_config() -> None:
    assert embedded_defaults(REPO) == load_config(REPO / "config.yaml")


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        config_dir,
        "state_dir: state\n"
        "output_dir: /var/tmp/keytrail-out\n"
        "sources: [{name: s, type: files, paths: [logs, ../shared/logs]}]\n"
        "enrich: {geoip: {city_db: db/city.mmdb}}\n"
        "alerting: {templates_dir: templates}\n"
        "detectors: {}\n",
    )

    settings = load_config(Path("..") / "conf" / "config.yaml")

    assert settings.state_dir == config_dir / "state"
    assert settings.output_dir == Path("/var/tmp/keytrail-out")
    assert settings.sources[0].paths == [config_dir / "logs", config_dir / ".." / "shared" / "logs"]
    assert settings.enrich.geoip.city_db == config_dir / "db" / "city.mmdb"
    assert settings.enrich.geoip.asn_db is None
    assert settings.alerting.templates_dir == config_dir / "templates"
    assert path.exists()


def test_every_problem_listed_with_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "state_dirr: x\n"
        "sources:\n"
        "  - name: s\n"
        "    type: s3\n"
        "    paths: [logs]\n"
        "history: {retention_days: forever}\n"
        "detectors:\n"
        "  keytrail.off_hours: {enabled: true, min_reads: many}\n"
        "  keytrail.not_a_detector: {enabled: true}\n"
        "logging: {level: LOUD}\n",
    )

    assert problems_of(path) == [
        "sources[0].type: unknown source type (found: 's3'); accepted: files, s3_cloudtrail, cloudtrail_lookup, gcp_logging, azure_blob, azure_log_analytics",
        "history.retention_days: Input should be a valid integer, unable to parse string as an "
        "integer (found: 'forever')",
        "logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR' (found: 'LOUD')",
        "state_dirr: unknown key; allowed keys: state_dir, output_dir, sources, enrich, history, "
        "detectors, alerting, logging, schedule",
        "detectors.keytrail.off_hours.min_reads: Input should be a valid integer, unable to parse "
        "string as an integer (found: 'many')",
        "detectors.keytrail.not_a_detector: unknown detector; known: keytrail.cross_cloud, "
        "keytrail.failure_burst, keytrail.first_seen, keytrail.impossible_travel, "
        "keytrail.isolation_forest, keytrail.mass_retrieval, keytrail.new_country, "
        "keytrail.off_hours, keytrail.risk, keytrail.volume_spike" + _test_detectors_suffix(),
    ]


def _test_detectors_suffix() -> str:
    # Other test modules register detectors of their own; they are listed when loaded.
    extra = sorted(name for name in registered_detectors() if not name.startswith("keytrail."))
    return "".join(f", {name}" for name in extra)


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "enrich: {geoip: {enabled: true, city: x}}\n")

    assert problems_of(path) == [
        "enrich.geoip.city: unknown key; allowed keys: enabled, city_db, asn_db, max_age_days"
    ]


def test_unknown_detector_param(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sources: []\ndetectors:\n  keytrail.off_hours: {enabled: true, hours: 3}\n"
    )

    allowed = ", ".join(get_detector("keytrail.off_hours").Params.model_fields)
    assert problems_of(path) == [
        f"detectors.keytrail.off_hours.hours: unknown key; allowed keys: {allowed}"
    ]


def test_seen_retention_longer_than_history(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "history: {retention_days: 10, seen_retention_days: 20}\n")

    assert problems_of(path) == [
        "history: seen_retention_days (20) must not exceed retention_days (10) "
        "(found: a mapping with keys retention_days, seen_retention_days)"
    ]


def test_duplicate_source_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources:\n  - {name: a, type: files, paths: [x]}\n  - {name: a, type: files, paths: [y]}\n"
        "detectors: {}\n",
    )

    assert problems_of(path) == [
        "sources[1].name: duplicate source name 'a'; each source needs its own name because "
        "checkpoints are kept per name"
    ]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "state_dir: x\nsources:\n  - name: a\n   type: files\n")

    assert problems_of(path) == [
        "invalid YAML at line 4, column 4: expected <block end>, but found '<block mapping start>'"
    ]


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")

    assert problems_of(path) == ["top level: expected a mapping of settings, found list"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    assert problems_of(path) == [
        f"config file not found: {path}; pass --config FILE or run from the folder that "
        "contains config.yaml"
    ]


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n\n# and another\n", "{}\n"], ids=["empty", "comments", "{}"]
)
def test_empty_file_rejected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    assert problems_of(path) == [
        "config file is empty; expected at least the keys sources and detectors (see the "
        "config.yaml shipped with keytrail)"
    ]


def test_required_keys_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "state_dir: state\n")

    assert problems_of(path) == [
        "sources: missing; list the log folders to read, or write `sources: []` to read only "
        "--source paths",
        "detectors: missing; list the detectors to run, or write `detectors: {}` to run none",
    ]


def test_explicitly_empty_lists_warn(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, REQUIRED))

    assert settings.sources == []
    assert settings.detectors == {}
    assert settings.state_dir == tmp_path / ".keytrail"
    assert config_warnings(settings) == [
        "sources is empty: `keytrail run` reads only the paths given with --source",
        "detectors: no detector is listed, so runs record events but produce no findings",
    ]


def test_all_detectors_disabled_warn(tmp_path: Path) -> None:
    path = write(tmp_path, "sources: []\ndetectors:\n  keytrail.off_hours: {enabled: false}\n")

    assert config_warnings(load_config(path))[1] == (
        "detectors: every detector is disabled, so runs record events but produce no findings"
    )


def test_shipped_config_no_warnings() -> None:
    assert config_warnings(load_config(REPO / "config.yaml")) == []


def test_boolean_for_integer_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources: []\n"
        "history: {seen_retention_days: true}\n"
        "enrich: {geoip: {enabled: 1, max_age_days: '30'}}\n"
        "alerting: {console: 'yes'}\n"
        "detectors:\n"
        "  keytrail.failure_burst: {enabled: 0, min_failures: true}\n",
    )

    # min_failures must be at least 2: the message names the boolean, not the bound.
    assert problems_of(path) == [
        "enrich.geoip.enabled: expected true or false, found integer 1",
        "enrich.geoip.max_age_days: expected an integer, found string '30'",
        "history.seen_retention_days: expected an integer, found boolean True",
        "detectors.keytrail.failure_burst.enabled: expected true or false, found integer 0",
        "alerting.console: expected true or false, found string 'yes'",
        "detectors.keytrail.failure_burst.min_failures: expected an integer, found boolean True",
    ]


def test_integer_values_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources: []\n"
        "history: {retention_days: 20, seen_retention_days: 10}\n"
        "detectors:\n"
        "  keytrail.failure_burst: {enabled: true, min_failures: 3}\n",
    )

    settings = load_config(path)

    assert settings.history.retention_days == 20
    assert build_detectors(settings)[0].params.min_failures == 3  # type: ignore[attr-defined]


def test_check_files_missing_geoip_db(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "enrich: {geoip: {city_db: /nonexistent.mmdb}}\n")
    settings = load_config(path)

    with pytest.raises(ConfigError) as caught:
        check_files(settings, source=str(path))

    assert caught.value.source == str(path)
    assert caught.value.problems == [
        "enrich.geoip.city_db: file not found: /nonexistent.mmdb; expected the path of a "
        "MaxMind DB (.mmdb) file"
    ]


def test_check_files_missing_templates_dir(tmp_path: Path) -> None:
    path = write(
        tmp_path, REQUIRED + "enrich: {geoip: {enabled: false}}\nalerting: {templates_dir: tpl}\n"
    )

    with pytest.raises(ConfigError) as caught:
        check_files(load_config(path))

    assert caught.value.problems == [
        f"alerting.templates_dir: folder not found: {tmp_path / 'tpl'}"
    ]


def test_check_files_disabled_geoip_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path, REQUIRED + "enrich: {geoip: {enabled: false, city_db: /nonexistent.mmdb}}\n"
    )

    check_files(load_config(path))


def test_build_detectors_passes_params(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sources: []\n"
        "detectors:\n"
        "  keytrail.off_hours: {enabled: true, min_reads: 3}\n"
        "  keytrail.failure_burst: {enabled: false}\n",
    )

    built = build_detectors(load_config(path))

    assert [detector.id for detector in built] == ["keytrail.off_hours"]
    assert built[0].params.min_reads == 3  # type: ignore[attr-defined]


def test_alerting_delivery_keys_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        REQUIRED
        + "alerting:\n"
        + "  receivers:\n"
        + "    team: {slack: {webhook_url_env: TEAM_HOOK}, file: {}}\n"
        + "  routing: {default_receiver: team, routes: [{match: {cloud: aws}, receiver: outbox-files}]}\n"
        + "  repeat_interval: 2h\n"
        + "  delivery: {max_attempts: 3}\n",
    )
    alerting = load_config(path).alerting

    assert alerting.receiver_names() == ["outbox-files", "team"]
    assert alerting.receivers["team"].channels() == ["slack", "file"]
    assert alerting.repeat_interval.total_seconds() == 7200
    assert alerting.delivery.max_attempts == 3
    assert alerting.outbox is True


def test_alerting_defaults_to_file_receiver() -> None:
    alerting = embedded_defaults().alerting

    assert alerting.routing.default_receiver == "outbox-files"
    assert alerting.routing.group_by == ["..."]
    assert alerting.receivers == {}


def test_receiver_without_channel_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "alerting: {receivers: {team: {}}}\n")

    assert problems_of(path) == [
        "alerting.receivers.team: a receiver needs at least one channel: slack, email, "
        "webhook or file (found: {})"
    ]


def test_unknown_receiver_key_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "alerting: {receivers: {team: {pager: {}}}}\n")

    assert problems_of(path) == [
        "alerting.receivers.team.pager: unknown key; allowed keys: slack, email, webhook, file"
    ]


def test_invalid_repeat_interval_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, REQUIRED + "alerting: {repeat_interval: soon}\n")

    assert problems_of(path) == [
        "alerting.repeat_interval: invalid duration 'soon': expected a number and a unit "
        "(s, m, h, d, w) such as 4h, 3d or 1d12h (found: 'soon')"
    ]
