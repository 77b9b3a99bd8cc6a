"""docs/semantics.md "Bad input": every bad argument raises before any kernel runs, with a message naming it,
whichever backend is asked for."""
import math

import pytest
import torch

from helpers import device_of
from ms_fused import MultiSimilarityLoss, multi_similarity_loss

X = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


def call(**overrides):
    kwargs = dict(embeddings=X, labels=Y)
    kwargs.update(overrides)
    return multi_similarity_loss(**kwargs)


@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(embeddings=torch.randn(6)), ValueError, r"embeddings must be 2-D"),
    (dict(embeddings=torch.randn(2, 3, 4)), ValueError, r"embeddings must be 2-D"),
    (dict(embeddings=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long)), ValueError,
     r"embeddings must have at least one row"),
    (dict(embeddings=torch.randn(6, 0)), ValueError, r"embeddings must have at least one column"),
    (dict(embeddings=X.numpy()), TypeError, r"embeddings must be a torch.Tensor"),
    (dict(embeddings=X.to(torch.int32)), TypeError, r"embeddings must have dtype float16, bfloat16, float32 or float64"),
    (dict(embeddings=X.to(torch.complex64)), TypeError, r"embeddings must have dtype"),
    (dict(labels=Y[:5]), ValueError, r"labels must have one entry per row of embeddings \(6\), got 5"),
    (dict(labels=Y.float()), TypeError, r"labels must have an integer dtype, got torch.float32"),
    (dict(labels=Y > 0), TypeError, r"labels must have an integer dtype, got bool"),
    (dict(labels=Y[None]), ValueError, r"labels must be 1-D"),
    (dict(labels=[0, 0, 1, 1, 2, 2]), TypeError, r"labels must be a torch.Tensor"),
    (dict(ref_emb=torch.randn(0, 4), ref_labels=torch.zeros(0, dtype=torch.long)), ValueError,
     r"ref_emb must have at least one row"),
    (dict(ref_emb=torch.randn(5, 3), ref_labels=torch.zeros(5, dtype=torch.long)), ValueError,
     r"ref_emb must have the same dim as embeddings \(4\), got 3"),
    (dict(ref_emb=torch.randn(5, 4, dtype=torch.float64), ref_labels=torch.zeros(5, dtype=torch.long)), TypeError,
     r"ref_emb must have the dtype of embeddings"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(4, dtype=torch.long)), ValueError,
     r"ref_labels must have one entry per row of ref_emb \(5\), got 4"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5)), TypeError, r"ref_labels must have an integer dtype"),
    (dict(ref_emb=torch.randn(5, 4)), ValueError, r"ref_labels must be given together with ref_emb"),
    (dict(ref_labels=torch.zeros(5, dtype=torch.long)), ValueError, r"ref_emb must be given together with ref_labels"),
    (dict(ref_self_index=torch.arange(6)), ValueError, r"ref_self_index is only meaningful with ref_emb"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5, dtype=torch.long), ref_self_index=torch.arange(6)),
     ValueError, r"ref_self_index must hold row numbers of ref_emb in \[0, 5\) or -1"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5, dtype=torch.long), ref_self_index=torch.full((6,), -2)),
     ValueError, r"ref_self_index must hold row numbers"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5, dtype=torch.long), ref_self_index=torch.zeros(6)),
     TypeError, r"ref_self_index must have an integer dtype"),
    (dict(ref_emb=torch.randn(5, 4), ref_labels=torch.zeros(5, dtype=torch.long), ref_self_index=torch.zeros(5, dtype=torch.long)),
     ValueError, r"ref_self_index must have one entry per row of embeddings"),
    (dict(alpha=0.0), ValueError, r"alpha must be > 0, got 0.0"),
    (dict(alpha=-1), ValueError, r"alpha must be > 0"),
    (dict(beta=0), ValueError, r"beta must be > 0"),
    (dict(epsilon=-0.1), ValueError, r"epsilon must be >= 0"),
    (dict(alpha=math.inf), ValueError, r"alpha must be finite"),
    (dict(beta=math.nan), ValueError, r"beta must be finite"),
    (dict(base=math.inf), ValueError, r"base must be finite"),
    (dict(epsilon=math.nan), ValueError, r"epsilon must be finite"),
    (dict(alpha="2"), TypeError, r"alpha must be a real number"),
    (dict(alpha=True), TypeError, r"alpha must be a real number"),
    (dict(mining=1), TypeError, r"mining must be a bool"),
    (dict(normalize=None), TypeError, r"normalize must be a bool"),
    (dict(check_finite="yes"), TypeError, r"check_finite must be a bool"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
])
def test_bad_input_raises_naming_the_argument(backend, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**{"backend": backend, **overrides})


def test_mismatched_devices_are_named():
    meta = torch.empty(6, 4, device="meta")
    with pytest.raises(ValueError, match=r"labels is on cpu but embeddings is on meta"):
        call(embeddings=meta)
    with pytest.raises(ValueError, match=r"ref_emb is on meta but embeddings is on cpu"):
        call(ref_emb=torch.empty(5, 4, device="meta"), ref_labels=torch.zeros(5, dtype=torch.long))


def test_backend_that_cannot_serve_the_device_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' cannot serve torch.float32 tensors on cpu"):
        call(backend="triton")


def test_module_validates_its_arguments_at_construction():
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        MultiSimilarityLoss(beta=-1.0)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        MultiSimilarityLoss(reduction="max")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        MultiSimilarityLoss(backend="jax")


def test_module_refuses_given_pairs_and_a_reference_set_in_the_indices_tuple_slot():
    """pml's positional order: the third argument is a miner's indices_tuple, which the MS loss cannot take."""
    from ms_fused import CrossBatchMemory
    x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    for loss_fn in (MultiSimilarityLoss(), CrossBatchMemory(16, 4)):
        with pytest.raises(ValueError, match="mines its pairs itself.*drop the miner"):
            loss_fn(x, y, pairs)
    with pytest.raises(TypeError, match=r"third positional argument is indices_tuple.*ref_emb=\.\.\., ref_labels="):
        MultiSimilarityLoss()(x, y, x, y)
    assert MultiSimilarityLoss()(x, y, None).isfinite()


def test_check_finite_raises_instead_of_returning_nan(backend):
    device = device_of(backend)
    x = X.clone().to(device)
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf \(check_finite=True\)"):
        call(embeddings=x, labels=Y.to(device), check_finite=True, backend=backend)
    r = torch.randn(5, 4, device=device)
    r[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ref_emb contains NaN or Inf"):
        call(embeddings=X.to(device), labels=Y.to(device), ref_emb=r,
             ref_labels=torch.zeros(5, dtype=torch.long, device=device), check_finite=True, backend=backend)
