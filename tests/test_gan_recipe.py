"""The DCGAN recipe's parts chosen by the GAN-quality benchmark (issue 11) and the FID choices (--fid): DiffAugment,
the EMA generator's own batch-norm statistics, the classifier FID during training, the Inception download."""
from __future__ import annotations

import argparse
import csv
import hashlib

import pytest
import torch

from common import gan_metrics
from common.errors import EXIT_PREEMPTED, UserError
from common.readers import list_checkpoints
import dcgan_train
from conftest import run_script, run_with_signal

TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--log-every", "3", "--ckpt-every-min", "1000",
        "--fid-samples", "300", "--device", "cpu"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_diff_augment_moves_cuts_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 32, 32) * 2 - 1
    assert dcgan_train.diff_augment(x, "none") is x
    moved = dcgan_train.diff_augment(x, "translation")
    assert moved.shape == x.shape
    # Each image is its original shifted by at most 4 pixels each way, the gap filled with 0.
    for i in range(8):
        assert any(torch.equal(moved[i, :, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)],
                               x[i, :, max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)])
                   for dy in range(-4, 5) for dx in range(-4, 5))
    cut = dcgan_train.diff_augment(torch.ones(64, 1, 32, 32), "cutout")
    zeros = (cut == 0).flatten(1).sum(1)
    assert zeros.max() == 16 * 16 and zeros.min() > 0  # a 16x16 square, clipped at the borders
    x.requires_grad_(True)
    dcgan_train.diff_augment(x, "color,translation,cutout").square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(SystemExit):  # a policy with an unknown op is refused by the parser
        dcgan_train.build_parser().parse_args(["--diffaug", "translation,flip"])


def test_standing_stats_belong_to_the_ema_weights_and_leave_the_rng_alone():
    torch.manual_seed(0)
    live = dcgan_train.Generator(nz=8, ngf=4, channels=1)
    ema = dcgan_train.Generator(nz=8, ngf=4, channels=1)  # other weights, as an average differs from the live G
    live.train()(torch.randn(32, 8))  # the live G's statistics move with its own batches
    before = torch.get_rng_state()
    dcgan_train.standing_stats(ema.eval(), batch_size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    first_norm = ema.net[1]
    assert not torch.allclose(first_norm.running_mean, live.net[1].running_mean)
    assert first_norm.momentum == 0.1 and not ema.training  # its exponential averaging and eval mode restored
    # The running mean is the average of the batch means of the first layer's outputs over the same noise.
    noise_gen = torch.Generator().manual_seed(5)
    batches = [torch.randn((32, 8, 1, 1), generator=noise_gen) for _ in range(dcgan_train.STANDING_STATS_IMAGES // 32)]
    with torch.no_grad():
        expected = torch.stack([ema.net[0](z).mean((0, 2, 3)) for z in batches]).mean(0)
    assert torch.allclose(first_norm.running_mean, expected, atol=1e-5)
    again = dcgan_train.Generator(nz=8, ngf=4, channels=1)
    again.load_state_dict(ema.state_dict())
    dcgan_train.standing_stats(again, batch_size=32, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), again.buffers()))


def test_mnist_run_measures_the_classifier_fid_and_keeps_its_best_epoch(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("dcgan_train.py", "--dataset", "mnist", "--data-dir", mnist_dir, "--run-dir", run_dir,
                      "--epochs", 2, "--fid-every", 1, *TINY)
    rows = read_rows(run_dir / "metrics.csv")
    assert all(float(row["cfid"]) >= 0 and 0 <= float(row["class_min"]) <= float(row["class_max"]) <= 1
               for row in rows)
    assert rows[0]["fid"] == "" and "FID skipped" not in proc.stdout  # no Inception on MNIST unless asked for
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_fid"] == min(float(row["cfid"]) for row in rows)
    assert "classifier FID every 1 epochs" in proc.stdout
    # The EMA G in the checkpoint (and so in the export) carries statistics computed from its own weights.
    ckpt = torch.load(list_checkpoints(run_dir)[0], weights_only=True)
    ema = dcgan_train.Generator(nz=100, ngf=8, channels=1)
    ema.load_state_dict(ckpt["generator_ema"])
    assert not torch.equal(ckpt["generator_ema"]["net.1.running_mean"], ckpt["generator"]["net.1.running_mean"])
    dcgan_train.standing_stats(ema, batch_size=32, seed=0 + dcgan_train.STANDING_STATS_SEED_OFFSET)
    assert torch.equal(ema.state_dict()["net.1.running_mean"], ckpt["generator_ema"]["net.1.running_mean"])

    off = tmp_path / "off"
    proc = run_script("dcgan_train.py", "--dataset", "mnist", "--data-dir", mnist_dir, "--run-dir", off,
                      "--epochs", 1, "--fid", "off", *TINY)
    assert read_rows(off / "metrics.csv")[0]["cfid"] == "" and "classifier FID" not in proc.stdout
    assert not (off / "checkpoints" / "best.pt").exists()


def test_sigterm_then_resume_with_diffaug_and_ema_equals_the_uninterrupted_run(mnist_dir, tmp_path):
    args = ["--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", 2, "--fid-every", 1, *TINY,
            "--diffaug", "color,translation,cutout"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("dcgan_train.py", *args, "--run-dir", straight)
    # 300 images at batch 32: 9 full batches per epoch; Adam call 25 is D's step 13, mid-epoch 2.
    proc = run_with_signal("dcgan_train.py", "torch.optim.Adam.step", 25, *args, "--run-dir", resumed, in_process=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert torch.load(list_checkpoints(resumed)[0], weights_only=True)["global_step"] == 13
    run_script("dcgan_train.py", *args, "--run-dir", resumed)
    a, b = (torch.load(list_checkpoints(d)[0], weights_only=True) for d in (straight, resumed))
    for key in ("generator", "discriminator", "generator_ema", "rng"):
        for name, value in a[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key][name]), f"{key}/{name}"
    no_time = [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in read_rows(straight / "metrics.csv")]
    assert no_time == [{k: v for k, v in row.items() if not k.endswith("_time_s")}
                       for row in read_rows(resumed / "metrics.csv")]


def fid_args(**overrides) -> argparse.Namespace:
    args = dcgan_train.build_parser().parse_args([])
    vars(args).update(overrides)
    return args


def test_inception_weights_are_downloaded_once_or_one_line_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    lines = []
    # Offline: nothing listens on port 9 of this machine, so torch.hub's urlopen fails as it does without a network.
    monkeypatch.setattr(gan_metrics, "INCEPTION_URL", "http://127.0.0.1:9/" + gan_metrics.INCEPTION_FILE)
    path, classifier, note = gan_metrics.choose_evaluations(fid_args(), is_main=True, log=lines.append)
    assert path is None and not classifier
    assert gan_metrics.INCEPTION_FILE in note and str(tmp_path / "hub" / "checkpoints") in note
    assert "--inception-weights" in note and "\n" not in note
    with pytest.raises(UserError, match="no Inception weights.*refused"):
        gan_metrics.choose_evaluations(fid_args(fid="inception"), is_main=True, log=lines.append)
    assert gan_metrics.choose_evaluations(fid_args(fid="off"), is_main=True) == (None, False, None)
    assert gan_metrics.choose_evaluations(fid_args(dataset="mnist"), is_main=True) == (None, True, None)
    with pytest.raises(UserError, match="mnist and fashion-mnist only"):
        gan_metrics.choose_evaluations(fid_args(fid="classifier"), is_main=True)

    # Online (a file:// URL, which torch.hub's urlopen reads as it reads https): the file lands in torch's hub cache,
    # once, checked against the hash in its name.
    payload = b"not really inception"
    name = f"weights-inception-2015-12-05-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / name).write_bytes(payload)
    monkeypatch.setattr(gan_metrics, "INCEPTION_FILE", name)
    monkeypatch.setattr(gan_metrics, "INCEPTION_URL", (tmp_path / "release" / name).as_uri())
    path, _, note = gan_metrics.choose_evaluations(fid_args(), is_main=True, log=lines.append)
    assert path == tmp_path / "hub" / "checkpoints" / name and path.read_bytes() == payload and note is None
    (tmp_path / "release" / name).unlink()  # found in the cache now: no second download
    assert gan_metrics.choose_evaluations(fid_args(), is_main=True)[0] == path
    # A file whose SHA-256 does not match its name is not kept.
    wrong = "weights-inception-2015-12-05-00000000.pth"
    (tmp_path / "release" / wrong).write_bytes(payload)
    monkeypatch.setattr(gan_metrics, "INCEPTION_FILE", wrong)
    monkeypatch.setattr(gan_metrics, "INCEPTION_URL", (tmp_path / "release" / wrong).as_uri())
    _, _, note = gan_metrics.choose_evaluations(fid_args(), is_main=True, log=lines.append)
    assert "invalid hash value" in note and not list((tmp_path / "hub" / "checkpoints").glob("*00000000*"))


def test_the_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert gan_metrics.INCEPTION_URL == URL_INCEPTION_V3
