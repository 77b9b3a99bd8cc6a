"""torch.compile(fullgraph=True) traces through the loss without graph breaks and gives eager's values and gradients.

Most cases compile with the "aot_eager" compiler: Dynamo must capture the whole function (fullgraph=True fails on
any graph break) and AOTAutograd must trace forward and backward, but no C++ is generated, so each case takes about
a second. One case runs the default Inductor compiler end to end (slow on a cold cache: tens of seconds on 2 cores).
"""
import pytest
import torch
from torch import nn

from helpers import clustered_batch, rel_err, threshold_gap
from ms_fused import MultiSimilarityLoss, multi_similarity_loss

# CUDA cases run only where a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
# same operations as eager in the same order; Inductor may fuse the normalisation differently
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_and_grads(fn, *inputs):
    """fn(*inputs) and the gradient of its sum with respect to every input that requires grad."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), [x for x in leaves if x.requires_grad])
    return out.detach(), grads


def reference_loss(x, y):
    return multi_similarity_loss(x, y, backend="reference")


def assert_matches(compiled, eager, tol):
    (out_c, grads_c), (out_e, grads_e) = compiled, eager
    assert out_c.dtype == out_e.dtype
    assert rel_err(out_c, out_e) <= tol, (out_c, out_e)
    for g_c, g_e in zip(grads_c, grads_e):
        assert g_c.dtype == g_e.dtype
        assert rel_err(g_c, g_e) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_self_mode(device, backend, dtype):
    x, y = clustered_batch(48, 16, 6, seed=1, dtype=dtype)
    x, y = x.to(device).requires_grad_(True), y.to(device)

    def fn(x):
        return multi_similarity_loss(x, y, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    result = loss_and_grads(compiled, x)
    assert_matches(result, loss_and_grads(fn, x), TOL[dtype])
    (out, (grad,)), (ref_out, (ref_grad,)) = result, loss_and_grads(reference_loss, x.double(), y)
    assert rel_err(out, ref_out) <= TOL[dtype] and rel_err(grad, ref_grad) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_functional_reference_mode_per_anchor(backend):
    q, yq, r, yr = clustered_batch(24, 16, 5, seed=2, dtype=torch.float32, m=40)
    q.requires_grad_(True)
    r.requires_grad_(True)

    def fn(q, r):
        return multi_similarity_loss(q, yq, r, yr, beta=40.0, reduction="none", backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_matches(loss_and_grads(compiled, q, r), loss_and_grads(fn, q, r), TOL[torch.float32])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_functional_memory_with_own_copies(backend):
    q, yq, r, yr = clustered_batch(24, 16, 5, seed=2, dtype=torch.float32, m=40)
    # a memory that holds 16 of the anchors (rows 8..23 at columns 0..15) besides other rows
    own = torch.full((24,), -1)
    own[8:] = torch.arange(16)
    r[:16], yr[:16] = q[8:], yq[8:]
    q.requires_grad_(True)

    def fn(q):
        return multi_similarity_loss(q, yq, r, yr, reduction="none", backend=backend, ref_self_index=own)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_matches(loss_and_grads(compiled, q), loss_and_grads(fn, q), TOL[torch.float32])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_changing_batch_size(backend):
    # a training loop's last, smaller batch: Dynamo recompiles with dynamic shapes, still without graph breaks
    def fn(x, y):
        return multi_similarity_loss(x, y, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed, n in enumerate((32, 40, 27)):
        x, y = clustered_batch(n, 16, 5, seed=10 + seed, dtype=torch.float32)
        x.requires_grad_(True)
        assert_matches(loss_and_grads(lambda x: compiled(x, y), x), loss_and_grads(lambda x: fn(x, y), x),
                       TOL[torch.float32])


class Embedder(nn.Module):
    """A small embedding network that holds the loss as a submodule, as a training script would."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.loss = MultiSimilarityLoss()

    def forward(self, x, labels):
        return self.loss(self.net(x), labels)


def module_step(model, x, y):
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_module_with_inductor(device):
    x, y = clustered_batch(40, 16, 5, seed=3, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = Embedder().to(device)
    # the network's embeddings are not drawn away from the mining thresholds like clustered_batch's, so check
    # that no pair sits where Inductor's different rounding could flip it (this seed keeps them > 1e-5 away)
    assert threshold_gap(model.net(x).detach().cpu(), y.cpu()) > 1e-5
    eager = module_step(model, x, y)
    compiled_model = torch.compile(model, fullgraph=True, dynamic=False)
    compiled = module_step(compiled_model, x, y)
    assert float(eager[0]) > 0
    assert_matches(compiled, eager, TOL[torch.float32])
    # a second step reuses the compiled graph (no recompilation), still eager's numbers
    assert_matches(module_step(compiled_model, x, y), eager, TOL[torch.float32])


def test_check_finite_compiles_and_asserts_inside_the_graph():
    x, y = clustered_batch(32, 8, 4, seed=5, dtype=torch.float32)
    x.requires_grad_(True)

    def fn(x):
        return multi_similarity_loss(x, y, check_finite=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_matches(loss_and_grads(compiled, x), loss_and_grads(fn, x), TOL[torch.float32])
    bad = x.detach().clone()
    bad[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="embeddings contains NaN or Inf"):
        compiled(bad)
