"""The package's module paths before its engine/losses/features layout, each resolved to the module that now
holds its code (the same module object), so that what was pickled under an old path (`torch.save` of a model
holding a `MultiSimilarityLoss` or a `CrossBatchMemory`) still loads, and old imports still work. The documented
paths (ms_fused.distributed, .retrieval, .cached, .sentence_transformers) are files of their own."""
import importlib
import importlib.abc
import importlib.util
import sys

OLD_PATHS = {
    "api": "losses.ms_api", "module": "losses.ms_module", "reference": "losses.ms_reference",
    "pair_api": "losses.pair_api", "pair_losses": "losses.pair_losses", "reference_pair_losses": "losses.pair_reference",
    "backends": "engine.backends", "stats": "engine.stats", "_autograd": "engine._autograd",
    "_inputs": "engine._inputs", "_jit_lock": "engine._jit_lock", "_once": "engine._once",
    "cpp_backend": "engine.cpp.backend", "cpp_pair_engine": "engine.cpp.pair_engine",
    "torch_backend": "engine.torch.backend", "torch_pair_engine": "engine.torch.pair_engine",
    "triton_backend": "engine.triton.backend", "triton_kernels": "engine.triton.ms_kernels",
    "triton_op": "engine.triton.ms_op", "triton_pair_engine": "engine.triton.pair_engine",
    "triton_pair_kernels": "engine.triton.pair_kernels",
    "xbm": "features.xbm", "_topk": "features._topk", "_duplicates": "features._duplicates",
}


class OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `ms_fused.<old>`; loading it puts the moved module itself in its place in sys.modules."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in OLD_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # the import system returns whatever sys.modules holds for the name after exec_module
        name = module.__name__.rpartition(".")[2]
        sys.modules[module.__name__] = importlib.import_module(f"{__package__}.{OLD_PATHS[name]}")


def install() -> None:
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
