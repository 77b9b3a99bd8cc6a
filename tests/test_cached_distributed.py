"""`cached_backward` under DistributedDataParallel on 2 gloo processes against the non-cached distributed step.

Each rank holds a different number of rows (so a different number of chunks); the loss is
`ms_fused.distributed.multi_similarity_loss` times the world size (see that module). A communication hook
counts DDP's all-reduces: one per step, however many chunks. Tolerance: float64 1e-10 (relative error).
"""

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import rel_err, spawn_ranks

WORLD, SPLIT, CHUNK, IN, DIM, CLASSES = 2, (11, 6), 4, 7, 9, 3


def model_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
    twin = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
    twin.load_state_dict(model.state_dict())
    return model, twin


def counting_ddp(module, calls):
    ddp = DDP(module)

    def hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


def worker(rank):
    import ms_fused
    import ms_fused.distributed as msd

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(sum(SPLIT), IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (sum(SPLIT),), generator=gen)
    start, n = sum(SPLIT[:rank]), SPLIT[rank]
    x, y = x[start:start + n], y[start:start + n]

    def loss_fn(embeddings, labels):
        return msd.multi_similarity_loss(embeddings, labels) * WORLD

    model, twin = model_pair()
    cached_calls, plain_calls = [], []
    cached, plain = counting_ddp(model, cached_calls), counting_ddp(twin, plain_calls)
    loss = ms_fused.cached_backward(cached, x, y, chunk_size=CHUNK, loss_fn=loss_fn)
    expected = loss_fn(plain(x), y)
    expected.backward()
    result = dict(loss_err=rel_err(loss, expected), cached_calls=len(cached_calls), plain_calls=len(plain_calls),
                  grad_errs={name: rel_err(p.grad, q.grad)
                             for (name, p), q in zip(model.named_parameters(), twin.parameters())})
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("cached_distributed"))


def test_parameter_gradients_equal_the_non_cached_ddp_step(results):
    for rank, result in enumerate(results):
        assert result["loss_err"] <= 1e-12, (rank, result)
        for name, err in result["grad_errs"].items():
            assert err <= 1e-10, (rank, name, err)


def test_gradients_are_all_reduced_once_per_step(results):
    for rank, result in enumerate(results):
        assert result["cached_calls"] == result["plain_calls"] == 1, (rank, result)
