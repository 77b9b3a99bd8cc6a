"""What the hand-written backwards of the fused backends share: the forward's precision, and one clear error
for double backward."""
from __future__ import annotations

import contextlib
import functools

import torch


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
