"""Tables, plot and README summary of a `bench_cached.py` run, from its JSON document.

    python benchmarks/cached_report.py benchmarks/results/cpu/cached.json                    # re-render .md and .png
    python benchmarks/cached_report.py benchmarks/results/cpu/cached.json --readme README.md  # the README summary
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

from report import replace_block

MIB, GIB = 2**20, 2**30
OK = "ok"


def size(n_bytes: Optional[float]) -> str:
    if n_bytes is None:
        return "—"
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.0f} MiB"


def by_method(doc) -> Dict[str, Dict[int, dict]]:
    out: Dict[str, Dict[int, dict]] = {}
    for r in doc["records"]:
        out.setdefault(r["method"], {})[r["batch"]] = r
    return out


def cell(r: Optional[dict], field: str) -> str:
    if r is None:
        return "not run"
    if r["status"] != OK:
        return f"{r['status']}¹"
    return f"{r['seconds']:.1f} s" if field == "seconds" else size(r[field])


def ratio(full: Optional[dict], cached: Optional[dict], field: str) -> str:
    if full and cached and full["status"] == OK and cached["status"] == OK and cached[field]:
        return f"{full[field] / cached[field]:.1f}×"
    return "—"


def largest_text(doc, method: str) -> str:
    largest = doc["largest"].get(method)
    if not largest:
        return "not measured"
    first = largest["first_not"]
    after = f"; {first['batch']}: {first['status']}, {first['note']}" if first else ""
    return f"{largest['completed']}{after}"


def largest_ratio(doc) -> Optional[float]:
    full, cached = doc["largest"].get("full"), doc["largest"].get("cached")
    if full and cached and full["completed"] and cached["completed"]:
        return cached["completed"] / full["completed"]
    return None


def settings_text(doc) -> str:
    s = doc["settings"]
    return (f"chunk_size {s['chunk']}, embedding dim {s['dim']}, guard {s['guard_bytes'] / GIB:g} GiB of growth per "
            f"record's process, search up to batch {s['max_batch']}"
            + ("" if s["prediction"] else ", every doubling run under the cap"))


def markdown(doc) -> str:
    methods = by_method(doc)
    full, cached = methods.get("full", {}), methods.get("cached", {})
    head = ("| batch | full: step peak | full: process peak | full: time | cached: step peak | cached: process peak "
            "| cached: time | step peak full ÷ cached | time cached ÷ full |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = ""
    for b in sorted(set(full) | set(cached)):
        f, c = full.get(b), cached.get(b)
        time_ratio = ratio(c, f, "seconds")
        rows += (f"| {b} | {cell(f, 'step_peak_bytes')} | {cell(f, 'process_peak_bytes')} | {cell(f, 'seconds')} "
                 f"| {cell(c, 'step_peak_bytes')} | {cell(c, 'process_peak_bytes')} | {cell(c, 'seconds')} "
                 f"| {ratio(f, c, 'step_peak_bytes')} | {time_ratio} |\n")
    notes = [f"{r['method']} at {r['batch']}: {r['status']}, {r.get('note', '')}"
             for r in doc["records"] if r["status"] != OK]
    k = largest_ratio(doc)
    env = doc["environment"]
    return "\n".join([
        "# Full-batch against cached training steps on the CPU", "",
        f"`{doc['command']}` — {env['date']}, {doc['device']}, torch {env['torch']}, commit {env['commit']}, "
        f"load average before the run {env['load_before']}.", "",
        "Network: PyTorch's MNIST-example convolutional trunk with an embedding head (conv 1→32, conv 32→64, "
        "max-pool, dropout 0.25, linear 9216→dim) on 28×28 float32 inputs, default MS loss, 4 images per class. "
        "Full step: `multi_similarity_loss(net(x), y).backward()`; cached step: "
        f"`cached_backward(net, x, y, chunk_size=...)`. {settings_text(doc)}.", "",
        "Each record is one step in a fresh process, after a warm-up step on one chunk's rows whose freed memory "
        "goes back to the OS before the step. *Step peak*: the "
        "largest rise of the resident set during the step above what the process held before it (network, "
        "inputs, code); *process peak*: the process's resident-set high-water mark (torch itself included).", "",
        head + rows,
        "## Largest batch", "",
        f"- full step: {largest_text(doc, 'full')}",
        f"- cached step: {largest_text(doc, 'cached')}",
        f"- cached ÷ full: {k:.0f}×" if k else "- cached ÷ full: —", "",
        *(["¹ " + "; ".join(notes), ""] if notes else []),
    ])


def chunk_rows(doc) -> List[tuple]:
    """(label, record) per batch of a chunk sweep: the full step, then the cached step by chunk."""
    rows = []
    for r in doc["records"]:
        label = "full batch" if r["method"] == "full" else f"cached, chunk {r['chunk']}"
        rows.append((r["batch"], label, r))
    return rows


def chunk_table(doc) -> List[str]:
    lines = ["| batch | step | step peak | process peak | time |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {b} | {label} | {cell(r, 'step_peak_bytes')} | {cell(r, 'process_peak_bytes')} "
              f"| {cell(r, 'seconds')} |" for b, label, r in chunk_rows(doc)]
    return lines


def markdown_chunks(doc) -> str:
    env = doc["environment"]
    notes = [f"{r['method']} at {r['batch']}: {r['status']}, {r.get('note', '')}"
             for r in doc["records"] if r["status"] != OK]
    return "\n".join([
        "# Cached step by chunk size on the CPU", "",
        f"`{doc['command']}` — {env['date']}, {doc['device']}, torch {env['torch']}, commit {env['commit']}, "
        f"load average before the run {env['load_before']}.", "",
        "The network, step and measurements of `cached.md`, at a fixed batch: the full step once, then the cached "
        "step with each chunk size.", "",
        *chunk_table(doc), "", *(["¹ " + "; ".join(notes), ""] if notes else []),
    ])


def readme_block(doc, json_path: str) -> List[str]:
    if doc["settings"].get("chunk_sweep"):
        return [f"_Generated by `python benchmarks/cached_report.py {json_path} --readme README.md` from a run of "
                f"`{doc['command']}`._", ""] + chunk_table(doc)
    methods = by_method(doc)
    full, cached = methods.get("full", {}), methods.get("cached", {})
    lines = [f"_Generated by `python benchmarks/cached_report.py {json_path} --readme README.md` from a run of "
             f"`{doc['command']}` ({settings_text(doc)})._", "",
             "| batch | full step: peak, time | cached step: peak, time | peak full ÷ cached |",
             "|---:|---:|---:|---:|"]
    for b in doc["settings"]["batches"]:
        f, c = full.get(b), cached.get(b)
        lines.append(f"| {b} | {cell(f, 'step_peak_bytes')}, {cell(f, 'seconds')} "
                     f"| {cell(c, 'step_peak_bytes')}, {cell(c, 'seconds')} | {ratio(f, c, 'step_peak_bytes')} |")
    k = largest_ratio(doc)
    lines += ["", f"Largest batch run: full step {largest_text(doc, 'full')}. Cached step {largest_text(doc, 'cached')}."
              + (f" The cached step ran a batch {k:.0f}× larger." if k else "")]
    notes = [f"{r['method']} at {r['batch']}: {r.get('note', '')}" for r in doc["records"]
             if r["status"] != OK and r["batch"] in doc["settings"]["batches"]]
    if notes:
        lines += ["", "¹ " + "; ".join(notes)]
    return lines


def plot(doc, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, records) in enumerate(by_method(doc).items()):
        good = sorted((b, r) for b, r in records.items() if r["status"] == OK)
        bs = [b for b, _ in good]
        mem_ax.plot(bs, [r["step_peak_bytes"] / MIB for _, r in good], marker="o", color=f"C{i}", label=method)
        time_ax.plot(bs, [r["seconds"] for _, r in good], marker="o", color=f"C{i}", label=method)
        for b, r in records.items():
            if r["status"] != OK:
                for ax in (mem_ax, time_ax):
                    ax.plot([b], [0.97], marker="x", color=f"C{i}", transform=ax.get_xaxis_transform(),
                            clip_on=False, linestyle="none")
    mem_ax.axhline(doc["settings"]["guard_bytes"] / MIB, color="grey", linestyle=":", label="guard (a process's growth)")
    for ax, ylabel in ((mem_ax, "step peak: resident-set growth (MiB)"), (time_ax, "time of one step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (x: not run or failed, see cached.md)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['device']}; cached chunk_size {doc['settings']['chunk']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(doc, out: str) -> List[str]:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown_chunks(doc) if doc["settings"].get("chunk_sweep") else markdown(doc))
    if doc["settings"].get("chunk_sweep"):
        return [out + ".json", out + ".md"]
    return [out + ".json", out + ".md"] + [p for p in [plot(doc, out + ".png")] if p]


def update_readme(readme_path: str, json_path: str, doc) -> None:
    """Replace the block between `<!-- cached:<json path> -->` and `<!-- /cached -->` with the summary (the path
    relative to the README's folder)."""
    json_path = os.path.relpath(json_path, os.path.dirname(os.path.abspath(readme_path)))
    replace_block(readme_path, f"<!-- cached:{json_path} -->", "<!-- /cached -->", readme_block(doc, json_path))

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_json")
    parser.add_argument("--readme", help="write the summary into this file between its cached markers")
    args = parser.parse_args(argv)
    with open(args.results_json) as f:
        doc = json.load(f)
    if args.readme:
        update_readme(args.readme, args.results_json, doc)
    else:
        print("\n".join(save(doc, os.path.splitext(args.results_json)[0])))


if __name__ == "__main__":
    main()
