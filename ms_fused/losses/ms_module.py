"""`MultiSimilarityLoss`: the nn.Module face of `multi_similarity_loss`, called like pml's loss."""
from __future__ import annotations

from torch import nn

from ..engine._inputs import check_flag, check_backend_name, check_hyperparams, check_reduction, refuse_indices_tuple
from .ms_api import multi_similarity_loss


class MultiSimilarityLoss(nn.Module):
    """Drop-in for pml's `MultiSimilarityLoss` + `MultiSimilarityMiner`: `loss(embeddings, labels)`.

    pml's positional order: `(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`. The pairs
    are mined inside the loss, so `indices_tuple` (a miner's output) is refused with an error saying so.

    After every call, `num_pos_pairs`, `num_neg_pairs` and `num_anchors_with_pairs` hold that call's mining
    statistics (0-dim int64 tensors on the inputs' device; see `ms_fused.PairStats`), None before the first.
    """

    def __init__(self, *, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, mining=True, normalize=True,
                 reduction="mean", backend="auto", check_finite=False):
        super().__init__()
        check_hyperparams(alpha, beta, base, epsilon, mining, normalize)
        self.kwargs = dict(alpha=alpha, beta=beta, base=base, epsilon=epsilon, mining=mining,
                           normalize=normalize, reduction=check_reduction(reduction),
                           backend=check_backend_name(backend), check_finite=check_flag("check_finite", check_finite))
        self.num_pos_pairs = self.num_neg_pairs = self.num_anchors_with_pairs = None

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *, ref_self_index=None,
                ref_normalized=False):
        refuse_indices_tuple(indices_tuple, type(self).__name__)
        loss, stats = multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, ref_self_index=ref_self_index,
                                            ref_normalized=ref_normalized, return_stats=True, **self.kwargs)
        self.num_pos_pairs, self.num_neg_pairs, self.num_anchors_with_pairs = stats
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
