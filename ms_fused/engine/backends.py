"""Which backend serves which device: the registry behind `backend=` and `available_backends`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional, Protocol, Union, runtime_checkable

import torch

from ._once import once

if TYPE_CHECKING:
    from ._inputs import Problem

BACKEND_NAMES = ("triton", "cpp", "torch", "reference")
TRITON, CPP, TORCH, REFERENCE = BACKEND_NAMES

_MODULES = dict(zip(BACKEND_NAMES, ("ms_fused.engine.triton.backend", "ms_fused.engine.cpp.backend",
                                    "ms_fused.engine.torch.backend", "ms_fused.losses.ms_reference")))
# fastest first; on the CPU triton only runs under TRITON_INTERPRET=1, slower than anything else
_ORDER = {"cuda": (TRITON, TORCH, REFERENCE), "cpu": (CPP, TORCH, REFERENCE, TRITON)}
_GENERIC_ORDER = (TORCH, REFERENCE)


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides; the registry refuses a module that lacks any of it."""

    def per_anchor_loss(self, problem: Problem, count_pairs: bool = False):
        """(N,) per-anchor losses attached to autograd; with `count_pairs`, `(losses, counts)` where counts
        is the (2, N) integer tensor of each anchor's mined positives (row 0) and negatives (row 1)."""

    def unavailable_reason(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """None when the backend can serve `dtype` tensors (any dtype when None) on `device`, else why not."""


BACKEND_MEMBERS = tuple(name for name in vars(Backend) if not name.startswith("_"))


def check_backend_module(name: str, module) -> None:
    """Raise TypeError naming what `module` lacks of the `Backend` protocol."""
    missing = [member for member in BACKEND_MEMBERS if not callable(getattr(module, member, None))]
    if missing:
        raise TypeError(f"backend {name!r} (module {getattr(module, '__name__', module)!r}) does not provide "
                        f"{', '.join(missing)}, which every backend must (ms_fused.engine.backends.Backend)")


@once
def _module(name: str):
    """The backend's module, or the reason it cannot be imported (str); imported once. A module that does not
    provide the `Backend` protocol raises TypeError."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing optional dependency or an unbuilt extension
        return f"backend {name!r} could not be loaded: {type(exc).__name__}: {exc}"
    check_backend_module(name, module)
    return module


# The answer depends only on constants (name, device, dtype), and finding it may import a module or load the
# C++ extension, which torch.compile cannot trace: it runs this function while tracing and keeps the result
# as a constant (no graph break). The modules it imported are then found in _module's results.
@torch.compiler.assume_constant_result
def unavailable_reason(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when backend `name` can serve tensors of `dtype` on `device`, else why not."""
    mod = _module(name)
    if isinstance(mod, str):
        return mod
    return mod.unavailable_reason(device, dtype)


@torch.compiler.assume_constant_result
def _auto_skip_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why "auto" passes over a backend that could run (a backend module may say so), else None."""
    skip = getattr(_module(name), "auto_skip_reason", None)
    return None if skip is None else skip(device, dtype)


def _device(device: Union[None, str, torch.device]) -> torch.device:
    if device is None:
        return torch.empty(0).device
    return torch.device(device)


def available_backends(device: Union[None, str, torch.device] = None) -> list:
    """The backends usable on `device` (default: torch's default device), fastest first."""
    device = _device(device)
    order = _ORDER.get(device.type, _GENERIC_ORDER)
    return [name for name in order if unavailable_reason(name, device) is None]


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The module that computes the loss; "auto" takes the fastest that serves (device, dtype)."""
    if backend != "auto":
        reason = unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot serve {dtype} tensors on {device}: {reason}")
        return _module(backend)
    for name in _ORDER.get(device.type, _GENERIC_ORDER):
        if unavailable_reason(name, device, dtype) is None and _auto_skip_reason(name, device, dtype) is None:
            return _module(name)
    raise ValueError(f"backend='auto' found no backend for {dtype} tensors on {device}")
