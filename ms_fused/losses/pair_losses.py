"""SupCon, NT-Xent and Circle loss as functions of a block of similarities: what makes each loss, for the chunked
`torch` engine (engine/torch/pair_engine.py). docs/semantics.md "Pair-weighting losses" holds the equations.

A loss here is three functions of a block (rows = anchors, columns = the whole reference set) of unit-row
similarities S with its pair masks P and N:
  forward(S, P, N)          -> (per-anchor losses, stats): stats (K, rows), what the backward needs of each row
  pair_weights(S, P, N, st) -> G = d l_i / d S_ij for every entry of the block (0 off the pairs)
  needs_both                   True when a batch with no positive pair or no negative pair at all gives zero
Parameters are validated here, once, for every backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F

SOFTPLUS_THRESHOLD = 20.0  # torch's F.softplus default, which pml's CircleLoss uses


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _lse(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{keep} exp(z); -inf for an empty row."""
    return torch.logsumexp(z.masked_fill(~keep, float("-inf")), dim=1)


def _exp_minus(z: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(z - lse_i) where keep, else 0 (an empty row's lse of -inf never meets a kept entry)."""
    return (z - lse[:, None]).masked_fill_(~keep, float("-inf")).exp_()


@dataclass(frozen=True)
class _Tempered:
    """A loss of the logits S / temperature."""

    temperature: float
    needs_both = True

    def __post_init__(self):
        object.__setattr__(self, "temperature", _positive("temperature", self.temperature))


@dataclass(frozen=True)
class SupCon(_Tempered):
    temperature: float = 0.1
    name = "supcon"

    # L_i = LSE_{P u N} S/t, l_i = L_i - mean_P S/t (P_i non-empty); stats: L_i, |P_i|
    def forward(self, S, pos, neg):
        z = S / self.temperature
        total = _lse(z, pos | neg)
        count = pos.sum(dim=1).to(S.dtype)
        mean_pos = z.masked_fill(~pos, 0.0).sum(dim=1) / count.clamp(min=1)
        return torch.where(count > 0, total - mean_pos, 0.0), torch.stack((total, count))

    # d l_i / d S_ik = (e^{S_ik/t - L_i} [k in P u N] - [k in P] / |P_i|) / t
    def pair_weights(self, S, pos, neg, stats):
        total, count = stats
        G = _exp_minus(S / self.temperature, total, pos | neg)
        G.sub_(pos / count.clamp(min=1)[:, None])
        G.masked_fill_((count == 0)[:, None], 0.0)
        return G.div_(self.temperature)


@dataclass(frozen=True)
class NTXent(_Tempered):
    temperature: float = 0.07
    name = "ntxent"

    # L_i = LSE_N S/t; per positive pair l_ip = log(e^{L_i} + e^{z_ip}) - z_ip; the anchor's loss is their sum.
    # stats: L_i and W_i = sum_p sigmoid(L_i - z_ip), the weight that the negatives' softmax carries
    def forward(self, S, pos, neg):
        z = S / self.temperature
        negatives = _lse(z, neg)
        gap = negatives[:, None] - z
        pair = torch.logaddexp(negatives[:, None], z).sub_(z).masked_fill_(~pos, 0.0)
        weight = torch.sigmoid(gap).masked_fill_(~pos, 0.0).sum(dim=1)
        return pair.sum(dim=1), torch.stack((negatives, weight))

    # d l_i / d S_ip = -sigmoid(L_i - z_ip) / t,  d l_i / d S_in = W_i e^{z_in - L_i} / t
    def pair_weights(self, S, pos, neg, stats):
        negatives, weight = stats
        z = S / self.temperature
        G = _exp_minus(z, negatives, neg).mul_(weight[:, None])
        G.sub_(torch.sigmoid(negatives[:, None] - z).masked_fill_(~pos, 0.0))
        return G.div_(self.temperature)


@dataclass(frozen=True)
class Circle:
    m: float = 0.4
    gamma: float = 80.0
    name = "circle"
    needs_both = False  # an anchor without positives or without negatives has no loss by itself

    def __post_init__(self):
        object.__setattr__(self, "gamma", _positive("gamma", self.gamma))
        m = self.m
        if isinstance(m, bool) or not isinstance(m, Real) or not math.isfinite(float(m)):
            raise TypeError(f"m must be a finite real number, got {m!r}")
        object.__setattr__(self, "m", float(m))

    def _logits(self, S):
        """The terms of A_i and B_i and their detached weights gamma a_ip, gamma a_in."""
        w_pos = torch.relu(1 + self.m - S).mul_(self.gamma)
        w_neg = torch.relu(S + self.m).mul_(self.gamma)
        return -w_pos * (S - (1 - self.m)), w_neg * (S - self.m), w_pos, w_neg

    # A_i = LSE_P -g a_ip (S_ip - 1 + m), B_i = LSE_N g a_in (S_in - m), l_i = softplus(A_i + B_i); stats: A_i, B_i
    def forward(self, S, pos, neg):
        z_pos, z_neg, _, _ = self._logits(S)
        a, b = _lse(z_pos, pos), _lse(z_neg, neg)
        has = pos.any(dim=1) & neg.any(dim=1)
        loss = F.softplus(torch.where(has, a + b, 0.0), threshold=SOFTPLUS_THRESHOLD)
        return torch.where(has, loss, 0.0), torch.stack((a, b))

    # with s = softplus'(A_i + B_i) (1 above the threshold, as torch's): d l_i / d S_ip = -s e^{z_ip - A_i} g a_ip,
    # d l_i / d S_in = s e^{z_in - B_i} g a_in (the weights a held constant)
    def pair_weights(self, S, pos, neg, stats):
        a, b = stats
        has = (a != float("-inf")) & (b != float("-inf"))  # an empty P_i or N_i has an LSE of -inf; NaN stays
        x = torch.where(has, a + b, 0.0)
        slope = torch.where(x > SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(x)).masked_fill_(~has, 0.0)
        z_pos, z_neg, w_pos, w_neg = self._logits(S)
        G = _exp_minus(z_neg, b, neg).mul_(w_neg)
        G.sub_(_exp_minus(z_pos, a, pos).mul_(w_pos))
        return G.mul_(slope[:, None])


LOSSES = {"supcon": SupCon, "ntxent": NTXent, "circle": Circle}
