"""`CrossBatchMemory`: the loss of each batch against a FIFO memory of past embeddings (XBM, Wang et al. 2020);
the MS loss, or any pair-weighting loss of ms_fused (`loss=SupConLoss()`, ...).

The memory is a ring buffer of detached rows; the batch is enqueued first, then its anchors are scored
against everything the memory holds, their own copies removed from their positives by index. The memory
never requires grad, so backends skip the reference-side gradient (dR) entirely. With normalize=True it
holds unit rows, so that a step normalises the batch only and never copies the memory.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..engine._inputs import FLOAT_DTYPES, check_embedding, check_labels, compute_dtype, refuse_indices_tuple
from ..losses.ms_module import MultiSimilarityLoss
from ..losses.pair_api import _PairWeightingLoss


class _Saved:
    """A tensor that the loss's graph saved for its backward, and its version when it was saved."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version


def _unpack(saved: _Saved) -> torch.Tensor:
    # saved-tensor hooks switch off autograd's own check, so it is done here
    if saved.tensor._version != saved.version:
        raise RuntimeError(
            f"one of the tensors that CrossBatchMemory's loss saved for its backward (shape "
            f"{tuple(saved.tensor.shape)}) was modified by an in-place operation after the forward "
            f"(version {saved.tensor._version}, saved at {saved.version}); do not modify the loss's inputs in place "
            f"before its backward")
    return saved.tensor


class CrossBatchMemory(nn.Module):
    """`xbm(embeddings, labels) -> loss` of the batch's anchors against a memory of the last `memory_size` rows.

    Each call (1) writes the batch, detached and cast to the memory's `dtype`, into the ring buffer
    (oldest rows first overwritten; of a batch longer than the memory only its last `memory_size` rows
    stay); with normalize=True (the default) the rows written are the unit rows F.normalize(x) computed in
    float32 (float64 for float64), then cast. It then (2) returns `multi_similarity_loss(embeddings, labels,
    memory[:filled], memory_labels[:filled], ref_self_index=<slot of each anchor's copy, -1 if overwritten
    in the same call>, ref_normalized=normalize, **loss_kwargs)`, the batch cast to the memory's `dtype`
    first: the memory's rows are used as stored, never normalised or copied again, and every backend reads
    a bfloat16 memory as it is (converting a block of rows at a time where it computes in float32).
    Only the filled part of the memory is used until it is full. The gradient reaches `embeddings`
    through the anchor side only (the XBM convention: memory rows are constants).

    `loss=` takes another loss of ms_fused instead (`SupConLoss()`, `NTXentLoss()`, `CircleLoss()`, or a
    configured `MultiSimilarityLoss`), as pml's CrossBatchMemory takes any loss; the loss keywords then belong
    to that loss, not here. The pair-weighting losses use unit rows, so their memory holds unit rows.

    The memory follows the embeddings' device (moved on the first call from another device), is saved
    and restored by `state_dict()` / `load_state_dict()`, and costs memory_size x embedding_dim elements
    of `dtype` plus one int64 label per row. `self.loss` holds the last step's mining statistics
    (`xbm.loss.num_pos_pairs`, ...).

    Several steps may run before one backward (`(xbm(b1, y1) + xbm(b2, y2)).backward()`): each step's
    gradient uses the memory as it was at that step's forward. A step whose graph still holds memory rows
    for its backward gets its own copy of them before the next step overwrites the memory; a backward
    after every step never copies.
    """

    def __init__(self, memory_size: int, embedding_dim: int, *, loss=None, dtype: torch.dtype = torch.float32,
                 device=None, **loss_kwargs):
        super().__init__()
        for name, value in (("memory_size", memory_size), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        if loss is None:
            loss = MultiSimilarityLoss(**loss_kwargs)
        elif loss_kwargs:
            raise TypeError(f"CrossBatchMemory got loss= and the loss keywords {sorted(loss_kwargs)}: configure the "
                            f"loss itself, e.g. CrossBatchMemory(size, dim, loss=SupConLoss(temperature=0.1))")
        elif not isinstance(loss, (MultiSimilarityLoss, _PairWeightingLoss)):
            raise TypeError(f"loss must be a loss of ms_fused (MultiSimilarityLoss, SupConLoss, NTXentLoss, "
                            f"CircleLoss), got {type(loss).__name__}; other losses need pml's CrossBatchMemory")
        self.loss = loss
        self.register_buffer("memory", torch.zeros(memory_size, embedding_dim, dtype=dtype, device=device))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.int64, device=device))
        # next slot to write, and how many slots hold data; 0-d int64 so that state_dict carries them
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))
        self._saved_rows = weakref.WeakSet()  # memory views saved by graphs not yet backpropagated

    @property
    def normalize(self) -> bool:
        """Whether the memory holds unit rows: the MS loss may work on raw rows (normalize=False), the
        pair-weighting losses always use unit rows."""
        return self.loss.kwargs["normalize"] if isinstance(self.loss, MultiSimilarityLoss) else True

    @property
    def check_finite(self) -> bool:
        return self.loss.kwargs["check_finite"] if isinstance(self.loss, MultiSimilarityLoss) else False

    @property
    def memory_size(self) -> int:
        return self.memory.shape[0]

    def reset(self) -> None:
        """Empty the memory (the buffers keep their size, device and dtype)."""
        self.ptr.zero_()
        self.filled.zero_()

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write the rows (as unit rows with normalize=True) into the ring buffer; returns each row's slot (int64 (N,)),
        -1 for rows overwritten by later rows of the same batch."""
        self._copy_saved_rows()
        n, size = embeddings.shape[0], self.memory_size
        start = int(self.ptr)
        slots = (start + torch.arange(n, device=embeddings.device)) % size
        slots[: max(0, n - size)] = -1
        kept = slice(max(0, n - size), n)
        rows = embeddings[kept].detach()
        if self.normalize:
            rows = F.normalize(rows.to(compute_dtype(rows.dtype)), dim=1)
        self.memory[slots[kept]] = rows.to(self.memory.dtype)
        self.memory_labels[slots[kept]] = labels[kept]
        self.ptr.fill_((start + n) % size)
        self.filled.fill_(min(size, int(self.filled) + n))
        return slots

    def _save(self, tensor: torch.Tensor) -> _Saved:
        """Pack hook of the tensors the loss saves for its backward: remembers those that view the memory."""
        saved = _Saved(tensor)
        if tensor.device == self.memory.device and any(
                tensor.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                for buf in (self.memory, self.memory_labels)):
            self._saved_rows.add(saved)
        return saved

    def _copy_saved_rows(self) -> None:
        """Before the memory changes: graphs that still need its rows get their own copy of them."""
        for saved in list(self._saved_rows):
            saved.tensor = saved.tensor.clone()
            saved.version = saved.tensor._version
        self._saved_rows.clear()

    def __getstate__(self):  # a WeakSet cannot be pickled; a copy has no graphs waiting for it anyway
        state = super().__getstate__()
        state.pop("_saved_rows", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._saved_rows = weakref.WeakSet()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        refuse_indices_tuple(indices_tuple, type(self).__name__)
        x = check_embedding("embeddings", embeddings)
        if x.shape[1] != self.memory.shape[1]:
            raise ValueError(f"embeddings must have embedding_dim = {self.memory.shape[1]} columns, got {x.shape[1]}")
        y = check_labels("labels", labels, x.shape[0], "embeddings")
        if y.device != x.device:
            raise ValueError(f"labels is on {y.device} but embeddings is on {x.device}; put both on one device")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            # checked before the write: a rejected batch must not poison the memory
            raise ValueError("embeddings contains NaN or Inf (check_finite=True)")
        if self.memory.device != x.device:
            self.to(x.device)
        return self.score(x, y, self.enqueue(x, y))

    def score(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_self_index: torch.Tensor) -> torch.Tensor:
        """The loss of these anchors against the memory as it is now, each anchor's own copy at its slot
        `ref_self_index[i]` (what `enqueue` returned)."""
        filled = int(self.filled)
        anchors = embeddings.to(self.memory.dtype)
        with torch.autograd.graph.saved_tensors_hooks(self._save, _unpack):
            return self.loss(anchors, labels, ref_emb=self.memory[:filled], ref_labels=self.memory_labels[:filled],
                             ref_self_index=ref_self_index, ref_normalized=self.normalize)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, embedding_dim={self.memory.shape[1]}, dtype={self.memory.dtype}"
