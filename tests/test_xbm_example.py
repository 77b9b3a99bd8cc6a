"""examples/xbm_digits.py, shortened: a bfloat16 and a float32 memory train the same network from the same start."""
import pytest

from helpers import run_example

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # training runs: `make test-slow`


def test_short_run(capsys):
    (run,) = run_example("xbm_digits", ["--steps", "12", "--seeds", "1", "--results", ""])
    # same network, same first batch: the two first losses differ by the bfloat16 rounding only
    assert abs(run["curve32"][0] - run["curve16"][0]) <= 1e-2 * run["curve32"][0]
    assert 0 < run["same_emb_diff"] < 1e-2  # bfloat16 rounding of the memory, no more
    assert all(0 <= run[key][k] <= 1 for key in ("recall32", "recall16") for k in (1, 2, 4, 8))
    assert "| bfloat16 − float32 |" in capsys.readouterr().out
