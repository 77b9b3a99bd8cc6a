"""benchmarks/sass_stats.py: the tile loops' instructions per tile, read from compiled code without a GPU.

The counting itself on a hand-written listing (the tile loop, its shortest path, an inner K loop counted once
per trip, the classes, the wgmma waits); then the sm_90 kernels as the Triton under test compiles them (a
stub driver, one target, D = 128, one child process of about 20 s): the sweep's and the backward's tile loops
hold HGMMA and MUFU.EX2, the counts add up, and the S dots' instruction shapes are reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
import sass_stats  # noqa: E402  (benchmarks/ is on sys.path through conftest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tile loop (.L_x_0) whose band compares a branch skips, a K loop (.L_x_2) of one HGMMA per trip, then the
# epilogue: a wait, one exp2, a shuffle, a load
LISTING = textwrap.dedent("""\
            /*0000*/                   S2R R0, SR_TID.X ;
            /*0010*/                   IMAD.MOV.U32 R1, RZ, RZ, RZ ;
    .L_x_0:
            /*0020*/                   ISETP.GE.AND P0, PT, R1, R2, PT ;
            /*0030*/               @P0 BRA `(.L_x_1) ;
            /*0040*/                   ISETP.EQ.AND P1, PT, R3, R4, PT ;
            /*0050*/                   ISETP.EQ.AND P2, PT, R3, R5, PT ;
            /*0060*/                   SEL R6, R7, R8, P1 ;
    .L_x_1:
            /*0070*/                   WARPGROUP.ARRIVE ;
    {peeled}
    .L_x_2:
            /*0080*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24 ;
            /*0090*/                   IADD3 R9, R9, 0x1, RZ ;
            /*00a0*/                   ISETP.NE.AND P3, PT, R9, R10, PT ;
            /*00b0*/               @P3 BRA `(.L_x_2) ;
            /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, {wait} ;
            /*00d0*/                   FMUL R11, R24, R12 ;
            /*00e0*/                   MUFU.EX2 R13, R11 ;
            /*00f0*/                   SHFL.BFLY PT, R14, R13, 0x1, 0x1f ;
            /*0100*/                   FADD R15, R15, R14 ;
            /*0110*/                   LDG.E R16, desc[UR6][R18.64] ;
            /*0120*/                   IADD3 R1, R1, 0x10, RZ ;
            /*0130*/                   ISETP.LT.AND P4, PT, R1, R17, PT ;
            /*0140*/               @P4 BRA `(.L_x_0) ;
            /*0150*/                   EXIT ;
    .L_x_3:
            /*0160*/                   BRA `(.L_x_3);
    """)
# D = 64 in K steps of 16: four trips of the K loop; a 64 x 16 tile on 4 warps (one warpgroup)
LAUNCH = dict(D=64, BLOCK_D=16, BLOCK_N=64, BLOCK_M=16)


def _counts(peeled: str = "", wait: str = "0x0") -> dict:
    instrs, labels = sass_stats.parse_sass(LISTING.format(peeled=peeled, wait=wait))
    return sass_stats.kernel_counts(instrs, labels, sass_stats.SASS, kernel="sweep_kernel", arch="sm_90", warps=4,
                                    kw=LAUNCH)


def test_sass_counts_one_tile_on_the_tile_loops_shortest_path_with_the_k_loop_once_per_trip():
    r = _counts()
    assert r["tile_loop"]["holds_exp2"] and r["tile_loop"]["inner_loops"] == 1
    assert r["tile_loop"]["inner_trips"] == [4]
    # header 2, the arrive 1, four K-loop trips of 4, the epilogue 9; the band's 3 compares skipped
    assert r["per_tile"] == 2 + 1 + 4 * 4 + 9
    assert r["loop_instructions"] == r["per_tile"] + 3
    assert r["classes"] == dict(mma=4, mufu=1, fp32=2, int_pred=1 + 4 * 2 + 2, memory=1, warp=1, sync=2,
                                control=1 + 4 + 1)
    assert sum(r["classes"].values()) == r["per_tile"]
    assert r["mma_macs"] == 4 * 64 * 16 * 16 == r["useful_macs"]
    assert r["tensor_cycles"] == r["mma_macs"] / 2048
    assert r["issue_cycles"] == r["per_tile"] * 4 / 4
    assert r["mufu_cycles"] == 1 * 32 * 4 / 16
    assert r["s_dot_sass"] == ["HGMMA.64x16x16.F32.BF16"]     # one chain into R24 summing K = 64 = D
    assert (r["waits"], r["overlap"]) == ([0], False)


def test_sass_counts_the_k_steps_peeled_out_of_the_k_loop_and_a_wait_that_leaves_a_group_outstanding():
    peeled = "        /*0075*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;"
    r = _counts(peeled=peeled, wait="0x1")
    assert r["tile_loop"]["inner_trips"] == [3]
    assert r["classes"]["mma"] == 4 and r["per_tile"] == 2 + 2 + 3 * 4 + 9
    assert r["s_dot_sass"] == ["HGMMA.64x16x16.F32.BF16"]
    assert (r["waits"], r["overlap"]) == ([1], True)


def _roofline(overlap: bool) -> dict:
    n, d = 2048, 128
    macs = n * n * d
    counted = dict(d=d, work=dict(case="self mode, D = 128", n=n, m=n, d=d, triton="test",
                                  launches=[dict(config="c", macs=macs)]),
                   kernels=[dict(phase="forward", kernel="sweep_kernel", passes=1.0, bytes_per_mac=0.02, macs=macs,
                                 load_bytes=0.02 * macs)])
    tiles = [dict(kernel="sweep_kernel", useful_macs=128 * 32 * d, tensor_cycles=256.0, issue_cycles=1024.0,
                  mufu_cycles=300.0, overlap=overlap)]
    return sass_stats.roofline(counted, tiles, peak_tflops=788.0, l2_tbps=7.0, hbm_tbps=4.8, clock_ghz=1.83, n_sms=132)


def test_sass_roofline_adds_the_epilogue_to_the_mma_unless_they_overlap():
    waits, overlaps = _roofline(False), _roofline(True)
    k, o = waits["kernels"][0], overlaps["kernels"][0]
    n = sass_stats.POINT_N
    tiles = n * n * 128 / (128 * 32 * 128)
    assert k["tensor_s"] == pytest.approx(tiles * 256 / (1.83e9 * 132))
    assert k["issue_s"] == pytest.approx(4 * k["tensor_s"]) and k["mufu_s"] < k["issue_s"]
    assert k["bytes_s"] == pytest.approx(0.02 * n * n * 128 / 7e12)
    assert k["seconds"] == pytest.approx(max(k["bytes_s"], k["tensor_s"] + k["issue_s"]))
    assert k["bound"] == "tensor + issue"
    assert o["seconds"] == pytest.approx(max(o["bytes_s"], o["tensor_s"], o["issue_s"], o["mufu_s"]))
    assert o["bound"] == "issue"
    # one mm at D = 128 writes its N x N bfloat16 output slower than it multiplies
    assert waits["mm_seconds"] == pytest.approx(n * n * 2 / 4.8e12)
    assert waits["mm_seconds"] > 2 * n * n * 128 / 788e12
    assert waits["forward_per_mm"] == pytest.approx(k["seconds"] / waits["mm_seconds"])


# ---- the kernels as the Triton under test compiles them for sm_90 -------------------------------------------

@pytest.fixture(scope="module")
def sm90_tiles() -> dict:
    if torch.cuda.is_available():
        pytest.skip("compiles against a stub driver; on a GPU machine the GPU tests run the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "sass_stats.py"), "--child", "compile",
                           "--arch", "sm_90", "--d", "128,512", "--kernels", "sweep_kernel,backward_kernel"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return {(r["kernel"], r["d"]): r for r in json.loads(done.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("d", [128, 512])
@pytest.mark.parametrize("kernel", ["sweep_kernel", "backward_kernel"])
def test_triton_sass_tile_loop_of_the_sm_90_kernels_holds_hgmma_and_exp2(sm90_tiles, kernel, d):
    r = sm90_tiles[kernel, d]
    assert r["tile_loop"] is not None and r["tile_loop"]["holds_exp2"], f"no tile loop with HGMMA and MUFU.EX2: {r}"
    assert r["mma_ops"] and all(op.startswith("HGMMA.") for op in r["mma_ops"])
    assert r["loop_instructions"] > 0 and r["per_tile"] > 0
    if r["launch"]["RESIDENT"]:  # no K loop inside the tile loop (else it counts once per trip)
        assert r["per_tile"] <= r["loop_instructions"] < r["instructions_in_kernel"]
    assert sum(r["classes"].values()) == r["per_tile"]
    assert r["classes"]["mma"] == sum(r["mma_ops"].values())
    assert r["classes"]["mufu"] == r["mufu"] >= r["ex2"] > 0
    # every S element gets one exp2, the backward's for G and G^T together (SHARED_EXP), and no more
    kw = r["launch"]
    elements = kw.get("ROW_GROUPS", 1) * kw["BLOCK_N"] * kw["BLOCK_M"]
    assert kernel == "sweep_kernel" or kw["SHARED_EXP"]
    assert r["ex2"] * 32 * r["warps"] == elements
    # the tile's HGMMAs do at least the multiply-adds its tl.dots state
    assert r["useful_macs"] and r["mma_macs"] >= r["useful_macs"]
    assert r["tensor_cycles"] == r["mma_macs"] / sass_stats.TENSOR_MACS_PER_CYCLE["sm_90"]
    assert r["issue_per_tensor"] == pytest.approx(r["per_tile"] * r["warps"] / 4 / r["tensor_cycles"])
    assert r["mufu_per_tensor"] > 0
    assert r["waits"] and isinstance(r["overlap"], bool)


@pytest.mark.parametrize("d", [128, 512])
def test_triton_sass_the_forward_and_the_backward_compute_s_with_the_same_instructions(sm90_tiles, d):
    """The sweep's and the backward's S dots (the chains of HGMMAs that sum K = D): one shape each, and the same
    shape and warp layout in both (D = 128: 4 warps, one warpgroup per 64 x 32 tile; D = 512: 8 warps, each
    warpgroup a 16-column half of it), so that the backward mines the forward's pairs by construction."""
    shapes = {}
    for kernel in ("sweep_kernel", "backward_kernel"):
        r = sm90_tiles[kernel, d]
        assert len(r["s_dot_sass"]) == 1, r["s_dot_sass"]
        m, n, k = sass_stats.mma_shape(r["s_dot_sass"][0])
        assert (m, k) == (64, 16) and n % 8 == 0
        assert r["s_dot_layout"].startswith("nvidia_mma v3")
        shapes[kernel] = (r["s_dot_sass"][0], r["warps"], r["s_dot_layout"])
    assert shapes["sweep_kernel"] == shapes["backward_kernel"], shapes


def test_triton_waits_for_its_mma_before_the_epilogue_even_when_the_next_dot_is_issued_first():
    """Why the per-tile model sums tensor and issue time on sm_90 (docs/triton_tiles.md): under the Triton in use,
    a tile loop that issues the next tile's dot before this tile's epilogue still waits for every wgmma group
    after each dot. If a Triton release overlaps them, this fails: the kernels and the model should follow."""
    if torch.cuda.is_available():
        pytest.skip("compiles against a stub driver")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "overlap_probe.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    waits = json.loads(done.stdout.strip().splitlines()[-1])["waits"]
    assert waits["as_written"] and waits["prefetched"], waits
    assert set(waits["as_written"]) == {0} and set(waits["prefetched"]) == {0}, waits
