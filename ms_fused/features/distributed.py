"""The MS loss of a batch split over `torch.distributed` ranks, with the exact gradient of the global loss, and
one cross-batch memory shared by all ranks (`CrossBatchMemory`, at the end); the same for SupCon, NT-Xent and
Circle loss (`supcon_loss`, `ntxent_loss`, `circle_loss`; no shared memory for them yet).

Contract (reduction "mean" or "sum"): with X the concatenation of every rank's embeddings in rank order
(local batch sizes may differ, a rank may hold no rows), every rank gets the value of
`multi_similarity_loss(X, y)` and, after every rank calls `.backward()` on it, each rank's embeddings
receive exactly the rows of the single-process gradient dL/dX that belong to it.

How: each rank scores its own anchors against the all-gathered X, its own rows excluded by index
(`ref_self_index`). The gather's backward sums the reference-side gradients of all ranks (all_reduce)
and hands each rank its slice, so a row gets its anchor-side gradient locally and its reference-side
gradient from every rank's anchors. The returned value is the sum over ranks of the local anchors'
losses, but only the local part carries gradient, so the global gradient is not counted world-size times.

DistributedDataParallel averages parameter gradients over ranks: with this loss each rank's backward
already yields its share of the global gradient, and the shares must be *summed*. Multiply the loss by
the world size before `.backward()` (`(loss * dist.get_world_size(group)).backward()`) to get exactly
the gradient of single-process training on the concatenated batch.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ..engine import backends
from ..engine._inputs import FLOAT_DTYPES, check_labels, check_reduction, compute_dtype, refuse_indices_tuple
from ..losses.ms_api import multi_similarity_loss as _local_loss
from ..losses.ms_module import MultiSimilarityLoss
from ..losses.pair_api import check_pair_backend, pair_weighting_loss as _local_pair_loss, reduction_terms
from ..losses.pair_losses import LOSSES
from .xbm import CrossBatchMemory as _LocalMemory

# what one rank tells the others before any row moves: rows, dim, dtype, inputs accepted
_META = 4


def _comm_device(group, embeddings) -> torch.device:
    if isinstance(embeddings, torch.Tensor):
        return embeddings.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ms_options(loss_kwargs) -> dict:
    return MultiSimilarityLoss(**loss_kwargs).kwargs  # rejects unknown names and bad hyper-parameters


def _check_local(embeddings, labels, loss_kwargs, check_options=_ms_options) -> dict:
    """Validate this rank's inputs and options (as the single-process loss would, but an empty batch is allowed);
    returns the validated loss options (`check_options(loss_kwargs)`: a dict with backend and check_finite)."""
    options = check_options(loss_kwargs)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be 2-D (rows, dim) with dim >= 1, got shape {tuple(embeddings.shape)}")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embeddings must have dtype float16, bfloat16, float32 or float64, got {embeddings.dtype}")
    check_labels("labels", labels, embeddings.shape[0], "embeddings")
    if labels.device != embeddings.device:
        raise ValueError(f"labels is on {labels.device} but embeddings is on {embeddings.device}")
    backends.resolve(options["backend"], embeddings.device, embeddings.dtype)
    if options["check_finite"] and not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings contains NaN or Inf (check_finite=True)")
    return options


def _exchange_meta(embeddings, labels, loss_kwargs, group, extra_check=None, check_options=_ms_options):
    """Every rank validates its inputs (and runs `extra_check(embeddings)`), then all learn each other's (rows,
    dim, dtype, ok); all ranks raise together when any rank's inputs are bad, so a bad rank never leaves the
    others waiting in a collective."""
    error, options = None, None
    try:
        options = _check_local(embeddings, labels, loss_kwargs, check_options)
        if extra_check is not None:
            extra_check(embeddings)
    except (TypeError, ValueError) as exc:
        error = exc
    device = _comm_device(group, embeddings)
    mine = torch.zeros(_META, dtype=torch.int64, device=device)
    if error is None:
        mine[0], mine[1] = embeddings.shape[0], embeddings.shape[1]
        mine[2], mine[3] = FLOAT_DTYPES.index(embeddings.dtype), 1
    metas = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(metas, mine, group=group)
    metas = torch.stack(metas).cpu()
    if error is not None:
        raise error
    bad = torch.nonzero(metas[:, 3] == 0).flatten().tolist()
    if bad:
        raise ValueError(f"the inputs of rank(s) {bad} of the group were rejected (see their error)")
    if (metas[:, 1] != metas[0, 1]).any() or (metas[:, 2] != metas[0, 2]).any():
        shapes = [(int(d), str(FLOAT_DTYPES[int(t)])) for d, t in metas[:, 1:3]]
        raise ValueError(f"every rank must pass embeddings of one dim and dtype, got (dim, dtype) per rank {shapes}")
    sizes = metas[:, 0].tolist()
    if sum(sizes) == 0:
        raise ValueError("the global batch is empty: every rank passed embeddings with 0 rows")
    return sizes, options


def _all_gather_rows(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenation of every rank's rows; `all_gather` needs equal shapes, so pad to the largest and cut."""
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows. Backward: the sum over ranks of the gradient of the gathered tensor,
    cut to this rank's rows (each rank's anchors send gradient into every rank's references)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None, None


def _sum_over_ranks(local_sum: torch.Tensor, group) -> torch.Tensor:
    """Σ over ranks in rank order, so that every rank holds the same bits."""
    parts = [torch.empty_like(local_sum) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local_sum.detach().contiguous(), group=group)
    return torch.stack(parts).sum()


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                          **loss_kwargs) -> torch.Tensor:
    """MS loss of the global batch (all ranks' rows concatenated in rank order); call it on every rank of `group`.

    `loss_kwargs` are those of `ms_fused.multi_similarity_loss` (alpha, beta, base, epsilon, mining,
    normalize, reduction, backend, check_finite). Reductions "mean" (÷ global batch size) and "sum" return
    the global value on every rank; "none" returns this rank's anchors' losses. Every rank must call
    `.backward()` on the result (the backward runs a collective), with the same `requires_grad` setting.
    """
    sizes, options = _exchange_meta(embeddings, labels, loss_kwargs, group)
    rank = dist.get_rank(group)
    reduction = options.pop("reduction")
    labels = labels.to(torch.int64)
    all_rows = _GatherRows.apply(embeddings, sizes, rank, group)
    all_labels = _all_gather_rows(labels, sizes, group)
    n_local, start = embeddings.shape[0], sum(sizes[:rank])
    if n_local == 0:
        # nothing to score here, but the gather's backward must still run on this rank (it is a collective)
        per_anchor = all_rows[:0].sum(dim=1).to(compute_dtype(embeddings.dtype))
    else:
        ref_self_index = start + torch.arange(n_local, device=embeddings.device)
        per_anchor = _local_loss(embeddings, labels, all_rows, all_labels, ref_self_index=ref_self_index,
                                 reduction="none", **options)
    if reduction == "none":
        return per_anchor
    local_sum = per_anchor.sum()
    # value: the global sum (same bits on every rank); gradient: only the local anchors' part
    total = _sum_over_ranks(local_sum, group) + (local_sum - local_sum.detach())
    return total / sum(sizes) if reduction == "mean" else total


def pair_weighting_loss(name: str, embeddings: torch.Tensor, labels: torch.Tensor,
                        group: Optional[dist.ProcessGroup] = None, *, reduction: str = "mean", backend: str = "auto",
                        **params) -> torch.Tensor:
    """SupCon, NT-Xent or Circle loss (`name`: "supcon", "ntxent", "circle"; `params` as `ms_fused.supcon_loss`'s
    ...) of the global batch, as `multi_similarity_loss` above: every rank gets the value of the single-process
    loss on the concatenated batch (pml's reduction: the global sum over the global count of positive pairs or
    of anchors with a loss > 0), and its rows the single-process gradient. Call it on every rank of `group`."""
    def check_options(_):
        LOSSES[name](**params)
        return dict(backend=check_pair_backend(name, backend), reduction=check_reduction(reduction),
                    check_finite=False)

    sizes, options = _exchange_meta(embeddings, labels, {}, group, check_options=check_options)
    rank = dist.get_rank(group)
    labels = labels.to(torch.int64)
    all_rows = _GatherRows.apply(embeddings, sizes, rank, group)
    all_labels = _all_gather_rows(labels, sizes, group)
    n_local, start = embeddings.shape[0], sum(sizes[:rank])
    if n_local == 0:  # the gather's backward must still run on this rank (a collective)
        per_anchor = all_rows[:0].sum(dim=1).to(compute_dtype(embeddings.dtype))
    else:
        ref_self_index = start + torch.arange(n_local, device=embeddings.device)
        per_anchor = _local_pair_loss(name, embeddings, labels, all_rows, all_labels, reduction="none",
                                      backend=options["backend"], ref_self_index=ref_self_index, **params)
    if reduction == "none":
        return per_anchor
    classes, sizes_of_class = torch.unique(all_labels, return_counts=True)
    pairs = (sizes_of_class[torch.searchsorted(classes, labels)] - 1).sum()  # the local anchors' positive pairs
    num, den = reduction_terms(name, per_anchor, pairs, reduction)
    total = _sum_over_ranks(num, group) + (num - num.detach())
    return total if den is None else total / _sum_over_ranks(den.to(total.dtype), group).clamp(min=1)


def supcon_loss(embeddings, labels, group=None, *, temperature=0.1, reduction="mean", backend="auto"):
    """`ms_fused.supcon_loss` of the global batch; see pair_weighting_loss."""
    return pair_weighting_loss("supcon", embeddings, labels, group, reduction=reduction, backend=backend,
                               temperature=temperature)


def ntxent_loss(embeddings, labels, group=None, *, temperature=0.07, reduction="mean", backend="auto"):
    """`ms_fused.ntxent_loss` of the global batch; see pair_weighting_loss."""
    return pair_weighting_loss("ntxent", embeddings, labels, group, reduction=reduction, backend=backend,
                               temperature=temperature)


def circle_loss(embeddings, labels, group=None, *, m=0.4, gamma=80.0, reduction="mean", backend="auto"):
    """`ms_fused.circle_loss` of the global batch; see pair_weighting_loss."""
    return pair_weighting_loss("circle", embeddings, labels, group, reduction=reduction, backend=backend, m=m,
                               gamma=gamma)


class CrossBatchMemory(_LocalMemory):
    """`ms_fused.CrossBatchMemory` over the ranks of `group`: one memory, bitwise identical on every rank.

    Same constructor as `ms_fused.CrossBatchMemory`, plus `group` (default: the default process group). Call
    it on every rank of `group` with that rank's batch (local batch sizes may differ; a rank may pass 0 rows).
    Each call all-gathers the global batch X (all ranks' rows in rank order), every rank enqueues X the same
    way, and each rank scores its local anchors against the memory, their own copies removed by index.

    Value: with reduction "mean" or "sum", every rank gets the loss of single-process `CrossBatchMemory` fed
    X (the same bits on every rank); "none" returns this rank's anchors' losses. Gradient: the memory is a
    constant, so a row's gradient comes from its own anchor term alone; each rank's embeddings receive exactly
    their rows of the single-process gradient dL/dX (only the local part of the value carries gradient, and
    the backward runs no collective). Under DistributedDataParallel, which averages parameter gradients over
    ranks, multiply the loss by the world size before `.backward()` to get the single-process gradient, as for
    `multi_similarity_loss` above. Bad input on any rank (or check_finite failing) raises on every rank before
    any rank writes its memory. `self.loss` holds the local anchors' mining statistics.
    """

    def __init__(self, memory_size: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 group: Optional[dist.ProcessGroup] = None, **loss_kwargs):
        if "loss" in loss_kwargs:
            raise TypeError("ms_fused.distributed.CrossBatchMemory serves the MS loss only so far (it takes "
                            "MultiSimilarityLoss's keywords, not loss=); a memory bank of SupConLoss, NTXentLoss or "
                            "CircleLoss runs on one process: ms_fused.CrossBatchMemory(size, dim, loss=...)")
        options = MultiSimilarityLoss(**loss_kwargs).kwargs
        local_kwargs = dict(loss_kwargs, reduction="none")  # per-anchor losses, reduced over ranks here
        super().__init__(memory_size, embedding_dim, dtype=dtype, device=device, **local_kwargs)
        self.reduction = options["reduction"]
        self.group = group
        self._loss_kwargs = dict(loss_kwargs)

    def _check_dim(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[1] != self.memory.shape[1]:
            raise ValueError(f"embeddings must have embedding_dim = {self.memory.shape[1]} columns, "
                             f"got {embeddings.shape[1]}")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        refuse_indices_tuple(indices_tuple, type(self).__name__)
        sizes, _ = _exchange_meta(embeddings, labels, self._loss_kwargs, self.group, extra_check=self._check_dim)
        rank = dist.get_rank(self.group)
        if self.memory.device != embeddings.device:
            self.to(embeddings.device)
        labels = labels.to(torch.int64)
        slots = self.enqueue(_all_gather_rows(embeddings.detach(), sizes, self.group),
                             _all_gather_rows(labels, sizes, self.group))
        start, n_local = sum(sizes[:rank]), embeddings.shape[0]
        if n_local == 0:
            per_anchor = embeddings.sum(dim=1).to(compute_dtype(self.memory.dtype))
        else:
            per_anchor = self.score(embeddings, labels, slots[start:start + n_local])
        if self.reduction == "none":
            return per_anchor
        local_sum = per_anchor.sum()
        total = _sum_over_ranks(local_sum, self.group) + (local_sum - local_sum.detach())
        return total / sum(sizes) if self.reduction == "mean" else total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}, group={self.group!r}"
