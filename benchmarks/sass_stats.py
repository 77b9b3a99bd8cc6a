"""What the Triton kernels' tile loops issue per tile, read from their compiled code without a GPU.

    python benchmarks/sass_stats.py --with .venv-triton36/bin/python:sm_90
        # writes benchmarks/results/sass_stats.{md,json}: sm_90 (Triton 3.9 and 3.6), sm_80, sm_89, gfx942,
        # and the roofline with every ceiling at the issue's points under both Tritons
    python benchmarks/sass_stats.py --arch sm_90 --d 128 --no-roofline --json out.json   # one target, counts only

1. Compiled as kernel_stats.py --compile-only compiles (Triton's own compiler against a stub driver, through the
   backend's launch code), self mode, bfloat16, N = 40000 (COUNT_N), at D = 512, 256 and 128. NVIDIA cubins are
   disassembled with the nvdisasm that ships inside Triton's wheel; AMD's amdgcn is Triton's own assembly.
2. Each kernel's tile loop is the smallest loop of its control-flow graph (natural loops over dominators) that
   holds both the matrix instruction and exp2 (HGMMA / HMMA and MUFU.EX2; v_mfma and v_exp_f32), else the
   outermost holding the matrix instruction (the band minimum has no exp2). One tile is one iteration of it,
   counted on its shortest path that executes every matrix instruction of the loop: branches that the common
   tile skips (the band's label compares in the sweep) are left out, the tile's products are not. An inner
   loop (the K loop of a configuration that re-reads K-chunks) is counted once per trip, its own shortest path
   each time: ceil(D / BLOCK_D) trips less the K-steps that the software pipeline peeled out of it.
3. Per tile and SM, NVIDIA: issue cycles = instructions x warps / 4 schedulers (one instruction per cycle
   each); tensor cycles = the multiply-adds of the matrix instructions on the path (HGMMA: m x n x k per
   warpgroup, each warpgroup of the CTA runs it; HMMA: m x n x k per warp) / the target's dense bf16 rate
   (TENSOR_MACS_PER_CYCLE); MUFU cycles = MUFU instructions x 32 lanes x warps / 16 lanes per cycle.
4. Overlap: on sm_90 the MMA overlaps the epilogue only if a wgmma wait at the tile loop's own level
   (WARPGROUP.DEPBAR.LE, outside its inner loops) leaves a group outstanding; a wait for 0 means the tile's
   epilogue starts after its MMA has finished. mma.sync (sm_80, sm_89) and MFMA have no asynchronous groups:
   a warp's epilogue reads the accumulators its own MMAs just wrote.
5. Roofline (--no-roofline leaves it out): each kernel's time at N = 32768 for a 132-SM H100/H200, from its
   multiply-adds and bytes counted under the interpreter (kernel_stats.count_work with the point's column splits)
   and the sm_90 per-tile cycles of the same Triton: max(bytes, tensor + max(issue, MUFU)) where the tile waits for
   its MMA, max(bytes, tensor, issue, MUFU) where the MMA overlaps; over one mm of X Xᵀ.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import kernel_stats  # noqa: E402

COUNT_N = 40000         # the compiled launches' N (the issue's); no launch splits its columns at this size
DIMS = (512, 256, 128)  # 256: the widest D every checked Triton keeps resident for both dtypes
DEFAULT_ARCHS = ("sm_90", "sm_80", "sm_89", "gfx942")

# dense bfloat16 multiply-adds per cycle per SM (tensor cores, float32 accumulation)
TENSOR_MACS_PER_CYCLE = {
    "sm_90": 2048,  # H100/H200: 4 tensor cores x 512; 132 SMs x 2048 x 2 x 1.83 GHz = 989 TFLOP/s, the spec sheet's
    "sm_80": 1024,  # A100: 4 x 256; 108 x 1024 x 2 x 1.41 GHz = 312 TFLOP/s
    "sm_89": 512,   # L4, L40S: 58 x 512 x 2 x 2.04 GHz = 121 TFLOP/s (L4); L40 and GeForce RTX 40 have half (256)
}
MUFU_LANES_PER_CYCLE = 16   # per SM, exp2 / log2 / rcp / rsqrt (CUDA C++ Programming Guide, throughput table)
SCHEDULERS = 4              # warp schedulers per SM, one instruction issued per cycle each
RATE_SOURCE = ("tensor: dense bfloat16 multiply-adds per cycle per SM, from each GPU's specified dense bf16 "
               "TFLOP/s over its SMs and boost clock (sm_90 2048: 989 TFLOP/s = 132 SMs x 2048 x 2 x 1.83 GHz; "
               "sm_80 1024: A100's 312 TFLOP/s; sm_89 512: L4's 121 and L40S's 362 TFLOP/s); MUFU: 16 results "
               "per cycle per SM for exp2, log2, rcp, rsqrt (CUDA C++ Programming Guide, arithmetic instruction "
               "throughput); issue: 4 warp schedulers per SM, one instruction per cycle each")

# the roofline's machine: an H100/H200 (sm_90)
N_SMS = 132
SM_CLOCK_GHZ = 1.83         # the clock at which 132 SMs x 2048 x 2 give the specified 989 TFLOP/s
HBM_TBPS = 4.8
HBM_SOURCE = "H200's specified HBM3e bandwidth, at which one mm at best writes its N x N bfloat16 output"
POINT_N = 32768
ROOFLINE_COUNT_N = 2048     # the interpreter count's size (kernel_stats' self-mode case), scaled to POINT_N
FORWARD_GOALS = {512: 1.3, 128: 1.5}
STEP_GOALS = {512: 3.4, 128: 4.5}


# ---- instructions and their control flow ---------------------------------------------------------------

@dataclass
class Instr:
    op: str                     # mnemonic with its modifiers: "HGMMA.64x16x16.F32.BF16", "v_mfma_f32_32x32x8_bf16"
    text: str                   # the instruction as disassembled, predicate and operands included
    offset: int = 0
    targets: tuple = ()         # labels it may branch to
    falls_through: bool = True  # control may reach the next instruction
    ends_block: bool = False    # a branch or an exit: the next instruction starts a block

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")


def parse_sass(text: str) -> tuple:
    """(instructions, {label: index of the instruction it names}) of one function's nvdisasm listing."""
    instrs, labels = [], {}
    for line in text.splitlines():
        m = _SASS_LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _SASS_LINE.match(line)
        if not m:
            continue
        body = m.group(2).rstrip(" ;")
        guard = re.match(r"@(!?U?P[T0-9]+)\s+", body)
        rest = body[guard.end():] if guard else body
        op = rest.split()[0]
        base = op.split(".")[0]
        guarded = bool(guard) and guard.group(1) not in ("PT", "UPT")
        ins = Instr(op=op, text=body, offset=int(m.group(1), 16))
        if base in ("BRA", "BRX", "JMP", "JMX"):
            ins.targets = tuple(re.findall(r"`\((\.L_x_\d+)\)", rest))
            # a predicate operand (BRA.U !UP0, target), a guard, or BRA.DIV: the branch may not be taken
            operands = rest[len(op):].split("`")[0]
            conditional = guarded or ".DIV" in op or bool(re.search(r"!?U?P[0-6]\b", operands))
            ins.falls_through, ins.ends_block = conditional, True
        elif base in ("EXIT", "RET", "KILL"):
            ins.falls_through, ins.ends_block = guarded, True
        instrs.append(ins)
    return instrs, labels


_AMD_LABEL = re.compile(r"^(\.LBB\d+_\d+):")


def parse_amdgcn(text: str, kernel: str) -> tuple:
    """(instructions, {label: index}) of one kernel's body in Triton's amdgcn assembly."""
    start = re.search(rf"^{re.escape(kernel)}:", text, re.M)
    end = re.search(r"^\.Lfunc_end\d+:", text[start.end():], re.M) if start else None
    body = text[start.end(): start.end() + end.start()] if end else text[start.end():] if start else ""
    instrs, labels = [], {}
    for line in body.splitlines():
        s = line.split(";")[0].strip()
        m = _AMD_LABEL.match(s)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        if not s or s.startswith(".") or s.endswith(":"):
            continue
        op = s.split()[0]
        ins = Instr(op=op, text=s, offset=len(instrs))
        if op == "s_branch" or op.startswith("s_cbranch_"):
            ins.targets = tuple(re.findall(r"(\.LBB\d+_\d+)", s))
            ins.falls_through, ins.ends_block = op != "s_branch", True
        elif op in ("s_endpgm", "s_setpc_b64"):
            ins.falls_through, ins.ends_block = False, True
        instrs.append(ins)
    return instrs, labels


@dataclass
class Block:
    first: int
    last: int                   # inclusive instruction indices
    succs: list = field(default_factory=list)
    preds: list = field(default_factory=list)


def build_cfg(instrs: list, labels: dict) -> list:
    """Basic blocks with their successors; block 0 is the entry."""
    starts = {0} | {i for i in labels.values() if i < len(instrs)}
    starts |= {i + 1 for i, x in enumerate(instrs) if x.ends_block and i + 1 < len(instrs)}
    order = sorted(starts)
    of = {s: k for k, s in enumerate(order)}
    blocks = [Block(s, (order[k + 1] if k + 1 < len(order) else len(instrs)) - 1) for k, s in enumerate(order)]
    for k, b in enumerate(blocks):
        last = instrs[b.last]
        succ = [of[labels[t]] for t in last.targets if t in labels and labels[t] < len(instrs)]
        if last.falls_through and k + 1 < len(blocks):
            succ.append(k + 1)
        b.succs = list(dict.fromkeys(succ))
    for k, b in enumerate(blocks):
        for s in b.succs:
            blocks[s].preds.append(k)
    return blocks


def dominators(blocks: list) -> list:
    """dom[b]: the set of blocks that dominate b (unreachable blocks: every block)."""
    n = len(blocks)
    every = set(range(n))
    dom = [every.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, n):
            preds = [dom[p] for p in blocks[b].preds]
            new = (set.intersection(*preds) if preds else every.copy()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


@dataclass
class Loop:
    header: int
    blocks: frozenset
    latches: frozenset          # blocks with an edge back to the header
    children: list = field(default_factory=list)   # the loops directly inside it


def natural_loops(blocks: list) -> list:
    """Natural loops (one per header, back edges merged), each with its directly nested loops."""
    dom = dominators(blocks)
    body, latches = {}, {}
    for u, b in enumerate(blocks):
        for h in b.succs:
            if h in dom[u]:     # back edge u -> h
                members, stack = {h, u}, [u] if u != h else []
                while stack:
                    x = stack.pop()
                    for p in blocks[x].preds:
                        if p not in members:
                            members.add(p)
                            stack.append(p)
                body.setdefault(h, set()).update(members)
                latches.setdefault(h, set()).add(u)
    loops = [Loop(h, frozenset(body[h]), frozenset(latches[h])) for h in body]
    for inner in loops:
        outer = [o for o in loops if o is not inner and inner.blocks < o.blocks]
        if outer:
            min(outer, key=lambda o: len(o.blocks)).children.append(inner)
    return loops


# ---- what an instruction is ----------------------------------------------------------------------------

CLASSES = ("mma", "mufu", "fp32", "int_pred", "memory", "warp", "sync", "control")
_SASS_CLASSES = {
    "mma": {"HGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "QGMMA", "IGMMA", "BGMMA"},
    "mufu": {"MUFU"},
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "FRND", "FADD32I", "FMUL32I",
             "FFMA32I", "FSWZADD", "F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP", "HADD2", "HMUL2", "HFMA2",
             "HMNMX2", "HSETP2", "HSET2", "DADD", "DMUL", "DFMA", "DSETP", "FMNMX3", "FADD2", "FMUL2", "FFMA2"},
    "memory": {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDL", "STL", "LDC", "ULDC", "LDGSTS", "ATOM",
               "ATOMS", "ATOMG", "RED", "REDG", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKPF", "UTMACCTL",
               "UTMACMDFLUSH", "CCTL", "CCTLL", "LDTRAM", "SUST", "SULD", "TEX", "TLD", "UBLKRED", "UTMAREDG"},
    "warp": {"SHFL", "VOTE", "VOTEU", "MATCH", "REDUX", "CREDUX"},
    "sync": {"BAR", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "SYNCS",
             "ERRBAR", "ARRIVES", "CGAERRBAR", "ELECT", "ACQBULK", "UCGABAR_ARV", "UCGABAR_WAIT", "NANOSLEEP"},
    "control": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "NOP", "YIELD", "BPT", "KILL", "PMTRIG", "BREAK"},
}
_SASS_CLASS_OF = {op: cls for cls, ops in _SASS_CLASSES.items() for op in ops}


def sass_class(ins: Instr) -> str:
    """An instruction's class; every other opcode (IMAD, ISETP, LOP3, P2R, R2UR, MOV, S2R, the uniform
    datapath's U*) is integer, predicate or move work."""
    return _SASS_CLASS_OF.get(ins.base, "int_pred")


_AMD_MUFU = re.compile(r"^v_(exp|log|rcp|rsq|sqrt|sin|cos)_(f32|f16|legacy_f32)")


def amd_class(ins: Instr) -> str:
    op = ins.op
    if op.startswith(("v_mfma", "v_smfmac")):
        return "mma"
    if _AMD_MUFU.match(op):
        return "mufu"
    if op.startswith(("global_", "buffer_", "flat_", "scratch_", "s_load", "s_buffer_load", "s_store")) or \
            (op.startswith("ds_") and not op.startswith(("ds_swizzle", "ds_bpermute", "ds_permute"))):
        return "memory"
    if op.startswith(("ds_swizzle", "ds_bpermute", "ds_permute", "v_permlane", "v_readlane", "v_writelane",
                      "v_readfirstlane")) or "_dpp" in op or "row_shr" in ins.text or "row_bcast" in ins.text:
        return "warp"
    if op.startswith(("s_waitcnt", "s_barrier", "s_sleep", "buffer_wbinvl1", "buffer_inv")):
        return "sync"
    if op.startswith(("s_branch", "s_cbranch", "s_endpgm", "s_nop", "s_setprio", "s_setpc", "s_getpc",
                      "s_sendmsg", "s_trap")):
        return "control"
    if op.startswith("v_") and re.search(r"_(f32|f16|bf16|f64)\b|_(f32|f16|bf16)_|^v_cvt_|^v_pk_(fma|mul|add)_f32",
                                          op):
        return "fp32"
    return "int_pred"


@dataclass(frozen=True)
class Isa:
    name: str
    lanes: int                  # threads per warp (wave)
    mma: re.Pattern
    ex2: re.Pattern
    classify: object


SASS = Isa("sass", 32, re.compile(r"^(HGMMA|HMMA)\."), re.compile(r"^MUFU\.EX2"), sass_class)
AMDGCN = Isa("amdgcn", 64, re.compile(r"^v_mfma"), re.compile(r"^v_exp_f32"), amd_class)


def mma_shape(op: str) -> tuple:
    """(m, n, k) of a matrix instruction: HGMMA.64x16x16.F32.BF16, HMMA.16816.F32.BF16 (m16 n8 k16),
    HMMA.1688.F32.TF32, v_mfma_f32_32x32x8_bf16."""
    m = re.match(r"^[A-Z]*GMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return tuple(int(x) for x in m.groups())
    m = re.match(r"^HMMA\.(16)(8)(16|8)\b", op)
    if m:
        return tuple(int(x) for x in m.groups())
    m = re.search(r"(\d+)x(\d+)x(\d+)", op)
    if m:
        return tuple(int(x) for x in m.groups())
    raise ValueError(f"no matrix shape in {op}")


def mma_macs(op: str, warps: int) -> int:
    """Multiply-adds one instruction of a CTA's code does, all its warps together: a warpgroup MMA (HGMMA) is
    one per warpgroup (4 warps), a warp MMA (HMMA, MFMA) one per warp."""
    m, n, k = mma_shape(op)
    return m * n * k * (warps // 4 if "GMMA" in op else warps)


_REGISTER = re.compile(r"^(R\d+|RZ|[va]\[\d+:\d+\]|[va]\d+|0)$")


def accumulator_io(ins: Instr) -> tuple:
    """(destination, accumulator input) of a matrix instruction: its first operand, and its last register
    operand (HGMMA R24, gdesc[UR8], R24; HMMA R4, R8, R2, R4; v_mfma v[0:15], v[32:33], v[34:35], v[0:15]), None
    for an accumulator that starts from zero (RZ, 0, or HGMMA's !UPT)."""
    body = re.sub(r"^@\S+\s+", "", ins.text)
    operands = [x.strip().split()[0] for x in body[len(ins.op):].split(",") if x.strip()]
    registers = [x for x in operands[1:] if _REGISTER.match(x)]
    source = registers[-1] if registers else None
    if source in ("RZ", "0") or "!UPT" in operands:
        source = None
    return operands[0], source


def mma_chains(seq: list, isa) -> list:
    """(instruction, K it sums) of each accumulation chain in a sequence of instructions, following the data:
    a matrix instruction continues the chain whose accumulator it reads (also when it writes another register),
    and one that starts from zero starts a chain."""
    chains, of = [], {}
    for ins in seq:
        if not isa.mma.match(ins.op):
            continue
        dest, source = accumulator_io(ins)
        chain = of.get(source) if source is not None else None
        if chain is None:
            chain = [ins.op, 0]
            chains.append(chain)
        chain[1] += mma_shape(ins.op)[2]
        of[dest] = chain
    return [tuple(c) for c in chains]


# ---- the tile loop and its shortest path ---------------------------------------------------------------

class TileLoop:
    """One kernel's tile loop: which loop, its per-trip counts on the shortest path, every instruction."""

    def __init__(self, instrs: list, blocks: list, loop: Loop, isa: Isa, k_steps: int):
        self.instrs, self.blocks, self.loop, self.isa, self.k_steps = instrs, blocks, loop, isa, k_steps
        self.notes, self.trips, self._paths = [], {}, {}
        self.path = self._path(loop)
        self.path_ops = Counter(self.path)
        self.all_ops = self._everything(loop)

    def _block_ops(self, b: int) -> list:
        return list(range(self.blocks[b].first, self.blocks[b].last + 1))

    def _mma_in(self, blocks) -> list:
        return [self.instrs[k] for b in blocks for k in range(self.blocks[b].first, self.blocks[b].last + 1)
                if self.isa.mma.match(self.instrs[k].op)]

    def _trips(self, child: Loop, parent: Loop) -> int:
        """Trips of an inner loop per trip of its parent. A K loop runs the k_steps K-chunks less those that the
        compiler peeled out of it into the parent (software pipelining): matrix instructions of the parent's
        own blocks that add into the accumulators of the loop's (or start them), counted in whole trips of the
        loop."""
        if child.header in self.trips:
            return self.trips[child.header]
        inner = [i for i in map(self.instrs.__getitem__, self._path(child)) if self.isa.mma.match(i.op)]
        if not inner:
            trips = 1
            self.notes.append(f"an inner loop without a matrix instruction (header at "
                              f"{self.instrs[self.blocks[child.header].first].offset:#x}) is counted once per tile")
        else:
            accumulators = {accumulator_io(i)[0] for i in inner}
            own = parent.blocks - set().union(*[c.blocks for c in parent.children])
            peeled = sum(1 for i in self._mma_in(own) if accumulator_io(i)[0] in accumulators
                         and accumulator_io(i)[1] in accumulators | {None}) / len(inner)
            trips = self.k_steps - round(peeled)
            if peeled != round(peeled) or trips < 0:
                self.notes.append(f"{peeled:g} K loop trips peeled: counted {self.k_steps} trips")
                trips = self.k_steps
            elif peeled:
                self.notes.append(f"{round(peeled)} of {self.k_steps} K-steps peeled out of the K loop")
        self.trips[child.header] = trips
        return trips

    def _everything(self, loop: Loop) -> Counter:
        """Every instruction of the loop once (an inner loop's once per trip): instruction index -> times."""
        inner = set().union(*[c.blocks for c in loop.children]) if loop.children else set()
        out = Counter()
        for b in loop.blocks - inner:
            out.update(self._block_ops(b))
        for c in loop.children:
            trips = self._trips(c, loop)
            out.update({k: v * trips for k, v in self._everything(c).items()})
        return out

    def _path(self, loop: Loop) -> list:
        """The instructions (indices, in order) of one trip through `loop` on its shortest path (fewest
        instructions) from the header back to it that passes every block holding a matrix instruction; inner
        loops are one node each, weighted by their trips times their own shortest trip."""
        if loop.header in self._paths:
            return self._paths[loop.header]
        node_of = {}
        for c in loop.children:
            for b in c.blocks:
                node_of[b] = ("loop", c.header)
        for b in loop.blocks:
            node_of.setdefault(b, ("block", b))
        child = {c.header: c for c in loop.children}
        weight, ops, required = {}, {}, []
        for node in dict.fromkeys(node_of.values()):
            kind, ref = node
            if kind == "block":
                ops[node] = self._block_ops(ref)
                blocks_in = [ref]
            else:
                ops[node] = self._path(child[ref]) * self._trips(child[ref], loop)
                blocks_in = list(child[ref].blocks)
            weight[node] = len(ops[node])
            if self._mma_in(blocks_in):
                required.append(node)
        sink = ("sink", None)
        edges = {n: set() for n in weight}
        for b in loop.blocks:
            for s in self.blocks[b].succs:
                if s == loop.header:
                    edges[node_of[b]].add(sink)
                elif s in loop.blocks and node_of[s] != node_of[b]:
                    edges[node_of[b]].add(node_of[s])
        order = _topological(edges, sink)
        source = node_of[loop.header]
        rank = {n: i for i, n in enumerate(order)}
        stops = [source] + sorted((n for n in required if n != source), key=rank.get) + [sink]
        path, dropped = [source], []
        for target in stops[1:]:
            seg = _shortest(edges, weight, path[-1], target, order)
            if seg is None:
                dropped.append(target)
                continue
            path += seg[1:]
        if dropped:
            self.notes.append(f"{len(dropped)} matrix-instruction block(s) not on one path with the others")
        self._paths[loop.header] = [k for n in path if n != sink for k in ops[n]]
        return self._paths[loop.header]


def _topological(edges: dict, sink) -> list:
    indeg = Counter()
    for u, vs in edges.items():
        for v in vs:
            indeg[v] += 1
    ready = [u for u in edges if indeg[u] == 0]
    order = []
    while ready:
        u = ready.pop()
        order.append(u)
        for v in edges.get(u, ()):
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    if len(order) != len(edges) + 1:
        raise ValueError("the loop body is not acyclic once its inner loops are collapsed (irreducible flow)")
    return order


def _shortest(edges: dict, weight: dict, src, dst, order: list):
    """Fewest-instruction path src -> dst (both included) in the acyclic graph, or None."""
    dist, prev = {src: weight[src]}, {}
    for u in order[order.index(src):]:
        if u not in dist:
            continue
        for v in edges.get(u, ()):
            d = dist[u] + weight.get(v, 0)
            if v not in dist or d < dist[v]:
                dist[v], prev[v] = d, u
    if dst not in dist:
        return None
    path = [dst]
    while path[-1] != src:
        path.append(prev[path[-1]])
    return path[::-1]


def find_tile_loop(instrs: list, blocks: list, isa: Isa, k_steps: int):
    """The smallest loop holding a matrix instruction and an exp2, else the outermost holding a matrix
    instruction (a K loop inside it holds the matrix instructions too); None without one."""
    loops = natural_loops(blocks)

    def holds(loop, pattern):
        return any(pattern.match(instrs[k].op) for b in loop.blocks
                   for k in range(blocks[b].first, blocks[b].last + 1))

    size = lambda lp: sum(blocks[b].last - blocks[b].first + 1 for b in lp.blocks)  # noqa: E731
    both = [lp for lp in loops if holds(lp, isa.mma) and holds(lp, isa.ex2)]
    mma_only = [lp for lp in loops if holds(lp, isa.mma)]
    pick = min(both, key=size) if both else max(mma_only, key=size) if mma_only else None
    if pick is None:
        return None
    tile = TileLoop(instrs, blocks, pick, isa, k_steps)
    tile.holds_ex2 = bool(both)
    return tile


# ---- one kernel's counts -------------------------------------------------------------------------------

def launch_d(kw: dict):
    """D of a launch: the kernels take it in vectors of ALIGN elements (load_align in
    ms_fused/engine/triton/backend.py)."""
    if "D" in kw:
        return kw["D"]
    return kw["D_vecs"] * kw["ALIGN"] if "D_vecs" in kw else None


def useful_macs_per_tile(kernel: str, kw: dict):
    """The multiply-adds of one tile as the kernel's tl.dots state them (what the interpreter counts): the S
    dot(s), and the backward's W @ b over its output slice. None for a kernel this does not know."""
    n, m, d = kw.get("BLOCK_N"), kw.get("BLOCK_M"), launch_d(kw)
    if None in (n, m, d):
        return None
    if kernel == "sweep_kernel":
        return kw.get("ROW_GROUPS", 1) * n * m * d
    if kernel in ("band_min_kernel", "finish_kernel"):
        return n * m * d
    if kernel == "backward_kernel":
        return n * m * d + n * m * min(kw.get("BLOCK_DOUT", d), d)
    return None


def _waits(instrs: list, blocks: list, loop: Loop) -> tuple:
    """wgmma waits (WARPGROUP.DEPBAR.LE gsb0, N) of the loop: (at its own level, inside its inner loops), as
    lists of N."""
    inner = set().union(*[c.blocks for c in loop.children]) if loop.children else set()
    own, nested = [], []
    for b in loop.blocks:
        for k in range(blocks[b].first, blocks[b].last + 1):
            if instrs[k].op.startswith("WARPGROUP.DEPBAR"):
                m = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*$", instrs[k].text)
                (nested if b in inner else own).append(int(m.group(1), 0) if m else 0)
    return own, nested


def ttgir_dots(ttgir: str) -> list:
    """Every dot of the TTGIR in text order: operand shapes and the MMA layout of its result."""
    layouts = {}
    for m in re.finditer(r"^(#\w+) = #ttg\.(nvidia_mma|amd_mfma|amd_wmma)<\{(.*)\}>", ttgir, re.M):
        attrs = dict(re.findall(r"(\w+) = (\[[^\]]*\]|[\w.]+)", m.group(3)))
        layouts[m.group(1)] = (m.group(2), attrs)
    out = []
    for line in ttgir.splitlines():
        if not re.search(r"= (ttng\.warp_group_dot|tt\.dot|ttg\.dot)\b", line):
            continue
        sig = line.split(" : ", 1)[1] if " : " in line else ""
        shapes = re.findall(r"(?:memdesc|tensor)<(\d+)x(\d+)x\w+", sig)
        enc = re.search(r"->\s*tensor<\d+x\d+xf32,\s*(#\w+)", sig)
        if len(shapes) < 3 or not enc or enc.group(1) not in layouts:
            continue
        (am, ak), _, (om, on) = [tuple(int(x) for x in s) for s in shapes[:3]]
        kind, attrs = layouts[enc.group(1)]
        out.append(dict(m=om, n=on, k=ak, layout=kind, warps_per_cta=attrs.get("warpsPerCTA", ""),
                        instr_shape=attrs.get("instrShape", ""), version=attrs.get("versionMajor", attrs.get("version", ""))))
    return out


def s_dot_layout(ttgir: str, k_step: int) -> str:
    """The S dot's MMA layout from the TTGIR: the dot whose K is the kernel's K step (the W @ b product of
    the backward has K = BLOCK_M), else the first dot."""
    dots = ttgir_dots(ttgir)
    if not dots:
        return ""
    pick = next((x for x in dots if x["k"] == k_step), dots[0])
    return (f"{pick['layout']} v{pick['version']} warpsPerCTA={pick['warps_per_cta'].replace(' ', '')} "
            f"instrShape={pick['instr_shape'].replace(' ', '')} ({pick['m']}x{pick['n']}x{pick['k']})")


def kernel_counts(instrs: list, labels: dict, isa: Isa, *, kernel: str, arch: str, warps: int, kw: dict,
                  ttgir: str = "") -> dict:
    """Per-tile counts of one compiled kernel (module docstring, 2 to 4). Without a tile loop: tile_loop None."""
    d = launch_d(kw)
    k_step = kw.get("BLOCK_D", d)
    blocks = build_cfg(instrs, labels)
    tile = find_tile_loop(instrs, blocks, isa, math.ceil(d / k_step))
    row = dict(kernel=kernel, arch=arch, d=d, warps=warps, config=kernel_stats._launch_config(kw), launch=kw,
               instructions_in_kernel=len(instrs), tile_loop=None)
    if tile is None:
        return row
    path = tile.path_ops
    classes = Counter()
    for k, times in path.items():
        classes[isa.classify(instrs[k])] += times
    ops = Counter()
    for k, times in path.items():
        ops[instrs[k].base] += times
    mma = Counter(instrs[k].op for k in tile.path if isa.mma.match(instrs[k].op))
    s_ops = sorted({op for op, k_sum in mma_chains([instrs[k] for k in tile.path], isa) if k_sum == d})
    mma_macs_tile = sum(mma_macs(op, warps) * t for op, t in mma.items())
    total = sum(path.values())
    mufu = classes["mufu"]
    ex2 = sum(t for k, t in path.items() if isa.ex2.match(instrs[k].op))
    first, last = blocks[tile.loop.header].first, max(blocks[b].last for b in tile.loop.blocks)
    row.update(tile_loop=dict(first=instrs[first].offset, last=instrs[last].offset, blocks=len(tile.loop.blocks),
                              inner_loops=len(tile.loop.children), inner_trips=sorted(tile.trips.values()),
                              holds_exp2=tile.holds_ex2),
               per_tile=total, loop_instructions=sum(tile.all_ops.values()),
               classes={c: classes.get(c, 0) for c in CLASSES}, top_ops=ops.most_common(12),
               mma_ops=dict(mma), mma_macs=mma_macs_tile, mufu=mufu, ex2=ex2, s_dot_sass=s_ops,
               s_dot_layout=s_dot_layout(ttgir, k_step) if ttgir else "", notes=sorted(set(tile.notes)))
    useful = useful_macs_per_tile(kernel, kw)
    row["useful_macs"] = useful
    row["mma_per_useful"] = mma_macs_tile / useful if useful else None
    if isa is SASS:
        rate = TENSOR_MACS_PER_CYCLE.get(arch)
        row["issue_cycles"] = total * warps / SCHEDULERS
        row["mufu_cycles"] = mufu * isa.lanes * warps / MUFU_LANES_PER_CYCLE
        row["tensor_cycles"] = mma_macs_tile / rate if rate and mma_macs_tile else None
        t = row["tensor_cycles"]
        row["issue_per_tensor"] = row["issue_cycles"] / t if t else None
        row["mufu_per_tensor"] = row["mufu_cycles"] / t if t else None
        if arch == "sm_90":
            own, nested = _waits(instrs, blocks, tile.loop)
            row["waits"], row["inner_waits"] = own, nested
            row["overlap"] = any(n > 0 for n in own) if own else None
            row["overlap_why"] = ("a wgmma wait at the tile level leaves a group outstanding" if row["overlap"] else
                                  "every wgmma wait of the tile loop waits for 0 groups: the epilogue starts after "
                                  "the MMA" if own else "no wgmma wait in the tile loop")
        else:
            row["overlap"], row["overlap_why"] = False, "mma.sync: a warp's epilogue reads the accumulators it just wrote"
    else:
        row["overlap"], row["overlap_why"] = False, "MFMA: a wave's epilogue reads the accumulators it just wrote"
    return row


# ---- compiling (a child process per Triton and target) ------------------------------------------------

def nvdisasm_path() -> str:
    import shutil

    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return bundled if os.path.exists(bundled) else (shutil.which("nvdisasm") or "")


def disassemble(cubin: bytes) -> str:
    tool = nvdisasm_path()
    if not tool:
        raise RuntimeError("no nvdisasm: neither in Triton's wheel nor on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, "-c", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr[-2000:]}")
    return done.stdout


def compile_counts(arch_name: str, dims=DIMS, kernels=None, n: int = COUNT_N) -> list:
    """Self mode, bfloat16, N = n: every kernel of one forward and backward compiled for the target at each D,
    and the per-tile counts of those with a tile loop (`kernels`: only these names)."""
    arch = kernel_stats.ARCHS[arch_name]
    rows = []
    with kernel_stats.stub_compiler(arch_name) as (compiled, tool):
        import torch
        import triton

        import ms_fused
        for d in dims:
            compiled.clear()
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(n, d, generator=gen).to(torch.bfloat16).requires_grad_()
            y = torch.randint(0, n // 8, (n,), generator=gen)
            ms_fused.multi_similarity_loss(q, y, backend="triton").backward()
            seen = set()
            for name, kernel, _, kw in compiled:
                if name in seen or (kernels and name not in kernels) or not kernel_stats._uses_dot(kernel):
                    continue
                seen.add(name)
                started = time.time()
                if arch.vendor == "hip":
                    instrs, labels = parse_amdgcn(kernel.asm["amdgcn"], name)
                    isa, stats = AMDGCN, kernel_stats._amd_stats(kernel, arch)
                    how = "Triton's amdgcn assembly"
                else:
                    instrs, labels = parse_sass(disassemble(kernel.asm["cubin"]))
                    isa, stats = SASS, kernel_stats._nvidia_stats(kernel, arch)
                    how = f"nvdisasm of the cubin ({tool})"
                warps = kernel.metadata.num_warps
                row = kernel_counts(instrs, labels, isa, kernel=name, arch=arch_name, warps=warps,
                                    kw={k: v for k, v in kw.items() if isinstance(v, (int, bool))},
                                    ttgir=kernel.asm.get("ttgir", ""))
                row.update(triton=triton.__version__, read_from=how, registers=stats["registers"],
                           spills=stats["spills"], shared_bytes=kernel.metadata.shared,
                           ctas_per_sm=kernel_stats.occupancy(arch, stats["registers"], warps, kernel.metadata.shared),
                           seconds=round(time.time() - started, 2))
                rows.append(row)
    return rows


def roofline_case(d: int) -> tuple:
    """The interpreter count's case for width d (kernel_stats' case tuple), its point registered in
    kernel_stats.TARGETS."""
    name = f"self mode, D = {d}"
    kernel_stats.TARGETS.setdefault(name, (f"N = {POINT_N}, D = {d}, bf16", POINT_N, POINT_N, d, "bfloat16"))
    return (name, "self", ROOFLINE_COUNT_N, ROOFLINE_COUNT_N, d, "bfloat16", 8, None)


def count_bytes(dims=DIMS) -> list:
    """Under the interpreter: each D's self-mode case at ROOFLINE_COUNT_N with the column splits of the
    point N = POINT_N (kernel_stats.count_work, plan "target"), per kernel."""
    out = []
    for d in dims:
        work = kernel_stats.count_work(roofline_case(d), "target")
        out.append(dict(d=d, work=work, kernels=kernel_stats.per_kernel(work)))
    return out


def _child(args: list, python: str, interpret: bool = False) -> object:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MS_FUSED_NO_CPP", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([python, os.path.abspath(__file__), *args], env=env, capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"sass_stats {' '.join(args)} ({python}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overlap_probe(python: str) -> dict:
    """benchmarks/overlap_probe.py under `python`: {"triton": version, "waits": {loop form: wgmma waits}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MS_FUSED_NO_CPP", "1")
    done = subprocess.run([python, os.path.join(BENCH_DIR, "overlap_probe.py")], env=env, capture_output=True,
                          text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"overlap_probe.py ({python}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the roofline with every ceiling -------------------------------------------------------------------

def roofline(counted: dict, tiles: list, peak_tflops: float, l2_tbps: float, hbm_tbps: float,
             clock_ghz: float, n_sms: int) -> dict:
    """Per kernel of one counted case (count_bytes' entry) at N = POINT_N: the bytes ceiling from the
    interpreter's counts (kernel_stats.roofline), and from the sm_90 tile counts `tiles` of the same Triton and D:
    tensor, issue and MUFU seconds over all of its tiles spread over n_sms SMs. Time: max(bytes, tensor +
    max(issue, MUFU)) where the tile waits for its MMA, the largest of the four where they overlap; kernels
    without a tile loop take their bytes (or the interpreter count's tensor time)."""
    d = counted["d"]
    roofline_case(d)
    base = kernel_stats.roofline(counted["work"], counted["kernels"], peak_tflops, l2_tbps)
    n = base["n"]
    mm_compute = base["mm_seconds"]
    mm_write = n * n * 2 / (hbm_tbps * 1e12)
    mm = max(mm_compute, mm_write)
    per_cycle = 1.0 / (clock_ghz * 1e9 * n_sms)
    by_name = {t["kernel"]: t for t in tiles}
    out = []
    for k in base["kernels"]:
        t = by_name.get(k["kernel"])
        row = dict(phase=k["phase"], kernel=k["kernel"], passes=k["passes"], bytes_per_mac=k["bytes_per_mac"],
                   bytes_s=k["load_s"], counted_config=None)
        if t and t.get("tensor_cycles") and t.get("useful_macs") and k["macs"]:
            n_tiles = k["macs"] / t["useful_macs"]
            row.update(tiles=n_tiles, tensor_s=n_tiles * t["tensor_cycles"] * per_cycle,
                       issue_s=n_tiles * t["issue_cycles"] * per_cycle, mufu_s=n_tiles * t["mufu_cycles"] * per_cycle,
                       overlap=bool(t.get("overlap")))
            epilogue = max(row["issue_s"], row["mufu_s"])
            if row["overlap"]:
                row["seconds"] = max(row["bytes_s"], row["tensor_s"], epilogue)
            else:
                row["seconds"] = max(row["bytes_s"], row["tensor_s"] + epilogue)
            ceilings = dict(bytes=row["bytes_s"], tensor=row["tensor_s"], issue=row["issue_s"], MUFU=row["mufu_s"])
            if row["overlap"]:
                row["bound"] = max(ceilings, key=ceilings.get)
            elif row["bytes_s"] >= row["tensor_s"] + epilogue:
                row["bound"] = "bytes"
            else:
                row["bound"] = "tensor + " + ("issue" if row["issue_s"] >= row["mufu_s"] else "MUFU")
        else:  # no tile loop counted: the interpreter count's ceilings
            row.update(tensor_s=k["mac_s"] if k["macs"] else 0.0, issue_s=None, mufu_s=None, overlap=None)
            row["seconds"] = max(row["bytes_s"], row["tensor_s"])
            row["bound"] = "bytes" if row["bytes_s"] >= row["tensor_s"] else "tensor (mm rate)"
        row["per_mm"] = row["seconds"] / mm
        out.append(row)
    fwd = sum(x["seconds"] for x in out if x["phase"] == "forward")
    step = sum(x["seconds"] for x in out)
    return dict(d=d, n=n, triton=counted["work"].get("triton"), mm_seconds=mm, mm_compute_seconds=mm_compute,
                mm_write_seconds=mm_write, mm_bound="writing its N x N output" if mm_write > mm_compute else "tensor",
                kernels=out, forward_seconds=fwd, step_seconds=step, forward_per_mm=fwd / mm, step_per_mm=step / mm,
                forward_goal=FORWARD_GOALS.get(d), step_goal=STEP_GOALS.get(d),
                configs=sorted({x["config"] for x in counted["work"]["launches"] if x["macs"]}))


# ---- report ----------------------------------------------------------------------------------------------

def _r(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _overlap_text(r: dict) -> str:
    if r.get("overlap") is None:
        return "unknown"
    waits = r.get("waits")
    if waits is not None:
        return ("yes" if r["overlap"] else "no") + f" (waits {', '.join(str(w) for w in waits) or 'none'})"
    return "no (" + ("mma.sync" if r["arch"].startswith("sm_") else "MFMA") + ")"


def s_dot_rows(rows: list) -> list:
    """Per (Triton, target, D): the forward's (sweep) and the backward's S-dot shape and layout."""
    groups = {}
    for r in rows:
        if r.get("tile_loop") and r["kernel"] in ("sweep_kernel", "backward_kernel"):
            groups.setdefault((r["triton"], r["arch"], r["d"]), {})[r["kernel"]] = r
    out = []
    for (tv, arch, d), g in groups.items():
        f, b = g.get("sweep_kernel"), g.get("backward_kernel")
        if not (f and b):
            continue
        fs, bs = " ".join(f["s_dot_sass"]), " ".join(b["s_dot_sass"])
        out.append(dict(triton=tv, arch=arch, d=d, forward_sass=fs, backward_sass=bs, forward_warps=f["warps"],
                        backward_warps=b["warps"], forward_layout=f["s_dot_layout"], backward_layout=b["s_dot_layout"],
                        same=fs == bs and f["s_dot_layout"] == b["s_dot_layout"]))
    return out


HOW = ("Each kernel's tile loop is the smallest loop of its compiled code (natural loops of the control-flow graph) "
       "holding both the matrix instruction and exp2 (HGMMA / HMMA and MUFU.EX2; v_mfma and v_exp_f32), else the "
       "outermost holding the matrix instruction (band_min_kernel has no exp2). *Per tile* counts one iteration on "
       "its shortest path that executes every matrix instruction of the loop (a sweep tile outside the label band, "
       "which skips the band's compares); an inner K loop counts once per trip (ceil(D / BLOCK_D), less the K-steps "
       "peeled out of it); *in loop* counts every instruction of the loop once (the K loop's once per trip). Issue cycles = instructions × warps / 4 "
       "schedulers; tensor cycles = the matrix instructions' multiply-adds (HGMMA: per warpgroup, HMMA: per warp) / "
       "the target's dense bf16 multiply-adds per cycle per SM; MUFU cycles = MUFU instructions × 32 lanes × warps / "
       "16 per cycle. MMA / dot = the matrix instructions' multiply-adds over those the tile's tl.dots state (above "
       "1: a product computed twice). Overlap (sm_90): whether a wgmma wait of the tile loop, outside its inner "
       "loops, leaves a group outstanding. docs/triton_tiles.md says what this cannot see.")


def markdown(rows: list, roofs: list, command: str, params: dict) -> str:
    import environment
    env = environment.describe(__import__("torch").device("cpu"))["environment"]
    lines = ["# Triton kernels: instructions per tile, read from the compiled code", "",
             f"_Generated by `{command}` on {env['date']}: commit `{env['commit']}`, torch {env['torch']}, Python "
             f"{env['python']}; Triton {', '.join(sorted({r['triton'] for r in rows}))}. Nothing here ran on a GPU._",
             "", f"Compiled as `kernel_stats.py --compile-only` compiles (stub driver, the backend's own launches): "
             f"self mode, bfloat16, N = {COUNT_N}, each D's first-choice configuration for the target under that "
             "Triton. " + HOW, "", f"Rates: {RATE_SOURCE}.", "",
             "## Per tile", "",
             "| kernel | target | Triton | D | configuration | warps | in loop | per tile | MMA | MUFU | FP32 | int / pred | "
             "memory | shuffle | sync | branch / other | issue / tensor | MUFU / tensor | MMA / dot | overlap | "
             "registers | CTAs per SM |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if not r.get("tile_loop"):
            continue
        c = r["classes"]
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['triton']} | {r['d']} | {r['config']} | {r['warps']} | "
                     f"{r['loop_instructions']} | {r['per_tile']} | {c['mma']} | {c['mufu']} | {c['fp32']} | "
                     f"{c['int_pred']} | {c['memory']} | {c['warp']} | {c['sync']} | {c['control']} | "
                     f"{_r(r.get('issue_per_tensor'))} | {_r(r.get('mufu_per_tensor'))} | {_r(r.get('mma_per_useful'))} | "
                     f"{_overlap_text(r)} | {r['registers']} | {r['ctas_per_sm']} |")
    lines += ["", "Classes (instructions per tile, per warp): MMA = HGMMA, HMMA, v_mfma; MUFU = MUFU.*, v_exp, v_log, "
              "v_rcp...; FP32 = floating-point arithmetic, compares, selects and conversions (FADD, FMUL, FFMA, FMNMX, "
              "FSEL, FSETP, F2FP...); int / pred = everything else that computes: IMAD (moves included), ISETP, LOP3, "
              "SEL, P2R, R2UR, the uniform datapath (U*), S2R; memory = global, shared and constant loads and stores "
              "(LDG, LDS, LDSM, STS, LDC, ULDC, LDGSTS...); shuffle = SHFL, VOTE (AMD: DPP, permutes); sync = BAR, "
              "WARPGROUP.*, DEPBAR, BSSY / BSYNC, fences (AMD: s_waitcnt, s_barrier); branch / other = BRA, EXIT, "
              "NOP (AMD: s_nop, branches). gfx942 has no cycle ratios: a wave64 VALU instruction's issue over "
              "16-lane SIMDs and the MFMA pass counts are not modelled.", "",
             "### Matrix instructions and the most frequent opcodes per tile", "",
             "| kernel | target | Triton | D | matrix instructions per tile (per warp) | MUFU (of which exp2) | "
             "most frequent opcodes |", "|---|---|---|---:|---|---|---|"]
    for r in rows:
        if not r.get("tile_loop"):
            continue
        mma = ", ".join(f"{n} × {op}" for op, n in sorted(r["mma_ops"].items()))
        top = ", ".join(f"{op} {n}" for op, n in r["top_ops"])
        notes = ("; " + "; ".join(r["notes"])) if r["notes"] else ""
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['triton']} | {r['d']} | {mma} | {r['mufu']} ({r['ex2']}) | "
                     f"{top}{notes} |")
    sd = s_dot_rows(rows)
    lines += ["", "## The S dot of the forward and the backward", "",
              "The matrix instructions whose accumulator sums a K of D per tile (the S dot), and the TTGIR layout of "
              "the dot whose K is the K step. The forward's mining and the backward's agree bit for bit by "
              "construction only where these match.", "",
              "| target | Triton | D | sweep (warps) | backward (warps) | sweep layout | backward layout | same |",
              "|---|---|---:|---|---|---|---|---|"]
    for s in sd:
        lines.append(f"| {s['arch']} | {s['triton']} | {s['d']} | {s['forward_sass']} ({s['forward_warps']}) | "
                     f"{s['backward_sass']} ({s['backward_warps']}) | {s['forward_layout']} | {s['backward_layout']} | "
                     f"{'yes' if s['same'] else 'no'} |")
    if params.get("overlap_probe"):
        lines += ["", "## Can the MMA overlap the epilogue? (`benchmarks/overlap_probe.py`)", "",
                  "A tile loop (S = A Bᵀ per 64-column tile, D = 128, then a sum of exp2 over S) compiled for sm_90 as "
                  "the kernels write it, and software-pipelined by hand (the next tile's dot issued before this tile's "
                  "epilogue). The N of every `WARPGROUP.DEPBAR.LE gsb0, N` in the compiled code (0: wait for every "
                  "group):", "", "| Triton | as written | next dot issued first |", "|---|---|---|"]
        for pr in params["overlap_probe"]:
            w = pr["waits"]
            lines.append(f"| {pr['triton']} | {', '.join(map(str, w['as_written']))} | "
                         f"{', '.join(map(str, w['prefetched']))} |")
        lines += ["", "Where every wait is 0, Triton makes a dot asynchronous only when its result feeds the next "
                  "dot as accumulator: a tile's epilogue cannot run beside the next tile's MMA within a warpgroup, and "
                  "the roofline below sums them (other CTAs on the SM can still fill the gap: docs/triton_tiles.md)."]
    if roofs:
        lines += ["", "## Roofline with every ceiling (sm_90: H100 / H200)", "",
                  f"Per kernel at N = {POINT_N}, self mode, bfloat16: bytes from the interpreter's count at N = "
                  f"{ROOFLINE_COUNT_N} with the point's column splits (kernel_stats.count_work, scaled as "
                  f"kernel_stats.md says) at {params['l2_tbps']:g} TB/s of L2; tensor, issue and MUFU from the sm_90 "
                  f"per-tile counts of the same Triton over all of the kernel's tiles (its multiply-adds / the tile's), "
                  f"on {params['n_sms']} SMs at {params['clock_ghz']:g} GHz. Time = max(bytes, tensor + max(issue, MUFU)) "
                  "where the tile waits for its MMA, the largest of the four where they overlap: loads are issued ahead "
                  "of their use by the pipeline, and MUFU instructions are among the issued ones while their pipe runs "
                  "beside the others. Kernels without a tile loop take the interpreter count's ceilings. One mm: "
                  f"X Xᵀ at {params['peak_tflops']:g} TFLOP/s (kernel_stats' measured rate), or writing its N × N "
                  f"bfloat16 output at {params['hbm_tbps']:g} TB/s ({HBM_SOURCE}), whichever is longer.", ""]
        for rf in roofs:
            lines += [f"### Triton {rf['triton']}, D = {rf['d']} (one mm: {rf['mm_seconds'] * 1e6:.1f} µs, bound by "
                      f"{rf['mm_bound']}; configurations {'; '.join(rf['configs'])})", "",
                      "| phase | kernel | passes | bytes / MAC | bytes µs | tensor µs | issue µs | MUFU µs | overlap | "
                      "predicted µs | bound by | / one mm |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
            us = lambda s: "—" if s is None else f"{s * 1e6:.1f}"  # noqa: E731
            for k in rf["kernels"]:
                ov = "—" if k["overlap"] is None else ("yes" if k["overlap"] else "no")
                lines.append(f"| {k['phase']} | {k['kernel']} | {k['passes']:.4f} | {_r(k['bytes_per_mac'], 4)} | "
                             f"{us(k['bytes_s'])} | {us(k['tensor_s'])} | {us(k['issue_s'])} | {us(k['mufu_s'])} | {ov} | "
                             f"{us(k['seconds'])} | {k['bound']} | {k['per_mm']:.3f} |")
            lines += [f"| forward | (all) | | | | | | | | {us(rf['forward_seconds'])} | | {rf['forward_per_mm']:.2f} |",
                      f"| forward + backward | (all) | | | | | | | | {us(rf['step_seconds'])} | | "
                      f"{rf['step_per_mm']:.2f} |", ""]
        lines += [f"- {x}" for x in roofline_goal_lines(roofs)]
    return "\n".join(lines).rstrip() + "\n"


def roofline_goal_lines(roofs: list) -> list:
    def against(value: float, goal) -> str:
        return "no goal set" if goal is None else f"{'meets' if value <= goal else 'misses'} ≤ {goal}"

    return [f"Triton {rf['triton']}, N = {rf['n']}, D = {rf['d']}: forward {rf['forward_per_mm']:.2f}× one mm "
            f"({against(rf['forward_per_mm'], rf['forward_goal'])}), step {rf['step_per_mm']:.2f}× "
            f"({against(rf['step_per_mm'], rf['step_goal'])})" for rf in roofs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "sass_stats.md"))
    p.add_argument("--json", help="the records as JSON here (default: --out with .json)")
    p.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="targets compiled with this Python's Triton")
    p.add_argument("--with", dest="extra", action="append", default=[], metavar="PYTHON:ARCHS",
                   help="also these targets with another Python's Triton (its roofline too where sm_90 is among them)")
    p.add_argument("--d", default=",".join(str(d) for d in DIMS), help="embedding widths")
    p.add_argument("--no-roofline", action="store_true", help="counts only (no interpreter run)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=kernel_stats.PEAK_TFLOPS)
    p.add_argument("--l2-tbps", type=float, default=kernel_stats.L2_TBPS)
    p.add_argument("--hbm-tbps", type=float, default=HBM_TBPS)
    p.add_argument("--clock-ghz", type=float, default=SM_CLOCK_GHZ)
    p.add_argument("--kernels", help="only these kernels' counts (comma-separated; every kernel still compiles)")
    p.add_argument("--child", choices=["compile", "bytes"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dims = tuple(int(x) for x in args.d.split(","))
    if args.child == "compile":
        json.dump(compile_counts(args.arch, dims, args.kernels.split(",") if args.kernels else None), sys.stdout)
        return
    if args.child == "bytes":
        json.dump(count_bytes(dims), sys.stdout)
        return
    started = time.time()
    jobs = [(sys.executable, a) for a in args.arch.split(",") if a]
    for spec in args.extra:
        python, _, archs = spec.rpartition(":")
        jobs += [(python, a) for a in archs.split(",") if a]
    pythons = list(dict.fromkeys(py for py, a in jobs if a == "sm_90"))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        counting = [] if args.no_roofline else [
            pool.submit(_child, ["--child", "bytes", "--d", args.d], py, True) for py in pythons]
        compiled = list(pool.map(lambda j: _child(["--child", "compile", "--arch", j[1], "--d", args.d], j[0]), jobs))
        counted = [c.result() for c in counting]
        probes = [overlap_probe(py) for py in pythons]
    archs = list(dict.fromkeys(a for _, a in jobs))
    kernels = list(dict.fromkeys(r["kernel"] for rs in compiled for r in rs))
    rows = sorted((r for rs in compiled for r in rs), key=lambda r: (archs.index(r["arch"]), r["triton"], -r["d"],
                                                                      kernels.index(r["kernel"])))
    roofs = []
    for per_python in counted:
        for c in per_python:
            tiles = [r for r in rows if r["arch"] == "sm_90" and r["d"] == c["d"] and r["triton"] == c["work"]["triton"]]
            roofs.append(roofline(c, tiles, args.peak_tflops, args.l2_tbps, args.hbm_tbps, args.clock_ghz, N_SMS))
    params = dict(peak_tflops=args.peak_tflops, l2_tbps=args.l2_tbps, hbm_tbps=args.hbm_tbps, clock_ghz=args.clock_ghz,
                  n_sms=N_SMS, rates=TENSOR_MACS_PER_CYCLE, rate_source=RATE_SOURCE, count_n=COUNT_N, overlap_probe=probes,
                  seconds=round(time.time() - started, 1))
    command = "python benchmarks/sass_stats.py" + "".join(
        f" --with {os.path.relpath(s.rpartition(':')[0], REPO)}:{s.rpartition(':')[2]}" for s in args.extra) + \
        (f" --arch {args.arch}" if args.arch != ",".join(DEFAULT_ARCHS) else "") + \
        (f" --d {args.d}" if dims != DIMS else "") + (" --no-roofline" if args.no_roofline else "")
    json_path = args.json or os.path.splitext(args.out)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(json_path, "w") as f:
        f.write(kernel_stats._json_lines(dict(params=params, tiles=rows, s_dot=s_dot_rows(rows), roofline=roofs)))
    with open(args.out, "w") as f:
        f.write(markdown(rows, roofs, command, params))
    print(open(args.out).read())
    print(f"({params['seconds']} s)")


if __name__ == "__main__":
    main()
