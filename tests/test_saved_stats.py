"""The per-anchor statistics every fused backend saves for its backward: one layout (ms_fused/engine/_autograd.py),
whose NaN log-sum-exps are the one "bad row" flag."""
import math

import pytest
import torch
import torch.nn.functional as F

from backends_under_test import backend_params
from helpers import memory_bank_batch
from ms_fused.engine.torch import backend as torch_backend
from ms_fused.engine.triton import ms_op as triton_op
from ms_fused.engine._autograd import LSE_NEG, LSE_POS, MAX_NEG, MIN_POS, N_STATS, bad_rows
from ms_fused.engine._inputs import HyperParams, check_inputs
from ms_fused.losses.ms_reference import log1p_sum_exp, mined_masks, pair_masks

BAD_ANCHOR = 3


def expected_stats(problem) -> torch.Tensor:
    """The layout's rows from the equations, in float64 and input order."""
    hp = problem.hp
    q, r = F.normalize(problem.q.double(), dim=1), F.normalize(problem.ref.double(), dim=1)
    S = q @ r.T
    pos, neg = pair_masks(problem.labels, problem.ref_labels, problem.ref_self_index)
    hard_pos, hard_neg = mined_masks(S, pos, neg, hp)
    stats = torch.empty(N_STATS, S.shape[0], dtype=torch.float64)
    stats[MIN_POS] = S.masked_fill(~pos, float("inf")).amin(dim=1)
    stats[MAX_NEG] = S.masked_fill(~neg, float("-inf")).amax(dim=1)
    stats[LSE_POS] = log1p_sum_exp(-hp.alpha * (S - hp.base), hard_pos)
    stats[LSE_NEG] = log1p_sum_exp(hp.beta * (S - hp.base), hard_neg)
    return stats


def saved_stats(backend, problem) -> torch.Tensor:
    """What `backend`'s forward saves, in input order and (triton: from base 2) natural logarithms."""
    if backend == "torch":
        return torch_backend.per_anchor_loss(problem).grad_fn.saved_tensors[-1]
    if backend == "cpp":
        q, r, yr = torch_backend.normalized_inputs(problem)
        hp = problem.hp
        return torch.ops.ms_fused.ms_forward(q, r, problem.labels, yr, problem.ref_self_index, hp.alpha, hp.beta,
                                             hp.base, hp.epsilon, hp.mining)[1]
    hp = problem.hp
    out = torch.ops.ms_fused.triton_forward(problem.q, problem.ref, problem.labels, problem.ref_labels,
                                            problem.ref_self_index, hp.alpha, hp.beta, hp.base, hp.epsilon,
                                            hp.mining, hp.normalize, False, False, [], -1)
    sorted_stats, perm = out[1], out[3][triton_op.PERM]
    stats = torch.empty_like(sorted_stats)
    stats[:, perm.long()] = sorted_stats
    stats[[LSE_POS, LSE_NEG]] *= math.log(2.0)
    return stats


@pytest.mark.parametrize("backend", backend_params(("torch", "cpp", "triton")))
def test_fused_backends_save_one_layout(backend):
    x, y, r, yr, ref_self_index = memory_bank_batch(20, 16, 8, 4, seed=5)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, r = x.to(dtype), r.to(dtype)
    x[BAD_ANCHOR, 0] = float("nan")
    problem = check_inputs(x.requires_grad_(True), y, r, yr, ref_self_index, HyperParams())

    stats = saved_stats(backend, problem)
    assert stats.shape == (N_STATS, x.shape[0]) and stats.dtype == dtype
    bad = torch.zeros(x.shape[0], dtype=torch.bool)
    bad[BAD_ANCHOR] = True
    assert torch.equal(bad_rows(stats), bad)  # a NaN flag, no rounding: "Non-finite inputs"
    assert stats[LSE_NEG].isnan().equal(bad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(stats[:, ~bad].double(), expected_stats(problem)[:, ~bad], rtol=tol, atol=tol)
