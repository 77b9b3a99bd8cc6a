"""The triton kernels' work and compiled form, measured without a GPU.

    python benchmarks/kernel_stats.py --readme README.md   # everything: writes benchmarks/results/kernel_stats.{md,json}
                                                           # and README's two kernel_stats blocks
    python benchmarks/kernel_stats.py --compile-only --arch sm_80,sm_90 --json out.json  # compile statistics only
    python benchmarks/kernel_stats.py --readme README.md --compile-with /path/to/other/python:sm_90
                                                           # also sm_90 under that interpreter's Triton

1. Similarity passes: under Triton's interpreter, every tl.dot's multiply-adds are counted and divided
   by N*M*D (one pass = one full similarity GEMM), for the forward and for forward + backward, with the
   first-choice tile configuration a GPU runs. The batches are clustered like the benchmark's, so the
   backward's skipped zero tiles are what training data gives.
2. Programs launched per kernel (the split plan assumes a 132-SM GPU when none is present).
3. Bytes loaded per multiply-add: in the same interpreted run, the bytes of every tl.load (elements a mask
   switches off excluded) of one launch over the multiply-adds of that launch's tl.dots, per kernel.
4. Roofline: each kernel's time predicted as the longer of its tensor-core time (its multiply-adds at the
   measured bf16 torch.mm rate, --peak-tflops) and its load time (its loaded bytes at an L2 bandwidth,
   --l2-tbps, a lead rather than a measurement), over one torch.mm of the same shape at the peak rate; per
   kernel, per forward and per step, at N = 32768, D = 512, bf16 and at the memory-bank point Its
   multiply-adds and bytes come from a second interpreted run at the counted size in which every launch takes
   the columns per split that the predicted point plans (capped at the counted columns: an upper bound on its
   bytes per multiply-add), not the counted size's own, more finely split plan of 3.
5. Compile statistics per GPU family, without a GPU: Triton's real compiler runs against a stub driver that
   answers the target (nothing is launched), with MS_FUSED_TRITON_ARCH set so the backend picks that
   target's configurations. NVIDIA: Triton's own `ptxas -v` log (registers, spills), shared memory from the
   kernel's metadata, matrix instructions, asynchronous copies (cp.async) and 2-byte loads counted in the
   PTX. AMD (gfx942): VGPRs, SGPRs, spills and
   scratch from the amdgcn assembly's metadata, LDS from the kernel's metadata, v_mfma counted in it.
   Occupancy (CTAs per SM or workgroups per CU) follows from each target's limits (ARCHS, occupancy()).
6. Instructions per tile, read from the compiled code, and the roofline with every ceiling (tensor, bytes, issue,
   MUFU): benchmarks/sass_stats.py, which compiles through stub_compiler() and counts bytes with count_work().
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)

# (name, mode, N, M, D, dtype, K samples per class, reference rows need grad)
CASES = [
    ("self mode", "self", 2048, 2048, 512, "bfloat16", 8, None),
    ("memory bank", "memory", 256, 32768, 128, "bfloat16", 8, False),
]
# where each counted case is predicted (roofline): name, N, M, D, dtype
TARGETS = {
    "self mode": ("N = 32768, D = 512, bf16", 32768, 32768, 512, "bfloat16"),
    "memory bank": ("N = 256 against M = 100 000, D = 128, bf16 (the memory-bank point)", 256, 100_000, 128,
                    "bfloat16"),
}
# the kernel variants compiled per target: each dtype's first configuration, in every mode, default kernels and
# those that count mined pairs
COMPILE_CASES = [
    ("self", 300, 300, 512, "bfloat16"), ("self", 300, 300, 128, "bfloat16"), ("memory", 100, 700, 128, "bfloat16"),
    ("reference", 100, 90, 96, "bfloat16"), ("reference", 100, 90, 512, "bfloat16"),
    # rows that are not multiples of 16 elements: 4 (D = 100) and 2 (D = 130) elements per load
    ("self", 300, 300, 100, "bfloat16"), ("self", 300, 300, 130, "bfloat16"),
    ("self", 300, 300, 512, "float16"), ("self", 300, 300, 128, "float16"), ("reference", 100, 90, 96, "float16"),
    ("self", 300, 300, 512, "float32"), ("self", 300, 300, 128, "float32"), ("reference", 100, 90, 96, "float32"),
    # N large enough that no launch splits its columns: the variants a training-size batch runs
    ("self", 34000, 34000, 512, "bfloat16"), ("self", 34000, 34000, 512, "float16"), ("self", 34000, 34000, 512, "float32"),
]
# the pair-weighting losses' kernel variants (ms_fused/engine/triton/pair_kernels.py), for each loss: self mode in
# bfloat16 (at D = 128 and at the widest resident D) and float32, a reference set with own copies and both gradients
# (float16 differs from bfloat16 by its scaled column tile only: checked clean by hand, left out of CI's time)
PAIR_LOSS_NAMES = ("supcon", "ntxent", "circle")
PAIR_COMPILE_CASES = [
    ("self", 300, 300, 128, "bfloat16"), ("self", 300, 300, 512, "bfloat16"), ("reference", 100, 90, 96, "bfloat16"),
    ("self", 300, 300, 128, "float32"),
]

# ---- the roofline's rates --------------------------------------------------------------------------------
PEAK_TFLOPS = 788.0
PEAK_SOURCE = ("a bfloat16 torch.mm measured on an H200, as the roofline's issue gives it (that measurement is not "
               "among this repository's results)")
L2_TBPS = 7.0
L2_SOURCE = ("a lead, not a measurement on our GPU: about 7 TB/s, scaled from a published H100 L2 bandwidth "
             "measurement")
BYTES_PER_MAC_GOAL = 0.03   # every kernel doing >= MAC_SHARE_GOAL of a step's multiply-adds loads at most this
MAC_SHARE_GOAL = 0.10
FORWARD_GOAL, STEP_GOAL = 1.3, 3.0   # predicted time over one mm at N = 32768, D = 512, bf16


# ---- the compile targets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str
    gpus: str
    vendor: str                 # "cuda" or "hip"
    smem_per_block: int         # bytes a CTA (workgroup) may use at most
    smem_per_sm: int            # bytes per SM (CU)
    max_warps: int = 64         # resident warps per SM (NVIDIA)
    max_ctas: int = 32          # resident CTAs per SM (NVIDIA)
    regs_per_sm: int = 65536    # 32-bit registers per SM (NVIDIA)
    smem_reserved: int = 1024   # shared memory the system reserves per CTA (NVIDIA, sm_80 on)
    matrix: str = ""            # the matrix instruction bf16/fp16 dots must become: its name in the report
    matrix_pattern: str = ""    # ... and a regular expression for it in the PTX / amdgcn
    copy: str = ""              # the asynchronous global-to-shared copy the column-tile kernels must use
    copy_pattern: str = ""      # ... and a regular expression for it in the PTX
    asserted: bool = True       # the CI test asserts spills, shared memory, matrix instructions and copies

    @property
    def capability(self) -> int:
        return int(self.name[3:]) if self.vendor == "cuda" else 0


# cp.async (sm_80 on; 4, 8 or 16 bytes a thread), or a TMA bulk copy
ASYNC_COPY = r"\bcp\.async\.(?:c[ag]\.shared\.global|bulk)"
# a scalar 2-byte global load: too narrow for cp.async (the pipeliner leaves such a load synchronous)
NARROW_LOAD = r"\bld\.global(?:\.(?!v\d)[\w:]+)*\.[bus]16\b"
# the kernels that stream column tiles through a loop: pipelined (2 or more stages), each must copy them
# asynchronously where the target can
COLUMN_TILE_KERNELS = ("band_min_kernel", "sweep_kernel", "finish_kernel", "backward_kernel", "pair_sweep_kernel",
                       "pair_backward_kernel")

ARCHS = {a.name: a for a in [
    Arch("sm_75", "T4, RTX 20", "cuda", 65536, 65536, max_warps=32, max_ctas=16, smem_reserved=0,
         matrix="mma.sync", matrix_pattern=r"\bmma\.sync\.aligned", asserted=False),
    Arch("sm_80", "A100", "cuda", 166912, 167936, max_warps=64, max_ctas=32,
         matrix="mma.sync", matrix_pattern=r"\bmma\.sync\.aligned", copy="cp.async", copy_pattern=ASYNC_COPY),
    Arch("sm_86", "RTX 30, A10", "cuda", 101376, 102400, max_warps=48, max_ctas=16,
         matrix="mma.sync", matrix_pattern=r"\bmma\.sync\.aligned", copy="cp.async", copy_pattern=ASYNC_COPY),
    Arch("sm_89", "RTX 40, L4, L40", "cuda", 101376, 102400, max_warps=48, max_ctas=24,
         matrix="mma.sync", matrix_pattern=r"\bmma\.sync\.aligned", copy="cp.async", copy_pattern=ASYNC_COPY),
    Arch("sm_90", "H100, H200 (compiled as sm_90a)", "cuda", 232448, 233472, max_warps=64, max_ctas=32,
         matrix="wgmma", matrix_pattern=r"\bwgmma\.mma_async", copy="cp.async", copy_pattern=ASYNC_COPY),
    Arch("sm_100", "B200, GB200 (compiled as sm_100a)", "cuda", 232448, 233472, max_warps=64, max_ctas=32,
         matrix="tcgen05.mma", matrix_pattern=r"\btcgen05\.mma", copy="cp.async", copy_pattern=ASYNC_COPY),
    Arch("gfx942", "MI300 (ROCm)", "hip", 65536, 65536, smem_reserved=0,
         matrix="v_mfma", matrix_pattern=r"\bv_mfma_"),
]}
DEFAULT_ARCHS = ",".join(ARCHS)
# AMD CDNA3 (gfx942): 4 SIMDs per CU, 512 VGPRs (arch + accumulation) per SIMD lane, at most 8 waves per SIMD,
# VGPRs allocated in granules of 8
AMD_SIMDS, AMD_VGPRS, AMD_MAX_WAVES, AMD_VGPR_GRANULE = 4, 512, 8, 8
OCCUPANCY_FORMULAS = [
    "NVIDIA: registers per warp = ceil(registers x 32 / 256) x 256; CTAs per SM = min(floor(floor(65536 / "
    "registers per warp) / warps), floor(shared memory per SM / (shared memory + reserved)), floor(max warps "
    "per SM / warps), max CTAs per SM), with per SM: shared memory sm_75 64 KB, sm_80 164 KB, sm_86 and sm_89 "
    "100 KB, sm_90 228 KB; max warps sm_75 32, sm_80 64, sm_86 48, sm_89 48, sm_90 64; max CTAs sm_75 16, "
    "sm_80 32, sm_86 16, sm_89 24, sm_90 32; reserved 1 KB per CTA from sm_80 on, none on sm_75.",
    "gfx942: waves per SIMD = min(8, floor(512 / ceil8(VGPRs))) (VGPRs = arch + accumulation registers); "
    "workgroups per CU = min(floor(waves per SIMD / ceil(warps / 4)), floor(64 KB / LDS)); SGPR limits "
    "left out (the amdgcn's own `Occupancy` line is reported beside it).",
]


def amd_waves_per_simd(vgprs: int) -> int:
    """Waves one SIMD holds at once as far as VGPRs go (gfx942)."""
    return min(AMD_MAX_WAVES, AMD_VGPRS // (-(-max(1, vgprs) // AMD_VGPR_GRANULE) * AMD_VGPR_GRANULE))


def occupancy(arch: Arch, registers: int, warps: int, shared: int) -> int:
    """CTAs per SM (NVIDIA) or workgroups per CU (AMD) that the target's limits allow; 0 = does not fit."""
    if arch.vendor == "hip":
        by_regs = amd_waves_per_simd(registers) // -(-warps // AMD_SIMDS)
        by_smem = arch.smem_per_sm // shared if shared else by_regs
        return min(by_regs, by_smem) if shared <= arch.smem_per_block else 0
    if shared > arch.smem_per_block:
        return 0
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (arch.regs_per_sm // max(1, regs_per_warp)) // warps
    per_cta = shared + arch.smem_reserved
    by_smem = arch.smem_per_sm // per_cta if per_cta else arch.max_ctas  # a kernel without shared memory
    return min(by_regs, by_smem, arch.max_warps // warps, arch.max_ctas)


# ---- 1 to 3: counted under the interpreter ---------------------------------------------------------------

def _inputs(mode, n, m, d, dtype, k, grad_ref):
    import impls
    dt = impls.DTYPES[dtype]
    if mode == "self":
        x, y = impls.make_batch(n, d, dt, "cpu", seed=0, samples_per_class=k)
        return dict(embeddings=x.requires_grad_(), labels=y)
    x, y, r, yr, ref_self_index = impls.make_memory_bank(n, m, d, dt, "cpu", seed=0, samples_per_class=k)
    if mode == "reference":
        ref_self_index = None
    return dict(embeddings=x.requires_grad_(), labels=y, ref_emb=r.requires_grad_(bool(grad_ref)),
                ref_labels=yr, ref_self_index=ref_self_index)


def _launch_config(kwargs: dict) -> str:
    """The tile shape of a launch as its keyword arguments give it: every BLOCK_* and the warps and stages."""
    first = ("BLOCK_N", "BLOCK_M", "BLOCK_D")
    blocks = [k for k in first if k in kwargs] + sorted(k for k in kwargs if k.startswith("BLOCK") and k not in first)
    parts = [f"{k}={kwargs[k]}" for k in blocks]
    parts += [f"{label}={kwargs[k]}" for k, label in (("num_warps", "warps"), ("num_stages", "stages")) if k in kwargs]
    return " ".join(parts)


class _InterpreterCounter:
    """Hooks Triton's interpreter: one record per kernel launch with its multiply-adds (tl.dot) and the bytes
    of its loads. Every load path funnels into create_masked_load in the Triton releases this supports; any
    other `create_*load` path is hooked too and counted by its result only when it did not reach that funnel."""

    LOAD_METHODS = re.compile(r"^create_(\w+_)?load$|^create_descriptor_gather$")

    def __init__(self):
        self.launches = []
        self.phase = "forward"
        self._depth = []
        self._saved = []

    def _current(self):
        if not self.launches:
            raise RuntimeError("a tl.dot or tl.load outside any recorded launch")
        return self.launches[-1]

    def __enter__(self):
        import numpy as np
        from triton.runtime import interpreter

        builder, function = interpreter.InterpreterBuilder, interpreter.InterpretedFunction
        counter = self

        def hook(owner, name, make):
            real = getattr(owner, name)
            self._saved.append((owner, name, real))
            setattr(owner, name, make(real))

        def run(real):
            def counted_run(fn, *args, grid, warmup, **kwargs):
                if warmup:
                    return real(fn, *args, grid=grid, warmup=warmup, **kwargs)
                g = grid(kwargs) if callable(grid) else grid
                g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
                counter.launches.append(dict(kernel=fn.fn.__name__, phase=counter.phase, programs=math.prod(g),
                                             config=_launch_config(kwargs), macs=0, load_bytes=0))
                return real(fn, *args, grid=grid, warmup=warmup, **kwargs)
            return counted_run

        def dot(real):
            def counted_dot(builder_, a, b, *args, **kwargs):
                counter._current()["macs"] += int(np.prod(a.data.shape[:-1])) * a.data.shape[-1] * b.data.shape[-1]
                return real(builder_, a, b, *args, **kwargs)
            return counted_dot

        def load(name):
            def make(real):
                def counted_load(builder_, *args, **kwargs):
                    counter._depth.append(False)
                    try:
                        result = real(builder_, *args, **kwargs)
                    finally:
                        reached_funnel = counter._depth.pop()
                    if name == "create_masked_load":
                        ptrs = args[0] if args else kwargs["ptrs"]
                        mask = args[1] if len(args) > 1 else kwargs["mask"]
                        live = int(np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).sum())
                        counter._current()["load_bytes"] += live * result.data.dtype.itemsize
                    elif not reached_funnel:
                        counter._current()["load_bytes"] += int(result.data.size) * result.data.dtype.itemsize
                    else:
                        return result
                    counter._depth[:] = [True] * len(counter._depth)
                    return result
                return counted_load
            return make

        hook(function, "run", run)
        hook(builder, "create_dot", dot)
        for name in dir(builder):
            if self.LOAD_METHODS.match(name) and callable(getattr(builder, name)):
                hook(builder, name, load(name))
        return self

    def __exit__(self, *exc):
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()


class _SplitPlan:
    """Hooks the triton backend's column_splits (benchmark only; nothing a user calls changes): records every
    launch's column split beside the split that the same launch plans at the case's TARGETS point, and with
    as_target=True gives the launch the point's columns per split, capped at the counted columns (a single
    split then). The point's rows and columns are the counted ones mapped counted -> predicted (self mode
    2048 -> 32768; the bank's 256 -> 256 and 32768 -> 100 000); its configuration must be the counted
    one (the first choice depends on D, dtype and target only), else the count stops."""

    def __init__(self, counter: "_InterpreterCounter", case, as_target: bool):
        _, _, n, m, d, dtype, _, _ = case
        _, n_t, m_t, d_t, dtype_t = TARGETS[case[0]]
        if (n == m and n_t != m_t) or (d, dtype) != (d_t, dtype_t):
            raise ValueError(f"{case[0]}: no launch-by-launch map from the counted size to its TARGETS point")
        self.counter, self.as_target, self.to_target = counter, as_target, {n: n_t, m: m_t}
        self.d, self.dtype = d, dtype
        self.plans = []

    def __enter__(self):
        import torch
        import triton

        from ms_fused.engine.triton import backend as tb
        real = self.real = tb.column_splits
        plan = self

        def planned(n_rows, n_cols, cfg, device, other_programs=1, splits=None, rows_per_program=None,
                    max_splits=None):
            own = real(n_rows, n_cols, cfg, device, other_programs, splits=splits, rows_per_program=rows_per_program,
                       max_splits=max_splits)
            if cfg != tb.tile_configs(plan.d, getattr(torch, plan.dtype), tb.target_arch(device))[0]:
                raise RuntimeError(f"the counted launch runs {cfg}, not the predicted point's first choice")
            rows_t, cols_t = plan.to_target[n_rows], plan.to_target[n_cols]
            # the backward's cap on its partial sums (tb.backward_splits), for the point's rows
            max_t = None if max_splits is None else max(1, max(rows_t, tb._n_sms(device) * tb.PARTIAL_ROWS_PER_SM) // rows_t)
            target = real(rows_t, cols_t, cfg, device, other_programs, rows_per_program=rows_per_program,
                          max_splits=max_t)
            used = own
            if plan.as_target:
                col_tiles = triton.cdiv(n_cols, cfg.block_m)
                tiles = min(col_tiles, target[1] // cfg.block_m)
                used = (triton.cdiv(col_tiles, tiles), tiles * cfg.block_m)
            plan.plans.append(dict(phase=plan.counter.phase, rows=n_rows, cols=n_cols, splits=used[0],
                                   cols_per_split=used[1], own_splits=own[0], own_cols_per_split=own[1],
                                   target_rows=rows_t, target_cols=cols_t, target_splits=target[0],
                                   target_cols_per_split=target[1]))
            return used

        tb.column_splits = planned
        return self

    def __exit__(self, *exc):
        from ms_fused.engine.triton import backend as tb
        tb.column_splits = self.real


def count_work(case, plan: str = "own") -> dict:
    """Multiply-adds, loaded bytes and programs of every launch of one case, forward then backward, with the
    column splits the counted size plans (plan="own") or those of its TARGETS point (plan="target", _SplitPlan)."""
    import ms_fused

    name, mode, n, m, d, dtype, k, grad_ref = case
    inputs = _inputs(mode, n, m, d, dtype, k, grad_ref)
    started = time.time()
    with _InterpreterCounter() as counter, _SplitPlan(counter, case, as_target=plan == "target") as splits:
        loss = ms_fused.multi_similarity_loss(**inputs, backend="triton")
        counter.phase = "backward"
        loss.backward()
    if not splits.plans:
        raise RuntimeError("no launch planned its column splits through the triton backend's column_splits")
    launches = counter.launches
    per_pass = n * m * d
    fwd_macs = sum(x["macs"] for x in launches if x["phase"] == "forward")
    total_macs = sum(x["macs"] for x in launches)
    config = next((x["config"] for x in launches if x["macs"]), "")
    import triton
    return dict(case=name, mode=mode, n=n, m=m, d=d, dtype=dtype, k=k, config=config, triton=triton.__version__,
                plan=plan, splits=splits.plans, loss=float(loss.detach()),
                forward_passes=fwd_macs / per_pass, total_passes=total_macs / per_pass, launches=launches,
                seconds=time.time() - started)


def per_kernel(work: dict) -> list:
    """Launches added up per (phase, kernel): multiply-adds, bytes, bytes per MAC, share of the step's MACs."""
    rows = {}
    for x in work["launches"]:
        r = rows.setdefault((x["phase"], x["kernel"]), dict(phase=x["phase"], kernel=x["kernel"], launches=0,
                                                            programs=0, macs=0, load_bytes=0))
        r["launches"] += 1
        r["programs"] += x["programs"]
        r["macs"] += x["macs"]
        r["load_bytes"] += x["load_bytes"]
    step = sum(r["macs"] for r in rows.values()) or 1
    for r in rows.values():
        r["bytes_per_mac"] = r["load_bytes"] / r["macs"] if r["macs"] else None
        r["mac_share"] = r["macs"] / step
        r["passes"] = r["macs"] / (work["n"] * work["m"] * work["d"])
    return list(rows.values())


# ---- 4: roofline -----------------------------------------------------------------------------------------

SCALING_METHOD = (
    "Scaling from the counted size to the predicted point: per kernel, its similarity passes (multiply-adds "
    "over N·M·D) and its bytes per multiply-add are taken as counted, so its multiply-adds and bytes grow "
    "with N·M·D (the backward's share of skipped all-zero tiles included, as the clustered batch of the counted "
    "size gives it). A kernel whose work is confined to the label band (its passes shrink like 1/M, e.g. the band "
    "minimum and the hard-positive pass of today's kernels) is *not* scaled down: its share is kept as an "
    "upper bound. A kernel without tl.dot is scaled with the rows it reads ((N + M)·D); the kernels that combine "
    "column splits read one part per split, so their bytes follow the split counts of the run the roofline is "
    "counted from (below).")
ROOFLINE_PLAN = (
    "The roofline is counted from a second interpreted run at the same counted size, in which every launch takes "
    "the columns per split that the same launch plans at the predicted point (`column_splits` at the point's N and "
    "M, with the same first-choice configuration, which depends only on D, dtype and target), capped at the counted "
    "columns: a benchmark-only hook (`_SplitPlan` in this script); what users run is unchanged. The bytes per "
    "multiply-add above are those of the counted size's own plan, which splits the columns far more to fill 132 SMs "
    "with few row blocks. A program loads its resident anchor rows once per split and each column tile once, so "
    "its bytes per multiply-add fall as its split gets more columns: where the cap binds (fewer columns counted "
    "than the point gives a split), the counted bytes per multiply-add are an upper bound for the point. Capped, "
    "the run can also have fewer splits than the point, and then the kernels that combine splits read fewer parts "
    "than they would there (3 floats per anchor and split for the forward's finish_kernel, D floats per row and "
    "split for combine_grad_kernel): the one place where this count can fall short of the point, by those bytes.")


def split_plan_rows(work: dict, target_work: dict) -> list:
    """Per column-split decision of one case: the counted size's own plan, the predicted point's plan, and the
    plan the roofline's run used (splits, columns per split)."""
    out = []
    for own, used in zip(work["splits"], target_work["splits"]):
        out.append(dict(phase=own["phase"], rows=own["rows"], cols=own["cols"],
                        own=(own["splits"], own["cols_per_split"]),
                        target_rows=own["target_rows"], target_cols=own["target_cols"],
                        target=(own["target_splits"], own["target_cols_per_split"]),
                        used=(used["splits"], used["cols_per_split"]),
                        capped=used["cols_per_split"] < used["target_cols_per_split"]))
    return out


def _plan_text(p: tuple) -> str:
    return f"{p[0]} × {p[1]}"


def plan_summary(r: dict) -> str:
    """One sentence: which split plan a roofline case's bytes come from."""
    parts = [f"{p['phase']} {_plan_text(p['used'])} (the point: {_plan_text(p['target'])}"
             + ("; capped at the counted columns" if p["capped"] else "") + ")" for p in r["plan"]]
    return (f"bytes per MAC counted at N = {r['counted_n']}, M = {r['counted_m']} with the point's columns per split "
            f"(splits × columns per split): " + ", ".join(parts) + "; an upper bound for the point where capped")


def roofline(work: dict, kernels: list, peak_tflops: float, l2_tbps: float, plan: list = ()) -> dict:
    """Predicted time of every kernel of one counted case at its TARGETS point, over one mm of that shape.
    `work` should be the run with the point's split plan (count_work(case, "target")); `plan` its
    split_plan_rows, reported with it."""
    label, n, m, d, dtype = TARGETS[work["case"]]
    flops, bw = peak_tflops * 1e12, l2_tbps * 1e12
    pass_macs = n * m * d
    rows_scale = (n + m) * d / ((work["n"] + work["m"]) * work["d"])
    mm_s = 2 * pass_macs / flops
    out = []
    for r in kernels:
        macs = r["passes"] * pass_macs
        load = r["bytes_per_mac"] * macs if r["macs"] else r["load_bytes"] * rows_scale
        t_mac, t_load = 2 * macs / flops, load / bw
        out.append(dict(phase=r["phase"], kernel=r["kernel"], passes=r["passes"], bytes_per_mac=r["bytes_per_mac"],
                        macs=macs, load_bytes=load, mac_s=t_mac, load_s=t_load, seconds=max(t_mac, t_load),
                        bound="tensor cores" if t_mac >= t_load else "loads", per_mm=max(t_mac, t_load) / mm_s))
    fwd = sum(x["seconds"] for x in out if x["phase"] == "forward")
    step = sum(x["seconds"] for x in out)
    return dict(case=work["case"], point=label, n=n, m=m, d=d, dtype=dtype, mm_seconds=mm_s, kernels=out,
                counted_n=work["n"], counted_m=work["m"], counted_plan=work.get("plan", "own"), plan=list(plan),
                forward_seconds=fwd, step_seconds=step, forward_per_mm=fwd / mm_s, step_per_mm=step / mm_s)


# ---- 5: compiled for each target without a GPU -----------------------------------------------------------

_PTXAS_LOGS: dict = {}


def _tee_ptxas_logs() -> None:
    """Keep the log of every `ptxas -v` Triton runs (with its own options), keyed by the PTX it compiled."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        done = real_run(cmd, *args, **kwargs)
        if isinstance(cmd, (list, tuple)) and cmd and os.path.basename(str(cmd[0])).startswith("ptxas") \
                and "-v" in cmd and hasattr(kwargs.get("stderr"), "name"):
            src = next((c for c in cmd if str(c).endswith(".ptx")), None)
            try:
                with open(src) as f:
                    ptx = f.read()
                with open(kwargs["stderr"].name) as f:
                    _PTXAS_LOGS[ptx] = f.read()
            except (OSError, TypeError):
                pass
        return done

    subprocess.run = run


def _ptxas(capability: int) -> str:
    from triton.backends.nvidia import compiler as nvidia
    try:
        return nvidia.get_ptxas(capability).path
    except TypeError:  # triton releases whose get_ptxas takes no arch
        return nvidia.get_ptxas().path


def _ptxas_log(ptx: str, capability: int) -> tuple:
    """(log, how): Triton's own ptxas -v log of this PTX, else one from running its ptxas here."""
    if ptx in _PTXAS_LOGS:
        return _PTXAS_LOGS[ptx], "triton's ptxas -v"
    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([_ptxas(capability), "-lineinfo", "--fmad=false", "-v", f"--gpu-name={gpu}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {(done.stdout + done.stderr)[-2000:]}")
    return done.stdout + done.stderr, "ptxas -v rerun here"


def _num(pattern: str, text: str) -> int:
    m = re.search(pattern, text, re.M)
    return int(m.group(1)) if m else 0


def _nvidia_stats(kernel, arch: Arch) -> dict:
    log, how = _ptxas_log(kernel.asm["ptx"], arch.capability)
    stores, loads = _num(r"(\d+) bytes spill stores", log), _num(r"(\d+) bytes spill loads", log)
    return dict(registers=_num(r"Used (\d+) registers", log), spill_stores=stores, spill_loads=loads,
                spills=bool(stores or loads), stack_bytes=_num(r"(\d+) bytes stack frame", log),
                ptxas=how, gpu_name=re.search(r"^\.target\s+(\w+)", kernel.asm["ptx"], re.M).group(1),
                matrix_count=len(re.findall(arch.matrix_pattern, kernel.asm["ptx"])),
                async_copies=len(re.findall(arch.copy_pattern, kernel.asm["ptx"])) if arch.copy_pattern else 0,
                narrow_loads=len(re.findall(NARROW_LOAD, kernel.asm["ptx"])))


def _amd_stats(kernel, arch: Arch) -> dict:
    asm = kernel.asm["amdgcn"]
    vgprs = _num(r"^; TotalNumVgprs: (\d+)", asm) or _num(r"\.vgpr_count:\s+(\d+)", asm)
    vgpr_spills = _num(r"\.vgpr_spill_count:\s+(\d+)", asm)
    scratch = _num(r"^; ScratchSize: (\d+)", asm) or _num(r"\.private_segment_fixed_size:\s+(\d+)", asm)
    # spills to memory: VGPR spills go to scratch; SGPR spills to VGPR lanes (no memory) are reported apart
    return dict(registers=vgprs, sgprs=_num(r"\.sgpr_count:\s+(\d+)", asm), vgpr_spills=vgpr_spills,
                sgpr_spills=_num(r"\.sgpr_spill_count:\s+(\d+)", asm), scratch_bytes=scratch,
                spills=bool(vgpr_spills or scratch),
                waves_per_simd=amd_waves_per_simd(vgprs), compiler_occupancy=_num(r"^; Occupancy: (\d+)", asm),
                gpu_name=arch.name,
                matrix_count=len(re.findall(arch.matrix_pattern, asm)))


def _uses_dot(kernel) -> bool:
    return re.search(r"\btt\.dot\b", kernel.asm.get("ttir", "")) is not None


_DOT_OP = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma) ([^\n]*)")
_OPERAND_TYPE = re.compile(r"(?:tensor|memdesc)<(\d+)x(\d+)x(\w+), (#[\w.]+)")
_ENCODING = re.compile(r"^(#[\w.]+) = (#.*)$", re.M)


def _instruction(encoding: str) -> str:
    """The matrix instruction an accumulator's layout stands for (TTGIR): wgmma / mma.sync / MFMA with its
    instrShape, tcgen05 with its tensor-memory block, else the CUDA cores' FMAs (a blocked layout)."""
    shape = re.search(r"instrShape = \[([\d, ]+)\]", encoding)
    if "nvidia_mma" in encoding:
        version = re.search(r"versionMajor = (\d+)", encoding).group(1)
        return f"{'wgmma' if version == '3' else 'mma.sync'} instrShape [{shape.group(1)}]"
    if "amd_mfma" in encoding or "amd_wmma" in encoding:
        kind = "mfma" if "amd_mfma" in encoding else "wmma"
        transposed = ", transposed" if "isTransposed = true" in encoding else ""
        return f"{kind} instrShape [{shape.group(1)}]{transposed}"
    block = re.search(r"tensor_memory_encoding<blockM = (\d+), blockN = (\d+)", encoding)
    if block:
        return f"tcgen05 {block.group(1)}x{block.group(2)} block"
    return "FMA"


def s_dot_instruction(ttgir: str, block_n: int, block_m: int, k_step: int) -> str:
    """How a kernel computes its S tiles, read from its TTGIR: the instruction of every dot whose result is a
    (block_n, block_m) tile from block_n anchor rows over (a part of) the K step (the backward's second
    product, W @ b, adds into a (block_n, BLOCK_DOUT) accumulator), with the K step; "" when the kernel has no
    such dot, "several: ..." when its S dots differ among themselves."""
    encodings = dict(_ENCODING.findall(ttgir))
    found = set()
    for op, rest in _DOT_OP.findall(ttgir):
        types = _OPERAND_TYPE.findall(rest)
        if len(types) < 3:
            continue
        a, acc = types[0], types[2]
        # the compiler may split a dot's K step into a chain of narrower dots (mma.sync targets: K = 16)
        if int(a[0]) != block_n or k_step % int(a[1]) or (int(acc[0]), int(acc[1])) != (block_n, block_m):
            continue
        found.add(f"{_instruction(encodings.get(acc[3], ''))}, {a[2]} K step {k_step}")
    return "" if not found else found.pop() if len(found) == 1 else "several: " + " | ".join(sorted(found))


def problems(row: dict) -> list:
    """What the CI test fails a compiled kernel for on its target (sm_75: shared memory only)."""
    arch = ARCHS[row["arch"]]
    out = []
    if row.get("error"):
        return [f"does not compile: {row['error']}"]
    if row["shared_bytes"] > arch.smem_per_block:
        out.append(f"shared memory {row['shared_bytes']} B > {arch.smem_per_block} B per block")
    if not arch.asserted:
        return out
    if row["spills"]:
        out.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)"
                   if arch.vendor == "cuda" else f"spills ({row['vgpr_spills']} VGPRs, {row['scratch_bytes']} B scratch)")
    if row["needs_matrix"] and not row["matrix_count"]:
        out.append(f"no {arch.matrix} instruction")
    if row.get("needs_copy"):
        if not row["async_copies"]:
            out.append(f"no {arch.copy}")
        if row["narrow_loads"]:
            out.append(f"{row['narrow_loads']} 2-byte loads")
    return out


@contextlib.contextmanager
def stub_compiler(arch_name: str):
    """Triton's real compiler for one target against a stub driver that answers it: inside the block, every
    kernel launch through the backend (CPU tensors standing in for GPU ones) only compiles, and is appended to
    the yielded list as (kernel name, compiled kernel, launch configuration text, launch keyword arguments).
    Yields (that list, the ptxas version text or "")."""
    arch = ARCHS[arch_name]
    os.environ.pop("TRITON_INTERPRET", None)
    # a fresh cache: every kernel is compiled here, so its figures are Triton's own ptxas log (a cached cubin
    # would leave only a rerun of ptxas, whose options can differ from Triton's: 3.9 adds --regAllocOptLevel)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ms_fused_kernel_stats_")
    os.environ["MS_FUSED_TRITON_AUTOTUNE"] = "0"
    os.environ["MS_FUSED_TRITON_ARCH"] = arch.name
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit as jitmod
    from triton.runtime.driver import driver

    target = GPUTarget("hip", arch.name, 64) if arch.vendor == "hip" else GPUTarget("cuda", arch.capability, 32)

    class StubDriver:
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(StubDriver())
    tool = ""
    if arch.vendor == "cuda":
        _tee_ptxas_logs()
        version = subprocess.run([_ptxas(arch.capability), "--version"], capture_output=True, text=True).stdout
        tool = "ptxas " + (re.findall(r"V(\d+\.\d+\.\d+)", version) or ["?"])[-1]
    compiled = []
    real_run = jitmod.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, _launch_config(kwargs), kwargs))
        return kernel

    jitmod.JITFunction.run = compile_only
    from ms_fused.engine.triton import backend as tb

    real_reason = tb.unavailable_reason
    # CPU tensors stand in for GPU ones: nothing runs, the launches only compile
    supported = getattr(tb, "SUPPORTED_DTYPES", None)
    tb.unavailable_reason = lambda device, dtype=None: (
        None if dtype is None or supported is None or dtype in supported else real_reason(device, dtype))
    try:
        yield compiled, tool
    finally:
        jitmod.JITFunction.run = real_run
        tb.unavailable_reason = real_reason


def compile_stats(arch_name: str) -> list:
    """Every kernel variant of COMPILE_CASES compiled for one target through the backend's own launch code."""
    arch = ARCHS[arch_name]
    rows, seen = [], {}
    with stub_compiler(arch_name) as (compiled, tool):
        import torch
        import triton

        import ms_fused
        from ms_fused.losses.pair_api import pair_weighting_loss

        def inputs_of(mode, n, m, d, dtype):
            dt = getattr(torch, dtype)
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(n, d, generator=gen).to(dt).requires_grad_()
            inputs = dict(embeddings=q, labels=torch.randint(0, 20, (n,), generator=gen))
            if mode != "self":
                inputs.update(ref_emb=torch.randn(m, d, generator=gen).to(dt).requires_grad_(mode == "reference"),
                              ref_labels=torch.randint(0, 20, (m,), generator=gen),
                              ref_self_index=torch.arange(n) if mode == "memory" else None)
            return inputs

        def ms_step(inputs, count):
            out = ms_fused.multi_similarity_loss(**inputs, backend="triton", return_stats=count)
            (out[0] if count else out).backward()

        def pair_step(inputs, name):  # a reference set holds the anchors' own copies: every pair-mask variant
            x = inputs["embeddings"]
            pair_weighting_loss(name, x, inputs["labels"], inputs.get("ref_emb"), inputs.get("ref_labels"),
                                ref_self_index=None if "ref_emb" not in inputs else torch.arange(x.shape[0]) % inputs["ref_emb"].shape[0],
                                backend="triton").backward()

        launches = [(mode, n, m, d, dtype, count, lambda inputs, count=count: ms_step(inputs, count))
                    for mode, n, m, d, dtype in COMPILE_CASES for count in (False, True)]
        # the default kernels, and those that count mined pairs (return_stats); then each pair-weighting loss
        launches += [(f"{mode} ({name})", n, m, d, dtype, False, lambda inputs, name=name: pair_step(inputs, name))
                     for mode, n, m, d, dtype in PAIR_COMPILE_CASES for name in PAIR_LOSS_NAMES]
        for mode, n, m, d, dtype, count, step in launches:
            case = f"{mode}, {dtype}, N = {n}, M = {m}, D = {d}, pairs counted: {count}"
            compiled.clear()
            error = None
            try:
                step(inputs_of(mode.split(" ")[0], n, m, d, dtype))
            except Exception as exc:  # a target the kernels do not compile for: reported, not fatal
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            base = dict(arch=arch.name, triton=triton.__version__, tool=tool, mode=mode, dtype=dtype, d=d,
                        count_pairs=count)
            for name, kernel, config, kwargs in compiled:
                key = (name, dtype, kernel.hash if hasattr(kernel, "hash") else id(kernel))
                if key in seen:  # one row per kernel variant, with every launch case that ran it
                    if case not in seen[key]["cases"]:
                        seen[key]["cases"].append(case)
                    continue
                stats = _amd_stats(kernel, arch) if arch.vendor == "hip" else _nvidia_stats(kernel, arch)
                warps, stages = kernel.metadata.num_warps, kernel.metadata.num_stages
                shared = kernel.metadata.shared
                row = dict(base, kernel=name, config=config, num_warps=warps, shared_bytes=shared,
                           shared_limit=arch.smem_per_block, needs_matrix=dtype != "float32" and _uses_dot(kernel),
                           needs_copy=bool(arch.copy_pattern) and name in COLUMN_TILE_KERNELS and stages > 1,
                           ctas_per_sm=occupancy(arch, stats["registers"], warps, shared), ok=True, **stats)
                row["s_dot"] = (s_dot_instruction(kernel.asm.get("ttgir", ""), kwargs["BLOCK_N"], kwargs["BLOCK_M"],
                                                  kwargs["BLOCK_D"]) if "BLOCK_M" in kwargs else "")
                row["cases"] = [case]
                row["problems"] = problems(row)
                rows.append(row)
                seen[key] = row
            if error is not None:
                row = dict(base, kernel="(launch)", config="", ok=False, error=error)
                row["problems"] = problems(row)
                rows.append(row)
    return rows


# ---- children: the interpreter count and one compile per target, each in its own process ---------------

def _child(args: list, env_extra: dict, python: str = sys.executable, interpret: bool = False) -> object:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([python, os.path.abspath(__file__), *args], env=env, capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"kernel_stats {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_targets(jobs: list, parallel: int) -> list:
    """jobs: (python, arch) pairs; each compiles in its own process with an empty Triton cache (so that every
    kernel really compiles and its ptxas log is Triton's own), `parallel` at a time. Rows in job order."""
    def one(job):
        python, arch = job
        cache = tempfile.mkdtemp(prefix=f"kernel_stats_{arch}_")
        started = time.time()
        try:
            rows = _child(["--child", "compile", "--arch", arch], dict(TRITON_CACHE_DIR=cache,
                                                                        MS_FUSED_TRITON_ARCH=arch), python)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        for r in rows:
            r["python"] = python if python != sys.executable else ""
            r["compile_seconds"] = round(time.time() - started, 1)
        return rows

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return [r for rows in pool.map(one, jobs) for r in rows]


# ---- report ----------------------------------------------------------------------------------------------

def _f(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def _groups(compiled: list) -> list:
    """[(triton version, python, arch, rows)] in the order first met."""
    out = {}
    for c in compiled:
        out.setdefault((c["triton"], c.get("python", ""), c["arch"]), []).append(c)
    return [(t, p, a, rows) for (t, p, a), rows in out.items()]


def bytes_goal_lines(work: list) -> list:
    lines = []
    for w in work:
        for r in per_kernel(w):
            if r["mac_share"] >= MAC_SHARE_GOAL:
                ok = r["bytes_per_mac"] <= BYTES_PER_MAC_GOAL
                lines.append(f"{w['case']}, {r['kernel']} ({r['phase']}, {100 * r['mac_share']:.0f} % of the step's "
                             f"multiply-adds): {_f(r['bytes_per_mac'], 4)} bytes per MAC, "
                             f"{'meets' if ok else 'misses'} ≤ {BYTES_PER_MAC_GOAL}")
    return lines


def roofline_goal_lines(lines_for: list) -> list:
    out = []
    for r in lines_for:
        if r["case"] == "self mode":
            out.append(f"{r['point']}: forward {r['forward_per_mm']:.2f}× one mm "
                       f"({'meets' if r['forward_per_mm'] <= FORWARD_GOAL else 'misses'} ≤ {FORWARD_GOAL}), step "
                       f"{r['step_per_mm']:.2f}× ({'meets' if r['step_per_mm'] <= STEP_GOAL else 'misses'} ≤ {STEP_GOAL})")
        else:
            out.append(f"{r['point']}: forward {r['forward_per_mm']:.2f}× one mm, step {r['step_per_mm']:.2f}× "
                       "(no roofline bound is set for this point)")
    return out


def arch_summary_rows(compiled: list) -> list:
    """One line per (Triton, target): variants, spills, shared memory against the limit, matrix instructions,
    asynchronous copies, fewest CTAs per SM, the CI test's verdict."""
    out = []
    for triton_version, _, arch_name, rows in _groups(compiled):
        arch = ARCHS[arch_name]
        good = [r for r in rows if r.get("ok")]
        failed = [r for r in rows if not r.get("ok")]
        spilled = [r for r in good if r["spills"]]
        most = max(good, key=lambda r: r["shared_bytes"], default=None)
        dots = [r for r in good if r["needs_matrix"]]
        missing = [r for r in dots if not r["matrix_count"]]
        streamed = [r for r in good if r.get("needs_copy")]
        synchronous = [r for r in streamed if not r["async_copies"] or r["narrow_loads"]]
        fewest = min(good, key=lambda r: r["ctas_per_sm"], default=None)
        failing = [r for r in rows if r["problems"]]
        tool = rows[0].get("tool", "")
        out.append(dict(arch=arch_name, gpus=arch.gpus, triton=triton_version + (f" ({tool})" if tool else ""),
                        variants=len(good), compile_errors=len(failed), spilled=spilled, most_shared=most,
                        dots=len(dots), missing_matrix=missing, streamed=len(streamed), synchronous=synchronous,
                        fewest=fewest, failing=failing,
                        asserted=arch.asserted))
    return out


def _spill_text(s: dict, arch: Arch, most: int = 4) -> str:
    if not s["spilled"]:
        return "none"
    names = sorted({f"{r['kernel']} {r['mode']} {r['dtype']} D = {r['d']}" for r in s["spilled"]})
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{len(s['spilled'])} of {s['variants']} variants: " + "; ".join(names[:most]) + more


WHICH_GPUS_TEXT = [
    "Nothing has run on any GPU yet. What is known without one is how the kernels compile for each GPU family: "
    "this script runs Triton's own compiler for each target against a stub driver (nothing is launched), through "
    "the backend's launch code with that target's configuration list, and reads registers, spills and shared "
    "memory from the compiler (ptxas for NVIDIA, the amdgcn metadata for AMD) and the matrix instructions from "
    "the generated code. `tests/test_kernel_compile.py` compiles every first choice for every target below with "
    "the Triton it runs under, and fails on a register spill, on shared memory over the target's per-block limit, "
    "on a bfloat16/float16 kernel with a `tl.dot` but no matrix instruction, or on a pipelined kernel that "
    "streams column tiles (band_min, sweep, finish, backward) without asynchronous copies (`cp.async`) or with "
    "2-byte loads, D = 100 and D = 130 included (sm_75: the shared memory limit only; gfx942: no copy check).",
]


def which_gpus_lines(compiled: list) -> list:
    lines = ["| target | GPUs | Triton | kernel variants | register spills | most shared memory / per-block limit | "
             "matrix instruction in every bf16/fp16 tl.dot kernel | asynchronous copies in every pipelined column-tile "
             "kernel | fewest CTAs per SM (CU) | CI test |",
             "|---|---|---|---:|---|---|---|---|---|---|"]
    for s in arch_summary_rows(compiled):
        arch = ARCHS[s["arch"]]
        most = s["most_shared"]
        shared = f"{most['shared_bytes']} / {arch.smem_per_block} B ({most['kernel']})" if most else "—"
        matrix = (f"{arch.matrix}: yes ({s['dots']} kernels)" if not s["missing_matrix"] else
                  f"{arch.matrix}: missing in {len(s['missing_matrix'])} of {s['dots']}")
        fewest = f"{s['fewest']['ctas_per_sm']} ({s['fewest']['kernel']}, {s['fewest']['dtype']}, D = {s['fewest']['d']})" \
            if s["fewest"] else "—"
        copies = "—" if not arch.copy else (f"{arch.copy}: yes ({s['streamed']} kernels)" if not s["synchronous"] else
                                            f"{arch.copy}: missing in {len(s['synchronous'])} of {s['streamed']}")
        n_failing = len(s["failing"])
        verdict = "passes" if not n_failing else f"fails ({n_failing} variant{'s' if n_failing > 1 else ''})"
        if not s["asserted"]:
            verdict += " (shared memory only)"
        if s["compile_errors"]:
            verdict += f"; {s['compile_errors']} launches did not compile"
        lines.append(f"| {s['arch']} | {s['gpus']} | {s['triton']} | {s['variants']} | {_spill_text(s, arch)} | {shared} | "
                     f"{matrix} | {copies} | {fewest} | {verdict} |")
    return lines


def markdown(work: list, compiled: list, roof: list, command: str, peak: float, l2: float) -> str:
    import environment
    env = environment.describe(__import__("torch").device("cpu"))["environment"]
    lines = ["# Triton kernels: work counted and compiled without a GPU", "",
             f"_Generated by `{command}` on {env['date']}: commit `{env['commit']}`, triton {env['triton']}, "
             f"torch {env['torch']}, Python {env['python']}. Nothing here ran on a GPU._", ""]
    if work:
        counted = sorted({w.get("triton", "?") for w in work})
        lines += ["A *similarity pass* is N·M·D multiply-adds, one full similarity GEMM. Counted under Triton "
                  f"{', '.join(counted)}'s interpreter from the multiply-adds of every `tl.dot`, with that Triton's "
                  "first-choice sm_90 configuration; launch sizes plan for a 132-SM GPU.", "",
                  "| case | N | M | D | dtype | K | configuration | forward passes | forward + backward passes |",
                  "|---|---:|---:|---:|---|---:|---|---:|---:|"]
        for w in work:
            lines.append(f"| {w['case']} | {w['n']} | {w['m']} | {w['d']} | {w['dtype']} | {w['k']} | {w['config']} | "
                         f"{w['forward_passes']:.3f} | {w['total_passes']:.3f} |")
        lines += ["", "## Programs launched", "", "| case | phase | kernel | programs | configuration |",
                  "|---|---|---|---:|---|"]
        for w in work:
            for x in w["launches"]:
                lines.append(f"| {w['case']} | {x['phase']} | {x['kernel']} | {x['programs']} | {x['config']} |")
        lines += ["", "## Bytes loaded per multiply-add", "",
                  "Counted in the same interpreted runs: the bytes of every `tl.load` (elements its mask switches off "
                  "excluded) of a launch, over the multiply-adds of that launch's `tl.dot`s, added up per kernel, with "
                  "the column splits that the counted size plans for itself (its own plan below). "
                  f"Goal: every kernel doing ≥ {MAC_SHARE_GOAL:.0%} of a step's multiply-adds loads ≤ "
                  f"{BYTES_PER_MAC_GOAL} bytes per multiply-add.", "",
                  "| case | phase | kernel | launches | programs | multiply-adds | loaded bytes | bytes per MAC | "
                  "share of the step's MACs |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for w in work:
            for r in per_kernel(w):
                lines.append(f"| {w['case']} | {r['phase']} | {r['kernel']} | {r['launches']} | {r['programs']} | "
                             f"{r['macs']} | {r['load_bytes']} | {_f(r['bytes_per_mac'], 4)} | "
                             f"{100 * r['mac_share']:.1f} % |")
        lines += [""] + [f"- {x}" for x in bytes_goal_lines(work)]
        lines += ["", "## Roofline prediction", "",
                  f"Each kernel's time is the longer of its tensor-core time (its multiply-adds at {peak:g} TFLOP/s: "
                  f"{PEAK_SOURCE}; `--peak-tflops`) and its load time (its loaded bytes at {l2:g} TB/s of L2 "
                  f"bandwidth: {L2_SOURCE}; `--l2-tbps`), over one torch.mm of the same shape (X·Xᵀ in self mode, "
                  "X·memoryᵀ for the bank) at the peak rate. Loads are assumed to hit L2 (re-reads of rows other "
                  "programs loaded); first reads from HBM and stores are not counted.", "", SCALING_METHOD, "",
                  "### Which split plan the bytes come from", "", ROOFLINE_PLAN, "",
                  "| case | phase | counted launch (rows × columns) | its own plan | predicted launch (rows × "
                  "columns) | the point's plan | the roofline's run |",
                  "|---|---|---|---|---|---|---|"]
        for r in roof:
            for p in r["plan"]:
                lines.append(f"| {r['case']} | {p['phase']} | {p['rows']} × {p['cols']} | {_plan_text(p['own'])} | "
                             f"{p['target_rows']} × {p['target_cols']} | {_plan_text(p['target'])} | "
                             f"{_plan_text(p['used'])}{' (capped)' if p['capped'] else ''} |")
        lines += ["", "Plans as splits × columns per split; the predicted launch's plan is `column_splits` at the "
                  "point's size for a 132-SM GPU.", ""]
        for r in roof:
            lines += [f"### {r['case']}: {r['point']} (one mm: {_us(r['mm_seconds'])} µs)", "",
                      f"Bytes and multiply-adds from the run with the point's split plan: {plan_summary(r)}.", "",
                      "| phase | kernel | similarity passes | bytes per MAC | tensor-core µs | load µs | predicted µs | "
                      "bound by | / one mm |",
                      "|---|---|---:|---:|---:|---:|---:|---|---:|"]
            for k in r["kernels"]:
                lines.append(f"| {k['phase']} | {k['kernel']} | {k['passes']:.4f} | {_f(k['bytes_per_mac'], 4)} | "
                             f"{_us(k['mac_s'])} | {_us(k['load_s'])} | {_us(k['seconds'])} | {k['bound']} | "
                             f"{k['per_mm']:.3f} |")
            lines += [f"| forward | (all) | | | | | {_us(r['forward_seconds'])} | | {r['forward_per_mm']:.3f} |",
                      f"| forward + backward | (all) | | | | | {_us(r['step_seconds'])} | | {r['step_per_mm']:.3f} |", ""]
        lines += [f"- {x}" for x in roofline_goal_lines(roof)] + [""]
    if compiled:
        lines += ["## Which GPUs: compile statistics per target", "",
                  "Triton's real compiler against a stub driver that answers the target (nothing is launched), "
                  "through the backend's own launch code with MS_FUSED_TRITON_ARCH=<target>, for each dtype's first "
                  "configuration in every mode (self D = 512 and 128, memory bank D = 128 in bfloat16, reference "
                  "D = 96; self D = 100 and 130 in bfloat16, rows that are not multiples of 16 elements), with and "
                  "without pair counting; a kernel variant is listed once per target. The CI test "
                  "(tests/test_kernel_compile.py) fails a target on a register spill, shared memory over the "
                  "per-block limit, a bf16/fp16 kernel with a `tl.dot` but no matrix instruction, or a pipelined "
                  "column-tile kernel (band_min, sweep, finish, backward with 2 or more stages) without asynchronous "
                  "copies or with 2-byte loads (sm_75: shared memory only; gfx942: no copy check).", ""] + \
                 which_gpus_lines(compiled) + [""] + \
                 [f"- {x}" for x in OCCUPANCY_FORMULAS] + [""]
        for triton_version, python, arch_name, rows in _groups(compiled):
            arch = ARCHS[arch_name]
            how = sorted({r.get("ptxas", "") for r in rows if r.get("ptxas")})
            tool = rows[0].get("tool", "")
            lines += [f"### {arch_name} ({arch.gpus}): Triton {triton_version}" + (f", {tool}" if tool else "")
                      + (f" ({python})" if python else ""), "",
                      f"Per-block shared memory limit {arch.smem_per_block} B; matrix instruction `{arch.matrix}`"
                      + (f"; registers and spills from {', '.join(how)}" if how else "")
                      + (f"; compiled in {rows[0]['compile_seconds']} s" if rows and "compile_seconds" in rows[0] else "")
                      + ".", ""]
            if arch.vendor == "hip":
                lines += ["| kernel | mode | dtype | D | pairs counted | configuration | warps | VGPRs | SGPRs | "
                          "VGPR spills | SGPR spills (to VGPR lanes) | scratch (B) | LDS (B) | v_mfma | "
                          "waves per SIMD (VGPRs) | the compiler's occupancy (waves per SIMD) | workgroups per CU | "
                          "CI problems |",
                          "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            else:
                lines += ["| kernel | mode | dtype | D | pairs counted | configuration | warps | registers | "
                          "spill stores (B) | spill loads (B) | shared memory (B) | " + arch.matrix + " | "
                          + (arch.copy or "asynchronous copies") + " | 2-byte loads | CTAs per SM | CI problems |",
                          "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for c in rows:
                if not c.get("ok"):  # the problem in the configuration column, the other cells empty
                    cells = [c["kernel"], c["mode"], c["dtype"], c["d"], c["count_pairs"], "; ".join(c["problems"])]
                    cells += ["—"] * (lines[-1].count("|") - 1 - len(cells))
                    lines.append("| " + " | ".join(str(x) for x in cells) + " |")
                    continue
                matrix = c["matrix_count"] if c["needs_matrix"] or c["matrix_count"] else "—"
                probs = "; ".join(c["problems"]) or "—"
                if arch.vendor == "hip":
                    lines.append(f"| {c['kernel']} | {c['mode']} | {c['dtype']} | {c['d']} | {c['count_pairs']} | "
                                 f"{c['config']} | {c['num_warps']} | {c['registers']} | {c['sgprs']} | "
                                 f"{c['vgpr_spills']} | {c['sgpr_spills']} | {c['scratch_bytes']} | {c['shared_bytes']} | "
                                 f"{matrix} | {c['waves_per_simd']} | {c['compiler_occupancy']} | {c['ctas_per_sm']} | "
                                 f"{probs} |")
                else:
                    lines.append(f"| {c['kernel']} | {c['mode']} | {c['dtype']} | {c['d']} | {c['count_pairs']} | "
                                 f"{c['config']} | {c['num_warps']} | {c['registers']} | {c['spill_stores']} | "
                                 f"{c['spill_loads']} | {c['shared_bytes']} | {matrix} | {c.get('async_copies', '—')} | "
                                 f"{c.get('narrow_loads', '—')} | {c['ctas_per_sm']} | {probs} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def readme_summary(work: list, roof: list) -> list:
    """The README's kernel_stats block: passes per case, bytes per MAC of the big kernels, the roofline."""
    lines = ["| case | N | M | D | dtype | forward passes | forward + backward passes | programs of the column sweep |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for w in work:
        sweep = max((x["programs"] for x in w["launches"] if x["kernel"] == "sweep_kernel"), default=0)
        lines.append(f"| {w['case']} | {w['n']} | {w['m']} | {w['d']} | {w['dtype']} | {w['forward_passes']:.2f} | "
                     f"{w['total_passes']:.2f} | {sweep} |")
    lines += ["", f"Bytes loaded per multiply-add (goal: ≤ {BYTES_PER_MAC_GOAL} for every kernel doing ≥ "
              f"{MAC_SHARE_GOAL:.0%} of a step's multiply-adds):", ""] + [f"- {x}" for x in bytes_goal_lines(work)]
    lines += ["", "Roofline prediction (per kernel: the longer of its multiply-adds at the measured bf16 mm rate and "
              "its loads at an L2 bandwidth that is a lead, not a measurement on our GPU; over one mm of the same "
              "shape; bytes counted at the small size with the predicted point's columns per split, an upper bound "
              "where fewer columns were counted than the point gives a split):", ""] + \
        [f"- {x}" for x in roofline_goal_lines(roof)] + [f"- {r['case']}: {plan_summary(r)}" for r in roof]
    return lines


def _json_lines(doc: dict) -> str:
    """JSON with one line per list entry (a kernel variant, a case): readable diffs, no 10 000-line file."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            parts.append(f" {json.dumps(key)}: [\n  " + ",\n  ".join(json.dumps(x) for x in value) + "\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "kernel_stats.md"))
    p.add_argument("--json", help="also write the records as JSON here")
    p.add_argument("--compile-only", action="store_true", help="only the compile statistics (no interpreter count)")
    p.add_argument("--arch", default=DEFAULT_ARCHS, help=f"compile targets, comma-separated (default {DEFAULT_ARCHS})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile targets in parallel processes")
    p.add_argument("--compile-with", action="append", default=[], metavar="PYTHON:ARCHS",
                   help="also compile ARCHS (comma-separated) with this Python interpreter's Triton")
    p.add_argument("--count-with", default=sys.executable, metavar="PYTHON",
                   help="run the interpreter count with this Python's Triton (the first choices depend on its "
                        "version: resident_widest_d in ms_fused/engine/triton/backend.py)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help=f"tensor-core rate ({PEAK_SOURCE})")
    p.add_argument("--l2-tbps", type=float, default=L2_TBPS, help=f"L2 bandwidth for the load time ({L2_SOURCE})")
    p.add_argument("--readme", help="also write the summaries into this file between its kernel_stats markers")
    p.add_argument("--child", choices=["count", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, BENCH_DIR)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown --arch {unknown}; known: {DEFAULT_ARCHS}")
    if args.child == "count":  # each case with its own split plan, then with its predicted point's
        json.dump([count_work(c) for c in CASES] + [count_work(c, "target") for c in CASES], sys.stdout)
        return
    if args.child == "compile":
        json.dump(compile_stats(archs[0]), sys.stdout)
        return

    started = time.time()
    jobs = [(sys.executable, a) for a in archs]
    for spec in args.compile_with:
        python, _, extra = spec.rpartition(":")
        if not python or any(a not in ARCHS for a in extra.split(",")):
            p.error(f"--compile-with wants PYTHON:ARCHS, got {spec!r}")
        jobs += [(python, a) for a in extra.split(",")]
    work, counted = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:  # the count runs beside the compiles (one core)
        counting = None if args.compile_only else pool.submit(_child, ["--child", "count"], {}, args.count_with, True)
        compiled = compile_targets(jobs, max(1, args.jobs - (0 if args.compile_only else 1)))
        if counting is not None:
            counted = counting.result()
    work = [w for w in counted if w["plan"] == "own"]
    as_target = {w["case"]: w for w in counted if w["plan"] == "target"}
    roof = [roofline(as_target[w["case"]], per_kernel(as_target[w["case"]]), args.peak_tflops, args.l2_tbps,
                     split_plan_rows(w, as_target[w["case"]])) for w in work]
    params = dict(peak_tflops=args.peak_tflops, peak_source=PEAK_SOURCE, l2_tbps=args.l2_tbps, l2_source=L2_SOURCE,
                  scaling=SCALING_METHOD, occupancy=OCCUPANCY_FORMULAS, archs={a: asdict(ARCHS[a]) for a in ARCHS},
                  seconds=round(time.time() - started, 1))
    json_path = args.json or (None if args.compile_only else os.path.splitext(args.out)[0] + ".json")
    if json_path:
        with open(json_path, "w") as f:
            f.write(_json_lines(dict(params=params, work=work, roofline_work=list(as_target.values()),
                                     roofline=roof, compiled=compiled)))
    command = "python benchmarks/kernel_stats.py" + (" --compile-only" if args.compile_only else "") + \
        (f" --arch {args.arch}" if args.arch != DEFAULT_ARCHS else "") + \
        (f" --readme {args.readme}" if args.readme else "") + "".join(f" --compile-with {s}" for s in args.compile_with) + \
        (f" --count-with {os.path.relpath(args.count_with, REPO)}" if args.count_with != sys.executable else "")
    if args.compile_only:  # the per-target tables, printed only
        print(markdown([], compiled, [], command, args.peak_tflops, args.l2_tbps))
        print(f"({params['seconds']} s)")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(work, compiled, roof, command, args.peak_tflops, args.l2_tbps))
    print(open(args.out).read())
    print(f"({params['seconds']} s)")
    if args.readme:
        import report
        rel = os.path.relpath(args.out, REPO)
        made_by = f"_Generated by `{command}` (tables: [{rel}]({rel}))._"
        report.replace_block(args.readme, "<!-- kernel_stats -->", "<!-- /kernel_stats -->",
                             [made_by, ""] + readme_summary(work, roof))
        report.replace_block(args.readme, "<!-- kernel_stats_gpus -->", "<!-- /kernel_stats_gpus -->",
                             [made_by, ""] + WHICH_GPUS_TEXT + [""] + which_gpus_lines(compiled))


if __name__ == "__main__":
    main()
