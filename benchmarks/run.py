"""Benchmark sweep: every ms_fused backend against pml, a dense baseline, the per-anchor loop and one GEMM.

    python benchmarks/run.py --quick --json out.json     # < 3 minutes on a 2-core CPU
    python benchmarks/run.py                             # the full sweep of this device
    python benchmarks/run.py --preset goals              # the backends' goals, checked in the report
    python benchmarks/run.py --preset bank               # a cross-batch-memory step (10^5-row memory)
    python benchmarks/run.py --preset supcon             # SupCon against pml's (also ntxent, circle)

Writes results.md, results.json, time.png and memory.png under benchmarks/results/<device>/ (other
presets under .../<device>/<preset>/), or under --out. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

import environment
import impls
import report
import sweep
from measure import OK, SKIPPED, TIMEOUT, Runner

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sweep.PRESET_NAMES, default="full",
                   help="what to run (sweep.PRESETS): the full sweep, the quick one, the goals, the cpp "
                        "self-mode floor (CPU) or the memory-bank step")
    p.add_argument("--quick", action="store_const", dest="preset", const="quick", help="the same as --preset quick "
                   "(CPU: < 3 minutes)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when there is one)")
    p.add_argument("--impls", help="comma-separated, e.g. ms_fused:torch,pml,mm (default: all available)")
    p.add_argument("--n", help="comma-separated batch sizes (default: the preset's)")
    p.add_argument("--d", help="comma-separated embedding sizes")
    p.add_argument("--dtypes", help="comma-separated: float32, bfloat16, float16, float64")
    p.add_argument("--modes", help="forward, forward_backward (default: the preset's, else both)")
    p.add_argument("--memory", type=int, help="time a memory-bank step: each batch of N anchors against a memory "
                                               "of this many unit rows (own copies removed, memory without grad)")
    p.add_argument("--json", help="also write the JSON document here")
    p.add_argument("--out", help="results folder (default benchmarks/results/<device>[/<tag>])")
    p.add_argument("--tag", help="sub-folder of benchmarks/results/<device>/ (default: the preset's name, none "
                                 "for full)")
    p.add_argument("--timeout", type=float, help="seconds one record may take (default: the preset's)")
    p.add_argument("--deadline", type=float, help="seconds after which no record starts; the rest is 'skipped'")
    p.add_argument("--mem-limit-gb", type=float,
                   help="skip records whose estimated peak exceeds this (default: CPU min(8, half the free "
                        "memory), GPU 90%% of its memory)")
    p.add_argument("--loop-max-n", type=int, help="largest N for the per-anchor loop")
    p.add_argument("--target-s", type=float, help="aim for this much timed work per record")
    p.add_argument("--min-repeats", type=int)
    p.add_argument("--max-repeats", type=int)
    p.add_argument("--threads", type=int, help="torch threads in each record's process (default: torch's)")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check against the reference")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _csv(text, cast=str):
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def settings_from(args, device: torch.device) -> dict:
    kind = device.type if device.type == "cuda" else "cpu"
    if (kind, args.preset) not in sweep.PRESETS:
        raise SystemExit(f"run.py: the {args.preset!r} preset has no {kind} sweep (sweep.PRESETS: "
                         f"{', '.join(name for k, name in sweep.PRESETS if k == kind)})")
    preset = dict(sweep.PRESETS[(kind, args.preset)], preset=args.preset)
    for name, value in (("n", args.n and _csv(args.n, int)), ("d", args.d and _csv(args.d, int)),
                        ("dtypes", args.dtypes and _csv(args.dtypes)), ("timeout_s", args.timeout),
                        ("loop_max_n", args.loop_max_n), ("target_s", args.target_s),
                        ("min_repeats", args.min_repeats), ("max_repeats", args.max_repeats),
                        ("modes", args.modes and _csv(args.modes)), ("memory", args.memory),
                        ("impls", args.impls and _csv(args.impls))):
        if value is not None:
            preset[name] = value
    preset.setdefault("modes", list(sweep.MODES))
    preset.setdefault("memory", None)
    preset.setdefault("goals", [])
    preset.setdefault("loss", "ms")
    preset.setdefault("samples_per_class", impls.SAMPLES_PER_CLASS)
    preset.setdefault("impls", impls.all_impls(device))
    if args.mem_limit_gb is not None:
        preset["mem_limit_bytes"] = int(args.mem_limit_gb * 1e9)
    elif device.type == "cuda":
        preset["mem_limit_bytes"] = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    else:
        preset["mem_limit_bytes"] = int(min(8e9, 0.5 * environment.available_ram_bytes()))
    if args.deadline is not None:
        preset["deadline_s"] = args.deadline
    preset.setdefault("deadline_s", None)
    return preset


class Progress:
    """A tqdm bar on a terminal; one line per finished record otherwise (logs, CI, the GPU check)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.i, self.bar = total, enabled, 0, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="rec", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, key) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{key.impl} N={key.n} D={key.d} {key.dtype} {key.mode}")

    def done(self, key, record: dict) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            if record["status"] == OK:
                what = f"{report.fmt(record['median_ms'])} ms, {report.fmt(record['peak_mb'])} MB"
            else:
                what = f"{record['status']}: {record.get('note', '')[:120]}"
            print(f"[{self.i}/{self.total}] {key.impl} N={key.n} D={key.d} {key.dtype} {key.mode}: {what}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pair_defaults(loss: str) -> dict:
    from ms_fused.losses.pair_reference import DEFAULTS

    return DEFAULTS[loss]


def check_agreement(runner: Runner, device: torch.device, names, timeout_s: float, threads=None,
                    loss: str = "ms") -> list:
    """Loss and gradient of each implementation against the float64 reference on one small batch."""
    rows = []
    for impl in names:
        if impls.is_yardstick(impl):
            continue
        dtype = next((t for t in ("float64", "float32")
                      if impls.unavailable_reason(impl, device, impls.DTYPES[t], loss=loss) is None), None)
        if dtype is None:
            continue
        spec = dict(kind="agreement", impl=impl, n=256, d=64, dtype=dtype, device=str(device), seed=1, threads=threads,
                    loss=loss)
        rows.append(dict(impl=impl, n=256, d=64, dtype=dtype, **runner.run(spec, timeout_s)))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        import cpp_ready  # noqa: F401  (first of all: builds the cpp extension if it must be, before any timing)
    settings = settings_from(args, device)
    env = environment.describe(device, args.threads)
    started = time.monotonic()
    deadline = None if settings["deadline_s"] is None else started + settings["deadline_s"]

    preload = ["torch", "impls", "measure", "ms_fused"]
    if "pml" in settings["impls"] and impls.unavailable_reason("pml", device, torch.float32) is None:
        preload += ["pytorch_metric_learning.losses", "pytorch_metric_learning.miners"]
    runner = Runner(reuse=device.type == "cuda", preload=preload, cpp_extension=device.type == "cpu")

    keys = sweep.plan(settings["impls"], settings["n"], settings["d"], settings["dtypes"], settings["modes"])
    guard = sweep.Guard(device=device, mem_limit_bytes=settings["mem_limit_bytes"], timeout_s=settings["timeout_s"],
                        calls_per_record=settings["warmup"] + settings["min_repeats"],
                        loop_max_n=settings["loop_max_n"], deadline=deadline, memory=settings["memory"],
                        loss=settings["loss"], samples_per_class=settings["samples_per_class"])
    agreement = [] if args.no_check else check_agreement(runner, device, settings["impls"], settings["timeout_s"],
                                                        args.threads, settings["loss"])

    command = "python benchmarks/run.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {
        "device": env["device"],
        "device_slug": env["device_slug"],
        "command": command,
        "wall_s": None,
        "complete": False,
        "environment": env["environment"],
        "settings": settings,
        "batches": {"samples_per_class": settings["samples_per_class"],
                    "target_hard_negative_share": impls.TARGET_HARD_NEGATIVES,
                    "hyper_parameters": impls.HYPER_PARAMS if settings["loss"] == "ms" else pair_defaults(settings["loss"]),
                    # what the miner keeps of these batches, per D, measured on the CPU at N = 2048
                    "hard_pair_share_at_2048": {str(d): impls.hard_pair_fractions(*impls.make_batch(
                        2048, d, torch.float64, "cpu", samples_per_class=settings["samples_per_class"]))
                                                for d in settings["d"]}},
        "agreement": agreement,
        "records": [],
    }
    out_dir = args.out or os.path.join(BENCH_DIR, "results", env["device_slug"],
                                       args.tag if args.tag else ("" if args.preset == "full" else args.preset))
    bar = Progress(len(keys), not args.no_progress)
    try:
        for key in keys:
            bar.start(key)
            skip = guard.skip_reason(key)
            if skip is not None:
                result = {"status": skip[0], "median_ms": None, "peak_mb": None, "note": skip[1]}
            else:
                spec = dict(impl=key.impl, n=key.n, d=key.d, dtype=key.dtype, mode=key.mode, device=str(device),
                            warmup=settings["warmup"], target_s=settings["target_s"],
                            min_repeats=settings["min_repeats"], max_repeats=settings["max_repeats"],
                            mem_cap_bytes=int(1.5 * settings["mem_limit_bytes"]), threads=args.threads,
                            memory=settings["memory"], loss=settings["loss"],
                            samples_per_class=settings["samples_per_class"])
                allowed = guard.time_left()
                result = runner.run(spec, allowed)
                if result["status"] == TIMEOUT and allowed < settings["timeout_s"]:
                    result.update(status=SKIPPED, note=f"global deadline reached after {allowed:.0f} s of this record")
            record = {"impl": key.impl, "n": key.n, "d": key.d, "dtype": key.dtype, "mode": key.mode,
                      "median_ms": result.pop("median_ms", None), "peak_mb": result.pop("peak_mb", None),
                      **result, **env["per_record"]}
            guard.record(key, record)
            doc["records"].append(record)
            bar.done(key, record)
            doc["wall_s"] = round(time.monotonic() - started, 1)
            report.save(doc, out_dir, with_plots=False)  # a killed sweep still leaves what it measured
    finally:
        bar.close()
        runner.close()

    doc["complete"] = True
    doc["environment"]["load_after"] = environment.load_average()
    paths = report.save(doc, out_dir, with_plots=not args.no_plots)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        paths.append(args.json)
    print(report.markdown(doc))
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0 if all(r["status"] == OK for r in agreement) else 1


if __name__ == "__main__":
    sys.exit(main())
