"""ms_fused.sentence_transformers on a tiny BERT built here (tests/st_tiny.py): no model hub, no download.

Skipped where sentence-transformers is not installed (requirements-dev.txt installs it for CI)."""
from __future__ import annotations

import warnings

import pytest

from st_tiny import corpus, features, tiny_model  # sets HF_HUB_OFFLINE before transformers is imported

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import ms_fused  # noqa: E402
from helpers import rel_err  # noqa: E402
from ms_fused.sentence_transformers import (CachedCircleLoss, CachedMultiSimilarityLoss,  # noqa: E402
                                            CachedSupConLoss, CircleLoss, MiningStatsCallback, MultiSimilarityLoss,
                                            SupConLoss)

PAIR_LOSSES = [(SupConLoss, CachedSupConLoss, ms_fused.SupConLoss, dict(temperature=0.2)),
               (CircleLoss, CachedCircleLoss, ms_fused.CircleLoss, dict(m=0.3, gamma=64.0))]
ALL_CLASSES = [MultiSimilarityLoss, CachedMultiSimilarityLoss, SupConLoss, CachedSupConLoss, CircleLoss,
               CachedCircleLoss]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_bert")


@pytest.fixture
def model(model_dir):
    return tiny_model(model_dir)


def batch(model, per_topic=4, seed=0):
    texts, labels = corpus(per_topic, seed)
    return features(model, texts), torch.tensor(labels)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(got, expected, tol=1e-4):
    """All parameters together within `tol` (relative), and each one; a parameter whose gradient is zero up to
    rounding (the attention keys' bias: softmax does not see it) is measured against a floor of 1e-6."""
    assert got.keys() == expected.keys() and len(got) > 10
    flat = torch.cat([g.flatten() for g in got.values()]), torch.cat([g.flatten() for g in expected.values()])
    assert rel_err(*flat) <= tol
    for name, g in expected.items():
        assert rel_err(got[name], g, floor=1e-6) <= tol, (name, rel_err(got[name], g, floor=1e-6))


def test_plain_loss_equals_ms_fused_on_the_embeddings(model):
    f, y = batch(model)
    loss_fn = MultiSimilarityLoss(model, alpha=2.0, beta=40.0, base=0.4, epsilon=0.1)
    model.train()
    torch.manual_seed(3)
    loss = loss_fn([f], y)
    torch.manual_seed(3)  # the same dropout masks
    emb = model(dict(f))["sentence_embedding"]
    expected = ms_fused.multi_similarity_loss(emb, y, alpha=2.0, beta=40.0, base=0.4, epsilon=0.1).detach()
    assert loss.dim() == 0 and loss.requires_grad
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5
    stats = ms_fused.multi_similarity_loss(emb, y, alpha=2.0, beta=40.0, base=0.4, return_stats=True)[1]
    assert [int(s) for s in loss_fn.stats] == [int(s) for s in stats]
    assert loss_fn.batch_size == len(y)


class ChunkwiseModel(nn.Module):
    """The model called `rows` rows at a time with a graph: one plain forward that draws dropout masks in the
    order the cached loss's mini-batches draw them."""

    def __init__(self, model, rows):
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, f):
        n = f["input_ids"].shape[0]
        parts = []
        for s in range(0, n, self.rows):
            part = {k: v[s:s + self.rows] if isinstance(v, torch.Tensor) else v for k, v in f.items()}
            parts.append(self.model(part)["sentence_embedding"])
        return {"sentence_embedding": torch.cat(parts)}


@pytest.mark.parametrize("mini_batch_size", [5, 16, 64])
def test_cached_loss_and_gradients_equal_the_plain_loss_with_dropout(model, mini_batch_size):
    f, y = batch(model)  # 16 texts
    model.train()
    plain = MultiSimilarityLoss(ChunkwiseModel(model, mini_batch_size))
    torch.manual_seed(11)
    expected = plain([f], y)
    expected.backward()
    expected_grads = grads(model)
    after_plain = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    cached = CachedMultiSimilarityLoss(model, mini_batch_size=mini_batch_size)
    torch.manual_seed(11)
    loss = cached([f], y)
    (2.0 * loss).backward()  # a scaled loss (gradient accumulation, AMP scaling) scales the gradients
    assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-5 * max(1.0, abs(float(expected.detach())))
    assert_grads_match(grads(model), {name: 2.0 * g for name, g in expected_grads.items()})
    assert torch.equal(torch.get_rng_state(), after_plain)  # the replay leaves the generator as one pass does
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_cached_gradients_equal_one_whole_batch_forward(model):
    """Without dropout the mini-batches give the whole batch's gradient (rows are independent in a BERT)."""
    f, y = batch(model)
    model.eval()
    loss = MultiSimilarityLoss(model)([f], y)
    loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cached = CachedMultiSimilarityLoss(model, mini_batch_size=3)([f], y)
    cached.backward()
    assert abs(float(cached) - float(loss)) <= 1e-5
    assert_grads_match(grads(model), expected)


def test_cached_loss_under_no_grad_runs_one_pass(model):
    f, y = batch(model)
    model.eval()
    with torch.no_grad():
        loss = CachedMultiSimilarityLoss(model, mini_batch_size=4)([f], y)
        expected = MultiSimilarityLoss(model)([f], y)
    assert not loss.requires_grad and abs(float(loss) - float(expected)) <= 1e-5


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_bad_input_raises_before_the_model(model, cls):
    f, y = batch(model, per_topic=2)
    loss_fn = cls(model)
    with pytest.raises(ValueError, match="`label` column"):
        loss_fn([f], None)
    with pytest.raises(ValueError, match="integer class ids.*float32"):
        loss_fn([f], y.float())
    with pytest.raises(ValueError, match="one text column.*2 text columns"):
        loss_fn([f, f], y)
    with pytest.raises(ValueError, match="one label per text"):
        loss_fn([f], y[:-1])


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_a_batch_without_positives_warns_once_naming_the_sampler(model, cls):
    f, _ = batch(model, per_topic=1)  # one text per label
    loss_fn = cls(model)
    with pytest.warns(UserWarning, match="GROUP_BY_LABEL"):
        loss_fn([f], torch.arange(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn([f], torch.arange(4))


def test_config_and_citation(model):
    loss = CachedMultiSimilarityLoss(model, mini_batch_size=8, beta=40.0, backend="torch")
    assert loss.get_config_dict() == dict(alpha=2.0, beta=40.0, base=0.5, epsilon=0.1, backend="torch",
                                          mini_batch_size=8)
    assert "Multi-Similarity" in loss.citation and "Scaling" not in MultiSimilarityLoss(model).citation
    assert "Scaling Deep Contrastive" in loss.citation
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedMultiSimilarityLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError):
        MultiSimilarityLoss(model, beta=-1.0)


@pytest.mark.parametrize("plain_cls, cached_cls, module_cls, params", PAIR_LOSSES)
def test_pair_losses_plain_and_cached_equal_ms_fused_on_the_embeddings(model, plain_cls, cached_cls, module_cls,
                                                                         params):
    """SupConLoss / CircleLoss: the plain loss is ms_fused's module on the embeddings; the cached one gives the
    same loss and parameter gradients (no dropout: the mini-batches reproduce the whole batch)."""
    f, y = batch(model)
    model.eval()
    loss = plain_cls(model, **params)([f], y)
    with torch.no_grad():
        expected = module_cls(**params)(model(dict(f))["sentence_embedding"], y)
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5 * max(1.0, abs(float(expected)))
    loss.backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    cached_fn = cached_cls(model, mini_batch_size=5, **params)
    cached = cached_fn([f], y)
    cached.backward()
    assert abs(float(cached.detach()) - float(loss.detach())) <= 1e-5 * max(1.0, abs(float(loss.detach())))
    assert_grads_match(grads(model), expected_grads)
    assert cached_fn.get_config_dict() == {**params, "backend": "auto", "mini_batch_size": 5}
    assert "Scaling Deep Contrastive" in cached_fn.citation and "Scaling" not in plain_cls(model).citation
    with pytest.raises(TypeError, match="MiningStatsCallback takes"):
        MiningStatsCallback(plain_cls(model))


def dataset_loss(model, f, y):
    model.eval()
    with torch.no_grad():
        return float(MultiSimilarityLoss(model)([f], y))


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_trainer_with_group_by_label_lowers_the_loss_and_the_model_round_trips(model, tmp_path, cached):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    try:
        from sentence_transformers.sentence_transformer.training_args import (BatchSamplers,
                                                                              SentenceTransformerTrainingArguments)
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    texts, labels = corpus(12, seed=1)  # 48 rows, 4 labels
    f_all, y_all = features(model, texts), torch.tensor(labels)
    before = dataset_loss(model, f_all, y_all)
    loss = CachedMultiSimilarityLoss(model, mini_batch_size=5) if cached else MultiSimilarityLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=4, learning_rate=3e-3,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL, logging_steps=4, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": labels}), loss=loss,
        callbacks=[MiningStatsCallback(loss)])
    trainer.train()
    after = dataset_loss(model, f_all, y_all)
    assert after < 0.8 * before, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["ms_pos_pairs"] > 0 and 0 < h["ms_anchors_with_pairs"] <= 1 for h in logged)

    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    a = model.encode(texts[:6], convert_to_tensor=True)
    b = loaded.encode(texts[:6], convert_to_tensor=True)
    assert torch.allclose(a, b, atol=1e-6)
