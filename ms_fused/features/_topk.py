"""Exact top-k by similarity, tiled over queries and references: only one tile of S exists at a time.

Order: larger similarity first; equal similarities by lower reference index. `torch.topk` leaves the order
of equal values open, so each tile's selection is repaired where a tie straddles its k-th place, and the
running top-k is merged with each new tile by a stable sort (the running list holds lower indices).

Exact duplicates (`ms_fused.features._duplicates`): a matrix product may round a row differently depending on its
position in the matrix, so a copy of a reference row does not take its own product: every copy gets the
similarity computed for its representative (the lowest-indexed equal row). A representative in the same
tile is read from its column before the own-row exclusion; one in an earlier tile is read from the running
top-k, where it must be if the copy can still make the top k: a copy ranks right behind its representative
(same similarity, higher index), so if k entries already beat the representative they beat the copy too,
and the copy is left at -inf. A representative that is the query's own row (excluded) is remembered
separately, since its copies still count.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._duplicates import Duplicates
from ..engine.torch.backend import DEFAULT_CHUNK_BYTES, chunk_rows

REF_BLOCK = 16384  # references per tile; the queries per tile follow from the byte budget
GROUP = 32  # columns per group of the pre-selection in `_top_values`


def tile_rows(k: int, m: int, dtype: torch.dtype, chunk_bytes: Optional[int] = None) -> int:
    """Queries per tile within the byte budget, counting per tile entry S, and for a tie repair an int64 key
    (two floats' worth) and a bool mask; the candidate lists (values, indices, sort scratch) as 3k entries."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return chunk_rows(min(m, REF_BLOCK) + 3 * k, dtype, budget, float_temps=3, bool_temps=1)


def _by_value_then_index(values, indices):
    """Reorder each row by (-value, index)."""
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm)
    values, perm = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


def _lowest_tied(S, values, indices):
    """For rows where more columns equal the k-th value than the top-k holds: take the lowest such columns."""
    k = values.shape[1]
    kth = values[:, -1:]
    need = (values == kth).sum(dim=1)  # slots holding the k-th value: the last `need` ones
    tied = S == kth
    key = torch.where(tied, torch.arange(S.shape[1], 0, -1, device=S.device), 0)  # lower column, larger key
    lowest = key.topk(int(need.max()), dim=1).indices  # distinct keys: exact, lowest columns first
    slot = torch.arange(k, device=S.device) - (k - need)[:, None]
    return torch.where(slot >= 0, lowest.gather(1, slot.clamp(min=0)), indices)


def _top_values(S, k: int):
    """(values, columns) of k largest entries per row, the values exact as a multiset, ties in any order.

    Where the row splits into many groups of GROUP columns, only the k groups with the largest maxima are
    searched: every entry above the k-th value lies in a group whose maximum beats the k-th value, and
    each further chosen group holds at least one entry equal to it.
    """
    rows, cols = S.shape
    if cols % GROUP or cols < 2 * k * GROUP:
        return S.topk(k, dim=1)
    groups = S.view(rows, cols // GROUP, GROUP).amax(dim=2).topk(k, dim=1).indices
    columns = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=S.device)).flatten(1)
    values, at = S.gather(1, columns).topk(k, dim=1)
    return values, columns.gather(1, at)


def _tile_topk(S, k: int):
    """(values, indices) of the k best columns of each row of S in (-value, index) order."""
    if k >= S.shape[1]:
        return S.sort(dim=1, descending=True, stable=True)
    values, indices = _top_values(S, k + 1)
    straddles = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
    values, indices = values[:, :k], indices[:, :k]
    if straddles.numel():
        indices = indices.clone()
        indices[straddles] = _lowest_tied(S[straddles], values[straddles], indices[straddles])
    return _by_value_then_index(values, indices)


def _merge(values, indices, new_values, new_indices, k: int):
    """Top k of two lists in (-value, index) order whose second list holds only higher indices."""
    values = torch.cat((values, new_values), dim=1)
    indices = torch.cat((indices, new_indices), dim=1)
    values, perm = values.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, perm[:, :k])


def similarities(q, r):
    """S = q r^T for one tile: the only matrix product of the search (tests replace it to round by position)."""
    return q @ r.T


def _earlier_copies(S, c0: int, members, reps, values, indices, own, own_value, k: int):
    """Scores of the copies in tile S whose representative lies in an earlier tile (`members` ascending, `reps`
    theirs): -inf, except where the representative is among the query's running top-k (values, indices) or is
    its own excluded row `own` (similarity `own_value`), whose value the copy then takes. Work and temporaries
    grow with the copies that can still make the top k (at most k per representative), not with the tile."""
    S.index_fill_(1, members - c0, float("-inf"))
    reps, order = reps.sort(stable=True)  # grouped by representative, each group ascending
    cols = members[order] - c0
    group_reps, counts = torch.unique_consecutive(reps, return_counts=True)
    starts = counts.cumsum(0) - counts
    counts = counts.clamp(max=k)  # behind k copies of the same similarity, a copy cannot make the top k
    if own is not None:  # the own row is never a live entry of the list; its similarity is kept apart
        indices = torch.cat((indices.masked_fill(indices == own[:, None], -1), own[:, None]), dim=1)
        values = torch.cat((values, own_value[:, None]), dim=1)
    at = torch.searchsorted(group_reps, indices).clamp_(max=group_reps.shape[0] - 1)
    query, slot = (group_reps[at] == indices).nonzero(as_tuple=True)
    if query.numel() == 0:
        return
    group = at[query, slot]
    value, n = values[query, slot], counts[group]
    ends = n.cumsum(0)
    budget = max(S.numel() // 8, k)  # copies written per round
    e0 = 0
    while e0 < query.shape[0]:
        before = int(ends[e0 - 1]) if e0 else 0
        e1 = int(torch.searchsorted(ends, before + budget, right=True))
        e1 = max(e1, e0 + 1)
        part = slice(e0, e1)
        n_part = n[part]
        total = int(n_part.sum())
        # write j of entry e (j < n_e) to the column of its group's j-th copy; the entry of each write by a
        # search (torch.repeat_interleave would do it, but its CPU kernel runs a parallel loop of grain 1)
        ends_part = n_part.cumsum(0)
        write = torch.arange(total, device=S.device)
        entry = torch.searchsorted(ends_part, write, right=True)
        j = write - (ends_part - n_part)[entry]
        e = entry + e0
        S[query[e], cols[starts[group[e]] + j]] = value[e]
        e0 = e1


def _copy_scores(S, c0: int, duplicates: Duplicates, values, indices, own, own_value, k: int):
    """Give every copy in the tile S (columns c0...) its representative's similarity, in place."""
    lo, hi = torch.searchsorted(duplicates.members, torch.tensor([c0, c0 + S.shape[1]], device=S.device)).tolist()
    if lo == hi:
        return
    members, reps = duplicates.members[lo:hi], duplicates.rep[lo:hi]
    inside = reps >= c0
    if bool(inside.all()):
        S.index_copy_(1, members - c0, S.index_select(1, reps - c0))
        return
    if bool(inside.any()):
        S.index_copy_(1, members[inside] - c0, S.index_select(1, reps[inside] - c0))
    earlier = ~inside
    _earlier_copies(S, c0, members[earlier], reps[earlier], values, indices, own, own_value, k)


def topk(q, r, k: int, exclude=None, duplicates: Optional[Duplicates] = None):
    """The k largest S_ij = <q_i, r_j> of each query row, as (values, indices) of shape (rows, k).

    `exclude`: an int64 (rows,) tensor, column exclude[i] left out of row i (-1 for none). `duplicates`: the
    copies among the rows of r (`ms_fused.features._duplicates.find`), each scored as its representative. Needs
    k <= columns left. Memory: one (rows x REF_BLOCK) tile of S and O(rows x k) candidates.
    """
    values = indices = None
    own_value = None
    if exclude is not None and duplicates is not None:
        own_value = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
    for c0 in range(0, r.shape[0], REF_BLOCK):
        c1 = min(r.shape[0], c0 + REF_BLOCK)
        S = similarities(q, r[c0:c1])
        if duplicates is not None:
            _copy_scores(S, c0, duplicates, values, indices, exclude, own_value, k)
        if exclude is not None:
            rows = ((exclude >= c0) & (exclude < c1)).nonzero().squeeze(1)
            if own_value is not None:
                own_value[rows] = S[rows, exclude[rows] - c0]
            S[rows, exclude[rows] - c0] = float("-inf")
        tile_values, tile_indices = _tile_topk(S, k)
        tile_indices += c0
        if values is None:
            values, indices = tile_values, tile_indices
        else:
            values, indices = _merge(values, indices, tile_values, tile_indices, k)
    return values, indices
