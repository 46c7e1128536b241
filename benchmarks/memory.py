"""Peak memory of a measured benchmark process."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_mb"]


def peak_mb() -> float:
    """Return this process's peak resident set size in MiB.

    Linux keeps ``ru_maxrss`` across ``exec``, so a measured child started by a parent that had
    just generated its data reported the parent's peak as its own (2.2 GiB instead of 1.5 GiB in
    benchmarks/detect.py). ``VmHWM`` in ``/proc/self/status`` belongs to the process's own
    memory map, which ``exec`` replaces.
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    # Elsewhere ru_maxrss is the best there is: KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
