"""report.py on tiny real runs in a temporary runs root: the runs that count, both sweeps, every figure in order.

The runs root is laid out as `make vae`, `make vae-betas`, `make dcgan` and `make gan-sweep` leave it (--runs-root):
the main VAE, then two runs of sweep vae-betas (newer than the main run, as after the README's walk), the main DCGAN
on synthetic CIFAR-10 (its metrics.csv given an FID column, as a run with Inception weights would have), then two
runs of sweep dcgan-sweep (BCE and hinge).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_script

from common.errors import UserError
from common.files import write_csv
import report

# The coursework's order, then the extra GAN diagnostics, then the GAN experiments.
FIGURE_ORDER = ["vae_loss_curves.png", "vae_beta_curves.png", "vae_beta_reconstructions.png", "vae_beta_samples.png",
                "vae_reconstructions.png", "vae_samples.png", "vae_tsne.png", "vae_interpolation.png",
                "gan_samples.png", "gan_losses.png", "gan_fixed_noise_progression.png", "gan_d_outputs.png",
                "gan_fid.png", "gan_diversity.png", "gan_nearest_neighbours.png", "gan_milestones.png",
                "gan_sweep_losses.png", "gan_sweep_d_outputs.png", "gan_sweep_samples.png",
                "gan_sweep_progression.png", "gan_sweep_diversity.png"]  # no gan_sweep_quality: no FID in the sweep
QUICK_ANALYSIS = ["--device", "cpu", "--tsne-points", "40", "--iw-samples", "4", "--iw-images", "20",
                  "--quality-samples", "40"]
VAE_TINY = ["--epochs", "1", "--batch-size", "64", "--latent-dim", "4"]
GAN_TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--epochs", "2", "--ckpt-every-min", "1000"]
FAKE_FID = {1: 312.5, 2: 287.25}


@pytest.fixture(scope="module")
def runs_root(mnist_dir, cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "runs"
    run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, *VAE_TINY)
    for beta in (1, 4):
        run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, "--name", f"vae-beta{beta}",
                   "--sweep", "vae-betas", "--beta", beta, *VAE_TINY)
    run_script("dcgan_train.py", "--data-dir", cifar_dir, "--runs-root", root, *GAN_TINY)
    metrics = root / "latest-dcgan" / "metrics.csv"
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["fid"] = FAKE_FID[int(row["epoch"])]
    write_csv(metrics, list(rows[0]), rows)
    for name, extra in (("dcgan-baseline", []), ("dcgan-hinge", ["--loss", "hinge"])):
        run_script("dcgan_train.py", "--data-dir", cifar_dir, "--runs-root", root, "--name", name, "--sweep",
                   "dcgan-sweep", *GAN_TINY, *extra)
    return root


@pytest.fixture(scope="module")
def built(runs_root, tmp_path_factory):
    """report.main on the runs root, once; the out folder and what it printed."""
    out = tmp_path_factory.mktemp("out") / "report"
    with pytest.MonkeyPatch.context() as patch:
        lines = []
        patch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert report.main(["--runs-root", str(runs_root), "--out", str(out), *QUICK_ANALYSIS]) == 0
    return out, "\n".join(lines)


def referenced_images(out) -> tuple[list[str], list[str]]:
    markdown = (out / "REPORT.md").read_text()
    page = (out / "REPORT.html").read_text()
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown), re.findall(r'<img src="([^"]+)"', page)


def captions(out) -> dict[str, str]:
    markdown = (out / "REPORT.md").read_text()
    return {name: markdown.split(f"(figures/{name})\n\n", 1)[1].split("\n", 1)[0] for name in FIGURE_ORDER}


def test_every_figure_in_order_and_every_image_exists(built):
    out, _ = built
    md_images, html_images = referenced_images(out)
    assert md_images == html_images == [f"figures/{name}" for name in FIGURE_ORDER]
    for relative in md_images:
        data = (out / relative).read_bytes()  # relative to the report: the folder can be moved or zipped
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, relative
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(FIGURE_ORDER)
    assert not list(out.parent.glob(".report.*")), "a temporary folder was left behind"


def test_the_report_shows_the_main_runs_not_the_newest_sweep_members(built, runs_root):
    out, printed = built
    main_vae = (runs_root / "latest-vae").resolve()
    assert main_vae.name.endswith("-vae")  # the sweep runs, started later, did not move the link
    shown = json.loads((out / "report.json").read_text())
    assert shown["vae_run"] == str(main_vae)
    assert shown["gan_run"] == str((runs_root / "latest-dcgan").resolve())
    assert f"report: VAE: {main_vae.name}: the longest finished vae run not in a sweep" in printed
    assert [Path(p).name.split("-", 2)[-1] for p in shown["vae_sweep"]["runs"]] == ["vae-beta1", "vae-beta4"]
    assert f"| VAE | `{main_vae.name}` | conv VAE, latent 4, beta 1" in (out / "REPORT.md").read_text()


def test_captions_are_numbered_and_name_no_run_which_table_1_does(built, runs_root):
    """Issue 29: a document to hand in: figures numbered in order, no run folder (time stamp) heading a caption;
    the runs and their settings in Table 1, with why each was chosen."""
    out, _ = built
    page = (out / "REPORT.html").read_text()
    assert page.count("<figcaption>") == len(FIGURE_ORDER)
    for number, (name, caption) in enumerate(captions(out).items(), start=1):
        assert caption.startswith(f"*Figure {number}. ") and caption.endswith("*") and len(caption) > 40, caption
        assert not re.search(r"\d{8}-\d{6}", caption), (name, caption)
    assert re.findall(r"<figcaption>Figure (\d+)\.", page) == [str(n) for n in range(1, len(FIGURE_ORDER) + 1)]
    table_1 = (out / "REPORT.md").read_text().split("Table 1.", 1)[0]
    main_gan = (runs_root / "latest-dcgan").resolve().name
    assert f"| DCGAN | `{main_gan}` | 32x32, nz 100, ngf 8, ndf 8, bce loss" in table_1
    assert "the longest finished dcgan run not in a sweep" in table_1
    assert table_1.count("| beta sweep |") == 2 and table_1.count("| GAN variant |") == 2
    beta_caption = captions(out)["vae_beta_curves.png"]
    assert "From beta=1 to beta=4" in beta_caption and "the negative ELBO at beta = 1" in \
        beta_caption and "training set (top row" in beta_caption and "test set (bottom row" in beta_caption


def test_key_numbers_come_from_the_summaries(built, runs_root):
    out, _ = built
    markdown = (out / "REPORT.md").read_text()
    page = (out / "REPORT.html").read_text()
    vae = json.loads((runs_root / "latest-vae" / "figures" / "summary.json").read_text())
    assert vae["iw_images"] == 20 and vae["iw_samples"] == 4  # the quick flags reached analyze_vae.py
    n_vae = sum(p.numel() for p in torch.jit.load(str(runs_root / "latest-vae" / "VAE_model.pth")).parameters())
    n_g, n_d = (sum(p.numel() for p in torch.jit.load(str(runs_root / "latest-dcgan" / name)).parameters())
                for name in ("DCGAN_model_G.pth", "DCGAN_model_D.pth"))
    expected = [f"{vae['test_elbo']:.2f} nats per image", f"{vae['iw_log_likelihood']:.2f} nats per image",
                "K = 4, 20 test images", f"{n_vae:,}", f"G {n_g:,} + D {n_d:,} = {n_g + n_d:,}",
                f"best {min(FAKE_FID.values()):.2f} at epoch 2 (10,000 samples)", "DCGAN best milestone (diversity)"]
    for text in expected:
        assert text in markdown, text
        assert text in page, text
    assert "not CIFAR-10" not in markdown  # a CIFAR-10 run gets no warning


def test_beta_table_lists_the_sweep_by_setting(built, runs_root):
    out, _ = built
    markdown = (out / "REPORT.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| beta=")]
    assert [row.split(" | ")[0] for row in rows] == ["| beta=1", "| beta=4"]
    for row, beta in zip(rows, (1, 4)):
        run_dir = next(runs_root.glob(f"*-vae-beta{beta}"))
        summary = json.loads((run_dir / "figures" / "summary.json").read_text())
        assert f"{-summary['test_elbo']:.2f}" in row
        assert f"| beta sweep | `{run_dir.name}` | beta={beta} |" in markdown  # Table 1 names its folder
    assert (runs_root / "compare" / "vae-betas" / "loss_curves.png").exists()


def test_gan_experiments_are_labelled_by_setting(built, runs_root):
    out, _ = built
    markdown = (out / "REPORT.md").read_text()
    section = markdown.split("## GAN experiments (sweep `dcgan-sweep`)", 1)[1]
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| loss=")] == \
        ["| loss=bce", "| loss=hinge"]
    for name, label in (("dcgan-baseline", "loss=bce"), ("dcgan-hinge", "loss=hinge")):
        assert f"| GAN variant | `{next(runs_root.glob(f'*-{name}')).name}` | {label} |" in markdown


def test_a_glob_over_the_runs_still_works_after_the_report(built, runs_root):
    """`make analyze-vae RUN="runs/*-vae-beta*"`: the report wrote nothing that such a glob matches."""
    assert sorted(p.name.split("-", 2)[-1] for p in runs_root.glob("*-vae-beta*")) == ["vae-beta1", "vae-beta4"]
    assert all((p / "config.json").exists() for p in runs_root.glob("*-vae-beta*"))


def test_rebuild_without_analysis_replaces_the_folder(built, runs_root):
    out, _ = built
    (out / "figures" / "stale.png").write_bytes(b"old")
    before = (runs_root / "latest-vae" / "figures" / "summary.json").stat().st_mtime_ns
    assert report.main(["--runs-root", str(runs_root), "--out", str(out), "--no-analysis"]) == 0
    assert not (out / "figures" / "stale.png").exists()
    assert (runs_root / "latest-vae" / "figures" / "summary.json").stat().st_mtime_ns == before  # not re-analysed
    assert referenced_images(out)[0] == [f"figures/{name}" for name in FIGURE_ORDER]


def test_refuses_what_it_cannot_report(runs_root, tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        report.main(["--runs-root", str(runs_root), "--gan-run", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "r")])
    with pytest.raises(UserError, match="is a 'vae' run, not a DCGAN run"):
        report.main(["--runs-root", str(runs_root), "--gan-run", str(runs_root / "latest-vae"), "--no-analysis",
                     "--out", str(tmp_path / "r")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds files but no REPORT.md"):
        report.main(["--runs-root", str(runs_root), "--out", str(tmp_path / "mine"), "--no-analysis"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty-runs").mkdir()
    with pytest.raises(UserError, match="no finished vae run .* that is not a sweep member.*VAE_RUN="):
        report.main(["--runs-root", str(tmp_path / "empty-runs"), "--out", str(tmp_path / "r2")])


INSTRUCTIONS = re.compile(r"\bmake (vae|dcgan|report|submission|gan-sweep|vae-betas)\b|python \w+\.py|\brun `|Made by|"
                          r"then `make")


def body_of(markdown: str) -> str:
    """The report after its "before you hand in" box, without the code blocks of the appendix."""
    body = "\n".join(line for line in markdown.splitlines() if not line.startswith(">"))
    return re.sub(r"```python.*?```", "", body, flags=re.S)


def test_what_is_missing_is_listed_at_the_top_and_the_body_holds_no_instructions(built, runs_root, tmp_path):
    """Issue 29: nothing to edit before hand-in. A complete set of runs: nothing missing, no instruction, no tool
    line in the body (the box holds only the best milestone's export); a sweep not run: one line in the box at the
    top, and no section for it."""
    out, _ = built
    markdown = (out / "REPORT.md").read_text()
    assert "yet: sweep" not in markdown and not INSTRUCTIONS.search(body_of(markdown))
    missing = tmp_path / "missing"
    assert report.main(["--runs-root", str(runs_root), "--out", str(missing), "--no-analysis", "--vae-sweep",
                        "not-run"]) == 0
    markdown = (missing / "REPORT.md").read_text()
    title, box = markdown.split("\n\n", 2)[:2]
    assert title.startswith("# ") and box.startswith("> **Before you hand in**")
    assert "No beta comparison yet: sweep `not-run` has no runs" in box and "`make vae-betas`" in box
    assert "Varying beta" not in markdown and not INSTRUCTIONS.search(body_of(markdown))
    assert '<aside class="todo"><strong>Before you hand in</strong>' in (missing / "REPORT.html").read_text()
