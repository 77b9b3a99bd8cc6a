"""torch.compile(fullgraph=True) traces through the loss without graph breaks and gives eager's values and gradients.

Most cases compile with the "aot_eager" compiler: Dynamo must capture the whole function (fullgraph=True fails on
any graph break) and AOTAutograd must trace forward and backward, but no C++ is generated, so each case takes about
a second. One case runs the default Inductor compiler end to end (slow on a cold cache: tens of seconds on 2 cores).
"""
import pytest
import torch
from torch import nn

from helpers import assert_close, assert_matches_reference, clustered_batch, loss_and_grads, threshold_gap
from ms_fused import MultiSimilarityLoss, multi_similarity_loss

# CUDA cases run only where a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_full(fn):
    """Dynamo must capture the whole function (fullgraph=True fails on any graph break)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_self_mode(device, backend, dtype):
    x, y = clustered_batch(48, 16, 6, seed=1, dtype=dtype)
    x, y = x.to(device), y.to(device)

    def fn(x, y, r, yr, **_):
        return multi_similarity_loss(x, y, backend=backend)

    compiled = compile_full(fn)
    result = assert_matches_reference(compiled, x, y, dtype=dtype, reduction="mean")
    assert_close(result, loss_and_grads(fn, x, y), dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_functional_reference_mode_per_anchor(backend):
    batch = clustered_batch(24, 16, 5, seed=2, dtype=torch.float32, m=40)

    def fn(q, yq, r, yr, **_):
        return multi_similarity_loss(q, yq, r, yr, beta=40.0, reduction="none", backend=backend)

    assert_close(loss_and_grads(compile_full(fn), *batch), loss_and_grads(fn, *batch), torch.float32)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_functional_memory_with_own_copies(backend):
    q, yq, r, yr = clustered_batch(24, 16, 5, seed=2, dtype=torch.float32, m=40)
    # a memory that holds 16 of the anchors (rows 8..23 at columns 0..15) besides other rows
    ref_self_index = torch.full((24,), -1)
    ref_self_index[8:] = torch.arange(16)
    r[:16], yr[:16] = q[8:], yq[8:]

    def fn(q, yq, r, yr, **_):
        return multi_similarity_loss(q, yq, r, yr, reduction="none", backend=backend, ref_self_index=ref_self_index)

    batch = (q, yq, r, yr)
    assert_close(loss_and_grads(compile_full(fn), *batch, grad_ref=False), loss_and_grads(fn, *batch, grad_ref=False),
                 torch.float32)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_changing_batch_size(backend):
    # a training loop's last, smaller batch: Dynamo recompiles with dynamic shapes, still without graph breaks
    def fn(x, y, r, yr, **_):
        return multi_similarity_loss(x, y, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed, n in enumerate((32, 40, 27)):
        x, y = clustered_batch(n, 16, 5, seed=10 + seed, dtype=torch.float32)
        assert_close(loss_and_grads(compiled, x, y), loss_and_grads(fn, x, y), torch.float32)


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
    assert_close(compiled, eager, torch.float32)
    # a second step reuses the compiled graph (no recompilation), still eager's numbers
    assert_close(module_step(compiled_model, x, y), eager, torch.float32)


def test_check_finite_compiles_and_asserts_inside_the_graph():
    x, y = clustered_batch(32, 8, 4, seed=5, dtype=torch.float32)

    def fn(x, y, r, yr, **_):
        return multi_similarity_loss(x, y, check_finite=True)

    compiled = compile_full(fn)
    assert_close(loss_and_grads(compiled, x, y), loss_and_grads(fn, x, y), torch.float32)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="embeddings contains NaN or Inf"):
        compiled(bad, y, None, None)


# ---- training steps on the triton backend (interpreted on the CPU): the loss is one op in the graph ----------

def _sgd_steps(model, loss_of, batches, compile_forward):
    """Losses and final parameters after one SGD step per batch; the model's forward and the loss compiled
    whole (fullgraph: any graph break fails) when `compile_forward`."""
    step = torch.compile(loss_of, fullgraph=True, dynamic=False, backend="aot_eager") if compile_forward else loss_of
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = step(model, *batch)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _embedder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12))


def _assert_same_training(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled[1], eager[1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_training_step_compiles_without_graph_breaks(device):
    batches = [tuple(t.to(device) for t in clustered_batch(44, 16, 5, seed=40 + k, dtype=torch.float32))
               for k in range(3)]

    def loss_of(model, x, y):
        return multi_similarity_loss(model(x), y, backend="triton")

    eager = _sgd_steps(_embedder(7).to(device), loss_of, batches, compile_forward=False)
    compiled = _sgd_steps(_embedder(7).to(device), loss_of, batches, compile_forward=True)
    assert float(eager[0][0]) > 0
    _assert_same_training(eager, compiled)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_memory_bank_step_compiles_without_graph_breaks(device):
    gen = torch.Generator().manual_seed(41)
    bank = torch.nn.functional.normalize(torch.randn(70, 12, generator=gen), dim=1).to(device)
    bank_labels = torch.randint(0, 5, (70,), generator=gen).to(device)
    batches = []
    for k in range(3):
        x, y = clustered_batch(20, 16, 5, seed=50 + k, dtype=torch.float32)
        own = torch.full((20,), -1)
        own[::2] = torch.arange(10) + 7 * k  # half of the anchors have their copy in the bank
        batches.append((x.to(device), y.to(device), own.to(device)))

    def loss_of(model, x, y, own):
        return multi_similarity_loss(model(x), y, bank, bank_labels, ref_self_index=own, ref_normalized=True,
                                     backend="triton")

    eager = _sgd_steps(_embedder(8).to(device), loss_of, batches, compile_forward=False)
    compiled = _sgd_steps(_embedder(8).to(device), loss_of, batches, compile_forward=True)
    assert float(eager[0][0]) > 0
    _assert_same_training(eager, compiled)


def test_triton_module_with_inductor():
    """The default compiler end to end: the loss stays one opaque op, Inductor compiles the rest."""
    x, y = clustered_batch(40, 16, 5, seed=3, dtype=torch.float32)
    torch.manual_seed(0)
    model = Embedder()
    model.loss = MultiSimilarityLoss(backend="triton")
    assert threshold_gap(model.net(x).detach(), y) > 1e-5
    eager = module_step(model, x, y)
    compiled_model = torch.compile(model, fullgraph=True, dynamic=False)
    assert float(eager[0]) > 0
    assert_close(module_step(compiled_model, x, y), eager, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_triton_training_step_under_cuda_graphs():
    """mode="reduce-overhead": the compiled forward and backward replay as CUDA graphs; their warm-up step
    is eager, so autotuning (which synchronises) runs before any capture, and nothing in the ops syncs."""
    batches = [tuple(t.cuda() for t in clustered_batch(512, 16, 32, seed=70 + k, dtype=torch.float32))
               for k in range(4)]

    def loss_of(model, x, y):
        return multi_similarity_loss(model(x).to(torch.bfloat16), y, backend="triton")

    def steps(compiled):
        model = _embedder(9).cuda()
        step = torch.compile(loss_of, fullgraph=True, mode="reduce-overhead") if compiled else loss_of
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for x, y in batches:
            opt.zero_grad()
            loss = step(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    eager, compiled = steps(False), steps(True)
    assert float(eager[0][0]) > 0
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for p, q in zip(compiled[1], eager[1]):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
