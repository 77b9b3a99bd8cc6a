"""Shared test data: clustered batches kept away from mining thresholds, and the error measure."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64; inf when out has a NaN/Inf that ref has not (NaN never passes).

    `floor` keeps a reference that is zero up to rounding (e.g. the gradient of a normalised D=1 row)
    from turning rounding noise into a large relative error."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    keep = ~torch.isnan(ref)
    out, ref = out[keep], ref[keep]
    if not torch.isfinite(out).all():
        return float("inf")
    denom = max(float(ref.norm()), floor)
    diff = float((out - ref).norm())
    return diff if denom == 0 else diff / denom


def clustered(n: int, d: int, n_classes: int, gen: torch.Generator, spread: float = 0.9):
    """Rows around random class centres, so that hard positives and negatives both occur."""
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    centres = torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, labels


def threshold_gap(q, yq, r=None, yr=None, self_index=None, epsilon: float = 0.1, normalize: bool = True) -> float:
    """Smallest distance (float64) between any S ± ε and the mining extreme it is compared with."""
    self_mode = r is None
    q = q.double()
    r = q if self_mode else r.double()
    yr = yq if self_mode else yr
    if normalize:
        q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    S = q @ r.T
    same = yq[:, None] == yr[None, :]
    pos = same.clone()
    idx = torch.arange(q.shape[0]) if self_mode else self_index
    if idx is not None:
        rows = torch.nonzero(idx >= 0).flatten()
        pos[rows, idx[rows]] = False
    neg = ~same
    min_pos = S.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    max_neg = S.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    gap_neg = ((S + epsilon) - min_pos).abs().masked_fill(~neg | ~torch.isfinite(min_pos), float("inf"))
    gap_pos = ((S - epsilon) - max_neg).abs().masked_fill(~pos | ~torch.isfinite(max_neg), float("inf"))
    return float(torch.minimum(gap_neg.min(), gap_pos.min()))


def clustered_batch(n: int, d: int, n_classes: int, seed: int, dtype=torch.float64, m: Optional[int] = None,
                    epsilon: float = 0.1, margin: float = 1e-5, normalize: bool = True):
    """A clustered batch (self mode, or reference mode with m reference rows) whose pairs all sit at least
    `margin` away from a mining threshold.

    Why: a pair within rounding distance of `S ± ε = extreme` is mined by one implementation and not by
    another (different GEMM summation orders), which changes the loss by a whole pair's term. Such draws
    test floating-point luck, not the algorithm, so they are redrawn. Returns (x, y) or (x, y, r, yr).
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(500):
        x, y = clustered(n, d, n_classes, gen)
        if m is None:
            if threshold_gap(x, y, epsilon=epsilon, normalize=normalize) > margin:
                return x.to(dtype), y
        else:
            r, yr = clustered(m, d, n_classes, gen)
            if threshold_gap(x, y, r, yr, epsilon=epsilon, normalize=normalize) > margin:
                return x.to(dtype), y, r.to(dtype), yr
    raise RuntimeError("could not draw a batch away from the mining thresholds; lower the margin")
