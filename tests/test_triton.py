"""What is particular to the `triton` backend: column splits, tile configurations, label order and
distributions, the one-sweep forward, the N×M allocation proof, dtype routing, bitwise determinism, and
GPU-only sizes (the compile for every GPU family without a GPU is test_kernel_compile.py). The contract and
the edge cases run on triton with every other backend in test_contract.py and test_edge_cases.py.

On the CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no
GPU), which runs every program in Python: cases stay small (N, M <= ~150), with N, M and D off every
block size so that several row, column, K and output-D blocks occur.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends_under_test import INTERPRETER_WARNINGS, triton_backend_or_skip
from helpers import assert_matches_reference, clustered_batch, loss_and_grads, memory_bank_batch, rel_err, threshold_gap
from ms_fused import multi_similarity_loss
from ms_fused.engine._inputs import HyperParams, check_inputs

triton_backend = triton_backend_or_skip()
pytestmark = INTERPRETER_WARNINGS

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


def test_load_alignment_follows_d_the_row_strides_and_the_start():
    """ALIGN (ms_fused/engine/triton/ms_kernels.py, "Alignment") divides D and every row stride, is at most 16, and
    is 1 for rows that do not start at a 16-byte boundary."""
    align = triton_backend.load_align
    wide = torch.zeros(8, 256, dtype=torch.bfloat16)
    assert align(256, wide) == 16
    assert align(100, wide[:, :100]) == 4 and align(100, wide[:, :100].contiguous()) == 4
    assert align(130, torch.zeros(8, 130, dtype=torch.bfloat16)) == 2
    assert align(101, torch.zeros(8, 101)) == 1
    assert align(96, wide[:, 8:104]) == 16   # 16 bytes in
    assert align(96, wide[:, 4:100]) == 1    # 8 bytes in: Triton assumes nothing of the address
    assert align(128, wide[:, :128], torch.zeros(5, 136, dtype=torch.bfloat16)[:, :128]) == 8
    assert align(64, torch.zeros(1, 64).expand(8, 64)) == 16  # stride 0


@pytest.mark.parametrize("start, expected_align", [(0, 4), (3, 1)])
def test_rows_read_with_any_alignment_give_the_same_bits(start, expected_align):
    """D = 100 as a column slice of rows of 136 (the memory's rows contiguous, stride 100): read 4 elements
    at a time (start 0), or one (start 3: 6 bytes into a 16-byte block), the loss and the gradients are those
    of the contiguous copy, bit for bit."""
    x, y, r, yr = clustered_batch(40, 100, 5, seed=37, m=30)
    wide = torch.zeros(40, 136, dtype=torch.bfloat16)
    wide[:, start:start + 100] = x.to(torch.bfloat16)
    view = wide[:, start:start + 100]
    r16 = r.to(torch.bfloat16)
    assert triton_backend.load_align(100, view, r16) == expected_align
    for args in ((y,), (y, r16, yr)):
        sliced = loss_and_grads("triton", view, *args)
        copied = loss_and_grads("triton", view.contiguous(), *args)
        assert torch.equal(sliced[0], copied[0])
        assert all(torch.equal(a, b) for a, b in zip(sliced[1], copied[1]))


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
    for rows in (cfg.block_n, cfg.block_n * cfg.row_groups):  # the backward's programs, the sweep's
        splits, cols = triton_backend.column_splits(256, 32768, cfg, torch.device("cpu"), rows_per_program=rows)
        programs = math.ceil(256 / rows) * splits
        assert programs >= 2 * 132 and (splits - 1) * cols < 32768 <= splits * cols
        # a resident program's anchor rows are loaded once per split: at least 1.5 columns per row
        assert not cfg.resident or cols >= 1.5 * rows
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


# docs/semantics.md "Memory": beyond its inputs, their gradients and O(N) per-row statistics, a step holds
# at most one float32 copy of the rows (the backward's partial sums), or one wave of row blocks' accumulators
# when that is larger (few rows: a memory bank's anchors)
PER_ROW_BYTES = 512


def planned_partial_bytes(na, nb, d, cfg):
    n_splits, _, stores = triton_backend.backward_splits(na, nb, d, cfg, torch.device(DEVICE))
    return n_splits * na * d * 4 if stores else 0


@pytest.mark.parametrize("n, d", [(8192, 256), (2 ** 20, 512), (8192, 100)])
def test_a_step_plans_at_most_one_float32_copy_of_the_rows(monkeypatch, n, d):
    monkeypatch.setattr(triton_backend, "_n_sms", lambda device: 132)
    for arch in ARCHS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for cfg in triton_backend.tile_configs(d, dtype, arch):
                assert planned_partial_bytes(n, n, d, cfg) <= n * d * 4, (arch, cfg)


def test_few_rows_keep_one_wave_of_programs_within_one_wave_of_accumulators(monkeypatch):
    monkeypatch.setattr(triton_backend, "_n_sms", lambda device: 132)
    cfg = triton_backend.tile_configs(128, torch.bfloat16)[0]
    n_splits, _, stores = triton_backend.backward_splits(256, 10 ** 6, 128, cfg, torch.device(DEVICE))
    assert stores and math.ceil(256 / cfg.block_n) * n_splits >= 132 - math.ceil(256 / cfg.block_n)
    assert n_splits * 256 <= 132 * triton_backend.PARTIAL_ROWS_PER_SM


@needs_cuda
def test_gpu_autotuned_run_uses_o_of_n_extra_memory(monkeypatch):
    monkeypatch.setenv("MS_FUSED_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_backend, "_n_sms", lambda device: 132)  # the plan of a 132-SM H100 / H200
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
    assert extra <= n * d * 4 + PER_ROW_BYTES * n, f"{extra} bytes beyond inputs and gradients"
    assert math.isfinite(float(x.grad.float().abs().sum()))


# ---- one S for every kernel: the forward's and the backward's tiles --------------------------------------

if triton_backend.kernels is not None:
    import triton
    import triton.language as tl

    from ms_fused.engine.triton import ms_kernels as K

    @triton.jit
    def s_tiles_kernel(a_ptr, a_perm_ptr, inv_a_ptr, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, out_ptr, sink_ptr,
                       NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, col_start,
                       ROW_GROUPS: tl.constexpr, CHAINED: tl.constexpr, NORMALIZE: tl.constexpr,
                       DOT_F32: tl.constexpr, RESIDENT: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Writes every S tile that the kernels' own helpers compute for ROW_GROUPS stacked anchor blocks
        against the columns from col_start on (the sweep: ROW_GROUPS = cfg.row_groups, columns from a split
        start; the band, finish and backward kernels: one block, columns from a band start). CHAINED feeds
        S to a second product, as the backward does (on a GPU that gives the S dot another layout)."""
        D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
        ROWS: tl.constexpr = ROW_GROUPS * BLOCK_N
        row0 = tl.program_id(0) * ROWS
        rows = row0 + tl.arange(0, ROWS)
        row_ok = rows < NA
        inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
        a0_off, a0_ok, a0_res = K._anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32,
                                                RESIDENT)
        if ROW_GROUPS == 2:
            a1_off, a1_ok, a1_res = K._anchor_block(a_ptr, a_perm_ptr, row0 + BLOCK_N, NA, D, stride_a, BLOCK_N,
                                                    BLOCK_D, DOT_F32, RESIDENT)
        else:
            a1_off, a1_ok, a1_res = a0_off, a0_ok, a0_res
        for start in range(col_start, NB, BLOCK_M):
            cols, col_ok, b_off, inv_b, yb, S, b_res = K._column_tile(
                a_ptr, a0_off, a0_ok, a0_res, a1_off, a1_ok, a1_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
                stride_b, start, NB, D, BLOCK_N, BLOCK_M, BLOCK_D, ROW_GROUPS, NORMALIZE, DOT_F32, RESIDENT)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * NB + cols[None, :], S, mask=row_ok[:, None] & col_ok[None, :])
            if CHAINED:
                ks = tl.arange(0, BLOCK_D)
                b = tl.load(b_ptr + b_off[:, None] + ks[None, :], mask=col_ok[:, None] & (ks < D)[None, :], other=0.0)
                out = tl.sum(tl.dot(S.to(tl.float32 if DOT_F32 else b.dtype), b.to(tl.float32) if DOT_F32 else b))
                tl.store(sink_ptr + tl.program_id(0), out)


def s_tiles(x, cfg, row_groups, col_start, backward=False):
    """S as the forward's sweep (row_groups = cfg.row_groups) or, with `backward`, as the backward computes
    it (one block, the backward's warps and stages, S feeding a second product)."""
    n, d = x.shape
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).to(torch.int32).to(x.device)
    inv = (1.0 / x.float().norm(dim=1))[perm.long()].contiguous()
    out = torch.full((n, n), float("nan"), device=x.device)
    sink = torch.zeros(n, device=x.device)
    rows = cfg.block_n * row_groups
    align = triton_backend.load_align(d, x)
    triton_backend._launch(s_tiles_kernel, (triton.cdiv(n, rows),), cfg, backward=backward, a_ptr=x, a_perm_ptr=perm,
                           inv_a_ptr=inv, b_ptr=x, b_perm_ptr=perm, inv_b_ptr=inv, yb_ptr=perm, out_ptr=out,
                           sink_ptr=sink, NA=n, NB=n, D_vecs=d // align, stride_a_vecs=x.stride(0) // align,
                           stride_b_vecs=x.stride(0) // align, ALIGN=align, col_start=col_start,
                           ROW_GROUPS=row_groups, CHAINED=backward, NORMALIZE=True,
                           DOT_F32=triton_backend._dot_f32(x.dtype))
    return out


ARCHS = ("sm_90", "sm_80", "sm_86", "sm_89", "sm_75", "gfx942")


def every_config(d, dtype):
    configs = []
    for arch in ARCHS:
        configs += [c for c in triton_backend.tile_configs(d, dtype, arch) if c not in configs]
    return configs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [40, 144])
def test_forward_and_backward_tiles_compute_the_same_s(dtype, d):
    """The forward mines with S from the sweep's stacked tiles (and the band kernels' tiles), the backward
    re-mines with S from its own tiles, whose columns start elsewhere: for every configuration of every
    target list, every S entry they share is bitwise the same, so both mine the same pairs."""
    x = torch.randn(150, d, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    for cfg in every_config(d, dtype):
        sweep = s_tiles(x, cfg, cfg.row_groups, 0)
        for start, backward in ((7, False), (0, True)):  # the band kernels' tiles, the backward's
            single = s_tiles(x, cfg, 1, start, backward)
            assert not torch.isnan(single[:, start:]).any() and not torch.isnan(sweep).any()
            if DEVICE == "cpu" and start:
                # the interpreter's tl.dot is numpy's matmul, and some BLAS kernels (OpenBLAS's AVX2 ones)
                # round a column by its position in the product: tiles that start elsewhere agree to rounding
                # there; a GPU's MMA computes each entry alike wherever it sits, so it is held to bits
                assert rel_err(single[:, start:], sweep[:, start:]) <= 1e-5, (cfg, backward)
            else:  # same shapes at the same positions: the same operations, on any CPU and on a GPU
                assert torch.equal(sweep[:, start:], single[:, start:]), (cfg, backward)


# ---- configurations per target, and launches that do not fit ------------------------------------------

def test_every_target_list_starts_with_a_first_choice():
    for arch in ARCHS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for d in (1, 96, 128, 512, 513, 2048):
                configs = triton_backend.tile_configs(d, dtype, arch)
                assert configs and all(isinstance(c, triton_backend.TileConfig) for c in configs)
                resident = [c for c in configs if c.resident]
                assert all(c.k_step(d) >= d and c.block_dout(d) == c.k_step(d) for c in resident)
    assert triton_backend.arch_family("sm_90") == "hopper" and triton_backend.arch_family("sm_89") == "ampere_small"
    assert triton_backend.arch_family("sm_75") == "turing" and triton_backend.arch_family("gfx942") == "cdna"


def fake_gpu(monkeypatch, arch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_backend, "target_arch", lambda device: arch)


def test_auto_takes_torch_where_triton_has_no_tensor_cores(monkeypatch):
    from ms_fused.engine import backends
    fake_gpu(monkeypatch, "sm_75")
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, torch.float16).__name__ == "ms_fused.engine.torch.backend"
    assert backends.resolve("triton", cuda, torch.float16).__name__ == "ms_fused.engine.triton.backend"
    with pytest.raises(ValueError, match="float16 and float32"):
        backends.resolve("triton", cuda, torch.bfloat16)
    fake_gpu(monkeypatch, "sm_80")
    assert backends.resolve("auto", cuda, torch.bfloat16).__name__ == "ms_fused.engine.triton.backend"


def test_auto_takes_torch_on_targets_newer_than_the_compiled_ones(monkeypatch):
    """sm_100 (B200) is compiled and checked like sm_90 (test_kernel_compile.py); a newer target is not, so
    "auto" passes it to torch and backend="triton" still runs there."""
    import kernel_stats

    from ms_fused.engine import backends
    assert f"sm_{triton_backend.NEWEST_COMPILED_CC}" in kernel_stats.ARCHS
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, "sm_100")
    assert triton_backend.arch_family("sm_100") == "hopper"
    monkeypatch.setattr(triton_backend, "triton_version", lambda: (3, 9))
    assert backends.resolve("auto", cuda, torch.bfloat16).__name__ == "ms_fused.engine.triton.backend"
    # under Triton 3.6 sm_100 compiles with a few bytes of spills: "auto" takes torch there
    monkeypatch.setattr(triton_backend, "triton_version", lambda: (3, 6))
    assert "sm_90" in triton_backend.auto_skip_reason(cuda)
    assert backends.resolve("auto", cuda, torch.bfloat16).__name__ == "ms_fused.engine.torch.backend"
    monkeypatch.setattr(triton_backend, "triton_version", lambda: (3, 9))
    for arch in ("sm_103", "sm_120"):
        fake_gpu(monkeypatch, arch)
        assert arch in triton_backend.auto_skip_reason(cuda) and "sm_100" in triton_backend.auto_skip_reason(cuda)
        assert backends.resolve("auto", cuda, torch.bfloat16).__name__ == "ms_fused.engine.torch.backend"
        assert backends.resolve("triton", cuda, torch.bfloat16).__name__ == "ms_fused.engine.triton.backend"


def test_triton_older_than_the_compiled_release_is_refused(monkeypatch):
    """The kernels are compiled and tested with Triton 3.6 and newer (setup.py's extra asks for it); an older
    Triton makes the backend unavailable, with both versions in the reason; the resident D = 512
    configurations are bfloat16's under the checked Tritons (3.9: only with one exp2 per pair)."""
    from ms_fused.engine import backends
    monkeypatch.setattr(triton_backend.triton, "__version__", "3.5.1")
    reason = triton_backend.unavailable_reason(torch.device(DEVICE), torch.float32)
    assert reason is not None and "3.5.1" in reason and "3.6" in reason
    with pytest.raises(ValueError, match="3.5.1"):
        backends.resolve("triton", torch.device(DEVICE), torch.float32)
    # (version, widest for bfloat16 with one exp2 per pair in the backward, without it); float16 256 everywhere
    for version, shared, other in (("3.5.0", 256, 256), ("3.6.0", 512, 512), ("3.6.2", 512, 512),
                                   ("3.7.0", 256, 256), ("3.9.0", 512, 256), ("3.10.0", 256, 256)):
        monkeypatch.setattr(triton_backend.triton, "__version__", version)
        assert triton_backend.resident_widest_d(torch.bfloat16, True) == shared, version
        assert triton_backend.resident_widest_d(torch.bfloat16, False) == other, version
        assert triton_backend.resident_widest_d(torch.float16, True) == 256, version
        assert triton_backend.resident_widest_d(torch.bfloat16, True, "sm_100") == (512 if version.startswith("3.6.")
                                                                                   else 256), version
    monkeypatch.setattr(triton_backend.triton, "__version__", "3.6.0")
    assert triton_backend.unavailable_reason(torch.device(DEVICE), torch.float32) is None


def out_of_resources_at(monkeypatch, fails):
    """Make `fails(kernel name, cfg)` launches raise Triton's out-of-resources error; returns the log of
    (kernel, cfg) launches that went through."""
    real = triton_backend._launch
    ran = []

    def launch(kernel, grid, cfg, backward=False, **args):
        if cfg is not None and fails(kernel.fn.__name__, cfg):
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        ran.append((kernel.fn.__name__, cfg))
        return real(kernel, grid, cfg, backward, **args)

    monkeypatch.setattr(triton_backend, "_launch", launch)
    return ran


@pytest.mark.parametrize("where", ["everywhere", "first forward", "first backward", "every backward"])
def test_a_launch_that_does_not_fit_falls_back(monkeypatch, where):
    """Out of resources: the next candidate configuration runs (the backward re-mines with the forward of
    the configuration it runs); after the last, the torch backend, with one warning."""
    import warnings
    x, y, r, yr = clustered_batch(60, 24, 5, seed=36, m=50)
    first = triton_backend.tile_configs(24, torch.float32, triton_backend.target_arch(torch.device(DEVICE)))[0]
    fails = {"everywhere": lambda name, cfg: True,
             "first forward": lambda name, cfg: cfg == first and name != "backward_kernel",
             "first backward": lambda name, cfg: cfg == first and name == "backward_kernel",
             "every backward": lambda name, cfg: name == "backward_kernel"}[where]
    ran = out_of_resources_at(monkeypatch, fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches_reference("triton", x, y, dtype=torch.float32)
        assert_matches_reference("triton", x, y, r, yr, dtype=torch.float32)
    ours = [w for w in caught if "no triton configuration fits" in str(w.message)]
    if where == "everywhere":
        # one warning per loss call; only the configuration-free row statistics launched
        assert len(ours) == 2 and all(cfg is None for _, cfg in ran)
    elif where == "every backward":
        # the forward ran on triton, each backward's gradients came from the torch backend, with one warning
        assert len(ours) == 2 and any(name == "sweep_kernel" for name, _ in ran)
        assert not any(name == "backward_kernel" for name, _ in ran)
    else:
        assert not ours and ran and all(cfg != first for name, cfg in ran if cfg is not None and
                                        (name == "backward_kernel" or where == "first forward"))


# ---- non-finite similarities from finite inputs ------------------------------------------------------------

@pytest.mark.parametrize("mining", [True, False])
def test_overflowing_products_make_their_anchors_nan(mining):
    """docs/semantics.md "Non-finite inputs": without normalize a finite product can overflow. A -Inf
    negative is never hard and a +Inf positive never hard either, so only the sweep's explicit flag (a
    NaN-propagating maximum over S * 0) makes such an anchor NaN, on a GPU (whose max drops NaN) as here."""
    gen = torch.Generator().manual_seed(37)
    q, y = torch.randn(10, 6, generator=gen), torch.arange(10) % 3
    r, yr = torch.randn(14, 6, generator=gen), torch.arange(14) % 3
    q[0, 0], r[5, 0] = 1e20, -1e20          # S_05 = -1e40: -Inf, a negative of anchor 0
    q[6, 1], r[9, 1] = 1e20, 1e20           # S_69 = +Inf, a positive of anchor 6 (labels 0 and 0)
    q[3, 2:4], r[7, 2:4] = 1e20, torch.tensor([1e20, -1e20])  # Inf - Inf: NaN for anchor 3
    assert y[6] == yr[9]
    losses = {b: loss_and_grads(b, q, y, r, yr, normalize=False, mining=mining) for b in ("torch", "triton")}
    loss, (dq, dr) = losses["triton"]
    assert loss.isnan().nonzero().flatten().tolist() == [0, 3, 6]
    assert torch.equal(loss.isnan(), losses["torch"][0].isnan())
    assert torch.isnan(dq[[0, 3, 6]]).all() and torch.isfinite(dq[[1, 2, 4, 5, 7, 8, 9]]).all()
    assert torch.isnan(dr).all()  # every column takes G_ij q_i from the NaN anchors


# ---- what a memory-bank call costs outside the kernels ---------------------------------------------------

class _ReadLog(TorchDispatchMode):
    """Records (op, bytes of its tensor inputs, whether an input shares storage with `watched`) of every op."""

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.watched = watched.untyped_storage().data_ptr()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.is_view:  # a view reads nothing
            inputs = []
        self.ops.append((str(func), sum(t.numel() * t.element_size() for t in inputs),
                         any(t.untyped_storage().data_ptr() == self.watched for t in inputs if t.numel())))
        return func(*args, **(kwargs or {}))


def test_a_memory_bank_call_reads_nothing_of_o_m_outside_the_kernels(monkeypatch):
    """M = 10^6 unit rows (ref_normalized, as CrossBatchMemory passes them), N = 256 anchors, D = 128, with
    the kernels stubbed out (nothing to compute here): the host side never touches the bank's rows (no norm,
    no finiteness scan: the sweep flags a non-finite similarity itself) and reads nothing of O(M) (the label
    order is a partition kernel's), and the band kernels, split over their band like the sweep over its
    columns, launch at least two programs per SM of a 132-SM GPU."""
    monkeypatch.setattr(triton_backend, "_n_sms", lambda device: 132)
    launches = []
    monkeypatch.setattr(triton_backend, "_launch", lambda kernel, grid, cfg, backward=False, **args:
                        launches.append((kernel.fn.__name__, math.prod(grid))))
    from ms_fused.engine.triton import ms_op as triton_op
    n, m, d = 256, 10 ** 6, 128
    gen = torch.Generator().manual_seed(38)
    bank = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1).to(torch.bfloat16)
    bank_labels = torch.randint(0, 5000, (m,), generator=gen)
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    y = bank_labels[:n].clone()
    own = torch.arange(n)
    log = _ReadLog(bank)
    with log:
        triton_op.forward_impl(x, bank, y, bank_labels, own, 2.0, 50.0, 0.5, 0.1, True, True, True, False, [], -1)
    assert not [op for op, _, touches in log.ops if touches], "an op outside the kernels read the bank's rows"
    # what runs outside the kernels is O(N) and the partition's count table, N / 16 x M / 4096 int32 (about
    # 60 KB at this size, against 256 MB of bank rows that the sweep reads): the bank's labels are read by a
    # kernel, never sorted
    table = triton_backend.triton.cdiv(n, triton_backend._group_rows(n)) * triton_backend.triton.cdiv(
        m, triton_backend.PARTITION_BLOCK)
    total = sum(nbytes for _, nbytes, _ in log.ops)
    assert total <= 8 * n * d + 16 * table, sorted(log.ops, key=lambda o: -o[1])[:5]
    assert max(nbytes for _, nbytes, _ in log.ops) < m, sorted(log.ops, key=lambda o: -o[1])[:5]
    programs = dict(launches)
    assert programs["band_min_kernel"] >= 2 * 132 and programs["finish_kernel"] >= 2 * 132, programs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_memory_bank_of_a_million_rows_at_d_100(dtype):
    """N = 256 anchors against M = 10^6 unit rows (as CrossBatchMemory keeps them), D = 100 (not a multiple
    of 16): loss and anchor gradient against the torch backend in float32 on the same rounded rows."""
    n, m, d = 256, 10 ** 6, 100
    gen = torch.Generator(device="cuda").manual_seed(39)
    centres = torch.nn.functional.normalize(torch.randn(2000, d, device="cuda", generator=gen), dim=1)
    bank_labels = torch.randint(0, 2000, (m,), device="cuda", generator=gen)
    bank = torch.nn.functional.normalize(centres[bank_labels] + 0.6 * torch.randn(m, d, device="cuda", generator=gen),
                                         dim=1).to(dtype)
    y = bank_labels[:n].clone()
    x = (centres[y] + 0.6 * torch.randn(n, d, device="cuda", generator=gen)).to(dtype)
    own = torch.arange(n, device="cuda")
    bank[:n] = torch.nn.functional.normalize(x.float(), dim=1).to(dtype)
    kw = dict(ref_self_index=own, ref_normalized=True, reduction="none")
    out = {}
    for backend in ("triton", "torch"):
        xs = x.detach().clone().requires_grad_(True)
        loss = multi_similarity_loss(xs, y, bank, bank_labels, backend=backend, **kw)
        loss.sum().backward()
        out[backend] = (loss.detach().float(), xs.grad.float())
    assert float(out["torch"][0].mean()) > 0
    assert rel_err(out["triton"][0], out["torch"][0]) <= 1e-4
    assert rel_err(out["triton"][1], out["torch"][1]) <= (2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_autotuning_never_times_under_cuda_graph_capture(monkeypatch):
    """Timing synchronises the device: while a CUDA graph is being captured, a key's earlier choice or the
    first candidate runs, with one warning; eagerly the candidates are timed once per key."""
    import warnings
    monkeypatch.setattr(triton_backend, "_autotune_enabled", lambda: True)
    monkeypatch.setattr(triton_backend, "_TUNED", {})
    monkeypatch.setattr(triton_backend, "_NOTED_UNTIMED", set())
    timed = []
    monkeypatch.setattr(triton_backend.triton.testing, "do_bench", lambda fn, **kw: (timed.append(fn), fn())[1])
    candidates = triton_backend.tile_configs(64, torch.bfloat16)
    speeds = {cfg: 0.0 if k == 1 else 1.0 for k, cfg in enumerate(candidates)}  # the second is the fastest
    cuda = torch.device("cuda")
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert triton_backend._choose_config(("key",), candidates, lambda cfg: speeds[cfg], cuda) == candidates[0]
    assert not timed and len([w for w in caught if "not timed" in str(w.message)]) == 1
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: False)
    chosen = triton_backend._choose_config(("key",), candidates, lambda cfg: speeds[cfg], cuda)
    assert len(timed) == len(candidates) and chosen == candidates[1]
    monkeypatch.setattr(triton_backend, "_capturing", lambda device: True)  # now the timed choice is kept
    assert triton_backend._choose_config(("key",), candidates, lambda cfg: speeds[cfg], cuda) == chosen
    assert len(timed) == len(candidates)


def test_tuning_key_names_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(triton_backend, "target_arch", lambda device: "sm_90")
    assert triton_backend._device_key(torch.device("cuda")) == ("NVIDIA H100 80GB HBM3", "sm_90")
    assert triton_backend._device_key(torch.device("cpu")) == ("cpu",)


@pytest.mark.parametrize("n, m", [(37, 1), (37, 700), (37, 5000), (4200, 900)])
def test_reference_order_lists_every_positive_in_its_anchors_band(n, m):
    """_reference_order's partition kernels: reference rows keep their order, each gets the dense code of an
    anchor with its label (-2 for labels no anchor has), and every anchor's band in the list holds every
    reference row with its label (huge, negative, absent and shared labels; several partition blocks; more
    anchors than MAX_GROUPS groups of 16)."""
    gen = torch.Generator().manual_seed(40)
    pool = torch.cat([torch.tensor([2**62, -2**62, -5, 0, 7, 11, 13, 2**40, -1, 99]), torch.arange(1000, 1600)])
    yq = pool[torch.randint(0, 8 if n < 100 else 500, (n,), generator=gen)]
    yr = pool[torch.randint(0, 10 if n < 100 else 610, (m,), generator=gen)]
    q, r = torch.randn(n, 4, generator=gen).to(DEVICE), torch.randn(m, 4, generator=gen).to(DEVICE)
    ones = torch.ones(n, device=DEVICE)
    anchors, refs, band, _ = triton_backend._reference_order(q, r, yq.to(DEVICE), yr.to(DEVICE), ones, ones, True)
    anchors, refs, band = [t._replace(**{k: None if v is None else v.cpu() for k, v in t._asdict().items()})
                           for t in (anchors, refs, band)]
    ys = yq[anchors.perm.long()]
    assert (ys[1:] >= ys[:-1]).all() and torch.equal(refs.perm, torch.arange(m, dtype=torch.int32))
    code_of = {int(y): int(c) for y, c in zip(ys, anchors.labels)}
    assert torch.equal(refs.labels, torch.tensor([code_of.get(int(y), -2) for y in yr], dtype=torch.int32))
    listed = int((refs.labels >= 0).sum())
    rows = band.perm[:listed].long()
    assert torch.equal(rows.sort().values, (refs.labels >= 0).nonzero().flatten())
    assert torch.equal(band.labels[:listed], refs.labels[rows])
    # every positive of anchor i lies in [band_lo[i], band_hi[i]) of the list
    n_codes = int(anchors.labels.max()) + 1
    where = torch.arange(listed)
    first = torch.full((n_codes,), listed).scatter_reduce(0, band.labels[:listed].long(), where, "amin")
    last = torch.full((n_codes,), -1).scatter_reduce(0, band.labels[:listed].long(), where, "amax")
    codes = anchors.labels.long()
    has = last[codes] >= 0
    assert (anchors.band_lo[has] <= first[codes][has]).all() and (last[codes][has] < anchors.band_hi[has]).all()
    assert (anchors.band_hi - anchors.band_lo <= listed).all()


def test_reference_mode_across_partition_blocks():
    """More reference rows than one partition block (PARTITION_BLOCK = 4096) and anchors across several
    16-row groups."""
    batch = clustered_batch(40, 12, 6, seed=41, m=4500)
    x, y, r, yr = batch
    if threshold_gap(x, y, r, yr) < 1e-5:
        pytest.skip("draw next to a mining threshold")
    assert_matches_reference("triton", x, y, r, yr)
    own = torch.full((40,), -1)
    own[::3] = torch.arange(0, 40, 3) * 110
    r[own[::3]], yr[own[::3]] = x[::3], y[::3]
    assert_matches_reference("triton", x, y, r, yr, ref_self_index=own)
