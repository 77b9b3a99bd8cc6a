"""Exact retrieval metrics at any size: Recall@K and MAP@R without an N x M similarity matrix.

    from ms_fused.retrieval import recall_at_k, map_at_r
    recall_at_k(embeddings, labels)            # {1: ..., 2: ..., 4: ..., 8: ...}, each query against all others
    map_at_r(embeddings, labels)               # Musgrave et al. 2020, "A Metric Learning Reality Check"

Similarity is the cosine (`normalize=True`, rows normalised like `torch.nn.functional.normalize`) or the
dot product, computed in float32 (float64 for float64 inputs). Self mode (no `ref_emb`): every query is
ranked against all rows, its own row removed by index when `exclude_self` (a duplicate of it stays, as in
the loss); reference mode: against `ref_emb`, nothing removed. Ranking: larger similarity first, equal
similarities by lower reference index, so results are deterministic and equal to any exact k-NN that
breaks ties the same way. Reference rows that are exact copies of one another (equal value for value in the
compute dtype) are scored once, for the lowest-indexed copy, and every copy gets that similarity, so copies
tie exactly and rank by index on every CPU (docs/semantics.md "Retrieval ranking"); a matrix product
alone may round a row differently depending on its position.

One tiled top-k (`ms_fused.features._topk`) serves both metrics on every device: tiles of `REF_BLOCK` references
times as many queries as fit the byte budget of the `torch` loss backend (`MS_FUSED_TORCH_CHUNK_MB`,
default 32 MiB), matrix product then `torch.topk` per tile, merged into a running top-k. The copies are
found once per call (`ms_fused.features._duplicates`: an exact integer key per row, a sort, a comparison of the
rows that share a key), in O(M) memory. On CUDA this runs
the same tiled `torch.topk`; no fused Triton kernel is used (none has been measured to beat it).
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Optional

import torch
import torch.nn.functional as F

from . import _duplicates, _topk
from ..engine._inputs import check_embedding, check_flag, check_labels, check_same_device, compute_dtype


@dataclass
class _Search:
    q: torch.Tensor  # normalised queries in the compute dtype
    r: torch.Tensor  # normalised references (q itself in self mode)
    exclude_self: bool  # drop column i from query i's ranking
    duplicates: Optional[_duplicates.Duplicates]  # copies among the references, scored as their first copy

    @property
    def available(self) -> int:
        """References each query is ranked against."""
        return self.r.shape[0] - int(self.exclude_self)

    def best(self, chunk: torch.Tensor, k: int):
        """(similarities, indices), each (len(chunk), k): the k best references of the queries in chunk."""
        values, indices = _topk.topk(self.q[chunk], self.r, k, chunk if self.exclude_self else None,
                                     self.duplicates)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("similarities overflowed to Inf/NaN; use normalize=True or scale the embeddings")
        return values, indices

    def chunks(self, ids: torch.Tensor, k: int, chunk_bytes: Optional[int]):
        """`best` over ids, as many queries at a time as the byte budget allows: (chunk, values, indices)."""
        rows = _topk.tile_rows(k, self.r.shape[0], self.q.dtype, chunk_bytes)
        for s in range(0, ids.shape[0], rows):
            chunk = ids[s:s + rows]
            yield (chunk, *self.best(chunk, k))


def _search(embeddings, ref_emb, exclude_self, normalize) -> _Search:
    q = check_embedding("embeddings", embeddings)
    r = None if ref_emb is None else check_embedding("ref_emb", ref_emb)
    if r is not None:
        check_same_device(q.device, ref_emb=r)
        if r.shape[1] != q.shape[1]:
            raise ValueError(f"ref_emb must have the same dim as embeddings ({q.shape[1]}), got {r.shape[1]}")
        if r.dtype != q.dtype:
            raise TypeError(f"ref_emb must have the dtype of embeddings ({q.dtype}), got {r.dtype}")
    exclude_self, normalize = check_flag("exclude_self", exclude_self), check_flag("normalize", normalize)
    for name, x in (("embeddings", q), ("ref_emb", r)):
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    cd = compute_dtype(q.dtype)
    q = q.detach().to(cd)
    r = q if r is None else r.detach().to(cd)
    duplicates = _duplicates.find(r)  # equal input rows, found before normalisation
    if normalize:
        q_hat = F.normalize(q, dim=1)
        r = q_hat if r is q else F.normalize(r, dim=1)
        q = q_hat
    return _Search(q, r, exclude_self and ref_emb is None, duplicates)


def _labelled(embeddings, labels, ref_emb, ref_labels, exclude_self, normalize):
    """Validated inputs: (search, query labels, reference labels)."""
    if (ref_emb is None) != (ref_labels is None):
        given, missing = ("ref_emb", "ref_labels") if ref_labels is None else ("ref_labels", "ref_emb")
        raise ValueError(f"{given} must be given together with {missing}")
    search = _search(embeddings, ref_emb, exclude_self, normalize)
    device = search.q.device
    check_same_device(device, labels=labels if isinstance(labels, torch.Tensor) else None,
                 ref_labels=ref_labels if isinstance(ref_labels, torch.Tensor) else None)
    yq = check_labels("labels", labels, search.q.shape[0], "embeddings")
    yr = yq if ref_emb is None else check_labels("ref_labels", ref_labels, search.r.shape[0], "ref_emb")
    return search, yq, yr


def _check_ks(ks) -> tuple:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be a sequence of positive ints, got {type(ks).__name__}") from None
    if not ks:
        raise ValueError("ks must hold at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, Integral):
            raise TypeError(f"ks must hold ints, got {k!r}")
        if k < 1:
            raise ValueError(f"ks must hold positive ints, got {k}")
    return tuple(int(k) for k in ks)


def nearest_neighbors(embeddings, k: int, ref_emb=None, exclude_self=True, normalize=True, *, chunk_bytes=None):
    """The k most similar references of each query: (similarities, indices), each (N, k), best first.

    Ties by lower index; k may not exceed the references a query is ranked against (M, or N - 1 in self
    mode with exclude_self). Memory: O(N k) for the result plus one tile.
    """
    search = _search(embeddings, ref_emb, exclude_self, normalize)
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= search.available:
        raise ValueError(f"k must be an int in [1, {search.available}], got {k!r}")
    n = search.q.shape[0]
    values = torch.empty(n, k, dtype=search.q.dtype, device=search.q.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=search.q.device)
    for chunk, v, i in search.chunks(torch.arange(n, device=search.q.device), int(k), chunk_bytes):
        values[chunk], indices[chunk] = v, i
    return values, indices


def recall_at_k(embeddings, labels, ks=(1, 2, 4, 8), ref_emb=None, ref_labels=None, exclude_self=True,
                normalize=True, *, chunk_bytes=None) -> dict:
    """{k: fraction of queries with a same-label reference among their k most similar}, over all N queries.

    A query without any same-label reference counts as a miss (pml's precision_at_1 leaves such queries
    out instead). A k beyond the references available counts every reference. Memory: O(N + M) plus one
    tile and O(rows x max k) candidates.
    """
    search, yq, yr = _labelled(embeddings, labels, ref_emb, ref_labels, exclude_self, normalize)
    ks = _check_ks(ks)
    k = min(max(ks), search.available)
    n = search.q.shape[0]
    miss = max(ks)
    first_hit = torch.full((n,), miss, dtype=torch.int64, device=search.q.device)  # 0-based rank of the first match
    if k > 0:
        for chunk, _, indices in search.chunks(torch.arange(n, device=search.q.device), k, chunk_bytes):
            match = yr[indices] == yq[chunk, None]
            first_hit[chunk] = torch.where(match.any(dim=1), match.to(torch.uint8).argmax(dim=1), miss)
    return {kk: int((first_hit < kk).sum()) / n for kk in ks}


def class_sizes(yq: torch.Tensor, yr: torch.Tensor) -> torch.Tensor:
    """For each query label, how many references carry it."""
    values, counts = torch.unique(yr, return_counts=True)
    at = torch.searchsorted(values, yq).clamp(max=values.shape[0] - 1)
    return torch.where(values[at] == yq, counts[at], 0)


def map_at_r(embeddings, labels, ref_emb=None, ref_labels=None, exclude_self=True, normalize=True, *,
             chunk_bytes=None) -> float:
    """Mean Average Precision at R (Musgrave, Belongie, Lim 2020), as a float.

    For query i, R_i = number of same-label references (its own row not counted when excluded), and
    AP@R_i = (1/R_i) sum_{k=1..R_i} P(k) rel(k) over its R_i most similar references, where rel(k) says the
    k-th is same-label and P(k) is the fraction of same-label ones among the first k. The mean is over
    queries with R_i >= 1 (nan if there are none), as pml's `mean_average_precision_at_r` does.

    Memory: queries are sorted by R_i and cut into chunks of consecutive R_i; a chunk searches only the top
    max R_i of its own queries, so at most (rows x max R) candidates exist at a time, never O(N max R).
    """
    search, yq, yr = _labelled(embeddings, labels, ref_emb, ref_labels, exclude_self, normalize)
    device = search.q.device
    r_sizes = class_sizes(yq, yr) - int(search.exclude_self)
    ids = (r_sizes > 0).nonzero().squeeze(1)
    if ids.numel() == 0:
        return float("nan")
    ids = ids[r_sizes[ids].argsort(stable=True)]
    ap = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
    rows = _topk.tile_rows(int(r_sizes[ids[-1]]), search.r.shape[0], search.q.dtype, chunk_bytes)
    for s in range(0, ids.shape[0], rows):
        chunk = ids[s:s + rows]
        r_chunk = r_sizes[chunk]
        k = int(r_chunk[-1])  # ascending: the largest R_i of the chunk
        _, indices = search.best(chunk, k)
        ranks = torch.arange(1, k + 1, device=device)
        rel = (yr[indices] == yq[chunk, None]) & (ranks <= r_chunk[:, None])
        precision = rel.cumsum(dim=1).to(torch.float64) / ranks
        ap[s:s + rows] = (precision * rel).sum(dim=1) / r_chunk
    return float(ap.mean())
