"""The SLURM scripts, end to end under a fake SLURM: job ids in the environment and a stub `scontrol` on PATH."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, script_env

import common

SHELL_SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck (.ci/run does)")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def fake_slurm(tmp_path):
    """An environment like a batch job's: job id set, and an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**script_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "RUNS_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable}
    return env, calls, tmp_path / "runs"


def start_job(script: str, env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "slurm" / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def vae_options(mnist_dir, runs_root, epochs):
    return ["--data-dir", mnist_dir, "--runs-root", runs_root, "--epochs", epochs, "--batch-size", 32,
            "--latent-dim", 4, "--log-every", 1]


def signal_after(job: subprocess.Popen, marker: str, sig=signal.SIGUSR1) -> str:
    """Send `sig` to the batch shell once `marker` appears in its output; return all the output."""
    seen = []
    for line in job.stdout:
        seen.append(line)
        if marker in line:
            job.send_signal(sig)
            break
    seen.append(job.stdout.read())
    job.wait(timeout=120)
    return "".join(seen)


def test_warning_signal_checkpoints_requeues_and_the_requeued_job_finishes(fake_slurm, mnist_dir):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", env, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/")
    assert job.returncode == common.EXIT_PREEMPTED, output
    assert "stopped by SIGUSR1" in output
    run_dir = runs_root / "slurm-4242"
    assert common.list_checkpoints(run_dir), "the warning signal must leave a checkpoint"
    assert calls.read_text().split() == ["requeue", "4242"]

    # SLURM starts the requeued job with the same id; it finds its folder and continues (here: to 2 epochs).
    requeued = subprocess.run(["bash", str(REPO / "slurm" / "vae.sh"), *map(str, vae_options(
        mnist_dir, runs_root, 2))], capture_output=True, text=True, env={**env, "SLURM_RESTART_COUNT": "1"},
        cwd=REPO, timeout=300)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert "resuming vae run" in requeued.stdout and "resumed at epoch 1" in requeued.stdout
    with open(run_dir / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]
    assert (run_dir / "VAE_model.pth").exists()
    assert calls.read_text().split() == ["requeue", "4242"], "a finished run must not be requeued"


def test_scancel_sigterm_checkpoints_but_does_not_requeue(fake_slurm, mnist_dir):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", env, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/", signal.SIGTERM)
    assert job.returncode == common.EXIT_PREEMPTED, output
    assert common.list_checkpoints(runs_root / "slurm-4242")
    assert not calls.exists()


def test_restart_cap_stops_requeueing(fake_slurm, mnist_dir):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", {**env, "SLURM_RESTART_COUNT": "3", "MAX_RESTARTS": "3"},
                    *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/")
    assert "restarted 3 times (MAX_RESTARTS=3); not requeueing" in output
    assert job.returncode != 0 and not calls.exists()


def test_no_progress_stops_requeueing(fake_slurm, tmp_path):
    """A job that is warned before it writes any new checkpoint is not requeued forever."""
    env, calls, _ = fake_slurm
    stub = tmp_path / "stuck-python"
    stub.write_text("#!/usr/bin/env bash\ntrap 'exit 75' USR1\necho started\nwhile true; do sleep 0.1; done\n")
    stub.chmod(0o755)
    job = start_job("vae.sh", {**env, "PYTHON": str(stub)})
    output = signal_after(job, "started")
    assert "no progress since this start" in output
    assert job.returncode != 0 and not calls.exists()


def test_array_tasks_get_their_own_run_folders(fake_slurm, mnist_dir):
    env, _, runs_root = fake_slurm
    for task in (0, 1):
        array_env = {**env, "SLURM_JOB_ID": str(900 + task), "SLURM_ARRAY_JOB_ID": "77",
                     "SLURM_ARRAY_TASK_ID": str(task)}
        proc = subprocess.run(["bash", str(REPO / "slurm" / "vae_betas.sh"), *map(str, vae_options(
            mnist_dir, runs_root, 1)), "--train-limit", "64"], capture_output=True, text=True, env=array_env,
            cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    import json
    betas = [json.loads((runs_root / f"slurm-77_{task}" / "config.json").read_text())["args"]["beta"]
             for task in (0, 1)]
    assert betas == [0.5, 1.0]


def test_two_gpu_job_goes_through_torchrun_and_still_checkpoints_and_requeues(fake_slurm, mnist_dir):
    """With more than one GPU on the node the script runs torchrun (here: 2 CPU processes with gloo)."""
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", {**env, "NPROC_PER_NODE": "2"}, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/")
    assert "(2 processes)" in output and "stopped by SIGTERM" in output, output
    ckpt = torch.load(common.list_checkpoints(runs_root / "slurm-4242")[0], weights_only=True)
    assert ckpt["world_size"] == 2
    assert calls.read_text().split() == ["requeue", "4242"]


def test_colab_notebook_trains_into_a_mirrored_run_folder():
    """The notebook is valid nbformat 4 and its training cell uses flags the scripts really have."""
    import json
    import vae_train

    notebook = json.loads((REPO / "colab.ipynb").read_text())
    assert notebook["nbformat"] == 4
    source = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    train_line = next(line for line in source.splitlines() if line.startswith("!python $SCRIPT"))
    flags = [word for word in train_line.split() if word.startswith("--")]
    known = {option for action in vae_train.build_parser()._actions for option in action.option_strings}
    assert {"--run-dir", "--mirror-dir"} <= set(flags) and set(flags) <= known


def test_sweep_array_task_takes_its_line_of_the_table(fake_slurm, cifar_dir):
    env, _, runs_root = fake_slurm
    task_env = {**env, "SLURM_ARRAY_JOB_ID": "88", "SLURM_ARRAY_TASK_ID": "1"}  # line 2: the spectral-norm variant
    proc = subprocess.run(["bash", str(REPO / "slurm" / "dcgan_sweep.sh"), "--data-dir", str(cifar_dir),
                           "--runs-root", str(runs_root), "--epochs", "1", "--ngf", "8", "--ndf", "8",
                           "--batch-size", "32"], capture_output=True, text=True, env=task_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json
    args = json.loads((runs_root / "slurm-88_1" / "config.json").read_text())["args"]
    assert args["d_norm"] == "spectral" and args["name"] == "dcgan-spectral"
    assert (runs_root / "slurm-88_1" / "DCGAN_model_G.pth").exists()
