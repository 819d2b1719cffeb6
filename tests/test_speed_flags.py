"""The GPU speed options (--amp, --channels-last, --compile) exercised on CPU, where PyTorch supports them.

On a GPU they are about speed; here the check is that each one runs the real training path and changes the
results by no more than numerical noise against the same run in plain float32.
"""
from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import run_script

from common.readers import list_checkpoints


def train(mnist_dir, run_dir, *flags) -> dict:
    run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 1, "--batch-size", 64,
               "--train-limit", 128, "--latent-dim", 4, "--device", "cpu", *flags)
    with open(run_dir / "metrics.csv") as f:
        return next(csv.DictReader(f))


@pytest.fixture(scope="module")
def plain(mnist_dir, tmp_path_factory) -> dict:
    return {arch: train(mnist_dir, tmp_path_factory.mktemp("plain") / arch, "--arch", arch)
            for arch in ("conv", "mlp")}


@pytest.mark.parametrize("flags, arch, rel_tol", [
    (["--channels-last"], "conv", 1e-5),
    (["--amp", "bf16"], "conv", 1e-2),   # bf16 keeps 8 bits of mantissa: noise at the 1e-3 level
    # inductor fuses and reorders float operations; mlp compiles fastest, and still takes ~25 s on CPU
    pytest.param(["--compile"], "mlp", 1e-3, marks=pytest.mark.slow),
], ids=["channels-last", "amp-bf16", "compile"])
def test_speed_option_matches_the_plain_run(mnist_dir, tmp_path, plain, flags, arch, rel_tol):
    row = train(mnist_dir, tmp_path / "run", "--arch", arch, *flags)
    for key in ("train_loss", "test_loss", "test_kl"):
        # abs_tol: 0.01 nat, for the KL of a barely trained model (a fraction of a nat)
        assert math.isclose(float(row[key]), float(plain[arch][key]), rel_tol=rel_tol, abs_tol=1e-2), key


def test_fp16_uses_a_grad_scaler_whose_state_is_checkpointed(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    row = train(mnist_dir, run_dir, "--amp", "fp16", "--arch", "mlp")  # fp16 convolutions are slow on a CPU
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["test_loss"]))
    scaler = torch.load(list_checkpoints(run_dir)[0], weights_only=True)["scaler"]
    # The scale starts at 2**16 and halves at each overflowing step: it moved, so the scaler was in the loop.
    assert 0 < scaler["scale"] < 2.0 ** 16
