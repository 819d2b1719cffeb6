"""analyze_gan.py: milestone quality and export, comparisons of variants, the single-run figures' details.

Tiny real runs (--ngf 8 --ndf 8, batch 32) on the 200-image synthetic CIFAR-10 of tiny_data.py: 6 full batches per epoch.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import analyze_gan
from common import experiments, figures, sweep_figures
from common.errors import UserError
from conftest import run_script

TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--log-every", "3", "--ckpt-every-min", "1000"]
QUICK = ["--quality-samples", "40", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(gan_runs):
    """Three finished runs (conftest.gan_runs, shared with test_dcgan.py): BCE for 2 epochs, the same for 1 epoch,
    and hinge for 2 epochs (sweep 'variants')."""
    return gan_runs


def jit_state(path) -> dict:
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def test_export_of_a_milestone_equals_the_export_of_a_run_that_stopped_there(runs, tmp_path, capsys):
    """Epoch 1 of a 2-epoch run, exported afterwards, is bit for bit what a 1-epoch run exports at its end."""
    out = tmp_path / "epoch-1"
    assert analyze_gan.main([str(runs["bce2"]), "--export-epoch", "1", "--out", str(out)]) == 0
    assert "check_submission.py --gen" in capsys.readouterr().out
    for name in ("DCGAN_model_G.pth", "DCGAN_model_D.pth"):
        milestone, finished = jit_state(out / name), jit_state(runs["bce1"] / name)
        assert milestone.keys() == finished.keys() and milestone
        for key in milestone:
            assert torch.equal(milestone[key], finished[key]), f"{name}: {key} differs"
    # and epoch 2 is not epoch 1: the comparison above can fail
    analyze_gan.main([str(runs["bce2"]), "--export-epoch", "2", "--out", str(tmp_path / "epoch-2")])
    later = jit_state(tmp_path / "epoch-2" / "DCGAN_model_G.pth")
    assert any(not torch.equal(later[k], v) for k, v in jit_state(out / "DCGAN_model_G.pth").items())


def test_export_of_a_missing_milestone_names_the_ones_there(runs):
    with pytest.raises(UserError, match=r"no checkpoints/epoch-007.pt; milestone epochs there: 1, 2"):
        analyze_gan.main([str(runs["bce2"]), "--export-epoch", "7"])


@pytest.fixture(scope="module")
def compared(gan_compared):
    """analyze_gan.py on bce2 and hinge2 and a decoy comparison folder, with QUICK's flags (conftest.gan_compared)."""
    return gan_compared


def test_milestones_get_a_quality_number_and_a_best_epoch(runs, compared):
    summary = json.loads((runs["bce2"] / "figures" / "summary.json").read_text())
    milestones = summary["milestones"]
    assert [row["epoch"] for row in milestones["rows"]] == [1, 2]
    assert milestones["kind"] == "diversity"  # CIFAR-10 without Inception weights here
    reference = milestones["training_images"]
    closest = min(milestones["rows"], key=lambda row: abs(row["value"] - reference))
    assert milestones["best"] == closest
    assert "milestones.png" in summary["figures"]
    assert (runs["bce2"] / "figures" / "milestones.png").stat().st_size > 2000


def test_comparison_table_labels_by_setting(runs, compared):
    with open(compared / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == ["loss=bce", "loss=hinge"]
    assert [int(row["images_seen"]) for row in rows] == [384, 384]  # 2 epochs of 6 full batches of 32
    for name in ("compare_losses.png", "compare_d_outputs.png", "compare_samples.png", "compare_progression.png",
                 "compare_diversity.png"):
        assert (compared / name).stat().st_size > 2000, name
    assert not (compared / "compare_quality.png").exists()  # milestones by diversity: compare_diversity's subject


def test_comparison_panels_keep_losses_apart_and_use_epochs_of_one_size(runs):
    infos = [experiments.read_run(runs["bce2"]), experiments.read_run(runs["hinge2"])]
    labels = experiments.run_labels(infos)
    x_name, xs = experiments.x_axis(infos)
    assert x_name == "epoch" and xs == [[1, 2], [1, 2]]  # both 200 images an epoch
    fig = sweep_figures.compare_losses(infos, labels, x_name, xs, "t")
    axes = np.array(fig.axes).reshape(2, 2)
    for col, label in enumerate(["loss=bce", "loss=hinge"]):  # one column per loss type, one run in each
        for ax in axes[:, col]:
            assert [line.get_label() for line in ax.get_lines()] == [label]
            assert list(ax.get_lines()[0].get_xdata()) == [1, 2]
    d_fig = sweep_figures.compare_d_outputs(infos, labels, x_name, xs, "t")
    assert all([line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["loss=bce"]
               for ax in d_fig.axes)  # D probabilities for the BCE run only
    assert sweep_figures.compare_d_outputs(infos[1:], labels[1:], x_name, xs[1:], "t") is None


def test_loss_legend_states_the_real_window():
    metrics = [{"epoch": 1.0, "loss_d": 1.0, "loss_g": 2.0}]
    steps = [{"epoch": e / 20, "loss_d": 1.0 + e, "loss_g": 2.0} for e in range(1, 21)]
    args = type("Args", (), {"log_every": 100, "loss": "bce"})()
    legend = [t.get_text() for t in analyze_gan.plot_losses(metrics, steps, args, "t").legends[0].texts]
    assert "D loss: mean of each 100 steps" in legend
    assert "D loss: smoothed (EMA over ~200 steps)" in legend  # 20 rows: a window of 2 rows of 100 steps
    for few in (steps[:10], steps[:2]):  # 10 rows or fewer: smoothing would return them as they are
        legend = [t.get_text() for t in analyze_gan.plot_losses(metrics, few, args, "t").legends[0].texts]
        assert "D loss: mean of each 100 steps" in legend and not any("smoothed" in text for text in legend)
    # One row per epoch (--log-every = an epoch's steps): it would lie under the epoch mean, so it is not listed.
    legend = [t.get_text() for t in analyze_gan.plot_losses(metrics, steps[-1:], args, "t").legends[0].texts]
    assert legend == ["D loss: epoch mean", "G loss: epoch mean"]


def test_mosaic_leaves_white_gaps_between_cells():
    cells = np.zeros((2, 4, 4, 3), dtype=np.float32)
    image = figures.mosaic([cells, cells], gap=3)
    assert image.shape == (11, 11, 3)
    assert (image[:, 4:7] == 1).all() and (image[4:7, :] == 1).all() and (image[:4, :4] == 0).all()


def test_classifier_fid_per_milestone_on_mnist(mnist_dir, tmp_path):
    pytest.importorskip("common.gan_metrics")
    run_dir = tmp_path / "mnist-gan"
    run_script("dcgan_train.py", "--dataset", "mnist", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 2,
               *TINY)
    analyze_gan.main([str(run_dir), *QUICK])
    milestones = json.loads((run_dir / "figures" / "summary.json").read_text())["milestones"]
    assert milestones["kind"] == "classifier-fid" and [row["epoch"] for row in milestones["rows"]] == [1, 2]
    for row in milestones["rows"]:
        assert row["value"] >= 0 and 0 <= row["class_min"] <= row["class_max"] <= 1
    assert milestones["best"] == min(milestones["rows"], key=lambda row: row["value"])
