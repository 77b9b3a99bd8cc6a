"""The backends that the tests run on."""
import pytest
import torch

from helpers import device_of
from ms_fused import available_backends, backends

ALL_BACKENDS = backends.BACKEND_NAMES
# the CPU backends that the larger parity tests run on: every built one except the slow interpreted triton
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


def backend_params(names):
    """pytest params for `names`: a backend that cannot run here is skipped with its reason; triton under
    the interpreter ignores numpy's warnings on values that the GPU drops silently (exp() overflowing in
    unmined tile entries that a select then discards, NaN products of Inf rows before they are flagged)."""
    params = []
    for name in names:
        reason = backends.unavailable_reason(name, device_of(name))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if name == "triton" and not torch.cuda.is_available():
            marks += [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
                      pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params
