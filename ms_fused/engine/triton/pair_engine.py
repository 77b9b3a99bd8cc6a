"""The `triton` backend of the pair-weighting losses: pair_kernels.py launched on the MS loss's plan
(backend.make_plan: label order, bands, row norms; its tile configurations and column splits), with a
hand-written backward that recomputes each tile of S. Memory beyond the inputs is O(N·D): per-anchor
statistics, column-split partials, and the backward's float32 partial sums (backend.backward_splits).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import backend as tb
from .._autograd import fused_backward
from .._inputs import HyperParams, Problem

try:
    import triton
    from . import pair_kernels as kernels
except Exception:  # backend.unavailable_reason says why
    triton = kernels = None

LOSS_IDS = {"supcon": 0, "ntxent": 1, "circle": 2}  # pair_kernels' SUPCON, NTXENT, CIRCLE
# rows of the saved statistics (pair_kernels' docstring): the weight's factor, the positives' and the
# negatives' base-2 exponent offsets, one loss-specific value
FACTOR, OFFSET_POS, OFFSET_NEG, EXTRA = range(4)
N_PAIR_STATS = 4
_HP = HyperParams()  # the plan's switches: normalised S; the MS hyper-parameters themselves are unread


def kernel_params(loss) -> tuple:
    """(LOSS, p0, p1) of a losses/pair_losses.py loss, as the kernels take them."""
    if loss.name == "circle":
        return LOSS_IDS["circle"], loss.gamma, loss.m
    return LOSS_IDS[loss.name], loss.temperature, 0.0


def weight_bound(loss, stats: torch.Tensor) -> torch.Tensor:
    """Per anchor, a bound on |dl_i/dS_ij| / |FACTOR_i| over its pairs: 1 for SupCon (e^(z - L) - 1/|P| lies
    in [-1, 1]), max(1, W_i) for NT-Xent, gamma (2 + m) for Circle (|relu(1 + m - S)|, |relu(S + m)| at
    |S| <= 1)."""
    if loss.name == "ntxent":
        return stats[EXTRA].clamp(min=1.0)
    if loss.name == "circle":
        return torch.full_like(stats[FACTOR], loss.gamma * (2.0 + abs(loss.m)))
    return torch.ones_like(stats[FACTOR])


def tile_configs(d: int, dtype: torch.dtype, arch: str) -> list:
    """The MS loss's configurations for the same target (backend.tile_configs), without its shared
    exponential's wider resident D (these backwards compute their anchors' weights separately). One stage where
    a second spilled (kernel_stats.py): the float32 sweep (its CUDA-core dots beside two log-sum-exps; sm_90),
    and on AMD targets the backward (both anchors' weights beside the (32, 256) accumulator; gfx942, D = 512)."""
    configs = tb.tile_configs(d, dtype, arch, shared_exp_backward=False)
    if dtype == torch.float32:
        configs = [dataclasses.replace(c, num_stages=1) for c in configs]
    if tb.arch_family(arch) in ("cdna", "rdna"):
        configs = [dataclasses.replace(c, bwd_stages=1) for c in configs]
    return configs


def _forward(plan: tb.Plan, q: torch.Tensor, r: torch.Tensor, params: tuple):
    """(per-anchor losses float32 in input order, saved statistics (4, N) and counts (2, N) int32 in label order)."""
    cfg, a = plan.cfg, plan.anchors
    b = a if plan.self_mode else plan.refs
    n, d = q.shape
    m = r.shape[0]
    dev = q.device
    loss_id, p0, p1 = params
    n_splits, cols_per_split = tb.column_splits(n, m, cfg, dev, splits=plan.splits)
    parts = torch.empty((5, n_splits * n), dtype=torch.float32, device=dev)
    count_parts = torch.empty((2, n_splits * n), dtype=torch.int32, device=dev)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty((N_PAIR_STATS, n), dtype=torch.float32, device=dev)
    counts = torch.empty((2, n), dtype=torch.int32, device=dev)
    align = tb.load_align(d, q, r)
    # unread unless REF_SELF_INDEX_OF_ROWS
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else a.perm
    rows = dict(a_ptr=q, a_perm_ptr=a.perm, inv_a_ptr=a.inv, ya_ptr=a.labels, ref_self_index_ptr=ref_self_index,
                b_ptr=r, NA=n, NB=m, D_vecs=d // align, stride_a_vecs=q.stride(0) // align,
                stride_b_vecs=r.stride(0) // align, ALIGN=align, p0=p0, p1=p1, LOSS=loss_id,
                REF_SELF_INDEX_MODE=plan.ref_self_index_mode, NORMALIZE=True, DOT_F32=tb._dot_f32(q.dtype))
    row_blocks = triton.cdiv(n, cfg.block_n)
    tb._launch(kernels.pair_sweep_kernel, (row_blocks, n_splits), cfg, **rows, b_perm_ptr=b.perm, inv_b_ptr=b.inv,
               yb_ptr=b.labels, part_ptr=parts, count_part_ptr=count_parts, cols_per_split=cols_per_split)
    band = b if plan.band is None else plan.band  # reference mode: the band list of _reference_order
    # on the backward's warps and stages: NT-Xent's band pass (float32 softplus and sigmoid beside the K-chunk
    # pipeline) spilled sm_90's float32 variant on the forward's
    tb._launch(kernels.pair_finish_kernel, (row_blocks,), cfg, backward=True, **rows, band_lo_ptr=a.band_lo, band_hi_ptr=a.band_hi,
               b_perm_ptr=band.perm, inv_b_ptr=band.inv, yb_ptr=band.labels, part_ptr=parts,
               count_part_ptr=count_parts, loss_ptr=loss, stats_ptr=stats, counts_ptr=counts, n_splits=n_splits)
    return loss, stats, counts


def _gradient(plan: tb.Plan, a_rows, b_rows, a: tb.SortedRows, b: tb.SortedRows, f_sorted, stats, g_scale,
              params: tuple, *, anchor_rows: bool, anchor_cols: bool, ref_self_index_mode: int) -> torch.Tensor:
    loss_id, p0, p1 = params
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else plan.anchors.perm
    return tb.accumulated_gradient(
        kernels.pair_backward_kernel, plan.cfg, plan.splits, a_rows, b_rows, a, b, g_scale, ref_self_index, True,
        f_ptr=f_sorted, stats_ptr=stats, n_anchors=plan.anchors.perm.shape[0], p0=p0, p1=p1, LOSS=loss_id,
        ANCHOR_ROWS=anchor_rows, ANCHOR_COLS=anchor_cols, REF_SELF_INDEX_MODE=ref_self_index_mode)


class TritonPairLoss(torch.autograd.Function):
    """(q, r or None, labels, ref_labels, ref_self_index, loss, ref_normalized, config, splits) -> (per-anchor
    losses, (2, N) int64 counts |P_i|, |N_i|)."""

    @staticmethod
    def forward(ctx, q, r, labels, ref_labels, ref_self_index, loss, ref_normalized, config, splits):
        q_ = tb._unit_stride_rows(q)
        r_ = None if r is None else tb._unit_stride_rows(r)
        params = kernel_params(loss)
        with tb._on_device(q.device):
            cfg = config or tile_configs(q.shape[1], q.dtype, tb.target_arch(q.device))[0]
            plan = tb.make_plan(q_, r_, labels.contiguous(), None if r is None else ref_labels.contiguous(),
                                None if r is None or ref_self_index is None else ref_self_index.contiguous(),
                                _HP, cfg, splits, ref_normalized)
            per_anchor, stats, counts = _forward(plan, q_, q_ if r_ is None else r_, params)
        ctx.save_for_backward(q_, r_, stats)
        ctx.plan, ctx.loss, ctx.params = plan, loss, params
        in_order = torch.empty((2, counts.shape[1]), dtype=torch.int64, device=counts.device)
        in_order[:, plan.anchors.perm.long()] = counts.long()  # sorted position k is input row perm[k]
        counts = in_order
        ctx.mark_non_differentiable(counts)
        return per_anchor, counts

    @staticmethod
    @fused_backward("triton")
    def backward(ctx, g, _counts_grad):
        q, r, stats = ctx.saved_tensors
        plan, params = ctx.plan, ctx.params
        need_q, need_r = ctx.needs_input_grad[0], r is not None and ctx.needs_input_grad[1]
        g_sorted = g.to(torch.float32)[plan.anchors.perm.long()]
        f = g_sorted * stats[FACTOR]
        f_unit, g_scale = tb._unit_upstream(f, tb.FLOAT16_WEIGHT_SCALE if q.dtype == torch.float16 else 1.0,
                                            magnitude=f * weight_bound(ctx.loss, stats))
        dq = dr = None
        with tb._on_device(q.device):
            if r is None:
                if need_q:  # dX_i = sum_j (G_ij + G_ji) X_hat_j in one launch
                    dq = _gradient(plan, q, q, plan.anchors, plan.anchors, f_unit, stats, g_scale, params,
                                   anchor_rows=True, anchor_cols=True, ref_self_index_mode=tb.REF_SELF_INDEX_DIAGONAL)
            else:
                if need_q:
                    dq = _gradient(plan, q, r, plan.anchors, plan.refs, f_unit, stats, g_scale, params,
                                   anchor_rows=True, anchor_cols=False, ref_self_index_mode=plan.ref_self_index_mode)
                if need_r:
                    dr = _gradient(plan, r, q, plan.refs, plan.anchors, f_unit, stats, g_scale, params,
                                   anchor_rows=False, anchor_cols=True,
                                   ref_self_index_mode=tb.REF_SELF_INDEX_NONE if plan.ref_self_index is None
                                   else tb.REF_SELF_INDEX_OF_COLS)
        return dq, dr, None, None, None, None, None, None, None


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return tb.unavailable_reason(device, dtype)


# not yet torch ops (as ms_op.py makes the MS loss's): torch.compile runs this eagerly, between two graphs
@torch.compiler.disable
def per_anchor_loss(problem: Problem, loss, config: Optional[tb.TileConfig] = None, splits: Optional[int] = None):
    """(per-anchor losses, (2, N) counts |P_i|, |N_i|) of `loss` (a losses/pair_losses.py loss), as
    engine/torch/pair_engine.py's per_anchor_loss; `config` and `splits` force the tile configuration and the column
    splits (tests)."""
    reason = unavailable_reason(problem.q.device, problem.q.dtype)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot serve {problem.q.dtype} tensors on {problem.q.device}: {reason}")
    self_mode = problem.ref is None
    return TritonPairLoss.apply(problem.q, problem.ref, problem.labels, problem.ref_labels,
                                None if self_mode else problem.ref_self_index, loss, problem.ref_normalized,
                                config, splits)
