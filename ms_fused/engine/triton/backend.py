"""The `triton` backend: fused forward and backward kernels (ms_kernels.py), no N x M tensor.

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
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .._autograd import LSE_NEG, LSE_POS, MAX_NEG, MIN_POS, N_STATS, fused_backward
from .._inputs import HyperParams, Problem

try:
    import triton

    from . import ms_kernels as kernels
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
# the oldest Triton release the kernels are compiled and tested with (setup.py's extra, requirements-dev.txt)
MIN_TRITON = (3, 6)
# the newest NVIDIA target that tests/test_kernel_compile.py compiles the kernels for (kernel_stats.ARCHS)
NEWEST_COMPILED_CC = 100
# ... cleanly from this Triton on; under 3.6 sm_100 spills a few bytes in the sweep and the float32 finish
NEWEST_COMPILED_CC_FROM = (3, 9)


def newest_compiled_cc() -> int:
    """The newest NVIDIA compute capability whose compile is checked clean with the Triton in use."""
    return NEWEST_COMPILED_CC if triton_version() >= NEWEST_COMPILED_CC_FROM else 90


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
    if triton_version() < MIN_TRITON:
        return (f"the triton backend needs Triton {'.'.join(map(str, MIN_TRITON))} or newer, the oldest release its "
                f"kernels are compiled and tested with; Triton {triton.__version__} is installed")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return (f"the triton backend supports float16, bfloat16 and float32, not {dtype}; "
                "use backend='torch' (or 'auto', which routes it there)")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        arch = target_arch(device)
        if dtype == torch.bfloat16 and arch_family(arch) == "turing":
            return (f"the triton backend does not take bfloat16 on {arch} (no bfloat16 arithmetic before sm_80); "
                    "it takes float16 and float32 there, and backend='torch' takes bfloat16")
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return ("the triton backend needs CUDA tensors; CPU tensors run only under Triton's interpreter "
                "(TRITON_INTERPRET=1 set before ms_fused is imported; slow, meant for tests)")
    return f"the triton backend runs on CUDA devices, not {device.type}"


def auto_skip_reason(device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why backend="auto" passes over this backend on `device` although it can run there, else None: on
    targets where Triton's compiler has no tensor-core path (sm_75 and older) the torch backend is faster;
    on NVIDIA targets newer than newest_compiled_cc() the kernels are not checked clean (spills, shared
    memory, matrix instructions), and backend="triton" runs them there on request only."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    arch = target_arch(device)
    if arch_family(arch) == "turing":
        return f"Triton compiles no tensor-core instructions for {arch}"
    newest = newest_compiled_cc()
    if not arch.startswith("gfx") and _capability(arch) > newest:
        return (f"the triton kernels are compiled and checked for NVIDIA targets up to sm_{newest} with Triton "
                f"{triton.__version__}, not for {arch}; backend='triton' runs its {arch_family(arch)} configurations "
                f"there unchecked")
    return None


# ---- tile configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """One tile shape for every kernel of a loss call, forward and backward alike, so that each pair's S
    is computed by dots of the same shape and K order everywhere (the forward's mining is the backward's).

    block_n anchors (rows) per dot, block_m columns per tile, block_d the K step over D. With `resident`
    the K step is all of D (rounded up to a power of two): a program holds its anchor rows while column
    tiles stream past, and the backward uses each column tile for both of its products. The forward's sweep
    stacks `row_groups` anchor blocks on every column tile. The backward holds a (block_n, min(D, max_dout))
    float32 accumulator (all of D when resident), and runs with its own warps and pipeline depth (they
    spread the same products over more threads and change neither the dot shape nor the K order)."""

    block_n: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int
    bwd_warps: int
    bwd_stages: int
    max_dout: int = 512
    skip_zero_tiles: bool = True
    row_groups: int = 1
    resident: bool = False

    def k_step(self, d: int) -> int:
        return _pow2(d, 16, 1 << 16) if self.resident else self.block_d

    def block_dout(self, d: int) -> int:
        return self.k_step(d) if self.resident else _pow2(d, 16, self.max_dout)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, int(x) - 1).bit_length()))


def _capability(arch: str) -> int:
    return int(arch.split("_")[1].rstrip("a"))


def arch_family(arch: str) -> str:
    """The configuration list a target uses: "hopper" (sm_90: wgmma, sm_100 and sm_103: tcgen05; 227 KB of
    shared memory per block), "ampere" (sm_80: mma, 163 KB), "ampere_small" (sm_86/sm_89 and newer consumer
    parts: mma, 99 KB), "turing" (sm_75 and older: no tensor-core path in Triton's compiler, 64 KB), "cdna"
    (AMD gfx9 Instinct: MFMA, 64 KB of LDS) or "rdna" (other AMD targets, treated like cdna but without
    MFMA). auto_skip_reason keeps "auto" off the NVIDIA targets that no compile check covers."""
    if arch.startswith("gfx"):
        return "cdna" if arch.startswith("gfx9") else "rdna"
    cc = _capability(arch)
    if cc in (90, 100, 103):  # datacenter Hopper and Blackwell: 227 KB per block
        return "hopper"
    if cc == 80:
        return "ampere"
    if cc >= 86:
        return "ampere_small"
    return "turing"


# Hopper, bfloat16 / float16, D <= resident_widest_d(dtype): the anchor rows stay resident and each column tile
# is loaded once. Every kernel of a launch computes S with the same matrix instruction on the same operand
# blocks (docs/triton_tiles.md, "One S everywhere"; the compile test reads it from each kernel's TTGIR): up to
# D = 128 on 4 warps, one warpgroup per 64-row block and 32 columns (m64n32k16); above, the backward's (64, D)
# float32 accumulator needs 8 warps (128 of 255 registers each at D = 512), and so every kernel runs 8: two
# warpgroups split each 64 x 32 tile into 16-column halves (m64n16k16). Skipping zero tiles is off: the branch
# around the second product costs registers.
RESIDENT_WARPS_UP_TO_D128, RESIDENT_WARPS = 4, 8


def triton_version() -> tuple:
    """(major, minor) of the Triton in use, (0, 0) without one."""
    if triton is None:
        return (0, 0)
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def resident_widest_d(dtype: torch.dtype = torch.bfloat16, shared_exp_backward: bool = True,
                      arch: str = "sm_90") -> int:
    """The widest D a resident configuration takes: 512 for bfloat16 under the Tritons whose compilers were
    checked there, else 256. The (64, 512) accumulator leaves the backward a few registers: Triton 3.6's ptxas
    options fit it either way; Triton 3.9 calls ptxas with --regAllocOptLevel=2, which fits it only with one
    exp2 per pair (SHARED_EXP, the default hyper-parameters' backward) and spills the other, and on sm_100
    spills the reference-mode finish_kernel that counts pairs (kernel_stats.py shows them). float16 scales the
    column tile instead of the weights, which spills it at D = 512 under both; 3.7 / 3.8 are unchecked."""
    if dtype != torch.bfloat16:
        return 256
    version = triton_version()
    if version == (3, 9) and shared_exp_backward and _capability(arch) == 90:
        return 512
    return 512 if version == (3, 6) else 256


def tile_configs(d: int, dtype: torch.dtype, arch: str = ARCH_WITHOUT_GPU, shared_exp_backward: bool = True) -> list:
    """Candidate configurations for `arch` (target_arch's names), first choice first: the interpreter runs
    the first one too, so that tests on the CPU run what a GPU runs. shared_exp_backward: whether the
    hyper-parameters give the self-mode backward one exp2 per pair (shared_exp), which decides how wide a
    resident D fits (resident_widest_d). Every first choice compiles for its
    target without register spills, within its shared memory, and (bfloat16, float16) to the target's
    matrix instructions: benchmarks/kernel_stats.py reports them, tests/test_kernel_compile.py checks them."""
    family = arch_family(arch)
    bd = _pow2(d, 16, 64)
    if dtype == torch.float32:  # "ieee" float32 dots run on the CUDA cores: smaller tiles
        if family == "hopper":
            return [TileConfig(32, 64, 32, 4, 2, bwd_warps=8, bwd_stages=1, max_dout=256),
                    TileConfig(32, 32, 32, 4, 2, bwd_warps=8, bwd_stages=2, max_dout=128)]
        small = TileConfig(16, 32, 32, 4, 1, bwd_warps=4, bwd_stages=1, max_dout=64)
        if family in ("cdna", "rdna"):  # a warp is 64 lanes there: half the warps for as many threads
            return [TileConfig(32, 32, 32, 4, 2, bwd_warps=4, bwd_stages=1, max_dout=128), small]
        # one stage: these dots are bound by the CUDA cores' FMAs, and a second stage's registers made the
        # sweep spill on sm_86 / sm_89
        return [TileConfig(32, 32, 32, 4, 1, bwd_warps=8, bwd_stages=1, max_dout=128), small]
    if family == "hopper":
        # wider D: K-chunks re-read; a (64, 256) accumulator, two D-slices at D = 512
        chunked = [TileConfig(64, 32, bd, 8, 3, bwd_warps=8, bwd_stages=2, max_dout=256),
                   TileConfig(64, 64, bd, 8, 3, bwd_warps=8, bwd_stages=2, max_dout=128),
                   TileConfig(128, 64, bd, 8, 3, bwd_warps=8, bwd_stages=2, max_dout=128)]
        if d > resident_widest_d(dtype, shared_exp_backward, arch):
            return chunked
        warps = RESIDENT_WARPS_UP_TO_D128 if d <= 128 else RESIDENT_WARPS
        return [TileConfig(64, 32, bd, warps, 2, bwd_warps=warps, bwd_stages=2, row_groups=2, resident=True,
                           skip_zero_tiles=False)] + chunked
    # mma targets: 8 warps share the backward's (32, 256) accumulator, leaving the registers that the
    # normalisation chain at the end needs when the columns are not split
    if family == "ampere":
        return [TileConfig(32, 32, bd, 4, 3, bwd_warps=8, bwd_stages=2, max_dout=256),
                TileConfig(32, 64, bd, 4, 3, bwd_warps=8, bwd_stages=1, max_dout=256),
                TileConfig(32, 32, bd, 4, 2, bwd_warps=4, bwd_stages=2, max_dout=128)]
    if family == "ampere_small":
        return [TileConfig(32, 32, bd, 4, 2, bwd_warps=8, bwd_stages=2, max_dout=256),
                TileConfig(32, 32, bd, 4, 2, bwd_warps=4, bwd_stages=2, max_dout=128)]
    if family in ("cdna", "rdna"):
        return [TileConfig(32, 64, bd, 4, 2, bwd_warps=4, bwd_stages=2, max_dout=256),
                TileConfig(32, 32, bd, 4, 2, bwd_warps=4, bwd_stages=2, max_dout=128)]
    # turing: float16 dots lower to CUDA-core FMAs there, so the float32 tile shape
    return [TileConfig(32, 32, min(bd, 32), 4, 2, bwd_warps=8, bwd_stages=1, max_dout=128)]


def _autotune_enabled() -> bool:
    """Autotuning times candidates on a live GPU; MS_FUSED_TRITON_AUTOTUNE=0 keeps the first configuration."""
    return not _interpreted() and torch.cuda.is_available() and os.environ.get("MS_FUSED_TRITON_AUTOTUNE", "1") != "0"


_TUNED: dict = {}     # tuning key -> the configuration the timing chose
_TUNE_LOCK = threading.Lock()  # one timing run per key, even when several threads make the first call
_NOTED_UNTIMED: set = set()


def _log2_bucket(n: int) -> int:
    return max(0, int(n) - 1).bit_length()


def _device_key(device: torch.device) -> tuple:
    """What a tuning result is valid for besides the problem: the GPU's name and compile target."""
    if device.type == "cuda":
        return (torch.cuda.get_device_name(device), target_arch(device))
    return (device.type,)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _choose_config(key: tuple, candidates: list, trial, device: torch.device) -> TileConfig:
    """The first candidate, or (on a GPU) the fastest among them, timed once per key. Timing synchronises
    the device, so it never runs while a CUDA graph is being captured: a captured step uses the key's
    earlier choice, or the first candidate (with one note saying how to have it timed)."""
    if len(candidates) == 1 or not _autotune_enabled():
        return candidates[0]
    with _TUNE_LOCK:
        if key in _TUNED:
            return _TUNED[key]
        if _capturing(device):
            if key not in _NOTED_UNTIMED:
                _NOTED_UNTIMED.add(key)
                warnings.warn("ms_fused: the triton configuration of this loss call was not timed, since a CUDA "
                              "graph is being captured; the first candidate runs. Run one step eagerly before "
                              "capturing (torch.compile's mode='reduce-overhead' does: its warm-up step is eager) "
                              "to time the candidates", RuntimeWarning, stacklevel=4)
            return candidates[0]
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
        args.update(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.k_step(args["D_vecs"] * args["ALIGN"]),
                    RESIDENT=cfg.resident)
    if not _interpreted():
        options["enable_fp_fusion"] = False  # S +- eps and beta2 (S - base) round alike in every kernel
    kernel[grid](**args, **options)


def load_align(d: int, *rows: torch.Tensor) -> int:
    """The kernels' ALIGN (ms_kernels.py, "Alignment"): the largest power of two up to 16 that divides D
    and the row stride of every tensor in `rows`, so that rows Triton already knew to be multiples of 16 stay
    so; 1 when a tensor does not start at a 16-byte boundary, since Triton then assumes nothing of its address
    and a larger ALIGN would only compile another variant."""
    if any(t.data_ptr() % 16 for t in rows):
        return 1
    return math.gcd(16, d, *(t.stride(0) for t in rows))


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_f32(dtype: torch.dtype) -> bool:
    """float32 operands use exact ("ieee") products, never TF32. Under the interpreter half-precision dots are
    upcast too: numpy computes bfloat16 dots wrongly and float16 ones with float16 sums, where a GPU's tensor
    cores multiply the half operands exactly and add in float32, as an upcast float32 dot does (the
    backward's weights are rounded to the half type first, as the GPU's are)."""
    return dtype == torch.float32 or (_interpreted() and dtype in (torch.float16, torch.bfloat16))


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SMS_WITHOUT_GPU


# A resident program loads its anchor rows once per column split, a column tile once per tile: per
# multiply-add, elem / columns_per_split against elem / rows_per_program. At least this many columns per
# anchor row keep the first below 2/3 of the second.
MIN_SPLIT_COLUMNS_PER_ROW = 1.5


def column_splits(n_rows: int, n_cols: int, cfg: TileConfig, device: torch.device, other_programs: int = 1,
                  splits: Optional[int] = None, rows_per_program: Optional[int] = None,
                  max_splits: Optional[int] = None) -> tuple:
    """(number of splits, columns per split): enough programs for WAVES waves on the GPU's SMs when the
    row blocks (of `rows_per_program`, default block_n) alone are too few (a memory bank), else 1, and at
    most `max_splits`; a resident configuration keeps MIN_SPLIT_COLUMNS_PER_ROW columns per row in a split.
    `splits` forces a count (tests)."""
    rows_per_program = rows_per_program or cfg.block_n
    row_blocks = triton.cdiv(n_rows, rows_per_program) * other_programs
    col_tiles = triton.cdiv(n_cols, cfg.block_m)
    if splits is None:
        target = WAVES * _n_sms(device)
        want = 1 if row_blocks >= target else triton.cdiv(target, row_blocks)
        tiles_per_split = max(1, col_tiles // want)
        if cfg.resident:
            tiles_per_split = max(tiles_per_split, math.ceil(MIN_SPLIT_COLUMNS_PER_ROW * rows_per_program / cfg.block_m))
        if max_splits is not None:
            tiles_per_split = max(tiles_per_split, triton.cdiv(col_tiles, max(1, max_splits)))
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


def _sorted_codes(y: torch.Tensor) -> tuple:
    """(sorted labels, perm, codes): y sorted (stable), the permutation, and int32 codes 0, 1, ... of the
    sorted labels that keep their order and equality."""
    if y.shape[0] >= 2**30:
        raise ValueError(f"the triton backend takes fewer than 2**30 anchors, got {y.shape[0]}")
    ys, perm = torch.sort(y, stable=True)
    first = torch.ones(y.shape[0], dtype=torch.int32, device=y.device)
    first[1:] = (ys[1:] != ys[:-1]).to(torch.int32)
    return ys, perm, torch.cumsum(first, 0, dtype=torch.int32) - 1


def _self_order(y: torch.Tensor, norm: torch.Tensor, inv: torch.Tensor) -> SortedRows:
    """Self mode: rows sorted by label, labels as codes; each row's band is the range of its label."""
    _, perm, codes = _sorted_codes(y)
    lo = torch.searchsorted(codes, codes, side="left", out_int32=True)
    hi = torch.searchsorted(codes, codes, side="right", out_int32=True)
    return SortedRows(perm.to(torch.int32), codes, norm[perm], inv[perm], lo, hi)


# Reference mode: the reference rows keep their own order (a memory bank is never sorted); a partition kernel
# lists the rows whose label an anchor has, grouped by the block of group_rows sorted anchors where that label
# starts, so a block of sorted anchors finds its positives in one range of the list (plus, at its two ends,
# rows of the labels that share a group with its first or last label). At most MAX_GROUPS groups keep the
# partition's work at MAX_GROUPS per reference row; what runs outside the kernels is O(N log N) and a count
# table of groups x M / PARTITION_BLOCK integers.
GROUP_ROWS = 16
MAX_GROUPS = 256
PARTITION_BLOCK = 4096


def _group_rows(n: int) -> int:
    return GROUP_ROWS * max(1, triton.cdiv(triton.cdiv(n, GROUP_ROWS), MAX_GROUPS))


def _reference_order(q, r, yq, yr, norm_q, inv_q, unit_refs: bool):
    """(anchors, refs, band): the anchors sorted by label with dense codes and their bands into the list;
    the reference rows in their own order with the codes of the anchors' labels (-2 for other labels); the
    band kernels' columns (the list: rows, codes, inverse norms)."""
    n, m, dev = q.shape[0], r.shape[0], q.device
    if m >= 2**31:
        raise ValueError(f"the triton backend takes fewer than 2**31 reference rows, got {m}")
    ys, perm, codes = _sorted_codes(yq)
    group_rows = _group_rows(n)
    n_groups, n_blocks = triton.cdiv(n, group_rows), triton.cdiv(m, PARTITION_BLOCK)
    ref_index = torch.empty((2, m), dtype=torch.int32, device=dev)  # own order, code
    group = torch.empty(m, dtype=torch.int32, device=dev)
    counts = torch.empty((n_groups, n_blocks), dtype=torch.int32, device=dev)
    _launch(kernels.ref_codes_kernel, (n_blocks,), None, yr_ptr=yr, ya_sorted_ptr=ys, code_sorted_ptr=codes,
            perm_ptr=ref_index[0], code_ptr=ref_index[1], group_ptr=group, count_ptr=counts, M=m, NA=n,
            n_groups=n_groups, search_steps=n.bit_length(), group_rows=group_rows, BLOCK=PARTITION_BLOCK)
    if unit_refs:
        ref_norms = torch.ones((2, m), dtype=torch.float32, device=dev)
    else:
        ref_norms = torch.stack(_row_stats(r)[:2])
    ends = torch.cumsum(counts.flatten(), 0, dtype=torch.int32)
    offsets = ends - counts.flatten()
    band = torch.empty((2, m), dtype=torch.int32, device=dev)
    band_inv = torch.empty(m, dtype=torch.float32, device=dev)
    _launch(kernels.band_list_kernel, (n_blocks,), None, group_ptr=group, code_ptr=ref_index[1], inv_ptr=ref_norms[1],
            offset_ptr=offsets, list_ptr=band[0], list_code_ptr=band[1], list_inv_ptr=band_inv, M=m,
            n_groups=n_groups, BLOCK=PARTITION_BLOCK)
    group_of_row = torch.searchsorted(ys, ys, side="left") // group_rows
    anchors = SortedRows(perm.to(torch.int32), codes, norm_q[perm], inv_q[perm],
                         offsets.view(n_groups, n_blocks)[group_of_row, 0].contiguous(),
                         ends.view(n_groups, n_blocks)[group_of_row, -1].contiguous())
    refs = SortedRows(ref_index[0], ref_index[1], ref_norms[0], ref_norms[1], None, None)
    return anchors, refs, SortedRows(band[0], band[1], band_inv, band_inv, None, None), (ref_index, ref_norms)


def _row_stats(x: torch.Tensor):
    """(norm, inv_norm, bad) per input row: float32, float32, bool (row holds a NaN or Inf)."""
    rows = x.shape[0]
    norm = torch.empty(rows, dtype=torch.float32, device=x.device)
    inv = torch.empty_like(norm)
    bad = torch.empty(rows, dtype=torch.int8, device=x.device)
    block_n = 32
    align = load_align(x.shape[1], x)
    _launch(kernels.row_stats_kernel, (triton.cdiv(rows, block_n),), None, x_ptr=x, norm_ptr=norm, inv_ptr=inv,
            bad_ptr=bad, n_rows=rows, D_vecs=x.shape[1] // align, stride_n_vecs=x.stride(0) // align,
            norm_eps=NORM_EPS, ALIGN=align, BLOCK_N=block_n, BLOCK_D=_pow2(x.shape[1], 16, 128))
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
    ref_self_index: Optional[torch.Tensor]  # int32 per sorted anchor: the reference row of its own copy, or -1
    bad: torch.Tensor                  # int8 per sorted anchor: its input row holds a NaN/Inf (the sweep flags the rest)
    splits: Optional[int] = None       # forced column splits (tests); None plans them
    band: Optional[SortedRows] = None  # reference mode: the band kernels' columns (_reference_order's list)
    # reference mode: refs' (perm, labels) int32 and (norm, inv) float32 as (2, M) tensors, refs' rows views of them
    ref_tensors: Optional[tuple] = None
    # engine/_autograd.py's layout, float32, sorted order, LSE rows in base 2 (A2, B2; NaN for a bad anchor)
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
    """The label order, row norms and bands of one call. `bad` flags the anchors whose own input row holds a
    NaN or Inf; the sweep flags every anchor whose row of S does (a bad reference row, an overflowing
    product), so reference rows are never scanned here. Unit reference rows (ref_normalized, or no
    normalisation) are not read at all outside the kernels, nor sorted: only their labels are read, by a
    kernel."""
    norm_q, inv_q, bad_q = _row_stats(q)
    if not hp.normalize:
        norm_q = inv_q = torch.ones_like(norm_q)
    refs = band = ref_tensors = ref_self_index_sorted = None
    if r is None:
        anchors = _self_order(yq, norm_q, inv_q)
    else:
        anchors, refs, band, ref_tensors = _reference_order(q, r, yq, yr, norm_q, inv_q,
                                                            not hp.normalize or ref_normalized)
        if ref_self_index is not None:
            ref_self_index_sorted = ref_self_index[anchors.perm.long()].to(torch.int32)
    cfg = cfg or tile_configs(q.shape[1], q.dtype, target_arch(q.device), shared_exp(hp))[0]
    return Plan(hp, cfg, anchors, refs, ref_self_index_sorted, bad_q[anchors.perm.long()].to(torch.int8), splits,
                band=band, ref_tensors=ref_tensors)


# the widest constant shift of the negatives' sum: terms below 2^-126 of it flush to zero, and with this margin
# even 2^20 of them weigh under 2^-40 against the sum's "1"
FIXED_SHIFT_LIMIT = 64.0


def negatives_fixed_shift(hp) -> Optional[float]:
    """The sweep's constant shift for the hard-negative sum, or None for an online one: normalised S is at
    most 1, so beta2 (S - base) <= beta2 (1 - base) (a rounding above 1 adds a term of about 2^0, harmless),
    and a constant shift spares each tile a row maximum and a rescaling exp2."""
    if not hp.normalize:
        return None
    bound = max(0.0, hp.beta * LOG2E * (1.0 - hp.base))
    return bound if bound <= FIXED_SHIFT_LIMIT else None


def elementwise_sweep(cfg: TileConfig, dtype: torch.dtype, arch: str) -> bool:
    """Does the sweep keep its max and sum per element (sweep_kernel's ELEMENTWISE)? While they cost at most 32
    registers each (4096 elements a tile on 4 warps), except beside Hopper's float32 dots, which run on the CUDA
    cores and leave no registers for them (spills under Triton 3.6 and 3.9); sm_89's float32 sweep, by
    contrast, spills with the per-tile reductions (kernel_stats.py)."""
    if dtype == torch.float32 and arch_family(arch) == "hopper":
        return False
    return cfg.block_n * cfg.row_groups * cfg.block_m <= 4096


def _forward(plan: Plan, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-anchor losses (float32, input order); leaves the saved statistics in plan.stats."""
    hp, cfg, a = plan.hp, plan.cfg, plan.anchors
    b = a if plan.self_mode else plan.refs
    n, d = q.shape
    m = r.shape[0]
    dev = q.device
    # unread unless REF_SELF_INDEX_OF_ROWS
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else a.perm
    sweep_rows = cfg.block_n * cfg.row_groups
    n_splits, cols_per_split = column_splits(n, m, cfg, dev, splits=plan.splits, rows_per_program=sweep_rows)
    # the band kernels split their block's band as the sweep splits the columns: enough programs for a memory
    # bank's few anchor blocks (the band's width is not known here without a device sync)
    band_splits, _ = column_splits(n, m, cfg, dev, splits=plan.splits)
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty((N_STATS, n), dtype=torch.float32, device=dev)
    parts = torch.empty(3, n_splits * n, dtype=torch.float32, device=dev)
    band_parts = torch.empty(3, band_splits * n, dtype=torch.float32, device=dev)  # min_pos, positives' shift, sum
    # unread (placeholders) unless counting
    count_parts = torch.empty(n_splits * n if plan.count else 1, dtype=torch.int32, device=dev)
    pos_count_parts = torch.empty(band_splits * n if plan.count else 1, dtype=torch.int32, device=dev)
    counts = torch.zeros((2, n) if plan.count else (2, 1), dtype=torch.int32, device=dev)
    align = load_align(d, q, r)
    rows = dict(a_ptr=q, a_perm_ptr=a.perm, inv_a_ptr=a.inv, ya_ptr=a.labels, b_ptr=r, b_perm_ptr=b.perm,
                inv_b_ptr=b.inv, yb_ptr=b.labels,
                NA=n, NB=m, D_vecs=d // align, stride_a_vecs=q.stride(0) // align, stride_b_vecs=r.stride(0) // align,
                ALIGN=align, NORMALIZE=hp.normalize, DOT_F32=_dot_f32(q.dtype))
    band_side = b if plan.band is None else plan.band
    band_rows = dict(rows, band_lo_ptr=a.band_lo, band_hi_ptr=a.band_hi, b_perm_ptr=band_side.perm,
                     inv_b_ptr=band_side.inv, yb_ptr=band_side.labels)
    band_grid = (triton.cdiv(n, cfg.block_n), band_splits)
    if hp.mining:
        _launch(kernels.band_min_kernel, band_grid, cfg, **band_rows, ref_self_index_ptr=ref_self_index,
                min_pos_part_ptr=band_parts[0], n_band_splits=band_splits,
                REF_SELF_INDEX_MODE=plan.ref_self_index_mode)
        # once here, not in each sweep program (which would load every split's minima: bytes the bank's
        # sweep cannot afford); exact in any order
        torch.amin(band_parts[0].view(band_splits, n), dim=0, out=stats[MIN_POS])
    else:
        stats[MIN_POS].fill_(float("inf"))
    fixed_shift = negatives_fixed_shift(hp)
    _launch(kernels.sweep_kernel, (triton.cdiv(n, sweep_rows), n_splits), cfg, **rows, min_pos_ptr=stats[MIN_POS],
            band_lo_ptr=a.band_lo, band_hi_ptr=a.band_hi,
            max_neg_part_ptr=parts[0], shift_part_ptr=parts[1], sum_part_ptr=parts[2], count_part_ptr=count_parts,
            cols_per_split=cols_per_split, beta2=hp.beta * LOG2E, base=hp.base, eps=hp.epsilon,
            fixed_shift=0.0 if fixed_shift is None else fixed_shift, SELF_MODE=plan.self_mode, MINING=hp.mining,
            COUNT_PAIRS=plan.count, FIXED_SHIFT=fixed_shift is not None,
            ELEMENTWISE=elementwise_sweep(cfg, q.dtype, target_arch(dev)), ROW_GROUPS=cfg.row_groups)
    _launch(kernels.finish_kernel, band_grid, cfg, **band_rows, ref_self_index_ptr=ref_self_index,
            max_neg_part_ptr=parts[0], pos_shift_part_ptr=band_parts[1], pos_sum_part_ptr=band_parts[2],
            pos_count_part_ptr=pos_count_parts, n_splits=n_splits, n_band_splits=band_splits,
            alpha2=hp.alpha * LOG2E, base=hp.base, eps=hp.epsilon,
            REF_SELF_INDEX_MODE=plan.ref_self_index_mode, MINING=hp.mining, COUNT_PAIRS=plan.count)
    loss_rows = 64
    _launch(kernels.loss_kernel, (triton.cdiv(n, loss_rows),), None, a_perm_ptr=a.perm, bad_ptr=plan.bad,
            max_neg_part_ptr=parts[0], shift_part_ptr=parts[1],
            sum_part_ptr=parts[2], count_part_ptr=count_parts, pos_shift_part_ptr=band_parts[1],
            pos_sum_part_ptr=band_parts[2], pos_count_part_ptr=pos_count_parts, loss_ptr=loss,
            max_neg_ptr=stats[MAX_NEG], lse_pos_ptr=stats[LSE_POS],
            lse_neg_ptr=stats[LSE_NEG], counts_ptr=counts, NA=n, n_splits=n_splits, n_band_splits=band_splits,
            alpha2=hp.alpha * LOG2E, beta2=hp.beta * LOG2E, COUNT_PAIRS=plan.count, BLOCK_N=loss_rows)
    plan.stats = stats
    plan.counts = counts if plan.count else None
    return loss


# rows of float32 partial sums per SM that the backward may hold when the rows alone are too few to fill
# the GPU (one 64-row block per SM: 8448 rows on 132 SMs, 8.7 MB at D = 256)
PARTIAL_ROWS_PER_SM = 64


def backward_splits(na: int, nb: int, d: int, cfg: TileConfig, device: torch.device,
                    splits: Optional[int] = None) -> tuple:
    """(column splits, columns per split, whether the sums go through float32 partial sums) of the backward
    that pairs `na` rows with `nb` columns. The partial sums take n_splits * na * d * 4 bytes, the step's one
    O(N * D) extra: the splits are capped so that they hold at most max(na, SMs * PARTIAL_ROWS_PER_SM) rows,
    one float32 copy of the rows or one wave of 64-row accumulators, whichever is larger (docs/semantics.md
    "Memory"). A resident program's whole-D accumulator leaves no registers for the normalisation chain:
    it stores its sums too, and combine_grad_kernel finishes them in narrow D-slices."""
    d_slices = triton.cdiv(d, cfg.block_dout(d))
    most = max(1, max(na, _n_sms(device) * PARTIAL_ROWS_PER_SM) // na)
    n_splits, cols_per_split = column_splits(na, nb, cfg, device, other_programs=d_slices, splits=splits,
                                             max_splits=most)
    return n_splits, cols_per_split, n_splits > 1 or cfg.resident


def accumulated_gradient(kernel, cfg: TileConfig, splits: Optional[int], a_rows: torch.Tensor, b_rows: torch.Tensor,
                         a: SortedRows, b: SortedRows, g_scale: torch.Tensor, ref_self_index: torch.Tensor,
                         normalize: bool, **weight_args) -> torch.Tensor:
    """Gradient of the rows of `a_rows` (in its dtype, input order), pairing them with every row of b: `kernel`
    (backward_kernel or a pair loss's) over column splits, with `weight_args` (its loss's), then
    combine_grad_kernel where the sums went through float32 partial sums."""
    na, d = a_rows.shape
    nb = b_rows.shape[0]
    dev = a_rows.device
    out = torch.empty((na, d), dtype=a_rows.dtype, device=dev)
    block_dout = cfg.block_dout(d)
    d_slices = triton.cdiv(d, block_dout)
    row_blocks = triton.cdiv(na, cfg.block_n)
    n_splits, cols_per_split, split = backward_splits(na, nb, d, cfg, dev, splits)
    part = torch.empty((n_splits * na, d) if split else (1, 1), dtype=torch.float32, device=dev)
    x_dot_dx = torch.empty(n_splits * na if split else 1, dtype=torch.float32, device=dev)
    align = load_align(d, a_rows, b_rows)
    _launch(kernel, (row_blocks, n_splits, d_slices), cfg, backward=True,
            a_ptr=a_rows, a_perm_ptr=a.perm, inv_a_ptr=a.inv, norm_a_ptr=a.norm, ya_ptr=a.labels,
            ref_self_index_rows_ptr=ref_self_index,
            b_ptr=b_rows, b_perm_ptr=b.perm, inv_b_ptr=b.inv, yb_ptr=b.labels, ref_self_index_cols_ptr=ref_self_index,
            g_scale_ptr=g_scale, out_ptr=out, part_ptr=part, x_dot_dx_part_ptr=x_dot_dx,
            NA=na, NB=nb, D_vecs=d // align, stride_a_vecs=a_rows.stride(0) // align,
            stride_b_vecs=b_rows.stride(0) // align, stride_out_vecs=out.stride(0) // align, ALIGN=align,
            cols_per_split=cols_per_split, norm_eps=NORM_EPS, NORMALIZE=normalize, DOT_F32=_dot_f32(a_rows.dtype),
            SCALE_WEIGHTS=_scale_weights(a_rows.dtype, cfg), SPLIT=split, BLOCK_DOUT=block_dout, **weight_args)
    if split:  # no recompute here: narrow D-slices cost nothing and keep the accumulator small
        combine_n, combine_dout = 32, min(block_dout, 128)
        _launch(kernels.combine_grad_kernel, (triton.cdiv(na, combine_n), triton.cdiv(d, combine_dout)), None,
                a_ptr=a_rows, a_perm_ptr=a.perm, inv_a_ptr=a.inv, norm_a_ptr=a.norm, g_scale_ptr=g_scale,
                part_ptr=part, x_dot_dx_part_ptr=x_dot_dx, out_ptr=out, NA=na, D_vecs=d // align,
                stride_a_vecs=a_rows.stride(0) // align, stride_out_vecs=out.stride(0) // align, n_splits=n_splits,
                norm_eps=NORM_EPS, NORMALIZE=normalize, ALIGN=align, BLOCK_N=combine_n, BLOCK_DOUT=combine_dout)
    return out


def _backward(plan: Plan, a_rows: torch.Tensor, b_rows: torch.Tensor, a: SortedRows, b: SortedRows,
              g_sorted: torch.Tensor, g_scale: torch.Tensor, *, anchor_rows: bool, anchor_cols: bool,
              ref_self_index_mode: int) -> torch.Tensor:
    """The MS loss's gradient of the rows of `a_rows` (accumulated_gradient with backward_kernel)."""
    hp, cfg, stats = plan.hp, plan.cfg, plan.stats
    shared = anchor_rows and anchor_cols and shared_exp(hp)
    # each anchor's factors of the shared exponential (unread without it): pf = g 2^-A2, nf = g 2^-B2
    pos_factor = g_sorted * torch.exp2(-stats[LSE_POS]) if shared else g_sorted
    neg_factor = g_sorted * torch.exp2(-stats[LSE_NEG]) if shared else g_sorted
    # unread unless a REF_SELF_INDEX_OF_* mode
    ref_self_index = plan.ref_self_index if plan.ref_self_index is not None else a.perm
    return accumulated_gradient(
        kernels.backward_kernel, cfg, plan.splits, a_rows, b_rows, a, b, g_scale, ref_self_index, hp.normalize,
        g_ptr=g_sorted, min_pos_ptr=stats[MIN_POS], max_neg_ptr=stats[MAX_NEG], lse_pos_ptr=stats[LSE_POS],
        lse_neg_ptr=stats[LSE_NEG], pos_factor_ptr=pos_factor, neg_factor_ptr=neg_factor,
        alpha2=hp.alpha * LOG2E, beta2=hp.beta * LOG2E, base=hp.base, eps=hp.epsilon,
        ANCHOR_ROWS=anchor_rows, ANCHOR_COLS=anchor_cols, REF_SELF_INDEX_MODE=ref_self_index_mode,
        MINING=hp.mining, SKIP_ZERO_TILES=cfg.skip_zero_tiles, NEGATIVE_TILES=negative_tiles(cfg, a_rows.shape[1]),
        SHARED_EXP=shared)


def shared_exp(hp) -> bool:
    """Does the self-mode backward compute G_ij and G_ji with one exp2 (backward_kernel's SHARED_EXP)? Where S
    is normalised (at most 1) and the exponents beta2 (S - base) and -alpha2 (S - base) stay below
    FIXED_SHIFT_LIMIT: the shared exponential is then at most 2^64, each anchor's factor g 2^-A2 (2^-B2) at
    most 1 and above 2^-126 (A2, B2 < 64 + log2 N), and an exponential that flushes to zero belongs to a weight
    below 2^-126."""
    if not hp.normalize:
        return False
    return max(hp.beta * (1.0 - hp.base), hp.alpha * (1.0 + hp.base)) * LOG2E <= FIXED_SHIFT_LIMIT


def negative_tiles(cfg: TileConfig, d: int) -> bool:
    """Does the backward give tiles of negatives only their own weights (backward_kernel's NEGATIVE_TILES)?
    On the resident (Hopper) configurations up to D = 256, where its instructions were counted and it compiles
    without spills. Not at D = 512 (Triton 3.6): the (64, 512) accumulator leaves the registers of one copy of
    the weights' code, and a second spilled; nor on the re-reading configurations of the other targets, where
    the second copy spilled float16 on sm_80 (kernel_stats.py)."""
    return cfg.resident and d <= 256


def _scale_weights(dtype: torch.dtype, cfg: TileConfig) -> bool:
    """Fold the column norms into the weights (W inv_b) rather than scale the column tile (b inv_b)? Yes but for
    float16, where W inv_b can pass its range: one multiply per weight instead of a multiply and two
    conversions per element of the column tile, and on the resident configurations the tile then stays in
    shared memory as loaded (since the backward shares its exp2 the folded form also takes fewer registers;
    kernel_stats.py)."""
    return dtype != torch.float16


# float16 weights are scaled by this before the gradient's half-precision dot and the sums scaled back: a
# weight below 2^-14 (6.1e-5) of the largest would be subnormal in float16 and lose bits (10^5 comparable
# hard negatives give weights of about 1e-5 each). After _unit_upstream every |weight| <= 1, |G + G^T| <= 2,
# so 2^14 keeps them below float16's largest (65504); a power of two, so the scaling itself is exact.
FLOAT16_WEIGHT_SCALE = 2.0 ** 14


def _unit_upstream(g: torch.Tensor, weight_scale: float = 1.0, magnitude: Optional[torch.Tensor] = None):
    """(g / c * weight_scale, c / weight_scale) with c = max|magnitude| (default g; 1 when that is 0 or not
    finite), so the weights fed to half-precision dots are at most 2 * weight_scale in magnitude even for
    g = 1/N with a large N, where `magnitude` bounds each anchor's weights (g alone for the MS loss); the
    kernels multiply the second factor back in."""
    g = g.to(torch.float32).contiguous()
    c = (g if magnitude is None else magnitude).abs().amax().reshape(1)
    c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
    return g / c * weight_scale, c / weight_scale


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels step along D with stride 1 (vectorised loads); other layouts are copied once."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def _candidates(q: torch.Tensor, cfg: Optional[TileConfig], hp) -> list:
    """A forced configuration alone, else the target's list for these hyper-parameters, first choice first."""
    return [cfg] if cfg is not None else tile_configs(q.shape[1], q.dtype, target_arch(q.device), shared_exp(hp))


def _backward_all(plan: Plan, q: torch.Tensor, r: Optional[torch.Tensor], g: torch.Tensor, needs: tuple) -> tuple:
    """(dq, dr) of the loss call that `plan` holds the statistics of, for upstream gradient g (None where
    `needs` says no gradient is wanted)."""
    g_unit, g_scale = _unit_upstream(g, FLOAT16_WEIGHT_SCALE if q.dtype == torch.float16 else 1.0)
    g_sorted = g_unit[plan.anchors.perm.long()]
    dq = dr = None
    if plan.self_mode:
        if needs[0]:  # dX_i = sum_j (G_ij + G_ji) X_hat_j in one launch
            dq = _backward(plan, q, q, plan.anchors, plan.anchors, g_sorted, g_scale,
                           anchor_rows=True, anchor_cols=True, ref_self_index_mode=REF_SELF_INDEX_DIAGONAL)
        return dq, None
    if needs[0]:
        dq = _backward(plan, q, r, plan.anchors, plan.refs, g_sorted, g_scale,
                       anchor_rows=True, anchor_cols=False, ref_self_index_mode=plan.ref_self_index_mode)
    if needs[1]:  # skipped when the reference set is a frozen memory bank
        dr = _backward(plan, r, q, plan.refs, plan.anchors, g_sorted, g_scale, anchor_rows=False,
                       anchor_cols=True, ref_self_index_mode=REF_SELF_INDEX_NONE
                       if plan.ref_self_index is None else REF_SELF_INDEX_OF_COLS)
    return dq, dr


def tuning_key(plan: Plan, q: torch.Tensor, r: Optional[torch.Tensor], forced: Optional[TileConfig]) -> tuple:
    """What a configuration choice is kept for: the device, the problem's switches, dtype, D, the log2
    buckets of N and M, whether the backward shares its exp2 (it changes the candidates), and a forced
    configuration (tests)."""
    m = q.shape[0] if r is None else r.shape[0]
    return (_device_key(q.device), q.dtype, q.shape[1], _log2_bucket(q.shape[0]), _log2_bucket(m),
            plan.ref_self_index_mode, plan.hp.mining, plan.hp.normalize, shared_exp(plan.hp), forced)


def _choose_plan(plan: Plan, q: torch.Tensor, r: Optional[torch.Tensor], candidates: list, key: tuple) -> Plan:
    """Sets plan.cfg: the first candidate, or on a GPU the one whose forward and backward (of the anchors'
    gradient) together run fastest, timed once per key. A candidate whose launch fails (too much shared
    memory, say) is never chosen."""
    r_ = q if r is None else r
    g = torch.ones(q.shape[0], dtype=torch.float32, device=q.device)

    def trial(cfg: TileConfig) -> None:
        step = Plan(plan.hp, cfg, plan.anchors, plan.refs, plan.ref_self_index, plan.bad, plan.splits)
        _forward(step, q, r_)
        _backward_all(step, q, r, g, (True, False))

    plan.cfg = _choose_config(key, candidates, trial, q.device)
    return plan


class NoConfigurationFits(RuntimeError):
    """Every candidate configuration failed to launch for want of GPU resources."""


def _first_that_launches(plan: Plan, candidates: list, run):
    """run() with plan.cfg set to plan.cfg, then to each later candidate, until one launches without
    Triton's out-of-resources error; raises NoConfigurationFits after the last."""
    start = candidates.index(plan.cfg) if plan.cfg in candidates else 0
    errors = []
    for cfg in candidates[start:]:
        plan.cfg = cfg
        try:
            return run()
        except triton.runtime.errors.OutOfResources as exc:
            errors.append(f"{cfg}: {exc}")
    raise NoConfigurationFits("; ".join(errors))


def _fallback_warning(exc: Exception) -> None:
    warnings.warn(f"ms_fused: no triton configuration fits this GPU ({exc}); the torch backend computes this "
                  f"loss instead (same results, slower)", RuntimeWarning, stacklevel=3)


def _torch_gradients(problem: Problem, g: torch.Tensor, needs: tuple) -> tuple:
    """(dq, dr) from the torch backend, for when no triton configuration launches."""
    from ..torch import backend as torch_backend
    return torch_backend.gradients(problem, g, needs)


def per_anchor_loss(problem: Problem, config: Optional[TileConfig] = None, splits: Optional[int] = None,
                    count_pairs: bool = False):
    """(N,) float32 per-anchor losses attached to autograd (with `count_pairs`, also the (2, N) mined
    positives and negatives per anchor), through the torch ops of ms_op.py; `config` and `splits`
    force the tile configuration and column splits (tests)."""
    from . import ms_op as triton_op  # it imports this module
    return triton_op.per_anchor_loss(problem, config, splits, count_pairs)

__all__ = ["unavailable_reason", "per_anchor_loss", "TileConfig", "tile_configs", "target_arch",
           "column_splits", "record_launches", "make_plan"]
