"""The `triton` backend: fused forward and backward kernels (triton_kernels.py), no N x M tensor.

A call sorts anchors and reference rows by label (through permutations; the rows themselves are never
copied), so that a block of anchors finds its positives in one narrow band of columns. The forward then
costs one similarity sweep plus two sweeps of the band; the backward one recompute of each tile plus the
gradient product. When there are too few anchor blocks to fill the GPU (a memory bank: M >> N), the
columns are split across programs and the partial results combined in a fixed order, so results stay
bitwise reproducible. Outputs and gradients are written back at the caller's row order.

Float32, float16 and bfloat16 inputs (float32 accumulation and exponentials); float64 is left to the
other backends.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ._autograd import LSE_NEG, LSE_POS, MAX_NEG, MIN_POS, N_STATS, fused_backward
from ._inputs import HyperParams, Problem

try:
    import triton

    from . import triton_kernels as kernels
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # triton missing or broken: the backend reports why instead of failing the package
    triton = kernels = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default
LOG2E = 1.0 / math.log(2.0)
SMS_WITHOUT_GPU = 132  # an H200's SM count: the split plan when no GPU answers
ARCH_WITHOUT_GPU = "sm_90"  # the target whose configurations run when no GPU answers (interpreter, compile stubs)
WAVES = 2              # programs per SM the column split aims for


def _interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and type(kernels.sweep_kernel).__name__ == "InterpretedFunction"


def target_arch(device) -> str:
    """The compile target whose configuration list a launch on `device` uses: "sm_XY" for an NVIDIA GPU of
    compute capability X.Y, the gfx name ("gfx942") for an AMD GPU under ROCm, and for CPU tensors (the
    interpreter, or compiling against a stub driver) $MS_FUSED_TRITON_ARCH or ARCH_WITHOUT_GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if torch.version.hip is not None:
            return props.gcnArchName.split(":")[0]
        return f"sm_{props.major}{props.minor}"
    return os.environ.get("MS_FUSED_TRITON_ARCH", ARCH_WITHOUT_GPU)


def unavailable_reason(device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when this backend can serve `dtype` tensors (any dtype when None) on `device`, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return (f"the triton backend supports float16, bfloat16 and float32, not {dtype}; "
                "use backend='torch' (or 'auto', which routes it there)")
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available to torch"
    if device.type == "cpu":
        if _interpreted():
            return None
        return ("the triton backend needs CUDA tensors; CPU tensors run only under Triton's interpreter "
                "(TRITON_INTERPRET=1 set before ms_fused is imported; slow, meant for tests)")
    return f"the triton backend runs on CUDA devices, not {device.type}"


# ---- tile configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """One tile shape for every kernel of a loss call, forward and backward alike, so that each pair's S
    is computed by the same tile shape and K order everywhere (the forward's mining is the backward's).

    block_n anchors (rows) per program, block_m columns per tile, block_d the K step over D; the backward
    holds a (block_n, min(D, max_dout)) float32 accumulator, so D <= max_dout needs no D-slices, and runs
    with its own warps and pipeline depth (they spread the same products over more threads and change
    neither the tile shape nor the K order)."""

    block_n: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int
    bwd_warps: int
    bwd_stages: int
    max_dout: int = 512
    skip_zero_tiles: bool = True

    def block_dout(self, d: int) -> int:
        return _pow2(d, 16, self.max_dout)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, int(x) - 1).bit_length()))


def tile_configs(d: int, dtype: torch.dtype, arch: str = ARCH_WITHOUT_GPU) -> list:
    """Candidate configurations, first choice first: the interpreter runs the first one too, so that tests
    on the CPU run what a GPU runs. Every first choice compiles for sm_90 without register spills
    (benchmarks/kernel_stats.py reports them)."""
    if dtype == torch.float32:  # "ieee" float32 dots run on the CUDA cores: smaller tiles
        return [TileConfig(32, 64, 32, 4, 2, bwd_warps=8, bwd_stages=1, max_dout=256),
                TileConfig(32, 32, 32, 4, 2, bwd_warps=8, bwd_stages=2, max_dout=128)]
    bd = _pow2(d, 16, 64)
    # (64, 32): the widest tile whose backward holds a 512-wide accumulator without spilling
    return [TileConfig(64, 32, bd, 8, 3, bwd_warps=8, bwd_stages=2),
            TileConfig(64, 64, bd, 8, 3, bwd_warps=8, bwd_stages=2, max_dout=256),
            TileConfig(64, 32, bd, 4, 3, bwd_warps=8, bwd_stages=2, skip_zero_tiles=False),
            TileConfig(128, 64, bd, 8, 3, bwd_warps=8, bwd_stages=2, max_dout=128)]


def _autotune_enabled() -> bool:
    """Autotuning times candidates on a live GPU; MS_FUSED_TRITON_AUTOTUNE=0 keeps the first configuration."""
    return not _interpreted() and torch.cuda.is_available() and os.environ.get("MS_FUSED_TRITON_AUTOTUNE", "1") != "0"


_TUNED: dict = {}
_TUNE_LOCK = threading.Lock()  # one timing run per key, even when several threads make the first call


def _log2_bucket(n: int) -> int:
    return max(0, int(n) - 1).bit_length()


def _choose_config(key: tuple, candidates: list, trial) -> TileConfig:
    """The first candidate, or (on a GPU) the fastest forward among them, timed once per key: the
    problem's switches, dtype, D and the log2 buckets of N and M."""
    if len(candidates) == 1 or not _autotune_enabled():
        return candidates[0]
    with _TUNE_LOCK:
        if key not in _TUNED:
            times = []
            for cfg in candidates:
                try:
                    times.append(triton.testing.do_bench(lambda: trial(cfg), warmup=5, rep=20))
                except Exception:  # a candidate that does not compile or fit on this GPU is not chosen
                    times.append(float("inf"))
            _TUNED[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
        return _TUNED[key]


# ---- launches ------------------------------------------------------------------------------------------

_LAUNCH_LOG: Optional[list] = None


@contextlib.contextmanager
def record_launches():
    """Collects (kernel name, programs, TileConfig or None) of every launch inside the block."""
    global _LAUNCH_LOG
    previous, _LAUNCH_LOG = _LAUNCH_LOG, []
    try:
        yield _LAUNCH_LOG
    finally:
        _LAUNCH_LOG = previous


def _launch(kernel, grid: tuple, cfg: Optional[TileConfig], backward: bool = False, **args) -> None:
    """Launch by keyword; `cfg` gives the tile shape (and the forward's or backward's warps and stages)."""
    if _LAUNCH_LOG is not None:
        _LAUNCH_LOG.append((kernel.fn.__name__, math.prod(grid), cfg))
    options = {}
    if cfg is not None:
        warps, stages = (cfg.bwd_warps, cfg.bwd_stages) if backward else (cfg.num_warps, cfg.num_stages)
        options.update(num_warps=warps, num_stages=stages)
        args.update(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d)
    if not _interpreted():
        options["enable_fp_fusion"] = False  # S +- eps and beta2 (S - base) round alike in every kernel
    kernel[grid](**args, **options)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_f32(dtype: torch.dtype) -> bool:
    # float32 operands use exact ("ieee") products, never TF32; the interpreter mis-computes bfloat16 dots
    return dtype == torch.float32 or (_interpreted() and dtype == torch.bfloat16)


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_WITHOUT_GPU


def column_splits(n_rows: int, n_cols: int, cfg: TileConfig, device: torch.device, other_programs: int = 1,
                  splits: Optional[int] = None) -> tuple:
    """(number of splits, columns per split): enough programs for WAVES waves on the GPU's SMs when the
    row blocks alone are too few (a memory bank), else 1. `splits` forces a count (tests)."""
    row_blocks = triton.cdiv(n_rows, cfg.block_n) * other_programs
    col_tiles = triton.cdiv(n_cols, cfg.block_m)
    if splits is None:
        target = WAVES * _n_sms(device)
        want = 1 if row_blocks >= target else triton.cdiv(target, row_blocks)
        tiles_per_split = max(1, col_tiles // want)
    else:
        tiles_per_split = triton.cdiv(col_tiles, max(1, splits))
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split * cfg.block_m


# ---- the label order -----------------------------------------------------------------------------------

class SortedRows(NamedTuple):
    """One side (anchors or reference rows) in label order; `band_lo/hi` index the other side."""

    perm: torch.Tensor      # int32: sorted position -> input row
    labels: torch.Tensor    # int32, ascending
    norm: torch.Tensor      # float32, sorted
    inv: torch.Tensor       # float32, sorted
    band_lo: torch.Tensor   # int32: first column of the other side with this row's label
    band_hi: torch.Tensor   # int32: one past the last


def dense_labels(yq: torch.Tensor, yr: Optional[torch.Tensor]):
    """int32 labels that keep equality of the int64 ones. In reference mode the anchors' classes are
    numbered first, so that a block of sorted anchors meets a band holding its own classes only."""
    y = yq if yr is None else torch.cat([yq, yr])
    total = y.shape[0]
    if total >= 2**30:
        raise ValueError(f"the triton backend takes fewer than 2**30 rows in all, got {total}")
    values, order = torch.sort(y)
    first = torch.ones_like(values, dtype=torch.int32)
    first[1:] = (values[1:] != values[:-1]).to(torch.int32)
    dense = torch.empty_like(first).scatter_(0, order, torch.cumsum(first, 0, dtype=torch.int32) - 1)
    if yr is None:
        return dense, None
    n = yq.shape[0]
    in_anchors = torch.zeros(total, dtype=torch.bool, device=y.device)
    in_anchors[dense[:n].long()] = True
    key = torch.where(in_anchors[dense.long()], dense, dense + total)
    return key[:n], key[n:]


def _sort(labels: torch.Tensor, norm: torch.Tensor, inv: torch.Tensor):
    sorted_labels, perm = torch.sort(labels, stable=True)
    return perm.to(torch.int32), sorted_labels, norm[perm], inv[perm]


def _with_band(side: tuple, other_labels: torch.Tensor) -> SortedRows:
    perm, labels, norm, inv = side
    lo = torch.searchsorted(other_labels, labels, side="left", out_int32=True)
    hi = torch.searchsorted(other_labels, labels, side="right", out_int32=True)
    return SortedRows(perm, labels, norm, inv, lo, hi)


def _row_stats(x: torch.Tensor):
    """(norm, inv_norm, bad) per input row: float32, float32, bool (row holds a NaN or Inf)."""
    rows = x.shape[0]
    norm = torch.empty(rows, dtype=torch.float32, device=x.device)
    inv = torch.empty_like(norm)
    bad = torch.empty(rows, dtype=torch.int8, device=x.device)
    block_n = 32
    _launch(kernels.row_stats_kernel, (triton.cdiv(rows, block_n),), None, x_ptr=x, norm_ptr=norm, inv_ptr=inv,
            bad_ptr=bad, n_rows=rows, D=x.shape[1], stride_n=x.stride(0), norm_eps=NORM_EPS,
            BLOCK_N=block_n, BLOCK_D=_pow2(x.shape[1], 16, 128))
    return norm, inv, bad.bool()


# ---- one call ------------------------------------------------------------------------------------------

REF_SELF_INDEX_NONE, REF_SELF_INDEX_DIAGONAL, REF_SELF_INDEX_OF_ROWS, REF_SELF_INDEX_OF_COLS = (
    (kernels.REF_SELF_INDEX_NONE.value, kernels.REF_SELF_INDEX_DIAGONAL.value, kernels.REF_SELF_INDEX_OF_ROWS.value,
     kernels.REF_SELF_INDEX_OF_COLS.value) if kernels is not None else (0, 1, 2, 3))


@dataclass
class Plan:
    """Everything a loss call derives from its inputs besides the rows themselves: the label order, the
    tile configuration, the column splits, and (after the forward) the per-anchor statistics."""

    hp: HyperParams
    cfg: TileConfig
    anchors: SortedRows
    refs: Optional[SortedRows]         # None in self mode
    ref_self_index: Optional[torch.Tensor]  # int32 per sorted anchor: its own sorted reference row, or -1
    bad: torch.Tensor                  # int8 per sorted anchor: its row of S touches a NaN/Inf (forward input)
    splits: Optional[int] = None       # forced column splits (tests); None plans them
    # _autograd.py's layout, float32, sorted order, LSE rows in base 2 (A2, B2; NaN for a bad anchor)
    stats: Optional[torch.Tensor] = None
    count: bool = False                # count each anchor's mined pairs in the forward
    counts: Optional[torch.Tensor] = None  # (2, N) int32 sorted: hard positives, hard negatives

    @property
    def self_mode(self) -> bool:
        return self.refs is None

    @property
    def ref_self_index_mode(self) -> int:
        if self.self_mode:
            return REF_SELF_INDEX_DIAGONAL
        return REF_SELF_INDEX_NONE if self.ref_self_index is None else REF_SELF_INDEX_OF_ROWS


def make_plan(q, r, yq, yr, ref_self_index, hp: HyperParams, cfg: Optional[TileConfig], splits: Optional[int],
              ref_normalized: bool = False) -> Plan:
    norm_q, inv_q, bad_q = _row_stats(q)
    lab_q, lab_r = dense_labels(yq, yr)
    if r is None:
        side = _sort(lab_q, norm_q, inv_q)
        anchors = _with_band(side, side[1])
        refs, ref_self_index_sorted = None, None
        bad = bad_q.any().expand(q.shape[0])
    else:
        norm_r, inv_r, bad_r = _row_stats(r)
        side_q, side_r = _sort(lab_q, norm_q, inv_q), _sort(lab_r, norm_r, inv_r)
        anchors, refs = _with_band(side_q, side_r[1]), _with_band(side_r, side_q[1])
        bad = bad_q[anchors.perm.long()] | bad_r.any()
        ref_self_index_sorted = None
        if ref_self_index is not None:
            rank_r = torch.empty_like(refs.perm).scatter_(
                0, refs.perm.long(), torch.arange(r.shape[0], dtype=torch.int32, device=r.device))
            ref_self_index_in = ref_self_index[anchors.perm.long()]
            ref_self_index_sorted = torch.where(ref_self_index_in >= 0, rank_r[ref_self_index_in.clamp(min=0)],
                                                -1).to(torch.int32)
    if not hp.normalize:
        ones = torch.ones_like(anchors.norm)
        anchors = anchors._replace(norm=ones, inv=ones)
    if refs is not None and (not hp.normalize or ref_normalized):  # unit rows already: used as they are
        ones = torch.ones_like(refs.norm)
        refs = refs._replace(norm=ones, inv=ones)
    cfg = cfg or tile_configs(q.shape[1], q.dtype, target_arch(q.device))[0]
    return Plan(hp, cfg, anchors, refs, ref_self_index_sorted, bad.to(torch.int8).contiguous(), splits)


def _forward(plan: Plan, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-anchor losses (float32, input order); leaves the saved statistics in plan.stats."""
    hp, cfg, a = plan.hp, plan.cfg, plan.anchors
    b = a if plan.self_mode else plan.refs
    n, d = q.shape
    m = r.shape[0]
    dev = q.device
    # unread unless REF_SELF_INDEX_OF_ROWS
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else a.perm
    n_splits, cols_per_split = column_splits(n, m, cfg, dev, splits=plan.splits)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.full((N_STATS, n), float("inf"), dtype=torch.float32, device=dev)
    parts = torch.empty(3, n_splits * n, dtype=torch.float32, device=dev)
    # unread (placeholders) unless counting
    count_parts = torch.empty(n_splits * n if plan.count else 1, dtype=torch.int32, device=dev)
    counts = torch.zeros((2, n) if plan.count else (2, 1), dtype=torch.int32, device=dev)
    rows = dict(a_ptr=q, a_perm_ptr=a.perm, inv_a_ptr=a.inv, ya_ptr=a.labels, band_lo_ptr=a.band_lo,
                band_hi_ptr=a.band_hi, b_ptr=r, b_perm_ptr=b.perm, inv_b_ptr=b.inv, yb_ptr=b.labels,
                NA=n, NB=m, D=d, stride_a=q.stride(0), stride_b=r.stride(0),
                NORMALIZE=hp.normalize, DOT_F32=_dot_f32(q.dtype))
    row_blocks = triton.cdiv(n, cfg.block_n)
    if hp.mining:
        _launch(kernels.band_min_kernel, (row_blocks,), cfg, **rows, ref_self_index_ptr=ref_self_index,
                min_pos_ptr=stats[MIN_POS], REF_SELF_INDEX_MODE=plan.ref_self_index_mode)
    _launch(kernels.sweep_kernel, (row_blocks, n_splits), cfg, **rows, min_pos_ptr=stats[MIN_POS],
            max_neg_part_ptr=parts[0], shift_part_ptr=parts[1], sum_part_ptr=parts[2], count_part_ptr=count_parts,
            cols_per_split=cols_per_split, beta2=hp.beta * LOG2E, base=hp.base, eps=hp.epsilon, MINING=hp.mining,
            COUNT_PAIRS=plan.count)
    _launch(kernels.finish_kernel, (row_blocks,), cfg, **rows, ref_self_index_ptr=ref_self_index, bad_ptr=plan.bad,
            max_neg_part_ptr=parts[0], shift_part_ptr=parts[1], sum_part_ptr=parts[2], count_part_ptr=count_parts,
            loss_ptr=loss, max_neg_ptr=stats[MAX_NEG], lse_pos_ptr=stats[LSE_POS], lse_neg_ptr=stats[LSE_NEG],
            counts_ptr=counts,
            n_splits=n_splits, alpha2=hp.alpha * LOG2E, beta2=hp.beta * LOG2E, base=hp.base, eps=hp.epsilon,
            REF_SELF_INDEX_MODE=plan.ref_self_index_mode, MINING=hp.mining, COUNT_PAIRS=plan.count)
    plan.stats = stats
    plan.counts = counts if plan.count else None
    return loss


def _backward(plan: Plan, a_rows: torch.Tensor, b_rows: torch.Tensor, a: SortedRows, b: SortedRows,
              g_sorted: torch.Tensor, g_scale: torch.Tensor, *, anchor_rows: bool, anchor_cols: bool,
              ref_self_index_mode: int) -> torch.Tensor:
    """Gradient of the rows of `a_rows` (in its dtype, input order), pairing them with every row of b."""
    hp, cfg = plan.hp, plan.cfg
    na, d = a_rows.shape
    nb = b_rows.shape[0]
    dev = a_rows.device
    out = torch.empty((na, d), dtype=a_rows.dtype, device=dev)
    block_dout = cfg.block_dout(d)
    d_slices = triton.cdiv(d, block_dout)
    row_blocks = triton.cdiv(na, cfg.block_n)
    n_splits, cols_per_split = column_splits(na, nb, cfg, dev, other_programs=d_slices, splits=plan.splits)
    split = n_splits > 1
    part = torch.empty((n_splits * na, d) if split else (1, 1), dtype=torch.float32, device=dev)
    x_dot_dx = torch.empty(n_splits * na if split else 1, dtype=torch.float32, device=dev)
    # unread unless a REF_SELF_INDEX_OF_* mode
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else a.perm
    stats = plan.stats
    _launch(kernels.backward_kernel, (row_blocks, n_splits, d_slices), cfg, backward=True,
            a_ptr=a_rows, a_perm_ptr=a.perm, inv_a_ptr=a.inv, norm_a_ptr=a.norm, ya_ptr=a.labels,
            ref_self_index_rows_ptr=ref_self_index, band_lo_ptr=a.band_lo, band_hi_ptr=a.band_hi,
            b_ptr=b_rows, b_perm_ptr=b.perm, inv_b_ptr=b.inv, yb_ptr=b.labels, ref_self_index_cols_ptr=ref_self_index,
            g_ptr=g_sorted, g_scale_ptr=g_scale, min_pos_ptr=stats[MIN_POS], max_neg_ptr=stats[MAX_NEG],
            lse_pos_ptr=stats[LSE_POS], lse_neg_ptr=stats[LSE_NEG],
            out_ptr=out, part_ptr=part, x_dot_dx_part_ptr=x_dot_dx,
            NA=na, NB=nb, D=d, stride_a=a_rows.stride(0), stride_b=b_rows.stride(0), stride_out=out.stride(0),
            cols_per_split=cols_per_split, alpha2=hp.alpha * LOG2E, beta2=hp.beta * LOG2E, base=hp.base,
            eps=hp.epsilon, norm_eps=NORM_EPS,
            ANCHOR_ROWS=anchor_rows, ANCHOR_COLS=anchor_cols, REF_SELF_INDEX_MODE=ref_self_index_mode, MINING=hp.mining,
            NORMALIZE=hp.normalize, DOT_F32=_dot_f32(a_rows.dtype), SCALE_WEIGHTS=a_rows.dtype != torch.float16,
            SPLIT=split, SKIP_ZERO_TILES=cfg.skip_zero_tiles, BLOCK_DOUT=block_dout)
    if split:  # no recompute here: narrow D-slices cost nothing and keep the accumulator small
        combine_n, combine_dout = 32, min(block_dout, 128)
        _launch(kernels.combine_grad_kernel, (triton.cdiv(na, combine_n), triton.cdiv(d, combine_dout)), None,
                a_ptr=a_rows, a_perm_ptr=a.perm, inv_a_ptr=a.inv, norm_a_ptr=a.norm, g_scale_ptr=g_scale,
                part_ptr=part, x_dot_dx_part_ptr=x_dot_dx, out_ptr=out, NA=na, D=d, stride_a=a_rows.stride(0),
                stride_out=out.stride(0), n_splits=n_splits, norm_eps=NORM_EPS, NORMALIZE=hp.normalize,
                BLOCK_N=combine_n, BLOCK_DOUT=combine_dout)
    return out


def _unit_upstream(g: torch.Tensor):
    """g / c and c = max|g| (1 when that is 0 or not finite), so the weights fed to half-precision dots
    stay in [-2, 2] even for g = 1/N with a large N; the kernels multiply c back in."""
    g = g.to(torch.float32).contiguous()
    c = g.abs().amax().reshape(1)
    c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
    return g / c, c


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels step along D with stride 1 (vectorised loads); other layouts are copied once."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def _tuned_plan(q, r, yq, yr, ref_self_index, hp: HyperParams, cfg: Optional[TileConfig], splits: Optional[int],
                ref_normalized: bool) -> Plan:
    plan = make_plan(q, r, yq, yr, ref_self_index, hp, cfg, splits, ref_normalized)
    if cfg is None:
        m = q.shape[0] if r is None else r.shape[0]
        key = (q.dtype, q.shape[1], _log2_bucket(q.shape[0]), _log2_bucket(m), plan.ref_self_index_mode, hp.mining,
               hp.normalize)
        r_ = q if r is None else r
        plan.cfg = _choose_config(key, tile_configs(q.shape[1], q.dtype, target_arch(q.device)),
                                  lambda c: _forward(Plan(hp, c, plan.anchors, plan.refs, plan.ref_self_index, plan.bad,
                                                          splits), q, r_))
    return plan


class FusedMultiSimilarity(torch.autograd.Function):
    """(q, r or None in self mode) -> (per-anchor losses (float32), counts); counts is the (2, N) int32
    number of mined positives and negatives per anchor (sorted order) with `count`, else empty."""

    @staticmethod
    def forward(ctx, q, r, yq, yr, ref_self_index, hp: HyperParams, cfg: Optional[TileConfig], splits: Optional[int],
                ref_normalized: bool, count: bool):
        q = _unit_stride_rows(q.detach())
        r_ = None if r is None else _unit_stride_rows(r.detach())
        with _on_device(q.device):
            plan = _tuned_plan(q, r_, yq, yr, ref_self_index, hp, cfg, splits, ref_normalized)
            plan.count = count
            loss = _forward(plan, q, q if r_ is None else r_)
        ctx.save_for_backward(q, r_)
        ctx.plan = plan
        counts = plan.counts if count else loss.new_empty((2, 0), dtype=torch.int32)
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    @fused_backward("triton")
    def backward(ctx, g, _counts_grad):
        q, r = ctx.saved_tensors
        plan = ctx.plan
        with _on_device(g.device):
            g_unit, g_scale = _unit_upstream(g)
            g_sorted = g_unit[plan.anchors.perm.long()]
            dq = dr = None
            if plan.self_mode:
                if ctx.needs_input_grad[0]:  # dX_i = sum_j (G_ij + G_ji) X_hat_j in one launch
                    dq = _backward(plan, q, q, plan.anchors, plan.anchors, g_sorted, g_scale,
                                   anchor_rows=True, anchor_cols=True, ref_self_index_mode=REF_SELF_INDEX_DIAGONAL)
                return dq, None, None, None, None, None, None, None, None, None
            if ctx.needs_input_grad[0]:
                dq = _backward(plan, q, r, plan.anchors, plan.refs, g_sorted, g_scale,
                               anchor_rows=True, anchor_cols=False, ref_self_index_mode=plan.ref_self_index_mode)
            if ctx.needs_input_grad[1]:  # skipped when the reference set is a frozen memory bank
                dr = _backward(plan, r, q, plan.refs, plan.anchors, g_sorted, g_scale, anchor_rows=False,
                               anchor_cols=True, ref_self_index_mode=REF_SELF_INDEX_NONE
                               if plan.ref_self_index is None else REF_SELF_INDEX_OF_COLS)
        return dq, dr, None, None, None, None, None, None, None, None


def per_anchor_loss(problem: Problem, config: Optional[TileConfig] = None, splits: Optional[int] = None,
                    count_pairs: bool = False):
    """(N,) float32 per-anchor losses attached to autograd. `config` fixes the tile configuration and
    `splits` the number of column splits (tests); by default both are planned. With `count_pairs` also the
    (2, N) mined positives and negatives per anchor (kernels compiled with COUNT_PAIRS)."""
    reason = unavailable_reason(problem.q.device, problem.q.dtype)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot serve {problem.q.dtype} tensors on {problem.q.device}: {reason}")
    yq = problem.labels.contiguous()
    yr = None if problem.self_mode else problem.ref_labels.contiguous()
    ref_self_index = None if problem.self_mode or problem.ref_self_index is None \
        else problem.ref_self_index.contiguous()
    loss, counts = FusedMultiSimilarity.apply(problem.q, problem.ref, yq, yr, ref_self_index, problem.hp, config,
                                              splits, problem.ref_normalized, count_pairs)
    return (loss, counts) if count_pairs else loss


__all__ = ["unavailable_reason", "per_anchor_loss", "FusedMultiSimilarity", "TileConfig", "tile_configs", "target_arch",
           "column_splits", "record_launches", "dense_labels", "make_plan"]
