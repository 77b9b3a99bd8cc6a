"""One CrossBatchMemory training step on the CPU: a batch against a full 10^5-row memory, forward + backward.

Every (backend, batch, memory) point runs in a fresh subprocess, so that its peak-memory figure is its own:
the peak resident set growth during the timed steps, over the resident set with the memory already filled.
The record sets that growth beside (N + M)·D·4 bytes (what an O((N + M)·D) method may use) and N·M·4 bytes
(one dense float32 similarity matrix); the second batch size (1024) shows the growth does not follow N·M.

    python benchmarks/bench_xbm.py                            # cpp and torch (those built), N=256 and 1024, M=1e5, D=128
    python benchmarks/bench_xbm.py --batch 256 --out /tmp/xbm  # writes /tmp/xbm.md and /tmp/xbm.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from environment import cpu_name
from rss import reset_peak, status_kb

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "xbm")
MIB = 2**20


def measure(backend: str, batch: int, memory_rows: int, dim: int, classes: int, repeats: int) -> dict:
    """Runs inside the fresh subprocess: fill the memory in place, then time forward + backward."""
    import torch

    from ms_fused import CrossBatchMemory

    torch.manual_seed(0)
    xbm = CrossBatchMemory(memory_rows, dim, backend=backend)
    with torch.no_grad():  # a full memory, written in place so that no temporary inflates the baseline
        xbm.memory.normal_()
        xbm.memory_labels.random_(0, classes)
        xbm.filled.fill_(memory_rows)
    x = torch.randn(batch, dim)
    y = torch.randint(0, classes, (batch,))
    # load the backend's code and lazily created thread pools on a tiny memory, outside the measurement
    tiny = CrossBatchMemory(64, dim, backend=backend)
    tiny(x[:8].clone().requires_grad_(True), y[:8]).backward()
    peak_reset, peak_growth, times = True, 0, []
    for _ in range(repeats + 1):  # the first step is a warm-up, not timed
        q = x.clone().requires_grad_(True)
        # each step's own growth above the resident set it starts from (what the allocator kept from the
        # previous step is not this step's working memory)
        peak_reset &= reset_peak()
        baseline = status_kb("VmRSS") * 1024
        start = time.perf_counter()
        xbm(q, y).backward()
        times.append(time.perf_counter() - start)
        peak_growth = max(peak_growth, status_kb("VmHWM") * 1024 - baseline)
    return dict(backend=backend, batch=batch, memory_rows=memory_rows, dim=dim, dtype="float32", classes=classes,
                repeats=repeats, median_s=statistics.median(times[1:]), min_s=min(times[1:]), max_s=max(times[1:]),
                peak_growth_bytes=peak_growth, peak_reset=peak_reset,
                memory_state_bytes=xbm.memory.numel() * 4 + xbm.memory_labels.numel() * 8,
                linear_bytes=(batch + memory_rows) * dim * 4, dense_bytes=batch * memory_rows * 4,
                torch=torch.__version__, threads=torch.get_num_threads())


def run_point(backend, batch, memory_rows, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--backends", backend, "--batch", str(batch),
           "--memory-rows", str(memory_rows), "--dim", str(args.dim), "--classes", str(args.classes),
           "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(points, command) -> str:
    head = ("| backend | N | M | D | fwd+bwd median | min / max | peak growth | (N+M)·D·4 B | growth ÷ (N+M)·D·4 "
            "| N·M·4 B | growth ÷ N·M·4 | memory state |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {p['backend']} | {p['batch']} | {p['memory_rows']} | {p['dim']} | {p['median_s'] * 1e3:.1f} ms "
        f"| {p['min_s'] * 1e3:.1f} / {p['max_s'] * 1e3:.1f} ms | {p['peak_growth_bytes'] / MIB:.1f} MiB "
        f"| {p['linear_bytes'] / MIB:.1f} MiB | {p['peak_growth_bytes'] / p['linear_bytes']:.2f} "
        f"| {p['dense_bytes'] / MIB:.1f} MiB | {p['peak_growth_bytes'] / p['dense_bytes']:.2f} "
        f"| {p['memory_state_bytes'] / MIB:.1f} MiB |\n" for p in points)
    first = points[0]
    return (f"# CrossBatchMemory step on the CPU\n\n"
            f"`{command}` — {datetime.date.today()}, {cpu_name()}, torch {first['torch']}, "
            f"{first['threads']} threads, float32, {first['classes']} classes, median of {first['repeats']} steps "
            f"after one warm-up.\n\n"
            f"A step is `xbm(batch, labels).backward()` with the memory already full. Peak growth is the largest "
            f"rise of the resident set within one step above where that step started (fresh process per row, "
            f"code loaded by a tiny step first; the memory state itself is in the baseline).\n\n" + head + rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=None, help="comma-separated; default: cpp and torch, those available")
    parser.add_argument("--batch", default="256,1024", help="comma-separated batch sizes N")
    parser.add_argument("--memory-rows", default="100000", help="comma-separated memory sizes M")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.md and OUT.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args.backends, int(args.batch), int(args.memory_rows), args.dim, args.classes,
                                 args.repeats)))
        return
    if args.backends is None:
        from ms_fused import available_backends
        names = [b for b in ("cpp", "torch") if b in available_backends("cpu")]
    else:
        names = args.backends.split(",")
    points = []
    for backend in names:
        for batch in map(int, args.batch.split(",")):
            for memory_rows in map(int, args.memory_rows.split(",")):
                points.append(run_point(backend, batch, memory_rows, args))
                print(json.dumps(points[-1]), flush=True)
    command = "python benchmarks/bench_xbm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(points, command.strip()))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(command=command.strip(), points=points), f, indent=1)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
