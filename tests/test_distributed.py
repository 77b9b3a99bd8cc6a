"""`ms_fused.distributed.multi_similarity_loss` on gloo processes against the single-process loss of the whole batch.

One spawn of 3 CPU processes (file:// rendezvous, no ports) serves every case: world size 3 runs on the
default group, world size 2 on the group of ranks 0 and 1. Each rank draws the same global batch, takes
its slice, and records its loss and gradient next to the float64 `reference` result on the concatenated
batch (same rounded numbers). Tolerances: helpers.TOLERANCE.
"""
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from backends_under_test import FAST_CPU_BACKENDS
from helpers import TOLERANCE, clustered_batch, loss_and_grads, rel_err, spawn_ranks
from ms_fused import multi_similarity_loss

WORLD, DIM, CLASSES = 3, 13, 5
# local batch sizes per rank: unequal, a rank with a single sample, a rank with none
SPLITS = [(5, 9), (1, 12), (1, 6, 11), (7, 0, 4)]
# (reduction, mining): without mining a row's own copy would always count, so its exclusion is tested there
OPTIONS = [("mean", True), ("sum", False), ("none", False)]
CASES = [(split, dtype, reduction, mining, backend)
         for split, dtype, (reduction, mining), backend in itertools.product(
             range(len(SPLITS)), [torch.float64, torch.float32], OPTIONS, FAST_CPU_BACKENDS)]


def global_batch(split, seed=0):
    return clustered_batch(sum(split), DIM, CLASSES, seed + 17 * len(split) + sum(split))


def run_cases(rank, groups):
    import ms_fused.distributed as msd

    out = {}
    for case in CASES:
        split_id, dtype, reduction, mining, backend = case
        split = SPLITS[split_id]
        if rank >= len(split):
            continue
        x, y = global_batch(split)
        x = x.to(dtype)
        start, n = sum(split[:rank]), split[rank]
        weights = torch.linspace(0.5, 1.5, sum(split), dtype=torch.float64)
        kw = dict(reduction=reduction, mining=mining)
        w = weights if reduction == "none" else torch.ones((), dtype=torch.float64)
        ref_loss, (ref_grad,) = loss_and_grads("reference", x, y, dtype=torch.float64, weights=w, **kw)
        w_local = w[start:start + n] if reduction == "none" else w
        loss, (grad,) = loss_and_grads(
            lambda q, yq, *_, **kw: msd.multi_similarity_loss(q, yq, group=groups[len(split)], backend=backend, **kw),
            x[start:start + n], y[start:start + n], weights=w_local, **kw)
        expected = ref_loss[start:start + n] if reduction == "none" else ref_loss
        out[case] = dict(loss=loss, loss_err=rel_err(loss, expected), grad_err=rel_err(grad, ref_grad[start:start + n]),
                         dtypes=(loss.dtype, grad.dtype))
    return out


def run_ddp(rank, group):
    """DDP over ranks 0 and 1 with the loss scaled by the world size: the parameter gradients must be those of
    one process training on the concatenated batch."""
    import ms_fused.distributed as msd
    from torch.nn.parallel import DistributedDataParallel as DDP

    split = (5, 9)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(sum(split), 7, generator=gen, dtype=torch.float64)
    _, y = global_batch(split, seed=3)
    torch.manual_seed(0)
    model = nn.Linear(7, DIM, dtype=torch.float64)
    single = nn.Linear(7, DIM, dtype=torch.float64)
    single.load_state_dict(model.state_dict())
    multi_similarity_loss(single(inputs), y, backend="reference").backward()

    ddp = DDP(model, process_group=group)
    start, n = sum(split[:rank]), split[rank]
    loss = msd.multi_similarity_loss(ddp(inputs[start:start + n]), y[start:start + n], group=group)
    (loss * dist.get_world_size(group)).backward()
    return {name: rel_err(p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), single.parameters())}


def run_bad_inputs(rank):
    """A bad input on one rank must make every rank raise, never leave the others waiting."""
    import ms_fused.distributed as msd

    x, y = global_batch((4, 4, 4))
    x, y = x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]
    errors = {}
    for name, (xr, yr) in {"labels length on rank 1": (x, y[:-1] if rank == 1 else y),
                           "dim on rank 2": (x[:, :-1] if rank == 2 else x, y),
                           "dtype on rank 0": (x.float() if rank == 0 else x, y)}.items():
        try:
            msd.multi_similarity_loss(xr, yr)
            errors[name] = None
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def worker(rank):
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    result = dict(cases=run_cases(rank, {2: pair, 3: None}), bad=run_bad_inputs(rank))
    if rank < 2:
        result["ddp"] = run_ddp(rank, pair)
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
def test_matches_single_process(results, case):
    split_id, dtype, reduction, *_ = case
    for rank in range(len(SPLITS[split_id])):
        got = results[rank]["cases"][case]
        assert got["loss_err"] <= TOLERANCE[dtype].loss, (rank, got)
        assert got["grad_err"] <= TOLERANCE[dtype].grad, (rank, got)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert got["dtypes"] == (out_dtype, dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] != "none"], ids=lambda c: str(c))
def test_every_rank_gets_the_same_loss(results, case):
    losses = [results[rank]["cases"][case]["loss"] for rank in range(len(SPLITS[case[0]]))]
    # docs/semantics.md "Reproducibility", distributed: the ranks' sums are added in rank order on every rank
    assert all(torch.equal(loss, losses[0]) for loss in losses)


def test_ddp_with_loss_times_world_size_matches_single_process(results):
    for rank in range(2):
        for name, err in results[rank]["ddp"].items():
            assert err <= TOLERANCE[torch.float64].grad, (rank, name, err)


def test_bad_input_on_one_rank_raises_on_every_rank(results):
    for rank in range(WORLD):
        errors = results[rank]["bad"]
        assert all(message is not None for message in errors.values()), (rank, errors)
    assert "labels" in results[1]["bad"]["labels length on rank 1"]
    assert "rank(s) [1]" in results[0]["bad"]["labels length on rank 1"]
    assert "dim" in results[0]["bad"]["dim on rank 2"]
