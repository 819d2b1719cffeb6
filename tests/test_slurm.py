"""The SLURM scripts, end to end under a fake SLURM: job ids in the environment and a stub `scontrol` on PATH.
(tests/test_slurm_real.py runs them under a real one-node SLURM: `make test-slurm`.)"""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, script_env

from common.errors import EXIT_PREEMPTED
from common.readers import list_checkpoints

SHELL_SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck (.ci/run does)")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# The fake scontrol: `show job` answers with the restart count in FAKE_RESTARTS (SLURM raises it before the SIGTERM
# of its own requeue), every other call is recorded.
FAKE_SCONTROL = """#!/bin/sh
if [ "$1" = show ]; then echo "JobId=$4 Restarts=${FAKE_RESTARTS:-${SLURM_RESTART_COUNT:-0}}"; exit 0; fi
echo "$@" >> "%s"
"""

# A stand-in for `python SCRIPT --run-dir|--resume FOLDER options...` that starts in no time: it prints its
# arguments, and on a stop signal exits STUB_EXIT (75), after adding a newer checkpoint file if STUB_CHECKPOINT=1.
STUB_PYTHON = """#!/usr/bin/env bash
folder=$3
echo "stub args: $*"
stop() {
  if [ "${STUB_CHECKPOINT:-0}" = 1 ]; then
    mkdir -p "$folder/checkpoints"
    touch "$folder/checkpoints/step-$(printf %010d $(($(ls "$folder/checkpoints" | wc -l) + 1))).pt"
  fi
  exit "${STUB_EXIT:-75}"
}
trap stop USR1 TERM
echo started
while true; do sleep 0.1; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """An environment like a batch job's: job id set, and an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL % calls)
    (bin_dir / "scontrol").chmod(0o755)
    env = {**script_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "RUNS_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable}
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                 "SLURM_RESTART_COUNT", "RUN_DIR", "MAX_RESTARTS", "NPROC_PER_NODE", "SLURM_GPUS_ON_NODE"):
        env.pop(name, None)  # the tests may themselves run inside a SLURM job
    return env, calls, tmp_path / "runs"


@pytest.fixture
def stub_python(tmp_path):
    stub = tmp_path / "stub-python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return str(stub)


def start_job(script: str, env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "slurm" / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def vae_options(mnist_dir, runs_root, epochs):
    return ["--data-dir", mnist_dir, "--runs-root", runs_root, "--epochs", epochs, "--batch-size", 32,
            "--latent-dim", 4, "--log-every", 1, "--device", "cpu"]


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


@pytest.mark.slow  # a twin on a real cluster runs in CI: make test-slurm (tests/test_slurm_real.py)
def test_warning_signal_checkpoints_requeues_and_the_requeued_job_finishes(fake_slurm, mnist_dir):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", env, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/")
    assert job.returncode == EXIT_PREEMPTED, output
    assert "stopped by SIGUSR1" in output
    run_dir = runs_root / "slurm-4242"
    assert list_checkpoints(run_dir), "the warning signal must leave a checkpoint"
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


def continue_command(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if "to continue the run in a new job:" in line)
    return shlex.split(line.split("to continue the run in a new job:", 1)[1])


@pytest.mark.slow  # a twin on a real cluster runs in CI: make test-slurm (tests/test_slurm_real.py)
def test_scancel_checkpoints_without_requeue_and_the_printed_command_continues_the_run(fake_slurm, mnist_dir):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", env, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/", signal.SIGTERM)
    assert job.returncode == EXIT_PREEMPTED, output
    run_dir = runs_root / "slurm-4242"
    assert list_checkpoints(run_dir)
    assert not calls.exists()
    command = continue_command(output)
    assert command == ["sbatch", "slurm/vae.sh", "--resume", str(run_dir),
                       *map(str, vae_options(mnist_dir, runs_root, 200))]

    # The printed command in a new job (another id) continues that folder; here only to the end of epoch 1.
    proc = subprocess.run(["bash", command[1], *command[2:], "--epochs", "1"], capture_output=True, text=True,
                          env={**env, "SLURM_JOB_ID": "5000"}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[launch] job 5000 restart 0 run {run_dir} (checkpoint at start: step-" in proc.stdout
    assert not (runs_root / "slurm-5000").exists()
    with open(run_dir / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1]


def test_restart_cap_stops_requeueing(fake_slurm, stub_python):
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", {**env, "PYTHON": stub_python, "STUB_CHECKPOINT": "1", "SLURM_RESTART_COUNT": "3",
                               "MAX_RESTARTS": "3"})
    output = signal_after(job, "started")
    assert "restarted 3 times (MAX_RESTARTS=3); not requeueing" in output
    assert continue_command(output) == ["sbatch", "slurm/vae.sh", "--resume", str(runs_root / "slurm-4242")]
    assert job.returncode != 0 and not calls.exists()


def test_no_progress_stops_requeueing(fake_slurm, stub_python):
    """A job that is warned before it writes any new checkpoint is not requeued forever."""
    env, calls, _ = fake_slurm
    job = start_job("vae.sh", {**env, "PYTHON": stub_python})
    output = signal_after(job, "started")
    assert "no progress since this start" in output
    assert job.returncode != 0 and not calls.exists()


def test_warning_during_start_up_requeues(fake_slurm, stub_python):
    """Exit 76 (warned before the first step: nothing to save) is not a lack of progress: requeue."""
    env, calls, _ = fake_slurm
    job = start_job("vae.sh", {**env, "PYTHON": stub_python, "STUB_EXIT": "76"})
    output = signal_after(job, "started")
    assert "stopped during start-up" in output and "no progress" not in output, output
    assert job.returncode == 76 and calls.read_text().split() == ["requeue", "4242"]

    capped = start_job("vae.sh", {**env, "PYTHON": stub_python, "STUB_EXIT": "76", "SLURM_RESTART_COUNT": "20"})
    assert "restarted 20 times (MAX_RESTARTS=20)" in signal_after(capped, "started")
    assert calls.read_text().split() == ["requeue", "4242"]


def test_sigterm_of_a_requeue_by_slurm_itself_prints_no_continue_command(fake_slurm, stub_python):
    """An outside `scontrol requeue` (or pre-emption) raises the restart count before its SIGTERM arrives."""
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", {**env, "PYTHON": stub_python, "STUB_CHECKPOINT": "1", "FAKE_RESTARTS": "1"})
    output = signal_after(job, "started", signal.SIGTERM)
    assert f"SLURM is requeueing job 4242; the next start continues {runs_root / 'slurm-4242'}" in output
    assert "to continue" not in output and not calls.exists()


def test_resume_and_run_dir_name_the_folder_that_the_job_and_its_requeues_follow(fake_slurm, stub_python, tmp_path):
    env, calls, _ = fake_slurm
    old_run = tmp_path / "old run"  # a space: the printed command must quote it
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "checkpoints" / "step-0000000001.pt").touch()
    job = start_job("dcgan.sh", {**env, "PYTHON": stub_python, "STUB_CHECKPOINT": "1"}, "--resume", old_run,
                    "--epochs", "9")
    output = signal_after(job, "started")
    assert f"run {old_run} (checkpoint at start: step-0000000001.pt)" in output
    assert f"stub args: dcgan_train.py --resume {old_run} --epochs 9" in output  # no --run-dir beside it
    assert calls.read_text().split() == ["requeue", "4242"]

    by_env = subprocess.run(["bash", "slurm/vae.sh", "--epochs", "1"], capture_output=True, text=True, cwd=REPO,
                            env={**env, "PYTHON": "echo", "RUN_DIR": str(old_run)}, timeout=60)
    assert f"vae_train.py --run-dir {old_run} --epochs 1" in by_env.stdout


@pytest.mark.parametrize("options, extra_env, message", [
    (["--resume", "runs/a"], {"RUN_DIR": "runs/b"}, "name different folders"),
    (["--resume", "runs/a", "--run-dir", "runs/b"], {}, "name different folders"),
    (["--resume", "latest"], {}, "--resume latest under SLURM: name the run folder"),
])
def test_folder_options_that_cannot_work_stop_before_python(fake_slurm, options, extra_env, message):
    env, _, _ = fake_slurm
    proc = subprocess.run(["bash", "slurm/vae.sh", *options], capture_output=True, text=True, cwd=REPO,
                          env={**env, "PYTHON": "false", **extra_env}, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow  # a twin on a real cluster runs in CI: make test-slurm (tests/test_slurm_real.py)
def test_array_tasks_get_their_own_run_folders(fake_slurm, mnist_dir):
    env, _, runs_root = fake_slurm
    tasks = []  # the first two lines of slurm/betas.txt, an array of 4 tasks as its header asks; at once, as SLURM
    for task in (0, 1):  # would run them
        array_env = {**env, "SLURM_JOB_ID": str(900 + task), "SLURM_ARRAY_JOB_ID": "77",
                     "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3"}
        tasks.append(subprocess.Popen(["bash", str(REPO / "slurm" / "vae_betas.sh"), *map(str, vae_options(
            mnist_dir, runs_root, 1)), "--train-limit", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=array_env, cwd=REPO))
    for proc in tasks:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
    args = [json.loads((runs_root / f"slurm-77_{task}" / "config.json").read_text())["args"] for task in (0, 1)]
    assert [(a["beta"], a["name"], a["sweep"]) for a in args] == [(0.5, "vae-beta0.5", "vae-betas"),
                                                                  (1.0, "vae-beta1", "vae-betas")]


def sweep_lines(path) -> int:
    """What the scripts' headers count: `grep -cvE '^\\s*(#|$)' FILE`."""
    return sum(1 for line in open(path) if line.strip() and not line.strip().startswith("#"))


SWEEPS = [("vae_betas.sh", "betas.txt", "BETAS_FILE"), ("dcgan_sweep.sh", "dcgan_sweep.txt", "SWEEP_TABLE")]


@pytest.mark.parametrize("script, table, _", SWEEPS)
def test_array_range_must_fit_the_table(fake_slurm, script, table, _):
    """The header's --array range fits the table shipped; a range that does not stops every task with exit 2."""
    header = (REPO / "slurm" / script).read_text()
    lines = sweep_lines(REPO / "slurm" / table)
    assert f"#SBATCH --array=0-{lines - 1}\n" in header
    assert f"--array=0-$(($(grep -cvE '^\\s*(#|$)' slurm/{table})-1)) slurm/{script}" in header
    env, _, _ = fake_slurm
    for task_env in ({"SLURM_ARRAY_TASK_MAX": str(lines)}, {}):  # one task too many; not an array job at all
        proc = subprocess.run(["bash", f"slurm/{script}"], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env={**env, "PYTHON": "false", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "0",
                                   **task_env})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"submit with: sbatch --array=0-{lines - 1} slurm/{script}" in proc.stderr


@pytest.mark.parametrize("script, table, variable", SWEEPS)
def test_the_array_range_hint_keeps_an_overridden_table(fake_slurm, tmp_path, script, table, variable):
    """With the table named by an environment variable, the suggested command names it too (sbatch passes the
    environment on to the job), so typing it submits the table that was counted."""
    own = tmp_path / table
    own.write_text((REPO / "slurm" / table).read_text().rstrip("\n").rsplit("\n", 1)[0] + "\n")  # one line fewer
    lines = sweep_lines(own)
    env, _, _ = fake_slurm
    proc = subprocess.run(["bash", f"slurm/{script}"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**env, "PYTHON": "false", variable: str(own), "SLURM_ARRAY_JOB_ID": "77",
                               "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0",
                               "SLURM_ARRAY_TASK_MAX": str(lines)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"submit with: {variable}={own} sbatch --array=0-{lines - 1} slurm/{script}" in proc.stderr


def test_a_sweep_line_without_a_name_is_refused(fake_slurm, tmp_path):
    table = tmp_path / "table.txt"
    table.write_text("--name ok\n--d-norm spectral\n")
    env, _, _ = fake_slurm
    proc = subprocess.run(["bash", "slurm/dcgan_sweep.sh"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**env, "PYTHON": "false", "SWEEP_TABLE": str(table), "SLURM_ARRAY_JOB_ID": "77",
                               "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1"})
    assert proc.returncode == 2 and f"line 2 of {table} has no --name" in proc.stderr


@pytest.mark.slow  # two torchrun processes
def test_two_gpu_job_goes_through_torchrun_and_still_checkpoints_and_requeues(fake_slurm, mnist_dir):
    """With more than one GPU on the node the script runs torchrun (here: 2 CPU processes with gloo)."""
    env, calls, runs_root = fake_slurm
    job = start_job("vae.sh", {**env, "NPROC_PER_NODE": "2"}, *vae_options(mnist_dir, runs_root, 200))
    output = signal_after(job, "epoch 1/200 step 3/")
    assert "(2 processes)" in output and "stopped by SIGTERM" in output, output
    ckpt = torch.load(list_checkpoints(runs_root / "slurm-4242")[0], weights_only=True)
    assert ckpt["world_size"] == 2
    assert calls.read_text().split() == ["requeue", "4242"]


def test_colab_notebook_trains_into_a_mirrored_run_folder():
    """The notebook is valid nbformat 4 and its train() helper uses flags both training scripts really have
    (tests/test_notebook.py runs the notebook itself, among the slow tests)."""
    import re

    import dcgan_train
    import vae_train

    notebook = json.loads((REPO / "colab.ipynb").read_text())
    assert notebook["nbformat"] == 4
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    train_cell = next(cell for cell in cells if "def train(" in cell)
    flags = set(re.findall(r"(--[a-z][a-z-]*)", train_cell))
    known = [{option for action in script.build_parser()._actions for option in action.option_strings}
             for script in (vae_train, dcgan_train)]
    assert {"--run-dir", "--mirror-dir"} <= flags and all(flags <= options for options in known), flags


def test_sweep_array_task_takes_its_line_of_the_table(fake_slurm, cifar_dir):
    env, _, runs_root = fake_slurm
    task_env = {**env, "SLURM_ARRAY_JOB_ID": "88", "SLURM_ARRAY_TASK_ID": "1",  # line 2: the spectral-norm variant
                "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3"}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "dcgan_sweep.sh"), "--data-dir", str(cifar_dir),
                           "--runs-root", str(runs_root), "--epochs", "1", "--ngf", "8", "--ndf", "8",
                           "--batch-size", "32"], capture_output=True, text=True, env=task_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = json.loads((runs_root / "slurm-88_1" / "config.json").read_text())["args"]
    assert (args["d_norm"], args["name"], args["sweep"]) == ("spectral", "dcgan-spectral", "dcgan-sweep")
    assert (runs_root / "slurm-88_1" / "DCGAN_model_G.pth").exists()
