"""Mining statistics of one loss call (README "Mining statistics"), summed on the device from the per-anchor
counts each backend takes inside its forward: no extra pass over the similarities, no host sync."""
from __future__ import annotations

from typing import NamedTuple

import torch


class PairStats(NamedTuple):
    """0-dim int64 tensors on the inputs' device.

    num_pos_pairs: Σ_i |P̂_i|, the positive pairs the miner keeps (all of P with mining off);
    num_neg_pairs: Σ_i |N̂_i|, likewise for negatives;
    num_anchors_with_pairs: anchors i with |P̂_i| + |N̂_i| > 0, i.e. with a non-zero loss term.
    """

    num_pos_pairs: torch.Tensor
    num_neg_pairs: torch.Tensor
    num_anchors_with_pairs: torch.Tensor


def pair_stats(counts: torch.Tensor) -> PairStats:
    """`counts`: (2, N) integer tensor, row 0 each anchor's mined positives, row 1 its mined negatives."""
    counts = counts.to(torch.int64)
    pos, neg = counts.sum(dim=1).unbind()
    return PairStats(pos, neg, (counts.sum(dim=0) > 0).sum())
