"""colab.ipynb executed cell by cell in a real IPython kernel (nbclient), on tiny data in a copy of the repository,
with Google Drive replaced by a local folder: the notebook's own settings cell is followed by one that points
DRIVE, REPO and DATA at temporary folders and makes every run tiny (as papermill injects parameters)."""
from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, make_cifar10, make_mnist, script_env
from test_walk import copy_repo

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

TINY_SETTINGS = """
DRIVE = {drive!r}
REPO = {repo!r}
DATA = {data!r}
VAE_OPTIONS = "--epochs 5 --batch-size 16 --lr 3e-3 --latent-dim 4"  # conftest.VAE_THAT_LEARNS: beats the mean
BETA_OPTIONS = "--epochs 1 --batch-size 64 --latent-dim 4"
GAN_OPTIONS = "--epochs 1 --ngf 8 --ndf 8 --batch-size 32"
REPORT_OPTIONS = "--device cpu --tsne-points 40 --iw-samples 4 --iw-images 20 --quality-samples 40"
"""


@pytest.mark.slow
def test_the_notebook_runs_end_to_end_with_drive_as_a_local_folder(tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "repo")
    (repo / "slurm" / "betas.txt").write_text("1\n4\n")
    data = make_cifar10(make_mnist(tmp_path / "data"))
    drive = tmp_path / "drive" / "genmodels"

    notebook = nbformat.read(REPO / "colab.ipynb", as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
        TINY_SETTINGS.format(drive=str(drive), repo=str(repo), data=str(data))))
    # The kernel inherits this environment: `!python` is this interpreter, synthetic CIFAR-10 is accepted.
    for key, value in script_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    runs = repo / "runs"
    assert (runs / "latest-vae").resolve() == runs / "vae-main"  # --run-dir inside runs/: the links exist
    assert (runs / "latest-dcgan").resolve() == runs / "dcgan-main"
    for name in ("vae-main", "vae-beta1", "vae-beta4", "dcgan-main"):  # every run mirrored to "Drive"
        assert list((drive / "runs" / name / "checkpoints").glob("step-*.pt")), name
    shown = json.loads((drive / "report" / "report.json").read_text())
    assert shown["vae_run"] == str(runs / "vae-main") and shown["gan_run"] == str(runs / "dcgan-main")
    assert shown["vae_sweep"]["runs"] == [str(runs / "vae-beta1"), str(runs / "vae-beta4")]
    with zipfile.ZipFile(drive / "CW2.zip") as bundle:
        assert {"VAE_model.pth", "DCGAN_model_G.pth", "DCGAN_model_D.pth", "figures/vae_beta_curves.png"} <= \
            set(bundle.namelist())
