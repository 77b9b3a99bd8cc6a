"""A training step of a small CNN on 28x28 images, full batch against `cached_backward`: peak memory, time, largest batch.

The network is the convolutional trunk of PyTorch's MNIST example with a 128-d embedding head (conv 1→32,
conv 32→64, max-pool, dropout 0.25, linear 9216→128), float32, default MS loss, 4 images per class.
A full step is `multi_similarity_loss(net(x), y).backward()`; a cached step is
`cached_backward(net, x, y, chunk_size=CHUNK)`.

Every record runs in a fresh Python process whose memory growth after loading torch and the network is
capped at --guard-gib (RLIMIT_DATA: past it an allocation fails instead of summoning the OOM killer). The
child times one step after a warm-up step on one chunk's rows (whose freed memory it hands back to the OS
first) and reads its resident set: the step's peak growth above what it held before the step (network,
inputs, code), and the process's peak.

After the --batches grid, each method doubles the batch from its largest completed one, until a batch
fails, until the peak predicted from the completed batches (the line through the two largest) passes
the guard (not run; --no-prediction runs it under the cap instead), or until --max-batch.

    python benchmarks/bench_cached.py                 # 1024, 4096, 16384 + search; 16 GiB guard; results/cpu/cached.*
    python benchmarks/bench_cached.py --batches 256,512 --guard-gib 2 --max-batch 2048 --out /tmp/cached
    python benchmarks/bench_cached.py --batches 4096 --chunk-sweep 64,256,1024,4096   # results/cpu/cached_chunks.*
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from measure import OK, SKIPPED, Runner, exception_record
from rss import measured_call, status_kb

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu", "cached")
METHODS = ("full", "cached")
GIB = 2**30


def embedding_cnn(dim: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 12 * 12, dim))


# ---------------------------------------------------------------------------------------------
# in the child


def measure(method: str, batch: int, chunk: int, dim: int, guard_bytes: int, threads: int) -> dict:
    import torch

    import ms_fused
    from measure import _cap_cpu_memory

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = embedding_cnn(dim)
    _cap_cpu_memory(guard_bytes)
    at_cap_kb = status_kb("VmRSS")
    x = torch.randn(batch, 1, 28, 28)
    y = torch.arange(batch) // 4

    def step(xs, ys):
        if method == "cached":
            return ms_fused.cached_backward(net, xs, ys, chunk_size=chunk)
        loss = ms_fused.multi_similarity_loss(net(xs), ys)
        loss.backward()
        return loss.detach()

    warm = min(batch, chunk)
    step(x[:warm], y[:warm])
    net.zero_grad(set_to_none=True)
    call = measured_call(lambda: step(x, y))
    return dict(status=OK, seconds=call.seconds, loss=float(call.result), peak_reset=call.reset_ok,
                step_peak_bytes=call.growth_bytes, process_peak_bytes=call.peak_bytes,
                capped_peak_bytes=call.peak_bytes - at_cap_kb * 1024, threads=torch.get_num_threads(),
                torch=torch.__version__)


def worker(spec: dict) -> dict:
    try:
        return measure(**spec)
    except BaseException as exc:  # recorded, not raised: the search reads it as where the method stops
        return exception_record(exc)


# ---------------------------------------------------------------------------------------------
# in the parent


def run_record(runner: Runner, method: str, batch: int, args, chunk: Optional[int] = None) -> dict:
    """One record in a fresh child process (measure.Runner: time-out, out-of-memory and killed children recorded)."""
    spec = dict(method=method, batch=batch, chunk=chunk or args.chunk, dim=args.dim,
                guard_bytes=int(args.guard_gib * GIB), threads=args.threads)
    return dict(runner.run(spec, args.timeout), chunk=spec["chunk"] if method == "cached" else None)


def predict_peak(done, batch: int) -> Optional[float]:
    """Peak at `batch` extrapolated from (batch, peak) of completed records: the line through the two largest,
    or proportional to the largest alone; never below the largest's peak."""
    if not done:
        return None
    b1, p1 = done[-1]
    if len(done) == 1:
        return p1 * batch / b1
    b0, p0 = done[-2]
    return p1 + max(0.0, (p1 - p0) / (b1 - b0)) * (batch - b1)


def search(method: str, batches, run, guard_bytes: float, max_batch: int, predict: bool):
    """The grid, then doubling from the largest completed batch; returns (records by batch, largest, first not run).

    `run(method, batch)` measures one record."""
    records = {}

    def attempt(batch: int) -> dict:
        done = sorted((r["batch"], r["capped_peak_bytes"]) for r in records.values()
                      if r["status"] == OK and r["batch"] < batch)
        predicted = predict_peak(done, batch)
        if predict and predicted is not None and predicted > guard_bytes:
            record = dict(status=SKIPPED, note=f"predicted peak {predicted / GIB:.1f} GiB > guard "
                                               f"{guard_bytes / GIB:g} GiB, not run")
        else:
            record = run(method, batch)
        record.update(method=method, batch=batch, predicted_bytes=predicted)
        records[batch] = record
        print(json.dumps(record), flush=True)
        return record

    for batch in batches:
        attempt(batch)
    completed = [b for b, r in records.items() if r["status"] == OK]
    largest = max(completed, default=None)
    first_not = None
    while largest is not None:
        batch = 2 * largest
        if batch in records and records[batch]["status"] != SKIPPED:
            record = records[batch]
        elif batch > max_batch:
            first_not = dict(batch=batch, status=SKIPPED, note=f"over --max-batch {max_batch}, not run")
            break
        else:
            record = attempt(batch)
        if record["status"] != OK:
            first_not = dict(batch=batch, status=record["status"], note=record.get("note", ""))
            break
        largest = batch
    return records, largest, first_not


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1024,4096,16384", help="comma-separated batch sizes of the grid")
    parser.add_argument("--chunk", type=int, default=256, help="chunk_size of the cached step")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--guard-gib", type=float, default=16.0,
                        help="most memory a record's process may add after loading torch (default 16: safe on 24 GiB)")
    parser.add_argument("--max-batch", type=int, default=131072, help="the search stops doubling past this batch")
    parser.add_argument("--chunk-sweep", default=None, metavar="CHUNKS",
                        help="instead of the search: at each --batches batch, the full step and the cached step with "
                             "each of these comma-separated chunk sizes")
    parser.add_argument("--no-prediction", action="store_true",
                        help="run every doubling under the cap, even when the predicted peak passes the guard")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per record")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None, help="writes OUT.json, OUT.md and OUT.png (default "
                        "benchmarks/results/cpu/cached, or cached_chunks with --chunk-sweep)")
    parser.add_argument("--readme", help="also write the summary into this file between its cached markers")
    args = parser.parse_args(argv)
    args.out = args.out or DEFAULT_OUT + ("_chunks" if args.chunk_sweep else "")

    import cached_report
    from environment import describe

    import torch

    command = "python benchmarks/bench_cached.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = dict(command=command.strip(), **describe(torch.device("cpu"), args.threads or None),
               settings=dict(batches=[int(b) for b in args.batches.split(",")], chunk=args.chunk, dim=args.dim,
                             guard_bytes=int(args.guard_gib * GIB), max_batch=args.max_batch,
                             prediction=not args.no_prediction),
               records=[], largest={})
    # a fresh child per record: each is capped and measured on its own
    runner = Runner(reuse=False, preload=["torch", "ms_fused", "bench_cached"], job="bench_cached:worker",
                    cpp_extension=True)
    try:
        run_all(runner, args, doc)
    finally:
        runner.close()
    for path in cached_report.save(doc, args.out):
        print("wrote", path)
    if args.readme:
        cached_report.update_readme(args.readme, args.out + ".json", doc)
        print("wrote", args.readme)


def run_all(runner: Runner, args, doc) -> None:
    if args.chunk_sweep:
        doc["settings"]["chunk_sweep"] = [int(c) for c in args.chunk_sweep.split(",")]
        for batch in doc["settings"]["batches"]:
            for method, chunk in [("full", None)] + [("cached", c) for c in doc["settings"]["chunk_sweep"]]:
                doc["records"].append(dict(run_record(runner, method, batch, args, chunk), method=method, batch=batch))
                print(json.dumps(doc["records"][-1]), flush=True)
    for method in [] if args.chunk_sweep else args.methods.split(","):
        records, largest, first_not = search(method, doc["settings"]["batches"],
                                             lambda m, b: run_record(runner, m, b, args), args.guard_gib * GIB,
                                             args.max_batch, not args.no_prediction)
        doc["records"] += sorted(records.values(), key=lambda r: r["batch"])
        doc["largest"][method] = dict(completed=largest, first_not=first_not)


if __name__ == "__main__":
    main()
