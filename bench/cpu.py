"""Machine-wide CPU time, for the CPU each message costs every process together (the server, the
daemons or the peer, the receiver): on a shared two-core machine that, not the wall clock, says
how far a design can go. No dependencies: the procrastinate peer imports it from its own venv."""

from __future__ import annotations

import os
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice;
# guest time is counted in user already, idle and iowait are not work.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def machine_busy_s() -> float | None:
    """CPU seconds every process of this machine has spent since boot, or None where /proc/stat
    is not there."""
    try:
        first = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = sum(int(first[1 + i]) for i in BUSY_FIELDS)
    return ticks / os.sysconf("SC_CLK_TCK")


def busy_since(before: float | None) -> float | None:
    """CPU seconds the machine spent since `before` (a machine_busy_s() reading)."""
    now = machine_busy_s()
    return now - before if now is not None and before is not None else None
