"""ms_fused.retrieval: bad input, edge cases, determinism and the tie rule on its own.

Exact comparisons rest on docs/semantics.md "Retrieval ranking" (copies tie exactly; exact products tie
exactly) or "Reproducibility" (repeat), or on data whose similarities are farther apart than rounding
(helpers.similarity_gap), each named where it is used."""
import pytest
import torch

from helpers import METRIC_ROUNDING, similarity_gap, similarity_rounding
from ms_fused.features import _duplicates, _topk
from ms_fused.retrieval import map_at_r, nearest_neighbors, recall_at_k


def data(n=50, d=8, classes=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen).to(dtype), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["embeddings", "ref_emb"])
def test_non_finite_embeddings_raise(bad, where):
    x, y = data()
    r = x.clone()
    (x if where == "embeddings" else r)[3, 2] = bad
    with pytest.raises(ValueError, match=where):
        recall_at_k(x, y, ref_emb=r, ref_labels=y)
    with pytest.raises(ValueError, match=where):
        map_at_r(x, y, ref_emb=r, ref_labels=y)
    with pytest.raises(ValueError, match=where):
        nearest_neighbors(x, 2, ref_emb=r)


def test_overflowing_dot_products_raise():
    x, y = data()
    with pytest.raises(ValueError, match="overflow"):
        recall_at_k(x * 1e30, y, normalize=False)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, y: recall_at_k(x[0], y), ValueError, "embeddings must be 2-D"),
    (lambda x, y: recall_at_k(x[:0], y[:0]), ValueError, "at least one row"),
    (lambda x, y: recall_at_k(x.long(), y), TypeError, "embeddings must have dtype"),
    (lambda x, y: recall_at_k(x.numpy(), y), TypeError, "embeddings must be a torch.Tensor"),
    (lambda x, y: recall_at_k(x, y.float()), TypeError, "labels must have an integer dtype"),
    (lambda x, y: recall_at_k(x, y.bool()), TypeError, "labels must have an integer dtype, got bool"),
    (lambda x, y: recall_at_k(x, y[:-1]), ValueError, "labels must have one entry per row"),
    (lambda x, y: recall_at_k(x, y, ref_emb=x), ValueError, "ref_emb must be given together with ref_labels"),
    (lambda x, y: recall_at_k(x, y, ref_labels=y), ValueError, "ref_labels must be given together with ref_emb"),
    (lambda x, y: recall_at_k(x, y, ref_emb=x[:, :3], ref_labels=y), ValueError, "ref_emb must have the same dim"),
    (lambda x, y: recall_at_k(x, y, ref_emb=x.double(), ref_labels=y), TypeError, "ref_emb must have the dtype"),
    (lambda x, y: recall_at_k(x, y, ref_emb=x, ref_labels=y[:3]), ValueError, "ref_labels must have one entry"),
    (lambda x, y: recall_at_k(x, y, ks=()), ValueError, "ks must hold at least one"),
    (lambda x, y: recall_at_k(x, y, ks=(1, 0)), ValueError, "ks must hold positive"),
    (lambda x, y: recall_at_k(x, y, ks=(1.5,)), TypeError, "ks must hold ints"),
    (lambda x, y: recall_at_k(x, y, ks=(True,)), TypeError, "ks must hold ints"),
    (lambda x, y: recall_at_k(x, y, ks=3), TypeError, "ks must be a sequence"),
    (lambda x, y: recall_at_k(x, y, exclude_self=1), TypeError, "exclude_self must be a bool"),
    (lambda x, y: map_at_r(x, y, normalize="yes"), TypeError, "normalize must be a bool"),
    (lambda x, y: nearest_neighbors(x, 0), ValueError, r"k must be an int in \[1, 49\]"),
    (lambda x, y: nearest_neighbors(x, 50), ValueError, r"k must be an int in \[1, 49\]"),
    (lambda x, y: nearest_neighbors(x, 50, exclude_self=False)[1].shape, None, None),
])
def test_bad_input(call, error, match):
    x, y = data()
    if error is None:
        call(x, y)
        return
    with pytest.raises(error, match=match):
        call(x, y)


def test_one_query_and_no_positives():
    # no same-label reference at all: every query misses whatever the ranking, so the metrics are exact
    x, y = data(n=1)
    assert recall_at_k(x, y) == {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0}
    assert map_at_r(x, y) != map_at_r(x, y)  # nan: no query has a same-label reference
    distinct = torch.arange(50)
    x, _ = data()
    assert recall_at_k(x, distinct, (1, 100)) == {1: 0.0, 100: 0.0}


def test_k_beyond_the_references_counts_them_all():
    x, y = data(n=20, classes=10)
    some = recall_at_k(x, y, (19, 25))  # every reference counted: no ranking decides, exact
    has_positive = (y[:, None] == y[None, :]).sum(1) > 1
    assert some[19] == some[25] == float(has_positive.double().mean())


def test_own_row_removed_by_index_duplicates_stay():
    x, y = data(n=30)
    x[7] = x[3]
    y[3] = y[7] = 99  # a class of two identical rows
    # random rows: the copy's similarity, 1, is far above any other row's
    assert similarity_gap(x) > 2 * similarity_rounding(torch.float32, 8)
    _, idx = nearest_neighbors(x, 1)
    assert idx[3, 0] == 7 and idx[7, 0] == 3
    assert recall_at_k(x, y, (1,))[1] >= 2 / 30
    # without exclusion the lower index wins the tie at similarity 1: row 3 is first for both (copies tie
    # exactly: "Retrieval ranking")
    _, idx = nearest_neighbors(x, 2, exclude_self=False)
    assert idx[3].tolist() == [3, 7] and idx[7].tolist() == [3, 7]


def test_ties_go_to_the_lower_index_across_tiles(monkeypatch):
    # entries 0, 1 and 1/2 (normalised: 1/√2 times 1 or 0): every product is exact, and the ties are copies
    monkeypatch.setattr(_topk, "REF_BLOCK", 3)
    q = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[0.0, 1.0]] * 4 + [[1.0, 0.0]] * 5 + [[0.5, 0.5]] * 3)  # the 5 equal best: 4..8
    _, idx = nearest_neighbors(q, 7, ref_emb=r, chunk_bytes=1)
    assert idx.tolist() == [[4, 5, 6, 7, 8, 9, 10]]


def test_ties_go_to_the_lower_index_through_the_grouped_preselection(monkeypatch):
    monkeypatch.setattr(_topk, "REF_BLOCK", 40)
    monkeypatch.setattr(_topk, "GROUP", 2)
    values = torch.zeros(40)
    values[0::2] = 0.5  # every group of two columns ties at 0.5 ...
    values[10] = 0.9  # ... but one
    r = torch.stack((values, torch.zeros(40)), dim=1)  # products with (1, 0): the values themselves, exact
    sims, idx = nearest_neighbors(torch.tensor([[1.0, 0.0]]), 2, ref_emb=r, normalize=False)
    assert idx.tolist() == [[10, 0]] and sims[0, 1] == 0.5


def test_reference_mode_removes_nothing():
    x, y = data()
    assert similarity_gap(x, x) > 2 * similarity_rounding(torch.float32, 8)  # each row's own copy is first
    _, idx = nearest_neighbors(x, 1, ref_emb=x)
    assert torch.equal(idx[:, 0], torch.arange(50))
    assert recall_at_k(x, y, (1,), x, y)[1] == 1.0
    # exclude_self is ignored in reference mode: the same computation ("Reproducibility", repeat)
    assert map_at_r(x, y, ref_emb=x, ref_labels=y) == map_at_r(x, y, ref_emb=x, ref_labels=y, exclude_self=False)


def test_normalize_false_ranks_by_dot_product():
    x, _ = data(d=4)
    x[5] *= 100
    _, idx = nearest_neighbors(x, 1, normalize=False)
    dots = x.double() @ x.double().T
    dots.fill_diagonal_(float("-inf"))
    # the best and second-best dot product of every row are farther apart than float32 rounding of either
    top = dots.topk(2, dim=1).values
    assert ((top[:, 0] - top[:, 1]) / top.abs().amax(dim=1) > 2 * similarity_rounding(torch.float32, 4)).all()
    assert torch.equal(idx[:, 0], dots.argmax(1))


def test_huge_and_negative_labels():
    x, y = data()
    big = y * 2**40 - 2**50
    # the same ranking ("Reproducibility", repeat), labels compared for equality only
    assert recall_at_k(x, big) == recall_at_k(x, y)
    assert map_at_r(x, big) == map_at_r(x, y)


def test_low_precision_inputs_rank_in_float32():
    x, y = data()
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        # cast to float32 inside: the same float32 rows, the same computation ("Reproducibility", repeat)
        assert recall_at_k(low, y) == recall_at_k(low.float(), y)
        assert map_at_r(low, y) == map_at_r(low.float(), y)


def test_deterministic_across_runs_and_tilings(monkeypatch):
    """The quick tier's size: several reference blocks and chunks at REF_BLOCK = 37, chunk_bytes = 5000."""
    deterministic_across_runs_and_tilings(monkeypatch, n=120, classes=12, copies=10)


@pytest.mark.slow
def test_deterministic_across_runs_and_tilings_larger(monkeypatch):
    deterministic_across_runs_and_tilings(monkeypatch, n=400, classes=30, copies=30)


def deterministic_across_runs_and_tilings(monkeypatch, n, classes, copies):
    x, y = data(n=n, d=16, classes=classes, dtype=torch.float64)
    x[n // 2:n // 2 + copies] = x[:copies]  # copies, which tie exactly in every tiling
    # a repeated call gives the same bits ("Reproducibility", repeat)
    runs = [(recall_at_k(x, y), map_at_r(x, y), nearest_neighbors(x, 8)[1]) for _ in range(2)]
    assert runs[1][0] == runs[0][0] and runs[1][1] == runs[0][1] and torch.equal(runs[1][2], runs[0][2])
    # other tiles round the products differently: the ranking is the same where rows are farther apart than
    # that rounding (asserted) and copies tie exactly; MAP@R's sums may group differently (METRIC_ROUNDING)
    assert similarity_gap(x) > 2 * similarity_rounding(torch.float64, 16)
    monkeypatch.setattr(_topk, "REF_BLOCK", 37)
    recall, mapr, idx = (recall_at_k(x, y, chunk_bytes=5000), map_at_r(x, y, chunk_bytes=5000),
                         nearest_neighbors(x, 8, chunk_bytes=5000)[1])
    assert recall == runs[0][0] and mapr == pytest.approx(runs[0][1], abs=METRIC_ROUNDING)
    assert torch.equal(idx, runs[0][2])


def test_inputs_that_require_grad():
    x, y = data()
    x.requires_grad_(True)
    assert recall_at_k(x, y) == recall_at_k(x.detach(), y)  # the same rows ("Reproducibility", repeat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu():
    x, y = data(n=3000, d=64, classes=300, dtype=torch.float64)
    x[100:200] = x[:100]
    # another device rounds differently: copies tie exactly ("Retrieval ranking"), other rows are farther
    # apart than rounding (asserted)
    assert similarity_gap(x) > 2 * similarity_rounding(torch.float64, 64)
    assert recall_at_k(x.cuda(), y.cuda()) == recall_at_k(x, y)
    assert map_at_r(x.cuda(), y.cuda()) == pytest.approx(map_at_r(x, y), abs=METRIC_ROUNDING)
    assert torch.equal(nearest_neighbors(x.cuda(), 8)[1].cpu(), nearest_neighbors(x, 8)[1])


def copies_by_unique(x):
    """(members, their first copies) found by torch.unique, independently of ms_fused.features._duplicates."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.shape[0]).scatter_reduce(
        0, inverse, torch.arange(x.shape[0]), reduce="amin")[inverse]
    members = (first != torch.arange(x.shape[0])).nonzero().squeeze(1)
    return members, first[members]


@pytest.mark.parametrize("collide", [None, "equal_weights", "one_word"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copies_are_found_exactly(monkeypatch, dtype, collide):
    """Every row equal value for value to a lower-indexed one (+0.0 and -0.0 alike), with its lowest-indexed
    copy; rows whose keys collide (forced here: all weights 1, or a key of one 32-bit word) are told apart."""
    if collide == "equal_weights":
        monkeypatch.setattr(_duplicates, "_weights", lambda words, device: torch.ones(words, dtype=torch.float64))
    elif collide == "one_word":
        monkeypatch.setattr(_duplicates, "_MAX_WORDS", 1)
    gen = torch.Generator().manual_seed(11)
    for trial in range(30):
        m, d = int(torch.randint(1, 80, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        x = torch.randint(-2, 3, (m, d), generator=gen).to(dtype)
        x = x * torch.where(torch.rand(m, d, generator=gen) < 0.5, -1.0, 1.0).to(dtype)  # signed zeros
        found = _duplicates.find(x)
        members, first = copies_by_unique(x)
        if found is None:
            assert members.numel() == 0, trial
        else:
            assert torch.equal(found.members, members) and torch.equal(found.rep, first), trial
