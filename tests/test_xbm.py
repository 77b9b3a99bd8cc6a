"""CrossBatchMemory against the dense `reference` backend on a FIFO simulated with plain Python lists.

Each step's expected loss is `multi_similarity_loss(batch, labels, memory, memory_labels,
ref_self_index=slots, backend="reference")` in float64 on the same (rounded) numbers, with memory, labels
and slots taken from the list simulation. Tolerances: helpers.TOLERANCE.
"""
import pytest
import torch

from backends_under_test import FAST_CPU_BACKENDS
from helpers import TOLERANCE, clustered, loss_and_grads, rel_err, threshold_gap
from ms_fused import CrossBatchMemory, multi_similarity_loss
from ms_fused.engine._inputs import compute_dtype

MEMORY, DIM, CLASSES = 37, 11, 6
# 9+16+7 = 32 rows fill most of the memory, 20 wraps around, 45 > 37 overwrites its own first rows
BATCHES = [9, 16, 7, 20, 45, 12]


class ListFifo:
    """The memory as the issue describes it, one row at a time."""

    def __init__(self, size):
        self.size, self.rows, self.labels, self.ptr, self.filled = size, [None] * size, [None] * size, 0, 0

    def push(self, x, y):
        slots = []
        for row, label in zip(x, y.tolist()):
            self.rows[self.ptr], self.labels[self.ptr] = row, label
            slots.append(self.ptr)
            self.ptr, self.filled = (self.ptr + 1) % self.size, min(self.size, self.filled + 1)
        last_writer = {slot: i for i, slot in enumerate(slots)}
        return torch.tensor([s if last_writer[s] == i else -1 for i, s in enumerate(slots)])

    def contents(self):
        return torch.stack(self.rows[: self.filled]), torch.tensor(self.labels[: self.filled])


def stream(seed, dtype, margin=1e-5):
    """Steps (x, y, memory, memory_labels, slots) of one clustered stream, in `dtype`.

    Streams with a pair within `margin` of a mining threshold are redrawn: such a pair flips between
    implementations on rounding alone (see helpers.clustered_batch)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x_all, y_all = clustered(sum(BATCHES), DIM, CLASSES, gen)
        x_all = x_all.to(dtype)
        fifo, steps = ListFifo(MEMORY), []
        for x, y in zip(x_all.split(BATCHES), y_all.split(BATCHES)):
            slots = fifo.push(x, y)
            mem, mem_labels = fifo.contents()
            steps.append((x, y, mem, mem_labels, slots))
        if all(threshold_gap(x, y, m, my, s) > margin for x, y, m, my, s in steps):
            return steps
    raise RuntimeError("no stream away from the mining thresholds")


def written(batches, normalize=True):
    """What the memory holds after `batches` [(x, y), ...]: the list FIFO fed, batch by batch, the rows that
    CrossBatchMemory defines, with normalize the unit rows F.normalize(x[kept]) of each batch's kept rows (its
    last MEMORY), normalised in float32 (float64 for float64). The bits equal the memory's by docs/semantics.md
    "Reproducibility", repeat: the same operation on the same batch rows (normalising another stack of the same
    rows could round them otherwise). Returns (rows, labels)."""
    fifo = ListFifo(MEMORY)
    for x, y in batches:
        rows = x.detach().clone()
        if normalize:
            kept = slice(max(0, x.shape[0] - MEMORY), x.shape[0])
            rows[kept] = torch.nn.functional.normalize(x.detach()[kept].to(compute_dtype(x.dtype)), dim=1).to(x.dtype)
        fifo.push(rows, y)
    return fifo.contents()


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# without mining an anchor's own copy in the memory would always count, so its removal is tested there
@pytest.mark.parametrize("reduction, mining", [("mean", True), ("none", False)])
def test_matches_reference_over_steps(backend, dtype, reduction, mining):
    for seed in range(2):
        xbm = CrossBatchMemory(MEMORY, DIM, dtype=dtype, backend=backend, reduction=reduction, mining=mining)
        steps = stream(seed, dtype)
        for step, (x, y, mem, mem_labels, slots) in enumerate(steps):
            loss, (grad,) = loss_and_grads(lambda q, y, *_, **__: xbm(q, y), x, y)
            ref_loss, (ref_grad, _) = loss_and_grads("reference", x, y, mem, mem_labels, dtype=torch.float64,
                                                     grad_ref=False, ref_self_index=slots, reduction=reduction,
                                                     mining=mining)
            filled = int(xbm.filled)
            rows, _ = written([s[:2] for s in steps[:step + 1]])
            assert torch.equal(xbm.memory[:filled], rows) and torch.equal(xbm.memory_labels[:filled], mem_labels)
            assert loss.dtype == dtype and grad.dtype == dtype
            assert rel_err(loss, ref_loss) <= TOLERANCE[dtype].loss, (seed, step, rel_err(loss, ref_loss))
            assert rel_err(grad, ref_grad) <= TOLERANCE[dtype].grad, (seed, step, rel_err(grad, ref_grad))
        assert int(xbm.filled) == MEMORY and int(xbm.ptr) == sum(BATCHES) % MEMORY


def test_no_gradient_reaches_the_memory():
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    for x, y, *_ in stream(0, torch.float64)[:3]:
        x = x.clone().requires_grad_(True)
        xbm(x, y).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not xbm.memory.requires_grad and xbm.memory.grad is None
    assert [name for name, _ in xbm.named_parameters()] == []


def test_state_dict_restores_the_memory():
    steps = stream(1, torch.float64)
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    for x, y, *_ in steps[:3]:
        xbm(x, y)
    restored = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    restored.load_state_dict(xbm.state_dict())
    assert set(xbm.state_dict()) == {"memory", "memory_labels", "ptr", "filled"}
    for x, y, *_ in steps[3:]:  # the same state and the same batches: "Reproducibility", repeat
        assert torch.equal(xbm(x, y), restored(x, y))
    assert torch.equal(xbm.memory, restored.memory) and int(xbm.ptr) == int(restored.ptr)


def test_reset_empties_the_memory():
    (x, y, *_), = stream(2, torch.float64)[:1]
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    xbm(x, y)
    xbm.reset()
    fresh = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64)
    assert int(xbm.filled) == 0 and torch.equal(xbm(x, y), fresh(x, y))  # repeat, from an empty memory


def test_batch_is_cast_to_the_memory_dtype():
    (x, y, *_), = stream(3, torch.float64)[:1]
    x = x.clone().requires_grad_(True)
    loss = CrossBatchMemory(MEMORY, DIM)(x, y)  # float32 memory by default
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float64


def test_bad_batches_leave_the_memory_untouched():
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, check_finite=True)
    (x, y, *_), = stream(4, torch.float64)[:1]
    xbm(x, y)
    before = {k: v.clone() for k, v in xbm.state_dict().items()}
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        xbm(bad_x, y)
    with pytest.raises(ValueError, match="embedding_dim"):
        xbm(x[:, :-1], y)
    with pytest.raises(ValueError, match="labels"):
        xbm(x, y[:-1])
    with pytest.raises(TypeError, match="labels"):
        xbm(x, y.double())
    assert all(torch.equal(before[k], v) for k, v in xbm.state_dict().items())  # nothing written: no arithmetic


def test_nan_without_check_finite_gives_nan():
    (x, y, *_), = stream(5, torch.float64)[:1]
    x = x.clone()
    x[0, 0] = float("nan")
    losses = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, reduction="none")(x, y)
    assert torch.isnan(losses).all()  # the NaN row is in the memory, so every anchor's row touches it


@pytest.mark.parametrize("args, error", [((0, 4), ValueError), ((4, 0), ValueError), ((4.0, 4), ValueError)])
def test_bad_sizes_raise(args, error):
    with pytest.raises(error, match="memory_size|embedding_dim"):
        CrossBatchMemory(*args)


def test_bad_loss_options_raise():
    with pytest.raises(ValueError, match="alpha"):
        CrossBatchMemory(8, 4, alpha=-1.0)
    with pytest.raises(TypeError):
        CrossBatchMemory(8, 4, ref_emb=torch.zeros(1, 4))


def reference_grads(steps, weights, scale=1.0, **kw):
    """Gradient of Σ_k w_k · loss_k, each step against the memory as it was at that step (list simulation)."""
    grads = []
    for (x, y, mem, mem_labels, slots), w in zip(steps, weights):
        leaf = (x.double() * scale).requires_grad_(True)
        loss = multi_similarity_loss(leaf, y, mem.double() * scale, mem_labels, ref_self_index=slots,
                                     backend="reference", **kw)
        grads.append(torch.autograd.grad(w * loss, leaf)[0])
    return grads


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_several_steps_before_one_backward(backend, normalize):
    """Gradient accumulation written as one sum: the later steps overwrite memory rows (the fourth wraps
    around) that the earlier steps' backward needs; each step must still see the memory of its forward."""
    steps = stream(6, torch.float64)[:4]
    scale = 1.0 if normalize else 0.25  # unnormalised rows: keep |S| moderate
    weights = [1.0, 0.5, 2.0, 1.5]
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, backend=backend, normalize=normalize)
    leaves = [(x * scale).requires_grad_(True) for x, *_ in steps]
    total = sum(w * xbm(leaf, y) for leaf, (_, y, *_), w in zip(leaves, steps, weights))
    total.backward()
    for leaf, ref_grad in zip(leaves, reference_grads(steps, weights, scale, normalize=normalize)):
        assert rel_err(leaf.grad, ref_grad) <= TOLERANCE[torch.float64].grad
    rows, labels = written([(leaf, y) for leaf, (_, y, *_) in zip(leaves, steps)], normalize)
    assert torch.equal(xbm.memory[: int(xbm.filled)], rows)
    assert torch.equal(xbm.memory_labels[: int(xbm.filled)], labels)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_retained_graph_keeps_its_memory(backend):
    steps = stream(7, torch.float64)[:2]
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, backend=backend)
    first = steps[0][0].clone().requires_grad_(True)
    loss = xbm(first, steps[0][1])
    loss.backward(retain_graph=True)
    xbm(*steps[1][:2])  # overwrites nothing yet, but writes the memory the retained graph saved
    xbm(*stream(8, torch.float64)[4][:2])  # 45 rows: every slot is overwritten
    loss.backward()
    (ref_grad,) = reference_grads(steps[:1], [2.0])  # two backwards accumulate twice the first step's gradient
    assert rel_err(first.grad, ref_grad) <= TOLERANCE[torch.float64].grad


def test_backward_after_each_step_copies_nothing():
    xbm = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, backend="torch", normalize=False)
    for x, y, *_ in stream(9, torch.float64)[:3]:
        xbm(x.clone().requires_grad_(True), y).backward()
        assert len(xbm._saved_rows) == 0  # the graph let go of the memory rows it saved


def test_in_place_change_of_a_saved_input_is_still_caught():
    (x, y, *_), = stream(10, torch.float64)[:1]
    leaf = x.clone().requires_grad_(True)
    anchors = leaf * 1.0
    loss = CrossBatchMemory(MEMORY, DIM, dtype=torch.float64, backend="torch")(anchors, y)
    with torch.no_grad():
        anchors.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an in-?place operation"):
        loss.backward()
