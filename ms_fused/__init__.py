"""ms_fused: an exact, memory-lean Multi-Similarity loss with fused kernels (see docs/semantics.md)."""
from .api import multi_similarity_loss
from .backends import available_backends
from .module import MultiSimilarityLoss
from .stats import PairStats
from .xbm import CrossBatchMemory

__all__ = ["multi_similarity_loss", "MultiSimilarityLoss", "available_backends", "CrossBatchMemory", "PairStats"]
__version__ = "0.1.0"
