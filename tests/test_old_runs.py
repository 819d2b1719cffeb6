"""Run folders written by an older version of this code: a tiny VAE and DCGAN run trained by the scripts of commit
c453977 (the last main before common.py became a package). Today's scripts refuse to continue them in one line and
rename nothing (their checkpoints predate the meter: no compatibility code is kept for older formats), and today's
analysis still reads them.

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
from common import errors, experiments
import dcgan_train
import vae_train

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
        errors.run_main(main, [str(a) for a in argv])
    return stop.value.code


def refused_untouched(main, run_dir, capsys) -> None:
    """Continuing an old run: exit 2, one line saying what its checkpoint lacks and what to do; nothing changed but
    the log's new lines."""
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in (".lock", "log.txt")}
    assert run_main(main, ["--resume", run_dir, "--epochs", 2, "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "lacks meter" in err[0] and "--new-run" in err[0], err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in (".lock", "log.txt")} \
        == before


@pytest.mark.slow  # a process of the old code; checkpoints.refusal's lines are in test_edits
def test_an_old_vae_run_is_refused_in_one_line_and_still_analysed(old_code, mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "old-vae"
    train_with_old_code(old_code, "vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, *VAE_TINY)
    refused_untouched(vae_train.main, run_dir, capsys)
    assert experiments.read_run(run_dir, "vae").finished
    assert run_main(analyze_vae.main, [run_dir, "--tsne-points", 40, "--perplexity", 5, "--iw-samples", 2,
                                       "--iw-images", 20, "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "tsne.png").exists()


@pytest.mark.slow
def test_an_old_dcgan_run_is_refused_in_one_line_and_still_analysed(old_code, cifar_dir, tmp_path, capsys):
    run_dir = tmp_path / "old-dcgan"
    train_with_old_code(old_code, "dcgan_train.py", "--data-dir", cifar_dir, "--run-dir", run_dir, *GAN_TINY)
    refused_untouched(dcgan_train.main, run_dir, capsys)
    assert run_main(analyze_gan.main, [run_dir, "--quality", "diversity", "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "final_samples.png").exists()
    generator = torch.jit.load(str(run_dir / "DCGAN_model_G.pth"))
    assert generator(torch.randn(2, 100, 1, 1)).shape == (2, 3, 32, 32)
