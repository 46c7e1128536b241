"""keytrail's detectors. Importing this package registers the built-in ones."""

# Importing a detector module registers its detectors.
from detectors import (  # noqa: F401
    cross_cloud,
    failure_burst,
    first_seen,
    geo,
    isolation_forest,
    mass_retrieval,
    off_hours,
    risk,
    volume,
)
from detectors.api import run
from detectors.base import (
    FINDING_COLUMNS,
    SEVERITIES,
    Detector,
    DetectorParams,
    FrameHistory,
    HistoryView,
    build_findings,
    empty_findings,
    get_detector,
    registered_detectors,
)

__all__ = [
    "FINDING_COLUMNS",
    "SEVERITIES",
    "Detector",
    "DetectorParams",
    "FrameHistory",
    "HistoryView",
    "build_findings",
    "empty_findings",
    "get_detector",
    "registered_detectors",
    "run",
]
