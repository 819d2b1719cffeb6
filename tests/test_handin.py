"""From runs to hand-in (issue 22): a report to hand in as it is (relative paths, captions true of short and long
runs, no duplicate rows, the code for the notebook's test cells), the analysis done once, a submission that cannot
be stale or weak, flags that must be spelled out, no folders left by a failed start, D(G(z)) from G's step, one
true line about FID.

Tiny runs in this process (common.run_main) on the synthetic data of tests/support: the VAE on 300 MNIST-format
images, the DCGANs on 200 CIFAR-10-format images (batch 32: 7 steps an epoch, 14 for two).
"""
from __future__ import annotations

import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

import analyze_gan
import analyze_vae
import check_submission
from common import experiments, figures, gan_metrics, progress, testcell
from common.data import load_images
from common.errors import run_main, UserError
import dcgan_train
import report
import vae_train
from conftest import REPO, VAE_THAT_LEARNS, make_mnist

QUICK = ["--device", "cpu", "--tsne-points", "40", "--iw-samples", "4", "--iw-images", "20", "--quality-samples", "40"]
GAN_TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--epochs", "2", "--ckpt-every-min", "1000"]


def run(main, *argv) -> None:
    with pytest.raises(SystemExit) as stop:
        run_main(main, [*map(str, argv)])
    assert stop.value.code == 0


@pytest.fixture(scope="module")
def runs_root(mnist_dir, cifar_dir, tmp_path_factory):
    """A VAE, a DCGAN shorter than --log-every (steps.csv empty) and one longer (a steps.csv row every step: 14,
    enough for a smoothed curve)."""
    root = tmp_path_factory.mktemp("handin") / "runs"
    run(vae_train.main, "--data-dir", mnist_dir, "--runs-root", root, *VAE_THAT_LEARNS)
    run(dcgan_train.main, "--data-dir", cifar_dir, "--runs-root", root, "--name", "short", *GAN_TINY)
    run(dcgan_train.main, "--data-dir", cifar_dir, "--runs-root", root, "--name", "long", "--log-every", 1, *GAN_TINY)
    return root


def caption(markdown: str, figure: str) -> str:
    return markdown.split(f"(figures/{figure})\n\n", 1)[1].split("\n", 1)[0]


ABSOLUTE = re.compile(r"(^|[\s`(\"'=])/[A-Za-z0-9_.-]+/")  # a path from the root: /tmp/..., /home/..., /work/...


def assert_no_absolute_path(text: str, *folders) -> None:
    for folder in (*folders, REPO):
        assert str(folder) not in text, folder
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text).group(0)


# ----------------------------------------------------------------------------------------------------------------
# The report


@pytest.fixture(scope="module")
def reports(runs_root, tmp_path_factory):
    """report.main on the VAE and each DCGAN: {"short": its report folder, "long": ...}."""
    out = tmp_path_factory.mktemp("reports")
    for name in ("short", "long"):
        gan = next(runs_root.glob(f"*-{name}"))
        assert report.main(["--runs-root", str(runs_root), "--gan-run", str(gan), "--out", str(out / name),
                            *QUICK]) == 0
    return {name: out / name for name in ("short", "long")}


def test_captions_are_true_of_short_and_long_runs(reports):
    short, long = ((reports[name] / "REPORT.md").read_text() for name in ("short", "long"))
    assert "D and G losses: the mean of each epoch (dots).*" in caption(short, "gan_losses.png")  # nothing finer
    assert "smoothed" not in caption(short, "gan_losses.png") and "faint" not in caption(short, "gan_d_outputs.png")
    assert "(dots), each step's value (faint) and its smoothed trend" in caption(long, "gan_losses.png")
    assert "(dots; faint: each step's value, smoothed)" in caption(long, "gan_d_outputs.png")
    assert "decoded at epochs 1 and 2 (rows)" in caption(long, "gan_fixed_noise_progression.png")
    for markdown in (short, long):
        milestones = caption(markdown, "gan_milestones.png")
        assert "The diversity of each milestone checkpoint's samples" in milestones  # named by what it is
        assert "quality" not in milestones and "closest to the training images' diversity" in milestones


def test_the_report_names_no_path_of_this_machine(reports, runs_root):
    for folder in reports.values():
        for name in ("REPORT.md", "REPORT.html"):
            assert_no_absolute_path((folder / name).read_text(), runs_root.parent)
        markdown = (folder / "REPORT.md").read_text()
        assert "sweep `vae-betas` has no runs in `runs`." in markdown  # relative to the runs root's folder


def test_no_duplicate_rows_or_columns(reports):
    markdown = (reports["long"] / "REPORT.md").read_text()
    key_rows = [line.split(" | ")[0] for line in markdown.splitlines() if line.startswith("| ")]
    assert key_rows.count("| VAE parameters") == 1
    vae_row = next(line for line in markdown.splitlines() if line.startswith("| VAE | "))
    assert "parameters" not in vae_row  # the count is the next row's, not repeated here
    for line in markdown.splitlines():
        if line.startswith("| run |"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            assert len(set(header)) == len(header), header


def test_the_test_cell_code_is_the_scripts_own_and_runs_alone(reports):
    markdown = (reports["long"] / "REPORT.md").read_text()
    section = markdown.split("## Appendix: code for the notebook's test cells", 1)[1]
    blocks = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    assert [block + "\n" for block in blocks] == [testcell.cell_code(testcell.SCRIPTS[name]) for name in
                                                  ("VAE", "DCGAN")]
    assert "raw logit" in section and "torch.sigmoid(D(x))" in section  # D's output, documented
    from PIL import Image
    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    for block, script in zip(blocks, (vae_train, dcgan_train)):
        namespace = {}
        exec(block, namespace)  # noqa: S102  (the report's own code, as a student pastes it)
        assert torch.equal(namespace["transform"](image), script.transform(image))
        x = torch.linspace(-2, 2, 50)
        assert torch.equal(namespace["denorm"](x), script.denorm(x))


# ----------------------------------------------------------------------------------------------------------------
# The analysis, done once


def test_the_report_reuses_the_analysis_of_the_same_checkpoint_and_options(reports, runs_root, capsys):
    vae_summary = (runs_root / "latest-vae" / "figures" / "summary.json")
    before = vae_summary.stat().st_mtime_ns
    gan = next(runs_root.glob("*-long"))
    out = reports["long"].parent / "again"
    assert report.main(["--runs-root", str(runs_root), "--gan-run", str(gan), "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert printed.count("figures and numbers reused") == 2, printed  # the VAE and the DCGAN
    assert vae_summary.stat().st_mtime_ns == before
    assert analyze_vae.main([str(runs_root / "latest-vae"), *QUICK[:2], "--tsne-points", "41", "--iw-samples", "4",
                             "--iw-images", "20"]) == 0
    assert "reused" not in capsys.readouterr().out  # another option: analysed again
    assert json.loads(vae_summary.read_text())["tsne_points"] == 41


def test_a_long_step_says_it_is_still_running():
    import time
    lines = []
    with progress.still_running("t-SNE", lines.append, every=0.05, status=lambda: "3 of 4"):
        time.sleep(0.3)
    assert lines and all(line.startswith("  t-SNE: still running (0:00:00, 3 of 4)") for line in lines)


# ----------------------------------------------------------------------------------------------------------------
# Figures that compare


def test_sweep_ticks_sit_where_the_points_are():
    fig = Figure()
    ax = fig.subplots()
    ax.plot([500, 1000], [1, 2])
    ax.axhline(0.5)  # a reference line: its x data (0, 1) are not points
    figures.label_x_axis(ax, "training images seen")
    assert list(ax.get_xticks()) == [500, 1000]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["500", "1,000"]


def test_runs_with_epochs_of_one_size_compare_by_epoch(runs_root):
    runs = [experiments.read_run(p) for p in sorted(runs_root.glob("*-short")) + sorted(runs_root.glob("*-long"))]
    x_name, xs = experiments.x_axis(runs)
    assert x_name == "epoch" and xs == [[1, 2], [1, 2]]


def test_the_beta_comparison_shows_train_and_test(runs_root):
    infos = [experiments.read_run(runs_root / "latest-vae")] * 2
    fig = analyze_vae.sweep_figures.plot_comparison_curves(infos, ["a", "b"], "t")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["train: -ELBO at beta = 1 (recon + KL)", "train: reconstruction NLL",
                          "train: KL(q(z|x) || p(z))"]
    assert [t.split(":")[0] for t in titles[3:]] == ["test"] * 3
    rows = infos[0].metrics
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [r["train_recon"] + r["train_kl"] for r in rows])


def test_the_sweep_quality_figure_is_not_a_second_diversity_figure(runs_root):
    runs = [experiments.read_run(next(runs_root.glob(f"*-{name}"))) for name in ("short", "long")]
    summaries = [{"milestones": {"kind": "diversity", "measure": "diversity", "rows": [{"epoch": 1, "value": 0.1}]}}
                 for _ in runs]
    assert analyze_gan.sweep_figures.compare_quality(runs, ["a", "b"], summaries, "epoch") is None


def test_g_loss_and_d_of_g_of_z_come_from_the_same_d_pass(tmp_path, monkeypatch):
    seen = {"mean_output": [], "g_loss": []}
    real_mean, real_g_loss = dcgan_train.mean_output, dcgan_train.g_loss
    monkeypatch.setattr(dcgan_train, "mean_output", lambda logits: seen["mean_output"].append(logits)
                        or real_mean(logits))
    monkeypatch.setattr(dcgan_train, "g_loss", lambda logits, loss: seen["g_loss"].append(logits)
                        or real_g_loss(logits, loss))
    data = make_mnist(tmp_path / "data")
    assert dcgan_train.main(["--data-dir", str(data), "--dataset", "mnist", "--train-limit", "16", "--batch-size",
                             "16", "--ngf", "8", "--ndf", "8", "--epochs", "1", "--fid", "off", "--device", "cpu",
                             "--run-dir", str(tmp_path / "run")]) == 0
    (d_real_logits, d_fake_logits), (g_logits,) = seen["mean_output"], seen["g_loss"]
    assert d_fake_logits is g_logits  # D(G(z)) of the metrics is the D pass of G's loss, after D's update
    assert d_real_logits is not g_logits


def argparse_namespace(args, **changes):
    return type(args)(**{**vars(args), **changes})


def test_one_true_line_about_fid_when_the_weights_cannot_be_had(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    args = dcgan_train.build_parser().parse_args([])  # CIFAR-10, --fid auto: Inception wanted
    lines = []
    weights, classifier, note = gan_metrics.choose_evaluations(args, is_main=True, log=lines.append)
    assert lines == [] and weights is None and not classifier  # no "downloading ..." before the failure
    assert note.startswith("FID skipped: ") and "no network" in note


def test_missing_data_fails_before_a_word_about_fid(tmp_path, capsys, monkeypatch):
    from torchvision import datasets

    class CifarOffline(datasets.CIFAR10):  # as torchvision offline: it makes the folder, then cannot download
        def __init__(self, root, **kwargs):
            (tmp_path / "data").mkdir(exist_ok=True)
            raise RuntimeError("Error downloading cifar-10-python.tar.gz")
    monkeypatch.setattr(datasets, "CIFAR10", CifarOffline)
    with pytest.raises(SystemExit) as stop:
        run_main(dcgan_train.main, ["--data-dir", str(tmp_path / "data"), "--runs-root", str(tmp_path / "r")])
    out = capsys.readouterr()
    assert stop.value.code == 2 and "cifar10 is not in" in out.err
    assert "FID" not in out.out + out.err and "Inception" not in out.out + out.err
    assert not (tmp_path / "data").exists()  # the folder torchvision made for it is gone again


def test_a_failed_load_leaves_no_empty_folders(tmp_path, monkeypatch):
    from torchvision import datasets

    class MnistOffline(datasets.MNIST):  # torchvision's MNIST makes MNIST/raw before it downloads
        def __init__(self, root, **kwargs):
            (tmp_path / "wrong" / "data" / "MNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(datasets, "MNIST", MnistOffline)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="mnist is not in"):
        load_images("mnist", tmp_path / "wrong" / "data", train=True)
    assert sorted(p.name for p in (tmp_path / "wrong").iterdir()) == ["keep.txt"]  # what was there stays


@pytest.mark.parametrize("main", [vae_train.main, report.main, analyze_vae.main, analyze_gan.main,
                                  check_submission.main])
def test_flags_must_be_spelled_out(main, capsys):
    flag = {vae_train.main: "--epoch", report.main: "--no-analys", check_submission.main: "--n-image",
            analyze_vae.main: "--iw-sample", analyze_gan.main: "--quality-sample"}[main]
    with pytest.raises(SystemExit) as stop:
        main(["runs/x", flag, "2"] if main in (analyze_vae.main, analyze_gan.main) else [flag, "2"])
    assert stop.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The submission


@pytest.fixture
def submission(runs_root, reports, tmp_path):
    """The long run's report and the runs, as make submission sees them, with an old CW2.zip in place."""
    report_dir = tmp_path / "report"
    shutil.copytree(reports["long"], report_dir)
    zip_path = tmp_path / "CW2.zip"
    zip_path.write_bytes(b"an old zip")
    gan = next(runs_root.glob("*-long"))
    return {"report": report_dir, "zip": zip_path, "gan": gan,
            "argv": ["--runs-root", str(runs_root), "--gan-run", str(gan), "--n-images", "10", "--figures",
                     str(report_dir / "figures"), "--zip", str(zip_path)]}


def fail_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL")]


@pytest.mark.real_test_cells
def test_a_passing_check_runs_the_test_cells_in_a_clean_python(submission, capsys):
    code = check_submission.main(submission["argv"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS  VAE_model.pth: test cell (vae_train.py's transform and denorm in a clean Python)" in out
    assert "PASS  DCGAN_model_G.pth: test cell (dcgan_train.py's transform and denorm in a clean Python)" in out
    assert "PASS  report: the report shows the DCGAN checked" in out
    assert f"deleted the previous {submission['zip']}" in out and zipfile.is_zipfile(submission["zip"])


@pytest.mark.real_test_cells
def test_test_cell_code_that_needs_the_project_fails(submission, tmp_path, monkeypatch, capsys):
    script = tmp_path / "vae_train.py"
    script.write_text("import common\nfrom torchvision import transforms\n\ntransform = transforms.ToTensor()\n\n\n"
                      "def denorm(x):\n    return common.clamp01(x)\n")
    monkeypatch.setitem(testcell.SCRIPTS, "VAE", script)
    assert "import common" in testcell.cell_code(script)
    assert check_submission.main(submission["argv"]) == 1
    out = capsys.readouterr().out
    assert fail_lines(out) == ["FAIL  VAE_model.pth: test cell (vae_train.py's transform and denorm in a clean "
                               "Python): ModuleNotFoundError: No module named 'common' (<the VAE test cell>, line 1)"]
    assert not submission["zip"].exists()  # the old zip was deleted first, and no new one was written


def test_a_report_of_other_runs_fails_the_check(submission, runs_root, capsys):
    shown = json.loads((submission["report"] / "report.json").read_text())
    short = next(runs_root.glob("*-short"))
    (submission["report"] / "report.json").write_text(json.dumps({**shown, "gan_run": str(short)}))
    assert check_submission.main(submission["argv"]) == 1
    assert fail_lines(capsys.readouterr().out) == [
        f"FAIL  report: the report shows the DCGAN checked: it shows the DCGAN run {short.name}, but the DCGAN checked "
        f"is {submission['gan'].name}: run make report again (with the same runs)"]
    assert not submission["zip"].exists()


def test_a_report_older_than_the_models_fails_the_check(submission, capsys):
    shown = json.loads((submission["report"] / "report.json").read_text())
    shown["exported_steps"]["gan_run"] = 7  # as if the run had trained on (and exported again) since the report
    (submission["report"] / "report.json").write_text(json.dumps(shown))
    assert check_submission.main(submission["argv"]) == 1
    assert "it shows " in fail_lines(capsys.readouterr().out)[0] and not submission["zip"].exists()


class GreyVAE(nn.Module):
    """A collapsed VAE: conv layers, and the same grey image for every input."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
        self.decoder = nn.Sequential(nn.Conv2d(1, 1, 1))

    def forward(self, x):
        mu = self.encoder(x)[:, :4]
        return torch.full_like(x, 0.49), mu, torch.zeros_like(mu)


def test_a_vae_no_better_than_the_mean_image_fails(submission, mnist_dir, tmp_path, capsys):
    torch.jit.script(GreyVAE().eval()).save(str(tmp_path / "VAE_model.pth"))
    argv = [*submission["argv"], "--vae", str(tmp_path / "VAE_model.pth"), "--data-dir", str(mnist_dir)]
    assert check_submission.main(argv) == 1
    failures = fail_lines(capsys.readouterr().out)
    assert len(failures) == 1 and failures[0].startswith("FAIL  VAE_model.pth: reconstructions better than the mean "
                                                         "image: MSE ")
    assert "no better than the mean test image's" in failures[0] and "max pixel 0.49" in failures[0]
