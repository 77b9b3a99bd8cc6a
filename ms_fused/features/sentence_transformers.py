"""ms_fused's losses for sentence-transformers: `MultiSimilarityLoss`, `SupConLoss`, `CircleLoss`, and their
gradient-cached forms `CachedMultiSimilarityLoss`, `CachedSupConLoss`, `CachedCircleLoss`.

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments
    from ms_fused.sentence_transformers import CachedMultiSimilarityLoss, MiningStatsCallback

    model = SentenceTransformer("all-MiniLM-L6-v2")
    loss = CachedMultiSimilarityLoss(model, mini_batch_size=32)          # or MultiSimilarityLoss(model)
    args = SentenceTransformerTrainingArguments("out", per_device_train_batch_size=1024,
                                                batch_sampler=BatchSamplers.GROUP_BY_LABEL)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,   # columns: text, label
                                         loss=loss, callbacks=[MiningStatsCallback(loss)])
    trainer.train()

The dataset has one text column and an integer `label` column (the class). The MS losses compute the loss of
`ms_fused.multi_similarity_loss` on the model's `sentence_embedding`s (cosine similarities, hard-pair mining;
docs/semantics.md), the others that of `ms_fused.SupConLoss` / `ms_fused.CircleLoss`. A cached loss embeds the batch `mini_batch_size` rows at a time without a graph,
computes the loss and, when the trainer calls `backward()`, its exact gradient with respect to the
embeddings, then re-runs each mini-batch with a graph (and the random state of its first run, so dropout
masks match) and back-propagates its rows: activation memory follows `mini_batch_size`, not the batch.
The two passes are `ms_fused.cached.ChunkedPasses`, the machinery of `ms_fused.cached_backward`.

Needs the sentence-transformers package (`pip install 'ms_fused[sentence-transformers]'`);
`import ms_fused` never does.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, Optional

try:
    import sentence_transformers as _st  # noqa: F401  (the check that it is installed)
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised by tests/test_sentence_transformers.py in a subprocess
    raise ImportError("ms_fused.sentence_transformers needs the sentence-transformers package: "
                      "pip install sentence-transformers (or pip install 'ms_fused[sentence-transformers]')") from exc

import torch
from torch import nn

from .cached import ChunkedPasses
from ..losses.ms_module import MultiSimilarityLoss as _MSLoss
from ..losses.pair_api import CircleLoss as _CircleLoss, SupConLoss as _SupConLoss
from ..engine.stats import PairStats

__all__ = ["MultiSimilarityLoss", "CachedMultiSimilarityLoss", "SupConLoss", "CachedSupConLoss", "CircleLoss",
           "CachedCircleLoss", "MiningStatsCallback"]

EMBEDDING_KEY = "sentence_embedding"

MS_CITATION = """
@inproceedings{wang2019multi,
    title={Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning},
    author={Wang, Xun and Han, Xintong and Huang, Weilin and Dong, Dengke and Scott, Matthew R.},
    booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    year={2019}
}
"""

SUPCON_CITATION = """
@inproceedings{khosla2020supervised,
    title={Supervised Contrastive Learning},
    author={Khosla, Prannay and Teterwak, Piotr and Wang, Chen and Sarna, Aaron and Tian, Yonglong and Isola, Phillip and Maschinot, Aaron and Liu, Ce and Krishnan, Dilip},
    booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
    year={2020}
}
"""

CIRCLE_CITATION = """
@inproceedings{sun2020circle,
    title={Circle Loss: A Unified Perspective of Pair Similarity Optimization},
    author={Sun, Yifan and Cheng, Changmao and Zhang, Yuhan and Zhang, Chi and Zheng, Liang and Wang, Zhongdao and Wei, Yichen},
    booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    year={2020}
}
"""

GRADCACHE_CITATION = """
@inproceedings{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
    booktitle={Proceedings of the 6th Workshop on Representation Learning for NLP (RepL4NLP-2021)},
    year={2021}
}
"""

NO_POSITIVE_HINT = ("use the GROUP_BY_LABEL batch sampler (SentenceTransformerTrainingArguments(batch_sampler="
                    "BatchSamplers.GROUP_BY_LABEL)), which fills each batch with several rows of each label")


class _LabelledTextLoss(nn.Module):
    """A loss of ms_fused on a SentenceTransformer's `sentence_embedding`s of a labelled batch: what every loss here
    shares (the batch checks, the warning for a batch without positives); `loss_fn` is the ms_fused module."""

    _citation = ""

    def __init__(self, model, loss_fn: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self._warned_no_positive = False

    def forward(self, sentence_features: Iterable[Dict[str, torch.Tensor]], labels: Optional[torch.Tensor]):
        features, labels = self._check_batch(sentence_features, labels)
        embeddings = self.model(features)[EMBEDDING_KEY]
        return self._loss(embeddings, labels)

    def get_config_dict(self) -> dict:
        return {**self.loss_fn.params, "backend": self.loss_fn.backend}

    @property
    def citation(self) -> str:
        return self._citation

    def _check_batch(self, sentence_features, labels):
        name = type(self).__name__
        sentence_features = list(sentence_features)
        if len(sentence_features) != 1:
            raise ValueError(f"{name} takes a dataset with one text column and a `label` column; this batch has "
                             f"{len(sentence_features)} text columns (keep one, e.g. dataset.select_columns(['text', "
                             f"'label']))")
        features = sentence_features[0]
        rows = next((v.shape[0] for v in features.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if labels is None:
            raise ValueError(f"{name} needs a `label` column of integer class ids; the batch has no labels (the "
                             f"data collator reads a column named 'label', 'labels', 'score' or 'scores')")
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} needs integer class ids in the `label` column, got {labels.dtype} labels "
                             f"(cast the column, e.g. dataset.cast_column('label', datasets.Value('int64')))")
        if labels.dim() != 1 or (rows is not None and labels.shape[0] != rows):
            raise ValueError(f"{name} needs one label per text, got labels of shape {tuple(labels.shape)} for "
                             f"{rows} texts")
        return features, labels

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._warned_no_positive:
            counts = torch.unique(labels, return_counts=True)[1]
            if labels.numel() and int(counts.max()) < 2:
                self._warned_no_positive = True
                warnings.warn(f"{type(self).__name__}: no text in this batch shares its label with another, so no "
                              f"anchor has a positive and the loss has no positive pairs to pull together; "
                              f"{NO_POSITIVE_HINT} (this warning is given once)", UserWarning, stacklevel=3)
        return self.loss_fn(embeddings, labels.to(embeddings.device))


class MultiSimilarityLoss(_LabelledTextLoss):
    """Multi-Similarity loss (Wang et al., CVPR 2019) with its hard-pair miner, for a SentenceTransformer.

    Inputs: a dataset with one text column and a `label` column of integer class ids; batches should hold
    several rows per label (`BatchSamplers.GROUP_BY_LABEL`). Returns the mean over the batch's anchors of
    `ms_fused.multi_similarity_loss` on the model's `sentence_embedding`s.

    Args: `alpha`, `beta`, `base`, `epsilon` as in `ms_fused.multi_similarity_loss` (pml's defaults);
    `backend`: "auto", "triton", "cpp", "torch" or "reference".

    After each call `stats` holds that call's mining statistics (`ms_fused.PairStats`: mined positive and
    negative pairs, anchors with a pair) and `batch_size` its rows; `MiningStatsCallback(loss)` adds their
    mean over the training calls since the last log to the trainer's logs.

    Raises ValueError before running the model when the batch has no labels, float labels, more than one
    text column, or labels that are not one per row; warns once when a batch has no anchor with a positive.
    """

    _citation = MS_CITATION

    def __init__(self, model, *, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 backend: str = "auto"):
        super().__init__(model, _MSLoss(alpha=alpha, beta=beta, base=base, epsilon=epsilon, backend=backend))
        self.stats: Optional[PairStats] = None
        self.batch_size: Optional[int] = None
        self._accum: Optional[torch.Tensor] = None  # sums of (pos, neg, anchors with pairs, rows) since the last read
        self._accum_calls = 0

    def get_config_dict(self) -> dict:
        kw = self.loss_fn.kwargs
        return {k: kw[k] for k in ("alpha", "beta", "base", "epsilon", "backend")}

    def pop_mining_stats(self) -> Dict[str, float]:
        """Means over the training calls since the last pop: `ms_pos_pairs` and `ms_neg_pairs` (mined pairs per
        batch), `ms_anchors_with_pairs` (fraction of a batch's anchors with a non-zero loss term); {} if none."""
        if not self._accum_calls:
            return {}
        pos, neg, active, rows = self._accum.double().tolist()
        calls = self._accum_calls
        self._accum, self._accum_calls = None, 0
        return {"ms_pos_pairs": round(pos / calls, 2), "ms_neg_pairs": round(neg / calls, 2),
                "ms_anchors_with_pairs": round(active / rows, 4)}

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = super()._loss(embeddings, labels)
        f = self.loss_fn
        self.stats = PairStats(f.num_pos_pairs, f.num_neg_pairs, f.num_anchors_with_pairs)
        self.batch_size = embeddings.shape[0]
        if torch.is_grad_enabled() and self.training:
            step = torch.stack([f.num_pos_pairs, f.num_neg_pairs, f.num_anchors_with_pairs,
                                f.num_pos_pairs.new_tensor(embeddings.shape[0])])
            self._accum = step if self._accum is None else self._accum + step
            self._accum_calls += 1
        return loss


class SupConLoss(_LabelledTextLoss):
    """Supervised contrastive loss (Khosla et al. 2020) for a SentenceTransformer on labelled text: `ms_fused.SupConLoss`
    (pml's convention and reduction) on the batch's `sentence_embedding`s. Args: `temperature` (0.1), `backend`.
    Batches and errors as `MultiSimilarityLoss`'s."""

    _citation = SUPCON_CITATION

    def __init__(self, model, *, temperature: float = 0.1, backend: str = "auto"):
        super().__init__(model, _SupConLoss(temperature, backend=backend))


class CircleLoss(_LabelledTextLoss):
    """Circle loss (Sun et al. 2020) for a SentenceTransformer on labelled text: `ms_fused.CircleLoss` (pml's
    convention and reduction) on the batch's `sentence_embedding`s. Args: `m` (0.4), `gamma` (80), `backend`.
    Batches and errors as `MultiSimilarityLoss`'s."""

    _citation = CIRCLE_CITATION

    def __init__(self, model, *, m: float = 0.4, gamma: float = 80.0, backend: str = "auto"):
        super().__init__(model, _CircleLoss(m, gamma, backend=backend))


class _Embedder(nn.Module):
    """`model(features)["sentence_embedding"]` called on row slices of the batch's tensors (`ChunkedPasses`
    slices keyword tensors); the features that are not per-row tensors (e.g. "modality") go to every call."""

    def __init__(self, model, extras: dict):
        super().__init__()
        self.model = model
        self.extras = extras
        if hasattr(model, "no_sync"):  # DistributedDataParallel: all-reduce once, after the last mini-batch
            self.no_sync = model.no_sync

    def forward(self, **chunk):
        return self.model({**chunk, **self.extras})[EMBEDDING_KEY]


class _CachedStep:
    """What the deferred backward needs: the loss's graph over the detached embeddings, the two passes, and the
    autocast state of the forward (the replay runs under it, like the first pass)."""

    def __init__(self, loss, embeddings, passes, device_type):
        self.loss, self.embeddings, self.passes = loss, embeddings, passes
        self.device_type = device_type
        self.autocast = torch.is_autocast_enabled(device_type)
        self.autocast_dtype = torch.get_autocast_dtype(device_type)

    def backward(self, grad_out: torch.Tensor) -> None:
        with torch.enable_grad():
            grad, = torch.autograd.grad(self.loss, self.embeddings, grad_out)
        self.loss = self.embeddings = None
        autocast = (torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast
                    else contextlib.nullcontext())
        with torch.enable_grad(), autocast:
            self.passes.replay(grad)


class _DeferredBackward(torch.autograd.Function):
    """Identity on the loss value; its backward runs the cached step's second pass."""

    @staticmethod
    def forward(ctx, loss_value, step):
        ctx.step = step
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        step, ctx.step = ctx.step, None
        if step is None:
            raise RuntimeError("a cached loss of ms_fused.sentence_transformers: backward() ran twice on one loss; "
                               "each forward's cached gradient is used once")
        step.backward(grad_out)
        return None, None


def _check_mini_batch_size(mini_batch_size) -> int:
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
    return mini_batch_size


class _Cached:
    """Gradient caching (Gao et al., 2021) for a loss of this module, mixed in before it: the same loss and
    gradient, with activation memory of `mini_batch_size` rows instead of the whole batch.

    `forward` embeds the batch `mini_batch_size` rows at a time without a graph and returns the loss; the
    `backward()` that the trainer calls on it takes the exact gradient of the loss with respect to the
    embeddings, re-runs every mini-batch with a graph under the random state of its first run (dropout
    draws the same masks) and back-propagates its rows. Parameter gradients equal the plain loss's up to
    float32 rounding. Under `torch.no_grad()` (evaluation) only the first pass runs. A model with
    BatchNorm in train mode would normalise per mini-batch (see `ms_fused.cached_backward`).
    """

    mini_batch_size: int

    def forward(self, sentence_features: Iterable[Dict[str, torch.Tensor]], labels: Optional[torch.Tensor]):
        features, labels = self._check_batch(sentence_features, labels)
        rows = labels.shape[0]
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and v.dim() > 0
                   and v.shape[0] == rows}
        extras = {k: v for k, v in features.items() if k not in tensors}
        passes = ChunkedPasses(_Embedder(self.model, extras), tensors, self.mini_batch_size, stacklevel=2)
        embeddings = passes.embed()
        if not torch.is_grad_enabled():
            return self._loss(embeddings, labels)
        embeddings.requires_grad_(True)
        loss = self._loss(embeddings, labels)
        step = _CachedStep(loss, embeddings, passes, embeddings.device.type)
        return _DeferredBackward.apply(loss.detach().requires_grad_(), step)

    def get_config_dict(self) -> dict:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return super().citation + GRADCACHE_CITATION


class CachedMultiSimilarityLoss(_Cached, MultiSimilarityLoss):
    """`MultiSimilarityLoss` with gradient caching (see `_Cached`): activation memory of `mini_batch_size` rows."""

    def __init__(self, model, *, mini_batch_size: int = 32, alpha: float = 2.0, beta: float = 50.0,
                 base: float = 0.5, epsilon: float = 0.1, backend: str = "auto"):
        super().__init__(model, alpha=alpha, beta=beta, base=base, epsilon=epsilon, backend=backend)
        self.mini_batch_size = _check_mini_batch_size(mini_batch_size)


class CachedSupConLoss(_Cached, SupConLoss):
    """`SupConLoss` with gradient caching (see `_Cached`): activation memory of `mini_batch_size` rows."""

    def __init__(self, model, *, mini_batch_size: int = 32, temperature: float = 0.1, backend: str = "auto"):
        super().__init__(model, temperature=temperature, backend=backend)
        self.mini_batch_size = _check_mini_batch_size(mini_batch_size)


class CachedCircleLoss(_Cached, CircleLoss):
    """`CircleLoss` with gradient caching (see `_Cached`): activation memory of `mini_batch_size` rows."""

    def __init__(self, model, *, mini_batch_size: int = 32, m: float = 0.4, gamma: float = 80.0,
                 backend: str = "auto"):
        super().__init__(model, m=m, gamma=gamma, backend=backend)
        self.mini_batch_size = _check_mini_batch_size(mini_batch_size)


class MiningStatsCallback(TrainerCallback):
    """Adds the mining statistics of one or more of these losses to every training log of a (Sentence
    Transformer) trainer: `ms_pos_pairs`, `ms_neg_pairs` (mined pairs per batch) and `ms_anchors_with_pairs`
    (fraction of anchors with a non-zero loss term), means over the training steps since the previous log.

    `SentenceTransformerTrainer(..., loss=loss, callbacks=[MiningStatsCallback(loss)])`. The statistics enter
    the log record itself (`trainer.state.log_history`) and reach the callbacks after this one: the printed
    progress, and the reporting integrations (`report_to`) only when they are listed after it
    (transformers puts its `report_to` integrations first; add them to `callbacks` after this one instead).
    """

    def __init__(self, *losses: MultiSimilarityLoss):
        if not losses or not all(isinstance(x, MultiSimilarityLoss) for x in losses):
            raise TypeError("MiningStatsCallback takes one or more ms_fused.sentence_transformers losses")
        self.losses = losses

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        added = {}
        for i, loss in enumerate(self.losses):
            prefix = "" if len(self.losses) == 1 else f"{i}_"
            added.update({prefix + k: v for k, v in loss.pop_mining_stats().items()})
        logs.update(added)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(added)
