"""analyze_vae.py on two tiny VAE runs (beta 1 and 2, sweep vae-betas) on synthetic MNIST IDX files: figures,
numbers, the comparison of the sweep, errors."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from conftest import run_script

import analyze_vae
from common import experiments, sweep_figures
from common.data import load_images
from common.errors import EXIT_USER_ERROR, UserError
from common.readers import read_metrics_csv
from vae_train import VAE, to_float, vae_terms

FIGURES = ["loss_curves.png", "reconstructions.png", "samples.png", "tsne.png", "interpolation.png"]
IW_SAMPLES = 20


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    """Two finished 2-epoch runs of sweep vae-betas differing only in beta, in a runs root that also holds a DCGAN
    run and a comparison folder; analysed once with every folder of the root given, as `runs/*` would."""
    root = tmp_path_factory.mktemp("vae-runs")
    for beta in (1, 2):
        run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, "--name", f"vae-beta{beta}",
                   "--sweep", "vae-betas", "--epochs", 2, "--batch-size", 32, "--latent-dim", 4, "--beta", beta)
    run_dirs = [next(root.glob(f"*-vae-beta{beta}")) for beta in (1, 2)]
    (root / "compare" / "older").mkdir(parents=True)
    (root / "not-a-run").mkdir()
    proc = run_script("analyze_vae.py", *sorted(root.iterdir()), "--iw-samples", IW_SAMPLES, "--tsne-points", 60,
                      "--interp-classes", 3, 7)
    return {"dirs": run_dirs, "out": root / "compare" / "vae-betas", "stdout": proc.stdout, "root": root}


def read_summary(run_dir):
    return json.loads((run_dir / "figures" / "summary.json").read_text())


def last_metrics_row(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def assert_png(path):
    assert path.exists(), f"{path} not written"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{path} is not a drawn PNG ({len(data)} bytes)"


@pytest.mark.parametrize("index", [0, 1])
def test_every_figure_written(runs, index):
    figures = runs["dirs"][index] / "figures"
    for name in FIGURES:
        assert_png(figures / name)
    assert not list(figures.glob(".*.tmp-*")), "a temporary file was left behind"


@pytest.mark.parametrize("index", [0, 1])
def test_summary_holds_the_true_elbo_and_a_tighter_iw_bound(runs, index):
    run_dir = runs["dirs"][index]
    summary = read_summary(run_dir)
    for key in ("test_elbo", "test_recon", "test_kl", "iw_log_likelihood", "iw_elbo"):
        assert math.isfinite(summary[key]), f"{key} = {summary[key]}"
    assert summary["iw_samples"] == IW_SAMPLES and summary["epoch"] == 2
    # beta = 1 whatever the run's beta: the checkpoint is the last epoch's, and the ELBO uses the training script's
    # evaluation noise, so it is minus the sum of that epoch's test terms (not its beta-weighted test_loss).
    row = last_metrics_row(run_dir)
    assert summary["test_elbo"] == pytest.approx(-(float(row["test_recon"]) + float(row["test_kl"])), rel=1e-5)
    # log p(x) >= IW bound >= ELBO: the IW estimate is above the mean of its own log weights for every image
    # (Jensen), and above the analytic-KL ELBO up to Monte Carlo noise.
    assert summary["iw_log_likelihood"] >= summary["iw_elbo"]
    assert summary["iw_log_likelihood"] >= summary["test_elbo"] - 1.0
    assert f"{summary['iw_log_likelihood']:.2f}" in runs["stdout"], "the IW estimate is not printed"


def test_several_runs_make_a_comparison_in_the_sweeps_folder(runs):
    """Folders that are not VAE runs are skipped with a note; the comparison goes to RUNS_ROOT/compare/<sweep>."""
    for name in ("loss_curves.png", "reconstructions.png", "samples.png"):
        assert_png(runs["out"] / name)
    with open(runs["out"] / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == ["beta=1", "beta=2"]
    for row, run_dir in zip(rows, runs["dirs"]):
        assert float(row["test_neg_elbo"]) == pytest.approx(-read_summary(run_dir)["test_elbo"])
        assert int(row["images_seen"]) == 576  # 2 epochs of 9 full batches of 32 (of the 300 synthetic images)
    for skipped in ("compare: not a run folder", "not-a-run: not a run folder"):
        assert skipped in runs["stdout"], skipped
    assert "beta=2" in runs["stdout"] and "test -ELBO" in runs["stdout"]  # the printed table


def test_comparison_curves_are_the_bound_at_beta_1_per_epoch(runs):
    """Not the beta-weighted objective (test_loss), which differs between betas by construction; train (top row)
    and test (bottom row); per epoch, since both runs' epochs are the same images."""
    infos = [experiments.read_run(d) for d in runs["dirs"]]
    fig = sweep_figures.plot_comparison_curves(infos, experiments.run_labels(infos), "t")
    for split, (elbo_axis, recon_axis, kl_axis) in zip(("train", "test"), (fig.axes[:3], fig.axes[3:])):
        for i, info in enumerate(infos):
            recon = [row[f"{split}_recon"] for row in info.metrics]
            kl = [row[f"{split}_kl"] for row in info.metrics]
            line = elbo_axis.get_lines()[i]
            assert line.get_label() == f"beta={info.args['beta']:g}"
            assert list(line.get_xdata()) == [1, 2]
            np.testing.assert_allclose(line.get_ydata(), np.add(recon, kl))
            np.testing.assert_allclose(recon_axis.get_lines()[i].get_ydata(), recon)
            np.testing.assert_allclose(kl_axis.get_lines()[i].get_ydata(), kl)
    assert fig.axes[3].get_xlabel() == "epoch" and list(fig.axes[3].get_xticks()) == [1, 2]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_weights_by_hand(likelihood):
    """log p(x|z) is the training loss's own (vae_terms), log p(z) and log q(z|x) are Normal log densities."""
    torch.manual_seed(0)
    model = VAE("conv", 4, likelihood).eval()
    if likelihood == "gaussian":
        model.log_sigma.data.fill_(-1.0)
    x = torch.rand(5, 1, 28, 28)
    eps = torch.randn(3, 5, 4)
    with torch.no_grad():
        log_w = analyze_vae.log_importance_weights(model, x, eps)
        mu, logvar = model.encode(x)
        for k in range(3):
            recon_nll, _ = vae_terms(model, x, eps[k])
            z = mu + eps[k] * torch.exp(0.5 * logvar)
            log_pz = Normal(0.0, 1.0).log_prob(z).sum(1)
            log_qz = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
            torch.testing.assert_close(log_w[k], -recon_nll + log_pz - log_qz, rtol=1e-5, atol=1e-3)


def test_iw_is_exact_when_q_is_the_prior_and_the_decoder_ignores_z():
    """Then every log weight equals log p(x), so the estimate must be exactly log p(x) for any K and batching."""
    torch.manual_seed(0)
    model = VAE("conv", 4).eval()
    with torch.no_grad():
        for layer in (model.encoder[-1], model.decoder[-1]):  # mu = logvar = 0; logits = the output bias
            layer.weight.zero_()
        model.encoder[-1].bias.zero_()
        model.decoder[-1].bias.fill_(-1.5)
    images = (torch.rand(10, 1, 28, 28) * 255).to(torch.uint8)
    logits = torch.full((10, 1, 28, 28), -1.5)
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, to_float(images), reduction="sum") / 10
    for n_samples, batch_size in ((1, 5000), (7, 5000), (7, 21)):  # 21 // 7 = 3 images a batch: 3 + 3 + 3 + 1
        iw, elbo = analyze_vae.importance_weighted_ll(model, images, n_samples, seed=0, batch_size=batch_size)
        assert iw == pytest.approx(log_px.item(), abs=1e-3) and elbo == pytest.approx(log_px.item(), abs=1e-3)


def test_iw_with_one_sample_is_an_elbo_estimate(runs, mnist_dir):
    run = analyze_vae.read_run(runs["dirs"][0])
    model = analyze_vae.load_model(run, torch.device("cpu"))
    images, _ = load_images("mnist", mnist_dir, train=False)
    iw_1, elbo_1 = analyze_vae.importance_weighted_ll(model, images, 1, seed=0)
    assert iw_1 == pytest.approx(elbo_1, abs=1e-6)  # logsumexp of one term, minus log 1
    # The training loss's ELBO on the same noise (the 100 images fit one batch, so eps is the first draw of the
    # seeded generator): it differs only by the analytic KL in place of the sampled one, ~0.15 nats of noise here.
    eps = torch.randn((1, len(images), 4), generator=torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        recon_nll, kl = vae_terms(model, to_float(images), eps)
    assert iw_1 == pytest.approx(-(recon_nll + kl).mean().item(), abs=1.0)
    iw_50, _ = analyze_vae.importance_weighted_ll(model, images, 50, seed=0)
    assert iw_50 > iw_1


def test_interpolation_ends_by_class_and_index():
    labels = torch.tensor([3, 7, 3, 1])
    assert analyze_vae.interpolation_pair(labels, None, (7, 3)) == (1, 0)
    assert analyze_vae.interpolation_pair(labels, None, (3, 3)) == (0, 2)
    assert analyze_vae.interpolation_pair(labels, (2, 3), None) == (2, 3)
    with pytest.raises(UserError, match="class 5"):
        analyze_vae.interpolation_pair(labels, None, (3, 5))
    with pytest.raises(UserError, match="not a test-set index"):
        analyze_vae.interpolation_pair(labels, (0, 4), None)


def test_bad_run_dir_is_one_clear_error(tmp_path):
    proc = run_script("analyze_vae.py", tmp_path, check=False)
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0], proc.stderr


def test_folders_that_are_not_finished_vae_runs_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        analyze_vae.read_run(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"script": "dcgan", "args": {}}))
    with pytest.raises(UserError, match="not a VAE run"):
        analyze_vae.read_run(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"script": "vae", "args": {}}))
    with pytest.raises(UserError, match="no checkpoint yet"):
        analyze_vae.read_run(str(tmp_path))


def test_metrics_row_being_appended_by_a_live_run_is_skipped(tmp_path):
    path = tmp_path / "metrics.csv"
    for partial_row in ("2,120.0,11", "2,120.0\n"):  # cut mid-number before the newline; a field short
        path.write_text("epoch,train_loss,test_loss\n1,180.5,150.25\n" + partial_row)
        assert read_metrics_csv(path) == [{"epoch": 1.0, "train_loss": 180.5, "test_loss": 150.25}]
