"""The backends that the tests run on."""
import pytest
import torch

from helpers import device_of
from ms_fused import available_backends
from ms_fused.engine import backends

ALL_BACKENDS = backends.BACKEND_NAMES
# the CPU backends that the larger parity tests run on: every built one except the slow interpreted triton
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


# numpy warns where the GPU is silent: exp() overflows on unmined tile entries that a select then drops, and
# Inf inputs make NaN products before their rows are flagged
INTERPRETER_WARNINGS = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
                        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def backend_params(names):
    """pytest params for `names`: a backend that cannot run here is skipped with its reason; triton under
    the interpreter ignores numpy's warnings on values that the GPU drops silently (exp() overflowing in
    unmined tile entries that a select then discards, NaN products of Inf rows before they are flagged)."""
    params = []
    for name in names:
        reason = backends.unavailable_reason(name, device_of(name))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if name == "triton" and not torch.cuda.is_available():
            marks += INTERPRETER_WARNINGS
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def triton_backend_or_skip():
    """ms_fused.engine.triton.backend for a test module of triton's own, which is skipped whole where the backend
    cannot run (no triton, or a CPU without the interpreter)."""
    module = pytest.importorskip("ms_fused.engine.triton.backend")
    reason = module.unavailable_reason(torch.device("cpu"))
    if reason is not None and not torch.cuda.is_available():
        pytest.skip(f"triton backend unusable here: {reason}", allow_module_level=True)
    return module
