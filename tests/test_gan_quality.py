"""gan_quality.py --quick end to end on a tiny synthetic MNIST: both recipes trained as subprocesses, measured,
tabled; a second call measures the finished runs again without retraining them."""
from __future__ import annotations

import csv
import json
import math

import pytest

from common.readers import read_run_config
from tools import gan_quality
from conftest import make_mnist, run_script


@pytest.mark.slow  # two gan_quality.py calls, two training runs: about 25 s on 2 idle cores
def test_quick_benchmark_trains_both_recipes_measures_them_and_reuses_finished_runs(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=200, n_test=300)
    out = tmp_path / "out"
    args = ["--quick", "--datasets", "mnist", "--data-dir", data, "--out", out, "--device", "cpu"]
    first = run_script("tools/gan_quality.py", *args)
    with open(out / "gan_quality.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["recipe"] for row in rows] == ["real", "recommended", "plain"]
    assert float(rows[1]["cfid_draw_sd"]) > 0  # three draws of other noise give three FIDs
    for row in rows:
        assert math.isfinite(float(row["cfid"])) and float(row["cfid"]) >= -1e-6
        assert float(row["cfid_draw_sd"]) >= 0
        assert 0 <= float(row["class_min"]) <= 0.1 <= float(row["class_max"]) <= 1
    trained = rows[1:]
    assert trained[0]["batch_size"] == trained[1]["batch_size"]  # the same batch size and images for both
    assert trained[0]["images"] == trained[1]["images"] == str(64 * 1)
    plain = read_run_config(trained[1]["run_dir"], "dcgan")["args"]
    assert plain["ema"] == 0 and plain["d_norm"] == "batch" and plain["loss"] == "bce"
    assert plain["sweep"] == "gan-quality-mnist-small"
    assert not list((out / "runs").glob("latest*")), "a benchmark run moved a latest link"
    report = json.loads((out / "gan_quality.json").read_text())
    assert {s["recipe"] for s in report["summary"]} == {"recommended", "plain"}
    assert report["classifiers"]["mnist"]["test_accuracy"] > 0.5
    assert (out / "gan_quality_samples.png").stat().st_size > 0

    second = run_script("tools/gan_quality.py", *args)
    assert "$ python dcgan_train.py" in first.stdout and "$ python dcgan_train.py" not in second.stdout
    with open(out / "gan_quality.csv", newline="") as f:
        assert [row["cfid"] for row in csv.DictReader(f)] == [row["cfid"] for row in rows]
    # Other settings for the same folders (say, after the defaults changed) are refused, not silently reused.
    changed = run_script("tools/gan_quality.py", *args, "--batch-size", "16", check=False)
    assert changed.returncode == 2 and "trained with other settings (batch_size" in changed.stderr


def test_variant_flags_are_parsed_into_a_recipe():
    args = gan_quality.build_parser().parse_args(["--variant", "bs64=--batch-size 64 --ema 0"])
    assert gan_quality.recipes_of(args)["bs64"] == ["--batch-size", "64", "--ema", "0"]
