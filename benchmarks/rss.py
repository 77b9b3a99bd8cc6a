"""Resident-set readings of this process (Linux /proc), for CPU peak-memory measurements."""
from __future__ import annotations

import ctypes
from typing import Optional


def status_kb(field: str) -> Optional[int]:
    """A kB field of /proc/self/status (VmRSS, VmHWM, VmData, ...), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Set VmHWM back to the current resident set (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give memory that earlier calls freed back to the OS (glibc malloc_trim), so that the measured call
    faults in its whole working set instead of reusing pages a warm-up left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
