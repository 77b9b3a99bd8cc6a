"""`ms_fused.distributed.supcon_loss`, `ntxent_loss`, `circle_loss` on gloo processes against the single-process
loss of the concatenated batch (float64, the same backend): value on every rank and each rank's rows of the
gradient within 1e-10 (relative), local batches of unequal sizes, one rank with a single row, one with none."""
import itertools

import pytest
import torch

from helpers import clustered, rel_err, spawn_ranks
from ms_fused.losses.pair_api import PAIR_BACKENDS as ALL_PAIR_BACKENDS, pair_weighting_loss
from ms_fused.losses.pair_reference import PAIR_LOSSES

# the float64 backends (triton computes in float32 at most: tests/test_triton_pair_losses.py holds it to the
# float64 reference within helpers.TOLERANCE)
PAIR_BACKENDS = [b for b in ALL_PAIR_BACKENDS if b != "triton"]

WORLD, DIM, CLASSES = 3, 7, 4
SPLITS = [(6, 1, 9), (7, 0, 5)]
CASES = list(itertools.product(range(len(SPLITS)), PAIR_LOSSES, ["mean", "sum", "none"], PAIR_BACKENDS))
TOL = 1e-10


def global_batch(split):
    gen = torch.Generator().manual_seed(101 + sum(split))
    x, y = clustered(sum(split), DIM, CLASSES, gen)
    y[0] = 100  # an anchor without positives
    return x, y


def worker(rank):
    import ms_fused.distributed as msd

    out = {}
    for case in CASES:
        split_id, name, reduction, backend = case
        split = SPLITS[split_id]
        x, y = global_batch(split)
        start, n = sum(split[:rank]), split[rank]
        weights = torch.linspace(0.5, 1.5, sum(split), dtype=torch.float64)
        xs = x.clone().requires_grad_(True)
        full = pair_weighting_loss(name, xs, y, reduction=reduction, backend=backend)
        (full * weights).sum().backward() if reduction == "none" else full.backward()
        mine = x[start:start + n].clone().requires_grad_(True)
        loss = msd.pair_weighting_loss(name, mine, y[start:start + n], reduction=reduction, backend=backend)
        (loss * weights[start:start + n]).sum().backward() if reduction == "none" else loss.backward()
        expected = full[start:start + n] if reduction == "none" else full
        out[case] = dict(loss=loss.detach(), loss_err=rel_err(loss, expected) if n or reduction != "none" else 0.0,
                         grad_err=rel_err(mine.grad, xs.grad[start:start + n]) if n else 0.0)
    try:
        msd.supcon_loss(x[:2], y[:2], backend="triton")
        out["bad"] = None
    except ValueError as exc:
        out["bad"] = str(exc)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("distributed_pairs"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
def test_matches_single_process(results, case):
    for rank in range(WORLD):
        got = results[rank][case]
        assert got["loss_err"] <= TOL and got["grad_err"] <= TOL, (rank, got)
    if case[2] != "none":  # every rank holds the same bits
        assert all(torch.equal(results[r][case]["loss"], results[0][case]["loss"]) for r in range(WORLD))


def test_a_backend_that_cannot_serve_the_inputs_raises_on_every_rank(results):
    assert all("backend='triton' cannot serve torch.float64" in (results[r]["bad"] or "") for r in range(WORLD))
