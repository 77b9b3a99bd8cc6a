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


def test_old_module_paths_resolve_to_the_moved_modules():
    """Every module path from before the layout (ms_fused/_moved.py) imports as the moved module itself."""
    from ms_fused._moved import OLD_PATHS
    for old, new in OLD_PATHS.items():
        if old.startswith("triton") and importlib.util.find_spec("triton") is None:
            continue
        assert importlib.import_module(f"ms_fused.{old}") is importlib.import_module(f"ms_fused.{new}")
    from ms_fused.xbm import CrossBatchMemory
    assert CrossBatchMemory is ms_fused.CrossBatchMemory


def test_a_model_pickled_under_the_old_paths_loads():
    """A whole model saved with torch.save before the layout names its classes by their old modules (pickle
    protocol 2 writes them as text): it loads, with the same classes and state."""
    import io
    import pickle

    import torch
    model = torch.nn.ModuleDict({"ms": ms_fused.MultiSimilarityLoss(alpha=3.0), "supcon": ms_fused.SupConLoss(),
                                 "bank": ms_fused.CrossBatchMemory(8, 5)})
    data = pickle.dumps(model, protocol=2)
    for new, old in [(b"ms_fused.losses.ms_module", b"ms_fused.module"),
                     (b"ms_fused.losses.pair_api", b"ms_fused.pair_api"), (b"ms_fused.features.xbm", b"ms_fused.xbm")]:
        assert new in data
        data = data.replace(new, old)
    loaded = pickle.loads(data)
    assert type(loaded["ms"]) is ms_fused.MultiSimilarityLoss and loaded["ms"].kwargs["alpha"] == 3.0
    assert type(loaded["supcon"]) is ms_fused.SupConLoss and type(loaded["bank"]) is ms_fused.CrossBatchMemory
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)["bank"]) is ms_fused.CrossBatchMemory
