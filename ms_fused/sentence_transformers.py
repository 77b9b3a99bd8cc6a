"""`ms_fused.sentence_transformers`, the public path of ms_fused/features/sentence_transformers.py (where the code lives): importing it gives
that module itself, so both paths hold the same objects."""
import sys

from .features import sentence_transformers as _module
from .features.sentence_transformers import *  # noqa: F401,F403  (the names for static tools; at run time the module itself, below)

sys.modules[__name__] = _module
