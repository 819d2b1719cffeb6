"""Fault tests of the resumable-run machinery (common/), driven through the real vae_train.py: the signals and kills
in a process of its own, the runs that only continue or check a run folder in this process (conftest.run_script).

Each interrupted run is continued by re-running the same command and must end bit for bit where an uninterrupted
run with the same seed ends: same weights, same optimiser state, same metrics (all but the wall-clock column).
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_script, run_with_signal, script_env

from common.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from common.readers import list_checkpoints

# 300 tiny images / batch 32 = 9 full batches per epoch (the last 12 images of each epoch's order left out), 3 epochs:
# a few seconds per run.
STEPS_PER_EPOCH = 9


def vae_args(data_dir, run_dir, *extra):
    return ["--data-dir", data_dir, "--run-dir", run_dir, "--epochs", 3, "--batch-size", 32, "--latent-dim", 4,
            "--log-every", 1, "--device", "cpu", *extra]


def final_checkpoint(run_dir: Path) -> dict:
    paths = list_checkpoints(run_dir)
    assert paths, f"no checkpoint in {run_dir}"
    return torch.load(paths[0], map_location="cpu", weights_only=True)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Same final weights and optimiser state (torch.equal, every tensor) and same metrics but for wall time."""
    got, want = final_checkpoint(run_dir), final_checkpoint(reference_dir)
    assert got["global_step"] == want["global_step"]
    assert got["model"].keys() == want["model"].keys()
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), f"weights differ in {key}"
    for pid, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][pid][key], value), f"optimizer state {pid}/{key} differs"

    def without_time(rows):
        return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]

    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(reference_dir))
    assert without_time(got["metrics"]) == without_time(want["metrics"])
    assert (run_dir / "VAE_model.pth").exists()


@pytest.fixture(scope="module")
def reference_run(mnist_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_script("vae_train.py", *vae_args(mnist_dir, run_dir))
    return run_dir


def interrupt(mnist_dir, run_dir, target: str, n: int, *extra, in_process: bool = True) -> subprocess.CompletedProcess:
    """The run stopped by SIGTERM before the `n`-th call of `target` (exit 75). In this process unless the signal
    reaching a process of its own is what the test is about (conftest.run_with_signal)."""
    proc = run_with_signal("vae_train.py", target, n, *vae_args(mnist_dir, run_dir, *extra), in_process=in_process)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped by SIGTERM" in proc.stdout
    assert proc.stderr == "", proc.stderr  # the stop is logged on stdout; stderr is for errors (and import noise)
    return proc


# Where the signal lands is what differs; one of them is sent to a process of its own (the others reach the same
# handler in this process, at the same call).
@pytest.mark.parametrize("target, n, in_process", [
    ("torch.optim.Adam.step", STEPS_PER_EPOCH + 5, False),  # mid-epoch (epoch 2, step 5)
    ("torch.optim.Adam.step", STEPS_PER_EPOCH, True),       # on the last step of epoch 1: an epoch boundary
    ("vae_train.evaluate", 2, True),                        # while evaluating epoch 2
], ids=["mid-epoch", "epoch-boundary", "during-evaluation"])
def test_sigterm_then_resume_equals_uninterrupted_run(mnist_dir, tmp_path, reference_run, target, n, in_process):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, target, n, in_process=in_process)
    stopped_at = final_checkpoint(run_dir)
    assert 0 < stopped_at["global_step"] < 3 * STEPS_PER_EPOCH
    assert not (run_dir / "VAE_model.pth").exists()

    resumed = run_script("vae_train.py", *vae_args(mnist_dir, run_dir))  # the same command again
    assert "resuming vae run" in resumed.stdout
    assert_same_run(run_dir, reference_run)


def wait_for_first_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """Return once the running `proc` has written a checkpoint in `run_dir` (so it is past start-up, training)."""
    deadline = time.monotonic() + timeout
    while not list_checkpoints(run_dir):
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before writing a checkpoint"
        assert time.monotonic() < deadline, "the run wrote no checkpoint in time"
        time.sleep(0.02)


def test_external_sigterm_at_an_arbitrary_moment(mnist_dir, tmp_path, reference_run):
    """A signal from outside, landing wherever the loop happens to be, still loses nothing.

    The run is started with --epochs 1000, so it cannot end on its own before the signal comes; the signal is sent
    once its first checkpoint exists, i.e. wherever the loop is just after epoch 1. The resume lowers --epochs to
    the reference's 3 (epochs may change on resume) and must end exactly where the uninterrupted run ends.
    """
    run_dir, output = tmp_path / "run", tmp_path / "output.txt"
    cmd = [sys.executable, str(REPO / "vae_train.py"), *map(str, vae_args(mnist_dir, run_dir, "--epochs", 1000))]
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=script_env())
        try:
            wait_for_first_checkpoint(proc, run_dir)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == EXIT_PREEMPTED, output.read_text()[-3000:]
        finally:
            proc.kill()
            proc.wait()
    assert "stopped by SIGTERM" in output.read_text()  # the handler ran: a checkpoint, then exit 75
    stopped_at = final_checkpoint(run_dir)["global_step"]
    assert STEPS_PER_EPOCH <= stopped_at < 3 * STEPS_PER_EPOCH, f"stopped at step {stopped_at}, past the reference"

    run_script("vae_train.py", *vae_args(mnist_dir, run_dir))
    assert_same_run(run_dir, reference_run)


def test_several_resumes_keep_one_row_per_epoch(mnist_dir, tmp_path, reference_run):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 3)
    # A row written after the checkpoint (as when a process dies between the two) must not survive the resume.
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("2,1,1,1,1,1,1,1,1,1\n")
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 2)
    run_script("vae_train.py", *vae_args(mnist_dir, run_dir))
    epochs = [int(row["epoch"]) for row in read_metrics(run_dir)]
    assert epochs == [1, 2, 3]
    assert_same_run(run_dir, reference_run)


# Replaces os.replace so that the N-th checkpoint rename never happens: the process is SIGKILLed while the new
# checkpoint exists only as its temporary file.
_HANG_IN_SAVE = """
import os, sys, time
sys.path.insert(0, {repo!r})
import vae_train
from common.errors import run_main
real_replace, saves = os.replace, [0]
def replace(src, dst):
    if str(dst).endswith(".pt"):
        saves[0] += 1
        if saves[0] == {n}:
            open({marker!r}, "w").close()
            time.sleep(600)
    return real_replace(src, dst)
os.replace = replace
run_main(vae_train.main, sys.argv[1:])
"""


def test_sigkill_during_checkpoint_write_loses_nothing(mnist_dir, tmp_path, reference_run):
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    code = _HANG_IN_SAVE.format(repo=str(REPO), n=2, marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, vae_args(mnist_dir, run_dir))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached its second save"
        time.sleep(0.05)
    proc.kill()
    proc.wait()

    stray = list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert len(stray) == 1, "the killed save should have left its temporary file"
    survivors = list_checkpoints(run_dir)
    assert [p.name for p in survivors] == [f"step-{STEPS_PER_EPOCH:010d}.pt"]  # the first epoch's checkpoint
    torch.load(survivors[0], map_location="cpu", weights_only=True)

    resumed = run_script("vae_train.py", *vae_args(mnist_dir, run_dir))
    assert f"removing {stray[0]}" in resumed.stdout
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert_same_run(run_dir, reference_run)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_bad_newest_checkpoint_falls_back_to_the_one_before(mnist_dir, tmp_path, reference_run, damage):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", 2 * STEPS_PER_EPOCH + 4)
    newest, previous = list_checkpoints(run_dir)[:2]
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])

    resumed = run_script("vae_train.py", *vae_args(mnist_dir, run_dir))
    assert f"warning: checkpoint {newest} does not load" in resumed.stdout
    assert "resumed at epoch 3, step 0" in resumed.stdout  # i.e. from `previous`, the end of epoch 2
    assert previous.name == f"step-{2 * STEPS_PER_EPOCH:010d}.pt"
    # Set aside, so it can neither be tried again nor push a good checkpoint out of the kept ones.
    assert newest.with_name(newest.name + ".corrupt").exists() and newest not in list_checkpoints(run_dir)
    assert_same_run(run_dir, reference_run)


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 4)
    for path in list_checkpoints(run_dir):
        path.write_bytes(b"not a checkpoint")

    proc = run_script("vae_train.py", *vae_args(mnist_dir, run_dir), check=False)
    assert proc.returncode == EXIT_USER_ERROR
    assert "no checkpoint in" in proc.stderr and "nothing to resume from" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list_checkpoints(run_dir), "a fresh run must not have started"


def test_every_checkpoint_loads_with_weights_only(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 4, "--keep-ckpts", 5)
    paths = list_checkpoints(run_dir)
    assert len(paths) == 2  # end of epoch 1, then the pre-emption checkpoint
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "epoch", "step_in_epoch", "global_step", "metrics", "rng",
                "meter"} <= state.keys()


def test_only_the_newest_checkpoints_are_kept(reference_run):
    assert len(list_checkpoints(reference_run)) == 2  # --keep-ckpts defaults to 2 (3 epoch ends written)


def test_second_process_on_the_same_run_folder_is_refused(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "vae_train.py"), *map(str, vae_args(mnist_dir, run_dir, "--epochs", 1000))]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    try:
        wait_for_first_checkpoint(first, run_dir)  # it holds the run folder's lock and is training
        # Refused at once: a second run that waited for the lock (or trained) would hit the timeout instead. (In
        # this process: the lock is the other process's, which is what the test needs.)
        second = run_script("vae_train.py", *vae_args(mnist_dir, run_dir, "--epochs", 1000), check=False,
                            timeout=60)
        assert second.returncode == EXIT_USER_ERROR
        assert f"another process (pid {first.pid})" in second.stderr
        assert first.poll() is None, "the refused process must leave the running one alone"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == EXIT_PREEMPTED


def test_resume_with_changed_model_settings_is_refused(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 4)
    proc = run_script("vae_train.py", *vae_args(mnist_dir, run_dir, "--arch", "mlp", "--latent-dim", 8),
                      check=False)
    assert proc.returncode == EXIT_USER_ERROR
    assert "refusing to resume" in proc.stderr
    assert "arch: saved 'conv', given 'mlp'" in proc.stderr and "latent_dim: saved 4, given 8" in proc.stderr


def test_resume_latest_alone_and_raising_epochs(mnist_dir, tmp_path):
    """`--resume latest` with no other flag restores the saved settings; --epochs may grow; a finished run says so."""
    runs_root = tmp_path / "runs"
    proc = run_with_signal("vae_train.py", "torch.optim.Adam.step", 5, "--data-dir", mnist_dir, "--runs-root",
                           runs_root, "--epochs", 2, "--batch-size", 32, "--latent-dim", 4, in_process=True)
    assert proc.returncode == EXIT_PREEMPTED
    run_dir = (runs_root / "latest-vae").resolve()
    assert (runs_root / "latest").resolve() == run_dir and run_dir.parent == runs_root

    run_script("vae_train.py", "--runs-root", runs_root, "--resume", "latest")
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 2]
    assert final_checkpoint(run_dir)["model"]["encoder.0.weight"].shape[0] == 32  # conv, as saved

    again = run_script("vae_train.py", "--runs-root", runs_root, "--resume", "latest")
    assert "run already finished (2 of 2 epochs)" in again.stdout

    longer = run_script("vae_train.py", "--runs-root", runs_root, "--resume", "latest", "--epochs", 3)
    assert "resumed at epoch 3" in longer.stdout
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 2, 3]


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    runs_root = tmp_path / "runs"
    empty = tmp_path / "no-data"
    env_proxy = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # offline everywhere
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener, made anew: it reads the proxies
    proc = run_script("vae_train.py", "--data-dir", empty, "--runs-root", runs_root, env=env_proxy, check=False)
    assert proc.returncode == EXIT_USER_ERROR
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    assert str(empty / "MNIST" / "raw") in error_lines[0] and "train-images-idx3-ubyte" in error_lines[0]
    assert "Traceback" not in proc.stderr
    assert not runs_root.exists() or not any(runs_root.iterdir()), "no run folder may be left behind"


def test_mirror_keeps_a_verified_copy_and_restores_a_lost_run_folder(mnist_dir, tmp_path, reference_run):
    """Colab: the run lives on local disk, mirrored to Drive; a new VM (local folder gone) continues from Drive."""
    run_dir, mirror = tmp_path / "local" / "run", tmp_path / "drive" / "run"
    interrupt(mnist_dir, run_dir, "torch.optim.Adam.step", STEPS_PER_EPOCH + 4, "--mirror-dir", mirror)
    assert [p.name for p in list_checkpoints(mirror)] == [p.name for p in list_checkpoints(run_dir)]
    assert (mirror / "metrics.csv").read_text() == (run_dir / "metrics.csv").read_text()

    import shutil
    shutil.rmtree(run_dir.parent)  # the VM is gone
    resumed = run_script("vae_train.py", *vae_args(mnist_dir, run_dir, "--mirror-dir", mirror))
    assert f"restoring {run_dir} from {mirror}" in resumed.stdout and "resuming vae run" in resumed.stdout
    assert_same_run(run_dir, reference_run)
    assert len(list_checkpoints(mirror)) == 2  # pruned in step with the local folder
    assert (mirror / "VAE_model.pth").exists()
