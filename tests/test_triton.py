"""What is particular to the `triton` backend: column splits, tile configurations, label order and
distributions, the one-sweep forward, the N×M allocation proof, dtype routing, bitwise determinism, the
sm_90 compile without a GPU, and GPU-only sizes. The contract and the edge cases run on triton with every
other backend in test_contract.py and test_edge_cases.py.

On the CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no
GPU), which runs every program in Python: cases stay small (N, M <= ~150), with N, M and D off every
block size so that several row, column, K and output-D blocks occur.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_matches_reference, clustered_batch, loss_and_grads, memory_bank_batch, rel_err, threshold_gap
from ms_fused import multi_similarity_loss
from ms_fused._inputs import HyperParams, check_inputs

triton_backend = pytest.importorskip("ms_fused.triton_backend")
if triton_backend.unavailable_reason(torch.device("cpu")) is not None and not torch.cuda.is_available():
    pytest.skip(f"triton backend unusable here: {triton_backend.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)

# numpy warns where the GPU is silent: exp() overflows on unmined tile entries that a select then drops,
# and Inf inputs make NaN products before their rows are flagged
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def one_configuration_per_kernel(monkeypatch):
    """On a GPU every test would otherwise autotune (compile and time every candidate configuration) for
    each new kernel variant; tests use the first candidate, and one test autotunes on purpose."""
    monkeypatch.setenv("MS_FUSED_TRITON_AUTOTUNE", "0")


def two_runs_are_bitwise_identical_in(dtype, *batch, **kw):
    # docs/semantics.md "Reproducibility", repeat: no atomics, column splits combined in a fixed order
    first = loss_and_grads("triton", *batch, dtype=dtype, **kw)
    second = loss_and_grads("triton", *batch, dtype=dtype, **kw)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_two_runs_are_bitwise_identical():
    x, y, r, yr, ref_self_index = memory_bank_batch(30, 20, 24, 5, seed=17)
    for dtype in (torch.float32, torch.float16):
        two_runs_are_bitwise_identical_in(dtype, x, y, r, yr, ref_self_index=ref_self_index)
    two_runs_are_bitwise_identical_in(torch.bfloat16, *clustered_batch(30, 24, 5, seed=18))


def direct(**options):
    """triton_backend.per_anchor_loss with tile or split options, as a loss_and_grads callable."""
    def loss(x, y, r, yr, ref_self_index=None, reduction="none"):
        return triton_backend.per_anchor_loss(check_inputs(x, y, r, yr, ref_self_index, HyperParams()), **options)
    return loss


def direct_run(batch, **options):
    """Losses and gradients of triton_backend.per_anchor_loss(**options) on `batch` in float32 on DEVICE."""
    x, y, r, yr, ref_self_index = (*batch, None, None, None)[:5]
    x, r = x.float().to(DEVICE), None if r is None else r.float().to(DEVICE)
    loss, grads = loss_and_grads(direct(**options), x, y, r, yr, ref_self_index=ref_self_index)
    return (loss, *grads)


@pytest.mark.parametrize("mode", ["self", "reference", "memory_bank"])
@pytest.mark.parametrize("splits", [2, 5])
def test_split_columns_combine_to_the_unsplit_result(mode, splits):
    batch = {"self": lambda: clustered_batch(70, 24, 6, seed=30),
             "reference": lambda: clustered_batch(40, 24, 5, seed=31, m=150),
             "memory_bank": lambda: memory_bank_batch(40, 110, 24, 5, seed=32)}[mode]()
    whole = direct_run(batch, splits=1)
    split = direct_run(batch, splits=splits)
    for a, b in zip(whole, split):
        assert rel_err(b, a) <= 1e-6, rel_err(b, a)
    again = direct_run(batch, splits=splits)
    assert all(torch.equal(a, b) for a, b in zip(split, again))  # the fixed combine order is deterministic


def test_tile_configurations_do_not_change_the_result():
    batch = clustered_batch(70, 40, 5, seed=19)
    first = direct_run(batch)
    for cfg in triton_backend.tile_configs(40, torch.float32)[1:] + triton_backend.tile_configs(40, torch.bfloat16):
        other = direct_run(batch, config=cfg)
        for a, b in zip(first, other):
            assert rel_err(b, a) <= 1e-5, (cfg, rel_err(b, a))


@pytest.mark.parametrize("order", ["sorted", "shuffled", "reversed"])
def test_label_order_of_the_input_does_not_matter(order):
    x, y, r, yr = clustered_batch(60, 20, 6, seed=33, m=50)
    perm = {"sorted": torch.argsort(y, stable=True), "shuffled": torch.randperm(60, generator=torch.Generator().manual_seed(0)),
            "reversed": torch.argsort(y, descending=True, stable=True)}[order]
    assert_matches_reference("triton", x[perm], y[perm])
    assert_matches_reference("triton", x[perm], y[perm], r, yr)


@pytest.mark.parametrize("labels", ["one class", "two classes", "all distinct", "one big class and singletons"])
@pytest.mark.parametrize("mode", ["self", "reference"])
def test_degenerate_label_distributions(labels, mode):
    gen = torch.Generator().manual_seed(34)
    n, m, d = 45, 70, 12
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = torch.randn(m, d, generator=gen, dtype=torch.float64)
    make = {"one class": lambda k: torch.zeros(k, dtype=torch.long),
            "two classes": lambda k: torch.randint(0, 2, (k,), generator=gen),
            "all distinct": lambda k: torch.randperm(k, generator=gen) * 7 - 100,
            "one big class and singletons": lambda k: torch.where(torch.rand(k, generator=gen) < 0.6, 5,
                                                                    1000 + torch.arange(k))}[labels]
    y, yr = make(n), make(m)
    if mode == "self":
        if threshold_gap(x, y) < 1e-5:
            pytest.skip("draw next to a mining threshold")
        assert_matches_reference("triton", x, y)
    else:
        if threshold_gap(x, y, r, yr) < 1e-5:
            pytest.skip("draw next to a mining threshold")
        assert_matches_reference("triton", x, y, r, yr)


def test_memory_bank_plans_two_waves_of_programs():
    cfg = triton_backend.tile_configs(128, torch.bfloat16)[0]
    splits, cols = triton_backend.column_splits(256, 32768, cfg, torch.device("cpu"))
    programs = math.ceil(256 / cfg.block_n) * splits
    assert programs >= 2 * 132 and (splits - 1) * cols < 32768 <= splits * cols
    assert triton_backend.column_splits(32768, 32768, cfg, torch.device("cpu"))[0] == 1


def test_forward_is_one_sweep_plus_the_band():
    """Multiply-adds of every tl.dot under the interpreter, in units of N*M*D: P x K labels (K = 8)."""
    if DEVICE != "cpu":
        pytest.skip("counts the interpreter's dots")
    from triton.runtime import interpreter

    macs = [0]
    real_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, acc, *args, **kwargs):
        macs[0] += a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return real_dot(self, a, b, acc, *args, **kwargs)

    n, d = 1024, 16  # the band costs 2 * (block_n + K) / N: small against 1 from N = 1024 on
    gen = torch.Generator().manual_seed(35)
    y = (torch.arange(n) // 8)[torch.randperm(n, generator=gen)]
    x = torch.randn(n // 8, d, generator=gen)[y] + 0.5 * torch.randn(n, d, generator=gen)
    x = x.to(torch.bfloat16).requires_grad_()
    interpreter.InterpreterBuilder.create_dot = counting_dot
    try:
        loss = multi_similarity_loss(x, y, backend="triton")
        forward = macs[0] / (n * n * d)
        loss.backward()
        total = macs[0] / (n * n * d)
    finally:
        interpreter.InterpreterBuilder.create_dot = real_dot
    assert 1.0 <= forward <= 1.2, forward
    assert 2.0 <= total <= 3.2, total


class _AllocationLog(TorchDispatchMode):
    """Records (op, element count, bytes) of every tensor that an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel(), t.numel() * t.element_size()))
        return out


@pytest.mark.parametrize("mode", ["self", "reference"])
def test_no_tensor_of_n_by_m_elements_is_ever_created(mode):
    n, m, d = 96, 80, 6
    x, y, r, yr = clustered_batch(n, d, 5, seed=20, m=m)
    xs = x.float().to(DEVICE).requires_grad_()
    rs = r.float().to(DEVICE).requires_grad_()
    if mode == "self":
        rs, yr, m = None, None, n
    log = _AllocationLog()
    with log:
        loss = multi_similarity_loss(xs, y.to(DEVICE), rs, None if yr is None else yr.to(DEVICE), backend="triton")
        loss.backward()
    assert log.sizes, "the dispatch mode saw no op"
    largest = sorted(log.sizes, key=lambda s: -s[2])[:5]
    # nothing has N * M elements; the largest buffers are (rows, D) float32 inputs / gradients (the
    # interpreter's byte views of them included) and, when the columns are split across programs, one
    # partial (rows, D) gradient per split; per-row statistics are O(N + M)
    cfg = triton_backend.tile_configs(d, torch.float32)[0]
    splits = max(triton_backend.column_splits(rows, cols, cfg, torch.device(DEVICE))[0]
                 for rows, cols in ((n, m), (m, n)))
    assert max(numel for _, numel, _ in log.sizes) < n * m, largest
    assert max(nbytes for _, _, nbytes in log.sizes) <= max(n, m) * d * 4 * splits, largest


def test_availability_and_dtype_routing(monkeypatch):
    assert triton_backend.unavailable_reason(torch.device(DEVICE), None) is None
    reason = triton_backend.unavailable_reason(torch.device(DEVICE), torch.float64)
    assert reason is not None and "float64" in reason
    x = torch.randn(6, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        multi_similarity_loss(x, torch.zeros(6, dtype=torch.long, device=DEVICE), backend="triton")
    assert multi_similarity_loss(x, torch.zeros(6, dtype=torch.long, device=DEVICE)).dtype == torch.float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu_reason = triton_backend.unavailable_reason(torch.device("cpu"), torch.float32)
    assert cpu_reason is not None and "CUDA" in cpu_reason


# ---- the real GPU compiler, without a GPU ----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below compile and run the kernels")
def test_kernels_compile_for_sm90_without_spills():
    """benchmarks/kernel_stats.py --compile-only: Triton's GPU compiler against a stub sm_90 driver and
    ptxas -v, through the backend's own launch code, for each dtype's first configuration in every mode.
    Catches what the interpreter lets through (non-constexpr globals, dot dtype rules, loop-carried types,
    register allocation)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(repo, ".pytest_cache", "kernel_compile_stats.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "kernel_stats.py"), "--compile-only",
                           "--json", out], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    compiled = json.load(open(out))["compiled"]
    kernels = {c["kernel"] for c in compiled}
    assert {"band_min_kernel", "sweep_kernel", "finish_kernel", "backward_kernel", "combine_grad_kernel"} <= kernels
    assert all(c["ok"] and c["registers"] > 0 for c in compiled)
    spilled = [c for c in compiled if c["spill_stores"] or c["spill_loads"]]
    assert not spilled, spilled


# ---- GPU only: sizes the interpreter cannot afford --------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_parity_at_a_larger_size(dtype):
    x, y = clustered_batch(1500, 256, 60, seed=21)
    assert_matches_reference("triton", x, y, dtype=dtype)
    x, y, r, yr = clustered_batch(900, 200, 50, seed=22, m=1700, shared_centres=True)
    assert_matches_reference("triton", x, y, r, yr, dtype=dtype)
    x, y, r, yr, ref_self_index = memory_bank_batch(700, 1300, 192, 50, seed=23)
    assert_matches_reference("triton", x, y, r, yr, dtype=dtype, ref_self_index=ref_self_index)


@needs_cuda
def test_gpu_odd_dims_and_bitwise_repeatability():
    x, y = clustered_batch(1111, 130, 40, seed=24)
    assert_matches_reference("triton", x, y, dtype=torch.bfloat16)
    two_runs_are_bitwise_identical_in(torch.bfloat16, x, y)


@needs_cuda
def test_gpu_autotuned_run_uses_o_of_n_extra_memory(monkeypatch):
    monkeypatch.setenv("MS_FUSED_TRITON_AUTOTUNE", "1")
    n, d = 8192, 256
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 512, (n,), device="cuda")
    multi_similarity_loss(x, y, backend="triton").backward()  # compile and autotune outside the measurement
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    multi_similarity_loss(x, y, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.numel() * x.grad.element_size()
    assert extra < 0.01 * n * n * 4, f"{extra} bytes beyond inputs and gradients"
    assert math.isfinite(float(x.grad.float().abs().sum()))
