"""The roofline prediction beside the measurement: for the target point and the memory-bank point, the
forward and the step as time over one mm, predicted by benchmarks/kernel_stats.py (results/kernel_stats.json:
tensor cores and bytes) and, for the target point, by benchmarks/sass_stats.py (results/sass_stats.json: every
ceiling, per Triton), and measured by run.py on a GPU (gpu_check.sh's results.json files).

    python benchmarks/prediction.py RESULTS_DIR [--out FILE.md]   # RESULTS_DIR holds target/ and memory_bank/
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
STATS = os.path.join(BENCH_DIR, "results", "kernel_stats.json")
SASS_STATS = os.path.join(BENCH_DIR, "results", "sass_stats.json")
# gpu_check.sh's step -> kernel_stats' roofline case
STEPS = {"target": "self mode", "memory_bank": "memory bank"}
SASS_D = {"target": 512}   # gpu_check.sh's step -> the D of sass_stats' roofline at N = 32768 (the goals preset)
PHASES = (("forward", "forward_per_mm"), ("forward_backward", "step_per_mm"))


def _measured(records: list, mode: str) -> Optional[float]:
    """The triton backend's median over the mm's median of the same shape, or None."""
    def median(impl_prefix, want_mode):
        found = [r for r in records if r.get("impl", "").startswith(impl_prefix) and r.get("status") == "ok"
                 and (want_mode is None or r.get("mode") == want_mode)]
        return found[0]["median_ms"] if found else None
    ours, mm = median("ms_fused:triton", mode), median("mm", None)
    return ours / mm if ours and mm else None


def _every_ceiling(sass: list, d: Optional[int], key: str) -> str:
    """sass_stats' prediction with every ceiling at width d, one per Triton it was counted under."""
    found = [r for r in sass if d is not None and r.get("d") == d and r.get(key) is not None]
    return ", ".join(f"{r[key]:.2f} (Triton {r['triton']})" for r in found) or "n/a"


def lines(results_dir: str, stats_path: str = STATS, sass_path: str = SASS_STATS) -> list:
    roof = {r["case"]: r for r in json.load(open(stats_path)).get("roofline", [])}
    sass = json.load(open(sass_path)).get("roofline", []) if os.path.exists(sass_path) else []
    out = ["| point | phase | predicted: tensor and bytes (time / mm) | predicted: every ceiling (time / mm) | "
           "measured (time / mm) |", "|---|---|---:|---:|---:|"]
    for step, case in STEPS.items():
        pred = roof.get(case)
        path = os.path.join(results_dir, step, "results.json")
        records = json.load(open(path))["records"] if os.path.exists(path) else []
        for mode, key in PHASES:
            p = f"{pred[key]:.2f}" if pred and pred.get(key) is not None else "n/a"
            m = _measured(records, mode)
            every = _every_ceiling(sass, SASS_D.get(step), key)
            out.append(f"| {pred['point'] if pred else case} | {mode} | {p} | {every} | "
                       f"{f'{m:.2f}' if m else 'not measured'} |")
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
