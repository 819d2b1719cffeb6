"""bench.py runs end to end on a tiny workload and reports every measurement (its numbers are not checked here:
benchmarks measure, tests check)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import run_script


@pytest.mark.slow  # about a minute: every measurement, each a real training run
def test_bench_reports_every_measurement(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    proc = run_script("tools/bench.py", "--images", 256, "--repeats", 1, "--op-steps", 1, "--fid-features", 300,
                      "--fid-dim", 32, "--data-dir", mnist_dir, "--out", out)
    results = json.loads(out.read_text())
    for name in ("vae_conv", "vae_mlp", "dcgan"):
        script, bare = results[name]["script"], results[name]["bare"]
        assert script["images_per_s"] > 0 and bare["images_per_s"] > 0
        assert script["peak_rss_mb"] > 50  # a real process with torch loaded
        assert math.isclose(results[name]["ratio"], script["images_per_s"] / bare["images_per_s"])
        assert script["ops_per_step"]["all"] >= bare["ops_per_step"]["all"] > 50  # the script does the bare work
        assert bare["batch_size"] == (64 if name == "dcgan" else 128)  # the scripts' own defaults
    assert results["fid"]["relative_difference"] < 1e-6 and results["fid"]["ours_s"] > 0
    assert results["classic_mlp_vae"]["images_per_s"] > 0
    assert 0 < results["checkpoint_conv_vae"]["seconds"] and results["checkpoint_conv_vae"]["size_mb"] > 1
    assert all(seconds > 0 for seconds in results["resume_to_first_step_s"].values())
    assert set(results["projected_s"]) == {"make dcgan", "make vae"}
    assert len(results["targets_met"]) == 9
    assert "aten ops per step" in proc.stdout and "written" in proc.stdout
