"""The `torch` backend: pure PyTorch, chunked over anchors, hand-written backward (SPEC "Gradient").

Scratch memory is O(chunk x M): `chunk` rows of anchors are processed at a time, chunk chosen from a
byte budget. Forward keeps only per-row statistics (min_pos, max_neg, A, B, non-finite flag); backward
recomputes each chunk's similarities and rebuilds its weight block G, never the whole N x M matrix.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._inputs import HyperParams, Problem, compute_dtype
from .reference import log1p_sum_exp

DEFAULT_CHUNK_BYTES = int(os.environ.get("MS_FUSED_TORCH_CHUNK_MB", "32")) * 2**20

# live (chunk x M) temporaries in the worst step: S, G or z, exp(z) in the float type plus ~8 bool masks
_FLOAT_TEMPS, _BOOL_TEMPS = 4, 8


def chunk_rows(m: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    per_row = m * (_FLOAT_TEMPS * torch.finfo(dtype).bits // 8 + _BOOL_TEMPS)
    return max(1, budget_bytes // per_row)


def _pair_masks(yq_c, yr, self_c, cols):
    same = yq_c[:, None] == yr[None, :]
    pos = same if self_c is None else same & (cols[None, :] != self_c[:, None])
    return pos, ~same


def _hard_masks(S, pos, neg, min_pos, max_neg, hp: HyperParams):
    if not hp.mining:
        return pos, neg
    return pos & (S - hp.epsilon < max_neg[:, None]), neg & (S + hp.epsilon > min_pos[:, None])


class ChunkedMultiSimilarity(torch.autograd.Function):
    """(q_hat, r_hat) -> per-anchor loss; pass the same tensor twice in self mode (autograd adds G and G^T)."""

    @staticmethod
    def forward(ctx, q, r, yq, yr, self_index, hp: HyperParams, chunk: int):
        n, m = q.shape[0], r.shape[0]
        cols = torch.arange(m, device=q.device)
        loss = torch.empty(n, dtype=q.dtype, device=q.device)
        stats = torch.empty(n, 4, dtype=q.dtype, device=q.device)  # min_pos, max_neg, A, B
        bad = torch.empty(n, dtype=torch.bool, device=q.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            S = q[s:e] @ r.T
            pos, neg = _pair_masks(yq[s:e], yr, None if self_index is None else self_index[s:e], cols)
            min_pos = S.masked_fill(~pos, float("inf")).amin(dim=1)
            max_neg = S.masked_fill(~neg, float("-inf")).amax(dim=1)
            hard_pos, hard_neg = _hard_masks(S, pos, neg, min_pos, max_neg, hp)
            A = log1p_sum_exp(-hp.alpha * (S - hp.base), hard_pos)
            B = log1p_sum_exp(hp.beta * (S - hp.base), hard_neg)
            bad[s:e] = ~torch.isfinite(S).all(dim=1)
            loss[s:e] = torch.where(bad[s:e], float("nan"), A / hp.alpha + B / hp.beta)
            stats[s:e] = torch.stack((min_pos, max_neg, A, B), dim=1)
        ctx.save_for_backward(q, r, yq, yr, self_index, stats, bad)
        ctx.hp, ctx.chunk = hp, chunk
        return loss

    @staticmethod
    def backward(ctx, g):
        q, r, yq, yr, self_index, stats, bad = ctx.saved_tensors
        hp, chunk = ctx.hp, ctx.chunk
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, m = q.shape[0], r.shape[0]
        cols = torch.arange(m, device=q.device)
        g = g.to(q.dtype)
        dq = torch.empty_like(q) if need_q else None
        dr = torch.zeros_like(r) if need_r else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            S = q[s:e] @ r.T
            pos, neg = _pair_masks(yq[s:e], yr, None if self_index is None else self_index[s:e], cols)
            min_pos, max_neg, A, B = stats[s:e].unbind(dim=1)
            hard_pos, hard_neg = _hard_masks(S, pos, neg, min_pos, max_neg, hp)
            gc = g[s:e, None]
            # SPEC "Gradient": G_ip = -g exp(-a(S-l) - A), G_in = +g exp(b(S-l) - B), 0 elsewhere
            G = torch.where(hard_pos, -gc * torch.exp(-hp.alpha * (S - hp.base) - A[:, None]), 0.0)
            G += torch.where(hard_neg, gc * torch.exp(hp.beta * (S - hp.base) - B[:, None]), 0.0)
            G = torch.where(bad[s:e, None], float("nan"), G)
            if need_q:
                torch.mm(G, r, out=dq[s:e])
            if need_r:
                dr.addmm_(G.T, q[s:e])
        return dq, dr, None, None, None, None, None


def normalized_inputs(problem: Problem):
    """Upcast to the compute dtype and normalise inside the autograd graph; (q_hat, r_hat, ref_labels)."""
    cd = compute_dtype(problem.q.dtype)
    q = problem.q.to(cd)
    r = q if problem.self_mode else problem.ref.to(cd)
    if problem.hp.normalize:
        q = F.normalize(q, dim=1)
        r = q if problem.self_mode else F.normalize(r, dim=1)
    yr = problem.labels if problem.self_mode else problem.ref_labels
    return q, r, yr


def per_anchor_loss(problem: Problem, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    q, r, yr = normalized_inputs(problem)
    chunk = chunk_rows(r.shape[0], q.dtype, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    return ChunkedMultiSimilarity.apply(q, r, problem.labels, yr, problem.self_index, problem.hp, chunk)
