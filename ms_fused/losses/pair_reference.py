"""The `reference` form of the General Pair Weighting losses beside MS: SupCon, NT-Xent and Circle, dense, line by
line docs/semantics.md ("Pair-weighting losses"), differentiated by autograd. The oracle that the other backends
of these losses are tested against, and their `backend="reference"` (ms_fused/losses/pair_api.py).

Every loss here is a function of per-anchor statistics over the anchor's positive pairs P_i and negative pairs
N_i (the pair sets of MS, docs/semantics.md "Pair sets"; no mining), then of a per-anchor loss and a reduction:
    SupCon   L_i = LSE_{k in P_i u N_i} S_ik / t,  l_i = L_i - mean_{p in P_i} S_ip / t          (P_i non-empty)
    NT-Xent  L_i = LSE_{n in N_i} S_in / t,        l_ip = softplus(L_i - S_ip / t)  per positive pair (i, p)
    Circle   A_i = LSE_{p in P_i} -g a_ip (S_ip - 1 + m),  B_i = LSE_{n in N_i} g a_in (S_in - m),
             l_i = softplus(A_i + B_i)  (P_i and N_i non-empty), a_ip = relu(1 + m - S_ip), a_in = relu(S_in + m)
             held constant (detached)
with pml's reductions: SupCon and Circle average the per-anchor losses that are > 0 (pml's AvgNonZeroReducer),
NT-Xent averages over positive pairs; a batch with no positive pair (SupCon, NT-Xent: or no negative pair) gives an
attached zero.

It materialises several N x M matrices on purpose: clarity over speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ms_reference import FullPrecisionMatmul, pair_masks

PAIR_LOSSES = ("supcon", "ntxent", "circle")
DEFAULTS = {"supcon": dict(temperature=0.1), "ntxent": dict(temperature=0.07), "circle": dict(m=0.4, gamma=80.0)}


def similarities(embeddings, labels, ref_emb=None, ref_labels=None, ref_self_index: Optional[torch.Tensor] = None):
    """S (N, M) of unit rows in the inputs' compute dtype, and the pair masks P, N (self mode: R = Q, i = j removed)."""
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    q = F.normalize(embeddings.to(dtype), dim=1)
    if ref_emb is None:
        r, yr = q, labels
        ref_self_index = torch.arange(q.shape[0], device=q.device)
    else:
        r, yr = F.normalize(ref_emb.to(dtype), dim=1), ref_labels
    s = FullPrecisionMatmul.apply(q, r.mT)
    pos, neg = pair_masks(labels, yr, ref_self_index)
    return s, pos, neg


def masked_lse(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{keep} exp(z); an empty row gives 0 (as pml's logsumexp without its added one)."""
    out = torch.logsumexp(z.masked_fill(~keep, float("-inf")), dim=1)
    return out.masked_fill(~keep.any(dim=1), 0.0)


def supcon_terms(s, pos, neg, temperature: float):
    """Per-anchor l_i (0 without positives) and the anchors that have a loss."""
    z = s / temperature
    total = masked_lse(z, pos | neg)
    count = pos.sum(dim=1)
    mean_pos = torch.where(pos, z, torch.zeros_like(z)).sum(dim=1) / count.clamp(min=1)
    has = count > 0
    return torch.where(has, total - mean_pos, torch.zeros_like(total)), has


def ntxent_terms(s, pos, neg, temperature: float):
    """Per-anchor sum of its positive pairs' losses, and its number of positive pairs."""
    z = s / temperature
    negatives = torch.logsumexp(z.masked_fill(~neg, float("-inf")), dim=1)  # -inf without negatives
    # -log(e^{z_p} / (e^{z_p} + sum_n e^{z_n})) = log(e^{L} + e^{z_p}) - z_p; exact where F.softplus returns its
    # argument above 20 (2e-9 absolute: 1e-10 of a hard positive's loss)
    pair = torch.logaddexp(negatives[:, None], z) - z
    return torch.where(pos, pair, torch.zeros_like(pair)).sum(dim=1), pos.sum(dim=1)


def circle_terms(s, pos, neg, m: float, gamma: float):
    """Per-anchor l_i (0 unless the anchor has positive and negative pairs) and the anchors that have a loss."""
    a_pos = torch.relu(1 + m - s.detach())
    a_neg = torch.relu(s.detach() + m)
    lse_pos = masked_lse(-gamma * a_pos * (s - (1 - m)), pos)
    lse_neg = masked_lse(gamma * a_neg * (s - m), neg)
    has = pos.any(dim=1) & neg.any(dim=1)
    # F.softplus as pml's (its argument above 20 returned as is)
    return torch.where(has, F.softplus(lse_pos + lse_neg), torch.zeros_like(lse_pos)), has


def pair_loss(name: str, embeddings, labels, ref_emb=None, ref_labels=None, *, reduction: str = "mean",
              ref_self_index: Optional[torch.Tensor] = None, **params):
    """The loss `name` (one of PAIR_LOSSES) with pml's reduction ("mean"), the sum of the per-anchor losses
    ("sum"), or the per-anchor losses ("none"; NT-Xent: the sum of each anchor's positive pairs' losses)."""
    params = {**DEFAULTS[name], **params}
    s, pos, neg = similarities(embeddings, labels, ref_emb, ref_labels, ref_self_index)
    zero = (embeddings * 0).sum().to(s.dtype)  # pml's zero: attached, every gradient 0
    terms = {"supcon": supcon_terms, "ntxent": ntxent_terms, "circle": circle_terms}
    if name not in terms:
        raise ValueError(f"unknown pair loss {name!r}; one of {PAIR_LOSSES}")
    per_anchor, count = terms[name](s, pos, neg, **params)
    if name != "circle" and not (pos.any() and neg.any()):
        per_anchor = per_anchor * 0
    if reduction in ("none", "sum"):
        return per_anchor if reduction == "none" else per_anchor.sum()
    if name == "ntxent":  # the mean over positive pairs
        return per_anchor.sum() / count.sum() if pos.any() and neg.any() else zero
    # the mean over anchors whose loss is > 0 (pml's AvgNonZeroReducer); a NaN anchor is kept: the loss is NaN
    kept = ~(per_anchor <= 0)
    return per_anchor[kept].mean() if kept.any() else zero
