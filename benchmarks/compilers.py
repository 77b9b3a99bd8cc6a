"""The cpp backend's training step built by two compilers, timed side by side (issue 31: clang within 1.15x of GCC).

    python benchmarks/compilers.py                        # GCC and clang builds in build/compilers/, N=4096 D=128
    python benchmarks/compilers.py --n 2048 --rounds 5
    python benchmarks/compilers.py --tree before=/tmp/old   # and a tree built already, e.g. of another commit

Each compiler's build lives in its own copy of the tree (.ci/build_copy.sh), so this tree's build is left
alone. The step (forward + backward, float32, self mode, the benchmark batch of impls.make_batch) is timed in
child processes, one per build, thread count and round, the builds taking turns (in reverse order every
other round) so that a noisy neighbour hits both alike; each child reports the median of its steps, and the table shows the median over rounds and
the ratio to the first build.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {bench_dir!r})
import impls, measure
from ms_fused.engine.cpp import backend as cpp_backend
torch.set_num_threads({threads})
assert cpp_backend.cpu_capability() is not None, "no cpp extension"
fn = impls.ms_fused_loss("cpp")
x, y = impls.make_batch({n}, {d}, torch.float32, "cpu")
x.requires_grad_(True)
for _ in range({warmup}):
    measure.step(fn, x, y, None, "forward_backward", False)
times = [measure._timed_step(fn, x, y, None, "forward_backward", False, torch.device("cpu")) for _ in range({steps})]
print(json.dumps({{"ms": sorted(times)[len(times) // 2], "isa": cpp_backend.cpu_capability()}}))
"""


def build(name: str, cc: str, cxx: str, python: str) -> str:
    dest = os.path.join(ROOT, "build", "compilers", name)
    print(f"building with {cxx} into {os.path.relpath(dest, ROOT)} ...", flush=True)
    subprocess.run(["bash", os.path.join(ROOT, ".ci", "build_copy.sh"), cc, cxx, dest, python], check=True)
    return dest


def version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else cxx


def time_step(tree: str, threads: int, args) -> dict:
    code = CHILD.format(bench_dir=os.path.join(tree, "benchmarks"), threads=threads, n=args.n, d=args.d,
                        warmup=args.warmup, steps=args.steps)
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compilers", default="gcc:gcc:g++,clang:clang:clang++",
                   help="name:CC:CXX,... (the first is the one the others are compared with)")
    p.add_argument("--tree", action="append", default=[],
                   help="name=PATH: also time a tree built already (e.g. another commit's), after the compilers")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated torch thread counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per child (its median is the round's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the table here, under the command that made it (e.g. "
                                 "benchmarks/results/cpu/compilers.md)")
    args = p.parse_args(argv)

    compilers = [c.split(":") for c in args.compilers.split(",")]
    trees = {name: build(name, cc, cxx, sys.executable) for name, cc, cxx in compilers}
    trees.update(t.split("=", 1) for t in args.tree)
    threads = [int(t) for t in args.threads.split(",")]
    times = {(name, t): [] for name in trees for t in threads}
    isa = {}
    for r in range(args.rounds):
        for t in threads:
            for name, tree in (list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]):
                rec = time_step(tree, t, args)
                times[name, t].append(rec["ms"])
                isa[name] = rec["isa"]
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    first = compilers[0][0]
    lines = [f"cpp step (forward + backward), float32, self mode, N={args.n}, D={args.d}: median over {args.rounds} "
             f"rounds of each child's median of {args.steps} steps",
             "", "| build | variant | threads | step ms | ratio to " + first + " |", "|---|---|---|---|---|"]
    for t in threads:
        base = statistics.median(times[first, t])
        for name in trees:
            ms = statistics.median(times[name, t])
            lines.append(f"| {name} | {isa[name]} | {t} | {ms:.1f} | {ms / base:.3f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        command = "python benchmarks/compilers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        compilers_used = ", ".join(f"{name}: {version(cxx)}" for name, _, cxx in compilers)
        with open(args.out, "w") as f:
            f.write(f"_Generated by `{command}` on {platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores ({compilers_used}).\n\n" + "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
