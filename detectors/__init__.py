"""keytrail's detectors. Importing this package registers the built-in ones."""

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
