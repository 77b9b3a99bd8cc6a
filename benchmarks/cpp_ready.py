"""The `cpp` backend's C++ extension, built when it must be and loaded, before anything is timed.

Without an extension built in place (after `pip install .`, or a checkout where `make install` has not run) the
first use of the backend JIT-compiles it, about a minute on 2 cores: inside a record's child that would eat
the record's time-out, and a build killed there used to leave a lock that stalled every later record.
measure.Runner(cpp_extension=True) imports this module in its own process first (the build, if any, happens
there, saying so on stderr) and in the server that forks the records' children, so each child starts with
the extension loaded.
"""
import os

import torch


def _load() -> dict:
    """Status "ok" when the cpp backend can run, else "unavailable" and why; the process that loaded it."""
    if os.environ.get("MS_FUSED_NO_CPP") == "1":
        reason = "MS_FUSED_NO_CPP=1"
    else:
        from ms_fused.engine.cpp import backend as cpp_backend

        reason = cpp_backend.unavailable_reason(torch.device("cpu"))
    return {"status": "ok" if reason is None else "unavailable", "reason": reason, "pid": os.getpid()}


STATE = _load()  # importing this module is what loads the extension


def job(spec) -> dict:
    """A measure.Runner job (for the tests): STATE, and the process that runs the job."""
    return dict(STATE, job_pid=os.getpid())
