"""One CrossBatchMemory training step on the CPU: a batch against a full 10^5-row memory, forward + backward,
the step as it was before the lean bank step and as it is now, float32 and bfloat16 memories, in one run.

"before": the memory holds the raw rows and every step normalises all of them again (the loss gets the memory
with ref_normalized=False: one normalised M×D copy per step, and for a bfloat16 memory a float32 one first).
"after": `CrossBatchMemory` as it is, whose memory holds unit rows, used as stored (ref_normalized=True).

Every point runs in a fresh subprocess, so that its peak-memory figure is its own: the peak resident set
growth within a step, over the resident set at the step's start (memory already filled). The record sets
that growth beside M·D·4 bytes (one float32 copy of the memory) and N·M·4 bytes (one dense float32
similarity matrix); the second batch size (1024) shows the growth does not follow N·M.

    python benchmarks/bench_xbm.py                            # cpp and torch (those built), N=256 and 1024, M=1e5, D=128
    python benchmarks/bench_xbm.py --batch 256 --out /tmp/xbm  # writes /tmp/xbm.md and /tmp/xbm.json
    python benchmarks/bench_xbm.py --readme README.md          # also the summary into the README's block
    python benchmarks/bench_xbm.py --render --readme README.md # both again from the committed xbm.json
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
from report import replace_block
from rss import reset_peak, status_kb

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "xbm")
MIB = 2**20


DTYPES = ("float32", "bfloat16")
STEPS = ("before", "after")


def before_step(xbm, q, y):
    """The step before the lean bank step: raw rows written, the whole memory normalised again by the loss."""
    from ms_fused import multi_similarity_loss

    with __import__("torch").no_grad():
        slots = xbm.enqueue_raw(q, y)
    filled = int(xbm.filled)
    return multi_similarity_loss(q.to(xbm.memory.dtype), y, xbm.memory[:filled], xbm.memory_labels[:filled],
                                 ref_self_index=slots, backend=xbm.loss.kwargs["backend"])


def measure(backend: str, batch: int, memory_rows: int, dim: int, classes: int, repeats: int, dtype: str,
            step: str) -> dict:
    """Runs inside the fresh subprocess: fill the memory in place, then time forward + backward."""
    import torch
    import torch.nn.functional as F

    from ms_fused import CrossBatchMemory

    class RawMemory(CrossBatchMemory):
        def enqueue_raw(self, x, y):  # the old write: rows as given, not normalised
            kw = self.loss.kwargs
            kw["normalize"], normalize = False, kw["normalize"]
            try:
                return self.enqueue(x, y)
            finally:
                kw["normalize"] = normalize

    torch.manual_seed(0)
    mem_dtype = getattr(torch, dtype)
    xbm = RawMemory(memory_rows, dim, backend=backend, dtype=mem_dtype)
    with torch.no_grad():  # a full memory, written in place so that no temporary inflates the baseline
        xbm.memory.normal_()
        if step == "after":  # what the memory holds now: unit rows (normalised a block at a time)
            for block in xbm.memory.split(4096):
                block.copy_(F.normalize(block.float(), dim=1))
        xbm.memory_labels.random_(0, classes)
        xbm.filled.fill_(memory_rows)
    x = torch.randn(batch, dim)
    y = torch.randint(0, classes, (batch,))
    run_step = xbm if step == "after" else (lambda q, labels: before_step(xbm, q, labels))
    # load the backend's code and lazily created thread pools on a tiny memory, outside the measurement
    tiny = RawMemory(64, dim, backend=backend, dtype=mem_dtype)
    tiny(x[:8].clone().requires_grad_(True), y[:8]).backward()
    before_step(tiny, x[:8].clone().requires_grad_(True), y[:8]).backward()
    peak_reset, peak_growth, times = True, 0, []
    for _ in range(repeats + 1):  # the first step is a warm-up, not timed
        q = x.clone().requires_grad_(True)
        # each step's own growth above the resident set it starts from (what the allocator kept from the
        # previous step is not this step's working memory)
        peak_reset &= reset_peak()
        baseline = status_kb("VmRSS") * 1024
        start = time.perf_counter()
        run_step(q, y).backward()
        times.append(time.perf_counter() - start)
        peak_growth = max(peak_growth, status_kb("VmHWM") * 1024 - baseline)
    return dict(backend=backend, step=step, batch=batch, memory_rows=memory_rows, dim=dim, dtype=dtype,
                classes=classes, repeats=repeats, median_s=statistics.median(times[1:]), min_s=min(times[1:]),
                max_s=max(times[1:]), peak_growth_bytes=peak_growth, peak_reset=peak_reset,
                memory_bytes=xbm.memory.numel() * xbm.memory.element_size(),
                memory_state_bytes=xbm.memory.numel() * xbm.memory.element_size() + xbm.memory_labels.numel() * 8,
                copy_bytes=memory_rows * dim * 4, dense_bytes=batch * memory_rows * 4,
                load_average=os.getloadavg()[0], torch=torch.__version__, threads=torch.get_num_threads())


def run_point(backend, batch, memory_rows, dtype, step, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--backends", backend, "--batch", str(batch),
           "--memory-rows", str(memory_rows), "--dim", str(args.dim), "--classes", str(args.classes),
           "--repeats", str(args.repeats), "--dtypes", dtype, "--steps", step]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(points, command) -> str:
    head = ("| backend | step | memory dtype | N | M | D | fwd+bwd median | min / max | peak growth | M·D·4 B "
            "| growth ÷ M·D·4 | N·M·4 B | growth ÷ N·M·4 | memory rows |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {p['backend']} | {p['step']} | {p['dtype']} | {p['batch']} | {p['memory_rows']} | {p['dim']} "
        f"| {p['median_s'] * 1e3:.1f} ms | {p['min_s'] * 1e3:.1f} / {p['max_s'] * 1e3:.1f} ms "
        f"| {p['peak_growth_bytes'] / MIB:.1f} MiB | {p['copy_bytes'] / MIB:.1f} MiB "
        f"| {p['peak_growth_bytes'] / p['copy_bytes']:.2f} | {p['dense_bytes'] / MIB:.1f} MiB "
        f"| {p['peak_growth_bytes'] / p['dense_bytes']:.2f} | {p['memory_bytes'] / MIB:.1f} MiB |\n" for p in points)
    first = points[0]
    return (f"# CrossBatchMemory step on the CPU: before and after the lean bank step\n\n"
            f"`{command}` — {datetime.date.today()}, {cpu_name()}, torch {first['torch']}, "
            f"{first['threads']} threads, float32 batch, {first['classes']} classes, median of {first['repeats']} "
            f"steps after one warm-up.\n\n"
            f"A step is `xbm(batch, labels).backward()` with the memory already full. \"before\" is the step as it "
            f"was (raw rows in the memory, all of them normalised again by every step: an M×D float32 copy, and "
            f"for a bfloat16 memory a float32 conversion first); \"after\" is `CrossBatchMemory` now (unit rows "
            f"stored, used as they are; a bfloat16 memory is converted a block of rows at a time). Peak growth is "
            f"the largest rise of the resident set within one step above where that step started (fresh process "
            f"per row, code loaded by a tiny step first; the memory itself is in the baseline). What remains after "
            f"is the batch-sized work and each backend's block of similarities (cpp: row blocks of at most 32 MiB "
            f"per thread; torch: anchor chunks of MS_FUSED_TORCH_CHUNK_MB = 32 MiB of temporaries; with a bfloat16 "
            f"memory both convert it block by block once per block of anchors, which trades time for the copy).\n\n"
            f"Times depend on what else the machine runs: {load_text(points)}. The peak growth does not.\n\n"
            + head + rows)


def load_text(points) -> str:
    loads = [p["load_average"] for p in points if "load_average" in p]
    if not loads:
        return ("this run recorded no load average (the machine was shared with other work throughout it, so "
                "its times are not comparable between rows)")
    return f"1-minute load average {min(loads):.1f} to {max(loads):.1f} at the points' ends, on {points[0]['threads']} threads"


def summary(points, command) -> list:
    """Per (backend, N, memory dtype): step time and peak growth before → after, and the memory's size."""
    by_key = {(p["backend"], p["batch"], p["dtype"], p["step"]): p for p in points}
    lines = [f"_Generated by `{command}`; full table in `benchmarks/results/cpu/xbm.md` "
             f"(M = {points[0]['memory_rows']}, D = {points[0]['dim']}, {points[0]['threads']} threads)._", "",
             "| backend | N | memory dtype | memory rows | step time before → after | peak growth before → after "
             "| M·D·4 (one float32 copy of the memory) |", "|---|---|---|---|---|---|---|"]
    for (backend, batch, dtype, step), p in by_key.items():
        before = by_key.get((backend, batch, dtype, "before"))
        if step != "after" or before is None:
            continue
        lines.append(f"| {backend} | {batch} | {dtype} | {p['memory_bytes'] / MIB:.1f} MiB "
                     f"| {before['median_s'] * 1e3:.0f} → {p['median_s'] * 1e3:.0f} ms "
                     f"| {before['peak_growth_bytes'] / MIB:.1f} → {p['peak_growth_bytes'] / MIB:.1f} MiB "
                     f"| {p['copy_bytes'] / MIB:.1f} MiB |")
    return lines


def write_readme(path, points, command) -> None:
    replace_block(path, "<!-- bench_xbm -->", "<!-- /bench_xbm -->", summary(points, command))

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=None, help="comma-separated; default: cpp and torch, those available")
    parser.add_argument("--batch", default="256,1024", help="comma-separated batch sizes N")
    parser.add_argument("--memory-rows", default="100000", help="comma-separated memory sizes M")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated memory dtypes")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated: before, after")
    parser.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.md and OUT.json")
    parser.add_argument("--readme", default=None, help="write the summary into this README's bench_xbm block")
    parser.add_argument("--render", action="store_true", help="no measuring: re-render OUT.md (and --readme) "
                        "from OUT.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render:
        with open(args.out + ".json") as f:
            doc = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(doc["points"], doc["command"]))
        if args.readme:
            write_readme(args.readme, doc["points"], doc["command"])
        return
    if args.worker:
        print(json.dumps(measure(args.backends, int(args.batch), int(args.memory_rows), args.dim, args.classes,
                                 args.repeats, args.dtypes, args.steps)))
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
                for dtype in args.dtypes.split(","):
                    for step in args.steps.split(","):
                        points.append(run_point(backend, batch, memory_rows, dtype, step, args))
                        print(json.dumps(points[-1]), flush=True)
    command = "python benchmarks/bench_xbm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(points, command.strip()))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(command=command.strip(), points=points), f, indent=1)
    print(f"wrote {args.out}.md and {args.out}.json")
    if args.readme:
        write_readme(args.readme, points, command.strip())


if __name__ == "__main__":
    main()
