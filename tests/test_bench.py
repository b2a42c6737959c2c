"""The benchmark runs end to end on a tiny model and writes its figures (no timing asserted here)."""
import json

from helpers import bench


def test_bench_writes_its_figures(tiny_dir, tmp_path):
    bench.main(["--model", tiny_dir, "--batch", "2", "--tokens", "5", "--k", "8", "--train-batch", "2",
                "--train-length", "16", "--repeats", "1", "--dtype", "fp32", "--collm-tokens", "6",
                "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["same_tokens"] is True and result["generated_tokens"] == 10
    assert result["capture_ratio"] > 0 and result["kd_step_ratio"] > 0
    assert result["array_bytes_per_token"] == 6 * 8 + 8 and result["store_tokens"] == 10
    assert set(result["met"]) == {"capture_ratio", "kd_step_ratio", "bytes_per_token", "collm_cost_ratio",
                                  "collm_reread_speedup"}
    assert 0 < result["collm_rate"] < 1 and result["collm_cost_ratio"] > 0 and result["collm_reread_speedup"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| capture_ratio |" in md and "| kd_step_ratio |" in md and "| bytes_per_token |" in md
    assert "| collm_cost_ratio |" in md
