"""The `cpp` backend (csrc/): parity with `reference` at sizes that exercise its row blocking (batches of
more than 256 rows, one block), the ops' torch.library contract, compile, fallback, every instruction-set
variant. Tolerances: helpers.TOLERANCE; the contract and edge cases run in test_contract.py and
test_edge_cases.py.
"""
import os
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import (Tol, assert_close, assert_matches_reference, clustered_batch, loss_and_grads,
                     memory_bank_batch, rel_err, threshold_gap)
from ms_fused.engine import backends
from ms_fused import multi_similarity_loss

CPU = torch.device("cpu")
if os.environ.get("MS_FUSED_NO_CPP") == "1":
    pytest.skip("MS_FUSED_NO_CPP=1: the C++ extension is switched off", allow_module_level=True)

HP = (2.0, 50.0, 0.5, 0.1, True)  # alpha, beta, base, epsilon, mining as the ops take them


def test_extension_is_built_and_auto_picks_it():
    # CI builds the extension from scratch; a silently failed build must fail here, not skip the module
    assert backends.unavailable_reason("cpp", CPU) is None
    from ms_fused.engine.cpp import backend as cpp_backend

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert backends.resolve("auto", CPU, dtype) is cpp_backend
    assert backends.available_backends("cpu")[0] == "cpp"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n, d, classes", [(1, 4, 1), (7, 1, 3), (37, 5, 4), (300, 33, 12), (600, 16, 40)])
def test_self_mode_float64(seed, n, d, classes):
    x, y = clustered_batch(n, d, classes, seed, margin=1e-9)
    # D = 1: the true gradient is 0 (a normalised row is ±1); rounding noise is measured against 1/|x|
    assert_matches_reference("cpp", x, y, grad_floor=float((1 / x.abs()).norm()) if d == 1 else 0.0)


@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("n, classes", [(150, 10), (520, 30)])
def test_self_mode_float32(mining, n, classes):
    x, y = clustered_batch(n, 24, classes, seed=3, dtype=torch.float32, margin=1e-6)
    assert_matches_reference("cpp", x, y, dtype=torch.float32, mining=mining)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hyper", [dict(), dict(alpha=1000.0, beta=1000.0, base=0.9, epsilon=0.0),
                                   dict(alpha=0.3, beta=7.0, base=-0.2, epsilon=0.5, mining=False)])
def test_hyper_parameters_and_no_overflow(normalize, hyper):
    eps = hyper.get("epsilon", 0.1)
    x, y = clustered_batch(70, 8, 6, seed=5, margin=1e-9, epsilon=eps, normalize=normalize)
    if not normalize:
        x = x / 3  # keep |S| near 1 so that alpha, beta = 1000 stay within float64 (the spec's range)
    loss, _ = assert_matches_reference("cpp", x, y, normalize=normalize, **hyper)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, m", [(30, 45), (300, 40), (20, 9000)])  # 300: two blocks; last: M >> N
def test_reference_mode_float64(seed, n, m):
    x, y, r, yr = clustered_batch(n, 6, 5, seed, m=m, margin=1e-9)
    assert_matches_reference("cpp", x, y, r, yr)


def test_reference_mode_float32():
    x, y, r, yr = clustered_batch(260, 12, 9, seed=6, dtype=torch.float32, m=310, margin=1e-6)
    assert_matches_reference("cpp", x, y, r, yr, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_ref_self_index(seed):
    m = 50
    x, y, r, yr = clustered_batch(40, 6, 4, seed, m=m, margin=1e-9)
    ref_self_index = torch.randint(0, m, (40,), generator=torch.Generator().manual_seed(seed))
    ref_self_index[::3] = -1  # anchors without a copy in r
    ref_self_index[1] = ref_self_index[2]  # two anchors naming the same row
    # five more anchors that are exact copies of r's first rows (a memory bank holding the batch) ...
    x, y, ref_self_index = torch.cat([x, r[:5]]), torch.cat([y, yr[:5]]), torch.cat([ref_self_index, torch.arange(5)])
    # ... one of them labelled differently from its copy: removed from P_i only, so that pair stays a negative
    y[-1] = yr[4] + 1000
    assert_matches_reference("cpp", x, y, r, yr, ref_self_index=ref_self_index)


@pytest.mark.parametrize("grad_of", ["q", "r"])
def test_reference_mode_gradient_of_one_side_only(grad_of):
    x, y, r, yr = clustered_batch(300, 8, 6, seed=7, m=90, margin=1e-9)
    leaf = (x if grad_of == "q" else r).clone().requires_grad_(True)
    args = (leaf, y, r, yr) if grad_of == "q" else (x, y, leaf, yr)
    outs = {}
    for backend in ("cpp", "reference"):
        loss = multi_similarity_loss(*args, backend=backend)
        outs[backend] = (loss.detach(), torch.autograd.grad(loss, leaf)[0])
    assert_close((outs["cpp"][0], outs["cpp"][1:]), (outs["reference"][0], outs["reference"][1:]), torch.float64)


def test_non_contiguous_inputs_and_odd_labels():
    x, y = clustered_batch(280, 20, 9, seed=8, margin=1e-9)
    wide = torch.zeros(20, 2 * 280, dtype=torch.float64)
    wide[:, ::2] = x.T
    x_strided = wide[:, ::2].T  # same values, strides (2, 560)
    assert not x_strided.is_contiguous()
    labels = (y.to(torch.int64) - 4) * (2**59) + 7  # huge and negative, still one value per class
    assert len(torch.unique(labels)) == len(torch.unique(y))
    ref = loss_and_grads("reference", x, labels)
    assert_close(loss_and_grads("cpp", x_strided, labels), ref, torch.float64)
    assert_close(loss_and_grads("cpp", x_strided, y.to(torch.int32)), ref, torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_rows_give_nan(bad, normalize):
    x, y, r, yr = clustered_batch(300, 6, 5, seed=10, m=30, margin=1e-9)
    x[4, 2] = bad
    loss, _ = assert_matches_reference("cpp", x, y, r, yr, normalize=normalize)
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    x_self = x.clone()
    loss_self, _ = assert_matches_reference("cpp", x_self, y, normalize=normalize)  # in self mode every row sees it
    assert torch.isnan(loss_self).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, sizes", [(700, (350, 350)), (530, (200, 7, 1, 90, 232)), (300, (8,) * 37 + (4,)),
                                     (90, (30, 30, 30))])
def test_self_mode_symmetric_kernels_at_every_thread_count(threads, n, sizes):
    # self mode puts the rows in label order and cuts blocks by the thread count (rounds of tiles, an odd block
    # count sitting one block out per round: N = 90); classes larger than a band product (64 rows) and than
    # a block are tiled; another thread count cuts other tiles (rounding), the same one repeats the bits
    gen = torch.Generator().manual_seed(threads)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    for _ in range(100):  # away from the mining thresholds, as clustered_batch draws (see there why)
        centres = torch.randn(len(sizes), 12, generator=gen, dtype=torch.float64)
        x = centres[y] + 0.8 * torch.randn(n, 12, generator=gen, dtype=torch.float64)
        if threshold_gap(x, y) > 1e-9:
            break
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, grads = assert_matches_reference("cpp", x, y)
        again = loss_and_grads("cpp", x, y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(loss, again[0]) and torch.equal(grads[0], again[1][0])


def test_self_mode_overflowing_pair_makes_only_its_two_anchors_nan():
    # without normalize a single product can overflow: rows 0 and 1 of S hold +Inf (S_01 and S_00, S_11),
    # every other row stays finite (docs/semantics.md "Non-finite inputs")
    x, y = clustered_batch(120, 6, 7, seed=12, margin=1e-9)
    x[:2, 1:] = 0.0
    x[:, 0] = 0.0
    x[0, 0] = x[1, 0] = 1e160  # S_01 = 1e320 overflows float64, S_0k = 0 for every other k
    loss, _ = assert_matches_reference("cpp", x, y, normalize=False)
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2:]).all()


# ---- the sparse update of the self-mode backward (csrc/cpu/sparse_update.h) ---------------------------------

def _sparse_tile(rows, cols, density, diagonal, dtype, gen):
    w = torch.rand(rows, cols, generator=gen, dtype=torch.float64) - 0.5
    w[torch.rand(rows, cols, generator=gen) >= density] = 0.0
    if diagonal:  # a diagonal tile holds each pair once, right of the diagonal
        w = w.triu(1)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 16, 100, 128, 129, 300, 512])
@pytest.mark.parametrize("diagonal", [False, True])
def test_sparse_tile_update_matches_the_dense_products(dtype, d, diagonal):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(400, d, generator=gen, dtype=torch.float64).to(dtype)
    row, col, rows, cols = (50, 50, 200, 200) if diagonal else (10, 170, 130, 230)  # odd sizes: partial blocks
    for density in (0.0, 0.02, 0.2, 1.0):
        w = _sparse_tile(rows, cols, density, diagonal, dtype, gen)
        dx = torch.randn(400, d, generator=gen, dtype=torch.float64).to(dtype)
        expected = dx.double().clone()
        expected[row:row + rows] += w.double() @ x[col:col + cols].double()
        expected[col:col + cols] += w.double().T @ x[row:row + rows].double()
        torch.ops.ms_fused.sparse_tile_update_(w, x, row, col, dx)
        tol = 1e-12 if dtype == torch.float64 else 1e-6  # sums of at most 400 products, in another order
        assert rel_err(dx, expected) <= tol, (density, rel_err(dx, expected))


def test_sparse_tile_update_keeps_nan_and_drops_signed_zeros():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=gen)
    w = _sparse_tile(20, 30, 0.1, False, torch.float32, gen)
    w[w == 0] = -0.0
    w[3, 7] = float("nan")
    dx = torch.zeros(64, 20)
    torch.ops.ms_fused.sparse_tile_update_(w, x, 0, 30, dx)
    nan_rows = torch.isnan(dx).any(dim=1).nonzero().flatten().tolist()
    assert nan_rows == [3, 30 + 7]  # as a dense product: W_37 reaches row 3 (W x) and column 7 (W^T x) only


def _sparsely_mined_batch(n, d, spread, seed, margin):
    """K = 4 classes whose negatives the miner mostly drops (as in training), away from mining thresholds."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) // 4)[torch.randperm(n, generator=gen)]
    for _ in range(100):
        centres = torch.randn(n // 4 + 1, d, generator=gen, dtype=torch.float64)
        x = centres[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
        if threshold_gap(x, y) > margin:
            return x, y
    raise AssertionError("no draw away from the mining thresholds")


def _mined_negative_share(x, y):
    """The share of negative pairs that either anchor mines: the nonzeros of a sweep tile's G + G^T."""
    from ms_fused.engine._inputs import HyperParams
    from ms_fused.losses.ms_reference import mined_masks, pair_masks

    xn = F.normalize(x.double(), dim=1)
    pos, neg = pair_masks(y, y, torch.arange(len(y)))
    _, hard_neg = mined_masks(xn @ xn.T, pos, neg, HyperParams(*HP[:4]))
    return float((hard_neg | hard_neg.T).sum() / neg.sum())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d, spread", [(16, 0.6), (100, 1.25), (300, 1.75)])
def test_self_mode_with_sparse_tiles(threads, d, spread):
    # few mined negatives: the sweep tiles' G + G^T go through the sparse update, every chunk shape of it
    # (d = 16: one register; 100: registers and a tail; 300: whole chunks, packed, and a tail). base = 0
    # gives the negatives' terms weight at the small similarities of wide D (mining does not depend on it).
    x, y = _sparsely_mined_batch(700, d, spread, seed=d + threads, margin=1e-6)
    assert 0.01 < _mined_negative_share(x, y) < 0.2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference("cpp", x, y, base=0.0)
        loss, grads = assert_matches_reference("cpp", x, y, dtype=torch.float32, base=0.0)
        again = loss_and_grads("cpp", x.float(), y, base=0.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(loss, again[0]) and torch.equal(grads[0], again[1][0])


def test_self_mode_sweep_tiles_fall_back_to_two_passes_when_a_term_grows_too_large():
    # a sweep tile's single pass sums terms with its anchors' shifts from earlier tiles; beta = 1000 makes a
    # later tile's larger negative exceed exp(60) (the float32 guard) for many anchors, so those tiles take
    # the two-pass path. beta * (rounding of S) ~ 1e-4 relative error in the weights: hence the gradient bound.
    x, y = clustered_batch(600, 10, 30, seed=21, margin=1e-6)
    assert_matches_reference("cpp", x, y, dtype=torch.float32, beta=1000.0, base=0.9,
                             tol=Tol(loss=1e-5, grad=1e-3))
    assert_matches_reference("cpp", x, y, beta=1000.0, base=0.9)


def test_backward_is_deterministic():
    x, y = clustered_batch(600, 16, 30, seed=11, dtype=torch.float32, margin=0)
    first = loss_and_grads("cpp", x, y)
    second = loss_and_grads("cpp", x, y)
    # docs/semantics.md "Reproducibility", repeat: tiles in rounds that touch disjoint rows, no atomics
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])


# ---- reference mode: a block's G over its nonzeros, and the forward's gradient of the anchors -------------

# MS_FUSED_CPP_SPARSE_SHARE forces the dense products ("0": only an all-zero block of G goes sparse) or the
# sparse ones ("1"); None leaves the kernel's own choice per block
PATHS = {"dense": "0", "sparse": "1", "chosen": None}


def _force_path(monkeypatch, path):
    if PATHS[path] is None:
        monkeypatch.delenv("MS_FUSED_CPP_SPARSE_SHARE", raising=False)
    else:
        monkeypatch.setenv("MS_FUSED_CPP_SPARSE_SHARE", PATHS[path])


def _bank_case(case):
    """(x, y, r, yr, keyword arguments) of a reference-mode batch of 300 anchors (two row blocks) against 700
    rows: a memory bank holding the batch (own copies removed by index, every fifth anchor's kept), the same
    with unit rows passed as such, anchors without positives in R, one class, all labels distinct."""
    x, y, r, yr, ref_self_index = memory_bank_batch(300, 400, 16, 40, seed=31, margin=1e-6)
    kw = dict(ref_self_index=ref_self_index)
    if case == "ref_normalized":
        r = F.normalize(r, dim=1)
        kw.update(ref_normalized=True)
    elif case == "no_positives":  # a third of the anchors get labels R does not hold: nothing mined for them
        y = torch.where(torch.arange(300) % 3 == 0, y + 1000, y)
    elif case == "one_class":  # no negatives: nothing is mined, the gradient is exactly 0
        y, yr = torch.zeros_like(y), torch.zeros_like(yr)
    elif case == "all_distinct":  # no positives (every own copy removed): nothing is mined either
        y, yr = torch.arange(300), torch.cat([torch.arange(300), torch.arange(1000, 1400)])
        kw = dict(ref_self_index=torch.arange(300))
    return x, y, r, yr, kw


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("grad_ref", [False, True])  # False: the forward's U = G R (a memory bank); True: both
@pytest.mark.parametrize("case", ["self_index", "ref_normalized", "no_positives", "one_class", "all_distinct"])
def test_reference_mode_block_products(case, grad_ref, path, monkeypatch):
    if case == "ref_normalized" and grad_ref:
        pytest.skip("ref_normalized takes a reference set without grad")
    _force_path(monkeypatch, path)
    x, y, r, yr, kw = _bank_case(case)
    for dtype in (torch.float64, torch.float32):
        loss, grads = assert_matches_reference("cpp", x, y, r, yr, dtype=dtype, grad_ref=grad_ref, **kw)
        if case in ("one_class", "all_distinct"):  # docs/semantics.md "Reproducibility", exact zeros
            assert not loss.any() and all(g is None or not g.any() for g in grads)
        if case == "no_positives":  # docs/semantics.md "Mining": an empty P_i leaves N_i's mined set empty
            assert not loss[::3].any() and not grads[0][::3].any() and loss.any()


@pytest.mark.parametrize("grad_ref", [False, True])
@pytest.mark.parametrize("d", [1, 7, 100, 300])
def test_reference_mode_sparse_products_at_every_chunk_shape(d, grad_ref, monkeypatch):
    # the sparse products by register chunks of D (d = 1, 7: tails; 100: registers and a tail; 300: whole
    # chunks, packed, and a tail), over 500 columns (16 blocks of 32, the last partial: both groups of 8
    # blocks that the products without a gradient for R take at a time)
    _force_path(monkeypatch, "sparse")
    x, y, r, yr = clustered_batch(40, d, 6, seed=35 + d, m=500, margin=1e-6)
    grad_floor = float((1 / x.abs()).norm()) if d == 1 else 0.0  # as in test_self_mode_float64
    for dtype in (torch.float64, torch.float32):
        assert_matches_reference("cpp", x, y, r, yr, dtype=dtype, grad_ref=grad_ref, grad_floor=grad_floor)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_reference_mode_forward_gradient_of_a_non_finite_anchor(path, monkeypatch):
    _force_path(monkeypatch, path)
    x, y, r, yr = clustered_batch(300, 6, 5, seed=10, m=30, margin=1e-9)
    x[4, 2] = float("nan")
    loss, (dx, _) = assert_matches_reference("cpp", x, y, r, yr, grad_ref=False)
    assert torch.isnan(dx[4]).all() and torch.isfinite(torch.cat([dx[:4], dx[5:]])).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("grad_ref", [False, True])
@pytest.mark.parametrize("path", list(PATHS))
def test_reference_mode_repeats_bit_for_bit(threads, grad_ref, path, monkeypatch):
    # docs/semantics.md "Reproducibility", repeat: a block's path depends on its values only; with a gradient
    # for R the sparse products cut the columns in one range per thread, summed in range order
    _force_path(monkeypatch, path)
    x, y, r, yr, ref_self_index = memory_bank_batch(300, 900, 24, 50, seed=33, margin=0)
    x, r = x.float(), r.float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = loss_and_grads("cpp", x, y, r, yr, grad_ref=grad_ref, ref_self_index=ref_self_index)
        second = loss_and_grads("cpp", x, y, r, yr, grad_ref=grad_ref, ref_self_index=ref_self_index)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_sparse_share_must_be_a_share(monkeypatch):
    monkeypatch.setenv("MS_FUSED_CPP_SPARSE_SHARE", "half")
    x, y, r, yr = clustered_batch(20, 4, 3, seed=34, m=30, margin=0)
    with pytest.raises(RuntimeError, match=r"MS_FUSED_CPP_SPARSE_SHARE must be a number in \[0, 1\]"):
        loss_and_grads("cpp", x, y, r, yr)


# ---- bad input -----------------------------------------------------------------------------------------

def test_other_devices_are_refused_naming_the_backend():
    # every other bad input: test_inputs.py, on every backend
    meta = dict(embeddings=torch.randn(6, 4, device="meta"), labels=torch.zeros(6, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"backend='cpp' cannot serve .* on meta: the cpp backend runs on the CPU"):
        multi_similarity_loss(**meta, backend="cpp")


def test_ops_check_their_own_arguments():
    q, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(RuntimeError, match="q_hat must be float32 or float64"):
        torch.ops.ms_fused.ms_forward(q.half(), None, y, None, None, *HP)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        torch.ops.ms_fused.ms_forward(q, None, y[:5], None, None, *HP)
    with pytest.raises(RuntimeError, match="r_hat must be a non-empty"):
        torch.ops.ms_fused.ms_forward(q, torch.randn(3, 5), y, y[:3], None, *HP)


# ---- torch.library contract and torch.compile ----------------------------------------------------------

def _op_inputs(dtype, reference_mode):
    q, y, r, yr = clustered_batch(40, 8, 5, seed=12, dtype=dtype, m=30, margin=1e-6)
    q = F.normalize(q, dim=1).requires_grad_(True)
    if not reference_mode:
        return (q, None, y, None, None, *HP)
    ref_self_index = torch.randint(-1, 30, (40,), generator=torch.Generator().manual_seed(0))
    return (q, F.normalize(r, dim=1).requires_grad_(True), y, yr, ref_self_index, *HP)


@pytest.mark.parametrize("unit_q_grad", [False, True])  # True: the forward also returns U = dL/dq_hat for grad = 1
@pytest.mark.parametrize("reference_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(dtype, reference_mode, unit_q_grad):
    torch.library.opcheck(torch.ops.ms_fused.ms_forward.default, (*_op_inputs(dtype, reference_mode), unit_q_grad))


@pytest.mark.parametrize("reference_mode", [False, True])
def test_opcheck_backward(reference_mode):
    args = _op_inputs(torch.float64, reference_mode)
    q, r = (t.detach() if t is not None else None for t in args[:2])
    loss, stats, *_ = torch.ops.ms_fused.ms_forward(q, r, *args[2:])
    grad = torch.linspace(0.1, 1.0, q.shape[0], dtype=q.dtype)
    torch.library.opcheck(torch.ops.ms_fused.ms_backward.default,
                          (grad, q, r, *args[2:5], stats, *HP, True, reference_mode))


@pytest.mark.parametrize("backend", ["cpp", "auto"])
@pytest.mark.parametrize("reference_mode", [False, True, "bank"])  # bank: no gradient for R (the forward's U)
def test_compile_fullgraph(backend, reference_mode):
    torch._dynamo.reset()
    x, y, r, yr = clustered_batch(48, 8, 5, seed=13, dtype=torch.float32, m=36, margin=1e-6)
    batch = (x, y, r, yr) if reference_mode else (x, y)

    def fn(x, y, r, yr, **_):
        if reference_mode:
            return multi_similarity_loss(x, y, r, yr, backend=backend, reduction="none").sum()
        return multi_similarity_loss(x, y, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")  # raises on a graph break
    grad_ref = reference_mode != "bank"
    (out_c, grads_c), (out_e, grads_e) = (loss_and_grads(compiled, *batch, grad_ref=grad_ref),
                                          loss_and_grads(fn, *batch, grad_ref=grad_ref))
    assert rel_err(out_c, out_e) <= 1e-6
    for g_c, g_e in zip(grads_c, grads_e):
        assert (g_c is None and g_e is None) or rel_err(g_c, g_e) <= 1e-6
    torch._dynamo.reset()


# ---- fallback when the extension is missing ------------------------------------------------------------

def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    from ms_fused.engine.cpp import backend as cpp_backend

    import ms_fused

    monkeypatch.setitem(sys.modules, "ms_fused._C", None)  # `from . import _C` now raises ImportError
    monkeypatch.delattr(ms_fused, "_C", raising=False)

    def failing_jit_build():
        raise RuntimeError("Error building extension 'ms_fused_C'\nc++: command not found")

    monkeypatch.setattr(cpp_backend, "_jit_build", failing_jit_build)
    monkeypatch.setattr(cpp_backend._load, "results", {})  # forget the load (restored after the test)
    with pytest.warns(RuntimeWarning, match=r"building it now failed .*command not found.*"
                                            r"pip install --no-build-isolation -e \."):
        reason = cpp_backend.unavailable_reason(CPU)
    assert "not built" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second question must not warn again
        assert cpp_backend.unavailable_reason(CPU) == reason


def test_switched_off_extension_falls_back_to_torch():
    """A fresh process with MS_FUSED_NO_CPP=1: "auto" takes `torch` after exactly one warning."""
    script = textwrap.dedent("""
        import warnings, torch, ms_fused
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
            a = ms_fused.multi_similarity_loss(x, y)
            b = ms_fused.multi_similarity_loss(x, y)
            print(ms_fused.available_backends("cpu"))
        print(len([w for w in caught if "MS_FUSED_NO_CPP" in str(w.message)]))
        print(abs(float(a) - float(ms_fused.multi_similarity_loss(x, y, backend="torch"))))
        try:
            ms_fused.multi_similarity_loss(x, y, backend="cpp")
        except ValueError as exc:
            print("ValueError", exc)
    """)
    env = dict(os.environ, MS_FUSED_NO_CPP="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    backends_line, n_warnings, diff, error = out.stdout.strip().splitlines()
    assert "'cpp'" not in backends_line and "'torch'" in backends_line
    assert n_warnings == "1"
    assert float(diff) == 0.0  # docs/semantics.md "Reproducibility", repeat: "auto" runs `torch` here
    assert error.startswith("ValueError backend='cpp' cannot serve") and "MS_FUSED_NO_CPP=1" in error


# ---- every instruction-set variant of the row passes ---------------------------------------------------

# narrowest first, spelled as ATEN_CPU_CAPABILITY spells them (aarch64: NEON, then SVE at 128 or 256 bits, one
# vector-length-agnostic variant chosen where PyTorch would choose its sve128 or sve256 kernels)
VARIANTS = ("default", "sve128", "sve256") if platform.machine() == "aarch64" else ("default", "avx2", "avx512")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# a few of the parity tests above, in a process whose row passes run the variant named by ATEN_CPU_CAPABILITY
PARITY_ON_VARIANT = textwrap.dedent("""
    import torch
    import test_cpp as t
    from ms_fused.engine.cpp import backend as cpp_backend
    print(cpp_backend.cpu_capability())
    t.test_self_mode_float64(0, 37, 5, 4)
    t.test_self_mode_float32(False, 150, 10)
    t.test_reference_mode_float64(0, 30, 45)
    t.test_ref_self_index(0)
    t.test_hyper_parameters_and_no_overflow(True, dict(alpha=1000.0, beta=1000.0, base=0.9, epsilon=0.0))
    t.test_non_finite_rows_give_nan(float("nan"), True)
    for d in (7, 100, 300):
        t.test_sparse_tile_update_matches_the_dense_products(torch.float32, d, True)
        t.test_sparse_tile_update_matches_the_dense_products(torch.float64, d, False)
    t.test_sparse_tile_update_keeps_nan_and_drops_signed_zeros()
    t.test_self_mode_with_sparse_tiles(2, 100, 1.25)
    import pytest
    with pytest.MonkeyPatch.context() as mp:  # reference mode's sparse products, with and without dR
        for d in (7, 100, 300):
            t.test_reference_mode_sparse_products_at_every_chunk_shape(d, False, mp)
            t.test_reference_mode_sparse_products_at_every_chunk_shape(d, True, mp)
    print("ok")
""")


def test_default_variant_is_the_widest_the_cpu_runs():
    if "ATEN_CPU_CAPABILITY" in os.environ:
        pytest.skip("ATEN_CPU_CAPABILITY is set")
    from ms_fused.engine.cpp import backend as cpp_backend

    # torch makes the same choice for its own kernels (AVX512 / AVX2 / DEFAULT)
    assert cpp_backend.cpu_capability() == torch.backends.cpu.get_cpu_capability().lower()


@pytest.fixture(scope="module")
def variant_runs():
    """One process per variant this CPU can run (every one up to the widest), all started at once:
    variant -> (stdout, stderr, return code)."""
    from ms_fused.engine.cpp import backend as cpp_backend

    runnable = VARIANTS[: VARIANTS.index(cpp_backend.cpu_capability()) + 1]
    procs = {v: subprocess.Popen([sys.executable, "-c", PARITY_ON_VARIANT], cwd=TESTS_DIR, text=True,
                                 env=dict(os.environ, ATEN_CPU_CAPABILITY=v), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for v in runnable}
    return {v: (*p.communicate(timeout=300), p.returncode) for v, p in procs.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_on_every_instruction_set_variant(variant, variant_runs):
    if variant not in variant_runs:
        pytest.skip(f"this CPU cannot run the {variant} variant")
    stdout, stderr, returncode = variant_runs[variant]
    assert returncode == 0, stderr
    assert stdout.split() == [variant, "ok"]
