"""pytest-benchmark cases for people who keep their own kernel benchmark history:

    pytest benchmarks --benchmark-only                          # timings table
    pytest benchmarks --benchmark-only --benchmark-autosave     # history under .benchmarks/

Not part of the unit-test run (`pytest tests` never collects this folder). Each case runs a fixed
5 rounds after one warm-up, so a plain `pytest benchmarks` stays short too. The sweep with memory,
time-outs and plots is `benchmarks/run.py`.
"""
import pytest
import torch

import impls
from measure import step as training_step

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_VALUES = [4096, 16384] if DEVICE.type == "cuda" else [512, 2048]
D = 128
# the per-anchor loop is left out: at these N one round takes seconds to minutes
CASES = [name for name in impls.all_impls(DEVICE)
         if name != "loop" and impls.unavailable_reason(name, DEVICE, torch.float32) is None]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("impl", CASES)
def test_step(benchmark, impl, n, mode):
    yardstick = impls.is_yardstick(impl)
    fn = impls.build(impl)
    x, y = impls.make_batch(n, D, torch.float32, DEVICE)
    x.requires_grad_(not yardstick)

    def step():
        x.grad = None
        training_step(fn, x, y, None, mode, yardstick)
        _sync()

    benchmark.group = f"{mode} N={n} D={D} float32 {DEVICE.type}"
    benchmark.extra_info.update(impl=impl, n=n, d=D, dtype="float32", mode=mode, device=str(DEVICE))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    if not yardstick:
        assert torch.isfinite(fn(x.detach(), y)), f"{impl} returned a non-finite loss"
