"""The CPU backends that the generic parity tests run on: every built one except the slow interpreted Triton."""
from ms_fused import available_backends

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]
