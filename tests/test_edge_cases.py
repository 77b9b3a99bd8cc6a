"""docs/semantics.md "Edge cases" and "Non-finite inputs" on every backend (interpreted triton included),
against the float64 `reference` within helpers.TOLERANCE: float64 inputs, float32 where the backend takes
no float64 (triton). Sizes stay small for the interpreter. The exact comparisons name the guarantee of
docs/semantics.md "Reproducibility" they rest on.
"""
import pytest
import torch

from helpers import (TOLERANCE, Tol, assert_matches_reference, clustered_batch, device_of, loss_and_grads,
                     memory_bank_batch, rel_err, widest_dtype)
from ms_fused import multi_similarity_loss


def test_single_anchor_gives_attached_zero(backend):
    x = torch.randn(1, 5, dtype=widest_dtype(backend), device=device_of(backend), requires_grad=True)
    loss = multi_similarity_loss(x, torch.tensor([3], device=x.device), backend=backend)
    # exact zeros: no pair at all, so both sets are empty
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("mining", [True, False])
def test_single_class_has_no_negatives(backend, mining):
    x, _ = clustered_batch(23, 6, 1, 0)
    y = torch.full((23,), 7)
    loss, (grad,) = assert_matches_reference(backend, x, y, mining=mining)
    if mining:  # no negative -> no hard positive either: exact zeros
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    else:
        assert (loss > 0).all()


def test_all_labels_distinct_has_no_positives(backend):
    x, _ = clustered_batch(19, 6, 19, 1)
    loss, (grad,) = assert_matches_reference(backend, x, torch.arange(19) * 3 - 20)
    # no positive -> no hard negative either: exact zeros
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    loss, _ = assert_matches_reference(backend, x, torch.arange(19), mining=False)
    assert (loss > 0).all()


def test_singletons_mixed_with_larger_classes(backend):
    x, y = clustered_batch(40, 8, 4, 2)
    y = y.clone()
    y[:6] = torch.arange(100, 106)  # six singleton classes
    loss, _ = assert_matches_reference(backend, x, y)
    assert_matches_reference(backend, x, y, mining=False)
    # a singleton has no positive, hence no hard negative: exact zeros
    assert torch.equal(loss[:6], torch.zeros(6, dtype=loss.dtype))


def test_duplicate_embeddings_are_real_positives(backend):
    x, y = clustered_batch(30, 8, 3, 3)
    x, y = x.clone(), y.clone()
    x[1], y[1] = x[0], y[0]  # an exact duplicate of anchor 0: S = 1, still a positive (index, not value)
    x[2] = x[0]               # and one with another label: a maximally hard negative
    y[2] = y[0] + 1
    assert_matches_reference(backend, x, y)
    assert_matches_reference(backend, x, y, mining=False)


def test_zero_rows_under_normalize_are_not_nan(backend):
    x, y = clustered_batch(20, 5, 3, 4)
    x = x.clone()
    x[3] = 0.0  # F.normalize keeps it 0: S = 0 with everyone
    loss, (grad,) = assert_matches_reference(backend, x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("n, d, m", [(1, 1, 1), (7, 1, 5), (33, 1, 40), (13, 130, 29), (3, 17, 65), (5, 3, 300)])
def test_odd_shapes_and_tall_reference(backend, n, d, m):
    """N, M, D off every block size, several row, column and D blocks of the tiled backends, D = 1, M ≫ N."""
    x, y, r, yr = clustered_batch(n, d, 3, 5, m=m, margin=1e-7)
    # with D = 1 a normalised row is ±1 whatever x is: the true gradient is 0 and both sides return rounding
    # noise, measured against 1/|x|, the scale of anything back-propagated through x / |x|
    floor = float((1 / x.abs()).norm()) if d == 1 else 0.0
    assert_matches_reference(backend, x, y, r, yr, grad_floor=floor)
    assert_matches_reference(backend, x, y, r, yr, grad_floor=floor, mining=False)
    if n > 1:
        assert_matches_reference(backend, x, y, grad_floor=floor)


def test_tall_memory_bank_with_own_copies(backend):
    x, y, r, yr, ref_self_index = memory_bank_batch(6, 250, 8, 4, seed=13)
    assert_matches_reference(backend, x, y, r, yr, ref_self_index=ref_self_index)


def test_non_contiguous_inputs(backend):
    x, y, r, yr = clustered_batch(24, 10, 4, 6, m=30)
    dtype, device = widest_dtype(backend), device_of(backend)
    big_x = torch.zeros(24, 20, dtype=dtype, device=device)
    big_x[:, ::2] = x
    r_t = r.to(dtype).to(device).T.contiguous().T  # column-major
    y_strided = torch.stack([y, y], 1)[:, 1]
    assert not big_x[:, ::2].is_contiguous() and not r_t.is_contiguous() and not y_strided.is_contiguous()
    assert_matches_reference(backend, big_x[:, ::2], y_strided, r_t, yr)
    assert_matches_reference(backend, big_x[:, ::2], y_strided)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_any_integer_label_dtype(backend, dtype):
    x, y = clustered_batch(20, 5, 4, 7)
    assert_matches_reference(backend, x, y.to(dtype))


def test_huge_and_negative_labels(backend):
    x, y = clustered_batch(30, 5, 4, 8)
    labels = torch.tensor([-(2**62), 2**62, -1, 2**40 + 1], dtype=torch.int64)[y]
    loss, _ = assert_matches_reference(backend, x, labels)
    # only equality counts: the same pairs are mined (counts are exact; the batch keeps every pair 1e-5 away
    # from a mining threshold) ...
    dtype, device = widest_dtype(backend), device_of(backend)
    xs, counts = x.to(dtype).to(device), []
    for lab in (labels, y):
        _, stats = multi_similarity_loss(xs, lab.to(device), backend=backend, return_stats=True)
        counts.append([int(c) for c in stats])
    assert counts[0] == counts[1]
    # ... and the loss is the same: bit for bit where labels enter through equality tests in row order only
    # ("Reproducibility": relabelling); triton sorts rows by label, and these labels order the classes
    # differently, so its sums run in another order: equal within helpers.TOLERANCE
    plain = loss_and_grads(backend, x, y, dtype=dtype)[0]
    if backend == "triton":
        assert rel_err(loss, plain) <= TOLERANCE[dtype].loss
    else:
        assert torch.equal(loss, plain)


@pytest.mark.parametrize("alpha, beta, mining", [(1000.0, 1000.0, False), (0.01, 1000.0, False),
                                                 (1000.0, 0.01, False), (1000.0, 1000.0, True)])
def test_extreme_scales_do_not_overflow(backend, alpha, beta, mining):
    x, y = clustered_batch(30, 5, 3, 9)
    for dtype in dict.fromkeys([widest_dtype(backend), torch.float32, torch.float16]):
        # float32: a weight exp(β(S − λ)) turns S's rounding error (~1e-7) into β · 1e-7 = 1e-4 relative at
        # β = 1000, beyond the table's bound (β ≲ 50); ~2e-5 seen (cpp)
        tol = Tol(loss=TOLERANCE[dtype].loss, grad=1e-4) if dtype == torch.float32 else None
        loss, (grad,) = assert_matches_reference(backend, x, y, dtype=dtype, tol=tol, alpha=alpha, beta=beta,
                                                 mining=mining)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_rows_give_nan_never_mined_away(backend, bad, normalize):
    """A non-finite row makes NaN every loss whose similarity row holds it, and NaN gradients as the
    reference's (assert_matches_reference: NaN patterns must agree, finite parts within tolerance)."""
    x, y, r, yr = clustered_batch(12, 4, 3, 10, m=9)
    xb = x.clone()
    xb[4, 2] = bad
    # reference mode: only the anchor whose own row is bad touches it
    loss, (dx, dr) = assert_matches_reference(backend, xb, y, r, yr, normalize=normalize)
    assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
    assert torch.isnan(dx[4]).all() and torch.isnan(dr).all()
    mean, _ = loss_and_grads(backend, xb, y, r, yr, dtype=widest_dtype(backend), reduction="mean", normalize=normalize)
    assert torch.isnan(mean)
    # a bad reference row is in every anchor's similarity row
    rb = r.clone()
    rb[0, 0] = bad
    loss, _ = assert_matches_reference(backend, x, y, rb, yr, normalize=normalize)
    assert torch.isnan(loss).all()
    # self mode: row 4 is also a column of every other anchor
    loss, _ = assert_matches_reference(backend, xb, y, normalize=normalize)
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_output_dtype(backend, reduction):
    x, y, r, yr = clustered_batch(25, 6, 4, 12, m=31)
    loss, _ = assert_matches_reference(backend, x, y, r, yr, reduction=reduction)
    per, _ = loss_and_grads(backend, x, y, r, yr, dtype=widest_dtype(backend))
    assert per.shape == (25,) and per.dtype == widest_dtype(backend)
    # "mean" divides by all N anchors, those without pairs included
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / 25}[reduction]
    assert torch.allclose(loss, expected, rtol=1e-14 if per.dtype == torch.float64 else 1e-6)


def test_lower_precision_inputs_give_a_float32_loss(backend):
    x, y = clustered_batch(25, 6, 4, 12)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        loss, (grad,) = loss_and_grads(backend, x, y, dtype=dtype, reduction="mean")
        assert loss.dtype == torch.float32 and grad.dtype == dtype
