"""Logging setup for the command-line tool: plain text or JSON lines on stderr.

Library modules only create loggers; this module is the one place that attaches a handler, and
only the CLI calls it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "setup_logging"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# LogRecord attributes that are not extra fields passed through ``extra=``.
_STANDARD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object per line.

    Keys: ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``, ``exception`` when there
    is one, and any fields passed through ``extra=``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(
    level: str = "INFO", fmt: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Send keytrail's log records to ``stream`` (default stderr) as text or JSON lines.

    Replaces the handler that an earlier call installed, so calling it twice is safe.

    Returns:
        The installed handler, for the caller to remove when it is done.

    Raises:
        ValueError: ``fmt`` is not ``text`` or ``json``, or ``level`` is not a level name.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, found {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, found {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_keytrail", False)]:
        root.removeHandler(old)
    handler._keytrail = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler
