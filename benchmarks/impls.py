"""The implementations the suite times, all with the same hyper-parameters and the same batches.

- `ms_fused:<backend>`: this package, one entry per backend that serves the device;
- `pml`: pytorch-metric-learning's MultiSimilarityLoss fed by its MultiSimilarityMiner;
- `dense_torch`: the vectorised all-in-memory version a user writes by hand (N x N matrices and masks);
- `loop`: the authors' per-anchor loop style, written here from the paper's algorithm;
- `mm`: one torch.mm(X, X.T) in the batch's dtype, the yardstick a fused kernel is measured against.

Every loss callable takes (embeddings, labels) and returns the mean loss over all N anchors.

With `loss` other than "ms" (the pair-weighting losses: "supcon", "ntxent", "circle"), `ms_fused:<backend>` is
that loss of this package, `pml` pml's loss of that name with its defaults, and `mm` the same yardstick;
`dense_torch` and `loop` are MS-only.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ms_fused.losses.pair_reference import PAIR_LOSSES  # the losses a sweep times besides "ms"

ALPHA, BETA, BASE, EPSILON = 2.0, 50.0, 0.5, 0.1
HYPER_PARAMS = dict(alpha=ALPHA, beta=BETA, base=BASE, epsilon=EPSILON)

# P x K batches: K samples of each of N/K classes, in random order; rows scattered around class centres,
# with the scatter chosen per D so that the miner keeps about this share of the negative pairs
SAMPLES_PER_CLASS = 4
TARGET_HARD_NEGATIVES = 0.10

BASELINES = ("pml", "dense_torch", "loop", "mm")
PAIR_BASELINES = ("pml", "mm")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def clustered(n: int, d: int, spread: float, seed: int, device="cpu", samples_per_class: int = SAMPLES_PER_CLASS):
    """n rows in samples_per_class-row classes, shuffled: each row its class centre (std-1 Gaussian) plus
    Gaussian noise of std `spread`; and the int64 labels."""
    # drawn on the target device: a GPU sweep would otherwise spend seconds per record in CPU randn
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_classes = math.ceil(n / samples_per_class)
    order = torch.randperm(n, generator=gen, device=device)
    labels = (torch.arange(n, device=device) // samples_per_class)[order]
    centres = torch.randn(n_classes, d, generator=gen, device=device)
    return centres[labels] + spread * torch.randn(n, d, generator=gen, device=device), labels


def hard_pair_fractions(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Share of the positive and of the negative pairs that the miner keeps (float64, self mode)."""
    from ms_fused.engine._inputs import HyperParams
    from ms_fused.losses.ms_reference import mined_masks, pair_masks

    xn = F.normalize(x.double(), dim=1)
    S = xn @ xn.T
    pos, neg = pair_masks(y, y, torch.arange(len(y), device=y.device))
    hard_pos, hard_neg = mined_masks(S, pos, neg, HyperParams(ALPHA, BETA, BASE, EPSILON))
    return {"positives": float(hard_pos.sum() / pos.sum()), "negatives": float(hard_neg.sum() / neg.sum())}


# cluster_spread(d) for the swept D, rounded (so that a record's child process need not bisect)
_KNOWN_SPREADS = {128: 1.547, 512: 1.977}


@functools.lru_cache(maxsize=None)
def cluster_spread(d: int) -> float:
    """Noise std (centres have std 1) at which the miner keeps ~TARGET_HARD_NEGATIVES of the negatives.

    The share grows with the spread; found by bisection on a 512-row batch, then the same for every N.
    """
    if d in _KNOWN_SPREADS:
        return _KNOWN_SPREADS[d]
    lo, hi = 0.1, 20.0
    for _ in range(16):
        mid = (lo + hi) / 2
        if hard_pair_fractions(*clustered(512, d, mid, seed=1))["negatives"] < TARGET_HARD_NEGATIVES:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_batch(n: int, d: int, dtype: torch.dtype, device, seed: int = 0, samples_per_class: int = SAMPLES_PER_CLASS):
    """Embeddings (n, d) in `dtype` and int64 labels: n/K classes of K samples each, shuffled.

    Each row is its class centre plus Gaussian noise of std `cluster_spread(d)`: positives are more
    similar than negatives and the miner keeps ~10% of the negatives, as in the middle of training.
    """
    x, labels = clustered(n, d, cluster_spread(d), seed, device, samples_per_class)
    return x.to(dtype), labels


def make_memory_bank(n: int, m: int, d: int, dtype: torch.dtype, device, seed: int = 0,
                     samples_per_class: int = SAMPLES_PER_CLASS):
    """A cross-batch-memory step: a batch (n rows, K per class) and a memory of m unit rows around the same
    class centres, whose first n rows are the batch itself, normalised (anchor i's own copy is memory
    row i), as `CrossBatchMemory` holds them.

    Returns (batch, labels, memory, memory_labels, ref_self_index) with ref_self_index = arange(n)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    spread = cluster_spread(d)
    centres = torch.randn(math.ceil(m / samples_per_class), d, generator=gen, device=device)
    memory_labels = (torch.arange(m, device=device) // samples_per_class)[torch.randperm(m, generator=gen, device=device)]
    labels = (torch.arange(n, device=device) // samples_per_class)[torch.randperm(n, generator=gen, device=device)]
    memory = centres[memory_labels] + spread * torch.randn(m, d, generator=gen, device=device)
    batch = centres[labels] + spread * torch.randn(n, d, generator=gen, device=device)
    memory[:n], memory_labels[:n] = batch, labels  # the batch was just enqueued
    memory = F.normalize(memory, dim=1)
    ref_self_index = torch.arange(n, device=device)
    return batch.to(dtype), labels, memory.to(dtype), memory_labels, ref_self_index


# ---------------------------------------------------------------------------------------------
# the implementations


def ms_fused_loss(backend: str) -> Callable:
    import ms_fused

    def loss(x, y, bank=None):
        if bank is None:
            return ms_fused.multi_similarity_loss(x, y, backend=backend, **HYPER_PARAMS)
        memory, memory_labels, ref_self_index = bank
        # the step CrossBatchMemory makes: its memory holds unit rows, used as they are
        return ms_fused.multi_similarity_loss(x, y, memory, memory_labels, ref_self_index=ref_self_index,
                                              ref_normalized=True, backend=backend, **HYPER_PARAMS)

    return loss


def pml_loss() -> Callable:
    from pytorch_metric_learning import losses, miners

    loss_fn = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=BASE)
    miner = miners.MultiSimilarityMiner(epsilon=EPSILON)

    def loss(x, y, bank=None):
        if bank is None:
            return loss_fn(x, y, miner(x, y))
        # pml keeps each anchor's own copy in the memory as a positive (ms_fused removes it by index)
        memory, memory_labels, _ = bank
        return loss_fn(x, y, miner(x, y, memory, memory_labels), memory, memory_labels)

    return loss


def dense_torch_loss(x: torch.Tensor, y: torch.Tensor, bank=None) -> torch.Tensor:
    """All pairs at once: similarity matrix, masks, mining, two masked log-sum-exps."""
    x = F.normalize(x, dim=1)
    S = x @ x.T
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(len(y), dtype=torch.bool, device=x.device)
    neg = ~same
    min_pos = S.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    max_neg = S.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    hard_pos = pos & (S - EPSILON < max_neg)
    hard_neg = neg & (S + EPSILON > min_pos)

    def log1p_sum_exp(z, keep):
        # log(1 + sum exp z) over the kept entries, shifted by max(0, max z) so that it cannot overflow
        z = z.masked_fill(~keep, float("-inf"))
        m = z.amax(dim=1).clamp(min=0)
        return m + torch.log(torch.exp(-m) + torch.exp(z - m[:, None]).sum(dim=1))

    pos_term = log1p_sum_exp(-ALPHA * (S - BASE), hard_pos) / ALPHA
    neg_term = log1p_sum_exp(BETA * (S - BASE), hard_neg) / BETA
    return (pos_term + neg_term).mean()


def loop_loss(x: torch.Tensor, y: torch.Tensor, bank=None) -> torch.Tensor:
    """The authors' style: one similarity matrix, then a Python loop over anchors (paper, Alg. 1)."""
    x = F.normalize(x, dim=1)
    S = x @ x.T
    n = len(y)
    index = torch.arange(n, device=x.device)
    terms = []
    for i in range(n):
        same = y == y[i]
        pos_pairs = S[i][same & (index != i)]
        neg_pairs = S[i][~same]
        if len(pos_pairs) == 0 or len(neg_pairs) == 0:
            continue
        hard_neg = neg_pairs[neg_pairs + EPSILON > pos_pairs.min()]
        hard_pos = pos_pairs[pos_pairs - EPSILON < neg_pairs.max()]
        if len(hard_neg) == 0 or len(hard_pos) == 0:
            continue
        pos_term = torch.log(1 + torch.exp(-ALPHA * (hard_pos - BASE)).sum()) / ALPHA
        neg_term = torch.log(1 + torch.exp(BETA * (hard_neg - BASE)).sum()) / BETA
        terms.append(pos_term + neg_term)
    if not terms:
        return S.sum() * 0
    return torch.stack(terms).sum() / n


def ms_fused_pair_loss(loss_name: str, backend: str) -> Callable:
    from ms_fused.losses.pair_api import pair_weighting_loss

    def loss(x, y, bank=None):
        if bank is None:
            return pair_weighting_loss(loss_name, x, y, backend=backend)
        memory, memory_labels, ref_self_index = bank
        return pair_weighting_loss(loss_name, x, y, memory, memory_labels, ref_self_index=ref_self_index,
                                   ref_normalized=True, backend=backend)

    return loss


def pml_pair_loss(loss_name: str) -> Callable:
    from pytorch_metric_learning import losses

    loss_fn = {"supcon": losses.SupConLoss, "ntxent": losses.NTXentLoss, "circle": losses.CircleLoss}[loss_name]()

    def loss(x, y, bank=None):
        return loss_fn(x, y) if bank is None else loss_fn(x, y, None, bank[0], bank[1])

    return loss


def mm_yardstick(x: torch.Tensor, y: torch.Tensor, bank=None) -> torch.Tensor:
    return torch.mm(x, (x if bank is None else bank[0]).T)


# ---------------------------------------------------------------------------------------------
# what is available where


def ms_fused_backends(device: torch.device) -> List[str]:
    """The package's backends on `device` at run time, less the dense oracle and interpreted Triton."""
    import ms_fused
    from ms_fused.engine.backends import REFERENCE, TRITON

    names = [b for b in ms_fused.available_backends(device) if b != REFERENCE]
    if device.type != "cuda":
        names = [b for b in names if b != TRITON]  # on the CPU Triton only runs in its interpreter
    return [f"ms_fused:{b}" for b in names]


def all_impls(device: torch.device) -> List[str]:
    return ms_fused_backends(device) + list(BASELINES)


# the baselines that also time a memory-bank step (run.py --memory)
BANK_BASELINES = ("pml", "mm")


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype, memory: Optional[int] = None,
                       loss: str = "ms") -> Optional[str]:
    """None when `impl` can run `loss` on (device, dtype), else why not (recorded, never raised)."""
    if loss != "ms":
        if impl in BASELINES and impl not in PAIR_BASELINES:
            return f"{impl} is a form of the MS loss only"
        if impl.startswith("ms_fused:"):
            from ms_fused.losses.pair_api import PAIR_BACKENDS

            if impl.split(":", 1)[1] not in PAIR_BACKENDS:
                return f"the {impl.split(':', 1)[1]} backend serves the MS loss only so far"
    if memory and impl in BASELINES and impl not in BANK_BASELINES:
        return f"{impl} has no memory-bank form"
    if impl.startswith("ms_fused:"):
        from ms_fused.engine.backends import unavailable_reason as backend_reason

        return backend_reason(impl.split(":", 1)[1], device, dtype)
    if impl == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch-metric-learning is not installed"
    if impl not in BASELINES:
        return f"unknown implementation {impl!r}"
    return None


def build(impl: str, loss: str = "ms") -> Callable:
    """The callable (embeddings, labels, bank=None) -> output that one timed step of `loss` runs; `bank` is
    (memory, memory_labels, ref_self_index) for a memory-bank step."""
    if loss != "ms" and impl != "mm":
        return ms_fused_pair_loss(loss, impl.split(":", 1)[1]) if impl.startswith("ms_fused:") else pml_pair_loss(loss)
    if impl.startswith("ms_fused:"):
        return ms_fused_loss(impl.split(":", 1)[1])
    return {"pml": pml_loss, "dense_torch": lambda: dense_torch_loss, "loop": lambda: loop_loss,
            "mm": lambda: mm_yardstick}[impl]()


def is_yardstick(impl: str) -> bool:
    """mm runs the same single product in both modes (no autograd), so each mode has its unit."""
    return impl == "mm"


# Peak memory of one step in bytes per anchor pair (N^2), rounded up from this suite's CPU measurements
# at N = 1024-4096, float32, both modes (pml 53-58, dense_torch 42-66, loop 23-30, mm 4.1-5.4) and
# from pml's ~4.8 GB at N = 8192 on a GPU (71). The sweep skips a record whose estimate exceeds the
# memory limit instead of letting the machine run out of memory.
_BYTES_PER_PAIR = {"pml": 80, "dense_torch": 72, "loop": 40, "mm": 6}


# pml's pair-weighting losses, bytes per anchor pair (N M): SupCon and Circle keep several N x M float tensors;
# NT-Xent builds a (positive pairs x negative pairs) matrix, N (K - 1) x N M entries, a few float copies of it
_PML_PAIR_BYTES = {"supcon": 80, "circle": 80}
_PML_NTXENT_BYTES_PER_ENTRY = 16


def estimated_peak_bytes(impl: str, n: int, d: int, dtype: torch.dtype, memory: Optional[int] = None,
                         loss: str = "ms", samples_per_class: int = SAMPLES_PER_CLASS) -> int:
    if loss != "ms" and impl == "pml":
        m = memory or n
        if loss == "ntxent":
            return int(_PML_NTXENT_BYTES_PER_ENTRY * n * (samples_per_class - 1) * n * m) + 8 * n * d * 4
        return int(_PML_PAIR_BYTES[loss] * n * m) + 8 * n * d * 4
    if memory:  # a memory-bank step: N x M pairs, and the memory itself
        per_pair = _BYTES_PER_PAIR.get(impl, 0)
        return int(per_pair * n * memory) + 8 * n * d * 4 + 2 * memory * d * 4 + 64 * 2**20
    per_pair = _BYTES_PER_PAIR.get(impl)
    if per_pair is None:  # ms_fused: O(N D) tensors plus a bounded scratch
        return 8 * n * d * 4 + 64 * 2**20
    # half-precision batches are charged as float32: several of the N x N temporaries are masks or float32
    return int(per_pair * n * n) + 8 * n * d * 4
