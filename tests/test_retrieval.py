"""ms_fused.retrieval against scikit-learn's brute-force k-NN and pml's AccuracyCalculator, ties included.

Three kinds of data:
- exact: rows of 16 entries ±1 and zeros elsewhere, so every cosine is a multiple of 1/16 and every
  implementation computes it without rounding, on any CPU; ties are everywhere (and duplicate rows are
  added). The independent ranking is scikit-learn's full neighbour list re-sorted by (distance, index), the
  documented tie rule, and metrics are computed from it in plain numpy by their definitions.
- clustered float data with duplicated rows: copies tie exactly by design (docs/semantics.md "Retrieval
  ranking"), and every other pair of rows is asserted farther apart than any rounding (helpers.similarity_gap
  against helpers.similarity_rounding), so the rankings compare exactly whatever the CPU, BLAS or tiling.
- copies whose product is rounded by position: by a product that the test makes round each column
  differently, on every CPU, and by this CPU's own matrix product where it is found to do so.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import METRIC_ROUNDING, similarity_gap, similarity_rounding
from ms_fused.features import _topk
from ms_fused.retrieval import map_at_r, nearest_neighbors, recall_at_k

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")

KS = (1, 2, 4, 8)
# (references per tile, columns per pre-selection group, byte budget): the default tiling, then tiles that
# cut every query and reference set, without and with the grouped pre-selection of `_topk._top_values`
TILINGS = [(_topk.REF_BLOCK, _topk.GROUP, None), (5, _topk.GROUP, 1), (40, 2, 20000)]


@pytest.fixture(params=TILINGS, ids=lambda t: f"block{t[0]}-group{t[1]}-bytes{t[2]}")
def tiling(request, monkeypatch):
    block, group, chunk_bytes = request.param
    monkeypatch.setattr(_topk, "REF_BLOCK", block)
    monkeypatch.setattr(_topk, "GROUP", group)
    return chunk_bytes


def exact_rows(n: int, gen: torch.Generator, d: int = 32, nonzero: int = 16) -> torch.Tensor:
    """Rows with `nonzero` entries ±1 (norm 4): cosines are exact multiples of 1/16."""
    x = torch.zeros(n, d, dtype=torch.float64)
    for row in x:
        cols = torch.randperm(d, generator=gen)[:nonzero]
        row[cols] = torch.randint(0, 2, (nonzero,), generator=gen).double() * 2 - 1
    return x


def with_duplicates(x, y, gen, count: int):
    """Copy `count` random rows (and their labels) over other random rows: exact ties."""
    src = torch.randint(0, x.shape[0], (count,), generator=gen)
    dst = torch.randint(0, x.shape[0], (count,), generator=gen)
    x, y = x.clone(), y.clone()
    x[dst], y[dst] = x[src], y[src]
    return x, y


def clustered(n: int, d: int, classes: int, gen, spread: float = 1.0):
    y = torch.arange(n) % classes  # every class has several rows: no query is alone
    y = y[torch.randperm(n, generator=gen)]
    centres = torch.randn(classes, d, generator=gen, dtype=torch.float64)
    return centres[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64), y


def first_copies(r) -> np.ndarray:
    """For each row of r, the lowest index of a row equal to it (itself when it has no earlier copy)."""
    _, inverse = np.unique(r.numpy(), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    first = np.full(inverse.max() + 1, r.shape[0])
    np.minimum.at(first, inverse, np.arange(r.shape[0]))
    return first[inverse]


def sklearn_ranking(q, r, self_mode: bool) -> np.ndarray:
    """Every reference for every query, by (cosine distance, index); the query's own row dropped in self mode.

    Copies of a row take the distance scikit-learn computed for its first copy: the documented guarantee that
    copies tie exactly, whatever position scikit-learn's own matrix product rounds them at."""
    model = sklearn_neighbors.NearestNeighbors(n_neighbors=r.shape[0], algorithm="brute", metric="cosine")
    dist, idx = model.fit(r.numpy()).kneighbors(q.numpy())
    by_column = np.empty_like(dist)
    np.put_along_axis(by_column, idx, dist, axis=1)
    by_column = by_column[:, first_copies(r)]
    rows = []
    for i in range(q.shape[0]):
        idx_i = np.arange(r.shape[0])
        if self_mode:
            idx_i = idx_i[idx_i != i]
        rows.append(idx_i[np.lexsort((idx_i, by_column[i, idx_i]))])
    return np.stack(rows)


def recall_from_ranking(ranking, yq, yr, ks) -> dict:
    hit = yr.numpy()[ranking] == yq.numpy()[:, None]
    return {k: float(np.mean(hit[:, :k].any(axis=1))) for k in ks}


def map_at_r_from_ranking(ranking, yq, yr) -> float:
    yq, yr = yq.numpy(), yr.numpy()
    aps = []
    for i, row in enumerate(ranking):
        r = int(np.sum(yr[row] == yq[i]))
        if r == 0:
            continue
        rel = yr[row[:r]] == yq[i]
        aps.append(sum(rel[:k + 1].sum() / (k + 1) for k in range(r) if rel[k]) / r)
    return float(np.mean(aps))


def exact_case(seed: int, self_mode: bool):
    gen = torch.Generator().manual_seed(seed)
    x, y = with_duplicates(exact_rows(150, gen), torch.randint(0, 12, (150,), generator=gen), gen, 30)
    if self_mode:
        return x, y, None, None
    q, yq = with_duplicates(exact_rows(60, gen), torch.randint(0, 12, (60,), generator=gen), gen, 10)
    q[:10], yq[:10] = x[:10], y[:10]  # some queries also sit in the reference set
    return q, yq, x, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_exact_ties_match_sklearn(self_mode, dtype, tiling):
    # exact ties between different rows stay exact: a normalised row has entries ±1/4 and every product and
    # partial sum is a small multiple of 1/16, exact in float32 and float64 in any order on any CPU
    q, yq, r, yr = exact_case(seed=1, self_mode=self_mode)
    ranking = sklearn_ranking(q, q if self_mode else r, self_mode)
    yr_all = yq if self_mode else yr
    cast = None if r is None else r.to(dtype)
    kwargs = dict(ref_emb=cast, ref_labels=yr, chunk_bytes=tiling)

    _, idx = nearest_neighbors(q.to(dtype), 8, ref_emb=cast, chunk_bytes=tiling)
    assert np.array_equal(idx.numpy(), ranking[:, :8])
    assert recall_at_k(q.to(dtype), yq, KS, **kwargs) == recall_from_ranking(ranking, yq, yr_all, KS)
    assert map_at_r(q.to(dtype), yq, **kwargs) == pytest.approx(map_at_r_from_ranking(ranking, yq, yr_all),
                                                                 abs=METRIC_ROUNDING)


@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_clustered_with_duplicates_match_sklearn(self_mode, tiling):
    gen = torch.Generator().manual_seed(2)
    x, y = with_duplicates(*clustered(200, 16, 25, gen), gen, 40)
    q, yq, r, yr = (x, y, None, None) if self_mode else (x[:70], y[:70], x[50:], y[50:])
    # copies tie exactly by design; every other pair of rows is farther apart than rounding can move them
    assert similarity_gap(q, r) > 2 * similarity_rounding(torch.float64, 16)
    ranking = sklearn_ranking(q, x if self_mode else r, self_mode)
    _, idx = nearest_neighbors(q, 8, ref_emb=r, chunk_bytes=tiling)
    assert np.array_equal(idx.numpy(), ranking[:, :8])
    yr_all = y if self_mode else yr
    assert recall_at_k(q, yq, KS, r, yr, chunk_bytes=tiling) == recall_from_ranking(ranking, yq, yr_all, KS)
    assert map_at_r(q, yq, r, yr, chunk_bytes=tiling) == pytest.approx(
        map_at_r_from_ranking(ranking, yq, yr_all), abs=METRIC_ROUNDING)


@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_random_data_matches_sklearn_kneighbors(self_mode):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    q, r = (x, None) if self_mode else (x[:100], x[100:])
    # no copies and no near-ties: scikit-learn's order (which has no tie rule) is the only one
    assert similarity_gap(q, r) > 2 * similarity_rounding(torch.float64, 24)
    model = sklearn_neighbors.NearestNeighbors(n_neighbors=8, algorithm="brute", metric="cosine").fit(
        (x if self_mode else r).numpy())
    dist, idx = model.kneighbors() if self_mode else model.kneighbors(q.numpy())
    sims, ours = nearest_neighbors(q, 8, ref_emb=r)
    assert np.array_equal(ours.numpy(), idx)
    np.testing.assert_allclose(sims.numpy(), 1 - dist, atol=2 * similarity_rounding(torch.float64, 24))


# ---- copies whose matrix product is rounded differently by position ---------------------------------------

def rep_of(r) -> torch.Tensor:
    """For each row of r, the lowest index of a row equal to it, found independently of ms_fused."""
    return torch.from_numpy(first_copies(r))


def ranked(S, exclude_self: bool, k: int):
    """The documented order of one dense similarity matrix: (-value, index), the own column left out."""
    S = S.clone()
    if exclude_self:
        S.fill_diagonal_(float("-inf"))
    order = S.argsort(dim=1, descending=True, stable=True)  # stable: equal values by index
    return S.gather(1, order)[:, :k], order[:, :k]


def one_ulp_by_column(S, columns):
    """S rounded up one ulp in columns ≡ 1 (mod 3) and down in columns ≡ 2: what a matrix product that rounds
    by position can do to identical rows."""
    up = torch.nextafter(S, torch.full_like(S, float("inf")))
    down = torch.nextafter(S, torch.full_like(S, float("-inf")))
    return torch.where(columns % 3 == 1, up, torch.where(columns % 3 == 2, down, S))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_copies_tie_exactly_when_the_product_rounds_by_position(monkeypatch, tiling, self_mode, dtype):
    """docs/semantics.md "Retrieval ranking": copies get their first copy's similarity, on every CPU. The tile
    product is replaced by one that rounds every column by its position, so copies at different positions
    would get different similarities; the expected ranking takes each copy's value from its first copy."""
    gen = torch.Generator().manual_seed(6)
    x, _ = with_duplicates(exact_rows(64, gen), torch.zeros(64, dtype=torch.long), gen, 30)
    q, r = (x, None) if self_mode else (exact_rows(20, gen), x)
    q, r = q.to(dtype), None if r is None else r.to(dtype)
    refs = q if self_mode else r
    product = _topk.similarities

    def by_position(q_tile, r_tile):  # r_tile is a slice of the search's references: its offset is its column
        columns = r_tile.storage_offset() // r_tile.stride(0) + torch.arange(r_tile.shape[0])
        return one_ulp_by_column(product(q_tile, r_tile), columns)

    monkeypatch.setattr(_topk, "similarities", by_position)
    k = 24
    sims, idx = nearest_neighbors(q, k, ref_emb=r, chunk_bytes=tiling)

    # the exact products (entries ±1/4 after normalisation: no rounding anywhere), rounded by position, then
    # each copy given its first copy's value
    exact = F.normalize(q.double(), dim=1) @ F.normalize(refs.double(), dim=1).T
    rounded = one_ulp_by_column(exact.to(dtype), torch.arange(refs.shape[0]))
    reps = rep_of(refs)
    assert (rounded != rounded[:, reps]).any(), "no copy is rounded differently from its first copy"
    want_sims, want_idx = ranked(rounded[:, reps], self_mode, k)
    assert torch.equal(idx, want_idx) and torch.equal(sims, want_sims)


def position_rounded_copies(dtype):
    """(q, r) with copies among the rows of r that this CPU's matrix product, on the shapes one search tile
    uses, rounds differently by position; None where none of the shapes tried does."""
    gen = torch.Generator().manual_seed(7)
    for n, d, m in [(1, 3, 5), (1, 7, 5), (1, 33, 17), (2, 16, 17), (4, 33, 100), (64, 16, 100), (64, 7, 40),
                    (1, 128, 5), (1, 128, 17), (3, 128, 40), (64, 128, 1000)]:
        for _ in range(3):
            rows = torch.randn(3, d, generator=gen, dtype=dtype)
            r = rows[torch.randint(0, 3, (m,), generator=gen)]
            q = torch.randn(n, d, generator=gen, dtype=dtype)
            S = F.normalize(q, dim=1) @ F.normalize(r, dim=1).T  # what one tile of the search computes
            if (S != S[:, rep_of(r)]).any():
                return q, r
    return None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_copies_tie_exactly_where_this_cpus_product_rounds_by_position(dtype):
    found = position_rounded_copies(dtype)
    if found is None:
        pytest.skip(f"this CPU's {dtype} matrix product rounds copies alike at every position tried "
                    "(test_copies_tie_exactly_when_the_product_rounds_by_position covers the rule)")
    q, r = found
    sims, idx = nearest_neighbors(q, r.shape[0], ref_emb=r)  # one tile, one query chunk: the product above
    S = F.normalize(q, dim=1) @ F.normalize(r, dim=1).T
    want_sims, want_idx = ranked(S[:, rep_of(r)], False, r.shape[0])
    assert torch.equal(idx, want_idx) and torch.equal(sims, want_sims)


class TestPml:
    """pytorch-metric-learning's AccuracyCalculator with its own k-NN (no faiss needed): CustomKNN(CosineSimilarity())."""

    @pytest.fixture
    def calculator(self):
        accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.inference import CustomKNN

        return accuracy_calculator.AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r"), knn_func=CustomKNN(CosineSimilarity()))

    @staticmethod
    def data(seed):
        # duplicates keep their class: a tie then never decides a metric, whatever order pml's topk picks
        gen = torch.Generator().manual_seed(seed)
        x, y = clustered(240, 32, 20, gen, spread=1.3)
        dst = torch.randperm(240, generator=gen)[:40]
        src = torch.stack([torch.nonzero((y == y[j]) & (torch.arange(240) != j))[0, 0] for j in dst])
        x[dst] = x[src]
        return x.float(), y

    @staticmethod
    def assert_no_deciding_near_tie(q, yq, r, yr, self_mode):
        """pml ranks in float32 with its own product and topk: two rows can swap where their similarities are
        within rounding (helpers.similarity_rounding, twice). Such a swap changes precision_at_1 or MAP@R
        only when the two rows differ in relevance and sit within the first R_i + 1 places: assert none does,
        so both metrics compare exactly."""
        S = F.normalize(q.double(), dim=1) @ F.normalize(r.double(), dim=1).T
        if self_mode:
            S.fill_diagonal_(float("-inf"))
        S, order = S.sort(dim=1, descending=True)
        rel = yr[order] == yq[:, None]
        places = torch.arange(S.shape[1] - 1)
        within = places[None, :] < rel.sum(dim=1, keepdim=True).clamp(min=1)  # pairs (a, a+1), a < max(R_i, 1)
        near = S[:, :-1] - S[:, 1:] <= 2 * similarity_rounding(torch.float32, q.shape[1])
        assert not (near & (rel[:, :-1] != rel[:, 1:]) & within).any()

    def test_self_mode(self, calculator, tiling):
        x, y = self.data(4)
        self.assert_no_deciding_near_tie(x, y, x, y, self_mode=True)
        expected = calculator.get_accuracy(x, y)
        assert recall_at_k(x, y, (1,), chunk_bytes=tiling)[1] == pytest.approx(expected["precision_at_1"], abs=METRIC_ROUNDING)
        assert map_at_r(x, y, chunk_bytes=tiling) == pytest.approx(expected["mean_average_precision_at_r"],
                                                                   abs=METRIC_ROUNDING)

    def test_reference_mode(self, calculator, tiling):
        x, y = self.data(5)
        q, yq, r, yr = x[:80], y[:80], x[80:], y[80:]
        self.assert_no_deciding_near_tie(q, yq, r, yr, self_mode=False)
        expected = calculator.get_accuracy(q, yq, r, yr, ref_includes_query=False)
        assert recall_at_k(q, yq, (1,), r, yr, chunk_bytes=tiling)[1] == pytest.approx(
            expected["precision_at_1"], abs=METRIC_ROUNDING)
        assert map_at_r(q, yq, r, yr, chunk_bytes=tiling) == pytest.approx(
            expected["mean_average_precision_at_r"], abs=METRIC_ROUNDING)
