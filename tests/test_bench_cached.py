"""benchmarks/bench_cached.py: the largest-batch search on a fake measurement, and one tiny real run (~15 s)."""
import json

import pytest

import bench_cached  # from benchmarks/, on the path through conftest.py


def fake_run(peak_per_row, fails_from=None):
    def run(method, batch):
        if fails_from is not None and batch >= fails_from:
            return dict(status="oom", note="can't allocate memory")
        return dict(status="ok", capped_peak_bytes=100 + peak_per_row * batch)
    return run


def test_search_stops_where_the_predicted_peak_passes_the_guard():
    records, largest, first_not = bench_cached.search("full", [64, 128], fake_run(1), guard_bytes=600,
                                                      max_batch=4096, predict=True)
    assert largest == 256
    assert first_not["batch"] == 512 and first_not["status"] == "skipped"  # 356 + 256 > 600
    assert records[512]["predicted_bytes"] == pytest.approx(612)


def test_search_without_prediction_stops_at_the_first_failure():
    records, largest, first_not = bench_cached.search("full", [64, 128], fake_run(1, fails_from=512),
                                                      guard_bytes=600, max_batch=4096, predict=False)
    assert (largest, first_not["batch"], first_not["status"]) == (256, 512, "oom")


def test_search_stops_at_max_batch_and_keeps_a_failed_grid_batch():
    _, largest, first_not = bench_cached.search("cached", [64, 128], fake_run(0), 600, max_batch=256, predict=True)
    assert (largest, first_not["batch"], first_not["status"]) == (256, 512, "skipped")
    records, largest, first_not = bench_cached.search("full", [64, 256], fake_run(1, fails_from=256), 10**6,
                                                      max_batch=4096, predict=True)
    assert (largest, first_not["batch"], first_not["status"]) == (128, 256, "oom")
    assert len(records) == 3


def test_tiny_run_writes_results_and_readme_summary(tmp_path):
    readme = tmp_path / "README.md"
    out = tmp_path / "cached"
    readme.write_text("before\n<!-- cached:cached.json -->\nold\n<!-- /cached -->\nafter\n")
    bench_cached.main(["--batches", "64", "--chunk", "32", "--max-batch", "64", "--guard-gib", "2",
                       "--threads", "1", "--out", str(out), "--readme", str(readme)])
    doc = json.loads((tmp_path / "cached.json").read_text())
    assert [(r["method"], r["batch"], r["status"]) for r in doc["records"]] == [("full", 64, "ok"), ("cached", 64, "ok")]
    assert doc["largest"]["cached"] == dict(completed=64, first_not=dict(batch=128, status="skipped",
                                                                         note="over --max-batch 64, not run"))
    assert "| 64 |" in (tmp_path / "cached.md").read_text()
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "| 64 |" in text
