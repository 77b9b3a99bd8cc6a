"""The `torch` backend of the pair-weighting losses (losses/pair_losses.py): chunked over anchors, hand-written
backward.

Any loss of losses/pair_losses.py runs here unchanged: per chunk of anchors the forward builds the block of S against
the whole reference set, its pair masks, and asks the loss for the per-anchor losses and statistics; the backward
rebuilds the block, asks the loss for d l_i / d S_ij and multiplies it out. Scratch memory is O(chunk x M);
what is kept is O(N) per-anchor statistics.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autograd import fused_backward
from .._inputs import Problem
from .backend import DEFAULT_CHUNK_BYTES, _pair_masks, _scores, _times, chunk_rows, normalized_inputs

# live (chunk x M) temporaries in the worst step: S, z, exp terms, G in the float type plus ~4 bool masks
_FLOAT_TEMPS, _BOOL_TEMPS = 5, 4


class ChunkedPairLoss(torch.autograd.Function):
    """(q_hat, r_hat) -> (per-anchor losses, (2, N) int64 counts |P_i|, |N_i|); pass the same tensor twice in self
    mode (autograd adds G and G^T)."""

    @staticmethod
    def forward(ctx, q, r, yq, yr, ref_self_index, loss, chunk: int):
        n = q.shape[0]
        losses = q.new_empty(n)
        counts = torch.empty(2, n, dtype=torch.int64, device=q.device)
        stats = None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            S = _scores(q[s:e], r)
            pos, same = _pair_masks(yq[s:e], yr, None if ref_self_index is None else ref_self_index[s:e])
            neg = ~same
            losses[s:e], block_stats = loss.forward(S, pos, neg)
            if stats is None:
                stats = q.new_empty(block_stats.shape[0], n)
            stats[:, s:e] = block_stats
            counts[0, s:e], counts[1, s:e] = pos.sum(dim=1), neg.sum(dim=1)
        ctx.save_for_backward(q, r, yq, yr, ref_self_index, stats)
        ctx.loss, ctx.chunk = loss, chunk
        ctx.mark_non_differentiable(counts)
        return losses, counts

    @staticmethod
    @fused_backward("torch")
    def backward(ctx, g, _counts_grad):
        q, r, yq, yr, ref_self_index, stats = ctx.saved_tensors
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.to(q.dtype)
        dq = torch.empty_like(q) if need_q else None
        dr = torch.zeros_like(r) if need_r else None
        for s in range(0, q.shape[0], ctx.chunk):
            e = min(q.shape[0], s + ctx.chunk)
            S = _scores(q[s:e], r)
            pos, same = _pair_masks(yq[s:e], yr, None if ref_self_index is None else ref_self_index[s:e])
            G = ctx.loss.pair_weights(S, pos, ~same, stats[:, s:e]).mul_(g[s:e, None])
            if need_q:
                _times(G, r, dq[s:e])
            if need_r:
                dr.addmm_(G.T, q[s:e])
        return dq, dr, None, None, None, None, None


def per_anchor_loss(problem: Problem, loss, chunk_bytes: Optional[int] = None):
    """(per-anchor losses, (2, N) counts |P_i|, |N_i|) of `loss` (a losses/pair_losses.py loss) on validated,
    unnormalised inputs; pml's empty-batch guard is losses/pair_api.py's loss_value."""
    q, r, yr = normalized_inputs(problem)
    if problem.self_mode:  # distinct views of one tensor, as backend.per_anchor_loss passes them
        r, yr = q.view_as(q), yr.view_as(yr)
    chunk = chunk_rows(r.shape[0], q.dtype, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes,
                       _FLOAT_TEMPS, _BOOL_TEMPS)
    return ChunkedPairLoss.apply(q, r, problem.labels, yr, problem.ref_self_index, loss, chunk)
