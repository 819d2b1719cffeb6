"""The live view (common/live.py): a run's TensorBoard events hold its CSV rows at their training steps, its sample
grids and its settings; a resumed run shows one unbroken curve (purge_step); no tensorboard package, one line.

Tiny DCGAN runs in this process (common.run_main) on the 200-image synthetic CIFAR-10: batch 32, 6 full batches per epoch.
"""
from __future__ import annotations

import shutil
import sys

import pytest

from common import live
from common.errors import run_main
from common.readers import list_checkpoints, read_metrics_csv
import dcgan_train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--log-every", "3", "--ckpt-every-min", "1000",
        "--fid", "off"]


def train(*argv) -> None:
    with pytest.raises(SystemExit) as stop:
        run_main(dcgan_train.main, [*map(str, argv)])
    assert stop.value.code == 0


def events(run_dir):
    accumulator = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def run_dir(cifar_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("live") / "run"
    train("--data-dir", cifar_dir, "--run-dir", folder, "--epochs", 2, *TINY)
    return folder


def test_events_hold_the_csv_rows_the_grids_and_the_settings(run_dir):
    found = events(run_dir)
    metrics = read_metrics_csv(run_dir / "metrics.csv")
    steps = read_metrics_csv(run_dir / "steps.csv")
    for column in ("loss_d", "loss_g", "d_real", "d_fake"):
        epoch_points = found.Scalars(f"dcgan/epoch/{column}")
        assert [p.step for p in epoch_points] == [6, 12]  # each epoch at its last training step
        assert [p.value for p in epoch_points] == pytest.approx([row[column] for row in metrics], rel=1e-6)
        step_points = found.Scalars(f"dcgan/steps/{column}")
        assert [p.step for p in step_points] == [int(row["global_step"]) for row in steps] == [3, 6, 9, 12]
        assert [p.value for p in step_points] == pytest.approx([row[column] for row in steps], rel=1e-6)
    assert "dcgan/epoch/fid" not in found.Tags()["scalars"]  # blank cells (no FID measured) are not plotted as 0
    assert [image.step for image in found.Images("dcgan/samples/fixed_noise")] == [6, 12]
    assert found.Images("dcgan/samples/fixed_noise")[0].width > 200  # the 8 x 8 grid of samples/epoch_001.png
    hparams = found.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"lr_g" in hparams and b"d_norm" in hparams  # the settings that define the experiment


def test_a_resumed_run_shows_one_unbroken_curve(run_dir, cifar_dir, tmp_path):
    """Stopped after its epoch-1 checkpoint (the newer one lost), the run trains epoch 2 again: TensorBoard drops
    what the first process wrote after that checkpoint, so every step has one point, the resumed run's."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = list_checkpoints(copy)[0]
    assert newest.name == "step-0000000012.pt"
    for path in (newest, copy / "export.json", copy / "DCGAN_model_G.pth", copy / "DCGAN_model_D.pth"):
        path.unlink()  # as if stopped before the last epoch's end: a finished run would be left alone
    train("--resume", copy, *TINY)
    found = events(copy)
    steps = read_metrics_csv(copy / "steps.csv")
    points = found.Scalars("dcgan/steps/loss_d")
    assert [p.step for p in points] == [3, 6, 9, 12]  # without purge_step: 3, 6, 9, 12, 9, 12
    assert [p.value for p in points] == pytest.approx([row["loss_d"] for row in steps], rel=1e-6)
    assert [p.step for p in found.Scalars("dcgan/epoch/loss_g")] == [6, 12]
    assert [image.step for image in found.Images("dcgan/samples/fixed_noise")] == [6, 12]
    assert len(list((copy / "tb").glob("events.out.tfevents.*"))) == 2  # one file per process


def test_a_run_folder_without_events_gets_its_rows_so_far(run_dir, tmp_path):
    """A run started before the live view existed (or --init-from's new folder): the rows so far are written."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "tb")
    view = live.LiveView()
    view.open(copy, global_step=12, steps_per_epoch=6, settings={"seed": 0}, metric_columns=["loss_d", "loss_g"],
              metrics=read_metrics_csv(copy / "metrics.csv"), log=lambda line: None)
    view.close()
    found = events(copy)
    assert [p.step for p in found.Scalars("dcgan/epoch/loss_d")] == [6, 12]
    assert [p.step for p in found.Scalars("dcgan/steps/loss_d")] == [3, 6, 9, 12]


def test_without_the_tensorboard_package_one_line_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    lines = []
    view = live.LiveView()
    view.open(tmp_path, global_step=0, steps_per_epoch=1, settings={}, metric_columns=["epoch"], metrics=[],
              log=lines.append)
    view.row("epoch", {"loss": 1.0}, 1)
    view.images({"grid": tmp_path / "missing.png"}, 1)
    view.close()
    assert len(lines) == 1 and "tensorboard package is not installed" in lines[0] and "pip install tensorboard" in \
        lines[0]
    assert not (tmp_path / "tb").exists()


def test_events_that_cannot_be_written_stop_the_view_not_the_run(tmp_path):
    (tmp_path / "tb").write_text("a file where the events folder would go")
    lines = []
    view = live.LiveView()
    view.open(tmp_path, global_step=0, steps_per_epoch=1, settings={}, metric_columns=["epoch"], metrics=[],
              log=lines.append)
    view.row("epoch", {"loss": 1.0}, 1)
    view.close()
    assert len(lines) == 1 and lines[0].startswith("live view stopped: cannot write TensorBoard events")


def test_a_start_from_step_0_drops_the_events_of_an_earlier_attempt(run_dir, tmp_path):
    """A crash before the first checkpoint (or --restart): training starts again at step 0, and so do the curves."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "tb", copy / "tb")
    shutil.copy(run_dir / "config.json", copy)  # its script names the tags' group
    view = live.LiveView()
    view.open(copy, global_step=0, steps_per_epoch=6, settings={}, metric_columns=["epoch", "loss_d"], metrics=[],
              log=lambda line: None)
    view.row("steps", {"loss_d": 5.0}, 3)
    view.close()
    assert [(p.step, p.value) for p in events(copy).Scalars("dcgan/steps/loss_d")] == [(3, 5.0)]
