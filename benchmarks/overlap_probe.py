"""Does Triton let a Hopper tile loop overlap its MMA with its epilogue? A probe, compiled without a GPU.

    python benchmarks/overlap_probe.py     # prints, per loop form, the wgmma waits of the compiled tile loop

Two forms of the same loop (S = A Bᵀ per column tile, then a sum of exp2 over S): as the kernels write it, and
software-pipelined by hand (the next tile's dot issued before this tile's epilogue, S carried to the next
iteration). Compiled for sm_90 against a stub driver (kernel_stats.stub_compiler's), disassembled with Triton's
nvdisasm: every `WARPGROUP.DEPBAR.LE gsb0, N` with N = 0 waits for every outstanding wgmma group. Under Triton
3.6 and 3.9 both forms wait for 0 right after each dot: Triton makes a dot asynchronous only where its result
is the next dot's accumulator, so an epilogue that reads S cannot run beside the next tile's MMA within a
warpgroup. (`tl.range(..., warp_specialize=True)` fails to compile this loop for sm_90 under both.)
sass_stats.py reports this probe beside its per-tile counts; docs/triton_tiles.md says what it means.
"""
from __future__ import annotations

import json
import os
import re
import sys

import triton
import triton.language as tl


@triton.jit
def as_written(a_ptr, b_ptr, out_ptr, NB, D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, D)
    a = tl.load(a_ptr + rows[:, None] * D + ks[None, :])
    acc = tl.zeros([BN, BM], tl.float32)
    for start in range(0, NB, BM):
        b = tl.load(b_ptr + (start + tl.arange(0, BM))[:, None] * D + ks[None, :])
        S = tl.dot(a, tl.trans(b))
        acc += tl.exp2(S * 3.0 - 7.0)
    tl.store(out_ptr + rows, tl.sum(acc, 1))


@triton.jit
def prefetched(a_ptr, b_ptr, out_ptr, NB, D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, D)
    a = tl.load(a_ptr + rows[:, None] * D + ks[None, :])
    acc = tl.zeros([BN, BM], tl.float32)
    S = tl.dot(a, tl.trans(tl.load(b_ptr + tl.arange(0, BM)[:, None] * D + ks[None, :])))
    for start in range(BM, NB, BM):
        b = tl.load(b_ptr + (start + tl.arange(0, BM))[:, None] * D + ks[None, :])
        S_next = tl.dot(a, tl.trans(b))  # issued before this tile's epilogue
        acc += tl.exp2(S * 3.0 - 7.0)
        S = S_next
    acc += tl.exp2(S * 3.0 - 7.0)
    tl.store(out_ptr + rows, tl.sum(acc, 1))


def waits(d: int = 128, block_m: int = 64, stages: int = 2) -> dict:
    """{loop form: the N of every wgmma wait in its compiled code}, compiled for sm_90 (4 warps, 64 rows)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import kernel_stats
    import sass_stats

    import torch
    out = {}
    with kernel_stats.stub_compiler("sm_90"):
        a = torch.empty(4096, d, dtype=torch.bfloat16)
        o = torch.empty(4096)
        for kernel in (as_written, prefetched):
            compiled = kernel.warmup(a, a, o, 4096, D=d, BN=64, BM=block_m, num_warps=4, num_stages=stages,
                                     grid=(1,))
            sass = sass_stats.disassemble(compiled.asm["cubin"])
            out[kernel.fn.__name__] = [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)]
    return out


if __name__ == "__main__":
    print(json.dumps(dict(triton=triton.__version__, waits=waits())))
