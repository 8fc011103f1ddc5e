"""Facts about the machine a run uses."""
from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, e.g. a container's CPU set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
