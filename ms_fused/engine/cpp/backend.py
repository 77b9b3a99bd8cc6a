"""The `cpp` backend: the fused CPU kernel of csrc/, called through the torch ops ms_fused::ms_forward/ms_backward.

The ops come from the compiled extension `ms_fused._C` (built by setup.py). When it is missing, one JIT build
of the C++ sources is tried (torch.utils.cpp_extension.load; ms_fused/_csrc in an installed package, csrc/ in a
source checkout; it says on stderr that it compiles, and a lock left by an interrupted build is cleared, not
waited on: _jit_lock); when that fails too, the backend reports why, and
backend="auto" falls back to `torch` after a single warning that says how to build it. MS_FUSED_NO_CPP=1
switches the backend off (no import, no JIT build).

This module also registers what torch needs besides the CPU kernels: fake (meta) kernels, so that
torch.compile traces the ops without running them, and the autograd formula (the backward op).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .._autograd import N_STATS, fused_backward
from .._inputs import Problem
from .._jit_lock import guarded_build
from .._once import once
from ..torch.backend import normalized_inputs

N_PAIR_STATS = 2  # rows of the pair-weighting ops' statistics (kPairStats in csrc/cpu/pair_rows.h)

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler)"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ms_fused/, from engine/cpp/
# installed: shipped inside the package; source checkout: next to it
_CSRC = next((d for d in (os.path.join(_PACKAGE, "_csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc"))
              if os.path.isfile(os.path.join(d, "build_flags.py"))), os.path.join(_PACKAGE, "_csrc"))

_registered = False


def _jit_build() -> Optional[str]:
    """Compile the C++ sources with torch.utils.cpp_extension.load (cached by torch across processes), one
    process at a time, saying so when it compiles, past the lock of an interrupted build (_jit_lock); returns
    build_flags' note (the row passes will run on one thread: why, and how to get OpenMP), or None."""
    import glob
    import importlib.util

    from torch.utils.cpp_extension import _get_build_directory, load

    spec = importlib.util.spec_from_file_location("ms_fused_build_flags", os.path.join(_CSRC, "build_flags.py"))
    if spec is None or not os.path.isdir(_CSRC):
        raise FileNotFoundError(f"no C++ sources at {_CSRC}")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    cflags, ldflags, note = flags.extension_flags()
    name = "ms_fused_C"
    build_dir = _get_build_directory(name, False)
    inputs = [p for pattern in ("*.py", "*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h")
              for p in glob.glob(os.path.join(_CSRC, pattern))]
    guarded_build(build_dir, os.path.join(build_dir, f"{name}.so"), inputs,
                  lambda: load(name=name, sources=flags.sources(_CSRC), extra_cflags=cflags, extra_ldflags=ldflags,
                               build_directory=build_dir))
    return note


def _last_line(exc: Exception) -> str:
    """A compiler's error output is long; its last line says what failed."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else ""


@once
def _load() -> Optional[str]:
    """Make the ops available once per process; None when they are, else the reason (warned about once).

    Other threads wait until the extension is imported and its fake kernels and autograd formula are
    registered: an op called before that would run without its backward."""
    reason = note = None
    if os.environ.get("MS_FUSED_NO_CPP") == "1":
        reason = "the C++ extension is switched off by MS_FUSED_NO_CPP=1"
    else:
        try:
            from ... import _C  # noqa: F401  (loading it registers the ops)
        except ImportError as exc:
            try:
                note = _jit_build()
            except Exception as jit_exc:  # no compiler, no sources, a failed compile: fall back, never crash
                reason = (f"the C++ extension is not built ({exc}) and building it now failed "
                          f"({type(jit_exc).__name__}: {_last_line(jit_exc)})")
    if reason is None:
        _register_fake_and_autograd()
        _warn_if_one_thread(note)
    else:
        warnings.warn(f"ms_fused: {reason}; CPU tensors use the slower `torch` backend instead; {BUILD_HINT}.",
                      RuntimeWarning, stacklevel=3)
    return reason


def _warn_if_one_thread(note: Optional[str]) -> None:
    """One warning when torch runs on OpenMP and the extension was built without it (its row passes then take
    one thread); `note` is the JIT build's, None for a prebuilt ms_fused._C (setup.py printed its own then)."""
    ops = torch.ops.ms_fused
    if torch.backends.openmp.is_available() and hasattr(ops, "built_with_openmp") and not ops.built_with_openmp():
        note = note or ("the C++ extension ms_fused._C was built without OpenMP (the C++ compiler could not build "
                        "it), so its row passes run on one thread; to get OpenMP, install the compiler's OpenMP "
                        "runtime (clang: libomp, e.g. `apt-get install libomp-dev` or `brew install libomp`) and "
                        "rebuild with `pip install --no-build-isolation .`")
        warnings.warn(f"ms_fused: {note}.", RuntimeWarning, stacklevel=4)


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the C++ kernel can serve `device` (every float dtype; half types are computed in float32)."""
    if device.type != "cpu":
        return f"the cpp backend runs on the CPU only, not on {device.type}"
    return _load()


def cpu_capability() -> Optional[str]:
    """The instruction-set variant the C++ row passes run: "avx512", "avx2" or "default" (the widest the CPU
    supports, or a narrower one named by ATEN_CPU_CAPABILITY); None when the extension is unavailable."""
    return None if _load() is not None else torch.ops.ms_fused.cpu_capability()


def per_anchor_loss(problem: Problem, count_pairs: bool = False):
    """(N,) per-anchor losses; with `count_pairs` also the (2, N) mined positives and negatives per anchor
    (the kernel always counts them, in its forward row pass)."""
    q, r, yr = normalized_inputs(problem)
    hp = problem.hp
    ref = None if problem.self_mode else r
    ref_labels = None if problem.self_mode else yr
    ref_self_index = None if problem.self_mode else problem.ref_self_index
    # Reference mode, a gradient for the anchors only (a memory bank): the forward, which holds each block of
    # similarities anyway, also computes the anchors' gradient for grad = 1, and the backward only scales it
    # (no second product of the similarities). With a gradient for R too the backward recomputes them.
    unit_q_grad = (ref is not None and torch.is_grad_enabled() and q.requires_grad and not ref.requires_grad)
    loss, _, counts, _ = torch.ops.ms_fused.ms_forward(q, ref, problem.labels, ref_labels, ref_self_index,
                                                       hp.alpha, hp.beta, hp.base, hp.epsilon, hp.mining,
                                                       unit_q_grad)
    return (loss, counts) if count_pairs else loss


def _ms_forward_fake(q_hat, r_hat, labels, ref_labels, ref_self_index, alpha, beta, base, epsilon, mining,
                     unit_q_grad=False):
    n = q_hat.shape[0]
    unit_grad = q_hat.new_empty(q_hat.shape) if unit_q_grad and r_hat is not None else q_hat.new_empty(0)
    return q_hat.new_empty(n), q_hat.new_empty(N_STATS, n), q_hat.new_empty(2, n, dtype=torch.int64), unit_grad


def _ms_backward_fake(grad, q_hat, r_hat, labels, ref_labels, ref_self_index, stats, alpha, beta, base, epsilon,
                      mining, need_q, need_r):
    dq = q_hat.new_empty(q_hat.shape) if need_q else q_hat.new_empty(0)
    dr = r_hat.new_empty(r_hat.shape) if need_r and r_hat is not None else q_hat.new_empty(0)
    return dq, dr


def _pair_forward_fake(q_hat, r_hat, labels, ref_labels, ref_self_index, loss, p0, p1):
    n = q_hat.shape[0]
    return q_hat.new_empty(n), q_hat.new_empty(N_PAIR_STATS, n), q_hat.new_empty(2, n, dtype=torch.int64)


def _pair_backward_fake(grad, q_hat, r_hat, labels, ref_labels, ref_self_index, stats, loss, p0, p1, need_q, need_r):
    return _ms_backward_fake(grad, q_hat, r_hat, labels, ref_labels, ref_self_index, stats, None, None, None, None,
                             None, need_q, need_r)


_pair_fakes = False


def register_pair_fakes() -> None:
    """The fake kernels of the pair-weighting ops (pair_engine.py registers their autograd); once."""
    global _pair_fakes
    if not _pair_fakes:
        _pair_fakes = True
        torch.library.register_fake("ms_fused::pair_forward", _pair_forward_fake)
        torch.library.register_fake("ms_fused::pair_backward", _pair_backward_fake)


def _setup_context(ctx, inputs, output):
    q_hat, r_hat, labels, ref_labels, ref_self_index, alpha, beta, base, epsilon, mining = inputs[:10]
    ctx.save_for_backward(q_hat, r_hat, labels, ref_labels, ref_self_index, output[1], output[3])
    ctx.hyper = (alpha, beta, base, epsilon, mining)


@fused_backward("cpp")
def _backward(ctx, grad_loss, grad_stats, grad_counts, grad_unit):
    q_hat, r_hat, labels, ref_labels, ref_self_index, stats, unit_grad = ctx.saved_tensors
    need_q = ctx.needs_input_grad[0]
    need_r = r_hat is not None and ctx.needs_input_grad[1]
    dq = dr = None
    if need_q and unit_grad.numel() > 0:  # the forward's dL/dq_hat for grad = 1, row i scaled by grad_i
        dq = unit_grad * grad_loss.to(unit_grad.dtype).unsqueeze(1)
    if need_r or (need_q and dq is None):
        dq_op, dr = torch.ops.ms_fused.ms_backward(grad_loss, q_hat, r_hat, labels, ref_labels, ref_self_index,
                                                   stats, *ctx.hyper, need_q and dq is None, need_r)
        dq = dq_op if dq is None else dq
    return (dq if need_q else None, dr if need_r else None) + (None,) * 9


def _register_fake_and_autograd() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    torch.library.register_fake("ms_fused::ms_forward", _ms_forward_fake)
    torch.library.register_fake("ms_fused::ms_backward", _ms_backward_fake)
    torch.library.register_autograd("ms_fused::ms_forward", _backward, setup_context=_setup_context)
