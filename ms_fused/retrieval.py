"""`ms_fused.retrieval`, the public path of ms_fused/features/retrieval.py (where the code lives): importing it gives
that module itself, so both paths hold the same objects."""
import sys

from .features import retrieval as _module
from .features.retrieval import *  # noqa: F401,F403  (the names for static tools; at run time the module itself, below)

sys.modules[__name__] = _module
