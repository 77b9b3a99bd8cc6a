"""SupCon, NT-Xent and Circle loss (docs/semantics.md "Pair-weighting losses") on every backend that serves them
(`reference`: ms_fused/losses/pair_reference.py; `torch`: losses/pair_losses.py on engine/torch/pair_engine.py) against
pytorch-metric-learning's SupConLoss, NTXentLoss and CircleLoss in float64: loss and gradients within 1e-10
(relative), on fresh random batches each run, in self mode and against a reference set, on odd shapes, with
anchors without positives, one class and all classes distinct; the modules called as pml's are.
"""
import pytest
import torch

from helpers import clustered, rel_err
import ms_fused
from ms_fused.losses.pair_api import PAIR_BACKENDS as ALL_PAIR_BACKENDS
from ms_fused.losses.pair_reference import DEFAULTS, PAIR_LOSSES, pair_loss

# the float64 backends (triton computes in float32 at most: tests/test_triton_pair_losses.py holds it to the
# float64 reference within helpers.TOLERANCE)
PAIR_BACKENDS = [b for b in ALL_PAIR_BACKENDS if b != "triton"]

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

PML = {"supcon": pml_losses.SupConLoss, "ntxent": pml_losses.NTXentLoss, "circle": pml_losses.CircleLoss}
PARAMS = {"supcon": [dict(), dict(temperature=0.5)], "ntxent": [dict(), dict(temperature=0.2)],
          "circle": [dict(), dict(m=0.25, gamma=256.0)]}
TOL = 1e-10  # float64, pml's summation order against ours


def batch(case: str, seed: int):
    """(x, y, r, yr) of one edge case, r and yr None in self mode; fresh draws each run."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))) + seed)
    if case == "self":
        x, y = clustered(37, 5, 6, gen)
        return x, y, None, None
    if case == "reference":
        (x, y), (r, yr) = clustered(23, 7, 5, gen), clustered(41, 7, 5, gen)
        return x, y, r, yr
    if case == "without_positives":  # labels 100.. occur once: those anchors have no positive pair
        x, y = clustered(29, 6, 4, gen)
        y[::3] = torch.arange(100, 100 + len(y[::3]))
        return x, y, None, None
    if case == "one_class":
        x, _ = clustered(17, 4, 1, gen)
        return x, torch.zeros(17, dtype=torch.int64), None, None
    if case == "all_distinct":
        x, _ = clustered(13, 4, 13, gen)
        return x, torch.arange(13), None, None
    raise ValueError(case)


def loss_and_grads(fn, x, y, r, yr):
    xs = x.clone().requires_grad_(True)
    rs = None if r is None else r.clone().requires_grad_(True)
    loss = fn(xs, y, rs, yr)
    leaves = [xs] if rs is None else [xs, rs]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


MODULES = {"supcon": ms_fused.SupConLoss, "ntxent": ms_fused.NTXentLoss, "circle": ms_fused.CircleLoss}


@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("case", ["self", "reference", "without_positives", "one_class", "all_distinct"])
def test_equals_pml_float64(backend, name, case):
    for seed, params in enumerate(PARAMS[name]):
        x, y, r, yr = batch(case, seed)
        pml = PML[name](**{**DEFAULTS[name], **params})
        theirs = loss_and_grads(lambda *b: pml(b[0], b[1], None, b[2], b[3]), x, y, r, yr)
        ours_module = MODULES[name](**params, backend=backend)
        ours = loss_and_grads(lambda *b: ours_module(b[0], b[1], None, b[2], b[3]), x, y, r, yr)
        assert ours[0].dtype == torch.float64
        assert rel_err(ours[0], theirs[0]) <= TOL, (ours[0], theirs[0])
        for mine, pmls in zip(ours[1], theirs[1]):
            assert rel_err(mine, pmls) <= TOL
        if case in ("all_distinct", "one_class"):  # no positive pair, or no negative pair: a zero, every gradient 0
            assert float(ours[0]) == 0.0 and all(float(g.abs().max()) == 0.0 for g in ours[1])


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_per_anchor_losses_reduce_to_the_loss(name):
    x, y, _, _ = batch("without_positives", 7)
    per_anchor = pair_loss(name, x, y, reduction="none")
    loss = pair_loss(name, x, y)
    assert per_anchor.shape == (len(y),)
    singles = torch.bincount(y)[y] == 1
    assert torch.equal(per_anchor[singles], torch.zeros_like(per_anchor[singles]))  # no positive: no loss
    if name == "ntxent":  # the mean over positive pairs
        pairs = (torch.bincount(y)[y] - 1).sum()
        assert rel_err(per_anchor.sum() / pairs, loss) <= TOL
    else:  # the mean over anchors with a loss > 0
        assert rel_err(per_anchor[per_anchor > 0].mean(), loss) <= TOL


@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_memory_bank_equals_pmls_float64(backend, name):
    """ms_fused.CrossBatchMemory(loss=...) against pml's CrossBatchMemory(loss) over steps that wrap the memory
    around (batches of 9 and 11 rows, 20 slots), own copies removed from the positives as pml removes them."""
    from pytorch_metric_learning.losses import CrossBatchMemory as PmlMemory

    ours = ms_fused.CrossBatchMemory(20, 6, dtype=torch.float64, loss=MODULES[name](backend=backend))
    theirs = PmlMemory(PML[name](**DEFAULTS[name]), 6, memory_size=20)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for step in range(4):
        x, y = clustered(9 + 2 * (step % 2), 6, 4, gen)
        mine = loss_and_grads(lambda xs, *_: ours(xs, y), x, y, None, None)
        pmls = loss_and_grads(lambda xs, *_: theirs(xs, y), x, y, None, None)
        assert rel_err(mine[0], pmls[0]) <= TOL
        assert rel_err(mine[1][0], pmls[1][0]) <= TOL
