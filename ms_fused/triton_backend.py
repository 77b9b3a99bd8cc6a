"""The `triton` backend: fused forward and backward kernels (triton_kernels.py), no N x M tensor.

Forward: one row-norm launch per input, then one launch over anchor blocks that returns the per-anchor
losses and saves O(N + M) statistics (norms, min_pos, max_neg, A, B, non-finite flags). Backward: one
launch per gradient, each rebuilding its similarity tiles; dR is skipped when `ref_emb` needs no grad.
Float32, float16 and bfloat16 inputs (float32 accumulation and exp); float64 is left to other backends.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from ._autograd import fused_backward
from ._inputs import HyperParams, Problem

try:
    import triton

    from . import triton_kernels as kernels
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # triton missing or broken: the backend reports why instead of failing the package
    triton = kernels = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default (SPEC "Similarities")

# OWN_MODE of the kernels: which (anchor, column) pair is the anchor's own copy (see _pair_masks)
NO_OWN, OWN_SELF, OWN_OF_ROWS, OWN_OF_COLS = 0, 1, 2, 3


def _interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and type(kernels.forward_kernel).__name__ == "InterpretedFunction"


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


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch: rows per program, columns per tile, K step over D, output D-slice."""

    block_n: int
    block_m: int
    block_d: int
    block_dout: int = 64
    num_warps: int = 4
    num_stages: int = 2
    skip_zero_tiles: bool = True


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(x)))


def forward_blocks(d: int, dtype: torch.dtype) -> list:
    """Candidate forward configurations, best guess first (the first is used when not autotuning).

    All of them compile for sm_90 without register spills (checked with ptxas -v, triton 3.9)."""
    if _interpreted():
        return [Blocks(32, 32, _pow2(d, 16, 64))]
    if dtype == torch.float32:  # "ieee" float32 dots run on the CUDA cores: smaller tiles
        return [Blocks(32, 64, _pow2(d, 16, 32), num_warps=4, num_stages=2),
                Blocks(64, 32, _pow2(d, 16, 32), num_warps=8, num_stages=2)]
    bd = _pow2(d, 16, 64)
    return [Blocks(128, 64, bd, num_warps=8, num_stages=3),
            Blocks(64, 128, bd, num_warps=8, num_stages=3),
            Blocks(64, 64, bd, num_warps=8, num_stages=3),
            Blocks(64, 64, bd, num_warps=4, num_stages=3)]


def backward_blocks(d: int, dtype: torch.dtype) -> list:
    """Candidate backward configurations; each D-slice of width block_dout re-computes S once, so wide
    slices save work but hold a (block_n, block_dout) float32 accumulator in registers (for sm_90 the
    512-wide one spills ~30-100 bytes and the one without tile skipping ~30; the others none)."""
    if _interpreted():
        return [Blocks(32, 32, _pow2(d, 16, 64), _pow2(d, 16, 64))]
    if dtype == torch.float32:
        return [Blocks(32, 32, _pow2(d, 16, 32), _pow2(d, 16, 128), num_warps=8, num_stages=2),
                Blocks(64, 32, _pow2(d, 16, 32), _pow2(d, 16, 64), num_warps=8, num_stages=2),
                Blocks(32, 32, 16, _pow2(d, 16, 64), num_warps=4, num_stages=2)]
    bd = _pow2(d, 16, 64)
    return [Blocks(64, 64, bd, _pow2(d, 16, 256), num_warps=8, num_stages=2),
            Blocks(64, 64, bd, _pow2(d, 16, 256), num_warps=8, num_stages=2, skip_zero_tiles=False),
            Blocks(64, 32, bd, _pow2(d, 16, 512), num_warps=8, num_stages=2),
            Blocks(64, 64, bd, _pow2(d, 16, 128), num_warps=8, num_stages=3)]


def _autotune_enabled() -> bool:
    """@triton.autotune needs a live GPU driver; MS_FUSED_TRITON_AUTOTUNE=0 keeps the first configuration."""
    return not _interpreted() and torch.cuda.is_available() and os.environ.get("MS_FUSED_TRITON_AUTOTUNE", "1") != "0"


def _meta(b: Blocks, with_dout: bool) -> dict:
    meta = dict(BLOCK_N=b.block_n, BLOCK_M=b.block_m, BLOCK_D=b.block_d)
    if with_dout:
        meta.update(BLOCK_DOUT=b.block_dout, SKIP_ZERO_TILES=b.skip_zero_tiles)
    return meta


_TUNED = {}
# guards _TUNED and every autotuned launch: Triton's Autotuner keeps per-call state on itself (its arguments,
# the timing of a first call), so two threads must not run one at the same time
_TUNED_LOCK = threading.Lock()


def _launch(kernel, grid, args: tuple, consts: dict, candidates: list, with_dout: bool) -> None:
    """Run `kernel` with the first candidate, or autotuned over all of them on a GPU (keyed by D and dtypes)."""
    if not _interpreted():
        consts = dict(consts, enable_fp_fusion=False)  # every kernel rounds S +- eps, beta(S - base) alike
    if len(candidates) > 1 and _autotune_enabled():
        key = (kernel.fn.__name__, tuple(candidates))
        with _TUNED_LOCK:
            if key not in _TUNED:
                configs = [triton.Config(_meta(b, with_dout), num_warps=b.num_warps, num_stages=b.num_stages)
                           for b in candidates]
                # re-tuned per D and per kernel variant (the upper-case constexpr switches); dtypes are added by triton
                _TUNED[key] = triton.autotune(configs=configs,
                                              key=["D", *sorted(k for k in consts if k.isupper())])(kernel)
            _TUNED[key][grid](*args, **consts)
        return
    b = candidates[0]
    kernel[grid](*args, **consts, **_meta(b, with_dout), num_warps=b.num_warps, num_stages=b.num_stages)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _row_norms(x: torch.Tensor, normalize: bool):
    """(norm, inv_norm) float32 (rows,), inv = 1 / max(norm, 1e-12); both ones without `normalize`."""
    rows = x.shape[0]
    if not normalize:
        ones = torch.ones(rows, dtype=torch.float32, device=x.device)
        return ones, ones
    norm = torch.empty(rows, dtype=torch.float32, device=x.device)
    inv = torch.empty_like(norm)
    block_n = 32 if _interpreted() else 64
    grid = (triton.cdiv(rows, block_n),)
    kernels.row_norms_kernel[grid](x, norm, inv, rows, x.shape[1], x.stride(0), NORM_EPS,
                                   BLOCK_N=block_n, BLOCK_D=_pow2(x.shape[1], 16, 128))
    return norm, inv


def _dot_flags(dtype: torch.dtype) -> dict:
    # float32 operands use exact ("ieee") products, never TF32; the interpreter mis-computes bfloat16 dots
    dot_f32 = dtype == torch.float32 or (_interpreted() and dtype == torch.bfloat16)
    return dict(DOT_F32=dot_f32, PRECISION="ieee")


def _forward(q, r, yq, yr, own, inv_q, inv_r, hp: HyperParams, own_mode: int, blocks: Optional[list]):
    n, d = q.shape
    m = r.shape[0]
    dev = q.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty(4, n, dtype=torch.float32, device=dev)  # min_pos, max_neg, A, B
    bad = torch.empty(n, dtype=torch.int32, device=dev)
    args = (q, r, inv_q, inv_r, yq, yr, own, loss, stats[0], stats[1], stats[2], stats[3], bad,
            n, m, d, q.stride(0), r.stride(0),
            hp.alpha, hp.beta, hp.base, hp.epsilon)
    consts = dict(OWN_MODE=own_mode, MINING=hp.mining, NORMALIZE=hp.normalize, **_dot_flags(q.dtype))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(kernels.forward_kernel, grid, args, consts, blocks or forward_blocks(d, q.dtype), with_dout=False)
    return loss, stats, bad


def _backward(a, b, inv_a, norm_a, inv_b, ya, yb, own, g_unit, g_scale, stats, bad, hp: HyperParams,
              anchor_rows: bool, anchor_cols: bool, own_mode: int, blocks: Optional[list]):
    """Gradient of the rows of `a` (in a's dtype), pairing them with every row of `b`."""
    na, d = a.shape
    da = torch.empty((na, d), dtype=a.dtype, device=a.device)
    args = (a, b, inv_a, norm_a, inv_b, ya, yb, own, g_unit, g_scale, stats[0], stats[1], stats[2], stats[3], bad,
            da, na, b.shape[0], d, a.stride(0), b.stride(0), da.stride(0),
            hp.alpha, hp.beta, hp.base, hp.epsilon, NORM_EPS)
    consts = dict(ANCHOR_ROWS=anchor_rows, ANCHOR_COLS=anchor_cols, OWN_MODE=own_mode, MINING=hp.mining,
                  NORMALIZE=hp.normalize, **_dot_flags(a.dtype))
    grid = lambda meta: (triton.cdiv(na, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_DOUT"]))  # noqa: E731
    _launch(kernels.backward_kernel, grid, args, consts, blocks or backward_blocks(d, a.dtype), with_dout=True)
    return da


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


class FusedMultiSimilarity(torch.autograd.Function):
    """(q, r or None in self mode) -> per-anchor losses (float32); see the module docstring."""

    @staticmethod
    def forward(ctx, q, r, yq, yr, own, hp: HyperParams, fwd_blocks, bwd_blocks):
        q = _unit_stride_rows(q.detach())
        self_mode = r is None
        r_ = q if self_mode else _unit_stride_rows(r.detach())
        yr_ = yq if self_mode else yr
        own_mode = OWN_SELF if self_mode else (OWN_OF_ROWS if own is not None else NO_OWN)
        own_ = own if own is not None else torch.full_like(yq, -1)
        with _on_device(q.device):
            norm_q, inv_q = _row_norms(q, hp.normalize)
            norm_r, inv_r = (norm_q, inv_q) if self_mode else _row_norms(r_, hp.normalize)
            loss, stats, bad = _forward(q, r_, yq, yr_, own_, inv_q, inv_r, hp, own_mode, fwd_blocks)
        ctx.save_for_backward(q, None if self_mode else r_, yq, yr_, own_, norm_q, inv_q, norm_r, inv_r, stats, bad)
        ctx.hp, ctx.has_own, ctx.bwd_blocks = hp, own is not None, bwd_blocks
        return loss

    @staticmethod
    @fused_backward("triton")
    def backward(ctx, g):
        with _on_device(g.device):
            return FusedMultiSimilarity._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        q, r, yq, yr, own, norm_q, inv_q, norm_r, inv_r, stats, bad = ctx.saved_tensors
        hp, blocks = ctx.hp, ctx.bwd_blocks
        g_unit, g_scale = _unit_upstream(g)
        dq = dr = None
        if r is None:
            if ctx.needs_input_grad[0]:  # self mode: dX_i = sum_j (G_ij + G_ji) X_hat_j in one launch
                dq = _backward(q, q, inv_q, norm_q, inv_q, yq, yq, own, g_unit, g_scale, stats, bad, hp,
                               True, True, OWN_SELF, blocks)
            return dq, None, None, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            dq = _backward(q, r, inv_q, norm_q, inv_r, yq, yr, own, g_unit, g_scale, stats, bad, hp,
                           True, False, OWN_OF_ROWS if ctx.has_own else NO_OWN, blocks)
        if ctx.needs_input_grad[1]:  # skipped when the reference set is a frozen memory bank
            dr = _backward(r, q, inv_r, norm_r, inv_q, yr, yq, own, g_unit, g_scale, stats, bad, hp,
                           False, True, OWN_OF_COLS if ctx.has_own else NO_OWN, blocks)
        return dq, dr, None, None, None, None, None, None


def per_anchor_loss(problem: Problem, fwd_blocks: Optional[list] = None, bwd_blocks: Optional[list] = None):
    """(N,) float32 per-anchor losses attached to autograd; `*_blocks` override the tile choice (tests)."""
    reason = unavailable_reason(problem.q.device, problem.q.dtype)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot serve {problem.q.dtype} tensors on {problem.q.device}: {reason}")
    yq = problem.labels.contiguous()
    yr = None if problem.self_mode else problem.ref_labels.contiguous()
    own = None if problem.self_mode or problem.self_index is None else problem.self_index.contiguous()
    return FusedMultiSimilarity.apply(problem.q, problem.ref, yq, yr, own, problem.hp, fwd_blocks, bwd_blocks)


__all__ = ["unavailable_reason", "per_anchor_loss", "FusedMultiSimilarity", "Blocks", "forward_blocks",
           "backward_blocks"]
