"""`ms_fused.distributed`, the public path of ms_fused/features/distributed.py (where the code lives): importing it gives
that module itself, so both paths hold the same objects."""
import sys

from .features import distributed as _module
from .features.distributed import *  # noqa: F401,F403  (the names for static tools; at run time the module itself, below)

sys.modules[__name__] = _module
