"""Mining statistics (num_pos_pairs, num_neg_pairs, num_anchors_with_pairs) against the float64 `reference`
masks and pml's MultiSimilarityMiner counts, on every backend (triton through the interpreter, small sizes),
mining on and off, self mode, reference mode and reference mode with own copies.

Counts are compared exactly (docs/semantics.md "Reproducibility", counts): every batch keeps each pair
farther from a mining threshold than rounding can move it (helpers.similarity_rounding), so every
implementation mines the same pairs on every CPU."""
import pytest
import torch

from backends_under_test import CPU_BACKENDS
from helpers import TOLERANCE, clustered_batch, rel_err, similarity_rounding, threshold_gap
from ms_fused import MultiSimilarityLoss, PairStats, available_backends, multi_similarity_loss
from ms_fused.losses.ms_reference import mined_masks, pair_masks
from ms_fused.engine._inputs import HyperParams

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

ALL_BACKENDS = CPU_BACKENDS + (["triton"] if "triton" in available_backends("cpu") else [])
# the interpreter runs every Triton program in Python: the same cases at a third of the size
SIZES = {"triton": dict(n=40, m=70, d=12, classes=5)}
DEFAULT_SIZE = dict(n=120, m=200, d=24, classes=10)


def batch(backend, mode, seed, dtype=torch.float64):
    s = SIZES.get(backend, DEFAULT_SIZE)
    if mode == "self":
        x, y = clustered_batch(s["n"], s["d"], s["classes"], seed, dtype=dtype)
        return x, y, None, None, None
    x, y, r, yr = clustered_batch(s["n"], s["d"], s["classes"], seed, dtype=dtype, m=s["m"])
    if mode == "ref_self_index":  # the batch is part of the reference set, as in a memory bank (rows 5 .. 5 + n)
        r, yr = torch.cat([r[:5], x, r[5:]]), torch.cat([yr[:5], y, yr[5:]])
        ref_self_index = torch.arange(5, 5 + x.shape[0])
        # clustered_batch kept the pairs with r away from the thresholds; those among the batch's own rows:
        # beyond twice the similarity rounding, and the rounding of S ± ε (u · 1.1, twice)
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        margin = 2 * similarity_rounding(cd, s["d"]) + 4 * torch.finfo(cd).eps
        assert threshold_gap(x, y, r, yr, ref_self_index=ref_self_index) > margin
        return x, y, r, yr, ref_self_index
    return x, y, r, yr, None


def expected(x, y, r, yr, ref_self_index, mining):
    """Counts from the reference's own masks, in float64."""
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    rh = xh if r is None else torch.nn.functional.normalize(r.double(), dim=1)
    yr_ = y if r is None else yr
    if r is None:
        ref_self_index = torch.arange(x.shape[0])
    S = xh @ rh.T
    pos, neg = pair_masks(y, yr_, ref_self_index)
    hard_pos, hard_neg = mined_masks(S, pos, neg, HyperParams(mining=mining))
    return (int(hard_pos.sum()), int(hard_neg.sum()), int((hard_pos | hard_neg).any(dim=1).sum()))


def as_ints(stats: PairStats):
    for t in stats:
        assert t.dtype == torch.int64 and t.dim() == 0
    return tuple(int(t) for t in stats)


def pml_counts(x, y, r, yr, mining):
    if mining:
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
        miner(x, y) if r is None else miner(x, y, r, yr)
        return int(miner.num_pos_pairs), int(miner.num_neg_pairs)
    a1, _, a2, _ = pml_lmu.get_all_pairs_indices(y, None if r is None else yr)
    return a1.numel(), a2.numel()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["self", "ref", "ref_self_index"])
@pytest.mark.parametrize("mining", [True, False])
def test_counts_match_reference_and_pml(backend, mode, mining):
    dtype = torch.float32 if backend == "triton" else torch.float64
    for seed in range(2):
        x, y, r, yr, ref_self_index = batch(backend, mode, seed, dtype)
        loss, stats = multi_similarity_loss(x, y, r, yr, ref_self_index=ref_self_index, mining=mining, backend=backend,
                                            return_stats=True)
        want = expected(x, y, r, yr, ref_self_index, mining)
        assert as_ints(stats) == want
        if mode != "ref_self_index":  # pml knows no own copies in reference mode
            assert as_ints(stats)[:2] == pml_counts(x.double(), y, None if r is None else r.double(), yr, mining)
        plain = multi_similarity_loss(x, y, r, yr, ref_self_index=ref_self_index, mining=mining, backend=backend)
        if backend == "triton":  # kernels compiled with COUNT_PAIRS: on a GPU maybe another tuned tile shape
            assert rel_err(loss, plain) <= TOLERANCE[dtype].loss
        else:  # "Reproducibility", repeat: counting adds no float operation to cpp, torch or reference
            assert torch.equal(loss, plain)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_keeps_the_last_calls_stats(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    loss_fn = MultiSimilarityLoss(backend=backend)
    assert loss_fn.num_pos_pairs is None
    for mode in ("self", "ref_self_index"):
        x, y, r, yr, ref_self_index = batch(backend, mode, 3, dtype)
        loss_fn(x.requires_grad_(True), y, ref_emb=r, ref_labels=yr, ref_self_index=ref_self_index).backward()
        got = (loss_fn.num_pos_pairs, loss_fn.num_neg_pairs, loss_fn.num_anchors_with_pairs)
        assert as_ints(PairStats(*got)) == expected(x.detach(), y, r, yr, ref_self_index, True)
        assert all(t.device == x.device for t in got)


def test_anchor_without_pairs_is_not_counted():
    # anchor 2 is alone in its class and every negative of it is far below epsilon: nothing is mined for it
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    for backend in CPU_BACKENDS:
        _, stats = multi_similarity_loss(x, y, backend=backend, return_stats=True)
        assert as_ints(stats) == (0, 0, 0)
        _, stats = multi_similarity_loss(x, y, backend=backend, mining=False, return_stats=True)
        assert as_ints(stats) == (2, 4, 3)


def test_return_stats_must_be_a_bool():
    x, y = clustered_batch(8, 4, 2, 0)
    with pytest.raises(TypeError, match="return_stats"):
        multi_similarity_loss(x, y, return_stats=1)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch", "reference") if b in CPU_BACKENDS])
def test_both_forms_under_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, y = clustered_batch(64, 16, 8, 5)
    want = expected(x, y, None, None, None, True)

    def functional(x, y):
        return multi_similarity_loss(x, y, backend=backend, return_stats=True)

    loss_fn = MultiSimilarityLoss(backend=backend)

    def module_form(x, y):
        loss = loss_fn(x, y)
        return loss, (loss_fn.num_pos_pairs, loss_fn.num_neg_pairs, loss_fn.num_anchors_with_pairs)

    for fn in (functional, module_form):
        leaf = x.clone().requires_grad_(True)
        loss, stats = torch.compile(fn, fullgraph=True, backend="aot_eager")(leaf, y)
        loss.backward()
        assert as_ints(PairStats(*stats)) == want
        assert torch.allclose(loss, multi_similarity_loss(x, y, backend=backend), rtol=1e-12, atol=0)
    assert as_ints(PairStats(loss_fn.num_pos_pairs, loss_fn.num_neg_pairs, loss_fn.num_anchors_with_pairs)) == want
    torch._dynamo.reset()
