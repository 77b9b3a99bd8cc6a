"""The `torch` backend: pure PyTorch, chunked over anchors, hand-written backward (docs/semantics.md "Gradient").

Scratch memory is O(chunk x M): `chunk` rows of anchors are processed at a time, chunk chosen from a
byte budget. Forward keeps only the per-row statistics of engine/_autograd.py's layout (min_pos, max_neg, A, B;
NaN A and B for a non-finite row); backward recomputes each chunk's similarities and rebuilds its weight
block G, never the whole N x M matrix.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .._autograd import LSE_NEG, LSE_POS, MAX_NEG, MIN_POS, N_STATS, bad_rows, fused_backward
from .._inputs import HyperParams, Problem, compute_dtype

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default

DEFAULT_CHUNK_BYTES = int(os.environ.get("MS_FUSED_TORCH_CHUNK_MB", "32")) * 2**20

# rows of a narrower constant reference set (a bfloat16 memory bank) converted to the compute dtype at a time
CAST_ROWS = 4096

# live (chunk x M) temporaries in the worst step: S, z, exp(z), G in the float type plus ~6 bool masks
_FLOAT_TEMPS, _BOOL_TEMPS = 4, 6


def chunk_rows(m: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES,
               float_temps: int = _FLOAT_TEMPS, bool_temps: int = _BOOL_TEMPS) -> int:
    """Rows of m columns that fit the budget, `float_temps` float and `bool_temps` bool temporaries per entry."""
    per_row = m * (float_temps * torch.finfo(dtype).bits // 8 + bool_temps)
    return max(1, budget_bytes // per_row)


def _pair_masks(yq_c, yr, ref_self_index_chunk):
    """(pos, same) for a chunk of anchors; pos = same label minus each anchor's own copy (by index)."""
    same = yq_c[:, None] == yr[None, :]
    if ref_self_index_chunk is None:
        return same, same
    # clear (i, ref_self_index_chunk[i]) with a fixed-shape scatter (torch.compile cannot trace nonzero's
    # data-dependent shape inside an autograd.Function); rows with index -1 write back their own value at column 0
    col = ref_self_index_chunk.clamp(min=0)[:, None]
    pos = same.scatter(1, col, same.gather(1, col) & (ref_self_index_chunk < 0)[:, None])
    return pos, same


def _hard_masks(S, pos, same, min_pos, max_neg, hp: HyperParams):
    """docs/semantics.md "Mining", thresholds tested as written: S - eps < max_neg, S + eps > min_pos."""
    if not hp.mining:
        return pos, ~same
    hard_pos = torch.lt(S - hp.epsilon, max_neg[:, None]).logical_and_(pos)
    hard_neg = torch.gt(S + hp.epsilon, min_pos[:, None]).logical_and_(~same)
    return hard_pos, hard_neg


def _row_shifts(min_pos, max_neg, hp: HyperParams):
    """Per-row shifts m = max(0, max z) of the two log-sum-exps, found from the row extremes alone.

    The weakest positive (min_pos) is hard whenever any positive is, and the strongest negative
    (max_neg) likewise, so max z is reached there; testing them with the same float expression as
    the masks decides exactly whether the mined sets are empty (then m = 0 and the term is 0).
    """
    if hp.mining:
        any_pos, any_neg = min_pos - hp.epsilon < max_neg, max_neg + hp.epsilon > min_pos
    else:
        any_pos, any_neg = min_pos < float("inf"), max_neg > float("-inf")
    m_pos = torch.where(any_pos, (-hp.alpha * (min_pos - hp.base)).clamp(min=0), 0.0)
    m_neg = torch.where(any_neg, (hp.beta * (max_neg - hp.base)).clamp(min=0), 0.0)
    return m_pos, m_neg


def _shifted_exp(S, keep, scale, base, shift):
    """exp(scale * (S_ij - base) - shift_i) where keep, else 0 (evaluated as docs/semantics.md writes it)."""
    z = (S - base).mul_(scale).sub_(shift[:, None])
    return z.masked_fill_(~keep, float("-inf")).exp_()


def _scores(q_c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """q_c @ r.T in q_c's dtype. A reference set of a narrower dtype (a constant memory bank) is converted
    CAST_ROWS rows at a time, so that no converted copy of the whole set is ever made."""
    if r.dtype == q_c.dtype:
        return q_c @ r.T
    out = q_c.new_empty(q_c.shape[0], r.shape[0])
    for c in range(0, r.shape[0], CAST_ROWS):
        out[:, c:c + CAST_ROWS] = q_c @ r[c:c + CAST_ROWS].to(q_c.dtype).T
    return out


def _times(G: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> None:
    """out = G @ r, r converted block by block like `_scores` when it is narrower than G."""
    if r.dtype == G.dtype:
        torch.mm(G, r, out=out)
        return
    out.zero_()
    for c in range(0, r.shape[0], CAST_ROWS):
        out.addmm_(G[:, c:c + CAST_ROWS], r[c:c + CAST_ROWS].to(G.dtype))


class ChunkedMultiSimilarity(torch.autograd.Function):
    """(q_hat, r_hat) -> (per-anchor loss, counts); pass the same tensor twice in self mode (autograd adds G
    and G^T). With `count`, counts is the (2, N) int64 number of mined positives and negatives per anchor
    (else an empty tensor). r_hat may have a narrower dtype than q_hat when it needs no gradient."""

    @staticmethod
    def forward(ctx, q, r, yq, yr, ref_self_index, hp: HyperParams, chunk: int, count: bool):
        n = q.shape[0]
        loss = torch.empty(n, dtype=q.dtype, device=q.device)
        counts = torch.empty((2, n) if count else (2, 0), dtype=torch.int64, device=q.device)
        stats = torch.empty(N_STATS, n, dtype=q.dtype, device=q.device)
        a, b, base = hp.alpha, hp.beta, hp.base
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            S = _scores(q[s:e], r)
            pos, same = _pair_masks(yq[s:e], yr, None if ref_self_index is None else ref_self_index[s:e])
            min_pos = torch.where(pos, S, float("inf")).amin(dim=1)
            max_neg = torch.where(same, float("-inf"), S).amax(dim=1)
            hard_pos, hard_neg = _hard_masks(S, pos, same, min_pos, max_neg, hp)
            if count:
                counts[0, s:e], counts[1, s:e] = hard_pos.sum(dim=1), hard_neg.sum(dim=1)
            m_pos, m_neg = _row_shifts(min_pos, max_neg, hp)
            # A = m + log(exp(-m) + sum exp(z - m)), z = -a(S - base) on hard positives, b(S - base) on hard negatives
            A = m_pos + torch.log(torch.exp(-m_pos) + _shifted_exp(S, hard_pos, -a, base, m_pos).sum(dim=1))
            B = m_neg + torch.log(torch.exp(-m_neg) + _shifted_exp(S, hard_neg, b, base, m_neg).sum(dim=1))
            lo, hi = torch.aminmax(S, dim=1)  # NaN propagates; +-inf shows in an extreme
            bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
            A, B = A.masked_fill(bad, float("nan")), B.masked_fill(bad, float("nan"))
            loss[s:e] = A / a + B / b
            stats[MIN_POS, s:e], stats[MAX_NEG, s:e] = min_pos, max_neg
            stats[LSE_POS, s:e], stats[LSE_NEG, s:e] = A, B
        ctx.save_for_backward(q, r, yq, yr, ref_self_index, stats)
        ctx.hp, ctx.chunk = hp, chunk
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    @fused_backward("torch")
    def backward(ctx, g, _counts_grad):
        q, r, yq, yr, ref_self_index, stats = ctx.saved_tensors
        hp, chunk = ctx.hp, ctx.chunk
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = q.shape[0]
        a, b, base = hp.alpha, hp.beta, hp.base
        g = g.to(q.dtype)
        dq = torch.empty_like(q) if need_q else None
        dr = torch.zeros_like(r) if need_r else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            S = _scores(q[s:e], r)
            pos, same = _pair_masks(yq[s:e], yr, None if ref_self_index is None else ref_self_index[s:e])
            min_pos, max_neg = stats[MIN_POS, s:e], stats[MAX_NEG, s:e]
            A, B = stats[LSE_POS, s:e], stats[LSE_NEG, s:e]
            hard_pos, hard_neg = _hard_masks(S, pos, same, min_pos, max_neg, hp)
            # docs/semantics.md "Gradient": G_ip = -g exp(-a(S-base) - A), G_in = +g exp(b(S-base) - B), 0 elsewhere
            G = _shifted_exp(S, hard_neg, b, base, B)
            G.sub_(_shifted_exp(S, hard_pos, -a, base, A))
            G.mul_(g[s:e, None])
            G.masked_fill_(bad_rows(stats[:, s:e])[:, None], float("nan"))
            if need_q:
                _times(G, r, dq[s:e])
            if need_r:
                dr.addmm_(G.T, q[s:e])
        return dq, dr, None, None, None, None, None, None


def normalized_inputs(problem: Problem):
    """Upcast to the compute dtype and normalise inside the autograd graph; (q_hat, r_hat, ref_labels).

    A `ref_normalized` reference set (a memory bank's unit rows) is passed on as it is, in its own dtype:
    neither normalised nor converted, so that no copy of it is made."""
    cd = compute_dtype(problem.q.dtype)
    q = problem.q.to(cd)
    r = q if problem.self_mode else problem.ref if problem.ref_normalized else problem.ref.to(cd)
    if problem.hp.normalize:
        q = F.normalize(q, dim=1)
        if problem.self_mode:
            r = q
        elif not problem.ref_normalized:
            r = F.normalize(r, dim=1)
    yr = problem.labels if problem.self_mode else problem.ref_labels
    return q, r, yr


class _Context:
    """What ChunkedMultiSimilarity's forward and backward read and write on ctx, outside autograd."""

    def __init__(self, needs_input_grad: tuple):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _normalize_backward(x: torch.Tensor, x_hat: torch.Tensor, d_hat: torch.Tensor) -> torch.Tensor:
    """docs/semantics.md "Gradient": the chain through x_hat = x / max(|x|, eps), row by row."""
    norm = x.norm(dim=1, keepdim=True)
    along = (x_hat * d_hat).sum(dim=1, keepdim=True)
    return torch.where(norm >= NORM_EPS, (d_hat - x_hat * along) / norm.clamp(min=NORM_EPS), d_hat / NORM_EPS)


def gradients(problem: Problem, g: torch.Tensor, needs: tuple) -> tuple:
    """(dq, dr) of sum_i g_i l_i without autograd (None where `needs` says no), in the inputs' dtypes: for
    callers that run where autograd does not (inside another backend's torch op)."""
    cd = compute_dtype(problem.q.dtype)
    q = problem.q.detach().to(cd)
    need_r = needs[1] and not problem.self_mode
    r = None if problem.self_mode else problem.ref.detach()
    r = None if r is None else (r if problem.ref_normalized else r.to(cd))
    q_hat, r_hat = q, r
    if problem.hp.normalize:
        q_hat = F.normalize(q, dim=1)
        r_hat = None if r is None else (r if problem.ref_normalized else F.normalize(r, dim=1))
    if problem.self_mode:
        r_hat, yr = q_hat, problem.labels
    else:
        yr = problem.ref_labels
    need_r_hat = needs[0] if problem.self_mode else need_r
    chunk = chunk_rows(r_hat.shape[0], cd)
    ctx = _Context((needs[0], need_r_hat))
    with torch.no_grad():
        ChunkedMultiSimilarity.forward(ctx, q_hat, r_hat, problem.labels, yr, problem.ref_self_index, problem.hp,
                                       chunk, False)
        dq_hat, dr_hat = ChunkedMultiSimilarity.backward(ctx, g.to(cd), None)[:2]
    if problem.self_mode and dq_hat is not None:
        dq_hat, dr_hat = dq_hat + dr_hat, None
    dq = dr = None
    if needs[0]:
        dq = (_normalize_backward(q, q_hat, dq_hat) if problem.hp.normalize else dq_hat).to(problem.q.dtype)
    if need_r:
        dr = (_normalize_backward(r, r_hat, dr_hat) if problem.hp.normalize else dr_hat).to(problem.ref.dtype)
    return dq, dr


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Always None: this backend serves every float dtype on every device torch runs on."""
    return None


def per_anchor_loss(problem: Problem, chunk_bytes: Optional[int] = None, count_pairs: bool = False):
    """(N,) per-anchor losses; with `count_pairs` also the (2, N) mined positives and negatives per anchor."""
    q, r, yr = normalized_inputs(problem)
    if problem.self_mode:
        # torch.compile refuses an autograd.Function given one tensor twice; views are distinct inputs
        # (autograd still adds the q and r gradients, i.e. G and G^T)
        r, yr = q.view_as(q), yr.view_as(yr)
    chunk = chunk_rows(r.shape[0], q.dtype, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    loss, counts = ChunkedMultiSimilarity.apply(q, r, problem.labels, yr, problem.ref_self_index, problem.hp,
                                                chunk, count_pairs)
    return (loss, counts) if count_pairs else loss
