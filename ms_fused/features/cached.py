"""`cached_backward`: one training step on a batch whose activations do not fit, with the exact gradient.

Gradient caching (Gao et al., 2021): (1) embed the batch chunk by chunk without a graph, (2) compute the
loss of the whole batch on those embeddings and its gradient dL/dE, (3) re-run each chunk with a graph
and back-propagate its rows of dL/dE into the parameters. Memory then follows the chunk, not the batch,
for everything but the N x D embeddings; the loss itself never stores N x N.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
import weakref
from typing import Callable, List, Optional

import torch
from torch import nn

from ..engine._inputs import check_labels
from ..losses.ms_module import MultiSimilarityLoss

_BN_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _batch_size(inputs) -> int:
    """Rows of the batch; raises unless every tensor of `inputs` has the same leading dimension."""
    if isinstance(inputs, torch.Tensor):
        tensors = {"inputs": inputs}
    elif isinstance(inputs, (tuple, list)):
        tensors = {f"inputs[{i}]": t for i, t in enumerate(inputs)}
    elif isinstance(inputs, dict):
        tensors = {f"inputs[{k!r}]": t for k, t in inputs.items()}
    else:
        raise TypeError(f"inputs must be a tensor, or a tuple, list or dict of tensors, got {type(inputs).__name__}")
    if not tensors:
        raise ValueError("inputs must hold at least one tensor")
    rows = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
        rows[name] = t.shape[0]
    if len(set(rows.values())) > 1:
        raise ValueError(f"inputs must share one batch size (leading dimension), got {rows}")
    n = next(iter(rows.values()))
    if n == 0:
        raise ValueError("inputs must hold at least one row")
    return n


def _chunk(inputs, start: int, stop: int):
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {k: t[start:stop] for k, t in inputs.items()}
    return type(inputs)(t[start:stop] for t in inputs)


def _call(model, chunk):
    if isinstance(chunk, dict):
        return model(**chunk)
    if isinstance(chunk, (tuple, list)):
        return model(*chunk)
    return model(chunk)


class _RngState:
    """The CPU generator's state, and every CUDA device's once CUDA is initialised; `capture()` records them
    into storage allocated up front, `restore()` puts them back."""

    def __init__(self):
        self.cpu = torch.empty_like(torch.get_rng_state())
        self.cuda = None

    def capture(self) -> None:
        self.cpu.copy_(torch.get_rng_state())
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _training_batch_norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _warn_batch_norm_once(model: nn.Module, batch_norms, stacklevel: int) -> None:
    if batch_norms and model not in _BN_WARNED:
        _BN_WARNED.add(model)
        warnings.warn("cached_backward: the model has BatchNorm in train mode; it normalises each chunk with that "
                      "chunk's statistics, not the whole batch's, so the gradient is that of chunk-sized BatchNorm "
                      "(use chunk-independent normalisation, or eval-mode BatchNorm, for the full-batch gradient)",
                      UserWarning, stacklevel=stacklevel)


def _check_embeddings(out, rows: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != rows:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return a tensor with one row per input row ({rows}), got {got}")
    return out


def _check_like(out: torch.Tensor, first: torch.Tensor) -> None:
    if out.shape[1:] != first.shape[1:] or out.dtype != first.dtype or out.device != first.device:
        raise ValueError(f"model must return embeddings of one shape, dtype and device for every chunk, got "
                         f"{tuple(out.shape[1:])} {out.dtype} {out.device} after {tuple(first.shape[1:])} "
                         f"{first.dtype} {first.device}")


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


class ChunkedPasses:
    """The two passes of gradient caching over one batch, for `cached_backward` and for losses that split the
    step between a forward and a later `backward()` (`ms_fused.sentence_transformers.CachedMultiSimilarityLoss`).

    `embed()` runs the model chunk by chunk without a graph, recording each chunk's random state, and returns
    the (N, ...) embeddings; `replay(grad)` re-runs each chunk with its recorded random state and a graph and
    back-propagates that chunk's rows of `grad` (dL/dE). See `cached_backward` for what is exact and why.
    Validates `chunk_size` and `inputs` on construction, before any forward.
    """

    def __init__(self, model: Callable, inputs, chunk_size: int, *, stacklevel: int = 1):
        chunk_size = _check_chunk_size(chunk_size)
        self.model, self.inputs = model, inputs
        self.n = _batch_size(inputs)
        self.bounds = [(start, min(start + chunk_size, self.n)) for start in range(0, self.n, chunk_size)]
        self.batch_norms = _training_batch_norms(model) if isinstance(model, nn.Module) else []
        # stacklevel as warnings.warn counts it from the line that constructs this object
        _warn_batch_norm_once(model, self.batch_norms, stacklevel + 2)
        self.states = [_RngState() for _ in self.bounds]

    def embed(self) -> torch.Tensor:
        """First pass: the embeddings of the whole batch, without a graph; BatchNorm running statistics are put
        back to what they were (the second pass updates them)."""
        running_stats = [[b.clone() for b in m.buffers(recurse=False)] for m in self.batch_norms]
        embeddings = None
        with torch.no_grad():
            for (start, stop), state in zip(self.bounds, self.states):
                state.capture()
                out = _check_embeddings(_call(self.model, _chunk(self.inputs, start, stop)), stop - start)
                if embeddings is None:
                    embeddings = out.new_empty((self.n,) + tuple(out.shape[1:]))
                _check_like(out, embeddings)
                embeddings[start:stop] = out
                # nothing of a chunk outlives it: small long-lived blocks between its freed activations would
                # fragment the heap, and the process would grow with the number of chunks
                del out
            for m, saved in zip(self.batch_norms, running_stats):
                for buffer, value in zip(m.buffers(recurse=False), saved):
                    buffer.copy_(value)
        return embeddings

    def replay(self, grad: torch.Tensor) -> None:
        """Second pass: each chunk again, under its recorded random state and with a graph, back-propagating its
        rows of `grad` into the parameters; the random generators end where they were before the call."""
        after = _RngState()
        after.capture()
        no_sync = getattr(self.model, "no_sync", None)
        for i, (start, stop) in enumerate(self.bounds):
            self.states[i].restore()
            last = i == len(self.bounds) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                out = _check_embeddings(_call(self.model, _chunk(self.inputs, start, stop)), stop - start)
                out.backward(grad[start:stop])
                del out
        after.restore()


def cached_backward(model: Callable, inputs, labels: torch.Tensor, *, chunk_size: int,
                    loss_fn: Optional[Callable] = None, **loss_kwargs) -> torch.Tensor:
    """`loss_fn(model(inputs), labels).backward()` computed `chunk_size` rows at a time; returns the detached loss.

    After the call the parameters' `.grad` hold the gradient of the whole batch's loss, accumulated into
    what they held like a normal `.backward()`, while the model's activations are only ever alive for one
    chunk. The model runs twice per chunk: without a graph to get the embeddings E, then, after the loss
    and dL/dE of the whole batch, with a graph to back-propagate its rows of dL/dE. A training step is::

        opt.zero_grad()
        loss = ms_fused.cached_backward(model, images, labels, chunk_size=256)
        opt.step()

    Args:
        model: called as `model(x)` for a tensor, `model(*xs)` for a tuple/list, `model(**xs)` for a dict, on
            row slices of `inputs`; returns a tensor with one row per input row (the embeddings).
        inputs: a tensor, or a tuple/list/dict of tensors, sharing a leading batch dimension N.
        labels: (N,) integer tensor, passed whole to `loss_fn`.
        chunk_size: rows per forward; peak activation memory follows it.
        loss_fn: any `(embeddings, labels) -> scalar tensor` on the whole batch: `MultiSimilarityLoss`,
            `SupConLoss`, `NTXentLoss`, `CircleLoss`,
            `CrossBatchMemory` (called once, so the batch is enqueued once),
            `ms_fused.distributed.multi_similarity_loss` (times the world size under DDP, see its module).
            Default: `MultiSimilarityLoss(**loss_kwargs)`.
        loss_kwargs: options of `multi_similarity_loss` for the default loss only.

    Exactness: each chunk's CPU and CUDA random states are recorded before its first forward and replayed
    for its second, so dropout draws the same masks and the second pass reproduces the first's
    embeddings bit for bit; the generators end where the first pass and the loss left them. Without
    randomness or batch-coupled layers the gradient equals one full-batch `loss.backward()` up to rounding.
    BatchNorm in train mode normalises each chunk with the chunk's own statistics, not the batch's (a
    warning says so, once per model); its running statistics are updated once per chunk, by the second pass.

    Under `torch.autocast` both passes run in the caller's autocast state and the embeddings keep the
    dtype the model gives them. A model with a `no_sync()` context (DistributedDataParallel) runs every
    chunk but the last inside it, so gradients are all-reduced once per step; every rank must call this
    function, and if the model's forward itself communicates (SyncBatchNorm, DDP's buffer broadcast)
    every rank must also run the same number of chunks.

    Raises ValueError (TypeError for wrong types), naming the argument, before any forward: chunk_size < 1,
    inputs with different batch sizes, labels that are not one per row, loss options with a custom loss_fn.
    """
    _check_chunk_size(chunk_size)
    n = _batch_size(inputs)
    check_labels("labels", labels, n, "inputs")
    if loss_fn is None:
        loss_fn = MultiSimilarityLoss(**loss_kwargs)
    elif loss_kwargs:
        raise TypeError(f"loss options {sorted(loss_kwargs)} apply to the default loss only; give them to loss_fn")
    passes = ChunkedPasses(model, inputs, chunk_size, stacklevel=2)

    embeddings = passes.embed()
    embeddings.requires_grad_(True)
    loss = loss_fn(embeddings, labels)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    loss.backward()
    grad = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)
    del embeddings
    passes.replay(grad)
    return loss.detach()

