"""Exact Recall@K on the CPU: ms_fused.retrieval against scikit-learn's brute-force k-NN and a dense torch.mm + topk.

    python benchmarks/bench_retrieval.py                       # N = 10^4 ... 10^5, then N = 200 000 (ms_fused)
    python benchmarks/bench_retrieval.py --n 10000 --big-n 0 --out /tmp/r   # a quick look

Data: N rows of D = 128 float32 around N / 8 random class centres (8 rows per class), self mode: each row
queries all the others (its own row excluded). Records, each in a fresh subprocess:
- `ms_fused`: ms_fused.retrieval.recall_at_k(x, y, ks=(1, 2, 4, 8));
- `ms_fused map_at_r`: ms_fused.retrieval.map_at_r(x, y) (R = 7 here);
- `sklearn`: NearestNeighbors(n_neighbors=8, algorithm="brute", metric="cosine").fit(x).kneighbors(), then Recall@K;
- `dense`: F.normalize, one N x N torch.mm, the diagonal set to -inf, topk(8), then Recall@K; skipped where
  the N x N float32 matrix alone exceeds --dense-limit-gb.
Each record runs with --threads torch / BLAS threads (default 1). Time: the first call after a warm-up at
N = 256, then more calls while the total stays under --target-s (at most 3); the median is reported with
the spread (20th-80th percentile) of the calls.
Peak memory: the growth of the resident set (VmHWM, reset through /proc/self/clear_refs) during the first
call, above the resident set holding the inputs.
Recall@K of sklearn and dense is compared with ms_fused's at the same N (largest difference over K).
Writes OUT.md, OUT.json and OUT.png; --readme FILE writes the summary between its retrieval markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from environment import commit, cpu_name
from measure import SKIPPED, Runner, exception_record, time_summary
from report import replace_block
from rss import measured_call

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu", "retrieval")
README_MARK = "<!-- retrieval:benchmarks/results/cpu/retrieval.json -->"
IMPLS = ("ms_fused", "ms_fused map_at_r", "sklearn", "dense")
KS = (1, 2, 4, 8)
PER_CLASS = 8
GIB, MIB = 2**30, 2**20


SPREAD = 1.5  # noise std around unit-variance class centres (Recall@1 about 0.85 at N = 10^4, D = 128)


def make_data(n: int, d: int, seed: int):
    """The suite's clustered batch (impls.clustered) with PER_CLASS rows per class, float32."""
    import impls

    return impls.clustered(n, d, SPREAD, seed, samples_per_class=PER_CLASS)


def build(impl: str):
    """(x, y) -> {"recall": {k: ...}} or {"map_at_r": ...}."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ms_fused import retrieval

    def recall(y, nearest):
        hit = (y[nearest] == y[:, None]).numpy() if isinstance(nearest, torch.Tensor) else \
            y.numpy()[nearest] == y.numpy()[:, None]
        return {"recall": {k: float(np.any(hit[:, :k], axis=1).mean()) for k in KS}}

    if impl == "ms_fused":
        return lambda x, y: {"recall": retrieval.recall_at_k(x, y, KS)}
    if impl == "ms_fused map_at_r":
        return lambda x, y: {"map_at_r": retrieval.map_at_r(x, y)}
    if impl == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        def run(x, y):
            model = NearestNeighbors(n_neighbors=max(KS), algorithm="brute", metric="cosine").fit(x.numpy())
            return recall(y, model.kneighbors(return_distance=False))
        return run
    if impl == "dense":
        def run(x, y):
            xn = F.normalize(x, dim=1)
            sim = xn @ xn.T
            sim.fill_diagonal_(float("-inf"))
            return recall(y, sim.topk(max(KS), dim=1).indices)
        return run
    raise ValueError(impl)


def measure(impl: str, n: int, d: int, seed: int, target_s: float, threads: int) -> dict:
    """Runs in the fresh child process (whose BLAS thread counts the parent set in its environment)."""
    import torch

    torch.set_num_threads(threads)
    fn = build(impl)
    fn(*make_data(256, d, seed + 1))  # loads code and thread pools outside the measurement
    x, y = make_data(n, d, seed)
    call = measured_call(lambda: fn(x, y))
    result, times = call.result, [call.seconds]
    while sum(times) + times[-1] <= target_s and len(times) < 3:
        start = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - start)
    return dict(impl=impl, n=n, d=d, dtype="float32", status="ok", **time_summary(times, "s"), times_s=times,
                peak_growth_bytes=call.growth_bytes, peak_reset=call.reset_ok, input_bytes=n * d * 4,
                dense_bytes=n * n * 4,
                threads=torch.get_num_threads(), torch=torch.__version__,
                **json.loads(json.dumps(result)))  # K as the JSON file will hold it (a string)


def worker(spec: dict) -> dict:
    try:
        return measure(**spec)
    except BaseException as exc:  # recorded, not raised
        return dict(exception_record(exc), impl=spec["impl"], n=spec["n"], d=spec["d"])


def run_record(runner: Runner, impl: str, n: int, args) -> dict:
    if impl == "dense" and n * n * 4 > args.dense_limit_gb * GIB:
        return dict(impl=impl, n=n, d=args.d, status=SKIPPED, dense_bytes=n * n * 4,
                    note=f"N x N float32 matrix {n * n * 4 / GIB:.1f} GiB > --dense-limit-gb {args.dense_limit_gb}")
    spec = dict(impl=impl, n=n, d=args.d, seed=args.seed, target_s=args.target_s, threads=args.threads)
    return dict(dict(impl=impl, n=n, d=args.d), **runner.run(spec, args.timeout))


def agreement(records) -> None:
    """Give each sklearn / dense record the largest |Recall@K - ms_fused's Recall@K| at the same N."""
    ours = {r["n"]: r["recall"] for r in records if r["impl"] == "ms_fused" and r["status"] == "ok"}
    for r in records:
        if r["impl"] in ("sklearn", "dense") and r["status"] == "ok" and r["n"] in ours:
            r["recall_diff_vs_ms_fused"] = max(abs(v - ours[r["n"]][k]) for k, v in r["recall"].items())


def _cell(r, key) -> str:
    if r is None:
        return "–"
    if r["status"] != "ok":
        return r["status"]
    if key == "time":
        spread = f" ({r['p20_s']:.2f}–{r['p80_s']:.2f})" if "p20_s" in r and len(r.get("times_s", [])) > 1 else ""
        return f"{r['median_s']:.2f} s{spread}"
    return f"{r['peak_growth_bytes'] / MIB:,.0f} MiB"


def sweep_table(records, impls) -> list:
    by = {(r["impl"], r["n"]): r for r in records}
    ns = sorted({r["n"] for r in records})
    lines = ["| N | " + " | ".join(f"{i} time | {i} peak" for i in impls) + " | dense N×N float32 | Recall@1 | "
             "largest \\|Recall@K − ms_fused's\\| |",
             "|---:|" + "---:|---:|" * len(impls) + "---:|---:|---|"]
    for n in ns:
        cells = [f"{_cell(by.get((i, n)), 'time')} | {_cell(by.get((i, n)), 'peak')}" for i in impls]
        ours = by.get(("ms_fused", n), {})
        same = [f"{i}: {by[(i, n)]['recall_diff_vs_ms_fused']:.1g}" for i in ("sklearn", "dense")
                if "recall_diff_vs_ms_fused" in by.get((i, n), {})]
        recall1 = f"{ours['recall']['1']:.4f}" if ours.get("status") == "ok" else "–"
        lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {n * n * 4 / GIB:,.1f} GiB | {recall1} | "
                     f"{', '.join(same) or '–'} |")
    return lines


def big_lines(big) -> list:
    if big is None:
        return []
    if big["status"] != "ok":
        return [f"N = {big['n']:,}: {big['status']} ({big.get('note', '')})"]
    recall = ", ".join(f"R@{k} = {v:.4f}" for k, v in big["recall"].items())
    return [f"N = {big['n']:,}, D = {big['d']}: ms_fused Recall@{{1,2,4,8}} in {big['median_s']:.1f} s, "
            f"peak memory {big['peak_growth_bytes'] / MIB:,.0f} MiB above the {big['input_bytes'] / MIB:,.0f} MiB "
            f"of inputs, where a dense N×N float32 matrix alone would take {big['dense_bytes'] / GIB:,.0f} GiB "
            f"({big['dense_bytes'] / 1e9:,.0f} GB); {recall}."]


def markdown(doc) -> str:
    first = next(r for r in doc["records"] + [doc.get("big") or {}] if r.get("status") == "ok")
    impls = [i for i in IMPLS if any(r["impl"] == i for r in doc["records"])]
    return "\n".join([
        "# Exact Recall@K on the CPU: ms_fused.retrieval, scikit-learn brute force, dense torch.mm + topk", "",
        f"`{doc['command']}` — {doc['date']}, {doc['cpu']}, torch {first['torch']}, {first['threads']} threads, "
        f"D = {first['d']}, float32, {PER_CLASS} rows per class, self mode (each row queries all others), "
        f"load average before the run {doc['load_before']}, commit {doc['commit']}.", "",
        "Time: median of the calls (the first, plus repeats while under the time target); peak: the growth of "
        "the resident set during the first call above the inputs (fresh process per record).", "",
        *sweep_table(doc["records"], impls), "", *big_lines(doc.get("big")), ""])


def plot(doc, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLS:
        rows = sorted((r for r in doc["records"] if r["impl"] == impl and r["status"] == "ok"), key=lambda r: r["n"])
        if rows:
            t_ax.plot([r["n"] for r in rows], [r["median_s"] for r in rows], "o-", label=impl)
            m_ax.plot([r["n"] for r in rows], [r["peak_growth_bytes"] / MIB for r in rows], "o-", label=impl)
    big = doc.get("big")
    if big and big["status"] == "ok":
        t_ax.plot([big["n"]], [big["median_s"]], "k*", ms=10, label="ms_fused N = 200 000")
        m_ax.plot([big["n"]], [big["peak_growth_bytes"] / MIB], "k*", ms=10, label="ms_fused N = 200 000")
    for ax, ylabel in ((t_ax, "time (s)"), (m_ax, "peak memory growth (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (queries = references), D = 128")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Exact Recall@{1,2,4,8} on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def readme_lines(doc, out: str) -> list:
    impls = [i for i in IMPLS if any(r["impl"] == i for r in doc["records"])]
    table = os.path.relpath(out + ".md", os.path.dirname(HERE))
    return [f"_Written by `{doc['command']}` ({doc['cpu']}, {doc['date']}); full table: [`{table}`]({table})._", "",
            *sweep_table(doc["records"], impls), "", *big_lines(doc.get("big"))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--n", default="10000,20000,50000,100000", help="comma-separated N of the sweep")
    parser.add_argument("--big-n", type=int, default=200_000, help="one ms_fused Recall@K run at this N (0: none)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-s", type=float, default=20.0, help="repeat a record while its total stays under")
    parser.add_argument("--dense-limit-gb", type=float, default=4.0, help="largest dense N×N matrix (GiB)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per record")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads of every record "
                        "(1: comparable on a shared machine, where more threads than free cores stall each other)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.md, OUT.json and OUT.png")
    parser.add_argument("--readme", default=None, help="write the summary into this file between its markers")
    args = parser.parse_args(argv)

    from environment import load_average

    command = "python benchmarks/bench_retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = dict(command=command.strip(), cpu=cpu_name(), commit=commit(), load_before=load_average(),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), records=[])
    # BLAS thread counts are read when a process starts: set them before the children's server starts
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    runner = Runner(reuse=False, preload=["torch", "ms_fused", "bench_retrieval"], job="bench_retrieval:worker")
    try:
        for n in map(int, args.n.split(",")):
            for impl in args.impls.split(","):
                doc["records"].append(run_record(runner, impl, n, args))
                print(json.dumps(doc["records"][-1]), flush=True)
        agreement(doc["records"])
        doc["big"] = run_record(runner, "ms_fused", args.big_n, args) if args.big_n else None
    finally:
        runner.close()
    if doc["big"]:
        print(json.dumps(doc["big"]), flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(doc))
    plot(doc, args.out + ".png")
    if args.readme:
        replace_block(args.readme, README_MARK, "<!-- /results -->", readme_lines(doc, args.out))
    print(f"wrote {args.out}.md, {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
