"""Time and peak memory of one record, measured in a child process that the sweep can time out or lose.

On the CPU every record runs in a fresh child (forked from a server that has already imported torch, so
a child costs milliseconds, not an import): its resident-set growth is that record's alone, and a
record that runs out of memory or time takes down nothing but its child. On CUDA one child serves
records until it fails (a CUDA context costs seconds); the peak is `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import gc
import importlib
import math
import multiprocessing
import os
import resource
import statistics
import time
import traceback
from typing import Optional

import torch

import impls
from rss import measured_call, status_kb

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

OK, OOM, TIMEOUT, ERROR, KILLED, SKIPPED, UNAVAILABLE = (
    "ok", "oom", "timeout", "error", "killed", "skipped", "unavailable")


def failure(status: str, note: str) -> dict:
    """A record that did not run to the end: its status and why."""
    return {"status": status, "note": note}


# a warm-up at this size first loads lazily-initialised code (kernels, extensions, JIT) outside the measurement
SMALL_N = 256


# ---------------------------------------------------------------------------------------------
# in the child


def _cap_cpu_memory(limit_bytes: int) -> None:
    """Backstop: make allocations beyond the limit fail with an error instead of summoning the OOM killer."""
    data_kb = status_kb("VmData")
    if data_kb is None or limit_bytes <= 0:
        return
    cap = data_kb * 1024 + limit_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def time_summary(times, unit: str = "ms") -> dict:
    """The median of the timed calls and their spread, the 20th and 80th percentiles (keys median_<unit>, ...)."""
    return {f"median_{unit}": statistics.median(times), f"p20_{unit}": percentile(times, 20),
            f"p80_{unit}": percentile(times, 80)}


def step(fn, x, y, bank, mode: str, yardstick: bool):
    """One call as a training step makes it: forward only, or forward then backward into x.grad."""
    if yardstick:
        return fn(x, y, bank)
    out = fn(x, y, bank)
    if mode == "forward_backward":
        out.backward()
    return out


def _timed_step(fn, x, y, bank, mode, yardstick, device) -> float:
    """Milliseconds of one step (CUDA events on the GPU, a synchronised wall clock on the CPU)."""
    if not yardstick:
        x.grad = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step(fn, x, y, bank, mode, yardstick)
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = step(fn, x, y, bank, mode, yardstick)
    ms = (time.perf_counter() - t0) * 1e3
    del out
    return ms


def _inputs(spec: dict, n: int, device: torch.device, yardstick: bool, m: Optional[int] = None):
    """(x, y, bank): a P x K batch, and with spec["memory"] a memory bank (memory, labels, ref_self_index) of `m` rows
    (default spec["memory"]) without grad."""
    dtype = impls.DTYPES[spec["dtype"]]
    if spec.get("memory"):
        x, y, memory, memory_labels, ref_self_index = impls.make_memory_bank(
            n, m or spec["memory"], spec["d"], dtype, device, seed=spec.get("seed", 0))
        return x.requires_grad_(not yardstick), y, (memory, memory_labels, ref_self_index)
    x, y = impls.make_batch(n, spec["d"], dtype, device, seed=spec.get("seed", 0),
                            samples_per_class=spec.get("samples_per_class", impls.SAMPLES_PER_CLASS))
    return x.requires_grad_(not yardstick), y, None


def measure(spec: dict) -> dict:
    """Warm up, then the median of repeats; peak memory of one step above what the inputs hold."""
    device = torch.device(spec["device"])
    impl, mode, n = spec["impl"], spec["mode"], spec["n"]
    yardstick = impls.is_yardstick(impl)
    fn = impls.build(impl, spec.get("loss", "ms"))
    if device.type == "cpu" and spec.get("mem_cap_bytes"):
        _cap_cpu_memory(spec["mem_cap_bytes"])

    small = min(n, SMALL_N)
    xs, ys, bank_s = _inputs(spec, small, device, yardstick, m=spec.get("memory") and SMALL_N)
    _timed_step(fn, xs, ys, bank_s, mode, yardstick, device)
    del xs, ys, bank_s
    x, y, bank = _inputs(spec, n, device, yardstick)
    gc.collect()

    peak_mb = None
    if device.type == "cuda":
        # GPU: the caching allocator makes the steady state the honest peak, so measure the timed repeats
        warmup_ms = [_timed_step(fn, x, y, bank, mode, yardstick, device) for _ in range(spec.get("warmup", 2))]
        x.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        # CPU: the first call at this size takes all its memory from the OS, so its RSS growth is the peak
        call = measured_call(lambda: _timed_step(fn, x, y, bank, mode, yardstick, device))
        warmup_ms = [call.result]
        if call.reset_ok and call.growth_bytes is not None:
            peak_mb = call.growth_bytes / 2**20
        warmup_ms += [_timed_step(fn, x, y, bank, mode, yardstick, device) for _ in range(spec.get("warmup", 1) - 1)]

    per_call = max(warmup_ms[-1], 1e-3)
    repeats = int(min(spec["max_repeats"], max(spec["min_repeats"], math.ceil(spec["target_s"] * 1e3 / per_call))))
    times = [_timed_step(fn, x, y, bank, mode, yardstick, device) for _ in range(repeats)]
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"status": OK, **time_summary(times), "peak_mb": peak_mb, "repeats": repeats,
            "warmup_ms": warmup_ms, "times_ms": times}


def agreement(spec: dict) -> dict:
    """Relative error of loss and gradient against ms_fused's dense `reference` of spec["loss"] in float64 (a
    sanity check)."""
    import ms_fused

    device = torch.device(spec["device"])
    dtype = impls.DTYPES[spec["dtype"]]
    x0, y = impls.make_batch(spec["n"], spec["d"], torch.float64, device, seed=spec.get("seed", 1))
    ref_x = x0.clone().requires_grad_()
    loss = spec.get("loss", "ms")
    if loss == "ms":
        ref = ms_fused.multi_similarity_loss(ref_x, y, backend="reference", **impls.HYPER_PARAMS)
    else:
        from ms_fused.losses.pair_api import pair_weighting_loss

        ref = pair_weighting_loss(loss, ref_x, y, backend="reference")
    ref.backward()
    x = x0.to(dtype).requires_grad_()
    out = impls.build(spec["impl"], loss)(x, y)
    out.backward()

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())

    return {"status": OK, "loss": out.item(), "reference": ref.item(), "loss_rel_err": rel(out, ref),
            "grad_rel_err": rel(x.grad, ref_x.grad)}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def exception_record(exc: BaseException) -> dict:
    """What a record that raised reports: oom or error, the message's first line, for an error the trace's end."""
    status = OOM if _is_oom(exc) else ERROR
    note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    if status == ERROR:
        note += " | " + traceback.format_exc(limit=-2).strip().replace("\n", " / ")[-500:]
    return failure(status, note)


def run_in_child(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        return agreement(spec) if spec.get("kind") == "agreement" else measure(spec)
    except BaseException as exc:  # recorded, never raised: the sweep goes on
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        return exception_record(exc)


def serve(conn, job) -> None:
    """Child main loop: a spec in, job(spec) out, until the parent sends None or goes away."""
    if isinstance(job, str):
        module, name = job.split(":")
        job = getattr(importlib.import_module(module), name)
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        conn.send(job(spec))


# ---------------------------------------------------------------------------------------------
# in the parent


class Runner:
    """Runs job(spec) in child processes with a time-out; a fresh child per record unless `reuse`.

    `job` is a module-level function, or "module:function" for one in a script run as __main__ (the child
    imports it by that name); it returns a dict with a "status" and never raises. A child that dies or
    times out is recorded as oom / killed / timeout (`failure`).

    `cpp_extension`: build (when it must be) and load the `cpp` backend's extension now, in this process, and
    in the server that forks the children (cpp_ready), so that no record builds or loads it in its time-out.
    `cpp_state` then says whether it is available."""

    def __init__(self, reuse: bool, preload=("torch", "impls", "measure"), job=run_in_child,
                 cpp_extension: bool = False):
        self.reuse, self.job = reuse, job
        self.cpp_state = None
        if cpp_extension:
            import cpp_ready

            self.cpp_state = cpp_ready.STATE
            preload = [*preload, "cpp_ready"]
        # the server imports `preload` with the sys.path of a fresh interpreter, not this one's (Python 3.11's
        # forkserver.main ignores the sys_path it is handed): the benchmark modules reach it through PYTHONPATH
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if BENCH_DIR not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([BENCH_DIR] + paths)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(list(preload))
        self.proc = None
        self.conn = None

    def _start(self):
        parent_end, child_end = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=serve, args=(child_end, self.job), daemon=True)
        self.proc.start()
        child_end.close()
        self.conn = parent_end

    def _stop(self, kill: bool):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def run(self, spec: dict, timeout_s: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._stop(kill=True)
            self._start()
        started = time.monotonic()
        try:
            self.conn.send(spec)
            if not self.conn.poll(max(timeout_s, 0.1)):
                self._stop(kill=True)
                return failure(TIMEOUT, f"no result within {timeout_s:.0f} s")
            result = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.join(5)
            code = self.proc.exitcode
            self._stop(kill=True)
            # SIGKILL that we did not send: on Linux almost always the kernel's OOM killer
            return failure(OOM if code == -9 else KILLED, f"child process died (exit code {code})")
        result["wall_s"] = round(time.monotonic() - started, 3)
        if not self.reuse or result["status"] != OK:
            # after a failure the CUDA context may be unusable: start the next record in a new child
            self._stop(kill=False)
        return result

    def close(self):
        self._stop(kill=False)
