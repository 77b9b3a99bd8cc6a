"""What a sweep runs, in what order, and which records it skips before they can hurt the machine."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import impls
from measure import OK, OOM, SKIPPED, TIMEOUT, UNAVAILABLE

MODES = ("forward", "forward_backward")


@dataclass(frozen=True)
class Goal:
    """A target one record must meet: `metric` of `impl` at batch size `n` in `mode` (and embedding size
    `d` and dtype `dtype`; None: every D, every dtype the preset runs).

    `metric` is a ratio of report.ratios() (speed-up and memory vs pml: at least `bound`; time per mm: at
    most `bound`) or "completes" (the record ran, no bound)."""

    impl: str
    metric: str
    n: int
    bound: Optional[float] = None
    mode: str = "forward_backward"
    d: Optional[int] = None
    dtype: Optional[str] = None


def _goals(impl: str, metric: str, bound: Optional[float], ns, mode: str = "forward_backward",
           d: Optional[int] = None, dtype: Optional[str] = None) -> List[dict]:
    return [asdict(Goal(impl, metric, n, bound, mode, d, dtype)) for n in ns]


# Every sweep the CLI runs, by (device, preset). A preset fixes N, D, dtypes and measurement settings; it
# may also fix the implementations, the modes, a memory bank and the goals its report checks.
PRESETS = {
    # quick on the CPU: a global deadline keeps it under 3 minutes even on a busy machine
    ("cpu", "quick"): dict(n=[512, 1024, 2048], d=[128], dtypes=["float32"], loop_max_n=512,
                           timeout_s=30, target_s=0.25, min_repeats=3, max_repeats=10, warmup=1, deadline_s=150),
    ("cpu", "full"): dict(n=[512, 1024, 2048, 4096, 8192, 16384, 32768], d=[128, 512], dtypes=["float32"],
                          loop_max_n=1024, timeout_s=150, target_s=1.0, min_repeats=3, max_repeats=20, warmup=1,
                          deadline_s=2400),
    # the CPU backends' goals, side by side with pml and one mm; the large N only show that a step completes
    ("cpu", "goals"): dict(n=[2048, 4096, 32768, 65536], d=[128], dtypes=["float32"], modes=["forward_backward"],
                           impls=["ms_fused:cpp", "ms_fused:torch", "pml", "mm"], loop_max_n=0, timeout_s=300,
                           target_s=2.0, min_repeats=3, max_repeats=21, warmup=2, deadline_s=1500,
                           goals=_goals("ms_fused:cpp", "speedup_vs_pml", 10, (2048, 4096))
                           + _goals("ms_fused:cpp", "time_per_mm", 6, (2048, 4096))
                           + _goals("ms_fused:cpp", "memory_vs_pml", 10, (2048, 4096))
                           + _goals("ms_fused:cpp", "completes", None, (65536,))
                           + _goals("ms_fused:torch", "speedup_vs_pml", 2, (4096,))
                           + _goals("ms_fused:torch", "memory_vs_pml", 10, (4096,))
                           + _goals("ms_fused:torch", "completes", None, (32768,))),
    # the cpp self-mode kernels against their floor (half a product for S, at most one for (G + G^T) X):
    # forward and step in units of one mm at D = 128 and 512
    ("cpu", "floor"): dict(n=[8192], d=[128, 512], dtypes=["float32"], impls=["ms_fused:cpp", "mm"], loop_max_n=0,
                           timeout_s=300, target_s=3.0, min_repeats=5, max_repeats=15, warmup=2, deadline_s=1200,
                           goals=_goals("ms_fused:cpp", "time_per_mm", 0.6, (8192,), "forward", 512)
                           + _goals("ms_fused:cpp", "time_per_mm", 0.45, (8192,), "forward", 128)
                           + _goals("ms_fused:cpp", "time_per_mm", 2.1, (8192,), "forward_backward", 512)
                           + _goals("ms_fused:cpp", "time_per_mm", 1.4, (8192,), "forward_backward", 128)),
    # a cross-batch-memory step: N anchors against a 10^5-row memory of unit rows, as CrossBatchMemory holds it
    # (the cpp step: one product of S, then G R over the mined pairs)
    ("cpu", "bank"): dict(n=[256, 1024], d=[128], dtypes=["float32", "bfloat16"], modes=["forward_backward"],
                          memory=100_000, impls=["ms_fused:cpp", "ms_fused:torch", "pml", "mm"], loop_max_n=0,
                          timeout_s=300, target_s=1.0, min_repeats=3, max_repeats=10, warmup=1, deadline_s=1500,
                          goals=_goals("ms_fused:cpp", "time_per_mm", 2.2, (256,), dtype="float32")),
    ("cuda", "quick"): dict(n=[1024, 4096, 16384], d=[128, 512], dtypes=["float32", "bfloat16"], loop_max_n=1024,
                            timeout_s=60, target_s=0.2, min_repeats=5, max_repeats=20, warmup=2),
    ("cuda", "full"): dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], d=[128, 512],
                           dtypes=["float32", "bfloat16", "float16"], loop_max_n=4096,
                           timeout_s=120, target_s=0.5, min_repeats=5, max_repeats=50, warmup=2),
    # the Triton kernels' goals at the target point
    ("cuda", "goals"): dict(n=[32768], d=[512], dtypes=["bfloat16"], impls=["ms_fused:triton", "pml", "mm"],
                            loop_max_n=0, timeout_s=60, target_s=0.2, min_repeats=3, max_repeats=10, warmup=2,
                            goals=_goals("ms_fused:triton", "time_per_mm", 3.5, (32768,))
                            + _goals("ms_fused:triton", "time_per_mm", 1.3, (32768,), mode="forward")
                            + _goals("ms_fused:triton", "speedup_vs_pml", 30, (32768,))),
    ("cuda", "bank"): dict(n=[256], d=[128], dtypes=["bfloat16"], memory=100_000,
                           impls=["ms_fused:triton", "pml", "mm"], loop_max_n=0, timeout_s=60, target_s=0.2,
                           min_repeats=3, max_repeats=10, warmup=2,
                           goals=_goals("ms_fused:triton", "time_per_mm", 4, (256,))),
}
# the pair-weighting losses against pml's (its defaults), on the backends that serve them, with #30's goals for cpp:
# 10x pml's speed and memory at N = 4096 (NT-Xent: pml's (positive pairs x negative pairs) matrix stops it at a
# few hundred rows, so at N = 512), a step of at most 2.5 mm at N = 8192, and N = 65536 completed (the others
# are skipped there: estimated over the time-out, or over the memory limit)
for _loss in impls.PAIR_LOSSES:
    _vs_pml_n = (512,) if _loss == "ntxent" else (4096,)
    PRESETS[("cpu", _loss)] = dict(loss=_loss, n=[256, 512, 1024, 2048, 4096, 8192, 65536], d=[128],
                                   dtypes=["float32"], modes=["forward_backward"],
                                   impls=["ms_fused:cpp", "ms_fused:torch", "pml", "mm"],
                                   loop_max_n=0, timeout_s=240, target_s=1.0, min_repeats=3, max_repeats=10,
                                   warmup=1, deadline_s=1200,
                                   goals=_goals("ms_fused:cpp", "speedup_vs_pml", 10, _vs_pml_n)
                                   + _goals("ms_fused:cpp", "memory_vs_pml", 10, _vs_pml_n)
                                   + _goals("ms_fused:cpp", "time_per_mm", 2.5, (8192,))
                                   + _goals("ms_fused:cpp", "completes", None, (65536,)))
    PRESETS[("cuda", _loss)] = dict(loss=_loss, n=[1024, 4096, 16384, 32768], d=[128], dtypes=["float32"],
                                    modes=["forward_backward"],
                                    impls=["ms_fused:triton", "ms_fused:torch", "pml", "mm"], loop_max_n=0,
                                    timeout_s=60, target_s=0.2, min_repeats=3, max_repeats=10, warmup=2)
# NT-Xent as SimCLR trains it: two views of each image (two rows per class), where pml's matrix of positive x
# negative pairs stops it at a few hundred rows
PRESETS[("cpu", "ntxent_views")] = dict(loss="ntxent", samples_per_class=2, n=[256, 512, 1024, 2048, 4096, 8192],
                                        d=[128], dtypes=["float32"], modes=["forward_backward"],
                                        impls=["ms_fused:cpp", "ms_fused:torch", "pml", "mm"], loop_max_n=0,
                                        timeout_s=120, target_s=1.0, min_repeats=3, max_repeats=10, warmup=1,
                                        deadline_s=900,
                                        goals=_goals("ms_fused:cpp", "speedup_vs_pml", 10, (512,))
                                        + _goals("ms_fused:cpp", "memory_vs_pml", 10, (512,))
                                        + _goals("ms_fused:cpp", "completes", None, (8192,)))
PRESET_NAMES = tuple(dict.fromkeys(name for _, name in PRESETS))  # quick, full, goals, floor, bank
# no record starts with less than this before the global deadline
MIN_RECORD_S = 5.0


@dataclass(frozen=True)
class Key:
    impl: str
    n: int
    d: int
    dtype: str
    mode: str

    def series(self) -> Tuple[str, int, str, str]:
        return self.impl, self.d, self.dtype, self.mode


def plan(impl_names: Sequence[str], ns, ds, dtypes, modes) -> List[Key]:
    """N outermost and ascending: a deadline cuts the largest N of every implementation, not whole ones."""
    return [Key(i, n, d, t, m) for n, d, t, m, i in itertools.product(sorted(ns), ds, dtypes, modes, impl_names)]


@dataclass
class Guard:
    """Decides, before a record runs, whether it must be skipped, from the limits and earlier records."""

    device: torch.device
    mem_limit_bytes: int
    timeout_s: float
    calls_per_record: int
    loop_max_n: int
    deadline: Optional[float] = None  # time.monotonic() after which nothing more starts
    memory: Optional[int] = None      # rows of the memory bank in a memory-bank sweep
    loss: str = "ms"                  # or one of impls.PAIR_LOSSES
    samples_per_class: int = impls.SAMPLES_PER_CLASS
    done: Dict[Tuple, List[Tuple[int, dict]]] = field(default_factory=dict)

    def skip_reason(self, key: Key) -> Optional[Tuple[str, str]]:
        """(status, note) for a record that must not run, else None."""
        reason = impls.unavailable_reason(key.impl, self.device, impls.DTYPES[key.dtype], self.memory, self.loss)
        if reason is not None:
            return UNAVAILABLE, reason
        if self.deadline is not None and self.deadline - time.monotonic() < MIN_RECORD_S:
            return SKIPPED, "global deadline reached"
        if key.impl == "loop" and key.n > self.loop_max_n:
            return SKIPPED, f"loop only runs up to N = {self.loop_max_n}"
        history = self.done.get(key.series(), [])
        for n, rec in history:
            if rec["status"] in (OOM, TIMEOUT, "killed") and n < key.n:
                return SKIPPED, f"N = {n} already ended in {rec['status']}"
        est = impls.estimated_peak_bytes(key.impl, key.n, key.d, impls.DTYPES[key.dtype], self.memory, self.loss,
                                         self.samples_per_class)
        if est > self.mem_limit_bytes:
            return SKIPPED, f"est. peak {est / 1e9:.1f} GB > limit {self.mem_limit_bytes / 1e9:.1f} GB"
        ok = [(n, rec["median_ms"]) for n, rec in history if rec["status"] == OK and n < key.n]
        if ok:
            n0, ms0 = max(ok)
            # all implementations here do O(N^2) work (O(N M) against a memory bank); the extrapolation
            # ignores the (faster) small-N regime
            est_s = ms0 / 1e3 * (key.n / n0) ** (1 if self.memory else 2) * self.calls_per_record
            left = self.time_left()
            if est_s > left:
                # "est." only when the record time-out is the limit; near the deadline it is the deadline's doing
                why = "est." if left >= self.timeout_s else "global deadline: est."
                return SKIPPED, f"{why} {est_s:.0f} s for {self.calls_per_record} calls > {left:.0f} s allowed"
        return None

    def time_left(self) -> float:
        if self.deadline is None:
            return self.timeout_s
        return max(0.0, min(self.timeout_s, self.deadline - time.monotonic()))

    def record(self, key: Key, rec: dict) -> None:
        self.done.setdefault(key.series(), []).append((key.n, rec))
