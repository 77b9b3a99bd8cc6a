"""The `torch` backend against the dense `reference` backend (docs/semantics.md: values and gradients) over
every combination of mode, mining, normalize and reduction, its float64 gradcheck, and its chunking.
Tolerances: helpers.TOLERANCE; the contract and edge cases run in test_contract.py and test_edge_cases.py.
"""
import itertools

import pytest
import torch

from helpers import Tol, assert_close, assert_matches_reference, clustered_batch, loss_and_grads, rel_err
from ms_fused import multi_similarity_loss
from ms_fused.engine._inputs import HyperParams, check_inputs
from ms_fused.engine.torch import backend as torch_backend

# float32 against the float32 reference (same rounded inputs, both float32 GEMMs): this backend's own
# acceptance bound, tighter than the table's float32 bound against float64
FLOAT32_VS_FLOAT32 = Tol(loss=1e-6, grad=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ref_mode, mining, normalize", list(itertools.product([False, True], repeat=3)))
def test_matches_reference(dtype, ref_mode, mining, normalize):
    for seed in range(3):
        if ref_mode:
            x, y, r, yr = clustered_batch(97, 19, 7, seed, dtype, m=131, normalize=normalize)
        else:
            (x, y), r, yr = clustered_batch(131, 19, 9, seed, dtype, normalize=normalize), None, None
        if not normalize:  # keep |S| around 1 so the exponentials stay in a sane range
            x, r = x / 5, None if r is None else r / 5
        for reduction in ("mean", "sum", "none"):
            kw = dict(mining=mining, normalize=normalize, reduction=reduction)
            out = assert_matches_reference("torch", x, y, r, yr, dtype=dtype, **kw)
            if dtype == torch.float32:
                assert_close(out, loss_and_grads("reference", x, y, r, yr, **kw), dtype, tol=FLOAT32_VS_FLOAT32)


def test_ref_self_index_removes_exactly_those_pairs():
    x, y, r, yr = clustered_batch(40, 8, 5, 3, m=60)
    # anchors 0..39 have copies at rows 10..49 of R (a memory that already holds the batch)
    r[10:50] = x
    yr[10:50] = y
    idx = torch.arange(40) + 10
    idx[::7] = -1  # some anchors without a copy: their duplicate is a real positive
    for mining in (True, False):
        loss, _ = assert_matches_reference("torch", x, y, r, yr, ref_self_index=idx, mining=mining)
        plain, _ = loss_and_grads("reference", x, y, r, yr, mining=mining)
        assert not torch.allclose(plain, loss)  # the exclusion changes the answer


def test_self_mode_equals_reference_mode_with_ref_self_index():
    x, y = clustered_batch(50, 6, 5, 11)
    ref = loss_and_grads("reference", x, y)
    loss, (dx, dr) = loss_and_grads("torch", x, y, x, y, ref_self_index=torch.arange(50))
    assert_close((loss, (dx + dr,)), ref, torch.float64)


@pytest.mark.parametrize("ref_mode", [False, True])
def test_gradcheck_float64(ref_mode):
    x, y, r, yr = clustered_batch(14, 5, 3, 2, m=17)
    x.requires_grad_(True)
    r.requires_grad_(True)
    for mining, normalize in itertools.product([True, False], repeat=2):
        if ref_mode:
            fn = lambda a, b: multi_similarity_loss(a, y, b, yr, backend="torch", mining=mining, normalize=normalize,
                                                    reduction="none")
            inputs = (x, r)
        else:
            fn = lambda a: multi_similarity_loss(a, y, backend="torch", mining=mining, normalize=normalize,
                                                 reduction="none")
            inputs = (x,)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-7, rtol=1e-6)


def test_scratch_memory_is_chunk_by_m_never_n_by_m():
    """Every tensor the forward and backward create has at most chunk x M elements (chunk << N)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    n, d = 300, 8
    x, y = clustered_batch(n, d, 10, 0, torch.float32)
    x.requires_grad_(True)
    budget = 40_000  # bytes -> a handful of rows per chunk
    chunk = torch_backend.chunk_rows(n, torch.float32, budget)
    assert 1 <= chunk < 20
    problem = check_inputs(x, y, None, None, None, HyperParams())
    with LargestOutput():
        loss = torch_backend.per_anchor_loss(problem, chunk_bytes=budget).sum()
        loss.backward()
    assert LargestOutput.largest <= max(chunk * n, n * d)
    assert LargestOutput.largest < n * n // 10


def test_chunk_size_does_not_change_the_answer():
    x, y = clustered_batch(77, 9, 6, 4)
    problem = check_inputs(x, y, None, None, None, HyperParams())
    whole = torch_backend.per_anchor_loss(problem, chunk_bytes=2**30)
    for budget in (1, 5_000, 20_000):
        assert rel_err(torch_backend.per_anchor_loss(problem, chunk_bytes=budget), whole) <= 1e-13
