"""SupCon, NT-Xent and Circle loss beyond pml parity (tests/test_pair_losses_pml_parity.py): the `torch` engine's
chunks and the `cpp` kernel's row blocks, narrower dtypes against the float64 reference within helpers.TOLERANCE,
reductions, gradcheck, NaN, and the errors of docs/semantics.md "Pair-weighting losses"."""
import pytest
import torch

import ms_fused
from helpers import TOLERANCE, fresh_clustered, rel_err
from ms_fused.engine.torch import pair_engine as torch_pair_engine
from ms_fused.engine._inputs import HyperParams, check_inputs
from ms_fused.losses.pair_api import pair_weighting_loss
from ms_fused.losses.pair_losses import LOSSES
from ms_fused.losses.pair_reference import PAIR_LOSSES

MODULES = {"supcon": ms_fused.SupConLoss, "ntxent": ms_fused.NTXentLoss, "circle": ms_fused.CircleLoss}


fresh = fresh_clustered


def grads_of(fn, x, r):
    leaves = [x.clone().requires_grad_(True)] + ([] if r is None else [r.clone().requires_grad_(True)])
    out = fn(*leaves) if r is not None else fn(leaves[0], None)
    return out.detach(), torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("mode", ["self", "reference", "ref_self_index"])
def test_chunks_of_three_rows_equal_the_reference(name, mode):
    """The engine over chunks of about three anchors (the budget below) gives the dense reference's per-anchor
    losses and gradients in float64."""
    x, y, r, yr = fresh(31, 6, 5, 1, None if mode == "self" else 29)
    rsi = None
    if mode == "ref_self_index":  # anchors 0..9 are rows 3..12 of the reference set (their own copy removed)
        r[3:13], yr[3:13] = x[:10], y[:10]
        rsi = torch.full((31,), -1, dtype=torch.int64)
        rsi[:10] = torch.arange(3, 13)
    loss = LOSSES[name]()
    budget = 3 * x.shape[0] * 44  # three rows of S's temporaries (5 float64 + 4 bool per entry)

    def chunked(xs, rs):
        problem = check_inputs(xs, y, rs, yr, rsi, HyperParams())
        return torch_pair_engine.per_anchor_loss(problem, loss, chunk_bytes=budget)[0]

    def dense(xs, rs):
        return pair_weighting_loss(name, xs, y, rs, yr, reduction="none", backend="reference", ref_self_index=rsi)

    out, ref = grads_of(lambda a, b: chunked(a, b).sum(), x, r), grads_of(lambda a, b: dense(a, b).sum(), x, r)
    assert torch_pair_engine.chunk_rows(x.shape[0] if r is None else r.shape[0], torch.float64, budget, 5, 4) <= 3
    assert rel_err(out[0], ref[0]) <= 1e-12
    for g, g_ref in zip(out[1], ref[1]):
        assert rel_err(g, g_ref) <= 1e-12
    per_anchor = chunked(x, r).detach()
    assert rel_err(per_anchor, dense(x, r)) <= 1e-12


FUSED = ["cpp", "torch"]


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("mode", ["self", "reference", "ref_self_index"])
def test_cpp_over_several_row_blocks_equals_the_reference(name, mode):
    """600 anchors: the cpp kernel's row blocks (at most 256 rows, a multiple of the thread count of them) and the
    per-thread buffers, in float64 against the dense reference."""
    x, y, r, yr = fresh(600, 5, 40, 2, None if mode == "self" else 350)
    rsi = None
    if mode == "ref_self_index":
        r[:100], yr[:100] = x[200:300], y[200:300]
        rsi = torch.full((600,), -1, dtype=torch.int64)
        rsi[200:300] = torch.arange(100)
    out = grads_of(lambda a, b: pair_weighting_loss(name, a, y, b, yr, backend="cpp", ref_self_index=rsi), x, r)
    ref = grads_of(lambda a, b: pair_weighting_loss(name, a, y, b, yr, backend="reference", ref_self_index=rsi), x, r)
    assert rel_err(out[0], ref[0]) <= 1e-10
    for g, g_ref in zip(out[1], ref[1]):
        assert rel_err(g, g_ref) <= 1e-10


# hyper-parameters whose per-anchor log-sum-exps lie within the shared-exp range of float64 (500), and ones that
# spread them wider (S/t over [-1/t, 1/t]; Circle's positive logits reach about 4.4 gamma)
SPREADS = {"supcon": [{}, {"temperature": 0.0002}], "ntxent": [{}, {"temperature": 0.0002}],
           "circle": [{}, {"gamma": 1000.0}]}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sizes", [(350, 350), (200, 7, 1, 90, 232), (30, 30, 30)])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_cpp_self_mode_triangle_at_every_thread_count(name, sizes, threads):
    """Self mode runs the upper triangle of S (csrc/cpu/pair_self_mode.cpp): rows in label order, tiles in rounds
    cut by the thread count (an odd block count sitting out: 90 rows), classes larger than a tile, one exp per
    pair shared by its two anchors where their shifts are close and two where not; float64 against the dense
    reference, and the same thread count repeats the bits."""
    n = sum(sizes)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))) + threads)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    x = torch.randn(len(sizes), 12, generator=gen, dtype=torch.float64)[y] + torch.randn(n, 12, generator=gen,
                                                                                       dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for options in SPREADS[name]:
            step = lambda a, b, backend: pair_weighting_loss(name, a, y, backend=backend, reduction="none",
                                                             **options) @ torch.linspace(0.5, 1.5, n).double()
            out = grads_of(lambda a, b: step(a, b, "cpp"), x, None)
            ref = grads_of(lambda a, b: step(a, b, "reference"), x, None)
            assert rel_err(out[0], ref[0]) <= 1e-10 and rel_err(out[1][0], ref[1][0]) <= 1e-10
            again = grads_of(lambda a, b: step(a, b, "cpp"), x, None)
            assert torch.equal(out[0], again[0]) and torch.equal(out[1][0], again[1][0])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_narrow_dtypes_against_the_float64_reference(name, dtype, backend):
    """The fused backends compute in float32 (the inputs rounded to `dtype`) against the float64 reference on the
    same rounded values, within the tolerance table of every backend."""
    for seed, m in enumerate([None, 43]):
        x, y, r, yr = fresh(57, 24, 7, seed, m)
        x, r = x.to(dtype), None if r is None else r.to(dtype)
        module = MODULES[name](backend=backend)
        out = grads_of(lambda a, b: module(a, y, None, b, yr), x, r)
        ref = grads_of(lambda a, b: MODULES[name](backend="reference")(a.double(), y, None,
                                                                       None if b is None else b.double(), yr), x, r)
        assert out[0].dtype == torch.float32 and all(g.dtype == dtype for g in out[1])
        tol = TOLERANCE[dtype]  # 50 draws: float32 2.4e-6, float16 2.4e-4, bfloat16 3.8e-4 (gradients)
        assert rel_err(out[0], ref[0]) <= tol.loss
        for g, g_ref in zip(out[1], ref[1]):
            assert rel_err(g, g_ref) <= tol.grad


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_reductions(name):
    x, y, _, _ = fresh(40, 8, 6, 3)
    y[::4] = torch.arange(100, 110)  # anchors without positives
    per_anchor = MODULES[name](reduction="none")(x, y)
    assert per_anchor.shape == (40,) and bool((per_anchor[y >= 100] == 0).all())
    assert rel_err(MODULES[name](reduction="sum")(x, y), per_anchor.sum()) <= 1e-12
    mean = MODULES[name]()(x, y)
    if name == "ntxent":  # over positive pairs
        pairs = (torch.bincount(y)[y] - 1).sum()
        assert rel_err(mean, per_anchor.sum() / pairs) <= 1e-12
    else:  # over anchors with a loss > 0
        assert rel_err(mean, per_anchor[per_anchor > 0].mean()) <= 1e-12


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gradcheck_float64(name, backend):
    x, y, r, yr = fresh(9, 3, 3, 4, 7)
    x, r = x.requires_grad_(True), r.requires_grad_(True)
    # Circle's weights a = relu(.) are held constant (pml's detach), so its gradient is not that of its value
    if name == "circle":
        fn = MODULES[name](backend=backend)
        ref = MODULES[name](backend="reference")
        out = grads_of(lambda a, b: fn(a, y, None, b, yr), x.detach(), r.detach())
        want = grads_of(lambda a, b: ref(a, y, None, b, yr), x.detach(), r.detach())
        assert all(rel_err(g, w) <= 1e-12 for g, w in zip(out[1], want[1]))
        return
    assert torch.autograd.gradcheck(lambda a, b: MODULES[name](backend=backend)(a, y, None, b, yr), (x, r))
    assert torch.autograd.gradcheck(lambda a: MODULES[name](backend=backend)(a, y), (x,))


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_a_nan_row_makes_the_loss_nan(name):
    x, y, _, _ = fresh(20, 5, 4, 5)
    x[7, 2] = float("nan")
    for backend in ("cpp", "torch", "reference"):
        xs = x.clone().requires_grad_(True)
        loss = MODULES[name](backend=backend)(xs, y)
        assert torch.isnan(loss)
        loss.backward()
        assert torch.isnan(xs.grad).any()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_double_backward_is_refused_on_the_fused_backends(name, backend):
    x, y, _, _ = fresh(12, 4, 3, 6)
    x.requires_grad_(True)
    loss = MODULES[name](backend=backend)(x, y)
    with pytest.raises(NotImplementedError, match="double backward.*backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_errors(name):
    x, y, _, _ = fresh(12, 4, 3, 7)
    cls = MODULES[name]
    with pytest.raises(ValueError, match="backend must be one of"):
        cls(backend="cuda")
    with pytest.raises(ValueError, match="uses every positive and negative pair.*drop the miner"):
        cls()(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2])))
    with pytest.raises(TypeError, match="ref_emb=..., ref_labels=..."):
        cls()(x, y, x)
    with pytest.raises(ValueError, match="ref_labels must be given together"):
        cls()(x, y, None, x)
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="avg")
    if name == "circle":
        with pytest.raises(ValueError, match="gamma must be finite and > 0"):
            cls(gamma=0)
        with pytest.raises(TypeError, match="m must be a finite real"):
            cls(m=True)
    else:
        for bad in (0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="temperature must be finite and > 0"):
                cls(temperature=bad)


def test_memory_bank_takes_a_configured_loss_only():
    with pytest.raises(TypeError, match="configure the loss itself"):
        ms_fused.CrossBatchMemory(8, 4, loss=ms_fused.SupConLoss(), alpha=2.0)
    with pytest.raises(TypeError, match="loss must be a loss of ms_fused.*got Linear"):
        ms_fused.CrossBatchMemory(8, 4, loss=torch.nn.Linear(2, 2))
    from ms_fused.distributed import CrossBatchMemory as DistributedMemory
    with pytest.raises(TypeError, match="serves the MS loss only so far.*ms_fused.CrossBatchMemory"):
        DistributedMemory(8, 4, loss=ms_fused.SupConLoss())
    xbm = ms_fused.CrossBatchMemory(8, 4, loss=ms_fused.CircleLoss(gamma=32))
    x, y, _, _ = fresh(6, 4, 2, 8)
    xbm(x.float(), y)
    assert torch.allclose(xbm.memory[:6].norm(dim=1), torch.ones(6))  # unit rows, as these losses use


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph_equals_eager(backend):
    """The cpp ops' fake kernels and autograd formula (ms_fused/engine/cpp/backend.py, pair_engine.py) and the torch
    engine's autograd.Function trace into one graph; its loss and gradient are eager's within the float32 tolerance."""
    torch._dynamo.reset()
    x, y, _, _ = fresh(40, 16, 5, 9)
    x = x.float()
    for name in PAIR_LOSSES:
        fn = MODULES[name](backend=backend)
        eager = grads_of(lambda a, b: fn(a, y), x, None)
        compiled = grads_of(lambda a, b: torch.compile(fn, fullgraph=True)(a, y), x, None)
        assert rel_err(compiled[0], eager[0]) <= TOLERANCE[torch.float32].loss
        assert rel_err(compiled[1][0], eager[1][0]) <= TOLERANCE[torch.float32].grad
