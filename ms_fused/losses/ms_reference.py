"""The `reference` backend: dense, line by line docs/semantics.md, differentiated by autograd. The oracle of every test,
and the backend whose gradient is itself differentiable (double backward).

With S_ij = <q_hat_i, r_hat_j>, the pair sets P_i (same label, own copy removed by index) and N_i (other
label), and, when mining, the hard sets
    N^_i = {n in N_i : S_in + eps > min_{p in P_i} S_ip},   P^_i = {p in P_i : S_ip - eps < max_{n in N_i} S_in},
the loss of anchor i is
    l_i = (1/alpha) log(1 + sum_{p in P^_i} exp(-alpha (S_ip - base))) + (1/beta) log(1 + sum_{n in N^_i} exp(beta (S_in - base)))
and, with g_i = dL/dl_i, its gradient is dL/dS = G with (masks held constant)
    G_ip = -g_i exp(-alpha (S_ip - base) - A_i),  A_i = log(1 + sum_{p in P^_i} exp(-alpha (S_ip - base)))
    G_in = +g_i exp(beta (S_in - base) - B_i),    B_i = log(1 + sum_{n in N^_i} exp(beta (S_in - base)))
so that dL/dq_hat = G r_hat and dL/dr_hat = G^T q_hat ((G + G^T) x_hat in self mode). Here autograd derives
G from the lines below; the fused backends compute it from these equations.

It materialises several N x M matrices on purpose: clarity over speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..engine._autograd import autocast_off
from ..engine._inputs import HyperParams, Problem, compute_dtype


class FullPrecisionMatmul(torch.autograd.Function):
    """a @ b whose gradients, of every order, are computed with autocast off as well.

    A plain `@` is differentiated under whatever autocast state `backward()` is called in, so a backward
    inside an autocast region would compute the gradient's products in float16/bfloat16.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with autocast_off(a.device):
            return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        with autocast_off(g.device):  # the products below are recorded too when create_graph=True
            da = FullPrecisionMatmul.apply(g, b.mT) if ctx.needs_input_grad[0] else None
            db = FullPrecisionMatmul.apply(a.mT, g) if ctx.needs_input_grad[1] else None
        return da, db


def log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum_{keep} exp(z)), shifted by m = max(0, max z); empty rows give exactly 0."""
    z = z.masked_fill(~keep, float("-inf"))
    m = z.amax(dim=1).clamp(min=0).detach()
    return m + torch.log(torch.exp(-m) + torch.exp(z - m[:, None]).sum(dim=1))


def pair_masks(yq: torch.Tensor, yr: torch.Tensor, ref_self_index: Optional[torch.Tensor]):
    """P (same label, own copy removed by index) and N (different label), each (N, M) bool."""
    same = yq[:, None] == yr[None, :]
    pos = same.clone()
    if ref_self_index is not None:
        rows = torch.nonzero(ref_self_index >= 0).flatten()
        pos[rows, ref_self_index[rows]] = False
    return pos, ~same


def mined_masks(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, hp: HyperParams):
    """docs/semantics.md "Mining": hard negatives beat the weakest positive by eps, hard positives the strongest negative."""
    if not hp.mining:
        return pos, neg
    min_pos = S.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    max_neg = S.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    hard_pos = pos & (S - hp.epsilon < max_neg)
    hard_neg = neg & (S + hp.epsilon > min_pos)
    return hard_pos, hard_neg


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Always None: this backend serves every float dtype on every device torch runs on."""
    return None


def per_anchor_loss(problem: Problem, count_pairs: bool = False):
    """(N,) per-anchor losses; with `count_pairs` also the (2, N) int64 mined positives and negatives per anchor."""
    hp = problem.hp
    cd = compute_dtype(problem.q.dtype)
    q = problem.q.to(cd)
    r = q if problem.self_mode else problem.ref.to(cd)
    yr = problem.labels if problem.self_mode else problem.ref_labels
    if hp.normalize:
        q_hat = F.normalize(q, dim=1)
        r_hat = q_hat if problem.self_mode else r if problem.ref_normalized else F.normalize(r, dim=1)
    else:
        q_hat, r_hat = q, r
    S = FullPrecisionMatmul.apply(q_hat, r_hat.T)

    pos, neg = pair_masks(problem.labels, yr, problem.ref_self_index)
    hard_pos, hard_neg = mined_masks(S.detach(), pos, neg, hp)
    pos_term = log1p_sum_exp(-hp.alpha * (S - hp.base), hard_pos) / hp.alpha
    neg_term = log1p_sum_exp(hp.beta * (S - hp.base), hard_neg) / hp.beta
    loss = pos_term + neg_term

    # docs/semantics.md "Non-finite inputs": an anchor whose similarity row touches NaN/Inf gets NaN (value and gradient),
    # so a non-finite embedding can never be mined away into a finite loss.
    bad = ~torch.isfinite(S.detach()).all(dim=1)
    nan_if_bad = torch.zeros_like(loss).masked_fill(bad, float("nan"))
    loss = loss + S.sum(dim=1) * nan_if_bad
    if count_pairs:
        return loss, torch.stack((hard_pos.sum(dim=1), hard_neg.sum(dim=1)))
    return loss
