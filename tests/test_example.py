"""examples/train_digits.py --quick: training helps on unseen classes and follows pml step for step (~10 s)."""
import pytest

from helpers import run_example

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_metric_learning")
pytestmark = pytest.mark.slow  # training runs: `make test-slow`


def test_quick_run(tmp_path, capsys):
    results = tmp_path / "train_digits.md"
    run_example("train_digits", ["--quick", "--results", str(results)])
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
