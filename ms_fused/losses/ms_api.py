"""The functional entry point: validate, pick a backend, reduce."""
from __future__ import annotations

import torch

from ..engine import backends
from ..engine._autograd import autocast_off
from ..engine._inputs import (check_flag, check_backend_name, check_finite_inputs, check_hyperparams, check_inputs,
                              check_reduction)
from ..engine.stats import PairStats, pair_stats


def reduce_losses(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    # "mean" divides by all N anchors, anchors without pairs included (as both reference codes do)
    return total / losses.shape[0] if reduction == "mean" else total


def multi_similarity_loss(
    embeddings,
    labels,
    ref_emb=None,
    ref_labels=None,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=0.1,
    mining=True,
    normalize=True,
    reduction="mean",
    backend="auto",
    ref_self_index=None,
    check_finite=False,
    return_stats=False,
    ref_normalized=False,
):
    """Multi-Similarity loss (Wang et al., CVPR 2019) with its hard-pair miner; see docs/semantics.md.

    Returns a float32 scalar (float64 for float64 inputs), or the (N,) per-anchor losses when
    reduction="none"; with `return_stats=True`, `(loss, stats)` where `stats` is a `PairStats` of the
    mining counts (0-dim int64 tensors, counted inside the forward, no host sync).
    `ref_normalized=True` declares that the rows of a constant `ref_emb` are already unit rows (a memory
    bank's): they are used as given, never normalised or copied again. Raises ValueError/TypeError on bad
    input before any computation.
    """
    hp = check_hyperparams(alpha, beta, base, epsilon, mining, normalize)
    reduction = check_reduction(reduction)
    backend = check_backend_name(backend)
    check_finite = check_flag("check_finite", check_finite)
    return_stats = check_flag("return_stats", return_stats)
    problem = check_inputs(embeddings, labels, ref_emb, ref_labels, ref_self_index, hp, ref_normalized)
    impl = backends.resolve(backend, problem.q.device, problem.q.dtype)
    if check_finite:
        check_finite_inputs(problem)
    with autocast_off(problem.q.device):
        if not return_stats:
            return reduce_losses(impl.per_anchor_loss(problem), reduction)
        losses, counts = impl.per_anchor_loss(problem, count_pairs=True)
        return reduce_losses(losses, reduction), pair_stats(counts)


__all__ = ["multi_similarity_loss", "reduce_losses", "PairStats"]
