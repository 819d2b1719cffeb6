"""vae_train.py: the loss against values worked out by hand, data loading, the exported model as a grader uses it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import SHARED_MNIST, run_script

from common.checkpoints import load_latest_checkpoint
from common.data import FASHION_MNIST_SYSTEM_DIR, load_images
import vae_train


class Constant(nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value.expand(len(x), *self.value.shape[1:])


def test_loss_terms_match_values_worked_out_by_hand():
    """mu = (1, 0), logvar = (0, log 4), decoder logits 0 (p = 0.5 everywhere), eps = 0.

    KL = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 4 - 1 - log 4)
    Bernoulli NLL with p = 0.5 is log 2 per pixel whatever x is: 784 log 2.
    Gaussian NLL with mean 0.5, sigma 1, x = 0.5: 784 * 0.5 * log(2 pi).
    """
    model = vae_train.VAE("mlp", latent_dim=2, likelihood="bernoulli")
    model.encoder = Constant(torch.tensor([[1.0, 0.0, 0.0, math.log(4.0)]]))
    model.decoder = Constant(torch.zeros(1, 1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    recon_nll, kl = vae_train.vae_terms(model, x, eps=torch.zeros(3, 2))
    assert torch.allclose(kl, torch.full((3,), 0.5 + 0.5 * (3 - math.log(4.0))))
    assert torch.allclose(recon_nll, torch.full((3,), 784 * math.log(2.0)))

    gaussian = vae_train.VAE("mlp", latent_dim=2, likelihood="gaussian")
    gaussian.encoder, gaussian.decoder = model.encoder, model.decoder
    recon_nll, _ = vae_train.vae_terms(gaussian, torch.full((2, 1, 28, 28), 0.5), eps=torch.zeros(2, 2))
    assert torch.allclose(recon_nll, torch.full((2,), 784 * 0.5 * math.log(2 * math.pi)))


def test_loss_terms_match_torch_distributions():
    torch.manual_seed(0)
    model = vae_train.VAE("conv", latent_dim=3, likelihood="bernoulli")
    x = torch.rand(4, 1, 28, 28)
    eps = torch.randn(4, 3)
    recon_nll, kl = vae_train.vae_terms(model, x, eps)
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    expected_kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl, expected_kl, atol=1e-5)
    p = torch.sigmoid(model.decoder(mu + eps * torch.exp(0.5 * logvar)))
    expected_recon = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(recon_nll, expected_recon, rtol=1e-5)


def test_kl_warmup_is_a_ramp_to_beta():
    assert vae_train.kl_weight(4.0, 0, 0.0) == 4.0
    assert vae_train.kl_weight(4.0, 2, 0.5) == 1.0
    assert vae_train.kl_weight(4.0, 2, 7.0) == 4.0


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 2, "--batch-size", 64)
    return run_dir


def test_run_folder_holds_config_metrics_samples_and_model(finished_run):
    import csv
    import json

    config = json.loads((finished_run / "config.json").read_text())
    assert config["script"] == "vae" and config["args"]["epochs"] == 2
    assert {"torch", "python", "git_commit", "host", "device"} <= config.keys()
    with open(finished_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "images_seen", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                             "test_kl", "beta", "train_time_s", "epoch_time_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert math.isclose(float(row["test_loss"]), float(row["test_recon"]) + float(row["test_kl"]), rel_tol=1e-6)
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    for epoch in (1, 2):
        for kind in ("recon", "prior"):
            assert (finished_run / "samples" / f"{kind}_epoch_{epoch:03d}.png").stat().st_size > 0
    assert "epoch 2/2" in (finished_run / "log.txt").read_text()


def test_exported_model_passes_a_graders_checks(finished_run, mnist_dir):
    vae = torch.jit.load(str(finished_run / "VAE_model.pth"), map_location="cpu")
    assert any(isinstance(grandchild, torch.jit.RecursiveScriptModule) and grandchild.original_name == "Conv2d"
               for child in vae.children() for grandchild in child.children())

    from torchvision.datasets import MNIST
    test_set = MNIST(str(mnist_dir), train=False, transform=vae_train.transform)
    x = torch.stack([test_set[i][0] for i in range(8)])
    recon = vae(x)[0]
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1

    # The exported file reconstructs exactly as the trained weights do in eval mode (z = mu).
    model = vae_train.VAE("conv", 16, "bernoulli")
    model.load_state_dict(load_latest_checkpoint(finished_run)["model"])
    assert torch.allclose(model.eval()(x)[0], recon, atol=1e-6)


def test_mlp_baseline_trains_and_exports(mnist_dir, tmp_path):
    run_dir = tmp_path / "mlp"
    run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 1, "--arch", "mlp",
               "--likelihood", "gaussian", "--train-limit", 128)
    vae = torch.jit.load(str(run_dir / "VAE_model.pth"))
    assert vae(torch.rand(5, 1, 28, 28))[0].shape == (5, 1, 28, 28)
    assert not any(g.original_name == "Conv2d" for c in vae.children() for g in c.children())


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                    reason="apt-get install dataset-fashion-mnist to run this test")
def test_fashion_mnist_is_read_from_the_debian_package(tmp_path):
    images, labels = load_images("fashion-mnist", tmp_path / "data", train=False)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == list(range(10))


@pytest.mark.skipif(not (SHARED_MNIST / "MNIST" / "raw").is_dir(), reason="the real MNIST is only on dev machines")
def test_real_mnist_loads_as_one_uint8_tensor():
    images, labels = load_images("mnist", SHARED_MNIST, train=True)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]  # the published first labels of the training set
