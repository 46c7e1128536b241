"""keytrail's exception tree.

Every error message names what failed, where (file, config key, record, field), what was
expected, what was found, and what to do::

    KeytrailError
    ├── ConfigError          config.yaml or a CLI option is invalid (exit code 2)
    ├── InputError           a log file or object cannot be read at all
    ├── StateError           the state directory is locked, corrupt or from a newer version
    └── DetectorError        a detector failed on a window (the run goes on without it)

A record that cannot be parsed is not an exception: it is quarantined and counted
(see ``pipeline.formats.Quarantined``).
"""

from __future__ import annotations

__all__ = ["ConfigError", "DetectorError", "InputError", "KeytrailError", "StateError"]


class KeytrailError(Exception):
    """Base class of every error keytrail raises on purpose."""


class ConfigError(KeytrailError):
    """Invalid configuration.

    Args:
        problems: one line per problem, each naming the key path, the accepted values and the
            value found.
    """

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems))


class InputError(KeytrailError):
    """A log file, folder or object that cannot be read at all (missing, unreadable)."""


class StateError(KeytrailError):
    """The state directory cannot be used (locked by another run, corrupt, wrong version)."""


class DetectorError(KeytrailError):
    """A detector failed; carries the detector id."""

    def __init__(self, detector_id: str, message: str) -> None:
        self.detector_id = detector_id
        super().__init__(f"detector {detector_id}: {message}")
