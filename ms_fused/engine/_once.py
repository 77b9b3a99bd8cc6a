"""One-time initialisation that several threads may start at the same moment."""
from __future__ import annotations

import functools
import threading


class once:  # noqa: N801 (used as a decorator)
    """Decorator: `fn(*args)` runs once per distinct `args`, even when many threads make the first call together.

    Every caller gets that one result, and no caller sees it before `fn` has returned (so nothing half
    initialised escapes). Later calls read it without taking the lock. `results` holds what was computed.
    """

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.results: dict = {}
        self._lock = threading.RLock()  # re-entrant: `fn` may ask for another argument of the same function

    def __call__(self, *args):
        try:
            return self.results[args]
        except KeyError:
            pass
        with self._lock:
            if args not in self.results:
                self.results[args] = self.fn(*args)
            return self.results[args]
