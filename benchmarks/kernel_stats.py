"""The triton kernels' work, measured without a GPU.

    python benchmarks/kernel_stats.py --readme README.md   # writes benchmarks/results/kernel_stats.{md,json}
                                                           # and the summary between README's markers
    python benchmarks/kernel_stats.py --compile-only --json out.json   # sm_90 compile statistics only

1. Similarity passes: under Triton's interpreter, every tl.dot's multiply-adds are counted and divided
   by N*M*D (one pass = one full similarity GEMM), for the forward and for forward + backward, with the
   first-choice tile configuration a GPU runs. The batches are clustered like the benchmark's, so the
   backward's skipped zero tiles are what training data gives.
2. Programs launched per kernel (the split plan assumes a 132-SM GPU when none is present).
3. sm_90 compile statistics of every kernel variant those runs launch: Triton's real GPU compiler runs
   against a stub driver that answers "sm_90" (nothing is launched), then ptxas -v reports registers,
   spills and shared memory; CTAs per SM follow from Hopper's limits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)

# (name, mode, N, M, D, dtype, K samples per class, reference rows need grad)
CASES = [
    ("self mode", "self", 2048, 2048, 512, "bfloat16", 8, None),
    ("memory bank", "memory", 256, 32768, 128, "bfloat16", 8, False),
]
# the kernel variants compiled for sm_90: each dtype's first configuration, in every mode
COMPILE_CASES = [
    ("self", 300, 300, 512, "bfloat16"), ("memory", 100, 700, 128, "bfloat16"), ("reference", 100, 90, 96, "bfloat16"),
    ("self", 300, 300, 512, "float16"), ("reference", 100, 90, 96, "float16"),
    ("self", 300, 300, 512, "float32"), ("reference", 100, 90, 96, "float32"),
]

# Hopper (sm_90) per-SM limits
REGS_PER_SM, REG_ALLOC_UNIT, SMEM_PER_SM, SMEM_PER_CTA_RESERVED, MAX_WARPS, MAX_CTAS = 65536, 256, 233472, 1024, 64, 32


# ---- 1 and 2: counted under the interpreter --------------------------------------------------------------

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


def count_work(case) -> dict:
    """Similarity passes and launches of one case, forward and forward + backward (interpreter)."""
    from triton.runtime import interpreter

    import ms_fused
    from ms_fused import triton_backend as tb

    name, mode, n, m, d, dtype, k, grad_ref = case
    macs = [0]
    real_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, acc, *args, **kwargs):
        macs[0] += a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return real_dot(self, a, b, acc, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = counting_dot
    try:
        inputs = _inputs(mode, n, m, d, dtype, k, grad_ref)
        started = time.time()
        with tb.record_launches() as fwd_log:
            loss = ms_fused.multi_similarity_loss(**inputs, backend="triton")
        fwd_macs = macs[0]
        with tb.record_launches() as bwd_log:
            loss.backward()
        total_macs = macs[0]
    finally:
        interpreter.InterpreterBuilder.create_dot = real_dot
    per_pass = n * m * d
    cfg = next(c for _, _, c in fwd_log if c is not None)
    return dict(case=name, mode=mode, n=n, m=m, d=d, dtype=dtype, k=k,
                config=_config_text(cfg), loss=float(loss),
                forward_passes=fwd_macs / per_pass, total_passes=total_macs / per_pass,
                launches=[(kn, p) for kn, p, _ in fwd_log] + [(kn, p) for kn, p, _ in bwd_log],
                seconds=time.time() - started)


def _config_text(cfg) -> str:
    return (f"BLOCK_N={cfg.block_n} BLOCK_M={cfg.block_m} BLOCK_D={cfg.block_d} "
            f"warps={cfg.num_warps} stages={cfg.num_stages}")


# ---- 3: compiled for sm_90 without a GPU -----------------------------------------------------------------

def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (3.9 picks a newer one for arch >= 90 than for older GPUs)."""
    from triton.backends.nvidia import compiler as nvidia
    try:
        return nvidia.get_ptxas(90).path
    except TypeError:  # triton releases whose get_ptxas takes no arch
        return nvidia.get_ptxas().path


def _ptxas_stats(ptx: str, ptxas: str, arch: str) -> dict:
    """ptxas -v on the kernel's PTX, with the options Triton's own ptxas call uses for these kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "--fmad=false", "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), ok=done.returncode == 0)


def _ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // max(1, regs_per_warp)) // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_PER_CTA_RESERVED)
    return min(by_regs, by_smem, MAX_WARPS // num_warps, MAX_CTAS)


def compile_stats() -> list:
    """Every kernel variant of COMPILE_CASES compiled for sm_90 through the backend's own launch code."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["MS_FUSED_TRITON_AUTOTUNE"] = "0"
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit as jitmod
    from triton.runtime.driver import driver

    class StubDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(StubDriver())
    compiled = []
    real_run = jitmod.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    jitmod.JITFunction.run = compile_only

    from ms_fused import triton_backend as tb
    from ms_fused._inputs import HyperParams, check_inputs

    ptxas = _ptxas()
    if not ptxas:
        raise RuntimeError("no ptxas found (neither triton's bundled one nor on PATH)")
    rows, seen = [], set()
    for mode, n, m, d, dtype in COMPILE_CASES:
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(n, d, generator=gen).to(dt).requires_grad_()
        y = torch.randint(0, 20, (n,), generator=gen)
        r = yr = ref_self_index = None
        if mode != "self":
            r = torch.randn(m, d, generator=gen).to(dt).requires_grad_(mode == "reference")
            yr = torch.randint(0, 20, (m,), generator=gen)
            ref_self_index = torch.arange(n) if mode == "memory" else None
        for count in (False, True):  # the default kernels, and those that count mined pairs (return_stats)
            compiled.clear()
            problem = check_inputs(q, y, r, yr, ref_self_index, HyperParams())
            # apply() directly: per_anchor_loss would refuse CPU tensors outside the interpreter
            loss, _ = tb.FusedMultiSimilarity.apply(problem, problem.q, problem.ref, None, None, count)
            loss.sum().backward()
            cfg = tb.tile_configs(d, dt)[0]
            for name, kernel in compiled:
                key = (name, dtype, kernel.hash if hasattr(kernel, "hash") else id(kernel))
                if key in seen:
                    continue
                seen.add(key)
                stats = _ptxas_stats(kernel.asm["ptx"], ptxas, "sm_90a")
                warps = kernel.metadata.num_warps
                shared = kernel.metadata.shared
                rows.append(dict(kernel=name, mode=mode, dtype=dtype, d=d, count_pairs=count,
                                 config=_config_text(cfg) if name != "row_stats_kernel" else "BLOCK_N=32",
                                 num_warps=warps, shared_bytes=shared,
                                 ctas_per_sm=_ctas_per_sm(stats["registers"], warps, shared), **stats))
    jitmod.JITFunction.run = real_run
    return rows


# ---- report ----------------------------------------------------------------------------------------------

def summary(work: list, compiled: list) -> list:
    """The README's lines: passes per case, the programs of the widest launch, the worst compile figures."""
    lines = ["| case | N | M | D | dtype | forward passes | forward + backward passes | programs of the column sweep |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for w in work:
        sweep = max((p for k, p in w["launches"] if k == "sweep_kernel"), default=0)
        lines.append(f"| {w['case']} | {w['n']} | {w['m']} | {w['d']} | {w['dtype']} | {w['forward_passes']:.2f} | "
                     f"{w['total_passes']:.2f} | {sweep} |")
    spills = sum(c["spill_stores"] + c["spill_loads"] for c in compiled)
    most = max(compiled, key=lambda c: c["registers"])
    lines += ["", f"sm_90 (ptxas, no GPU), each dtype's first configuration: {len(compiled)} kernel variants, "
              f"{spills} bytes of register spills in all; the most registers: {most['registers']} per thread "
              f"({most['kernel']}, {most['mode']} mode, {most['dtype']}, D = {most['d']}, "
              f"{most['ctas_per_sm']} CTA per SM)."]
    return lines


def markdown(work: list, compiled: list, command: str) -> str:
    import environment
    env = environment.describe(__import__("torch").device("cpu"))["environment"]
    lines = ["# Triton kernels: work counted without a GPU", "",
             f"_Generated by `{command}` on {env['date']}: commit `{env['commit']}`, triton {env['triton']}, "
             f"torch {env['torch']}, Python {env['python']}._", "",
             "A *similarity pass* is N·M·D multiply-adds, one full similarity GEMM. Counted under Triton's "
             "interpreter from the multiply-adds of every `tl.dot`, with the first-choice GPU configuration; "
             "launch sizes plan for a 132-SM GPU.", "",
             "| case | N | M | D | dtype | K | configuration | forward passes | forward + backward passes |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for w in work:
        lines.append(f"| {w['case']} | {w['n']} | {w['m']} | {w['d']} | {w['dtype']} | {w['k']} | {w['config']} | "
                     f"{w['forward_passes']:.3f} | {w['total_passes']:.3f} |")
    lines += ["", "## Programs launched", "", "| case | kernel | programs |", "|---|---|---:|"]
    for w in work:
        for kernel, programs in w["launches"]:
            lines.append(f"| {w['case']} | {kernel} | {programs} |")
    lines += ["", "## sm_90 compile statistics (ptxas -v, no GPU)", "",
              "| kernel | mode | dtype | D | configuration | warps | registers | spill stores (B) | "
              "spill loads (B) | shared memory (B) | CTAs per SM |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in compiled:
        lines.append(f"| {c['kernel']} | {c['mode']} | {c['dtype']} | {c['d']} | {c['config']} | {c['num_warps']} | "
                     f"{c['registers']} | {c['spill_stores']} | {c['spill_loads']} | {c['shared_bytes']} | "
                     f"{c['ctas_per_sm']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "kernel_stats.md"))
    p.add_argument("--json", help="also write the records as JSON here")
    p.add_argument("--compile-only", action="store_true", help="only the sm_90 compile statistics")
    p.add_argument("--readme", help="also write the summary into this file between its kernel_stats markers")
    p.add_argument("--child", choices=["count", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, BENCH_DIR)
    if args.child == "count":
        json.dump([count_work(c) for c in CASES], sys.stdout)
        return
    if args.child == "compile":
        json.dump(compile_stats(), sys.stdout)
        return

    def child(kind: str, interpret: bool):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind], env=env,
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"kernel_stats {kind} failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    compiled = child("compile", interpret=False)
    work = [] if args.compile_only else child("count", interpret=True)
    json_path = args.json or (None if args.compile_only else os.path.splitext(args.out)[0] + ".json")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(work=work, compiled=compiled), f, indent=1)
    if args.compile_only:
        for c in compiled:
            print(c)
        return
    command = "python benchmarks/kernel_stats.py" + (f" --readme {args.readme}" if args.readme else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(work, compiled, command))
    print(open(args.out).read())
    if args.readme:
        import report
        made_by = f"_Generated by `{command}` (tables: [{os.path.relpath(args.out, REPO)}]({os.path.relpath(args.out, REPO)}))._"
        report.replace_block(args.readme, "<!-- kernel_stats -->", "<!-- /kernel_stats -->", [made_by, ""] + summary(work, compiled))


if __name__ == "__main__":
    main()
