"""bench.py runs end to end on a tiny workload and reports every measurement (its numbers are not checked here:
benchmarks measure, tests check)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import run_script


@pytest.mark.slow  # about 30 s: every measurement, each a real training run
def test_bench_reports_every_measurement(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    proc = run_script("tools/bench.py", "--images", 256, "--repeats", 1, "--data-dir", mnist_dir, "--out", out)
    results = json.loads(out.read_text())
    for name in ("vae_conv", "vae_mlp", "dcgan"):
        assert results[name]["script"]["images_per_s"] > 0 and results[name]["bare"]["images_per_s"] > 0
        assert results[name]["script"]["peak_rss_mb"] > 50  # a real process with torch loaded
        assert math.isclose(results[name]["ratio"], results[name]["script"]["images_per_s"]
                            / results[name]["bare"]["images_per_s"])
    assert results["classic_mlp_vae"]["images_per_s"] > 0
    assert 0 < results["checkpoint_conv_vae"]["seconds"] and results["checkpoint_conv_vae"]["size_mb"] > 1
    assert all(seconds > 0 for seconds in results["resume_to_first_step_s"].values())
    assert len(results["targets_met"]) == 5
    assert "script / bare" in proc.stdout and "written" in proc.stdout
