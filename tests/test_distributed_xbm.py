"""`ms_fused.distributed.CrossBatchMemory` on gloo processes (2 and 3 ranks) against single-process
`CrossBatchMemory` fed the concatenated batches.

One spawn of 3 CPU processes (file:// rendezvous): world size 3 on the default group, world size 2 on the
group of ranks 0 and 1. Each step's global batch is drawn identically on every rank; a rank takes its slice.
The memory (23 rows) wraps around within the steps. Tolerance (relative error, float64): 1e-10.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from backends_under_test import FAST_CPU_BACKENDS
from helpers import clustered_batch, rel_err, spawn_ranks
from ms_fused import CrossBatchMemory

TOL = 1e-10
WORLD, DIM, CLASSES, MEMORY = 3, 9, 4, 23
# local batch sizes per step: unequal, a rank with none; 36 rows in all pass the 23-row memory
STEPS = {3: [(5, 0, 4), (3, 7, 2), (1, 6, 8)], 2: [(5, 4), (0, 7), (9, 6), (3, 2)]}
OPTIONS = [dict(reduction="mean"), dict(reduction="sum", mining=False)]


def step_batch(world, step):
    return clustered_batch(sum(STEPS[world][step]), DIM, CLASSES, 100 * world + step)


def single_process(world, backend, options):
    """Per step: the loss and gradient of single-process CrossBatchMemory on the concatenated batch, its memory."""
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, backend=backend, **options)
    out = []
    for step in range(len(STEPS[world])):
        x, y = step_batch(world, step)
        leaf = x.clone().requires_grad_(True)
        loss = xbm(leaf, y)
        loss.backward()
        out.append((loss.detach(), leaf.grad, xbm.memory.clone(), xbm.memory_labels.clone()))
    return out


def run_steps(rank, world, group, backend, options):
    import ms_fused.distributed as msd

    xbm = msd.CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, group=group, backend=backend, **options)
    out = []
    for step, (split, (loss_ref, grad_ref, mem_ref, labels_ref)) in enumerate(
            zip(STEPS[world], single_process(world, backend, options))):
        x, y = step_batch(world, step)
        start, n = sum(split[:rank]), split[rank]
        leaf = x[start:start + n].clone().requires_grad_(True)
        loss = xbm(leaf, y[start:start + n])
        loss.backward()
        out.append(dict(loss=loss.detach(), memory=xbm.memory.clone(), labels=xbm.memory_labels.clone(),
                        loss_err=rel_err(loss, loss_ref), grad_err=rel_err(leaf.grad, grad_ref[start:start + n]),
                        # repeat: the same rows (the gathered batch equals X) normalised the same way
                        same_memory=torch.equal(xbm.memory, mem_ref) and torch.equal(xbm.memory_labels, labels_ref)))
    return out


def run_ddp(rank, group):
    """DDP over ranks 0 and 1, loss times the world size: parameter gradients equal single-process ones."""
    import ms_fused.distributed as msd
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Linear(DIM, DIM, dtype=torch.float64)
    single = nn.Linear(DIM, DIM, dtype=torch.float64)
    single.load_state_dict(model.state_dict())
    ddp = DDP(model, process_group=group)
    xbm = msd.CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, group=group)
    xbm_single = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    errors = []
    for step, split in enumerate(STEPS[2]):
        x, y = step_batch(2, step)
        model.zero_grad()
        single.zero_grad()
        xbm_single(single(x), y).backward()
        start, n = sum(split[:rank]), split[rank]
        (xbm(ddp(x[start:start + n]), y[start:start + n]) * dist.get_world_size(group)).backward()
        errors.append({name: rel_err(p.grad, q.grad)
                       for (name, p), q in zip(model.named_parameters(), single.parameters())})
    return errors


def run_bad_inputs(rank):
    """A bad input on one rank (NaN with check_finite=True included) raises on every rank, and no rank's memory
    changes."""
    import ms_fused.distributed as msd

    xbm = msd.CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, check_finite=True)
    x, y = step_batch(3, 0)
    x, y = x[3 * rank:3 * rank + 3], y[3 * rank:3 * rank + 3]
    xbm(x, y)
    errors = {}
    for name, (xr, yr) in {"dim on rank 1": (x[:, :-1] if rank == 1 else x, y),
                           "labels on rank 2": (x, y[:-1] if rank == 2 else y),
                           "NaN on rank 0": (x.clone().fill_(float("nan")) if rank == 0 else x, y)}.items():
        try:
            xbm(xr, yr)
            errors[name] = None
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return dict(errors=errors, filled=int(xbm.filled))


def worker(rank):
    pair = dist.new_group([0, 1])
    result = {"steps": {}}
    for world, group in ((3, None), (2, pair)):
        if rank >= world:
            continue
        for backend in FAST_CPU_BACKENDS:
            for i, options in enumerate(OPTIONS):
                result["steps"][(world, backend, i)] = run_steps(rank, world, group, backend, options)
    result["bad"] = run_bad_inputs(rank)
    if rank < 2:
        result["ddp"] = run_ddp(rank, pair)
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("distributed_xbm"))


CASES = [(world, backend, i) for world in (3, 2) for backend in FAST_CPU_BACKENDS for i in range(len(OPTIONS))]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_memories_identical_on_every_rank_and_equal_to_single_process(results, case):
    world = case[0]
    for step in range(len(STEPS[world])):
        first = results[0]["steps"][case][step]
        for rank in range(world):
            got = results[rank]["steps"][case][step]
            # docs/semantics.md "Reproducibility", distributed: every rank enqueues the same gathered rows
            assert torch.equal(got["memory"], first["memory"]) and torch.equal(got["labels"], first["labels"])
            assert got["same_memory"], (rank, step)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss_and_gradient_equal_single_process(results, case):
    world = case[0]
    for step in range(len(STEPS[world])):
        losses = [results[rank]["steps"][case][step]["loss"] for rank in range(world)]
        # docs/semantics.md "Reproducibility", distributed: the ranks' sums are added in rank order everywhere
        assert all(torch.equal(loss, losses[0]) for loss in losses)
        for rank in range(world):
            got = results[rank]["steps"][case][step]
            assert got["loss_err"] <= TOL and got["grad_err"] <= TOL, (rank, step, got)


def test_ddp_parameter_gradients_equal_single_process(results):
    for rank in range(2):
        for step, errors in enumerate(results[rank]["ddp"]):
            for name, err in errors.items():
                assert err <= TOL, (rank, step, name, err)


def test_bad_input_on_one_rank_raises_on_every_rank(results):
    for rank in range(WORLD):
        bad = results[rank]["bad"]
        assert all(message is not None for message in bad["errors"].values()), (rank, bad)
        assert bad["filled"] == 9  # only the first, good step was written
    assert "embedding_dim" in results[1]["bad"]["errors"]["dim on rank 1"]
    assert "rank(s) [1]" in results[0]["bad"]["errors"]["dim on rank 1"]
    assert "labels" in results[2]["bad"]["errors"]["labels on rank 2"]
    assert "NaN" in results[0]["bad"]["errors"]["NaN on rank 0"]
