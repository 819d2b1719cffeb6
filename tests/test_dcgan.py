"""dcgan_train.py and analyze_gan.py end to end on tiny synthetic data (CPU, seconds per run).

Each run uses tiny widths (--ngf 8 --ndf 8) and batch 32 on the 200-image synthetic CIFAR-10 (6 full batches per epoch: the last 8 images of each
epoch's order are left out of it).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import analyze_gan
from common import gan_metrics
from common.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from common.readers import list_checkpoints
import dcgan_train
from conftest import hook_calls, run_script, run_with_signal, sigterm_to_this_process
from hostile import KILL, after_call, run_patched, same_tensors
from tiny_data import synthetic_digits

TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--log-every", "3", "--ckpt-every-min", "1000",
        "--device", "cpu"]  # the numbers compared are CPU numbers, also on a machine with a GPU

def sigterm_after(result):
    sigterm_to_this_process()
    return result


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_checkpoint(run_dir):
    return torch.load(list_checkpoints(run_dir)[0], map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained_run(gan_runs):
    """One finished two-epoch run on synthetic CIFAR-10 with TINY's settings, and what it printed: conftest.gan_runs'
    "bce2", shared by the export and analysis tests here and by test_analyze_gan.py."""
    return gan_runs["bce2"], gan_runs["printed"]["bce2"]


def test_one_epoch_trains_and_logs(trained_run):
    run_dir, proc = trained_run
    metrics = read_rows(run_dir / "metrics.csv")
    assert [row["epoch"] for row in metrics] == ["1", "2"]
    assert list(metrics[0]) == ["epoch", "images_seen", "loss_d", "d_real", "loss_g", "d_fake", "fid",
                                "inception_score", "cfid", "class_min", "class_max", "train_time_s", "epoch_time_s"]
    for row in metrics:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "epoch_time_s"):
            assert np.isfinite(float(row[key])), key
        assert 0 < float(row["d_real"]) < 1 and 0 < float(row["d_fake"]) < 1
    steps = read_rows(run_dir / "steps.csv")
    assert [int(r["global_step"]) for r in steps] == [3, 6, 9, 12]  # every --log-every 3 of 12 steps
    assert [int(r["images_seen"]) for r in steps] == [96, 192, 288, 384]  # full batches of 32
    assert [int(row["images_seen"]) for row in metrics] == [192, 384]
    assert (run_dir / "samples" / "epoch_001.png").stat().st_size > 0
    assert (run_dir / "samples" / "epoch_002.png").stat().st_size > 0
    assert "FID skipped" in proc.stdout and "--inception-weights" in proc.stdout
    ckpt = final_checkpoint(run_dir)  # weights_only=True: plain types only
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 12 and len(ckpt["metrics"]) == 2
    # The generator learnt something: its weights moved away from the initial ones.
    torch.manual_seed(0)
    init_g, _ = dcgan_train.build_models(dcgan_train.build_parser().parse_args(TINY), 3)
    assert not torch.equal(init_g.state_dict()["net.0.weight"], ckpt["generator"]["net.0.weight"])


def test_exports_load_with_torch_jit(trained_run):
    run_dir, _ = trained_run
    generator = torch.jit.load(str(run_dir / "DCGAN_model_G.pth"), map_location="cpu")
    discriminator = torch.jit.load(str(run_dir / "DCGAN_model_D.pth"), map_location="cpu")
    z = torch.randn(100, 100, 1, 1)
    with torch.no_grad():
        images = generator(z)
        logits = discriminator(images)
    assert images.shape == (100, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert logits.shape == (100,) and torch.isfinite(logits).all()
    n_params = sum(p.numel() for m in (generator, discriminator) for p in m.parameters())
    assert 0 < n_params <= dcgan_train.MAX_PARAMS
    assert f"{n_params:,} parameters" in (run_dir / "log.txt").read_text()
    assert not generator.training and not discriminator.training
    # The exported G is the EMA generator of the last checkpoint, in eval mode.
    ckpt = final_checkpoint(run_dir)
    reference = dcgan_train.Generator(100, 8, 3, 32)
    reference.load_state_dict(ckpt["generator_ema"])
    with torch.no_grad():
        assert torch.allclose(reference.eval()(z), images, atol=1e-6)
    # denorm and transform invert each other on pixel values.
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = dcgan_train.transform(Image.fromarray(pixels))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(dcgan_train.denorm(x) * 255, torch.from_numpy(pixels).permute(2, 0, 1).float(), atol=1e-3)


def test_kill_and_sigterm_mid_epoch_then_resume_equals_uninterrupted(cifar_dir, tmp_path):
    # Schedules and extras on, so their state must survive the resume too.
    args = ["--data-dir", cifar_dir, "--epochs", 2, *TINY, "--instance-noise", "0.2", "--label-smoothing", "0.9",
            "--d-steps", "2", "--d-norm", "spectral"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("dcgan_train.py", *args, "--run-dir", straight)
    # Adam.step runs for D every step and for G every 2nd. Call 16 is D's step 11 of 12: SIGKILL there leaves the
    # epoch-1 checkpoint (step 6) and a steps.csv row (step 9) past it, which the resume must drop.
    proc = run_patched("dcgan_train.py", after_call("torch.optim.Adam", "step", 16, KILL), *args, "--run-dir", resumed)
    assert proc.returncode == -9
    assert final_checkpoint(resumed)["global_step"] == 6
    assert [r["global_step"] for r in read_rows(resumed / "steps.csv")] == ["3", "6", "9"]
    # Resumed from step 6, call 4 is D's step 9: SIGTERM there writes a checkpoint and exits 75. (To this process:
    # run_patched's wrapper, too, runs main() in an imported module, with the handler the run installs.)
    with pytest.MonkeyPatch.context() as patch:
        hook_calls(patch, "torch.optim.Adam.step", 4, action=sigterm_after)
        proc = run_script("dcgan_train.py", *args, "--run-dir", resumed, check=False)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert "stopped by SIGTERM" in proc.stdout
    assert final_checkpoint(resumed)["global_step"] == 9
    assert not (resumed / "DCGAN_model_G.pth").exists()
    run_script("dcgan_train.py", *args, "--run-dir", resumed)

    a, b = final_checkpoint(straight), final_checkpoint(resumed)
    for key in ("generator", "discriminator", "generator_ema", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng"):
        same_tensors(a[key], b[key], key)
    drop_time = [{k: v for k, v in row.items() if not k.endswith("_time_s")}
                 for row in read_rows(straight / "metrics.csv")]
    assert drop_time == [{k: v for k, v in row.items() if not k.endswith("_time_s")}
                         for row in read_rows(resumed / "metrics.csv")]
    assert read_rows(straight / "steps.csv") == read_rows(resumed / "steps.csv")  # no repeated step rows
    g_a = torch.jit.load(str(straight / "DCGAN_model_G.pth"))
    g_b = torch.jit.load(str(resumed / "DCGAN_model_G.pth"))
    z = torch.randn(4, 100, 1, 1)
    assert torch.equal(g_a(z), g_b(z))


def test_non_finite_loss_stops_without_saving(cifar_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # d_loss call 10 is step 4 of epoch 2: the epoch-1 checkpoint (global step 6) exists by then. The check at the
    # next --log-every boundary (step 12) finds the NaN in the running sums and names the steps since the last one.
    hook_calls(monkeypatch, "dcgan_train.d_loss", 10, lambda loss: loss * float("nan"))
    proc = run_script("dcgan_train.py", "--data-dir", cifar_dir, "--run-dir", run_dir, "--epochs", 2, *TINY,
                      check=False)
    assert proc.returncode == EXIT_USER_ERROR
    assert "non-finite loss at epoch 2, steps 4-6" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000000006.pt"]
    assert final_checkpoint(run_dir)["epoch"] == 1
    assert not (run_dir / "DCGAN_model_G.pth").exists()


def test_refuses_more_than_25m_parameters(cifar_dir, tmp_path):
    flags = ["--ngf", "512", "--ndf", "512", "--image-size", "64"]
    n_params = dcgan_train.count_params(dcgan_train.build_parser().parse_args(flags))
    assert n_params > dcgan_train.MAX_PARAMS
    # In-process is safe here: the refusal comes before common.Run installs signal handlers or takes a lock.
    with pytest.raises(UserError, match=f"{n_params:,} parameters"):
        dcgan_train.main(["--data-dir", str(cifar_dir), "--runs-root", str(tmp_path), *flags])
    assert list(tmp_path.iterdir()) == []  # refused before any run folder is made


def test_mnist_is_padded_to_one_channel_32x32(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Also the GPU speed paths, which run on CPU too: bf16 autocast (with float32 losses) and channels-last.
    run_script("dcgan_train.py", "--dataset", "mnist", "--data-dir", mnist_dir, "--run-dir", run_dir,
               "--epochs", 1, "--train-limit", 64, "--amp", "bf16", "--channels-last", *TINY)
    assert np.isfinite(float(read_rows(run_dir / "metrics.csv")[0]["loss_g"]))
    generator = torch.jit.load(str(run_dir / "DCGAN_model_G.pth"))
    assert generator(torch.randn(5, 100, 1, 1)).shape == (5, 1, 32, 32)
    args = dcgan_train.build_parser().parse_args(["--dataset", "mnist", "--data-dir", str(mnist_dir)])
    images = dcgan_train.load_training_images(args)
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.uint8
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0  # the 2-pixel black border


def test_folder_dataset_resizes_and_crops(tmp_path):
    sizes = [(40, 50), (64, 48), (33, 33)]
    (tmp_path / "imgs" / "any").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        pixels = np.full((h, w, 3), 30 * i, dtype=np.uint8)
        pixels[:, w // 2:] = 200  # right half bright: the centre crop keeps both halves
        Image.fromarray(pixels).save(tmp_path / "imgs" / "any" / f"{i}.png")
    args = dcgan_train.build_parser().parse_args(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs")])
    images = dcgan_train.load_training_images(args)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert (images[:, :, :, 0] < 100).all() and (images[:, :, :, -1] > 150).all()
    args.data_dir = str(tmp_path / "missing")
    with pytest.raises(UserError, match="no images under"):
        dcgan_train.load_training_images(args)


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: uint8 [N, 3, H, W] -> [N, 8] features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 8

    def forward(self, x):
        return self.net(x.float() / 255)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    images = torch.from_numpy(synthetic_digits(300, 32, 3, seed=0)[0]).permute(0, 3, 1, 2).contiguous()
    extractor = TinyFeatures()
    same = gan_metrics.compute_fid(extractor, images, images)
    other_half = gan_metrics.compute_fid(extractor, images[:150], images[150:])  # same distribution, new draws
    shifted = gan_metrics.compute_fid(extractor, images, (images.int() + 60).clamp(0, 255).to(torch.uint8))
    assert abs(same) < 1e-6
    assert shifted > 10 * max(other_half, 1e-6) and shifted > 1e-3
    gray = images[:, :1]  # one-channel sets are repeated to RGB before the extractor
    assert abs(gan_metrics.compute_fid(extractor, gray, gray)) < 1e-6


class StubInception(nn.Module):
    """In place of gan_metrics.InceptionFeatures: (features, logits) of a random conv layer."""

    def __init__(self, path):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        features = self.conv(x.float() / 255).mean((2, 3))
        return features, features[:, :4]


def test_fid_during_training_with_a_stub_extractor(cifar_dir, tmp_path, monkeypatch):
    """The FID path of the loop, with a stub (features plus fake logits) in place of Inception."""
    weights = tmp_path / "fake-inception.pth"
    weights.write_bytes(b"stub")
    monkeypatch.setattr(gan_metrics, "InceptionFeatures", StubInception)
    run_dir = tmp_path / "run"
    proc = run_script("dcgan_train.py", "--data-dir", cifar_dir, "--run-dir", run_dir, "--epochs", 3, "--fid-every", 2,
                      "--fid-samples", 64, "--inception-weights", weights, *TINY, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fid = [row["fid"] for row in read_rows(run_dir / "metrics.csv")]
    assert fid[0] == "" and float(fid[1]) > 0 and float(fid[2]) > 0  # epochs 2 and 3 (the last)
    assert all(float(row["inception_score"]) >= 1 for row in read_rows(run_dir / "metrics.csv")[1:])
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_fid"] == min(float(f) for f in fid[1:])


def test_analyze_writes_every_figure(trained_run, gan_compared):
    """analyze_gan.py on the trained run and a hinge run, with --out: conftest.gan_compared, made once."""
    run_dir, _ = trained_run
    out = gan_compared
    # config.json stores the data folder, so analysis finds the training images for the nearest-neighbour check.
    expected = ["losses.png", "d_outputs.png", "fixed_noise_progression.png", "final_samples.png", "diversity.png",
                "nearest_neighbours.png", "milestones.png"]
    for name in expected:
        path = run_dir / "figures" / name
        assert path.stat().st_size > 1000, name
        assert Image.open(path).format == "PNG"
    summary = json.loads((run_dir / "figures" / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and sorted(summary["figures"]) == sorted(expected)
    assert set(summary["diversity"]["per_epoch"]) == {"1", "2"}
    for name in ("compare_losses.png", "compare_d_outputs.png", "compare_diversity.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert not list(run_dir.glob("figures/.*.tmp-*"))


def test_analyze_works_on_a_run_in_progress(cifar_dir, tmp_path):
    """Stopped mid-epoch-2 (a live run looks the same on disk): every figure the data allows is written."""
    run_dir = tmp_path / "run"
    proc = run_with_signal("dcgan_train.py", "torch.optim.Adam.step", 20, "--data-dir", cifar_dir, "--run-dir",
                           run_dir, "--epochs", 3, *TINY, in_process=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    analyze_gan.main([str(run_dir)])
    summary = json.loads((run_dir / "figures" / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["checkpoint"]["global_step"] == 10
    assert "final_samples.png" in summary["figures"] and "losses.png" in summary["figures"]
