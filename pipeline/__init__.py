"""keytrail's machinery: formats, sources, enrichment, state, alerting and the run engine.

The analyst's functions are importable from here (``pipeline.read_logs``, ``pipeline.history``,
...). They load on first use, so ``import pipeline`` stays cheap for the command-line tool and
the detectors package can import :mod:`pipeline.schema` without a circular import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import (
        Explanation,
        HistoryQuery,
        explain,
        findings,
        history,
        load_config,
        read_logs,
    )
    from pipeline.engine import run_once
    from pipeline.exports import export

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "HistoryQuery",
    "explain",
    "export",
    "findings",
    "history",
    "load_config",
    "read_logs",
    "run_once",
]

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "Explanation": "pipeline.api",
    "HistoryQuery": "pipeline.api",
    "explain": "pipeline.api",
    "export": "pipeline.exports",
    "findings": "pipeline.api",
    "history": "pipeline.api",
    "load_config": "pipeline.api",
    "read_logs": "pipeline.api",
    "run_once": "pipeline.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
