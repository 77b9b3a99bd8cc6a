"""benchmarks/run.py and its report: every implementation through one tiny sweep per preset kind, the
spread beside each median, and the goals table read against records."""
import json

import pytest

import measure
import report
import run
import sweep


def test_percentiles_interpolate_between_order_statistics():
    times = [5.0, 1.0, 3.0, 2.0, 4.0]
    # exact where no rounding happens (the order statistics themselves); approx where it interpolates
    assert measure.percentile(times, 0) == 1.0 and measure.percentile(times, 100) == 5.0
    assert measure.percentile(times, 20) == pytest.approx(1.8) and measure.percentile(times, 80) == pytest.approx(4.2)
    assert measure.time_summary(times, "s") == {"median_s": 3.0, "p20_s": pytest.approx(1.8),
                                                "p80_s": pytest.approx(4.2)}


def _sweep(tmp_path, *args):
    out = tmp_path / "out"
    rc = run.main(["--device", "cpu", "--dtypes", "float32", "--min-repeats", "3", "--max-repeats", "3",
                   "--target-s", "0.01", "--threads", "1", "--out", str(out), "--no-plots", "--no-progress", *args])
    doc = json.loads((out / "results.json").read_text())
    return rc, doc, (out / "results.md").read_text()


def _assert_all_ran(doc, impls):
    assert sorted({r["impl"] for r in doc["records"]}) == sorted(impls)
    for r in doc["records"]:
        assert r["status"] == "ok", r
        assert len(r["times_ms"]) == 3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mb"] is not None


def test_self_mode_sweep_runs_every_implementation(tmp_path):
    impls = ["ms_fused:torch", "ms_fused:cpp", "pml", "dense_torch", "loop", "mm"]
    pytest.importorskip("pytorch_metric_learning")
    rc, doc, md = _sweep(tmp_path, "--preset", "quick", "--n", "64", "--d", "16", "--impls", ",".join(impls),
                         "--loop-max-n", "64")
    assert rc == 0 and doc["complete"] and doc["settings"]["preset"] == "quick"
    _assert_all_ran(doc, impls)
    assert {a["impl"] for a in doc["agreement"]} == set(impls) - {"mm"}
    assert all(a["grad_rel_err"] < 1e-12 for a in doc["agreement"])
    assert "p20–p80 ms" in md


def test_memory_bank_preset_runs_the_bank_step(tmp_path):
    impls = ["ms_fused:torch", "ms_fused:cpp", "pml", "mm"]
    pytest.importorskip("pytorch_metric_learning")
    rc, doc, md = _sweep(tmp_path, "--preset", "bank", "--n", "32", "--memory", "300", "--d", "16", "--no-check")
    assert doc["settings"]["memory"] == 300 and doc["settings"]["modes"] == ["forward_backward"]
    _assert_all_ran(doc, impls)
    assert "memory of 300 unit rows" in md


# one loss in the quick tier: the presets differ only in the loss they name
@pytest.mark.parametrize("loss", ["supcon", pytest.param("ntxent", marks=pytest.mark.slow),
                                  pytest.param("circle", marks=pytest.mark.slow)])
def test_pair_loss_presets_time_ms_fused_against_pmls_loss(tmp_path, loss):
    pytest.importorskip("pytorch_metric_learning")
    rc, doc, md = _sweep(tmp_path, "--preset", loss, "--n", "48", "--d", "16")
    assert rc == 0 and doc["settings"]["loss"] == loss
    _assert_all_ran(doc, ["ms_fused:cpp", "ms_fused:torch", "pml", "mm"])
    assert {a["impl"] for a in doc["agreement"]} == {"ms_fused:cpp", "ms_fused:torch", "pml"}
    assert all(a["loss_rel_err"] < 1e-12 and a["grad_rel_err"] < 1e-12 for a in doc["agreement"])
    assert f"Loss: **{report.LOSS_NAMES[loss]}**" in md


def test_ntxent_views_preset_draws_two_rows_per_class():
    """The preset's samples_per_class reaches the batches a record times and pml's memory estimate."""
    import impls
    import torch

    settings = run.settings_from(run.parse_args(["--preset", "ntxent_views"]), torch.device("cpu"))
    assert settings["loss"] == "ntxent" and settings["samples_per_class"] == 2
    _, y, _ = measure._inputs(dict(dtype="float32", d=8, samples_per_class=2), 64, torch.device("cpu"), False)
    assert torch.equal(torch.bincount(y), torch.full((32,), 2))
    # pml's (positive pairs x negative pairs) matrix: one positive per anchor instead of three
    key = sweep.Key("pml", 2048, 128, "float32", "forward_backward")
    limit = 1.5 * impls.estimated_peak_bytes("pml", 2048, 128, torch.float32, loss="ntxent", samples_per_class=2)
    views = sweep.Guard(torch.device("cpu"), int(limit), 60.0, 1, 0, loss="ntxent", samples_per_class=2)
    four = sweep.Guard(torch.device("cpu"), int(limit), 60.0, 1, 0, loss="ntxent")
    assert views.skip_reason(key) is None and "est. peak" in four.skip_reason(key)[1]


def _record(impl, n, ms, peak, status="ok", mode="forward_backward", d=128, dtype="float32"):
    return dict(impl=impl, n=n, d=d, dtype=dtype, mode=mode, status=status, median_ms=ms, peak_mb=peak)


def test_goals_table_reads_each_goal_against_its_record():
    goals = (sweep._goals("ms_fused:cpp", "speedup_vs_pml", 10, (2048, 4096))
             + sweep._goals("ms_fused:cpp", "time_per_mm", 6, (2048,))
             + sweep._goals("ms_fused:cpp", "completes", None, (65536,))
             + sweep._goals("ms_fused:torch", "completes", None, (65536,)))
    records = [_record("pml", 2048, 500, 200), _record("mm", 2048, 4, 10), _record("ms_fused:cpp", 2048, 20, 5),
               _record("pml", 4096, 2000, 800), _record("ms_fused:cpp", 4096, 250, 20),
               _record("ms_fused:cpp", 65536, 20000, 170), _record("ms_fused:torch", 65536, None, None, "timeout")]
    rows = report.goal_rows(dict(settings=dict(goals=goals), records=records))
    got = [(r["goal"]["impl"], r["goal"]["metric"], r["goal"]["n"], r["value"], r["met"]) for r in rows]
    # 500 / 20, 2000 / 250, 20 / 4: exact quotients in IEEE double, on every CPU
    assert got == [("ms_fused:cpp", "speedup_vs_pml", 2048, 25.0, True),
                   ("ms_fused:cpp", "speedup_vs_pml", 4096, 8.0, False),
                   ("ms_fused:cpp", "time_per_mm", 2048, 5.0, True),
                   ("ms_fused:cpp", "completes", 65536, None, True),
                   ("ms_fused:torch", "completes", 65536, None, False)]
    table = report.goals_table(dict(settings=dict(goals=goals), records=records))
    assert "| speed-up vs pml ≥ 10 | 8.00 | no |" in table[3] and "no (timeout" in table[-1]


def test_a_goal_that_names_d_is_read_against_that_d_only():
    goals = (sweep._goals("ms_fused:cpp", "time_per_mm", 0.45, (8192,), "forward", 128)
             + sweep._goals("ms_fused:cpp", "time_per_mm", 0.6, (8192,), "forward", 512))
    records = [_record("mm", 8192, 100, 1, mode="forward"), _record("ms_fused:cpp", 8192, 50, 1, mode="forward"),
               _record("mm", 8192, 200, 1, mode="forward", d=512),
               _record("ms_fused:cpp", 8192, 125, 1, mode="forward", d=512)]
    rows = report.goal_rows(dict(settings=dict(goals=goals), records=records))
    # 50 / 100 and 125 / 200: exact quotients in IEEE double
    assert [(r["goal"]["d"], r["section"][0], r["value"], r["met"]) for r in rows] == [(128, 128, 0.5, False),
                                                                                      (512, 512, 0.625, False)]


def test_a_goal_that_names_a_dtype_is_read_against_that_dtype_only():
    goals = sweep._goals("ms_fused:cpp", "time_per_mm", 2.2, (256,), dtype="float32")
    records = [_record("mm", 256, 40, 1), _record("ms_fused:cpp", 256, 80, 1),
               _record("mm", 256, 20, 1, dtype="bfloat16"), _record("ms_fused:cpp", 256, 80, 1, dtype="bfloat16")]
    rows = report.goal_rows(dict(settings=dict(goals=goals), records=records))
    # 80 / 40: an exact quotient in IEEE double
    assert [(r["section"][1], r["value"], r["met"]) for r in rows] == [("float32", 2.0, True)]


def test_every_preset_names_known_implementations_and_goals():
    import impls
    from ms_fused.engine.backends import BACKEND_NAMES

    for (device, name), preset in sweep.PRESETS.items():
        assert name in sweep.PRESET_NAMES
        for impl in preset.get("impls", []):
            assert impl in impls.BASELINES or impl.split(":", 1)[1] in BACKEND_NAMES
        for g in preset.get("goals", []):
            assert g["impl"] in preset["impls"] and g["n"] in preset["n"] and g["d"] in (None, *preset["d"])
            assert g["dtype"] in (None, *preset["dtypes"])
            assert g["metric"] in report.AT_LEAST + report.AT_MOST + ("completes",)


def test_prediction_sits_beside_the_measurement(tmp_path):
    """gpu_check.sh's table: kernel_stats' roofline per point and phase, sass_stats' with every ceiling at the
    target point, and run.py's measured time / mm."""
    import json

    import prediction
    records = [dict(impl="ms_fused:triton", mode="forward", median_ms=3.0, status="ok"),
               dict(impl="ms_fused:triton", mode="forward_backward", median_ms=9.0, status="ok"),
               dict(impl="mm", mode="forward", median_ms=2.0, status="ok")]
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "results.json").write_text(json.dumps(dict(records=records)))
    stats = tmp_path / "kernel_stats.json"
    stats.write_text(json.dumps(dict(roofline=[dict(case="self mode", point="P", forward_per_mm=1.25,
                                                    step_per_mm=3.5)])))
    sass = tmp_path / "sass_stats.json"
    sass.write_text(json.dumps(dict(roofline=[dict(triton="3.6.0", d=512, forward_per_mm=2.5, step_per_mm=11.7),
                                              dict(triton="3.6.0", d=128, forward_per_mm=3.7, step_per_mm=17.4)])))
    table = prediction.lines(str(tmp_path), str(stats), str(sass))
    assert "| P | forward | 1.25 | 2.50 (Triton 3.6.0) | 1.50 |" in table
    assert "| P | forward_backward | 3.50 | 11.70 (Triton 3.6.0) | 4.50 |" in table
    assert any("memory bank" in row and "| n/a | not measured |" in row for row in table)


RUNNER_WITH_CPP = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import measure
runner = measure.Runner(reuse=False, preload=["torch", "ms_fused"], job="cpp_ready:job", cpp_extension=True)
try:
    print(json.dumps(dict(parent=runner.cpp_state, child=runner.run({}, 120))))
finally:
    runner.close()
"""


def test_runner_loads_the_cpp_extension_before_any_record():
    """Runner(cpp_extension=True) loads the extension in its own process and in the children's server, so that
    a record's child starts with it loaded. In a fresh process: the forkserver (and its preload) is per process."""
    import os
    import subprocess
    import sys

    from ms_fused import available_backends

    if "cpp" not in available_backends("cpu"):
        pytest.skip("the cpp backend is not available here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", RUNNER_WITH_CPP], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["parent"]["status"] == "ok", got
    # loaded by the server the child was forked from, not by the child
    assert got["child"]["status"] == "ok" and got["child"]["pid"] != got["child"]["job_pid"], got
