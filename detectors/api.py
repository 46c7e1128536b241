"""Run detectors on any events frame: a backtest, a slice of history, a frame built by hand.

:func:`run` is what ``keytrail run`` does in its detection step, without state or alerts::

    import detectors, pipeline

    events = pipeline.read_logs("sample_logs")
    found = detectors.run(events)                                  # the default detectors
    burst = detectors.run(
        events,
        detectors=["keytrail.failure_burst"],
        params={"keytrail.failure_burst": {"min_failures": 5}},
    )

Each detector also works alone: construct its class with its parameters and call ``detect``::

    detector = detectors.get_detector("keytrail.failure_burst")(min_failures=5)
    found = detector.detect(events, detectors.FrameHistory(), pd.Timestamp.now(tz="UTC"))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from detectors.base import (
    FINDING_COLUMNS,
    Detector,
    FrameHistory,
    HistoryView,
    empty_findings,
)
from pipeline.errors import DetectorError
from pipeline.schema import empty_events

if TYPE_CHECKING:
    from pipeline.config import Settings

__all__ = ["build", "run"]

logger = logging.getLogger(__name__)


def build(
    detectors: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    config: Settings | None = None,
) -> list[Detector]:
    """Construct detectors with parameters, validated as config.yaml's ``detectors`` section.

    Args:
        detectors: detector ids, in the order to run them; default: the ids that ``config``
            (else the shipped default config) enables.
        params: detector id -> parameters. A detector's parameters start from its entry in
            ``config`` (else in the shipped default config, else the class defaults), and the
            keys given here replace those keys.
        config: settings whose detector entries are the starting parameters.

    Raises:
        ConfigError: an unknown detector id or an invalid parameter; each line names the key,
            as ``detectors.<id>.<parameter>``, exactly as for config.yaml.
    """
    # Imported here: pipeline.config imports this package to validate detector entries.
    from pipeline.config import DEFAULT_CONFIG, build_detectors, settings_from_mapping

    params = dict(params or {})
    if config is not None:
        base = {name: entry.params for name, entry in config.detectors.items()}
        enabled = config.enabled_detectors
    else:
        base = {
            name: {key: value for key, value in entry.items() if key != "enabled"}
            for name, entry in DEFAULT_CONFIG["detectors"].items()
        }
        enabled = [
            name
            for name, entry in DEFAULT_CONFIG["detectors"].items()
            if entry.get("enabled", True)
        ]
    chosen = list(enabled if detectors is None else detectors)
    unused = [name for name in params if name not in chosen]
    entries = {
        name: {"enabled": name in chosen, **base.get(name, {}), **dict(params.get(name, {}))}
        for name in [*chosen, *unused]
    }
    # Validating through the config loader gives the same messages as a config file, unknown
    # ids included. An empty environment keeps KEYTRAIL_* variables from adding receivers.
    settings = settings_from_mapping(
        {"sources": [], "detectors": entries},
        base_dir=Path.cwd(),
        source="detectors.run",
        environ={},
    )
    if unused:
        raise ValueError(
            f"params given for detectors that do not run: {', '.join(unused)}; "
            f"running: {', '.join(chosen) or 'none'}"
        )
    return build_detectors(settings)


def run(
    frame: pd.DataFrame,
    history: HistoryView | pd.DataFrame | None = None,
    detectors: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    now: pd.Timestamp | datetime | None = None,
    *,
    config: Settings | None = None,
) -> pd.DataFrame:
    """Run detectors on ``frame`` and return their findings, sorted by ``first_seen``.

    As in a keytrail run, each detector sees ``frame`` as its window and, as its baseline, the
    history events in its look-back before the window's first event. A detector that looks
    back 30 days over a frame of 30 days therefore learns from the frame itself, as the first
    run over ``sample_logs`` does.

    Args:
        frame: an events frame (from :func:`pipeline.read_logs` or
            ``pipeline.history(config).events(...)``).
        history: earlier events: an events frame, a history view such as
            ``pipeline.history(config)``, or None for no earlier events. Only events before the
            window's first event are used, so passing the window's own frame is harmless.
        detectors: detector ids (default: those the shipped default config, or ``config``,
            enables).
        params: detector id -> parameters that replace the configured ones, for example
            ``{"keytrail.off_hours": {"business_hours": "07:00-20:00"}}``.
        now: the run time detectors are given (default: the current time, as in a run).
        config: settings whose detector entries are the starting parameters.

    Returns:
        A findings frame with :data:`detectors.base.FINDING_COLUMNS`; ``geoip_build_date`` is
        left empty, because only a run knows which database enriched the events.

    Raises:
        ConfigError: an unknown detector id or an invalid parameter.
        ValueError: ``params`` names a detector that is not run.
        DetectorError: a detector raised an exception; the cause is chained.
    """
    chosen = build(detectors, params, config=config)
    moment = pd.Timestamp(now if now is not None else pd.Timestamp.now(tz="UTC"))
    moment = moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
    if frame.empty or not chosen:
        return empty_findings()

    start = frame["time"].min()
    longest = max((detector.lookback for detector in chosen), default=timedelta(0))
    baseline = _baseline(history, start, longest)
    results = []
    for detector in chosen:
        since = start - detector.lookback
        view = FrameHistory(baseline[(baseline["time"] >= since).to_numpy(dtype=bool)])
        try:
            found = detector.detect(frame, view, moment)
        except Exception as exc:
            # Detectors are plugin code: whatever they raise is reported with their id.
            raise DetectorError(detector.id, f"{type(exc).__name__}: {exc}") from exc
        missing = [name for name in FINDING_COLUMNS if name not in found.columns]
        if missing:
            raise DetectorError(detector.id, f"findings frame lacks columns {', '.join(missing)}")
        logger.info("detector %s: %s findings", detector.id, len(found))
        if len(found):
            results.append(found[list(FINDING_COLUMNS)])

    if not results:
        return empty_findings()
    findings = pd.concat(results, ignore_index=True)
    findings = findings.drop_duplicates(subset="finding_id", keep="first")
    return findings.sort_values(["first_seen", "detector"], kind="stable").reset_index(drop=True)


def _baseline(
    history: HistoryView | pd.DataFrame | None, start: pd.Timestamp, longest: timedelta
) -> pd.DataFrame:
    """Return the history events in ``[start - longest, start)``."""
    if history is None or longest <= timedelta(0):
        return empty_events()
    if isinstance(history, pd.DataFrame):
        times = history["time"]
        mask = (times >= start - longest) & (times < start)
        return history[mask.to_numpy(dtype=bool)].reset_index(drop=True)
    return history.events(since=start - longest, until=start)
