"""Exact duplicate rows of a reference set, found without a second copy of it.

Retrieval scores each set of identical reference rows once (`ms_fused.features._topk`): a matrix product may round
the same row differently depending on where it sits in the matrix (which micro-kernel, SIMD lane or edge
block computes it depends on the BLAS and the CPU), so two copies of one row would otherwise get
similarities that differ in the last bits, and the tie rule "equal similarities by lower index" would not
order them.

How: every row gets a key, a weighted sum of its 32-bit words, computed as a float64 matrix-vector product
whose every term and partial sum is an integer below 2^53: words are below 2^31 in magnitude, weights below
2^8, and at most 2^13 words enter the key. Every addition is then exact, in any order and with or without
fused multiply-adds, so equal rows get equal keys whatever their position, the CPU or the device. Rows are
sorted by key; each row in a run of equal keys is compared, value for value, with the first row of its run.
Rows that differ from the first row of their run (a key collision, or rows equal in the words that enter
the key and not beyond) are grouped exactly by `torch.unique` on those rows alone.
Memory: O(M) keys and indices, plus a block of rows at a time for the keys and the comparisons.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_MAX_WORDS = 2**13  # words per row that enter the key (rows equal in these and not beyond are compared anyway)
_WEIGHT_BITS = 8  # 2^31 * 2^8 * 2^13 = 2^52: every partial sum of the key is an exact float64 integer
_BLOCK_BYTES = 8 * 2**20  # rows per block: about this many bytes of float64 words


@dataclass
class Duplicates:
    """The reference rows equal to a row of lower index, each with that lowest index (its representative).

    `members`: int64, ascending, the rows that are copies of a lower-indexed row; `rep`: int64, same length,
    for each of them the lowest index of a row equal to it (a representative: rep is never a member)."""

    members: torch.Tensor
    rep: torch.Tensor


def _weights(words: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, 2**_WEIGHT_BITS, (words,), generator=gen, dtype=torch.int64).to(device, torch.float64)


def _keys(x: torch.Tensor) -> torch.Tensor:
    """(M,) float64 integers: Σ_w word_w · weight_w over the first _MAX_WORDS 32-bit words of each row, -0.0 read
    as +0.0, so that rows equal value for value get equal keys."""
    m = x.shape[0]
    words = x.shape[1] * x.element_size() // 4
    used = min(words, _MAX_WORDS)
    weights = _weights(used, x.device)
    keys = torch.empty(m, dtype=torch.float64, device=x.device)
    rows = max(1, _BLOCK_BYTES // (8 * used))
    for s in range(0, m, rows):
        block = x[s:s + rows] + 0.0  # a contiguous copy, with -0.0 turned into +0.0 (they compare equal)
        bits = block.view(torch.int32).reshape(block.shape[0], words)[:, :used]
        keys[s:s + rows] = bits.to(torch.float64) @ weights
    return keys


def _equal_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a),) bool: row a[i] equals row b[i] value for value, compared a block at a time."""
    out = torch.empty(a.shape[0], dtype=torch.bool, device=x.device)
    rows = max(1, _BLOCK_BYTES // (2 * x.shape[1] * x.element_size()))
    for s in range(0, a.shape[0], rows):
        out[s:s + rows] = (x[a[s:s + rows]] == x[b[s:s + rows]]).all(dim=1)
    return out


def find(x: torch.Tensor) -> Optional[Duplicates]:
    """The exact duplicates among the rows of x (float32 or float64, finite), or None when all rows differ."""
    m = x.shape[0]
    if m < 2:
        return None
    keys, order = _keys(x).sort(stable=True)  # equal keys: ascending row index
    new_run = torch.ones(m, dtype=torch.bool, device=x.device)
    new_run[1:] = keys[1:] != keys[:-1]
    del keys
    later = (~new_run).nonzero().squeeze(1)  # sorted positions after the first of their run
    if later.numel() == 0:
        return None
    starts = new_run.nonzero().squeeze(1)
    first = starts[torch.searchsorted(starts, later, right=True) - 1]  # the start of each one's run
    rows, heads = order[later], order[first]  # a run's first row has its lowest index
    del order, new_run, starts, first, later
    same = _equal_rows(x, rows, heads)
    members, reps = [rows[same]], [heads[same]]
    if not bool(same.all()):
        # rows that share a key with a row they differ from: equal rows share a key, so grouping these rows
        # among themselves finds every row equal to them; each group's lowest index represents it
        odd = rows[~same]
        _, inverse = torch.unique(x[odd], dim=0, return_inverse=True)
        lowest = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64, device=x.device)
        lowest = lowest.scatter_reduce(0, inverse, odd, reduce="amin")[inverse]
        copy = odd != lowest
        members.append(odd[copy])
        reps.append(lowest[copy])
    members, reps = torch.cat(members), torch.cat(reps)
    if members.numel() == 0:
        return None
    members, perm = members.sort()
    return Duplicates(members, reps[perm])
