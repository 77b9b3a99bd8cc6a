"""The `cpp` backend of the pair-weighting losses: the ops ms_fused::pair_forward / pair_backward (csrc/cpu/
pair_loss_cpu.cpp, each loss one struct of csrc/cpu/pair_rows.cpp), with their autograd formula registered here
(their fake kernels in backend.py, the ops' python module), so that they survive torch.compile."""
from __future__ import annotations

from typing import Optional

import torch

from .._autograd import fused_backward
from .._inputs import Problem
from . import backend as cpp_backend
from ..torch.backend import normalized_inputs

_LOSS_IDS = {"supcon": 0, "ntxent": 1, "circle": 2}  # PairLoss in csrc/cpu/pair_rows.h
_registered = False


def op_params(loss) -> tuple:
    """(loss id, p0, p1) of a losses/pair_losses.py loss, as the ops take them."""
    if loss.name == "circle":
        return _LOSS_IDS["circle"], loss.m, loss.gamma
    return _LOSS_IDS[loss.name], loss.temperature, 0.0


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    reason = cpp_backend.unavailable_reason(device, dtype)
    if reason is None and not hasattr(torch.ops.ms_fused, "pair_forward"):
        return "the loaded C++ extension predates the pair-weighting losses; rebuild it (pip install -e .)"
    return reason


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[1])
    ctx.params = inputs[5:8]


@fused_backward("cpp")
def _backward(ctx, grad_loss, grad_stats, grad_counts):
    q_hat, r_hat, labels, ref_labels, ref_self_index, stats = ctx.saved_tensors
    need_q = ctx.needs_input_grad[0]
    need_r = r_hat is not None and ctx.needs_input_grad[1]
    dq, dr = torch.ops.ms_fused.pair_backward(grad_loss, q_hat, r_hat, labels, ref_labels, ref_self_index, stats,
                                              *ctx.params, need_q, need_r)
    return (dq if need_q else None, dr if need_r else None) + (None,) * 6


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    cpp_backend.register_pair_fakes()  # in backend.py, the ops' python module (csrc/ms_fused_ops.cpp)
    torch.library.register_autograd("ms_fused::pair_forward", _backward, setup_context=_setup_context)


def per_anchor_loss(problem: Problem, loss):
    """(per-anchor losses, (2, N) counts |P_i|, |N_i|) of `loss` (a losses/pair_losses.py loss), as
    engine/torch/pair_engine.py's per_anchor_loss."""
    _register()
    q, r, yr = normalized_inputs(problem)
    ref = None if problem.self_mode else r
    per_anchor, _, counts = torch.ops.ms_fused.pair_forward(
        q, ref, problem.labels, None if problem.self_mode else yr,
        None if problem.self_mode else problem.ref_self_index, *op_params(loss))
    return per_anchor, counts
