"""SupCon, NT-Xent and Circle loss: functional forms and pml-named modules (docs/semantics.md "Pair-weighting losses").

Served by the `triton` backend (fused GPU kernels on the MS loss's engine; engine/triton/pair_kernels.py +
pair_engine.py), the `cpp` backend (fused row passes on the CPU; csrc/cpu/pair_rows.cpp +
engine/cpp/pair_engine.py), the `torch` backend (chunked, O(N·D) beyond a bounded scratch block; pair_losses.py +
engine/torch/pair_engine.py) and the dense `reference` backend; `backend="auto"` takes `triton` on a GPU where it
serves (backends.resolve's rule), `cpp` on the CPU where it is built, else `torch`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine._autograd import autocast_off
from ..engine._inputs import (HyperParams, check_backend_name, check_inputs, check_reduction, refuse_indices_tuple,
                              ALL_PAIRS)
from .pair_losses import LOSSES
from .pair_reference import pair_loss as reference_pair_loss
from ..engine import backends
from ..engine.cpp import pair_engine as cpp_pair_engine
from ..engine.torch import pair_engine as torch_pair_engine

PAIR_BACKENDS = ("triton", "cpp", "torch", "reference")


def reduction_terms(name: str, per_anchor: torch.Tensor, pairs: torch.Tensor, reduction: str):
    """(numerator, denominator) of pml's "mean" (`reduction`) or of "sum" (denominator None), from the per-anchor
    losses and the number of positive pairs `pairs` (a 0-dim tensor): NT-Xent's mean over positive pairs, else
    the mean over anchors whose loss is > 0 (AvgNonZeroReducer; a NaN anchor is kept, so the loss is NaN)."""
    if reduction == "sum":
        return per_anchor.sum(), None
    if name == "ntxent":
        return per_anchor.sum(), pairs
    kept = ~(per_anchor <= 0)
    return torch.where(kept, per_anchor, 0.0).sum(), kept.sum()


def reduce_pair_losses(name: str, per_anchor: torch.Tensor, pairs: torch.Tensor, reduction: str) -> torch.Tensor:
    """pml's reductions of the per-anchor losses (see reduction_terms; `pairs` = |P_i| per anchor). A batch
    without any term to average gives an attached zero."""
    if reduction == "none":
        return per_anchor
    num, den = reduction_terms(name, per_anchor, pairs.sum(), reduction)
    return num if den is None else num / den.clamp(min=1)


def check_pair_backend(name: str, backend: str) -> str:
    """The backend name, "auto" kept; an unknown one raises ValueError."""
    return check_backend_name(backend)


def resolve_pair_backend(name: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": `triton` on a GPU where it serves and "auto" does not pass it over (as for the MS loss), `cpp` on
    the CPU where its extension is built, else `torch`; a named backend that cannot serve (device, dtype)
    raises ValueError saying why."""
    backend = check_pair_backend(name, backend)
    if backend == "auto":
        if device.type == "cpu":
            return "cpp" if cpp_pair_engine.unavailable_reason(device, dtype) is None else "torch"
        if (device.type == "cuda" and backends.unavailable_reason("triton", device, dtype) is None
                and backends._auto_skip_reason("triton", device, dtype) is None):
            return "triton"
        return "torch"
    if backend == "cpp":
        reason = cpp_pair_engine.unavailable_reason(device, dtype)
    elif backend == "triton":
        reason = backends.unavailable_reason("triton", device, dtype)
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot serve {dtype} tensors on {device}: {reason}")
    return backend


def pair_weighting_loss(name: str, embeddings, labels, ref_emb=None, ref_labels=None, *, reduction="mean",
                        backend="auto", ref_self_index=None, ref_normalized=False, **params):
    """The pair-weighting loss `name` ("supcon", "ntxent", "circle") with its parameters (pml's defaults).

    Returns a float32 scalar (float64 for float64 inputs), or the (N,) per-anchor losses when reduction="none"
    (NT-Xent: the sum of each anchor's positive pairs' losses). Raises ValueError/TypeError on bad input before
    any computation. `ref_normalized=True` declares a constant `ref_emb` of unit rows (a memory bank's), used as
    given by the fused backends."""
    if name not in LOSSES:
        raise ValueError(f"unknown pair-weighting loss {name!r}; one of {tuple(LOSSES)}")
    return loss_value(LOSSES[name](**params), embeddings, labels, ref_emb, ref_labels, check_reduction(reduction),
                      check_pair_backend(name, backend), ref_self_index, ref_normalized)


def loss_value(loss, embeddings, labels, ref_emb, ref_labels, reduction: str, backend: str, ref_self_index,
               ref_normalized: bool):
    """pair_weighting_loss for a validated loss of pair_losses.py, reduction and backend name (the modules validate
    them once, in __init__, so that a compiled forward does not trace the checks)."""
    problem = check_inputs(embeddings, labels, ref_emb, ref_labels, ref_self_index, HyperParams(), ref_normalized)
    backend = resolve_pair_backend(loss.name, backend, problem.q.device, problem.q.dtype)
    with autocast_off(problem.q.device):
        if backend == "reference":
            params = {k: getattr(loss, k) for k in loss.__dataclass_fields__}
            return reference_pair_loss(loss.name, problem.q, problem.labels, problem.ref, problem.ref_labels,
                                       reduction=reduction, ref_self_index=problem.ref_self_index, **params)
        engine = {"cpp": cpp_pair_engine, "torch": torch_pair_engine}.get(backend) or _triton_engine()
        per_anchor, counts = engine.per_anchor_loss(problem, loss)
        if loss.needs_both:  # pml's guard: no positive pair or no negative pair in the whole batch gives zero
            keep = (counts[0].sum() > 0) & (counts[1] > 0).any()
            per_anchor = torch.where(keep, per_anchor, 0.0)
        return reduce_pair_losses(loss.name, per_anchor, counts[0], reduction)


def _triton_engine():
    from ..engine.triton import pair_engine as triton_pair_engine  # imports triton: only when asked for
    return triton_pair_engine


def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, reduction="mean",
                backend="auto", ref_self_index=None):
    """Supervised contrastive loss (Khosla et al. 2020), pml's `SupConLoss` convention; see pair_weighting_loss."""
    return pair_weighting_loss("supcon", embeddings, labels, ref_emb, ref_labels, reduction=reduction,
                               backend=backend, ref_self_index=ref_self_index, temperature=temperature)


def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, reduction="mean",
                backend="auto", ref_self_index=None):
    """NT-Xent (InfoNCE with labels), pml's `NTXentLoss` convention; see pair_weighting_loss."""
    return pair_weighting_loss("ntxent", embeddings, labels, ref_emb, ref_labels, reduction=reduction,
                               backend=backend, ref_self_index=ref_self_index, temperature=temperature)


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0, reduction="mean",
                backend="auto", ref_self_index=None):
    """Circle loss (Sun et al. 2020), pml's `CircleLoss` convention; see pair_weighting_loss."""
    return pair_weighting_loss("circle", embeddings, labels, ref_emb, ref_labels, reduction=reduction,
                               backend=backend, ref_self_index=ref_self_index, m=m, gamma=gamma)


class _PairWeightingLoss(nn.Module):
    """pml's call: `loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`."""

    name = ""

    def __init__(self, reduction="mean", backend="auto", **params):
        super().__init__()
        self.loss = LOSSES[self.name](**params)
        self.params = {k: getattr(self.loss, k) for k in params}
        self.reduction = check_reduction(reduction)
        self.backend = check_pair_backend(type(self).__name__, backend)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, ref_self_index=None,
                ref_normalized=False):
        refuse_indices_tuple(indices_tuple, type(self).__name__, ALL_PAIRS)
        return loss_value(self.loss, embeddings, labels, ref_emb, ref_labels, self.reduction, self.backend,
                          ref_self_index, ref_normalized)

    def extra_repr(self) -> str:
        kwargs = {**self.params, "reduction": self.reduction, "backend": self.backend}
        return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


class SupConLoss(_PairWeightingLoss):
    """Drop-in for pml's `SupConLoss(temperature=0.1)`."""

    name = "supcon"

    def __init__(self, temperature=0.1, *, reduction="mean", backend="auto"):
        super().__init__(reduction, backend, temperature=temperature)


class NTXentLoss(_PairWeightingLoss):
    """Drop-in for pml's `NTXentLoss(temperature=0.07)`."""

    name = "ntxent"

    def __init__(self, temperature=0.07, *, reduction="mean", backend="auto"):
        super().__init__(reduction, backend, temperature=temperature)


class CircleLoss(_PairWeightingLoss):
    """Drop-in for pml's `CircleLoss(m=0.4, gamma=80)`."""

    name = "circle"

    def __init__(self, m=0.4, gamma=80.0, *, reduction="mean", backend="auto"):
        super().__init__(reduction, backend, m=m, gamma=gamma)
