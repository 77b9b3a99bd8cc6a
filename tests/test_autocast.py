"""Under torch.autocast the loss still computes in float32 and returns float32 (docs/semantics.md "Similarities", "Loss").

Inside an autocast region the loss's own matmuls would run in bfloat16/float16, which moves the loss by ~1e-3
relative; the tolerances below are far tighter than that, so they fail if autocast leaks into the loss.
"""
import pytest
import torch
from torch import nn

from backends_under_test import CPU_BACKENDS
from helpers import clustered_batch, rel_err, threshold_gap
from ms_fused import MultiSimilarityLoss, available_backends, multi_similarity_loss

LOW = [torch.bfloat16, torch.float16]
# the interpreted triton backend as well where the case is small
WITH_TRITON = CPU_BACKENDS + (["triton"] if "triton" in available_backends("cpu") else [])
# CUDA cases run only where a GPU is present (autocast there is float16/bfloat16 on the triton backend)
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CASES = [("cpu", backend) for backend in CPU_BACKENDS] + [
    pytest.param("cuda", backend, marks=NEEDS_CUDA) for backend in ("auto", "torch")]
# float32 accumulation of the same low-precision rows vs the float64 reference on them
LOSS_TOL = 1e-5
# the gradient comes back rounded to the embeddings' own 8/11-bit mantissa
GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def network_batch(low_dtype, device="cpu", seed=0):
    """Features, labels and a small network whose autocast embeddings sit away from the mining thresholds.

    A pair within rounding distance of a threshold is mined by float32 and not by float64 (or the other way),
    which changes the loss by a whole term; such draws are redrawn (see helpers.clustered_batch).
    """
    for attempt in range(50):
        x, y = clustered_batch(64, 16, 6, seed=seed + attempt, dtype=torch.float32)
        x, y = x.to(device), y.to(device)
        torch.manual_seed(seed + attempt)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
        with torch.no_grad(), torch.autocast(device, dtype=low_dtype):
            emb = net(x)
        if threshold_gap(emb.double().cpu(), y.cpu()) > 1e-5:
            return x, y, net
    raise RuntimeError("no network batch away from the mining thresholds")


def reference_on(emb, y):
    """Loss and gradient of the float64 reference on exactly the rows the loss saw."""
    leaf = emb.detach().double().requires_grad_(True)
    loss = multi_similarity_loss(leaf, y, backend="reference")
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("device, backend", CASES)
@pytest.mark.parametrize("low_dtype", LOW)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_network_embeddings(device, backend, low_dtype, backward_inside):
    x, y, net = network_batch(low_dtype, device)
    with torch.autocast(device, dtype=low_dtype):
        emb = net(x)
        emb.retain_grad()
        loss = multi_similarity_loss(emb, y, backend=backend)
        if backward_inside:  # not what PyTorch recommends, but legitimate: the loss's backward must not care
            loss.backward()
    assert emb.dtype == low_dtype
    assert loss.dtype == torch.float32
    if not backward_inside:
        loss.backward()
    assert emb.grad.dtype == low_dtype
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    ref_loss, ref_grad = reference_on(emb, y)
    assert rel_err(loss, ref_loss) <= LOSS_TOL
    assert rel_err(emb.grad, ref_grad) <= GRAD_TOL[low_dtype]


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("mode", ["self", "reference"])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_backward_runs_in_the_forward_precision(backend, mode, backward_inside):
    """float32 rows: forward and backward in float32 wherever backward() is called (inside the region it
    would otherwise run its products in bfloat16, ~1e-3 off, or fail on an out= dtype)."""
    if mode == "self":
        x, y = clustered_batch(40, 12, 5, seed=6, dtype=torch.float32)
        r = yr = None
    else:
        x, y, r, yr = clustered_batch(30, 12, 5, seed=7, dtype=torch.float32, m=35)
    leaves = [t.clone().requires_grad_(True) for t in (x, r) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = multi_similarity_loss(leaves[0], y, leaves[1] if r is not None else None, yr, backend=backend)
        grads = torch.autograd.grad(loss, leaves) if backward_inside else None
    if not backward_inside:
        grads = torch.autograd.grad(loss, leaves)
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = multi_similarity_loss(exact[0], y, exact[1] if r is not None else None, yr, backend="reference")
    for g, g_ref in zip(grads, torch.autograd.grad(ref, exact)):
        assert g.dtype == torch.float32
        assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_embeddings_inside_autocast_match_outside(backend):
    x, y = clustered_batch(64, 16, 6, seed=4, dtype=torch.float32)
    outside = multi_similarity_loss(x, y, reduction="none", backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = multi_similarity_loss(x, y, reduction="none", backend=backend)
    assert inside.dtype == torch.float32
    assert rel_err(inside, outside) <= 1e-6


def test_module_under_autocast_float64_stays_float64():
    x, y = clustered_batch(32, 8, 4, seed=5, dtype=torch.float64)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MultiSimilarityLoss()(x, y)
    assert loss.dtype == torch.float64
    ref_loss, ref_grad = reference_on(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    assert rel_err(loss, ref_loss) <= 1e-12 and rel_err(grad, ref_grad) <= 1e-12


def test_compiled_under_autocast_matches_eager():
    torch._dynamo.reset()
    x, y, net = network_batch(torch.bfloat16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = net(x)
            return multi_similarity_loss(emb, y), emb

    def run(fn):
        net.zero_grad()
        loss, emb = fn(x)
        loss.backward()
        return loss.detach(), emb.detach(), [p.grad.clone() for p in net.parameters()]

    eager_loss, _, eager_grads = run(step)
    compiled_loss, emb, compiled_grads = run(torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager"))
    torch._dynamo.reset()
    assert compiled_loss.dtype == torch.float32 and emb.dtype == torch.bfloat16
    assert rel_err(compiled_loss, eager_loss) <= LOSS_TOL
    assert rel_err(compiled_loss, reference_on(emb, y)[0]) <= LOSS_TOL
    for g_c, g_e in zip(compiled_grads, eager_grads):
        assert rel_err(g_c, g_e) <= GRAD_TOL[torch.bfloat16]
