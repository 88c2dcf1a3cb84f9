"""The CPU cores a process may use, for sizing its loader workers and I/O threads."""
from __future__ import annotations

import math
import os
from pathlib import Path

# A container's CPU quota (cgroup v2): "<quota> <period>" in microseconds, or "max <period>".
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """The cores of this process's CPU affinity, within its container's CPU quota, which
    affinity does not show (`docker --cpus 2` on a 64-core host: 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: affinity alone
    return cores
