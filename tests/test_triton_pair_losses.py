"""SupCon, NT-Xent and Circle loss on the `triton` backend (ms_fused/engine/triton/pair_kernels.py, pair_engine.py)
against the float64 `reference` (itself held to pml's losses within 1e-10, tests/test_pair_losses_pml_parity.py):
float32 under the interpreter, bfloat16 and float16 with the operands rounded as a GPU rounds them, within
helpers.TOLERANCE; every mode (self, reference set, own copies, memory bank), column splits, tiles of negatives
only and masked ones, the edge cases of docs/semantics.md "Pair-weighting losses", NaN, counts, errors. The
GPU's first-choice tile configuration runs here (triton_pair_engine.tile_configs)."""
import pytest
import torch

from backends_under_test import INTERPRETER_WARNINGS, triton_backend_or_skip
from helpers import TOLERANCE, device_of, fresh_clustered, rel_err
from ms_fused.losses import pair_losses
from ms_fused.engine.torch import pair_engine as torch_pair_engine
from ms_fused.engine._inputs import HyperParams, check_inputs
from ms_fused.losses.pair_api import pair_weighting_loss
from ms_fused.losses.pair_reference import PAIR_LOSSES

triton_backend = triton_backend_or_skip()
# an anchor without pairs of a kind has a log-sum-exp of log2(0) = -Inf, which numpy warns of and a GPU does not
pytestmark = INTERPRETER_WARNINGS + [pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")]
from ms_fused.engine.triton import pair_engine as triton_pair_engine  # noqa: E402  (imports triton)

DEV = device_of("triton")


def on(t):
    return None if t is None else t.to(DEV)


batch = fresh_clustered


def loss_and_grads(name, backend, x, y, r, yr, weights, ref_self_index=None):
    """Per-anchor losses and the gradients of their weighted sum, on the CPU; triton's inputs on DEV."""
    move = on if backend == "triton" else (lambda t: t)
    leaves = [move(x).requires_grad_(True)] + ([] if r is None else [move(r).requires_grad_(True)])
    out = pair_weighting_loss(name, leaves[0], move(y), None if r is None else leaves[1],
                              None if yr is None else move(yr), reduction="none", backend=backend,
                              ref_self_index=None if ref_self_index is None else move(ref_self_index))
    grads = torch.autograd.grad((out.double() * move(weights)).sum(), leaves)
    return out.detach().cpu(), tuple(g.cpu() for g in grads)


def assert_matches(name, x, y, r=None, yr=None, dtype=torch.float32, **kw):
    """triton on `dtype` inputs against the float64 reference on the same rounded values: per-anchor losses and
    the gradients of a random weighting of them (so that every anchor's gradient counts)."""
    x, r = x.to(dtype), None if r is None else r.to(dtype)
    weights = torch.rand(x.shape[0], dtype=torch.float64) + 0.5
    out = loss_and_grads(name, "triton", x, y, r, yr, weights, **kw)
    ref = loss_and_grads(name, "reference", x.double(), y, None if r is None else r.double(), yr, weights, **kw)
    tol = TOLERANCE[dtype]
    assert out[0].dtype == torch.float32 and all(g.dtype == dtype for g in out[1])
    assert rel_err(out[0], ref[0]) <= tol.loss, rel_err(out[0], ref[0])
    for g, g_ref in zip(out[1], ref[1]):
        assert rel_err(g, g_ref) <= tol.grad, rel_err(g, g_ref)


@pytest.fixture(autouse=True)
def first_configuration(monkeypatch):
    monkeypatch.setenv("MS_FUSED_TRITON_AUTOTUNE", "0")


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("mode", ["self", "reference", "ref_self_index"])
def test_float32_equals_the_reference(name, mode):
    """100 anchors of 12 classes: several anchor blocks, column tiles without any of a block's labels (no
    compare) and masked ones, the last tile cut short."""
    x, y, r, yr = batch(100, 24, 12, 1, None if mode == "self" else 90)
    rsi = None
    if mode == "ref_self_index":  # anchors 20..49 are rows 5..34 of the reference set
        r[5:35], yr[5:35] = x[20:50], y[20:50]
        rsi = torch.full((100,), -1, dtype=torch.int64)
        rsi[20:50] = torch.arange(5, 35)
    assert_matches(name, x, y, r, yr, ref_self_index=rsi)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_column_splits_combine_to_the_same_loss(name):
    """Forced column splits (the sweep's partial log-sum-exps and counts, the backward's partial sums) give the
    unsplit result within float32 rounding."""
    x, y, _, _ = batch(70, 16, 6, 2)
    x = x.float()
    problem = check_inputs(x, y, None, None, None, HyperParams())
    x, y = on(x), on(y)
    loss = pair_losses.LOSSES[name]()
    outs = []
    for splits in (1, 3):
        xs = x.clone().requires_grad_(True)
        per_anchor, counts = triton_pair_engine.per_anchor_loss(
            check_inputs(xs, y, None, None, None, HyperParams()), loss, splits=splits)
        outs.append((per_anchor.detach(), counts, torch.autograd.grad(per_anchor.sum(), xs)[0]))
    assert torch.equal(outs[0][1], outs[1][1])
    assert rel_err(outs[1][0].cpu(), outs[0][0].cpu()) <= TOLERANCE[torch.float32].loss
    assert rel_err(outs[1][2].cpu(), outs[0][2].cpu()) <= TOLERANCE[torch.float32].grad
    ref_counts = torch_pair_engine.per_anchor_loss(problem, loss)[1]
    assert torch.equal(outs[0][1].cpu(), ref_counts)


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("case", ["no_positives", "one_class", "all_distinct"])
def test_edge_cases(name, case):
    x, y, r, yr = batch(45, 8, 5, 3, 30)
    if case == "no_positives":
        y[::3] = torch.arange(100, 115)  # anchors without positives, in self mode and against the reference set
    elif case == "one_class":
        y[:], yr[:] = 0, 0
    else:
        y = torch.arange(45)
        yr = torch.arange(30) + 45
    assert_matches(name, x, y)
    assert_matches(name, x, y, r, yr)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_memory_bank_of_unit_rows(name):
    """ref_normalized: a constant reference set of unit rows (CrossBatchMemory's) is used as given."""
    x, y, r, yr = batch(40, 12, 5, 4, 64)
    r = torch.nn.functional.normalize(r, dim=1)
    weights = torch.rand(40, dtype=torch.float64) + 0.5
    leaves = on(x.float()).requires_grad_(True)
    out = pair_weighting_loss(name, leaves, on(y), on(r.float()), on(yr), reduction="none", backend="triton",
                              ref_normalized=True)
    g = torch.autograd.grad((out.double() * on(weights)).sum(), leaves)[0].cpu()
    out = out.detach().cpu()
    ref_x = x.clone().requires_grad_(True)
    ref = pair_weighting_loss(name, ref_x, y, r, yr, reduction="none", backend="reference")
    g_ref = torch.autograd.grad((ref * weights).sum(), ref_x)[0]
    assert rel_err(out, ref.detach()) <= TOLERANCE[torch.float32].loss
    assert rel_err(g, g_ref) <= TOLERANCE[torch.float32].grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_half_precision_against_float64(name, dtype):
    x, y, r, yr = batch(80, 40, 8, 5, 70)
    assert_matches(name, x, y, dtype=dtype)
    assert_matches(name, x, y, r, yr, dtype=dtype)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_a_nan_row_makes_the_loss_and_gradient_nan(name):
    x, y, _, _ = batch(20, 5, 4, 6)
    x[7, 2] = float("nan")
    xs = on(x.float()).requires_grad_(True)
    loss = pair_weighting_loss(name, xs, on(y), backend="triton")
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(xs.grad).any()


def test_double_backward_is_refused():
    x, y, _, _ = batch(12, 4, 3, 7)
    x = on(x.float()).requires_grad_(True)
    loss = pair_weighting_loss("supcon", x, on(y), backend="triton")
    with pytest.raises(NotImplementedError, match="double backward.*backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_float64_is_refused_with_its_reason():
    x, y, _, _ = batch(12, 4, 3, 8)
    with pytest.raises(ValueError, match="backend='triton' cannot serve torch.float64"):
        pair_weighting_loss("circle", on(x), on(y), backend="triton")


@pytest.mark.slow
def test_torch_compile_runs_the_kernels_between_two_graphs():
    """Not yet a torch op: torch.compile (without fullgraph) breaks its graph around the launches and gives
    eager's loss and gradient."""
    torch._dynamo.reset()
    x, y, _, _ = batch(40, 16, 5, 9)
    x, y = on(x.float()), on(y)
    fn = lambda a: pair_weighting_loss("supcon", a, y, backend="triton")  # noqa: E731
    outs = []
    for f in (fn, torch.compile(fn)):
        xs = x.clone().requires_grad_(True)
        loss = f(xs)
        outs.append((loss.detach(), torch.autograd.grad(loss, xs)[0]))
    assert rel_err(outs[1][0].cpu(), outs[0][0].cpu()) <= TOLERANCE[torch.float32].loss
    assert rel_err(outs[1][1].cpu(), outs[0][1].cpu()) <= TOLERANCE[torch.float32].grad
