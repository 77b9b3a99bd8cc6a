"""Double backward (create_graph=True, e.g. a gradient penalty): `reference` differentiates its gradient
(checked against finite differences); the fused backends raise one clear error that names `reference`."""
import pytest
import torch

from backends_under_test import FAST_CPU_BACKENDS
from helpers import assert_matches_reference, clustered_batch
from ms_fused import available_backends, multi_similarity_loss

# the interpreted triton backend too: these cases are tiny
FUSED = FAST_CPU_BACKENDS + ["auto"] + (["triton"] if "triton" in available_backends("cpu") else [])


@pytest.mark.parametrize("mode", ["self", "reference", "memory_bank"])
def test_reference_second_derivative_matches_finite_differences(mode):
    # margin 1e-4: gradgradcheck's perturbations (1e-6) never move a pair across a mining threshold
    if mode == "self":
        x, y = clustered_batch(10, 4, 3, seed=0, margin=1e-4)
        inputs, fn = (x,), lambda x: multi_similarity_loss(x, y, backend="reference", reduction="none")
    else:
        x, y, r, yr = clustered_batch(8, 4, 3, seed=1, m=9, margin=1e-4)
        ref_self_index = torch.tensor([0, -1, 2, 3, -1, 5, 6, 7]) if mode == "memory_bank" else None
        inputs = (x, r)
        fn = lambda x, r: multi_similarity_loss(x, y, r, yr, ref_self_index=ref_self_index,  # noqa: E731
                                                backend="reference", reduction="none")
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_reference_gradient_penalty_is_nonzero_and_finite():
    x, y = clustered_batch(12, 4, 3, seed=2, margin=1e-4)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(multi_similarity_loss(x, y, backend="reference"), x, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(penalty_grad).all() and penalty_grad.abs().max() > 0


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("how", ["grad", "backward"])
def test_fused_backends_refuse_double_backward_clearly(backend, how):
    x, y = clustered_batch(20, 8, 4, seed=3, dtype=torch.float32)
    x.requires_grad_(True)
    loss = multi_similarity_loss(x, y, backend=backend)
    name = available_backends("cpu")[0] if backend == "auto" else backend
    expected = rf"double backward .* not supported by backend='{name}'.* use backend='reference'"
    with pytest.raises(NotImplementedError, match=expected):
        if how == "grad":
            torch.autograd.grad(loss, x, create_graph=True)
        else:
            loss.backward(create_graph=True)


@pytest.mark.parametrize("backend", FUSED)
def test_first_order_gradient_is_unchanged_by_the_check(backend):
    x, y = clustered_batch(20, 8, 4, seed=4)
    assert_matches_reference(backend, x, y, dtype=torch.float32, reduction="mean")
