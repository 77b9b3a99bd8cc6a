"""The lean bank step: a memory of unit rows used as stored (ref_normalized=True), never copied as a whole, and
bfloat16 memories on every backend, against the float64 `reference` on the same rounded numbers."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends_under_test import CPU_BACKENDS
from helpers import TOLERANCE, clustered, rel_err
from ms_fused import CrossBatchMemory, available_backends, multi_similarity_loss

ALL_BACKENDS = CPU_BACKENDS + (["triton"] if "triton" in available_backends("cpu") else [])
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]


def slots_of(xbm, n):
    """The slots the next call writes (each row's own copy), for a batch no longer than the memory."""
    return (int(xbm.ptr) + torch.arange(n)) % xbm.memory_size


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_dtypes_match_reference_on_the_same_rounded_numbers(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    xbm = CrossBatchMemory(50, 12, dtype=dtype, backend=backend, reduction="none")
    for n in (30, 30, 17):  # the second batch wraps around
        x, y = clustered(n, 12, 5, gen)
        x = x.float()
        slots = slots_of(xbm, n)
        leaf = x.clone().requires_grad_(True)
        loss = xbm(leaf, y)
        weights = torch.linspace(0.5, 1.5, n)
        (loss * weights).sum().backward()
        filled = int(xbm.filled)
        # the batch is cast to the memory's dtype; the stored rows are used as they are
        anchors = x.to(dtype).double().requires_grad_(True)
        ref = multi_similarity_loss(anchors, y, xbm.memory[:filled].double(), xbm.memory_labels[:filled],
                                    ref_self_index=slots, ref_normalized=True, reduction="none", backend="reference")
        (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), anchors)
        assert loss.dtype == torch.float32 and leaf.grad.dtype == torch.float32
        assert rel_err(loss, ref) <= 1e-5
        # the anchors' gradient is computed in float32 and stored in their dtype, i.e. bfloat16-rounded; triton's
        # gradient product takes bfloat16 weights and rows, as a GPU's tensor cores do (helpers.TOLERANCE)
        grad_tol = 1e-5 if dtype != torch.bfloat16 else TOLERANCE[dtype].grad if backend == "triton" else 2**-8
        assert rel_err(leaf.grad, ref_grad) <= grad_tol
        norms = xbm.memory[:filled].double().norm(dim=1)
        assert (norms - 1).abs().max() <= (2**-7 if dtype == torch.bfloat16 else 1e-6)


def test_bfloat16_memory_is_half_the_bytes():
    m32, m16 = CrossBatchMemory(1000, 64), CrossBatchMemory(1000, 64, dtype=torch.bfloat16)
    assert m16.memory.untyped_storage().nbytes() * 2 == m32.memory.untyped_storage().nbytes()


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor an operation creates, leaving out those that share `skip`'s storage."""

    def __init__(self, skip):
        super().__init__()
        self.skip, self.largest = skip.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.skip:
                self.largest = max(self.largest, t.numel())
        return out


# the oracle is dense; Triton's CPU interpreter copies every kernel argument (its kernels scale by inverse row
# norms and read a bfloat16 memory as it is)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_never_copies_the_memory(backend, dtype):
    # more memory rows than the backends convert at a time, fewer anchors than dims: N·M < M·D
    m, d, n = 6000, 16, 8
    gen = torch.Generator().manual_seed(1)
    xbm = CrossBatchMemory(m, d, dtype=dtype, backend=backend)
    x, y = clustered(m, d, 7, gen)
    xbm(x.float(), y)  # fill the memory
    x, y = clustered(n, d, 7, gen)
    leaf = x.float().requires_grad_(True)
    with LargestNewTensor(xbm.memory) as seen:
        xbm(leaf, y).backward()
    assert seen.largest < m * d, (seen.largest, m * d)
    # the same check sees the copy that normalising the memory again would make
    with LargestNewTensor(xbm.memory) as seen:
        multi_similarity_loss(leaf.to(dtype), y, xbm.memory, xbm.memory_labels, backend=backend).backward()
    assert seen.largest >= m * d


def test_ref_normalized_needs_a_constant_ref_emb():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="ref_normalized=True needs ref_emb"):
        multi_similarity_loss(x, y, ref_normalized=True)
    with pytest.raises(ValueError, match="ref_normalized=True needs a constant ref_emb"):
        multi_similarity_loss(x, y, x.clone().requires_grad_(True), y, ref_normalized=True)
    with pytest.raises(TypeError, match="ref_normalized must be a bool"):
        multi_similarity_loss(x, y, x, y, ref_normalized=1)
