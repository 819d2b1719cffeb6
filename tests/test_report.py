"""report.py on tiny real runs in a temporary runs root: every figure in order, every image there, the key numbers.

The runs root is laid out as the training scripts make it (--runs-root, so latest-vae and latest-dcgan are their
links): two beta-sweep VAE runs (--name vae-beta<b>), then the main VAE run, then a DCGAN run on synthetic
CIFAR-10 whose metrics.csv is given an FID column, as a run with Inception weights would have.
"""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from conftest import run_script

import common
import report

# The coursework's order (issue 7), then the extra GAN diagnostics analyze_gan.py makes.
FIGURE_ORDER = ["vae_loss_curves.png", "vae_beta_comparison.png", "vae_reconstructions.png", "vae_samples.png",
                "vae_tsne.png", "vae_interpolation.png", "gan_samples.png", "gan_losses.png",
                "gan_fixed_noise_progression.png", "gan_d_outputs.png", "gan_fid.png", "gan_diversity.png",
                "gan_nearest_neighbours.png"]
QUICK_ANALYSIS = ["--device", "cpu", "--tsne-points", "40", "--iw-samples", "4", "--iw-images", "20"]
VAE_TINY = ["--epochs", "1", "--batch-size", "64", "--latent-dim", "4"]
GAN_TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--epochs", "2", "--ckpt-every-min", "1000"]
FAKE_FID = {1: 312.5, 2: 287.25}


@pytest.fixture(scope="module")
def runs_root(mnist_dir, cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "runs"
    for beta in (1, 4):
        run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, "--name", f"vae-beta{beta}",
                   "--beta", beta, *VAE_TINY)
    run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, "--name", "main", *VAE_TINY)
    run_script("dcgan_train.py", "--data-dir", cifar_dir, "--runs-root", root, *GAN_TINY)
    metrics = root / "latest-dcgan" / "metrics.csv"
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["fid"] = FAKE_FID[int(row["epoch"])]
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def built(runs_root, tmp_path_factory):
    """report.main on the runs root, once; (out folder, runs root)."""
    out = tmp_path_factory.mktemp("out") / "report"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(common.SKIP_CIFAR_MD5_ENV, "1")  # analyze_gan reads the synthetic CIFAR-10 for neighbours
        assert report.main(["--runs-root", str(runs_root), "--out", str(out), *QUICK_ANALYSIS]) == 0
    return out


def referenced_images(out) -> tuple[list[str], list[str]]:
    markdown = (out / "REPORT.md").read_text()
    page = (out / "REPORT.html").read_text()
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown), re.findall(r'<img src="([^"]+)"', page)


def test_every_figure_in_order_and_every_image_exists(built):
    md_images, html_images = referenced_images(built)
    assert md_images == html_images == [f"figures/{name}" for name in FIGURE_ORDER]
    for relative in md_images:
        data = (built / relative).read_bytes()  # relative to the report: the folder can be moved or zipped
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, relative
    assert sorted(p.name for p in (built / "figures").iterdir()) == sorted(FIGURE_ORDER)
    assert not list(built.parent.glob(".report.*")), "a temporary folder was left behind"


def test_each_figure_has_a_one_line_caption(built):
    markdown = (built / "REPORT.md").read_text()
    for name in FIGURE_ORDER:
        after = markdown.split(f"(figures/{name})\n\n", 1)[1]
        caption = after.split("\n", 1)[0]
        assert caption.startswith("*") and caption.endswith("*") and len(caption) > 30, (name, caption)
    page = (built / "REPORT.html").read_text()
    assert page.count("<figcaption>") == len(FIGURE_ORDER)


def test_key_numbers_come_from_the_summaries(built, runs_root):
    markdown = (built / "REPORT.md").read_text()
    page = (built / "REPORT.html").read_text()
    vae = json.loads((runs_root / "latest-vae" / "figures" / "summary.json").read_text())
    assert vae["iw_images"] == 20 and vae["iw_samples"] == 4  # the quick flags reached analyze_vae.py
    n_vae = sum(p.numel() for p in torch.jit.load(str(runs_root / "latest-vae" / "VAE_model.pth")).parameters())
    n_g, n_d = (sum(p.numel() for p in torch.jit.load(str(runs_root / "latest-dcgan" / name)).parameters())
                for name in ("DCGAN_model_G.pth", "DCGAN_model_D.pth"))
    expected = [f"{vae['test_elbo']:.2f} nats per image", f"{vae['iw_log_likelihood']:.2f} nats per image",
                "K = 4, 20 test images", f"{n_vae:,}", f"G {n_g:,} + D {n_d:,} = {n_g + n_d:,}",
                f"{min(FAKE_FID.values()):.2f} (epoch 2)"]
    for text in expected:
        assert text in markdown, text
        assert text in page, text
    assert "not CIFAR-10" not in markdown  # a CIFAR-10 run gets no warning


def test_beta_sweep_rows_and_not_the_main_run(built, runs_root):
    markdown = (built / "REPORT.md").read_text()
    rows = [line for line in markdown.splitlines() if re.match(r"\| [\d.]+ \| `", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 4"]
    for row, beta in zip(rows, (1, 4)):
        run_dir = next(runs_root.glob(f"*-vae-beta{beta}"))
        summary = json.loads((run_dir / "figures" / "summary.json").read_text())
        assert f"`{run_dir.name}`" in row and f"{summary['test_elbo']:.2f}" in row
    assert (runs_root / report.COMPARISON_DIR / "loss_curves.png").exists()
    assert "-main`" not in "\n".join(rows)


def test_rebuild_without_analysis_replaces_the_folder(built, runs_root):
    (built / "figures" / "stale.png").write_bytes(b"old")
    before = (runs_root / "latest-vae" / "figures" / "summary.json").stat().st_mtime_ns
    assert report.main(["--runs-root", str(runs_root), "--out", str(built), "--no-analysis"]) == 0
    assert not (built / "figures" / "stale.png").exists()
    assert (runs_root / "latest-vae" / "figures" / "summary.json").stat().st_mtime_ns == before  # not re-analysed
    assert referenced_images(built)[0] == [f"figures/{name}" for name in FIGURE_ORDER]


def test_refuses_what_it_cannot_report(runs_root, tmp_path):
    with pytest.raises(common.UserError, match="no dcgan run at .*make dcgan"):
        report.main(["--runs-root", str(runs_root), "--gan-run", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "r")])
    with pytest.raises(common.UserError, match="is not a dcgan run folder"):
        report.main(["--runs-root", str(runs_root), "--gan-run", str(runs_root / "latest-vae"), "--no-analysis",
                     "--out", str(tmp_path / "r")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(common.UserError, match="holds files but no REPORT.md"):
        report.main(["--runs-root", str(runs_root), "--out", str(tmp_path / "mine"), "--no-analysis"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
