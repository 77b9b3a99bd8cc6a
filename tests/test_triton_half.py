"""The triton backend's half-precision numerics: bfloat16 and float16 forward and backward against the float64
`reference`, with the operands rounded as a GPU rounds them. Under the interpreter (no GPU here) the kernels
upcast half-precision dot operands to float32 and round the backward's weights to the half type first, which
is what a GPU's tensor cores compute (exact products of half operands, float32 sums), so these tolerances are
the GPU's (tests/helpers.py TOLERANCE)."""
import pytest
import torch

from backends_under_test import INTERPRETER_WARNINGS, triton_backend_or_skip
from helpers import assert_matches_reference, clustered_batch, loss_and_grads, memory_bank_batch, rel_err

triton_backend = triton_backend_or_skip()
pytestmark = INTERPRETER_WARNINGS

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def first_configuration(monkeypatch):
    monkeypatch.setenv("MS_FUSED_TRITON_AUTOTUNE", "0")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_half_forward_and_backward_against_float64(dtype, seed):
    assert_matches_reference("triton", *clustered_batch(90, 40, 8, seed=60 + seed), dtype=dtype)
    assert_matches_reference("triton", *clustered_batch(60, 40, 6, seed=62 + seed, m=110), dtype=dtype)
    x, y, r, yr, own = memory_bank_batch(50, 80, 40, 6, seed=64 + seed)
    assert_matches_reference("triton", x, y, r, yr, dtype=dtype, ref_self_index=own)


def many_comparable_negatives(n: int, m: int, d: int = 8, s_neg: float = 0.2, s_pos: float = -0.3):
    """n anchors near e1 (one class) against m reference rows: n positives at similarity ~s_pos, m - n negatives
    at ~s_neg, all along one direction e2 besides e1. Every negative is hard (s_neg + eps > s_pos) and carries
    about the same weight ~1 / m, so their gradient terms add up along e2 instead of cancelling: a weight
    rounded the same wrong way everywhere shows in the gradient."""
    gen = torch.Generator().manual_seed(66)
    e1 = torch.zeros(d)
    e1[0] = 1
    x = e1 + 0.02 * torch.randn(n, d, generator=gen)
    u = torch.zeros(m, d)
    u[:, 1] = 1
    u += 0.01 * torch.randn(m, d, generator=gen)
    u[:, 0] = 0
    u = torch.nn.functional.normalize(u, dim=1)
    r = s_neg * e1 + (1 - s_neg ** 2) ** 0.5 * u
    r[:n] = s_pos * e1 + (1 - s_pos ** 2) ** 0.5 * u[:n]
    yr = torch.ones(m, dtype=torch.long)
    yr[:n] = 0
    return x, torch.zeros(n, dtype=torch.long), r, yr


@pytest.mark.slow
def test_float16_weights_of_1e5_hard_negatives_keep_their_bits():
    """10^5 comparable hard negatives: each weight is ~1e-5 of the largest, below float16's smallest normal
    (6.1e-5); unscaled they would lose bits, the same way for every negative (2.9e-3 gradient error measured
    without the scaling, 1.6e-4 with it). triton_backend.FLOAT16_WEIGHT_SCALE keeps them normal."""
    x, y, r, yr = many_comparable_negatives(3, 100_000)
    x, r = x.half(), r.half()
    out = loss_and_grads("triton", x, y, r, yr, grad_ref=False)
    ref = loss_and_grads("reference", x.double(), y, r.double(), yr, grad_ref=False)
    assert rel_err(out[0], ref[0]) <= 1e-5
    # the float16 gradient's own rounding (2^-11 per entry, ~2e-4 over these rows) and little more
    assert rel_err(out[1][0], ref[1][0]) <= 5e-4, rel_err(out[1][0], ref[1][0])
