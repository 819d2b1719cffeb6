"""Run folders written by an older version of this code still load: a tiny VAE and DCGAN run trained by the scripts
of commit c453977 (the last main before common.py became a package), then continued, analysed and read by today's.

The old scripts come from git history (`git archive`); a copy without that history (a tarball, a shallow clone)
skips these tests."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import REPO, script_env

import analyze_gan
import analyze_vae
import common
import dcgan_train
import vae_train
from common import experiments

OLD_COMMIT = "c453977a0866b5e0ce7fa3f31262ca6cbc738a2e"
VAE_TINY = ["--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--latent-dim", "4", "--log-every", "1"]
GAN_TINY = ["--epochs", "1", "--ngf", "8", "--ndf", "8", "--batch-size", "32", "--fid", "off", "--log-every", "3"]


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The scripts of OLD_COMMIT, unpacked into a folder of their own."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT[:7]} is not in this copy's git history")
    folder = tmp_path_factory.mktemp("old-code")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, members=[m for m in tar.getmembers() if m.name.endswith(".py")], filter="data")
    return folder


def train_with_old_code(old_code, script: str, *args):
    proc = subprocess.run([sys.executable, str(old_code / script), *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=300, cwd=old_code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def run_main(main, argv) -> int:
    with pytest.raises(SystemExit) as stop:
        common.run_main(main, [str(a) for a in argv])
    return stop.value.code


def test_an_old_vae_run_continues_and_is_analysed(old_code, mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "old-vae"
    train_with_old_code(old_code, "vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, *VAE_TINY)
    old_export = (run_dir / "VAE_model.pth").read_bytes()
    assert run_main(vae_train.main, ["--resume", run_dir, "--epochs", 2, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resumed at epoch 2, step 0/2" in out
    assert [row["epoch"] for row in common.read_metrics_csv(run_dir / "metrics.csv")] == [1.0, 2.0]
    assert (run_dir / "VAE_model.pth").read_bytes() != old_export  # re-exported at epoch 2
    assert torch.jit.load(str(run_dir / "VAE_model.pth"))(torch.rand(2, 1, 28, 28))[0].shape == (2, 1, 28, 28)
    assert experiments.read_run(run_dir, "vae").finished
    assert run_main(analyze_vae.main, [run_dir, "--tsne-points", 40, "--perplexity", 5, "--iw-samples", 2,
                                       "--iw-images", 20, "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "tsne.png").exists()


def test_an_old_dcgan_run_continues_and_is_analysed(old_code, cifar_dir, tmp_path, capsys):
    run_dir = tmp_path / "old-dcgan"
    train_with_old_code(old_code, "dcgan_train.py", "--data-dir", cifar_dir, "--run-dir", run_dir, *GAN_TINY)
    assert run_main(dcgan_train.main, ["--resume", run_dir, "--epochs", 2, "--device", "cpu"]) == 0
    assert "resumed at epoch 2" in capsys.readouterr().out
    assert len(common.read_metrics_csv(run_dir / "metrics.csv")) == 2
    assert run_main(analyze_gan.main, [run_dir, "--quality", "diversity", "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "final_samples.png").exists()
    generator = torch.jit.load(str(run_dir / "DCGAN_model_G.pth"))
    assert generator(torch.randn(2, 100, 1, 1)).shape == (2, 3, 32, 32)
