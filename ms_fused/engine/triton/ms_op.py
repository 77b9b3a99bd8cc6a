"""The `triton` backend as two torch ops, ms_fused::triton_forward and ms_fused::triton_backward, with fake
kernels and an autograd formula (torch.library), so that torch.compile(fullgraph=True) sees one op per pass
instead of tracing into the launchers, and CUDA graphs capture the launches alone.

What the forward derives from its inputs besides the loss (the label order, row norms, bands, the "bad row"
flags) comes out of the forward op as O(N + M) tensors and goes into the backward op, so the backward never
sorts or reads a row norm again. The tile configuration a forward launched is kept per tuning key
(backend.tuning_key): the backward of that call mines with the same tiles. Nothing in either op
synchronises the host with the device (autotuning aside, which runs once per key and never while a CUDA
graph is captured).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backend as tb
from .._autograd import N_STATS, fused_backward
from .._inputs import HyperParams, Problem

# rows of the forward's packed plan tensors (one column per anchor, or per reference row)
PERM, LABELS, BAND_LO, BAND_HI, OWN_COLUMN, BAD = range(6)   # int32
NORM, INV = range(2)                                           # float32

# tuning key -> the configuration the last forward with that key launched, None when it fell back to torch
_LAUNCHED: dict = {}


def _config_list(cfg: Optional[tb.TileConfig]) -> List[int]:
    return [] if cfg is None else [int(v) for v in dataclasses.astuple(cfg)]


def _config(values: List[int]) -> Optional[tb.TileConfig]:
    if not values:
        return None
    fields = dataclasses.fields(tb.TileConfig)
    return tb.TileConfig(**{f.name: (bool(v) if f.type in (bool, "bool") else int(v)) for f, v in zip(fields, values)})


def _pack(plan: tb.Plan, device) -> tuple:
    """The plan as the forward op returns it: anchor_index (6, N) int32, anchor_norms (2, N) float32, and the
    reference rows' (2, M) index (own order, label codes) and norms, as _reference_order made them (no copy);
    (2, 0) in self mode."""
    a = plan.anchors
    own = plan.ref_self_index if plan.ref_self_index is not None else torch.full_like(a.perm, -1)
    anchor_index = torch.stack([a.perm, a.labels, a.band_lo, a.band_hi, own, plan.bad.to(torch.int32)])
    anchor_norms = torch.stack([a.norm, a.inv])
    if plan.refs is None:
        return (anchor_index, anchor_norms, torch.empty((2, 0), dtype=torch.int32, device=device),
                torch.empty((2, 0), dtype=torch.float32, device=device))
    return (anchor_index, anchor_norms) + plan.ref_tensors


def _unpack(hp: HyperParams, cfg: tb.TileConfig, splits: Optional[int], has_own: bool, anchor_index, anchor_norms,
            ref_index, ref_norms) -> tb.Plan:
    """The forward's plan again, for the backward (which needs no band list: it sweeps every column)."""
    anchors = tb.SortedRows(anchor_index[PERM], anchor_index[LABELS], anchor_norms[NORM], anchor_norms[INV],
                            anchor_index[BAND_LO], anchor_index[BAND_HI])
    refs = None
    if ref_index.shape[1]:
        refs = tb.SortedRows(ref_index[PERM], ref_index[LABELS], ref_norms[NORM], ref_norms[INV], None, None)
    own = anchor_index[OWN_COLUMN] if has_own else None
    return tb.Plan(hp, cfg, anchors, refs, own, anchor_index[BAD].to(torch.int8), splits,
                   ref_tensors=None if refs is None else (ref_index, ref_norms))


def _problem(q, r, labels, ref_labels, ref_self_index, hp, ref_normalized) -> Problem:
    """The call as the torch backend takes it (for when no triton configuration launches)."""
    if r is None:
        ref_self_index = torch.arange(q.shape[0], device=q.device)
    return Problem(q, labels, r, ref_labels, ref_self_index, hp, ref_normalized)


def forward_impl(q: Tensor, r: Optional[Tensor], labels: Tensor, ref_labels: Optional[Tensor],
                   ref_self_index: Optional[Tensor], alpha: float, beta: float, base: float, epsilon: float,
                   mining: bool, normalize: bool, ref_normalized: bool, count: bool, config: List[int],
                   splits: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss (N,) float32 in input order, the saved statistics (N_STATS, N) float32 in label order (LSE rows
    in base 2), counts (2, N) int32 in label order (2, 0) without `count`, then the plan: anchor_index
    (6, N) int32 and anchor_norms (2, N) float32, ref_index (2, M) int32 and ref_norms (2, M) float32
    (M = 0 in self mode)). `config` forces a configuration (TileConfig's fields, [] = plan one), `splits`
    the column splits (-1 = plan them)."""
    hp = HyperParams(alpha, beta, base, epsilon, mining, normalize)
    forced = _config(config)
    n, m = q.shape[0], (0 if r is None else r.shape[0])
    q_ = tb._unit_stride_rows(q)
    r_ = None if r is None else tb._unit_stride_rows(r)
    with tb._on_device(q.device):
        plan = tb.make_plan(q_, r_, labels.contiguous(), None if r is None else ref_labels.contiguous(),
                            None if r is None or ref_self_index is None else ref_self_index.contiguous(),
                            hp, forced, None if splits < 0 else splits, ref_normalized)
        key = tb.tuning_key(plan, q_, r_, forced)
        candidates = tb._candidates(q_, forced, hp)
        if forced is None:
            tb._choose_plan(plan, q_, r_, candidates, key)
        plan.count = count
        try:
            loss = tb._first_that_launches(plan, candidates, lambda: tb._forward(plan, q_, q_ if r_ is None else r_))
            _LAUNCHED[key] = plan.cfg
            stats = plan.stats
            counts = plan.counts if count else torch.empty((2, 0), dtype=torch.int32, device=q.device)
        except tb.NoConfigurationFits as exc:
            tb._fallback_warning(exc)
            _LAUNCHED[key] = None
            from ..torch import backend as torch_backend
            with torch.no_grad():
                loss, counts = torch_backend.per_anchor_loss(
                    _problem(q, r, labels, ref_labels, ref_self_index, hp, ref_normalized), count_pairs=True)
            loss = loss.float()
            counts = counts.to(torch.int32) if count else torch.empty((2, 0), dtype=torch.int32, device=q.device)
            stats = torch.full((N_STATS, n), float("nan"), dtype=torch.float32, device=q.device)
    return (loss, stats, counts) + _pack(plan, q.device)


# forward_impl stays callable as a plain function (tests count what it does outside the kernels)
triton_forward = torch.library.custom_op("ms_fused::triton_forward", forward_impl, mutates_args=())


@triton_forward.register_fake
def _triton_forward_fake(q, r, labels, ref_labels, ref_self_index, alpha, beta, base, epsilon, mining, normalize,
                         ref_normalized, count, config, splits):
    n, m = q.shape[0], (0 if r is None else r.shape[0])
    f32, i32 = torch.float32, torch.int32
    return (q.new_empty(n, dtype=f32), q.new_empty((N_STATS, n), dtype=f32), q.new_empty((2, n if count else 0), dtype=i32),
            q.new_empty((6, n), dtype=i32), q.new_empty((2, n), dtype=f32), q.new_empty((2, m), dtype=i32),
            q.new_empty((2, m), dtype=f32))


@torch.library.custom_op("ms_fused::triton_backward", mutates_args=())
def triton_backward(grad: Tensor, q: Tensor, r: Optional[Tensor], labels: Tensor, ref_labels: Optional[Tensor],
                    ref_self_index: Optional[Tensor], stats: Tensor, anchor_index: Tensor, anchor_norms: Tensor,
                    ref_index: Tensor, ref_norms: Tensor, alpha: float, beta: float, base: float, epsilon: float,
                    mining: bool, normalize: bool, ref_normalized: bool, config: List[int], splits: int,
                    need_q: bool, need_r: bool) -> Tuple[Tensor, Tensor]:
    """(dq, dr) for the upstream gradient `grad` of the per-anchor losses (empty where not needed), from what
    triton_forward returned: its statistics and plan."""
    hp = HyperParams(alpha, beta, base, epsilon, mining, normalize)
    forced = _config(config)
    needs = (need_q, need_r and r is not None)
    q_ = tb._unit_stride_rows(q)
    r_ = None if r is None else tb._unit_stride_rows(r)
    with tb._on_device(grad.device):
        plan = _unpack(hp, forced, None if splits < 0 else splits, ref_self_index is not None and r is not None,
                       anchor_index, anchor_norms, ref_index, ref_norms)
        key = tb.tuning_key(plan, q_, r_, forced)
        candidates = tb._candidates(q_, forced, hp)
        forward_cfg = _LAUNCHED.get(key, candidates[0])
        if forward_cfg is None:  # the forward found no configuration either: its torch fallback's gradients
            dq, dr = tb._torch_gradients(_problem(q, r, labels, ref_labels, ref_self_index, hp, ref_normalized),
                                         grad, needs)
        else:
            plan.cfg, plan.stats = forward_cfg, stats

            def run():
                if plan.cfg != forward_cfg:  # the forward's statistics again, mined by this configuration's tiles
                    if r_ is not None:  # (the band list, which the backward does not keep)
                        plan.band = tb.make_plan(q_, r_, labels.contiguous(), ref_labels.contiguous(), None, hp,
                                                 plan.cfg, plan.splits, ref_normalized).band
                    tb._forward(plan, q_, q_ if r_ is None else r_)
                return tb._backward_all(plan, q_, r_, grad, needs)

            try:
                dq, dr = tb._first_that_launches(plan, candidates, run)
            except tb.NoConfigurationFits as exc:
                tb._fallback_warning(exc)
                dq, dr = tb._torch_gradients(_problem(q, r, labels, ref_labels, ref_self_index, hp, ref_normalized),
                                             grad, needs)
    empty = q.new_empty(0)
    return (empty if dq is None else dq.contiguous()), (empty if dr is None else dr.contiguous())


@triton_backward.register_fake
def _triton_backward_fake(grad, q, r, labels, ref_labels, ref_self_index, stats, anchor_index, anchor_norms, ref_index,
                          ref_norms, alpha, beta, base, epsilon, mining, normalize, ref_normalized, config, splits,
                          need_q, need_r):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_q else q.new_empty(0)
    dr = torch.empty_like(r, memory_format=torch.contiguous_format) if need_r and r is not None else q.new_empty(0)
    return dq, dr



def _setup_context(ctx, inputs, output):
    q, r, labels, ref_labels, ref_self_index = inputs[:5]
    alpha, beta, base, epsilon, mining, normalize, ref_normalized, _count, config, splits = inputs[5:15]
    _, stats, _, anchor_index, anchor_norms, ref_index, ref_norms = output
    ctx.save_for_backward(q, r, labels, ref_labels, ref_self_index, stats, anchor_index, anchor_norms, ref_index,
                          ref_norms)
    ctx.args = (alpha, beta, base, epsilon, mining, normalize, ref_normalized, config, splits)


@fused_backward("triton")
def _backward(ctx, grad_loss, *_):
    q, r, labels, ref_labels, ref_self_index, stats, anchor_index, anchor_norms, ref_index, ref_norms = ctx.saved_tensors
    need_q = ctx.needs_input_grad[0]
    need_r = r is not None and ctx.needs_input_grad[1]
    dq, dr = torch.ops.ms_fused.triton_backward(grad_loss.float(), q, r, labels, ref_labels, ref_self_index, stats,
                                                anchor_index, anchor_norms, ref_index, ref_norms, *ctx.args,
                                                need_q, need_r)
    return (dq if need_q else None, dr if need_r else None) + (None,) * 13


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def per_anchor_loss(problem: Problem, config: Optional[tb.TileConfig] = None, splits: Optional[int] = None,
                    count_pairs: bool = False):
    """(N,) float32 per-anchor losses attached to autograd. `config` fixes the tile configuration and
    `splits` the number of column splits (tests); by default both are planned. With `count_pairs` also the
    (2, N) mined positives and negatives per anchor (kernels compiled with COUNT_PAIRS). When no candidate
    configuration launches on this GPU, the torch backend computes the loss, with a warning that says why."""
    if not torch.compiler.is_compiling():  # backends.resolve has checked it already where the call is traced
        reason = tb.unavailable_reason(problem.q.device, problem.q.dtype)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve {problem.q.dtype} tensors on {problem.q.device}: {reason}")
    hp = problem.hp
    self_mode = problem.ref is None
    out = torch.ops.ms_fused.triton_forward(
        problem.q, problem.ref, problem.labels, problem.ref_labels, None if self_mode else problem.ref_self_index,
        hp.alpha, hp.beta, hp.base, hp.epsilon, hp.mining, hp.normalize, problem.ref_normalized, count_pairs,
        _config_list(config), -1 if splits is None else splits)
    return (out[0], out[2]) if count_pairs else out[0]
