"""What the hand-written backwards of the fused backends share: the layout of the statistics their forwards save,
the forward's precision, and one clear error for double backward."""
from __future__ import annotations

import contextlib
import functools

import torch

# The per-anchor statistics a fused backend's forward saves for its backward (docs/semantics.md "Gradient"):
# one (N_STATS, N) tensor in the compute dtype, row k holding statistic k of every anchor (in the backend's
# anchor order). csrc/cpu/row_kernels.h mirrors the row numbers (enum StatRow).
#   MIN_POS  min over P_i of S_ip (+inf when P_i is empty)
#   MAX_NEG  max over N_i of S_in (-inf when N_i is empty)
#   LSE_POS  A_i = log(1 + sum over hard positives of exp(-alpha (S_ip - base)))
#   LSE_NEG  B_i = log(1 + sum over hard negatives of exp(beta (S_in - base)))
# The triton kernels compute in base 2 and store A_i log2(e) and B_i log2(e).
# A bad anchor (its row of S touches a NaN or Inf, docs/semantics.md "Non-finite inputs") has NaN in both
# LSE_POS and LSE_NEG, and only such an anchor has: that is the one "bad row" flag of every fused backend.
# Its loss A_i / alpha + B_i / beta is NaN by itself; its MIN_POS and MAX_NEG are unspecified.
MIN_POS, MAX_NEG, LSE_POS, LSE_NEG = range(4)
N_STATS = 4


def bad_rows(stats: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the anchors that `stats` (the layout above) marks as bad."""
    return stats[LSE_POS].isnan()


def autocast_off(device: torch.device):
    """Autocast switched off for `device`: the loss computes in float32 (float64 for float64) even inside an
    autocast region, whose matmuls would otherwise run in float16/bfloat16 (docs/semantics.md "Similarities")."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def double_backward_error(backend: str) -> NotImplementedError:
    return NotImplementedError(
        f"ms_fused: double backward (create_graph=True, e.g. for a gradient penalty) is not supported by "
        f"backend={backend!r}, whose backward computes a first-order gradient only; use backend='reference', "
        f"whose gradient is differentiable")


def fused_backward(backend: str):
    """Decorator for the backward of `backend`'s autograd formula, which is not itself differentiable.

    It runs with autocast off, as every forward does (`multi_similarity_loss` switches it off), so that
    `loss.backward()` called inside an autocast region computes in the forward's precision. Under
    create_graph=True (the engine then runs backwards with grad mode on) it raises `double_backward_error`
    instead of returning a gradient without the graph the caller asked for.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if torch.is_grad_enabled():
                raise double_backward_error(backend)
            with autocast_off(grads[0].device):
                return backward(ctx, *grads)
        return run
    return decorate
