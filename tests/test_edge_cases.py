"""docs/semantics.md "Edge cases" and "Non-finite inputs", for every CPU backend, against `reference`.

float64 throughout; tolerance 1e-10 relative (summation order is the only difference).
"""
import pytest
import torch

from backends_under_test import FAST_CPU_BACKENDS
from helpers import clustered_batch, rel_err
from ms_fused import multi_similarity_loss

TOL = 1e-10


def run(backend, x, y, r=None, yr=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    r = None if r is None else r.detach().clone().requires_grad_(True)
    loss = multi_similarity_loss(x, y, r, yr, backend=backend, reduction="none", **kw)
    grads = torch.autograd.grad(loss.sum(), [x] if r is None else [x, r])
    return loss.detach(), grads


def check(backend, x, y, r=None, yr=None, grad_floor=1e-3, **kw):
    """Compare with `reference`; `grad_floor` bounds the denominator of the gradients' relative error."""
    out_loss, out_grads = run(backend, x, y, r, yr, **kw)
    ref_loss, ref_grads = run("reference", x, y, r, yr, **kw)
    assert rel_err(out_loss, ref_loss) <= TOL, (out_loss, ref_loss)
    for g, rg in zip(out_grads, ref_grads):
        assert rel_err(g, rg, floor=grad_floor) <= TOL
    return out_loss, out_grads


pytestmark = pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)


def test_single_anchor_gives_attached_zero(backend):
    x = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    loss = multi_similarity_loss(x, torch.tensor([3]), backend=backend)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("mining", [True, False])
def test_single_class_has_no_negatives(backend, mining):
    x, _ = clustered_batch(23, 6, 1, 0)
    y = torch.full((23,), 7)
    loss, _ = check(backend, x, y, mining=mining)
    if mining:  # no negative -> no hard positive either
        assert torch.equal(loss, torch.zeros_like(loss))
    else:
        assert (loss > 0).all()


def test_all_labels_distinct_has_no_positives(backend):
    x, _ = clustered_batch(19, 6, 19, 1)
    loss, _ = check(backend, x, torch.arange(19) * 3 - 20)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss, _ = check(backend, x, torch.arange(19), mining=False)
    assert (loss > 0).all()


def test_singletons_mixed_with_larger_classes(backend):
    x, y = clustered_batch(40, 8, 4, 2)
    y = y.clone()
    y[:6] = torch.arange(100, 106)  # six singleton classes
    loss, _ = check(backend, x, y)
    check(backend, x, y, mining=False)
    assert torch.equal(loss[:6], torch.zeros(6, dtype=loss.dtype))  # a singleton has no positive


def test_duplicate_embeddings_are_real_positives(backend):
    x, y = clustered_batch(30, 8, 3, 3)
    x, y = x.clone(), y.clone()
    x[1], y[1] = x[0], y[0]  # an exact duplicate of anchor 0: S = 1, still a positive (index, not value)
    x[2] = x[0]               # and one with another label: a maximally hard negative
    y[2] = y[0] + 1
    check(backend, x, y)
    check(backend, x, y, mining=False)


def test_zero_rows_under_normalize_are_not_nan(backend):
    x, y = clustered_batch(20, 5, 3, 4)
    x = x.clone()
    x[3] = 0.0
    loss, grads = check(backend, x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("n, d, m", [(1, 1, 1), (7, 1, 5), (13, 130, 29), (5, 3, 1000)])
def test_odd_shapes_and_tall_reference(backend, n, d, m):
    x, y, r, yr = clustered_batch(n, d, 3, 5, m=m, margin=1e-7)
    # with D=1 a normalised row is ±1 and its true gradient is 0: compare that rounding noise absolutely
    floor = 1.0 if d == 1 else 1e-3
    check(backend, x, y, r, yr, grad_floor=floor)
    check(backend, x, y, r, yr, grad_floor=floor, mining=False)
    if n > 1:
        check(backend, x, y, grad_floor=floor)


def test_non_contiguous_inputs(backend):
    x, y, r, yr = clustered_batch(24, 10, 4, 6, m=30)
    big_x = torch.zeros(24, 20, dtype=x.dtype)
    big_x[:, ::2] = x
    r_t = r.T.contiguous().T  # column-major
    y_strided = torch.stack([y, y], 1)[:, 1]
    assert not big_x[:, ::2].is_contiguous() and not r_t.is_contiguous() and not y_strided.is_contiguous()
    check(backend, big_x[:, ::2], y_strided, r_t, yr)
    check(backend, big_x[:, ::2], y_strided)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_label_dtype(backend, dtype):
    x, y = clustered_batch(20, 5, 4, 7)
    check(backend, x, y.to(dtype))


def test_huge_and_negative_labels(backend):
    x, y = clustered_batch(30, 5, 4, 8)
    labels = torch.tensor([-(2**62), 2**62, -1, 2**40 + 1], dtype=torch.int64)[y]
    a = run(backend, x, labels)
    b = run(backend, x, y)
    assert torch.equal(a[0], b[0])  # only equality of labels matters
    check(backend, x, labels)


@pytest.mark.parametrize("alpha, beta", [(1000.0, 1000.0), (0.01, 1000.0), (1000.0, 0.01)])
def test_extreme_scales_do_not_overflow(backend, alpha, beta):
    x, y = clustered_batch(30, 5, 3, 9)
    loss, grads = check(backend, x, y, alpha=alpha, beta=beta, epsilon=0.5, mining=False)
    assert torch.isfinite(loss).all() and torch.isfinite(grads[0]).all()
    x32 = x.float().requires_grad_(True)
    loss32 = multi_similarity_loss(x32, y, alpha=alpha, beta=beta, mining=False, backend=backend)
    loss32.backward()
    assert torch.isfinite(loss32) and torch.isfinite(x32.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_give_nan_never_mined_away(backend, bad):
    x, y, r, yr = clustered_batch(12, 4, 3, 10, m=9)
    xb = x.clone()
    xb[4, 2] = bad
    for normalize in (True, False):
        # reference mode: only the anchor whose own row is bad touches it
        loss = multi_similarity_loss(xb, y, r, yr, backend=backend, reduction="none", normalize=normalize)
        assert torch.isnan(loss[4]) and torch.isfinite(torch.cat([loss[:4], loss[5:]])).all()
        assert torch.isnan(multi_similarity_loss(xb, y, r, yr, backend=backend, normalize=normalize))
        # a bad reference row is in every anchor's similarity row
        rb = r.clone()
        rb[0, 0] = bad
        assert torch.isnan(multi_similarity_loss(x, y, rb, yr, backend=backend, reduction="none",
                                                 normalize=normalize)).all()
        # self mode: row 4 is also a column of every other anchor
        assert torch.isnan(multi_similarity_loss(xb, y, backend=backend, reduction="none",
                                                 normalize=normalize)).all()
    # the gradient rows of those anchors are NaN too, as the reference's
    xg = xb.clone().requires_grad_(True)
    multi_similarity_loss(xg, y, r, yr, backend=backend, reduction="none")[4].backward()
    assert torch.isnan(xg.grad[4]).all()


def test_output_dtype_and_reductions(backend):
    x, y = clustered_batch(25, 6, 4, 12)
    per = multi_similarity_loss(x, y, backend=backend, reduction="none")
    assert per.shape == (25,) and per.dtype == torch.float64
    assert torch.allclose(multi_similarity_loss(x, y, backend=backend, reduction="sum"), per.sum(), rtol=1e-14)
    # "mean" divides by all N anchors, those without pairs included
    assert torch.allclose(multi_similarity_loss(x, y, backend=backend), per.sum() / 25, rtol=1e-14)
    for half in (torch.float16, torch.bfloat16, torch.float32):
        assert multi_similarity_loss(x.to(half), y, backend=backend).dtype == torch.float32
