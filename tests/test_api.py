"""Public API: backend registry, "auto", the module, graph attachment of a zero loss."""
import sys
import types

import pytest
import torch

import ms_fused
from ms_fused.engine import backends
from helpers import TOLERANCE, clustered_batch, rel_err
from ms_fused import MultiSimilarityLoss, available_backends, multi_similarity_loss


def test_public_names():
    assert set(ms_fused.__all__) >= {"multi_similarity_loss", "MultiSimilarityLoss", "available_backends"}


def test_available_backends_on_cpu_fastest_first():
    names = available_backends("cpu")
    assert {"torch", "reference"} <= set(names)
    assert names.index("torch") < names.index("reference")
    if "cpp" in names:
        assert names[0] == "cpp"
    assert available_backends(torch.device("cpu")) == names
    assert available_backends() == names  # torch's default device is the CPU here


def test_every_backend_module_provides_the_protocol():
    for name in backends.BACKEND_NAMES:
        module = backends._module(name)
        if not isinstance(module, str):  # str: could not be imported here
            assert isinstance(module, backends.Backend)


def test_registry_refuses_a_module_without_per_anchor_loss(monkeypatch):
    fake = types.ModuleType("fake_backend")
    fake.unavailable_reason = lambda device, dtype=None: None
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setitem(backends._MODULES, "fake", "fake_backend")
    with pytest.raises(TypeError, match=r"backend 'fake' \(module 'fake_backend'\) does not provide per_anchor_loss,"):
        backends._module("fake")
    fake.per_anchor_loss = lambda problem, count_pairs=False: None
    del fake.unavailable_reason
    with pytest.raises(TypeError, match="does not provide unavailable_reason,"):
        backends.check_backend_module("fake", fake)
    fake.unavailable_reason = lambda device, dtype=None: None
    backends.check_backend_module("fake", fake)


def test_backend_names_are_defined_once():
    from ms_fused.engine._inputs import BACKENDS
    assert BACKENDS == ("auto",) + backends.BACKEND_NAMES
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpp', 'torch', 'reference'\)"):
        multi_similarity_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), backend="cuda")


def test_auto_picks_the_first_available_backend_and_agrees_with_reference():
    x, y = clustered_batch(40, 8, 5, 1)
    auto = multi_similarity_loss(x, y)
    first = multi_similarity_loss(x, y, backend=available_backends("cpu")[0])
    assert torch.equal(auto, first)  # docs/semantics.md "Reproducibility", repeat: "auto" runs that backend
    assert rel_err(auto, multi_similarity_loss(x, y, backend="reference")) <= TOLERANCE[torch.float64].loss


def test_zero_loss_is_attached_to_the_graph():
    x = torch.randn(8, 4, requires_grad=True)
    loss = multi_similarity_loss(x, torch.zeros(8, dtype=torch.long))  # one class: nothing is mined
    # docs/semantics.md "Reproducibility", exact zeros: no anchor has mined pairs
    assert loss.item() == 0.0 and loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_module_forward_with_reference_set_and_ref_self_index():
    x, y, r, yr = clustered_batch(20, 6, 4, 2, m=30)
    r[:20], yr[:20] = x, y
    idx = torch.arange(20)
    module = MultiSimilarityLoss(reduction="sum", backend="torch", beta=40.0)
    expected = multi_similarity_loss(x, y, r, yr, ref_self_index=idx, reduction="sum", backend="reference", beta=40.0)
    assert rel_err(module(x, y, None, r, yr, ref_self_index=idx), expected) <= TOLERANCE[torch.float64].loss
    assert rel_err(module(x, y, ref_emb=r, ref_labels=yr, ref_self_index=idx), expected) <= TOLERANCE[torch.float64].loss
    assert "beta=40.0" in repr(module)


def test_gradients_come_back_in_each_inputs_dtype():
    x, y, r, yr = clustered_batch(16, 4, 3, 3, m=12)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q = x.to(dtype).requires_grad_(True)
        k = r.to(dtype).requires_grad_(True)
        loss = multi_similarity_loss(q, y, k, yr)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss.backward()
        assert q.grad.dtype == dtype and k.grad.dtype == dtype
