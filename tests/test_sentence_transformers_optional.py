"""`ms_fused.sentence_transformers` is optional: without sentence-transformers, `import ms_fused` works and importing
the module raises an ImportError that names the package to install. Runs whether or not it is installed."""
from __future__ import annotations

import subprocess
import sys

BLOCKED = """
import sys
sys.modules["sentence_transformers"] = None  # as if it were not installed
import ms_fused
assert "ms_fused.sentence_transformers" not in sys.modules
ms_fused.multi_similarity_loss
try:
    import ms_fused.sentence_transformers
except ImportError as exc:
    print("ImportError:", exc)
else:
    raise SystemExit("imported without sentence-transformers")
"""


def test_import_without_sentence_transformers_names_the_package():
    out = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install sentence-transformers" in out.stdout
    assert "ms_fused[sentence-transformers]" in out.stdout
