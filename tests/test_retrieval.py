"""ms_fused.retrieval against scikit-learn's brute-force k-NN and pml's AccuracyCalculator, ties included.

Two kinds of data:
- exact: rows of 16 entries ±1 and zeros elsewhere, so every cosine is a multiple of 1/16 and every
  implementation computes it without rounding; ties are everywhere (and duplicate rows are added). The
  independent ranking is scikit-learn's full neighbour list re-sorted by (distance, index), the documented
  tie rule, and metrics are computed from it in plain numpy by their definitions.
- clustered float data (no accidental ties) with duplicated rows, compared directly.
"""
import numpy as np
import pytest
import torch

from ms_fused import _topk
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


def sklearn_ranking(q, r, self_mode: bool) -> np.ndarray:
    """Every reference for every query, by (cosine distance, index); the query's own row dropped in self mode."""
    model = sklearn_neighbors.NearestNeighbors(n_neighbors=r.shape[0], algorithm="brute", metric="cosine")
    dist, idx = model.fit(r.numpy()).kneighbors(q.numpy())
    rows = []
    for i in range(q.shape[0]):
        keep = idx[i] != i if self_mode else np.ones(idx.shape[1], dtype=bool)
        d_i, idx_i = dist[i][keep], idx[i][keep]
        rows.append(idx_i[np.lexsort((idx_i, d_i))])
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
    q, yq, r, yr = exact_case(seed=1, self_mode=self_mode)
    ranking = sklearn_ranking(q, q if self_mode else r, self_mode)
    yr_all = yq if self_mode else yr
    cast = None if r is None else r.to(dtype)
    kwargs = dict(ref_emb=cast, ref_labels=yr, chunk_bytes=tiling)

    _, idx = nearest_neighbors(q.to(dtype), 8, ref_emb=cast, chunk_bytes=tiling)
    assert np.array_equal(idx.numpy(), ranking[:, :8])
    assert recall_at_k(q.to(dtype), yq, KS, **kwargs) == recall_from_ranking(ranking, yq, yr_all, KS)
    assert map_at_r(q.to(dtype), yq, **kwargs) == pytest.approx(map_at_r_from_ranking(ranking, yq, yr_all),
                                                                 abs=1e-12)


@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_clustered_with_duplicates_match_sklearn(self_mode, tiling):
    gen = torch.Generator().manual_seed(2)
    x, y = with_duplicates(*clustered(200, 16, 25, gen), gen, 40)
    q, yq, r, yr = (x, y, None, None) if self_mode else (x[:70], y[:70], x[50:], y[50:])
    ranking = sklearn_ranking(q, x if self_mode else r, self_mode)
    _, idx = nearest_neighbors(q, 8, ref_emb=r, chunk_bytes=tiling)
    assert np.array_equal(idx.numpy(), ranking[:, :8])
    yr_all = y if self_mode else yr
    assert recall_at_k(q, yq, KS, r, yr, chunk_bytes=tiling) == recall_from_ranking(ranking, yq, yr_all, KS)
    assert map_at_r(q, yq, r, yr, chunk_bytes=tiling) == pytest.approx(
        map_at_r_from_ranking(ranking, yq, yr_all), abs=1e-12)


@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "reference"])
def test_random_data_matches_sklearn_kneighbors(self_mode):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    q, r = (x, None) if self_mode else (x[:100], x[100:])
    model = sklearn_neighbors.NearestNeighbors(n_neighbors=8, algorithm="brute", metric="cosine").fit(
        (x if self_mode else r).numpy())
    dist, idx = model.kneighbors() if self_mode else model.kneighbors(q.numpy())
    sims, ours = nearest_neighbors(q, 8, ref_emb=r)
    assert np.array_equal(ours.numpy(), idx)
    np.testing.assert_allclose(sims.numpy(), 1 - dist, atol=1e-12)


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

    def test_self_mode(self, calculator, tiling):
        x, y = self.data(4)
        expected = calculator.get_accuracy(x, y)
        assert recall_at_k(x, y, (1,), chunk_bytes=tiling)[1] == pytest.approx(expected["precision_at_1"], abs=1e-12)
        assert map_at_r(x, y, chunk_bytes=tiling) == pytest.approx(expected["mean_average_precision_at_r"],
                                                                   abs=1e-12)

    def test_reference_mode(self, calculator, tiling):
        x, y = self.data(5)
        q, yq, r, yr = x[:80], y[:80], x[80:], y[80:]
        expected = calculator.get_accuracy(q, yq, r, yr, ref_includes_query=False)
        assert recall_at_k(q, yq, (1,), r, yr, chunk_bytes=tiling)[1] == pytest.approx(
            expected["precision_at_1"], abs=1e-12)
        assert map_at_r(q, yq, r, yr, chunk_bytes=tiling) == pytest.approx(
            expected["mean_average_precision_at_r"], abs=1e-12)
