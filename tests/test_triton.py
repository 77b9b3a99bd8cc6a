"""The `triton` backend against the `reference` oracle (float64), on the CPU through Triton's interpreter
(conftest sets TRITON_INTERPRET=1 when there is no GPU) and, where CUDA exists, on the GPU.

Interpreter cases stay small (N, M <= ~130, 32-wide blocks) because the interpreter runs every program
in Python; sizes are picked so that N, M and D are not multiples of any block and several row, column,
K and output-D blocks occur.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import clustered, clustered_batch, rel_err, threshold_gap
from ms_fused import multi_similarity_loss

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


# relative error (‖out − ref‖ / ‖ref‖) against the float64 reference on the same rounded inputs
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# half-precision gradients: the second GEMM takes weights and x_hat rounded to the input dtype, and the
# gradient itself is stored in it
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _same_centres(n: int, m: int, d: int, n_classes: int, gen: torch.Generator, spread: float = 0.9):
    """Anchors and reference rows around one set of class centres (as a memory bank of past batches is)."""
    centres = torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    y, yr = torch.randint(0, n_classes, (n,), generator=gen), torch.randint(0, n_classes, (m,), generator=gen)
    x = centres[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = centres[yr] + spread * torch.randn(m, d, generator=gen, dtype=torch.float64)
    return x, y, r, yr


def reference_batch(n: int, m: int, d: int, n_classes: int, seed: int, margin: float = 1e-5):
    """Reference mode on shared class centres, redrawn away from mining thresholds (see helpers)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x, y, r, yr = _same_centres(n, m, d, n_classes, gen)
        if threshold_gap(x, y, r, yr) > margin:
            return x, y, r, yr
    raise RuntimeError("no batch away from the thresholds")


def memory_bank_batch(n: int, m_extra: int, d: int, n_classes: int, seed: int, margin: float = 1e-5):
    """Reference mode where R = [Q; other rows] and anchor i's own copy is row i of R, except for a few
    anchors given -1 (their copy then is a real positive); redrawn away from mining thresholds."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x, y, extra, y_extra = _same_centres(n, m_extra, d, n_classes, gen)
        r, yr = torch.cat([x, extra]), torch.cat([y, y_extra])
        own = torch.arange(n)
        own[::5] = -1
        if threshold_gap(x, y, r, yr, self_index=own) > margin:
            return x, y, r, yr, own
    raise RuntimeError("no batch away from the thresholds")


def run(backend, dtype, x, y, r=None, yr=None, weights=None, grad_ref=True, **kw):
    """Per-anchor losses and gradients (None when not asked) of `backend` on x, r cast to `dtype` (the
    reference gets those rounded values in float64)."""
    work = torch.float64 if backend == "reference" else dtype
    xs = x.to(dtype).to(work).to(DEVICE).requires_grad_()
    rs = None if r is None else r.to(dtype).to(work).to(DEVICE).requires_grad_(grad_ref)
    y = y.to(DEVICE)
    yr = None if yr is None else yr.to(DEVICE)
    if "ref_self_index" in kw and kw["ref_self_index"] is not None:
        kw["ref_self_index"] = kw["ref_self_index"].to(DEVICE)
    loss = multi_similarity_loss(xs, y, rs, yr, backend=backend, reduction="none", **kw)
    w = torch.linspace(0.2, 1.0, loss.shape[0], dtype=loss.dtype, device=DEVICE) if weights is None else weights
    (loss * w.to(loss.dtype)).sum().backward()
    return loss, xs.grad, None if rs is None else rs.grad


def assert_matches_reference(dtype, x, y, r=None, yr=None, grad_ref=True, grad_floor=0.0, **kw):
    loss, dx, dr = run("triton", dtype, x, y, r, yr, grad_ref=grad_ref, **kw)
    loss_ref, dx_ref, dr_ref = run("reference", dtype, x, y, r, yr, grad_ref=grad_ref, **kw)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    assert rel_err(loss, loss_ref) <= LOSS_TOL[dtype], rel_err(loss, loss_ref)
    assert rel_err(dx, dx_ref, grad_floor) <= GRAD_TOL[dtype], rel_err(dx, dx_ref, grad_floor)
    if r is not None and grad_ref:
        assert dr.dtype == dtype
        assert rel_err(dr, dr_ref, grad_floor) <= GRAD_TOL[dtype], rel_err(dr, dr_ref, grad_floor)
    return loss, dx, dr


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_gpu_parity_at_a_larger_size covers it on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["self", "reference", "memory_bank"])
def test_parity_with_reference(dtype, mode):
    if mode == "self":
        x, y = clustered_batch(77, 40, 7, seed=1)
        assert_matches_reference(dtype, x, y)
    elif mode == "reference":
        x, y, r, yr = clustered_batch(45, 40, 6, seed=2, m=70)
        assert_matches_reference(dtype, x, y, r, yr)
    else:
        x, y, r, yr, own = memory_bank_batch(40, 30, 40, 6, seed=3)
        assert_matches_reference(dtype, x, y, r, yr, ref_self_index=own)


@pytest.mark.parametrize("mining,normalize", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("mode", ["self", "reference"])
def test_mining_and_normalize_switches(mining, normalize, mode):
    # rows scaled by 1/4 keep unnormalised similarities near 1 (beta * S stays moderate); the threshold
    # margin is checked on the scaled rows
    if mode == "self":
        x, y = clustered_batch(50, 24, 5, seed=4)
        x = x / 4
        assert threshold_gap(x, y, normalize=normalize) > 1e-5
        assert_matches_reference(torch.float32, x, y, mining=mining, normalize=normalize)
    else:
        x, y, r, yr = reference_batch(40, 37, 24, 5, seed=5)
        x, r = x / 4, r / 4
        assert threshold_gap(x, y, r, yr, normalize=normalize) > 1e-5
        assert_matches_reference(torch.float32, x, y, r, yr, mining=mining, normalize=normalize)


@pytest.mark.parametrize("seed", [6, 7])
def test_more_seeds_and_hyper_parameters(seed):
    x, y = clustered_batch(60, 20, 6, seed=seed, epsilon=0.05)
    assert_matches_reference(torch.float32, x, y, alpha=3.0, beta=40.0, base=0.4, epsilon=0.05)


def test_large_alpha_beta_never_overflow():
    x, y = clustered_batch(40, 16, 4, seed=8)
    for dtype in (torch.float32, torch.float16):
        loss, dx, _ = run("triton", dtype, x, y, alpha=1000.0, beta=1000.0)
        loss_ref, dx_ref, _ = run("reference", dtype, x, y, alpha=1000.0, beta=1000.0)
        assert torch.isfinite(loss).all() and torch.isfinite(dx).all()
        assert rel_err(loss, loss_ref) <= 1e-5
        # a weight exp(1000 (S - base) - B) turns an S error of 1e-7 into 1e-4 relative
        assert rel_err(dx, dx_ref) <= (1e-4 if dtype == torch.float32 else 2e-2), rel_err(dx, dx_ref)


def test_reductions():
    x, y, r, yr = clustered_batch(35, 12, 4, seed=9, m=41)
    xs = x.float().to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        out = multi_similarity_loss(xs, y.to(DEVICE), r.float().to(DEVICE), yr.to(DEVICE), backend="triton",
                                    reduction=reduction)
        ref = multi_similarity_loss(x.float().double(), y, r.float().double(), yr, backend="reference",
                                    reduction=reduction)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("n,m,d", [(1, None, 8), (33, None, 1), (20, None, 130), (1, 1, 5), (3, 65, 17)])
def test_odd_sizes(n, m, d):
    gen = torch.Generator().manual_seed(10 + n + d)
    x, y = clustered(n, d, 3, gen)
    # with D = 1 a normalised row is +-1 whatever x is, so the true gradient is 0 and both sides return
    # rounding noise; measure it against 1/|x|, the scale of anything back-propagated through x / |x|
    floor = float((1 / x.abs()).norm()) if d == 1 else 0.0
    if m is None:
        assert threshold_gap(x, y) > 1e-5  # these seeds draw no pair next to a mining threshold
        assert_matches_reference(torch.float32, x, y, grad_floor=floor)
    else:
        r, yr = clustered(m, d, 3, gen)
        assert threshold_gap(x, y, r, yr) > 1e-5
        assert_matches_reference(torch.float32, x, y, r, yr, grad_floor=floor)


def test_zero_rows_duplicates_and_extreme_labels():
    x, y = clustered_batch(30, 10, 3, seed=11)
    x[4] = 0.0                      # F.normalize keeps it 0: S = 0 with everyone, never NaN
    x[7] = x[6]                     # an exact duplicate with the same label is a real positive
    y[7] = y[6]
    y = y * (2**40) - 7             # huge and negative labels
    loss, dx, _ = assert_matches_reference(torch.float32, x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all()


def test_no_pairs_gives_zero_loss_that_still_backpropagates():
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.arange(9)             # all labels distinct: no positives, so no hard negatives either
    loss, dx, _ = run("triton", torch.float32, x, y)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert dx is not None and torch.equal(dx, torch.zeros_like(dx))


def test_non_contiguous_inputs():
    x, y, r, yr = clustered_batch(30, 20, 4, seed=12, m=26)
    wide = torch.zeros(30, 40, dtype=torch.float32, device=DEVICE)
    wide[:, ::2] = x.float().to(DEVICE)
    q = wide[:, ::2].requires_grad_()                 # stride (40, 2)
    rt = r.float().to(DEVICE).T.contiguous().T        # column-major
    loss = multi_similarity_loss(q, y.to(DEVICE), rt, yr.to(DEVICE), backend="triton", reduction="none")
    loss.sum().backward()
    loss_ref, dx_ref, _ = run("reference", torch.float32, x, y, r, yr, weights=torch.ones(30))
    assert rel_err(loss.cpu(), loss_ref) <= 1e-5 and rel_err(q.grad.cpu(), dx_ref) <= 1e-5


def test_frozen_reference_set_gets_no_gradient():
    x, y, r, yr, own = memory_bank_batch(25, 20, 16, 4, seed=13)
    loss, dx, dr = assert_matches_reference(torch.float32, x, y, r, yr, grad_ref=False, ref_self_index=own)
    assert dr is None


@pytest.mark.parametrize("mode", ["self", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_give_nan_like_the_reference(mode, bad):
    if mode == "self":
        x, y = clustered_batch(36, 12, 4, seed=14)
        x[5, 3] = bad
        r = yr = None
    else:
        x, y, r, yr = clustered_batch(36, 12, 4, seed=15, m=40)
        x[5, 3] = bad               # only anchor 5's row of S is non-finite
    loss, dx, dr = run("triton", torch.float32, x, y, r, yr)
    loss_ref, dx_ref, dr_ref = run("reference", torch.float32, x, y, r, yr)
    assert torch.isnan(loss).any()
    assert torch.equal(torch.isnan(loss), torch.isnan(loss_ref))
    assert rel_err(loss, loss_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-5
    if mode == "reference":
        assert torch.isnan(loss).sum() == 1 and rel_err(dr, dr_ref) <= 1e-5


def test_nan_in_the_reference_set_poisons_every_anchor():
    x, y, r, yr = clustered_batch(20, 8, 3, seed=16, m=24)
    r[9, 0] = float("nan")
    loss, _, _ = run("triton", torch.float32, x, y, r, yr)
    assert torch.isnan(loss).all()


def test_two_runs_are_bitwise_identical():
    x, y, r, yr, own = memory_bank_batch(30, 20, 24, 5, seed=17)
    for dtype in (torch.float32, torch.float16):
        first = run("triton", dtype, x, y, r, yr, ref_self_index=own)
        second = run("triton", dtype, x, y, r, yr, ref_self_index=own)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    xs, ys = clustered_batch(30, 24, 5, seed=18)
    first, second = run("triton", torch.bfloat16, xs, ys), run("triton", torch.bfloat16, xs, ys)
    assert all(torch.equal(a, b) for a, b in zip(first[:2], second[:2]))


def _problem(x, y, r=None, yr=None, own=None, dtype=torch.float32, **hp):
    from ms_fused._inputs import HyperParams, check_inputs

    rs = None if r is None else r.to(dtype).to(DEVICE).requires_grad_()
    return check_inputs(x.to(dtype).to(DEVICE).requires_grad_(), y.to(DEVICE), rs,
                        None if yr is None else yr.to(DEVICE), None if own is None else own.to(DEVICE),
                        HyperParams(**hp))


def _loss_and_grads(problem, **kw):
    loss = triton_backend.per_anchor_loss(problem, **kw)
    inputs = [problem.q] + ([] if problem.ref is None else [problem.ref])
    weights = torch.linspace(0.2, 1.0, loss.shape[0], device=loss.device)
    return (loss, *torch.autograd.grad((loss * weights).sum(), inputs))


@pytest.mark.parametrize("mode", ["self", "reference", "memory_bank"])
@pytest.mark.parametrize("splits", [2, 5])
def test_split_columns_combine_to_the_unsplit_result(mode, splits):
    if mode == "self":
        problem = _problem(*clustered_batch(70, 24, 6, seed=30))
    elif mode == "reference":
        problem = _problem(*clustered_batch(40, 24, 5, seed=31, m=150))
    else:
        x, y, r, yr, own = memory_bank_batch(40, 110, 24, 5, seed=32)
        problem = _problem(x, y, r, yr, own)
    whole = _loss_and_grads(problem, splits=1)
    split = _loss_and_grads(problem, splits=splits)
    for a, b in zip(whole, split):
        assert rel_err(b, a) <= 1e-6, rel_err(b, a)
    again = _loss_and_grads(problem, splits=splits)
    assert all(torch.equal(a, b) for a, b in zip(split, again))  # the fixed combine order is deterministic


def test_tile_configurations_do_not_change_the_result():
    problem = _problem(*clustered_batch(70, 40, 5, seed=19))
    first = _loss_and_grads(problem)
    for cfg in triton_backend.tile_configs(40, torch.float32)[1:] + triton_backend.tile_configs(40, torch.bfloat16):
        other = _loss_and_grads(problem, config=cfg)
        for a, b in zip(first, other):
            assert rel_err(b, a) <= 1e-5, (cfg, rel_err(b, a))


@pytest.mark.parametrize("order", ["sorted", "shuffled", "reversed"])
def test_label_order_of_the_input_does_not_matter(order):
    x, y, r, yr = clustered_batch(60, 20, 6, seed=33, m=50)
    perm = {"sorted": torch.argsort(y, stable=True), "shuffled": torch.randperm(60, generator=torch.Generator().manual_seed(0)),
            "reversed": torch.argsort(y, descending=True, stable=True)}[order]
    assert_matches_reference(torch.float32, x[perm], y[perm])
    assert_matches_reference(torch.float32, x[perm], y[perm], r, yr)


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
        assert_matches_reference(torch.float32, x, y)
    else:
        if threshold_gap(x, y, r, yr) < 1e-5:
            pytest.skip("draw next to a mining threshold")
        assert_matches_reference(torch.float32, x, y, r, yr)


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
    assert_matches_reference(dtype, x, y)
    x, y, r, yr = reference_batch(900, 1700, 200, 50, seed=22)
    assert_matches_reference(dtype, x, y, r, yr)
    x, y, r, yr, own = memory_bank_batch(700, 1300, 192, 50, seed=23)
    assert_matches_reference(dtype, x, y, r, yr, ref_self_index=own)


@needs_cuda
def test_gpu_odd_dims_and_bitwise_repeatability():
    x, y = clustered_batch(1111, 130, 40, seed=24)
    first = assert_matches_reference(torch.bfloat16, x, y)
    second = run("triton", torch.bfloat16, x, y)
    assert all(torch.equal(a, b) for a, b in zip(first[:2], second[:2]))


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
