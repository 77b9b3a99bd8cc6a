"""Which backend serves which device: the registry behind `backend=` and `available_backends`."""
from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from ._once import once

_MODULES = {
    "triton": "ms_fused.triton_backend",
    "cpp": "ms_fused.cpp_backend",
    "torch": "ms_fused.torch_backend",
    "reference": "ms_fused.reference",
}
# fastest first; on the CPU triton only runs under TRITON_INTERPRET=1, slower than anything else
_ORDER = {"cuda": ("triton", "torch", "reference"), "cpu": ("cpp", "torch", "reference", "triton")}
_GENERIC_ORDER = ("torch", "reference")


@once
def _module(name: str):
    """The backend's module, or the reason it cannot be imported (str); imported once."""
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing optional dependency or an unbuilt extension
        return f"backend {name!r} could not be loaded: {type(exc).__name__}: {exc}"


# The answer depends only on constants (name, device, dtype), and finding it may import a module or load the
# C++ extension, which torch.compile cannot trace: it runs this function while tracing and keeps the result
# as a constant (no graph break). The modules it imported are then found in _module's results.
@torch.compiler.assume_constant_result
def unavailable_reason(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when backend `name` can serve tensors of `dtype` on `device`, else why not."""
    mod = _module(name)
    if isinstance(mod, str):
        return mod
    check = getattr(mod, "unavailable_reason", None)
    return None if check is None else check(device, dtype)


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
        if unavailable_reason(name, device, dtype) is None:
            return _module(name)
    raise ValueError(f"backend='auto' found no backend for {dtype} tensors on {device}")
