"""The last mile, round 3 (issue 29): what the student meets between the last run and the hand-in.

A trial run never counts (test_experiments.py has the rule on hand-made folders; here a real one), TensorBoard shows
each run once with each model's charts apart, a GAN of another data set packs into a zip named as a dry run,
captions true of their figures whatever --log-every is, a reference line never clipped, the sample column of the
nearest neighbours set apart, the VAE's samples from the training grids' z, run paths with spaces through make, a
DATA_DIR that is the MNIST/raw folder itself, and "did you mean --epochs". The report as a document to hand in is
test_report.py's (it has the finished set of runs).

Tiny runs in this process on the synthetic data of tests/support (a few seconds each).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

import analyze_gan
import analyze_vae
import check_submission
from common import experiments, figures, sweep_figures
from common.data import load_images
from common.errors import run_main, UserError
import dcgan_train
import report
import vae_train
from conftest import GAN_TINY, REPO, VAE_THAT_LEARNS


def run(main, *argv) -> None:
    with pytest.raises(SystemExit) as stop:
        run_main(main, [*map(str, argv)])
    assert stop.value.code == 0


@pytest.fixture(scope="module")
def runs_root(mnist_dir, tmp_path_factory):
    """A VAE that learns (seed 3), then a 1-epoch check on part of the data in "my run" (newer, shorter), then a
    DCGAN on MNIST, all in one runs root as make vae, --run-dir "runs/my run" and make dcgan leave them."""
    root = tmp_path_factory.mktemp("last-mile") / "runs"
    run(vae_train.main, "--data-dir", mnist_dir, "--runs-root", root, "--seed", 3, *VAE_THAT_LEARNS)
    run(vae_train.main, "--data-dir", mnist_dir, "--runs-root", root, "--run-dir", root / "my run", "--epochs", 1,
        "--train-limit", 100, "--latent-dim", 4)
    run(dcgan_train.main, "--data-dir", mnist_dir, "--runs-root", root, "--dataset", "mnist", "--epochs", 1,
        "--fid", "off", *GAN_TINY)
    return root


def test_a_newer_trial_run_moves_latest_but_does_not_count(runs_root):
    assert (runs_root / "latest-vae").resolve() == runs_root / "my run"  # latest keeps meaning the newest
    lines = []
    counted, why = experiments.counted_run(runs_root, "vae", how_to_name="make report VAE_RUN", log=lines.append)
    assert counted.dir.name.endswith("-vae") and why.startswith("the longest finished vae run not in a sweep")
    assert len(lines) == 1 and lines[0].startswith("note: not chosen: my run, newer but shorter (")
    assert lines[0].endswith(f"to use it: make report VAE_RUN='{runs_root / 'my run'}'")


def test_tensorboard_events_are_grouped_by_script(runs_root):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tags = {}
    for script in ("vae", "dcgan"):
        accumulator = event_accumulator.EventAccumulator(str((runs_root / f"latest-{script}" / "tb")))
        accumulator.Reload()
        tags[script] = accumulator.Tags()["scalars"] + accumulator.Tags()["images"]
    assert "vae/epoch/epoch_time_s" in tags["vae"] and "dcgan/epoch/epoch_time_s" in tags["dcgan"]
    assert all(tag.startswith(f"{script}/") for script in tags for tag in tags[script]), tags


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_tensorboard_names_each_run_once(runs_root):
    """--logdir runs followed runs/latest, latest-vae and latest-dcgan: up to three entries per run."""
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "tensorboard", f"RUNS={runs_root}",
                           "TENSORBOARD=echo TB"], cwd=REPO, capture_output=True, text=True, check=True)
    spec = proc.stdout.split("--logdir_spec ", 1)[1].rsplit(" --port", 1)[0].split(",")
    runs = sorted(p for p in runs_root.iterdir() if (p / "tb").is_dir() and not p.is_symlink())
    assert sorted(spec) == sorted(f"{p.name}:{p}" for p in runs) and len(runs) == 3


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_targets_keep_a_run_path_with_a_space_whole():
    def planned(*argv) -> str:
        return subprocess.run(["make", "-n", "-o", ".venv/.installed", *argv], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    assert 'analyze_vae.py "runs/my run"' in planned("analyze-vae", "RUN=runs/my run")
    assert 'analyze_gan.py "runs/my run"' in planned("analyze-gan", "RUN=runs/my run")
    assert "analyze_vae.py runs/*-vae-beta*" in planned("analyze-vae", "RUN=runs/*-vae-beta*")  # a glob stays one
    assert '--vae-run "runs/my run" --gan-run "runs/a b"' in planned("report", "VAE_RUN=runs/my run",
                                                                     "GAN_RUN=runs/a b")
    assert '--vae-run "runs/my run"' in planned("submission", "VAE_RUN=runs/my run")


def test_an_mnist_gan_packs_into_a_zip_named_as_a_dry_run(runs_root, mnist_dir, tmp_path, capsys):
    gan = (runs_root / "latest-dcgan").resolve()
    files = tmp_path / "files"
    shutil.copytree(gan, files)
    shutil.copy(experiments.counted_run(runs_root, "vae", log=lambda _: None)[0].dir / "VAE_model.pth", files)
    zip_path = tmp_path / "CW2.zip"
    argv = [str(files), "--data-dir", str(mnist_dir), "--n-images", "10", "--zip", str(zip_path)]
    assert check_submission.main(argv) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert fails and all("--allow-non-cifar10 checks it with its own image shape and packs it as a dry run" in line
                         for line in fails), out
    assert not list(tmp_path.glob("*.zip"))

    assert check_submission.main([*argv, "--allow-non-cifar10"]) == 0
    out = capsys.readouterr().out
    dry_run = tmp_path / "CW2-NOT-FOR-HANDIN-mnist.zip"
    assert "FAIL" not in out and "-> (10, 1, 32, 32)" in out and "all checks passed, as a DRY RUN" in out, out
    assert f"wrote {dry_run}" in out and "not for hand-in" in out
    assert not zip_path.exists()
    with zipfile.ZipFile(dry_run) as bundle:
        assert sorted(bundle.namelist()) == ["DCGAN_model_D.pth", "DCGAN_model_G.pth", "VAE_model.pth"]


def test_the_vae_samples_figure_decodes_the_training_grids_z(runs_root, mnist_dir, monkeypatch):
    """samples.png is the last training grid (samples/prior_epoch_NNN.png) drawn again: the same z, the run's
    --seed (3 here), not the analysis' --seed."""
    vae = experiments.counted_run(runs_root, "vae", log=lambda _: None)[0]
    shown = []
    original = analyze_vae.plot_samples
    monkeypatch.setattr(analyze_vae, "plot_samples", lambda samples, title: shown.append((samples, title))
                        or original(samples, title))
    analyze_vae.main([str(vae.dir), "--device", "cpu", "--tsne-points", "40", "--iw-samples", "2", "--iw-images", "8"])
    (samples, title), = shown
    assert "the same z ~ N(0, I) as the training grids" in title and "seed 3" in title
    grid = make_grid(samples, nrow=8).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    last = sorted((vae.dir / "samples").glob("prior_epoch_*.png"))[-1]
    assert np.abs(grid.astype(int) - np.asarray(Image.open(last).convert("RGB")).astype(int)).max() <= 1


def step_rows(n_epochs: int, per_epoch: int) -> tuple[list[dict], list[dict]]:
    metrics = [{"epoch": e, "loss_d": 1.0, "loss_g": 2.0, "d_real": 0.6, "d_fake": 0.3} for e in range(1, n_epochs + 1)]
    steps = [{"epoch": (i + 1) / per_epoch, "loss_d": 1.0 + 0.1 * (i % 3), "loss_g": 2.0, "d_real": 0.6,
              "d_fake": 0.3} for i in range(n_epochs * per_epoch)]
    return metrics, steps


@pytest.mark.parametrize("n_epochs, per_epoch, curves", [(4, 0, "none"), (4, 1, "none"), (2, 3, "faint"),
                                                         (4, 40, "smoothed")],
                         ids=["log-every-above-an-epoch", "log-every-equals-an-epoch", "few-rows", "many-rows"])
def test_captions_say_what_the_loss_and_d_figures_draw(n_epochs, per_epoch, curves):
    """Issue 29: with --log-every equal to the steps per epoch, the captions promised faint curves not drawn."""
    metrics, steps = step_rows(n_epochs, per_epoch)
    assert figures.step_curves(len(steps), len(metrics)) == curves
    args = argparse.Namespace(log_every=50, loss="bce")
    losses = analyze_gan.plot_losses(metrics, steps, args, "t").axes[0].get_lines()
    d_axes = analyze_gan.plot_d_outputs(metrics, steps, args, "t").axes[0]
    d_outputs = [line for line in d_axes.get_lines() if line.get_transform() is d_axes.transData]  # not the 0.5
    extra = {"none": 0, "faint": 1, "smoothed": 2}[curves]
    assert len(losses) == 2 * (1 + extra) and len(d_outputs) == 2 * (1 + bool(extra))
    for caption in (report.losses_caption(curves, 50), report.d_outputs_caption("bce", curves, 50)):
        assert ("faint" in caption) == bool(extra) and ("smoothed" in caption) == (curves == "smoothed"), caption


def test_the_diversity_reference_line_has_room_above_it():
    """In a run's diversity.png and in the comparison's: both are sweep_figures.compare_diversity."""
    reference = 0.3  # the training images' diversity above every sample's
    run = argparse.Namespace(metrics=[{"epoch": 1}, {"epoch": 2}])
    summary = {"dataset": "mnist", "diversity": {"per_epoch": {"1": 0.1, "2": 0.2}, "training_images": reference}}
    compared = sweep_figures.compare_diversity([run], ["a"], [summary], "epoch", "t").axes[0]
    assert compared.get_ylim()[1] >= 1.1 * reference


def test_a_red_line_sets_the_sample_column_apart():
    images = torch.rand(12, 3, 8, 8)
    line, = analyze_gan.image_grid_figure(images, 6, "t", first_column_apart=True).axes[0].get_lines()
    x = line.get_xdata()[0]
    assert 8 + figures.CELL_GAP - 0.5 < x < 8 + 2 * figures.CELL_GAP - 0.5  # in the gap after the first column
    assert not analyze_gan.image_grid_figure(images, 6, "t").axes[0].get_lines()


def test_a_data_dir_that_is_the_raw_folder_is_read_from_its_grandparent(mnist_dir, tmp_path):
    images, _ = load_images("mnist", mnist_dir / "MNIST" / "raw", train=False)
    assert images.shape[1:] == (1, 28, 28) and not (mnist_dir / "MNIST" / "raw" / "MNIST").exists()
    assert check_submission.has_mnist_test_files(mnist_dir / "MNIST" / "raw")
    loose = tmp_path / "my-digits"
    shutil.copytree(mnist_dir / "MNIST" / "raw", loose)
    with pytest.raises(UserError, match=r"the mnist files are in .*my-digits itself.*move them into "
                                               r".*my-digits/MNIST/raw"):
        load_images("mnist", loose, train=False)


def test_the_missing_data_message_gives_the_download_error_s_reason(tmp_path):
    from common import data
    err = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n"
                       "<urlopen error [Errno -2] Name or service not known>\n")
    message = data._missing_data_message("mnist", tmp_path, True, err)
    assert "(Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name or service not known>)" \
        in message


@pytest.mark.parametrize("main, typed, meant", [(vae_train.main, "--epoch", "--epochs"),
                                                (dcgan_train.main, "--log_every", "--log-every"),
                                                (report.main, "--no-analys", "--no-analysis"),
                                                (check_submission.main, "--allow-non-cifar", "--allow-non-cifar10")])
def test_a_mistyped_flag_gets_the_flag_meant(main, typed, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--runs-root", "runs", typed])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"unrecognized arguments: {typed}; did you mean {meant} for {typed}?" in err
