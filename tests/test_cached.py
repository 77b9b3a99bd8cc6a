"""`ms_fused.cached_backward` against the step it replaces: one full-batch `loss.backward()`.

Tolerances (relative error): float64 1e-10; bfloat16 autocast 2e-2 (a chunk's matmuls round differently
from the whole batch's).
"""
import warnings

import pytest
import torch
from torch import nn

from helpers import rel_err
from ms_fused import CircleLoss, CrossBatchMemory, MultiSimilarityLoss, NTXentLoss, SupConLoss, cached_backward

IN, DIM, CLASSES = 6, 8, 4


def mlp(seed=0, dropout=0.0, batch_norm=False, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = [nn.Linear(IN, 16), nn.Tanh()]
    layers += [nn.BatchNorm1d(16)] if batch_norm else []
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(16, DIM)).to(dtype)


class TwoInputs(nn.Module):
    """A model called with two tensors (positionally or by name)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = mlp(1), nn.Linear(3, DIM, dtype=torch.float64)

    def forward(self, x, extra):
        return self.a(x) + self.b(extra)


def batch(n, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=gen, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=gen)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def record_outputs(model):
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    return outputs


def assert_grads_close(model, reference, tol):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, q.grad) <= tol, (name, rel_err(p.grad, q.grad))


@pytest.mark.parametrize("n, chunk", [(37, 8), (37, 1), (37, 37), (37, 100)])
def test_gradient_equals_full_batch_backward(n, chunk):
    x, y = batch(n)
    model, reference = mlp(), mlp()
    for p, q in zip(model.parameters(), reference.parameters()):  # gradients accumulate into what is there
        p.grad = torch.full_like(p, 0.25)
        q.grad = torch.full_like(q, 0.25)
    full = MultiSimilarityLoss(mining=False)(reference(x), y)
    full.backward()
    loss = cached_backward(model, x, y, chunk_size=chunk, mining=False)
    assert not loss.requires_grad
    assert rel_err(loss, full) <= 1e-12
    assert_grads_close(model, reference, 1e-10)


@pytest.mark.parametrize("loss_fn", [SupConLoss(), NTXentLoss(), CircleLoss(),
                                     CrossBatchMemory(50, DIM, dtype=torch.float64, loss=SupConLoss())])
def test_pair_weighting_losses_compose(loss_fn):
    """The pair-weighting losses, and a memory bank of one, as loss_fn: the full-batch step's gradient."""
    x, y = batch(29, seed=5)
    model, reference = mlp(), mlp()
    if isinstance(loss_fn, CrossBatchMemory):  # a memory of its own for the full step: both see one batch
        full = CrossBatchMemory(50, DIM, dtype=torch.float64, loss=SupConLoss())(reference(x), y)
    else:
        full = loss_fn(reference(x), y)
    full.backward()
    loss = cached_backward(model, x, y, chunk_size=6, loss_fn=loss_fn)
    assert rel_err(loss, full) <= 1e-12
    assert_grads_close(model, reference, 1e-10)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_inputs(as_dict):
    x, y = batch(21)
    extra = torch.randn(21, 3, dtype=torch.float64)
    model, reference = TwoInputs(), TwoInputs()
    MultiSimilarityLoss()(reference(x, extra), y).backward()
    inputs = {"x": x, "extra": extra} if as_dict else (x, extra)
    cached_backward(model, inputs, y, chunk_size=4)
    assert_grads_close(model, reference, 1e-10)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def loss_drawing_a_random_number(embeddings, labels):
    noise = torch.rand((), dtype=embeddings.dtype, device=embeddings.device)
    return MultiSimilarityLoss()(embeddings, labels) + 0 * noise


def generator_state(device):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
def test_second_pass_replays_dropout_bitwise_and_generators_end_as_after_one_pass(device):
    x, y = batch(23)
    x, y = x.to(device), y.to(device)
    model = mlp(dropout=0.5).to(device)
    outputs = record_outputs(model)
    torch.manual_seed(7)
    cached_backward(model, x, y, chunk_size=5, loss_fn=loss_drawing_a_random_number)
    after_cached = generator_state(device)
    chunks = len(outputs) // 2
    assert chunks == 5
    # docs/semantics.md "Reproducibility", repeat: the second pass runs the same modules on the same chunk
    # with the generator states replayed (cached_backward's contract: its embeddings bit for bit)
    for first, second in zip(outputs[:chunks], outputs[chunks:]):
        assert torch.equal(first, second)

    # the same masks drawn by one chunk-by-chunk forward with a graph: the same gradient and generator state
    reference = mlp(dropout=0.5).to(device)
    torch.manual_seed(7)
    embeddings = torch.cat([reference(x[i:i + 5]) for i in range(0, 23, 5)])
    assert torch.equal(embeddings.detach(), torch.cat(outputs[:chunks]))  # repeat: the same chunks, same draws
    loss_drawing_a_random_number(embeddings, y).backward()
    assert torch.equal(generator_state(device), after_cached)
    assert_grads_close(model, reference, 1e-10)


def test_dropout_masks_differ_between_chunks():
    x = torch.ones(8, IN, dtype=torch.float64)
    model = mlp(dropout=0.5)
    outputs = record_outputs(model)
    cached_backward(model, x, torch.arange(8) % 2, chunk_size=4)
    assert not torch.equal(outputs[0], outputs[1])  # identical rows, different masks: the state moved on


def test_cross_batch_memory_enqueues_each_batch_once():
    model, reference = mlp(), mlp()
    xbm, xbm_reference = CrossBatchMemory(64, DIM, dtype=torch.float64), CrossBatchMemory(64, DIM, dtype=torch.float64)
    for step in range(2):
        x, y = batch(20, seed=step)
        for p in list(model.parameters()) + list(reference.parameters()):
            p.grad = None
        loss = cached_backward(model, x, y, chunk_size=6, loss_fn=xbm)
        full = xbm_reference(reference(x), y)
        full.backward()
        assert rel_err(loss, full) <= 1e-12
        assert_grads_close(model, reference, 1e-10)
        assert int(xbm.filled) == int(xbm_reference.filled) == 20 * (step + 1)
        assert int(xbm.ptr) == int(xbm_reference.ptr)
        assert rel_err(xbm.memory, xbm_reference.memory) <= 1e-12


def test_autocast_keeps_the_embeddings_dtype():
    x, y = batch(24, dtype=torch.float32)
    model, reference = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    seen = []

    def loss_fn(embeddings, labels):
        seen.append(embeddings.dtype)
        return MultiSimilarityLoss(mining=False)(embeddings, labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cached_backward(model, x, y, chunk_size=8, loss_fn=loss_fn)
        full = loss_fn(reference(x), y)
    full.backward()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert loss.dtype == torch.float32
    assert rel_err(loss, full) <= 2e-2
    assert_grads_close(model, reference, 2e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


class Forbidden(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran before the inputs were checked")


@pytest.mark.parametrize("kwargs, inputs, labels, name", [
    (dict(chunk_size=0), "x", "y", "chunk_size"),
    (dict(chunk_size=-3), "x", "y", "chunk_size"),
    (dict(chunk_size=2.0), "x", "y", "chunk_size"),
    (dict(chunk_size=True), "x", "y", "chunk_size"),
    (dict(chunk_size=4), "tuple", "y", "inputs"),
    (dict(chunk_size=4), "dict", "y", "inputs"),
    (dict(chunk_size=4), "empty", "y", "inputs"),
    (dict(chunk_size=4), "x", "short", "labels"),
    (dict(chunk_size=4), "x", "2-D", "labels"),
])
def test_bad_input_raises_before_any_forward(kwargs, inputs, labels, name):
    x, y = batch(10)
    inputs = {"x": x, "tuple": (x, x[:9]), "dict": {"a": x, "b": x[:9]}, "empty": x[:0]}[inputs]
    labels = {"y": y, "short": y[:9], "2-D": y[:, None]}[labels]
    with pytest.raises(ValueError, match=name):
        cached_backward(Forbidden(), inputs, labels, **kwargs)


def test_loss_options_with_a_custom_loss_fn_raise():
    x, y = batch(10)
    with pytest.raises(TypeError, match="loss_fn"):
        cached_backward(Forbidden(), x, y, chunk_size=4, loss_fn=MultiSimilarityLoss(), beta=40.0)


def test_batch_norm_in_train_mode_warns_once_per_model_and_updates_running_stats_once_per_chunk():
    x, y = batch(24)
    model, reference = mlp(batch_norm=True), mlp(batch_norm=True)
    with pytest.warns(UserWarning, match="BatchNorm"):
        cached_backward(model, x, y, chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_backward(model, x, y, chunk_size=8)
        cached_backward(mlp().eval(), x, y, chunk_size=8)
        cached_backward(mlp(batch_norm=True).eval(), x, y, chunk_size=8)
    for _ in range(2):  # what a chunk-sized training step would do to the statistics, twice
        for i in range(0, 24, 8):
            reference(x[i:i + 8])
    bn, bn_reference = model[2], reference[2]
    assert torch.equal(bn.num_batches_tracked, bn_reference.num_batches_tracked)
    assert rel_err(bn.running_mean, bn_reference.running_mean) <= 1e-12
    assert rel_err(bn.running_var, bn_reference.running_var) <= 1e-12
