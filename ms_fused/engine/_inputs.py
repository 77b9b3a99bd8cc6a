"""Argument checking for every backend: one place, run before any kernel (docs/semantics.md "Bad input")."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch

from .backends import BACKEND_NAMES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto",) + BACKEND_NAMES


@dataclass(frozen=True)
class HyperParams:
    alpha: float = 2.0
    beta: float = 50.0
    base: float = 0.5
    epsilon: float = 0.1
    mining: bool = True
    normalize: bool = True


@dataclass
class Problem:
    """Validated inputs. `ref` / `ref_labels` are None in self mode.

    `ref_self_index` is an int64 (N,) tensor on the embeddings' device: for anchor i the
    column of R that is i's own copy (removed from P_i), or -1. In self mode it is
    arange(N); in reference mode it is the caller's `ref_self_index` or None.
    """

    q: torch.Tensor
    labels: torch.Tensor
    ref: Optional[torch.Tensor]
    ref_labels: Optional[torch.Tensor]
    ref_self_index: Optional[torch.Tensor]
    hp: HyperParams
    ref_normalized: bool = False

    @property
    def self_mode(self) -> bool:
        return self.ref is None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float type is computed in float32 (docs/semantics.md "Similarities")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_hyperparams(alpha, beta, base, epsilon, mining, normalize) -> HyperParams:
    alpha, beta = _real("alpha", alpha), _real("beta", beta)
    base, epsilon = _real("base", base), _real("epsilon", epsilon)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return HyperParams(alpha, beta, base, epsilon, check_flag("mining", mining), check_flag("normalize", normalize))


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_backend_name(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_embedding(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    return x


def check_labels(name: str, y, rows: int, rows_name: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(y).__name__}")
    if y.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got bool")
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(y.shape)}")
    if y.shape[0] != rows:
        raise ValueError(f"{name} must have one entry per row of {rows_name} ({rows}), got {y.shape[0]}")
    return y.to(torch.int64)


MS_PAIRS = ("mines its pairs itself, inside the loss (MultiSimilarityMiner's rule with this loss's epsilon; "
            "mining=False uses every pair), and cannot take")
ALL_PAIRS = "uses every positive and negative pair of the batch, and does not take"


def refuse_indices_tuple(indices_tuple, owner: str, pairs: str = MS_PAIRS) -> None:
    """pml's third positional argument, `indices_tuple` (a miner's output). The MS loss mines its pairs itself,
    inside the fused passes, and the pair-weighting losses use every pair: neither takes given pairs; say so
    (`pairs` says which pairs the loss uses), and catch a reference set passed where pml puts the miner's output."""
    if indices_tuple is None:
        return
    if isinstance(indices_tuple, torch.Tensor):
        raise TypeError(f"{owner}: the third positional argument is indices_tuple, as in pml, and got a tensor; "
                        "pass a reference set by keyword: loss(embeddings, labels, ref_emb=..., ref_labels=...)")
    raise ValueError(f"{owner} {pairs} a miner's indices_tuple: drop the miner and call loss(embeddings, labels)")


def check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but embeddings is on {device}; put every tensor on one device")


def _in_graph(x: torch.Tensor) -> bool:
    """Inside torch.compile's tracing or a CUDA graph's capture, where reading a tensor's value on the host is
    impossible (a graph break, a failed capture)."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_inputs(embeddings, labels, ref_emb, ref_labels, ref_self_index, hp: HyperParams,
                 ref_normalized: bool = False) -> Problem:
    q = check_embedding("embeddings", embeddings)
    if check_flag("ref_normalized", ref_normalized):
        if ref_emb is None:
            raise ValueError("ref_normalized=True needs ref_emb (it says that ref_emb's rows are unit rows)")
        if isinstance(ref_emb, torch.Tensor) and ref_emb.requires_grad:
            raise ValueError("ref_normalized=True needs a constant ref_emb (requires_grad=False), e.g. a memory "
                             "bank's rows; its rows are used without normalisation and get no gradient")
    if (ref_emb is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_emb"
        raise ValueError(f"{missing} must be given together with {'ref_emb' if missing == 'ref_labels' else 'ref_labels'}")
    r = None if ref_emb is None else check_embedding("ref_emb", ref_emb)
    if r is not None and r.shape[1] != q.shape[1]:
        raise ValueError(
            f"ref_emb must have the same dim as embeddings ({q.shape[1]}), got {r.shape[1]}")
    if r is not None and r.dtype != q.dtype:
        raise TypeError(f"ref_emb must have the dtype of embeddings ({q.dtype}), got {r.dtype}")
    if ref_self_index is not None and not isinstance(ref_self_index, torch.Tensor):
        raise TypeError(f"ref_self_index must be a torch.Tensor of integers, got {type(ref_self_index).__name__}")
    if isinstance(labels, torch.Tensor) or isinstance(ref_labels, torch.Tensor):
        check_same_device(q.device, labels=labels, ref_emb=r, ref_labels=ref_labels, ref_self_index=ref_self_index)
    yq = check_labels("labels", labels, q.shape[0], "embeddings")
    yr = None if r is None else check_labels("ref_labels", ref_labels, r.shape[0], "ref_emb")

    if r is None:
        if ref_self_index is not None:
            raise ValueError("ref_self_index is only meaningful with ref_emb (self mode already removes i == j)")
        ref_self_index = torch.arange(q.shape[0], device=q.device)
    elif ref_self_index is not None:
        ref_self_index = check_labels("ref_self_index", ref_self_index, q.shape[0], "embeddings")
        if _in_graph(q):
            # a compiled or captured graph cannot branch on tensor values: it asserts the range instead
            torch._assert_async(((ref_self_index >= -1) & (ref_self_index < r.shape[0])).all(),
                                "ref_self_index must hold row numbers of ref_emb or -1")
            return Problem(q, yq, r, yr, ref_self_index, hp, ref_normalized)
        lo, hi = int(ref_self_index.min()), int(ref_self_index.max())
        if lo < -1 or hi >= r.shape[0]:
            raise ValueError(
                f"ref_self_index must hold row numbers of ref_emb in [0, {r.shape[0]}) or -1, got values in [{lo}, {hi}]")
    return Problem(q, yq, r, yr, ref_self_index, hp, ref_normalized)


def check_finite_inputs(problem: Problem) -> None:
    for name, x in (("embeddings", problem.q), ("ref_emb", problem.ref)):
        if x is None:
            continue
        if _in_graph(x):  # as above: asserted inside the graph, a RuntimeError when it fires
            torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN or Inf (check_finite=True)")
        elif not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")
