"""examples/train_digits.py --quick: training helps on unseen classes and follows pml step for step (~10 s)."""
import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_metric_learning")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run(tmp_path, capsys):
    results = tmp_path / "train_digits.md"
    threads = torch.get_num_threads()
    try:
        load_example().main(["--quick", "--results", str(results)])
    finally:
        torch.set_num_threads(threads)  # the script runs single-threaded; the rest of the suite should not
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line
                   and not line.startswith("#"))
    values = {key: float(value) for key, value in printed.items()}
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "baseline_recall@1", "max_curve_diff"):
        assert key in values
    assert values["recall@1"] > values["baseline_recall@1"]
    assert values["recall@1"] <= values["recall@2"] <= values["recall@4"] <= values["recall@8"] <= 1.0
    assert values["max_curve_diff"] <= 1e-4
    # the losses themselves, on the same embeddings, agree to float64 rounding
    assert values["max_step_diff"] <= 1e-12 and values["max_step_grad_diff"] <= 1e-10
    assert "| untrained network" in results.read_text()
