"""The roofline prediction beside the measurement: for the target point and the memory-bank point, the
forward and the step as time over one mm, predicted by benchmarks/kernel_stats.py (results/kernel_stats.json)
and measured by run.py on a GPU (gpu_check.sh's results.json files).

    python benchmarks/prediction.py RESULTS_DIR [--out FILE.md]   # RESULTS_DIR holds target/ and memory_bank/
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
STATS = os.path.join(BENCH_DIR, "results", "kernel_stats.json")
# gpu_check.sh's step -> kernel_stats' roofline case
STEPS = {"target": "self mode", "memory_bank": "memory bank"}
PHASES = (("forward", "forward_per_mm"), ("forward_backward", "step_per_mm"))


def _measured(records: list, mode: str) -> Optional[float]:
    """The triton backend's median over the mm's median of the same shape, or None."""
    def median(impl_prefix, want_mode):
        found = [r for r in records if r.get("impl", "").startswith(impl_prefix) and r.get("status") == "ok"
                 and (want_mode is None or r.get("mode") == want_mode)]
        return found[0]["median_ms"] if found else None
    ours, mm = median("ms_fused:triton", mode), median("mm", None)
    return ours / mm if ours and mm else None


def lines(results_dir: str, stats_path: str = STATS) -> list:
    roof = {r["case"]: r for r in json.load(open(stats_path)).get("roofline", [])}
    out = ["| point | phase | predicted (time / mm) | measured (time / mm) |", "|---|---|---:|---:|"]
    for step, case in STEPS.items():
        pred = roof.get(case)
        path = os.path.join(results_dir, step, "results.json")
        records = json.load(open(path))["records"] if os.path.exists(path) else []
        for mode, key in PHASES:
            p = f"{pred[key]:.2f}" if pred and pred.get(key) is not None else "n/a"
            m = _measured(records, mode)
            out.append(f"| {pred['point'] if pred else case} | {mode} | {p} | {f'{m:.2f}' if m else 'not measured'} |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir")
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    text = "\n".join(["Roofline prediction (benchmarks/kernel_stats.py) beside the measurement (run.py):", ""]
                     + lines(args.results_dir)) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
