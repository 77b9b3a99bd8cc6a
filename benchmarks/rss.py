"""Resident-set readings of this process (Linux /proc), for CPU peak-memory measurements."""
from __future__ import annotations

import ctypes
import gc
import time
from typing import Any, Callable, NamedTuple, Optional


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


class Call(NamedTuple):
    result: Any
    seconds: float
    growth_bytes: Optional[int]  # peak resident set during the call above the resident set before it
    peak_bytes: Optional[int]    # the process's peak resident set (VmHWM) after the call
    reset_ok: bool               # False where VmHWM could not be reset (the growth is then an upper bound)


def measured_call(fn: Callable[[], Any]) -> Call:
    """fn() once, with its wall time and peak resident-set growth. Freed heap goes back to the OS first,
    so that the call faults in its whole working set."""
    gc.collect()
    release_free_heap()
    reset_ok = reset_peak()
    before_kb = status_kb("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    hwm_kb = status_kb("VmHWM")
    growth = None if before_kb is None or hwm_kb is None else max(0, hwm_kb - before_kb) * 1024
    return Call(result, seconds, growth, None if hwm_kb is None else hwm_kb * 1024, reset_ok)
