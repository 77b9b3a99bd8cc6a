"""The package layout (README "Layout"): the imports that README.md, docs/ and examples/ show users keep working
and give the very objects of the folders the code lives in (ms_fused/engine, losses, features)."""
import importlib
import os
import subprocess
import sys

import pytest

import ms_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# documented module path -> the module that holds the code (the old path is a shim that puts it in its place)
PUBLIC_MODULES = {
    "ms_fused.distributed": "ms_fused.features.distributed",
    "ms_fused.retrieval": "ms_fused.features.retrieval",
    "ms_fused.cached": "ms_fused.features.cached",
    "ms_fused.sentence_transformers": "ms_fused.features.sentence_transformers",
}

# each top-level name -> the module that defines it
TOP_LEVEL = {
    "multi_similarity_loss": "ms_fused.losses.ms_api",
    "MultiSimilarityLoss": "ms_fused.losses.ms_module",
    "available_backends": "ms_fused.engine.backends",
    "CrossBatchMemory": "ms_fused.features.xbm",
    "cached_backward": "ms_fused.features.cached",
    "PairStats": "ms_fused.engine.stats",
    **{name: "ms_fused.losses.pair_api"
       for name in ("supcon_loss", "ntxent_loss", "circle_loss", "SupConLoss", "NTXentLoss", "CircleLoss")},
}

# the documented imports, as README.md and examples/ write them, in a fresh process
DOCUMENTED = r"""
import sys
import ms_fused
assert not [m for m in sys.modules if m.startswith("ms_fused") and m.endswith("sentence_transformers")], \
    "import ms_fused imported the optional sentence-transformers module"

import ms_fused.distributed as msd
from ms_fused.features import distributed
assert msd is distributed and ms_fused.distributed is distributed
for name in ("multi_similarity_loss", "supcon_loss", "ntxent_loss", "circle_loss", "CrossBatchMemory"):
    assert callable(getattr(msd, name)), name

from ms_fused.retrieval import recall_at_k, map_at_r
from ms_fused.features import retrieval
assert recall_at_k is retrieval.recall_at_k and map_at_r is retrieval.map_at_r
assert ms_fused.retrieval is retrieval and ms_fused.retrieval.recall_at_k is recall_at_k

from ms_fused.features import cached
assert ms_fused.cached is cached and ms_fused.cached.ChunkedPasses is cached.ChunkedPasses

try:
    import sentence_transformers  # noqa: F401
except ImportError:
    print("no sentence-transformers")
else:
    from ms_fused.sentence_transformers import CachedMultiSimilarityLoss, MiningStatsCallback, MultiSimilarityLoss
    from ms_fused.features import sentence_transformers as st
    assert (CachedMultiSimilarityLoss, MiningStatsCallback, MultiSimilarityLoss) == \
        (st.CachedMultiSimilarityLoss, st.MiningStatsCallback, st.MultiSimilarityLoss)
    assert ms_fused.sentence_transformers is st
print("ok")
"""


def test_top_level_names_are_the_moved_objects():
    assert set(ms_fused.__all__) == set(TOP_LEVEL) | {"retrieval"}
    for name, module in TOP_LEVEL.items():
        assert getattr(ms_fused, name) is getattr(importlib.import_module(module), name), name
    assert ms_fused.retrieval is importlib.import_module("ms_fused.features.retrieval")
    assert ms_fused.__version__ == "0.1.0"


@pytest.mark.parametrize("public", sorted(PUBLIC_MODULES))
def test_documented_module_path_is_the_moved_module(public):
    if public == "ms_fused.sentence_transformers":
        pytest.importorskip("sentence_transformers")
    moved = importlib.import_module(PUBLIC_MODULES[public])
    assert importlib.import_module(public) is moved
    assert sys.modules[public] is moved and moved.__name__ == PUBLIC_MODULES[public]


def test_documented_imports_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", DOCUMENTED], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout


def test_every_folder_of_the_package_is_a_package():
    """setup.py's find_packages puts a folder in the wheel only when it has an __init__.py."""
    setuptools = pytest.importorskip("setuptools")
    package_dirs = {os.path.relpath(d, ROOT).replace(os.sep, ".")
                    for d, _, files in os.walk(os.path.join(ROOT, "ms_fused"))
                    if "__pycache__" not in d and any(f.endswith(".py") for f in files)}
    found = set(setuptools.find_packages(ROOT, include=["ms_fused", "ms_fused.*"]))
    assert package_dirs == found
    assert {"ms_fused.engine", "ms_fused.engine.cpp", "ms_fused.engine.torch", "ms_fused.engine.triton",
            "ms_fused.losses", "ms_fused.features"} <= found
