"""keytrail's detectors. Importing this package registers the built-in ones."""

# Importing a detector module registers its detectors.
from detectors import failure_burst, geo, off_hours  # noqa: F401
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
]
