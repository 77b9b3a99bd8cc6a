"""The CPU goals of the `cpp` and `torch` backends, measured side by side in one run on this CPU.

    python benchmarks/bench_goals.py         # N = 2048 and 4096, D = 128, float32, forward + backward
    python benchmarks/bench_goals.py --big   # and: cpp at N = 65536, torch at N = 32768 complete, with peak memory
    python benchmarks/bench_goals.py --big --out benchmarks/results/cpu/goals.md   # also write the report there

Records, all on the same batches (P x K: 4 rows per class around random centres, float32):
- `cpp`, `torch`: ms_fused.multi_similarity_loss(x, y, backend=...), forward + backward into x;
- `pml`: pytorch-metric-learning's MultiSimilarityLoss fed by its MultiSimilarityMiner, same hyper-parameters,
  forward + backward;
- `mm`: one torch.mm(X, X.T), the yardstick (no backward).
Time: median of --repeats steps after --warmup steps, in this process, with torch's default thread count.
Peak memory: in a fresh subprocess per record, the resident-set growth of one step above its inputs
(VmHWM after resetting it through /proc/self/clear_refs), after a small warm-up step has loaded the code.
Goals: cpp >= 10x faster than pml, <= 6x one mm, peak >= 10x below pml's (N = 2048, 4096), N = 65536 completes;
torch >= 2x faster than pml, peak >= 10x below pml's (N = 4096), N = 32768 completes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from rss import reset_peak, status_kb

D = 128
SAMPLES_PER_CLASS = 4
SPREAD = 1.5  # noise std around unit-variance class centres: the miner keeps a minority of the pairs
HYPER = dict(alpha=2.0, beta=50.0, base=0.5)
EPSILON = 0.1
GIB = 2**30


def make_batch(n: int, d: int = D, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) // SAMPLES_PER_CLASS)[torch.randperm(n, generator=gen)]
    centres = torch.randn((n + SAMPLES_PER_CLASS - 1) // SAMPLES_PER_CLASS, d, generator=gen)
    return centres[labels] + SPREAD * torch.randn(n, d, generator=gen), labels


def build(record: str):
    """A step: (x, y) -> the work a training step does for this record."""
    if record in ("cpp", "torch"):
        import ms_fused

        def step(x, y):
            loss = ms_fused.multi_similarity_loss(x, y, epsilon=EPSILON, backend=record, **HYPER)
            loss.backward()
            return loss
    elif record == "pml":
        from pytorch_metric_learning import losses, miners

        loss_fn, miner = losses.MultiSimilarityLoss(**HYPER), miners.MultiSimilarityMiner(epsilon=EPSILON)

        def step(x, y):
            loss = loss_fn(x, y, miner(x, y))
            loss.backward()
            return loss
    elif record == "mm":
        def step(x, y):
            return torch.mm(x, x.T)
    else:
        raise ValueError(record)
    return step


def inputs(record: str, n: int):
    x, y = make_batch(n)
    return x.requires_grad_(record != "mm"), y


def time_record(record: str, n: int, warmup: int, repeats: int) -> float:
    """Median milliseconds of one step."""
    step = build(record)
    x, y = inputs(record, n)
    times = []
    for k in range(warmup + repeats):
        x.grad = None
        t0 = time.perf_counter()
        out = step(x, y)
        elapsed = time.perf_counter() - t0
        del out
        if k >= warmup:
            times.append(elapsed * 1e3)
    return statistics.median(times)


def peak_child(record: str, n: int) -> dict:
    """Runs in the fresh subprocess: one step's peak RSS growth above its inputs (and that step's time)."""
    step = build(record)
    step(*inputs(record, min(n, 256)))  # load lazily initialised code outside the measurement
    x, y = inputs(record, n)
    reset_peak()  # VmHWM := VmRSS
    base_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    step(x, y)
    seconds = time.perf_counter() - t0
    return {"peak_mb": (status_kb("VmHWM") - base_kb) / 1024, "seconds": seconds}


def peak_record(record: str, n: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", record, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


BIG_N = {"cpp": 65536, "torch": 32768}


def report(args):
    """The report's lines, yielded as they are measured."""
    yield (f"Produced by `python benchmarks/bench_goals.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads, D = {D}, float32, forward + backward (mm: forward only); "
           f"median of {args.repeats} after {args.warmup} warm-up steps; peak = resident-set growth of one step "
           f"in a fresh process.")
    yield ""
    yield ("| N | backend | ms | pml ms | mm ms | pml / backend | backend / mm | peak MB | pml peak MB "
           "| pml / backend peak |")
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for n in args.sizes:
        ms = {r: time_record(r, n, args.warmup, args.repeats) for r in ("pml", "mm", *args.backends)}
        peak = {r: peak_record(r, n)["peak_mb"] for r in ("pml", *args.backends)}
        for b in args.backends:
            yield (f"| {n} | {b} | {fmt(ms[b])} | {fmt(ms['pml'])} | {fmt(ms['mm'])} | {fmt(ms['pml'] / ms[b])} "
                   f"| {fmt(ms[b] / ms['mm'], 2)} | {fmt(peak[b])} | {fmt(peak['pml'])} "
                   f"| {fmt(peak['pml'] / max(peak[b], 1e-3))} |")
    if args.big:
        yield ""
        for b in args.backends:
            n = BIG_N[b]
            big = peak_record(b, n)
            yield (f"- N = {n}, D = {D}, `{b}` forward + backward: completed in {fmt(big['seconds'])} s, "
                   f"peak RSS growth {fmt(big['peak_mb'])} MB (machine memory "
                   f"{fmt(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB)} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["cpp", "torch"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--big", action="store_true", help="also check that cpp at N = 65536 and torch at 32768 complete")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--peak-child", nargs=2, metavar=("RECORD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        print(json.dumps(peak_child(args.peak_child[0], int(args.peak_child[1]))))
        return
    lines = []
    for line in report(args):
        print(line, flush=True)
        lines.append(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
