"""`ms_fused.cached`, the public path of ms_fused/features/cached.py (where the code lives): importing it gives
that module itself, so both paths hold the same objects."""
import sys

from .features import cached as _module
from .features.cached import *  # noqa: F401,F403  (the names for static tools; at run time the module itself, below)

sys.modules[__name__] = _module
