"""examples/train_digits.py --cached: the ms_fused run trained with cached_backward follows pml's plain run step for step."""
import pytest

from helpers import run_example

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_metric_learning")
pytestmark = pytest.mark.slow  # training runs: `make test-slow`


def test_cached_run_follows_the_plain_pml_run(tmp_path, capsys):
    results = tmp_path / "train_digits_cached.md"
    run_example("train_digits", ["--quick", "--steps", "50", "--cached", "16", "--results", str(results)])
    out = capsys.readouterr().out
    values = {k: float(v) for k, v in (line.split("=", 1) for line in out.splitlines()
                                       if "=" in line and not line.startswith("#"))}
    assert "cached_backward chunk_size=16" in out
    assert values["recall@1"] > values["baseline_recall@1"]
    # 5 chunks of 16 per batch, yet the loss curve is pml's full-batch one to rounding, amplified by 50 Adam steps
    assert values["max_curve_diff"] <= 1e-6
    assert abs(values["recall@1"] - values["pml_recall@1"]) <= 1e-3
    assert values["max_step_diff"] <= 1e-12 and values["max_step_grad_diff"] <= 1e-10
    assert "--cached 16" in results.read_text()
