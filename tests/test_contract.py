"""docs/semantics.md's loss and gradient on every backend (interpreted triton included) against the float64
`reference`, within helpers.TOLERANCE: the three modes in every input dtype, the mining and normalize
switches, other hyper-parameters, a frozen reference set.

Sizes stay at N, M ≲ 130 for the interpreter, chosen off every block size so that several row, column
and D blocks of the tiled backends occur.
"""
import pytest
import torch

from helpers import assert_matches_reference, clustered_batch, memory_bank_batch, threshold_gap, widest_dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["self", "reference", "memory_bank"])
def test_parity_with_reference(backend, dtype, mode):
    if dtype == torch.float64 and widest_dtype(backend) != torch.float64:
        pytest.skip(f"{backend} takes no float64")
    if mode == "self":
        x, y = clustered_batch(77, 40, 7, seed=1)
        assert_matches_reference(backend, x, y, dtype=dtype)
    elif mode == "reference":
        x, y, r, yr = clustered_batch(45, 40, 6, seed=2, m=70)
        assert_matches_reference(backend, x, y, r, yr, dtype=dtype)
    else:
        x, y, r, yr, ref_self_index = memory_bank_batch(40, 30, 40, 6, seed=3)
        assert_matches_reference(backend, x, y, r, yr, dtype=dtype, ref_self_index=ref_self_index)


@pytest.mark.parametrize("mining,normalize", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("mode", ["self", "reference"])
def test_mining_and_normalize_switches(backend, mining, normalize, mode):
    # rows scaled by 1/4 keep unnormalised similarities near 1 (beta * S stays moderate); the threshold
    # margin is checked on the scaled rows
    if mode == "self":
        x, y = clustered_batch(50, 24, 5, seed=4)
        x = x / 4
        assert threshold_gap(x, y, normalize=normalize) > 1e-5
        assert_matches_reference(backend, x, y, mining=mining, normalize=normalize)
    else:
        x, y, r, yr = clustered_batch(40, 24, 5, seed=5, m=37, shared_centres=True)
        x, r = x / 4, r / 4
        assert threshold_gap(x, y, r, yr, normalize=normalize) > 1e-5
        assert_matches_reference(backend, x, y, r, yr, mining=mining, normalize=normalize)


@pytest.mark.parametrize("seed", [6, 7])
def test_more_seeds_and_hyper_parameters(backend, seed):
    x, y = clustered_batch(60, 20, 6, seed=seed, epsilon=0.05)
    assert_matches_reference(backend, x, y, alpha=3.0, beta=40.0, base=0.4, epsilon=0.05)


def test_frozen_reference_set_gets_no_gradient(backend):
    x, y, r, yr, ref_self_index = memory_bank_batch(25, 20, 16, 4, seed=13)
    _, (dx, dr) = assert_matches_reference(backend, x, y, r, yr, grad_ref=False, ref_self_index=ref_self_index)
    assert dr is None and dx.abs().sum() > 0
