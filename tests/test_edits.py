"""Editing the code between two runs of the same command, what a student does all day (issue 27): a checkpoint that
does not fit the edited model is refused in one line and nothing is renamed; undoing the edit continues the run;
--init-from warm-starts the edited model from what fits; an edit that keeps the shapes continues, with one line
naming the changed files and the diff kept in the run folder; a value added to the meter in one line reaches
metrics.csv and steps.csv across a stop and a resume.

The edits of the last two tests are real edits of a copy of the scripts (run in processes of their own); the first
edits the model class in this process."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch.nn as nn

from common import folder
from common.errors import EXIT_PREEMPTED
from common.readers import read_metrics_csv
import vae_train
from conftest import REPO, script_env
from hostile import VAE_STEPS, epochs_in, in_process, one_error_line, snapshot, vae


class WiderVAE(vae_train.VAE):
    """The student's edit: the encoder's hidden layer 256 -> 300 wide."""

    def __init__(self, arch, latent_dim, likelihood):
        super().__init__(arch, latent_dim, likelihood)
        self.encoder[5], self.encoder[7] = nn.Linear(64 * 7 * 7, 300), nn.Linear(300, 2 * latent_dim)


def test_an_edited_model_is_refused_untouched_the_undo_continues_and_init_from_warm_starts(vae_run, mnist_dir,
                                                                                        tmp_path, capsys,
                                                                                        monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(vae_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    before = snapshot(run_dir, but=(".lock", "log.txt"))
    command = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)
    with monkeypatch.context() as patch:
        patch.setattr(vae_train, "VAE", WiderVAE)
        code, _, err = in_process(vae_train, command, capsys)
        one_error_line(code, err, "does not fit the model as the code now builds it",
                       "model.encoder.5.weight ([256, 3136] in the checkpoint, [300, 3136] in the model)",
                       "and 2 more", "Undo the edit", "--new-run", f"--init-from {run_dir}")
        assert snapshot(run_dir, but=(".lock", "log.txt")) == before  # nothing renamed, moved or written
        assert not list(run_dir.rglob("*.corrupt"))

        warm = tmp_path / "warm"
        code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", warm, "--epochs", 1, "--init-from",
                                                   run_dir), capsys)
        assert code == 0, err
        line = next(line for line in out.splitlines() if line.startswith("--init-from"))
        for name in ("model.encoder.5.weight", "model.encoder.5.bias", "model.encoder.7.weight"):
            assert name in line  # encoder.7.bias ([2 * latent_dim]) fits, and is loaded
        assert "3 start fresh" in line and "encoder.7.bias" not in line and "optimiser state, epoch and metrics start fresh" in line
        assert epochs_in(warm) == [1]  # a new run: its own first epoch

    code, out, err = in_process(vae_train, command, capsys)  # the edit undone: the same command continues
    assert code == 0 and f"resumed at epoch 2, step 0/{VAE_STEPS}" in out, err
    assert epochs_in(run_dir) == [1, 2]


def scripts_copy(tmp_path: Path) -> Path:
    """The training scripts and common/ in a folder of their own, a git repository with one commit."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "common", repo / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "vae_train.py", repo)
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    return repo


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


# A script run after a patch that sends the process SIGTERM as the n-th optimiser step begins.
STOPPER = """import os, signal, sys, runpy, torch
calls, original = [0], torch.optim.Adam.step
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)
torch.optim.Adam.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_copy(repo: Path, *args, stop_at: int = 0) -> subprocess.CompletedProcess:
    script = [str(repo / "vae_train.py"), *map(str, args)]
    command = [sys.executable, "-c", STOPPER.format(n=stop_at), *script] if stop_at else [sys.executable, *script]
    return subprocess.run(command, capture_output=True, text=True, env=script_env(), timeout=300, cwd=repo)


def test_edits_that_keep_the_shapes_continue_the_run_which_records_the_code_and_the_new_logged_value(mnist_dir,
                                                                                                      tmp_path, capsys):
    """One epoch (in this process: the copy's files are byte for byte this repository's); then ReLU -> LeakyReLU
    and a value logged in one line, the same command with --epochs 2, stopped by SIGTERM in epoch 2 and resumed:
    the change is named once, its diff kept, and the new value is in metrics.csv and steps.csv from the edit on."""
    repo, run_dir = scripts_copy(tmp_path), tmp_path / "run"
    code, _, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1), capsys)
    assert code == 0, err
    edit(repo / "vae_train.py", "nn.Linear(latent_dim, 256), nn.ReLU(),", "nn.Linear(latent_dim, 256), nn.LeakyReLU(),")
    added = "            meter.add(pixel_mean=x.mean())  # the student's new logged value\n"
    edit(repo / "vae_train.py", "            run.step_done(state)", added + "            run.step_done(state)")
    command = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)
    stopped = run_copy(repo, *command, stop_at=2)  # SIGTERM at the second step of epoch 2
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    note = "note: the code changed since this run's last start: vae_train.py"
    assert note in stopped.stdout and note in (run_dir / "log.txt").read_text()
    resumed = run_copy(repo, *command)
    assert resumed.returncode == 0 and f"resumed at epoch 2, step 2/{VAE_STEPS}" in resumed.stdout, resumed.stderr
    assert "the code changed" not in resumed.stdout  # the same code as the start before

    starts = json.loads((run_dir / "config.json").read_text())["starts"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert [s["git_commit"] for s in starts[1:]] == [commit] * 2  # the first start's: this repository's
    assert [s["uncommitted_diff"] for s in starts[1:]] == ["code/start-002.diff", "code/start-003.diff"]
    diff = (run_dir / "code/start-002.diff").read_text()
    assert "+                nn.Linear(latent_dim, 256), nn.LeakyReLU()," in diff and "+" + added.rstrip() in diff
    assert {"vae_train.py", "common/run.py"} <= starts[0]["code_files"].keys()
    assert starts[0]["code_files"]["vae_train.py"] != starts[1]["code_files"]["vae_train.py"]
    assert starts[0]["code_files"]["common/run.py"] == starts[1]["code_files"]["common/run.py"]

    rows = read_metrics_csv(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2] and 0 < rows[1]["pixel_mean"] < 1
    assert math.isnan(rows[0]["pixel_mean"])  # epoch 1 ran before the edit: a blank cell
    steps = read_metrics_csv(run_dir / "steps.csv")  # --log-every 1: one row per step, none twice
    assert [row["global_step"] for row in steps] == list(range(1, 2 * VAE_STEPS + 1))
    assert all(0 < row["pixel_mean"] < 1 for row in steps[VAE_STEPS:])


def test_a_copy_without_git_is_recorded_by_its_hashes(tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "common", copy / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "vae_train.py", copy)
    monkeypatch.setattr(folder, "REPO_ROOT", copy)
    code = folder.code_state("vae")
    assert code["commit"] == "not a git checkout" and code["diff"] == ""
    assert len(code["files"]["vae_train.py"]) == 16 and "common/run.py" in code["files"]


def test_the_refusal_lines_of_an_intact_checkpoint(tmp_path):
    """checkpoints.refusal, which decides that an intact checkpoint is not this run's (nothing renamed): another
    script's, an older version's (an entry missing), another experiment's, a model edited since."""
    from common.checkpoints import LOOP_KEYS, refusal
    model = vae_train.VAE("conv", 4, "bernoulli")
    state = {"model": model}
    ckpt = {"model": model.state_dict(), "script": "vae", "experiment": {"beta": 1.0},
            **{key: 0 for key in LOOP_KEYS if key != "script"}}
    assert refusal(ckpt, state, "vae", tmp_path, {"beta": 1.0}) is None
    assert "is a dcgan checkpoint, not a vae one" in refusal({**ckpt, "script": "dcgan"}, state, "vae", tmp_path)
    older = {k: v for k, v in ckpt.items() if k != "rng"}
    assert "lacks rng" in refusal(older, state, "vae", tmp_path) and "--new-run" in refusal(older, state, "vae",
                                                                                              tmp_path)
    assert "another experiment (beta: saved 1.0, now 4.0)" in refusal(ckpt, state, "vae", tmp_path, {"beta": 4.0})
    edited = {"model": WiderVAE("conv", 4, "bernoulli")}
    line = refusal(ckpt, edited, "vae", tmp_path, {"beta": 1.0})
    assert line.startswith("does not fit the model as the code now builds it: model.encoder.5.weight ([256, 3136] "
                           "in the checkpoint, [300, 3136] in the model) and 2 more")
    assert refusal(ckpt, edited, "vae", tmp_path) is None  # --init-from: warm_start takes what fits
