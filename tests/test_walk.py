"""The README's walk end to end, through make itself, on tiny data in a copy of the repository:

    make vae, make vae-betas, make dcgan, make gan-sweep, make report, make submission, make analyze-vae RUN=glob

Checks what the walk is for: the report's VAE is the main run (not the last sweep member), its comparison figures
are labelled by the settings that differ, make submission finds the VAE run's own data, and a glob over the runs
still works after the report.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.readers import read_metrics_csv
from conftest import REPO, VAE_THAT_LEARNS, script_env

VAE_ARGS = "--batch-size 64 --latent-dim 4"
MAIN_VAE_ARGS = " ".join(VAE_THAT_LEARNS)  # the submitted VAE must beat the mean image (check_submission.py)
GAN_ARGS = "--ngf 8 --ndf 8 --batch-size 32 --ckpt-every-min 1000"
REPORT_ARGS = "--device cpu --tsne-points 40 --iw-samples 4 --iw-images 20 --quality-samples 40"


def copy_repo(dest: Path) -> Path:
    """The repository's code (scripts, common/, tools/, Makefile, requirements and constraints, slurm/), without
    runs, report, .venv or .git."""
    dest.mkdir(parents=True)
    for path in [*REPO.glob("*.py"), REPO / "Makefile", *REPO.glob("requirements*.txt"), REPO / "constraints.txt"]:
        shutil.copy2(path, dest / path.name)
    for folder in ("slurm", "common", "tools"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def make(repo: Path, target: str, *variables: str) -> str:
    """`make TARGET` in the copy with this interpreter (PY=...) and without building a .venv (-o); its output."""
    # Not the variables of a make that runs these tests (make test-all ARGS=...): make passes them on to the
    # commands it runs, in their environment and in MAKEFLAGS.
    makefile_variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", (repo / "Makefile").read_text(), re.M))
    env = {k: v for k, v in script_env().items()
           if k not in makefile_variables | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    proc = subprocess.run(["make", "-o", ".venv/.installed", target, f"PY={sys.executable}", *variables], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"make {target} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_the_walk_gives_a_report_of_the_main_runs_with_settings_as_labels(tmp_path, mnist_dir, cifar_dir):
    repo = copy_repo(tmp_path / "repo")
    (repo / "slurm" / "betas.txt").write_text("# two betas keep the test quick\n1\n4   # strong\n")
    make(repo, "vae", f"DATA_DIR={mnist_dir}", f"ARGS={MAIN_VAE_ARGS}")
    make(repo, "vae-betas", f"DATA_DIR={mnist_dir}", f"ARGS=--epochs 1 {VAE_ARGS}")
    make(repo, "dcgan", f"DATA_DIR={cifar_dir}", f"ARGS=--epochs 2 {GAN_ARGS}")
    make(repo, "gan-sweep", f"DATA_DIR={cifar_dir}", f"ARGS=--epochs 1 {GAN_ARGS}")
    runs = repo / "runs"
    main_vae, main_gan = (runs / "latest-vae").resolve(), (runs / "latest-dcgan").resolve()
    assert main_vae.name.endswith("-vae") and main_gan.name.endswith("-dcgan")  # sweeps left the links alone
    assert sorted(p.name.split("-", 2)[-1] for p in runs.glob("*-vae-beta*")) == ["vae-beta1", "vae-beta4"]

    out = make(repo, "report", f"ARGS={REPORT_ARGS}")
    assert f"report: VAE: {main_vae.name}: the longest finished vae run" in out
    shown = json.loads((repo / "report" / "report.json").read_text())
    assert shown["vae_run"] == str(main_vae) and shown["gan_run"] == str(main_gan)
    markdown = (repo / "report" / "REPORT.md").read_text()
    for label in ("| beta=1 |", "| beta=4 |", "| defaults |",  # the sweeps' rows of Table 1
                  "| d_norm=spectral |", "| instance_noise=0.1, label_smoothing=0.9 |", "| loss=hinge |"):
        assert label in markdown, label
    assert f"| VAE | `{main_vae.name}` | conv VAE, latent 4, beta 1" in markdown

    out = make(repo, "submission")
    assert f"VAE: {main_vae.name}: the longest finished vae run" in out
    assert f"MNIST test images from {mnist_dir}" in out  # the run's own data, no DATA_DIR given
    assert "all checks passed" in out
    with zipfile.ZipFile(repo / "CW2.zip") as bundle:
        names = bundle.namelist()
    assert {"VAE_model.pth", "DCGAN_model_G.pth", "DCGAN_model_D.pth", "figures/vae_beta_curves.png",
            "figures/gan_sweep_samples.png"} <= set(names)

    # The README's glob over the sweep still works after the report (nothing it wrote matches it).
    out = make(repo, "analyze-vae", "RUN=runs/*-vae-beta*", "ARGS=--tsne-points 40 --iw-samples 2 --iw-images 10")
    assert f"comparison in {runs / 'compare' / 'vae-betas'}" in out

    # The live view: the events of the main runs load with TensorBoard's own reader (what make tensorboard serves),
    # one point per epoch; and the report names no folder of this machine, so it is handed in as it is.
    from tensorboard.backend.event_processing import event_accumulator
    for run_dir, tag, grid in ((main_vae, "vae/epoch/test_loss", "vae/samples/reconstructions"),
                               (main_gan, "dcgan/epoch/loss_d", "dcgan/samples/fixed_noise")):
        found = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
        found.Reload()
        epochs = len(read_metrics_csv(run_dir / "metrics.csv"))
        assert len(found.Scalars(tag)) == epochs and len(found.Images(grid)) == epochs, run_dir.name
    for name in ("REPORT.md", "REPORT.html"):
        text = (repo / "report" / name).read_text()
        assert str(tmp_path) not in text and str(REPO) not in text, name
        assert not re.search(r"(^|[\s`(\"'=])/[A-Za-z0-9_.-]+/", text), name
