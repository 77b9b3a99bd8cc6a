"""Parity with pytorch-metric-learning (MultiSimilarityLoss + MultiSimilarityMiner) in float64, within
helpers.TOLERANCE.

pml is a test oracle only. Its one deliberate difference — returning a detached 0 when at most one pair
of each kind is mined — cannot occur on these batches (hundreds of mined pairs).
"""
import pytest
import torch

from backends_under_test import CPU_BACKENDS
from helpers import TOLERANCE, assert_close, clustered_batch, loss_and_grads, rel_err
from ms_fused import MultiSimilarityLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

HP = [dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1), dict(alpha=2.0, beta=40.0, base=0.5, epsilon=0.1),
      dict(alpha=0.5, beta=10.0, base=0.3, epsilon=0.05)]


def pml_loss(x, y, r, yr, hp, mining):
    loss_fn = pml_losses.MultiSimilarityLoss(alpha=hp["alpha"], beta=hp["beta"], base=hp["base"])
    if r is None:
        pairs = pml_miners.MultiSimilarityMiner(epsilon=hp["epsilon"])(x, y) if mining else None
        return loss_fn(x, y, pairs)
    pairs = pml_miners.MultiSimilarityMiner(epsilon=hp["epsilon"])(x, y, r, yr) if mining else None
    return loss_fn(x, y, pairs, ref_emb=r, ref_labels=yr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ref_mode", [False, True])
@pytest.mark.parametrize("mining", [True, False])
def test_matches_pml_loss_and_miner_float64(backend, ref_mode, mining):
    for seed, hp in enumerate(HP):
        if ref_mode:
            x, y, r, yr = clustered_batch(96, 24, 8, seed, m=160, epsilon=hp["epsilon"])
        else:
            (x, y), r, yr = clustered_batch(160, 24, 12, seed, epsilon=hp["epsilon"]), None, None
        ours = loss_and_grads(backend, x, y, r, yr, reduction="mean", mining=mining, **hp)
        theirs = loss_and_grads(lambda *batch, **_: pml_loss(*batch, hp, mining), x, y, r, yr)
        assert_close(ours, theirs, torch.float64)


def test_module_is_called_like_pml():
    x, y = clustered_batch(64, 16, 8, 7)
    x.requires_grad_(True)
    ours = MultiSimilarityLoss()(x, y)
    theirs = pml_losses.MultiSimilarityLoss()(x, y, pml_miners.MultiSimilarityMiner()(x, y))
    assert rel_err(ours, theirs) <= TOLERANCE[torch.float64].loss


def test_module_takes_pmls_positional_order():
    """(embeddings, labels, indices_tuple, ref_emb, ref_labels), as pml's losses take them."""
    x, y, r, yr = clustered_batch(48, 12, 6, 3, m=80)
    ours = MultiSimilarityLoss(mining=False)(x, y, None, r, yr)
    theirs = pml_losses.MultiSimilarityLoss()(x, y, None, r, yr)
    assert rel_err(ours, theirs) <= TOLERANCE[torch.float64].loss


def test_a_miners_output_is_refused_naming_the_built_in_mining():
    x, y = clustered_batch(64, 16, 8, 7)
    pairs = pml_miners.MultiSimilarityMiner()(x, y)
    with pytest.raises(ValueError, match=r"mines its pairs itself.*MultiSimilarityMiner.*loss\(embeddings, labels\)"):
        MultiSimilarityLoss()(x, y, pairs)
