"""The Triton kernels compiled for every GPU family the project lists, without a GPU.

benchmarks/kernel_stats.py --compile-only runs Triton's real compiler against a stub driver that answers each
target (nothing is launched), through the backend's own launch code with MS_FUSED_TRITON_ARCH=<target>, for
each dtype's first configuration in every mode (kernel_stats.COMPILE_CASES), one process per target. Every
target must compile every kernel variant with no register spill, with shared memory within the target's
per-block limit, and with the target's matrix instruction (wgmma, tcgen05.mma, mma.sync, v_mfma) in every
bfloat16 and float16 kernel that calls tl.dot. On NVIDIA targets from sm_80 on, every pipelined kernel that
streams column tiles copies them asynchronously (cp.async) with no 2-byte loads, for rows that are not
multiples of 16 elements (D = 100, 130) as for the others. sm_75 (T4) is held to the shared memory limit only:
its bf16 dots have no tensor-core instruction and its large tiles spill, so the backend's "auto" routing
decides what runs there.

Catches what the interpreter lets through: non-constexpr globals, dot dtype rules, loop-carried types, register
allocation, shared memory. Runs the targets in parallel processes (one per core); a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from kernel_stats import ARCHS, COLUMN_TILE_KERNELS  # noqa: E402  (benchmarks/ is on sys.path through conftest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every target by default; MS_FUSED_COMPILE_TARGETS=sm_90 (comma-separated) narrows it, e.g. for a second Triton
TARGETS = [a for a in os.environ.get("MS_FUSED_COMPILE_TARGETS", ",".join(ARCHS)).split(",") if a]
assert set(TARGETS) <= set(ARCHS), f"MS_FUSED_COMPILE_TARGETS: unknown targets {set(TARGETS) - set(ARCHS)}"
ASSERTED = [a for a in TARGETS if ARCHS[a].asserted]
WITH_ASYNC_COPIES = [a for a in ASSERTED if ARCHS[a].copy]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU machine the GPU tests compile and run the kernels themselves")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """{target: [one row per kernel variant]} from one kernel_stats --compile-only run over TARGETS."""
    out = tmp_path_factory.mktemp("kernel_compile") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_stats.py"), "--compile-only",
                           "--arch", ",".join(TARGETS), "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    rows = json.load(open(out))["compiled"]
    return {a: [r for r in rows if r["arch"] == a] for a in TARGETS}


def _name(r: dict) -> str:
    return (f"{r['kernel']} ({r['mode']}, {r['dtype']}, D = {r['d']}, pairs counted: {r['count_pairs']}, "
            f"{r.get('config', '')})")


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.slow
def test_triton_kernels_compile(compiled, arch):
    rows = compiled[arch]
    errors = [f"{_name(r)}: {r['error']}" for r in rows if not r.get("ok")]
    assert not errors, "\n".join(errors)
    assert rows, f"nothing compiled for {arch}"
    assert all(r["registers"] > 0 for r in rows), "a register count was not read"


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.slow
def test_triton_shared_memory_within_the_per_block_limit(compiled, arch):
    limit = ARCHS[arch].smem_per_block
    over = [f"{_name(r)}: {r['shared_bytes']} B" for r in compiled[arch] if r.get("ok") and r["shared_bytes"] > limit]
    assert not over, f"over {limit} B of shared memory per block on {arch}:\n" + "\n".join(over)


@pytest.mark.parametrize("arch", ASSERTED)
@pytest.mark.slow
def test_triton_no_register_spills(compiled, arch):
    spilled = [f"{_name(r)}: " + (f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
                                  if "spill_stores" in r else f"{r['vgpr_spills']} VGPRs spilled, "
                                  f"{r['scratch_bytes']} B scratch")
               for r in compiled[arch] if r.get("ok") and r["spills"]]
    assert not spilled, f"register spills on {arch}:\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", ASSERTED)
@pytest.mark.slow
def test_triton_matrix_instructions_in_every_half_precision_dot_kernel(compiled, arch):
    rows = [r for r in compiled[arch] if r.get("ok") and r["needs_matrix"]]
    assert rows, f"no bf16/fp16 kernel with a tl.dot compiled for {arch}"
    missing = [_name(r) for r in rows if not r["matrix_count"]]
    assert not missing, f"no {ARCHS[arch].matrix} instruction on {arch} in:\n" + "\n".join(missing)


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.slow
def test_triton_every_kernel_of_a_launch_computes_s_with_one_instruction(compiled, arch):
    """docs/triton_tiles.md, "One S everywhere": the forward mines with the S tiles that the backward
    recomputes, so within each launch case (mode, dtype, shape) every kernel's S dots are the same matrix
    instruction on the same K step, read from the compiled TTGIR (kernel_stats.s_dot_instruction)."""
    rows = [r for r in compiled[arch] if r.get("ok")]
    unread = [_name(r) for r in rows if r["kernel"] in COLUMN_TILE_KERNELS and not r["s_dot"]]
    assert not unread, "no S dot found in the TTGIR of:\n" + "\n".join(unread)
    by_case = {}
    for r in rows:
        if r["s_dot"]:
            for case in r["cases"]:
                by_case.setdefault(case, {})[r["kernel"]] = r["s_dot"]
    assert by_case, f"no S dot read on {arch}"
    differing = [f"{case}: {kernels}" for case, kernels in by_case.items() if len(set(kernels.values())) > 1]
    assert not differing, f"S dots of one launch differ on {arch}:\n" + "\n".join(differing)
    assert all("several" not in r["s_dot"] for r in rows), "a kernel computes its S dots with two instructions"
    # each launch ran a forward sweep and a backward: the MS loss's, or a pair-weighting loss's
    assert all(set(kernels) >= {"sweep_kernel", "backward_kernel"}
               or set(kernels) >= {"pair_sweep_kernel", "pair_backward_kernel"} for kernels in by_case.values())


@pytest.mark.parametrize("arch", WITH_ASYNC_COPIES)
@pytest.mark.slow
def test_triton_column_tiles_are_copied_asynchronously(compiled, arch):
    """The aligned load path (ms_fused/engine/triton/ms_kernels.py, "Alignment"): D = 100 loads 4 bfloat16
    elements at a time, D = 130 two; either way the pipeliner turns the column-tile loads into cp.async."""
    rows = [r for r in compiled[arch] if r.get("ok") and r["needs_copy"]]
    compiled_for = {(r["kernel"], r["d"]) for r in rows if r["dtype"] == "bfloat16"}
    # the odd D are the MS loss's cases; the pair-weighting kernels load through the same _column_tile and are
    # held to their copies below wherever they are compiled
    wanted = {(k, d) for k in COLUMN_TILE_KERNELS if not k.startswith("pair_") for d in (100, 130)}
    assert wanted <= compiled_for, f"not compiled, or not pipelined, on {arch}: {sorted(wanted - compiled_for)}"
    synchronous = [f"{_name(r)}: {r['async_copies']} asynchronous copies, {r['narrow_loads']} 2-byte loads"
                   for r in rows if not r["async_copies"] or r["narrow_loads"]]
    assert not synchronous, f"column tiles loaded synchronously on {arch}:\n" + "\n".join(synchronous)


# ---- the interpreter counts behind bytes per multiply-add ---------------------------------------------------

def test_triton_interpreter_counter_counts_loaded_bytes_and_multiply_adds_per_launch():
    """kernel_stats' hooks: a load's bytes leave out the elements its mask switches off, a dot's multiply-adds
    are M*N*K, and both go to the launch (kernel name, programs, tile arguments) they happen in."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts under Triton's interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)")
    import triton
    import triton.language as tl

    from kernel_stats import _InterpreterCounter

    @triton.jit
    def tile_product(x_ptr, y_ptr, out_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        offs = r[:, None] * BLOCK + r[None, :]
        a = tl.load(x_ptr + offs, mask=(r < ROWS)[:, None], other=0.0)  # ROWS of BLOCK rows
        b = tl.load(y_ptr + offs)                                         # every element
        tl.store(out_ptr + offs, tl.dot(a, b))

    x, y, out = torch.randn(16, 16), torch.randn(16, 16), torch.empty(16, 16)
    with _InterpreterCounter() as counter:
        tile_product[(3,)](x, y, out, ROWS=10, BLOCK=16)
        counter.phase = "backward"
        tile_product[(1,)](x, y, out, ROWS=16, BLOCK=16)
    assert counter.launches == [
        dict(kernel="tile_product", phase="forward", programs=3, config="BLOCK=16", macs=3 * 16 ** 3,
             load_bytes=3 * (10 * 16 + 16 * 16) * 4),
        dict(kernel="tile_product", phase="backward", programs=1, config="BLOCK=16", macs=16 ** 3,
             load_bytes=(16 * 16 + 16 * 16) * 4)]
    torch.testing.assert_close(out, x @ y)


@pytest.mark.parametrize("mode, counted, point, used", [
    # self mode: the point gives a split more columns than are counted: one split of all of them (the forward
    # plans the sweep's splits, then the band kernels')
    ("self", (256, 256), (4096, 4096), [("forward", 1, 256), ("forward", 1, 256), ("backward", 1, 256)]),
    # memory bank: the point's 224 columns per split (7 tiles of 32) against the counted size's own 192 and 96;
    # the backward's 512 (16 tiles): its partial sums are capped at one 64-row block per SM, 132 splits
    ("memory", (64, 2048), (64, 65536), [("forward", 10, 224), ("forward", 10, 224), ("backward", 4, 512)]),
])
def test_kernel_stats_counts_the_roofline_with_the_predicted_points_column_splits(monkeypatch, mode, counted,
                                                                                 point, used):
    """kernel_stats' _SplitPlan: the roofline's run gives each launch the columns per split of the same launch
    at the predicted point (capped at the counted columns), the acceptance run keeps the counted size's own
    plan, and both runs do the same multiply-adds and give the same loss."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts under Triton's interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)")
    import kernel_stats

    monkeypatch.setitem(kernel_stats.TARGETS, "tiny", ("P", *point, 64, "bfloat16"))
    case = ("tiny", mode, *counted, 64, "bfloat16", 8, False)
    own, target = kernel_stats.count_work(case), kernel_stats.count_work(case, "target")
    assert [(p["phase"], p["splits"], p["cols_per_split"]) for p in target["splits"]] == used
    for p in target["splits"]:  # the point's columns per split, or one split of all counted columns
        assert p["cols_per_split"] == p["target_cols_per_split"] or (p["splits"] == 1 and
                                                                     p["cols_per_split"] < p["target_cols_per_split"])
    assert [(p["splits"], p["cols_per_split"]) for p in own["splits"]] == \
        [(p["own_splits"], p["own_cols_per_split"]) for p in own["splits"]]
    assert [(p["splits"], p["cols_per_split"]) for p in own["splits"]] != \
        [(p["splits"], p["cols_per_split"]) for p in target["splits"]]
    assert own["total_passes"] == target["total_passes"]
    assert own["loss"] == pytest.approx(target["loss"], rel=1e-4)
    sweeps = [x["programs"] for x in target["launches"] if x["kernel"] == "sweep_kernel"]
    assert sweeps == [-(-counted[0] // 128) * used[0][1]]
