"""The sweep's outputs: results.json, results.md (tables) and time.png / memory.png (log-log against N)."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

OK = "ok"
FAILED_MARKERS = {"oom": ("x", "out of memory"), "killed": ("x", "out of memory"), "timeout": (">", "time-out"),
                  "skipped": ("o", "skipped (est. over a limit)"), "error": ("*", "error")}


def _section_key(r) -> Tuple[int, str, str]:
    return r["d"], r["dtype"], r["mode"]


def sections(records) -> "OrderedDict[Tuple, List[dict]]":
    out: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for r in sorted(records, key=lambda r: (r["d"], r["dtype"] != "float32", r["dtype"], r["mode"] != "forward")):
        out.setdefault(_section_key(r), []).append(r)
    return out


def impl_order(records) -> List[str]:
    seen = []
    for r in records:
        if r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def fmt(x: Optional[float]) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.2g}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0 or a <= 0:
        return None
    return a / b


def _index(rows) -> Dict[Tuple[str, int], dict]:
    return {(r["impl"], r["n"]): r for r in rows}


def ratios(r: dict, by: Dict[Tuple[str, int], dict]) -> dict:
    """Speed-up and memory ratio against pml (>1: better than pml); time and memory in units of mm."""
    pml, mm = by.get(("pml", r["n"]), {}), by.get(("mm", r["n"]), {})
    return {"speedup_vs_pml": _ratio(pml.get("median_ms"), r["median_ms"]),
            "memory_vs_pml": _ratio(pml.get("peak_mb"), r["peak_mb"]),
            "time_per_mm": _ratio(r["median_ms"], mm.get("median_ms")),
            "memory_per_mm": _ratio(r["peak_mb"], mm.get("peak_mb"))}


def spread(r: dict) -> str:
    """"p20–p80" of a record's timed calls."""
    if r.get("p20_ms") is None:
        return "–"
    return f"{fmt(r['p20_ms'])}–{fmt(r['p80_ms'])}"


def _status(r: dict) -> str:
    return r["status"] if r["status"] == OK or not r.get("note") else f"{r['status']}: {r['note']}"


def section_title(key) -> str:
    d, dtype, mode = key
    return f"D = {d}, {dtype}, {mode.replace('_', ' + ')}"


def section_table(rows: List[dict]) -> List[str]:
    by = _index(rows)
    lines = ["| N | implementation | median ms | p20–p80 ms | peak MB | speed-up vs pml | memory vs pml | time / mm | "
             "memory / mm | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: r["n"]):
        if r["status"] == "unavailable" or r.get("note", "").startswith("loop only runs"):
            continue  # listed once in the header instead
        q = ratios(r, by)
        lines.append(f"| {r['n']} | {r['impl']} | {fmt(r['median_ms'])} | {spread(r)} | {fmt(r['peak_mb'])} | "
                     f"{fmt(q['speedup_vs_pml'])} | {fmt(q['memory_vs_pml'])} | {fmt(q['time_per_mm'])} | "
                     f"{fmt(q['memory_per_mm'])} | {_status(r)} |")
    return lines


def headline_table(doc) -> List[str]:
    """Per section, at the largest N that pml completed: the fastest ms_fused backend against pml and mm (no
    table, [], when no section has pml records, e.g. the floor preset)."""
    lines = ["| configuration | N | fastest ms_fused backend | speed-up vs pml | memory vs pml | time / mm | "
             "memory / mm | largest N run: ms_fused / pml |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for key, rows in sections(doc["records"]).items():
        by = _index(rows)
        ok = [r for r in rows if r["status"] == OK]
        fused = [r for r in ok if r["impl"].startswith("ms_fused:")]
        pml_ns = [r["n"] for r in ok if r["impl"] == "pml"]
        max_fused = max((r["n"] for r in fused), default=None)
        max_pml = max(pml_ns, default=None)
        at_n = max((r["n"] for r in fused if r["n"] in pml_ns), default=None)
        if at_n is None:
            continue
        best = min((r for r in fused if r["n"] == at_n), key=lambda r: r["median_ms"])
        q = ratios(best, by)
        lines.append(f"| {section_title(key)} | {at_n} | {best['impl']} | {fmt(q['speedup_vs_pml'])} | "
                     f"{fmt(q['memory_vs_pml'])} | {fmt(q['time_per_mm'])} | {fmt(q['memory_per_mm'])} | "
                     f"{max_fused} / {max_pml} |")
    return lines if len(lines) > 2 else []


# how a goal's bound reads: ratios against pml must reach it, time in units of mm must stay under it
AT_LEAST, AT_MOST = ("speedup_vs_pml", "memory_vs_pml"), ("time_per_mm", "memory_per_mm")


def goal_rows(doc) -> List[dict]:
    """Each goal of the run's preset against the records: the measured value and whether it is met."""
    out = []
    for g in doc["settings"].get("goals") or []:
        for key, rows in sections(doc["records"]).items():
            if key[2] != g["mode"] or g.get("d") not in (None, key[0]) or g.get("dtype") not in (None, key[1]):
                continue
            r = _index(rows).get((g["impl"], g["n"]))
            if r is None:
                continue
            done = r["status"] == OK
            if g["metric"] == "completes":
                value, met = None, done
            else:
                value = ratios(r, _index(rows))[g["metric"]] if done else None
                met = value is not None and (value >= g["bound"] if g["metric"] in AT_LEAST else value <= g["bound"])
            out.append(dict(goal=g, section=key, record=r, value=value, met=met))
    return out


def goal_text(g: dict) -> str:
    if g["metric"] == "completes":
        return "completes"
    what = {"speedup_vs_pml": "speed-up vs pml", "memory_vs_pml": "memory vs pml", "time_per_mm": "time / mm",
            "memory_per_mm": "memory / mm"}[g["metric"]]
    return f"{what} {'≥' if g['metric'] in AT_LEAST else '≤'} {g['bound']:g}"


def goals_table(doc) -> List[str]:
    rows = goal_rows(doc)
    if not rows:
        return []
    lines = ["| configuration | implementation | N | goal | measured | met |", "|---|---|---:|---|---:|---|"]
    for row in rows:
        g, r = row["goal"], row["record"]
        measured = fmt(row["value"]) if g["metric"] != "completes" else (
            f"{fmt(r['median_ms'])} ms, {fmt(r['peak_mb'])} MB" if r["status"] == OK else "–")
        met = "yes" if row["met"] else ("no" if r["status"] == OK else f"no ({_status(r)})")
        lines.append(f"| {section_title(row['section'])} | {g['impl']} | {g['n']} | {goal_text(g)} | {measured} "
                     f"| {met} |")
    return lines


def agreement_table(doc) -> List[str]:
    if not doc.get("agreement"):
        return []
    lines = ["| implementation | dtype | loss | loss rel. err | grad rel. err | status |", "|---|---|---:|---:|---:|---|"]
    for a in doc["agreement"]:
        def e(k):
            return "–" if a.get(k) is None else f"{a[k]:.1e}"
        loss = "–" if a.get("loss") is None else f"{a['loss']:.6f}"
        lines.append(f"| {a['impl']} | {a['dtype']} | {loss} | {e('loss_rel_err')} | {e('grad_rel_err')} | {_status(a)} |")
    return lines


LOSS_NAMES = {"supcon": "SupCon", "ntxent": "NT-Xent", "circle": "Circle loss"}


def markdown(doc) -> str:
    env, s, b = doc["environment"], doc["settings"], doc["batches"]
    unavailable = sorted({(r["impl"], r.get("note", "")) for r in doc["records"] if r["status"] == "unavailable"})
    hp = ", ".join(f"{k} = {v:g}" for k, v in b["hyper_parameters"].items())
    shares = "; ".join(f"D = {d}: {v['positives']:.0%} of positive and {v['negatives']:.0%} of negative pairs"
                       for d, v in b.get("hard_pair_share_at_2048", {}).items())
    out = [
        f"# ms_fused benchmark: {doc['device']}" + (f", `{s['preset']}` preset" if s.get("preset", "full") != "full"
                                                     else ""),
        "",
        f"Produced by `{doc['command']}` in {doc['wall_s'] or 0:.0f} s on {env['date']}: ms_fused commit "
        f"`{env['commit']}`, torch {env['torch']}, triton {env['triton']}, pytorch-metric-learning "
        f"{env['pytorch_metric_learning']}, Python {env['python']}, {env['threads']} torch threads.",
        "",
        f"Batches: P×K labels, {b['samples_per_class']} samples per class; rows around class centres, scattered so "
        f"that the MS miner keeps ~{b['target_hard_negative_share']:.0%} of the negative pairs (at N = 2048, {shares}). "
        + (f"Hyper-parameters: {hp}, mining on, mean reduction, " if s.get("loss", "ms") == "ms" else
         f"Loss: **{LOSS_NAMES[s['loss']]}** (ms_fused's and pml's, pml's defaults: {hp}; every pair, no miner; "
         "pml's reduction), ") + (
            f"memory-bank step: N anchors against a memory of {s['memory']} unit rows around the same class "
            "centres that holds the batch, memory without grad, as `CrossBatchMemory` holds it (ms_fused gets "
            "`ref_normalized=True` and removes the own copies by index; pml keeps them); `mm` is then one "
            "`torch.mm(X, memory.T)`, the N×M similarities alone." if s.get("memory") else "self mode."),
        "",
        f"Measurement: each record runs in a child process; a warm-up at N = 256, {s['warmup']} warm-up call(s) at "
        f"size, then the median of {s['min_repeats']}–{s['max_repeats']} timed calls (~{s['target_s']} s of work), "
        "with their spread: *p20–p80* = the 20th and 80th percentiles of those calls. "
        "*forward* = the loss of inputs that require grad; *forward + backward* adds `loss.backward()`. "
        "Peak memory above the inputs: on the CPU the growth of the resident set during the first call at size, "
        "on CUDA `torch.cuda.max_memory_allocated` over the timed calls. `mm` is one `torch.mm(X, X.T)` in "
        "the same dtype in both modes (a fused forward + backward does at least three such products). "
        f"Records whose estimated peak exceeds {s['mem_limit_bytes'] / 1e9:.1f} GB, or whose time extrapolated from "
        f"the previous N exceeds the {s['timeout_s']:.0f} s record time-out, are skipped, not run" + (
            f"; `loop` runs only up to N = {s['loop_max_n']}." if "loop" in s.get("impls", ["loop"]) else "."),
        "",
        "Columns: *speed-up vs pml* = pml's time / this time, *memory vs pml* = pml's peak / this peak (above 1: "
        "better than pml); *time / mm* and *memory / mm* = this record in units of the `mm` record.",
    ]
    busy = env.get("load_before", 0) > 0.5 * (env.get("cores") or 1)
    if busy and doc["device"].startswith("cpu"):
        out += ["", f"**Warning: the machine was busy when the sweep started (1-minute load {env['load_before']} on "
                    f"{env['cores']} cores); CPU timings from a shared machine are not reliable.**"]
    if not doc.get("complete", True):
        out += ["", "**Incomplete: the sweep was still running or was stopped when this was written.**"]
    if unavailable:
        out += ["", "Not available here: " + "; ".join(f"`{i}` ({why})" for i, why in unavailable) + "."]
    goals = goals_table(doc)
    if goals:
        out += ["", f"## Goals of the `{s.get('preset')}` preset", ""] + goals
    head = headline_table(doc)
    if len(head) > 2:
        out += ["", "## Summary (largest N that pml completed)", ""] + head
    agree = agreement_table(doc)
    if agree:
        out += ["", "## Agreement with the float64 reference (N = 256, D = 64)", ""] + agree
    for key, rows in sections(doc["records"]).items():
        out += ["", f"## {section_title(key)}", ""] + section_table(rows)
    return "\n".join(out) + "\n"


def _marked(r: dict) -> bool:
    """Failures that say something about the implementation (not a policy skip such as the loop's N cap)."""
    if r["status"] == "skipped":
        return r.get("note", "").startswith(("est.", "N = "))
    return r["status"] in FAILED_MARKERS


def plots(doc, out_dir: str) -> List[str]:
    """time.png and memory.png: one panel per (D, dtype, mode), one line per implementation, failures marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        return []
    secs = sections(doc["records"])
    if not secs:
        return []
    names = impl_order(doc["records"])
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    configs = list(OrderedDict.fromkeys((d, t) for d, t, _ in secs))
    modes = list(OrderedDict.fromkeys(m for _, _, m in secs))
    paths = []
    for field, ylabel, filename in (("median_ms", "median time per call (ms)", "time.png"),
                                    ("peak_mb", "peak memory above inputs (MB)", "memory.png")):
        fig, axes = plt.subplots(len(modes), len(configs), figsize=(4.6 * len(configs) + 2.2, 3.8 * len(modes) + 0.6),
                                 squeeze=False)
        for (row, mode), (col, (d, dtype)) in ((a, b) for a in enumerate(modes) for b in enumerate(configs)):
            ax = axes[row][col]
            rows = secs.get((d, dtype, mode), [])
            top = blended_transform_factory(ax.transData, ax.transAxes)
            for name in names:
                mine = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["n"])
                good = [(r["n"], r[field]) for r in mine if r["status"] == OK and r[field] is not None]
                if good:
                    ax.plot([n for n, _ in good], [max(v, 1e-2) for _, v in good], marker=".",
                            color=colours[name], label=name)
                # failure markers of different implementations at one N side by side, not on top of each other
                shift = 2 ** (0.06 * (names.index(name) - (len(names) - 1) / 2))
                for r in mine:
                    if _marked(r):
                        ax.plot([r["n"] * shift], [0.97], marker=FAILED_MARKERS[r["status"]][0], color=colours[name],
                                transform=top, linestyle="none", clip_on=False, fillstyle="none")
            ax.set_xscale("log", base=2)
            ns = sorted({r["n"] for r in rows})
            ax.set_xticks(ns, [str(n) for n in ns], fontsize=8)
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_title(section_title((d, dtype, mode)), fontsize=10)
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(l, h)
        right = 1 - 2.0 / fig.get_figwidth()
        fig.legend(list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(right, 0.5),
                   frameon=False, fontsize=9)
        marks = "\n".join(f"{m}  {what}" for m, what in dict(FAILED_MARKERS.values()).items())
        fig.text(right + 0.01, 0.1, f"at the top edge:\n{marks}", fontsize=7, va="bottom")
        fig.suptitle(doc["device"], fontsize=11)
        fig.tight_layout(rect=(0, 0, right, 1))
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def save(doc, out_dir: str, with_plots: bool = True) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(doc))
    paths = [md_path, json_path]
    if with_plots:
        paths += plots(doc, out_dir)
    return paths


def replace_block(path: str, start: str, end: str, lines: List[str]) -> None:
    """Replace what stands between the markers `start` and `end` in the file at `path` with `lines`."""
    with open(path) as f:
        text = f.read()
    if start not in text:
        raise SystemExit(f"{path} has no '{start}' marker")
    head, rest = text.split(start, 1)
    if end not in rest:
        raise SystemExit(f"{path} has no '{end}' after '{start}'")
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + start + "\n".join([""] + lines + [""]) + end + tail)


def update_readme(readme_path: str, results_json: str, doc) -> None:
    """Replace the block between `<!-- results:<json path> -->` and `<!-- /results -->` with the summary table."""
    made_by = f"_Generated by `python benchmarks/report.py {results_json} --readme {readme_path}` from a run of " \
              f"`{doc.get('command', '?')}`._"
    goals, head = goals_table(doc), headline_table(doc)
    replace_block(readme_path, f"<!-- results:{results_json} -->", "<!-- /results -->",
                  [made_by, ""] + goals + ([""] if goals and head else []) + head)


def main(argv=None) -> int:
    """Re-render a results folder from its results.json, print the summary table, or write it into the README."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results_json")
    p.add_argument("--summary", action="store_true", help="print the summary table only")
    p.add_argument("--readme", help="write the summary table into this file between its results markers")
    args = p.parse_args(argv)
    with open(args.results_json) as f:
        doc = json.load(f)
    if args.readme:
        update_readme(args.readme, args.results_json, doc)
        return 0
    if args.summary:
        print("\n".join(headline_table(doc)))
        return 0
    out_dir = os.path.dirname(os.path.abspath(args.results_json))
    print("\n".join(save(doc, out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
