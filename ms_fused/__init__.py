"""ms_fused: an exact, memory-lean Multi-Similarity loss with fused kernels (docs/semantics.md is the contract)."""
from .losses.ms_api import multi_similarity_loss
from .engine.backends import available_backends
from .features.cached import cached_backward
from .losses.ms_module import MultiSimilarityLoss
from .losses.pair_api import CircleLoss, NTXentLoss, SupConLoss, circle_loss, ntxent_loss, supcon_loss
from . import cached, retrieval  # the public paths ms_fused.cached and ms_fused.retrieval, set as before
from .engine.stats import PairStats
from .features.xbm import CrossBatchMemory
from . import _moved

_moved.install()  # the module paths before the engine/losses/features layout (old pickles, old imports)

__all__ = ["multi_similarity_loss", "MultiSimilarityLoss", "available_backends", "CrossBatchMemory", "retrieval",
           "cached_backward", "PairStats",
           "supcon_loss", "ntxent_loss", "circle_loss", "SupConLoss", "NTXentLoss", "CircleLoss"]
__version__ = "0.1.0"
