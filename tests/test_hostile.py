"""Hostile input: what a user (or a cluster) can do to a run by accident, and what the README promises for it.

Every case ends with exit 0, 2, 75 or 76 (README: "exit code" table), a bad command or bad data with exactly one
line on stderr that names the flag or the file (never a traceback), a new run never in an existing folder, no stale
or non-finite model exported, and never a silent fresh start over a run that exists. Part two,
test_hostile_edges.py, kills a run with SIGKILL at random moments and checks that the same command, re-run, ends
bit for bit where an uninterrupted run ends, then takes the edges of a second round.

Tiny data (300 MNIST-format images, batch 64: 4 full batches per epoch; 200 CIFAR-10-format images for the GAN), so each
run is a second or two. Runs are made in this process (conftest.run_script), faults injected by patching the
function they hit; a real process is started only for what needs one (SIGKILL, signals from outside, a read-only
mount, the exit codes of a script started by Python itself).
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, VAE_THAT_LEARNS, hook_calls, run_script, script_env
from hostile import (GAN_STEPS, GAN_TINY, KILL, LINUX_PROC, VAE_STEPS, catches, copy_run, snapshot, gan, newest_checkpoint,
                     on_replace, run_patched, vae)
from tiny_data import make_image_folder, make_mnist

from common.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED_AT_STARTUP, EXIT_USER_ERROR, run_main
from common.readers import checkpoint_candidates, list_checkpoints, read_metrics_csv
import dcgan_train
import vae_train


def the_error_line(proc, *names: str) -> str:
    """The process failed with exit 2 and exactly one line on stderr, `error: ...`, naming each of `names`."""
    assert proc.returncode == EXIT_USER_ERROR, f"exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def no_run_folder(runs_root: Path) -> bool:
    return not runs_root.exists() or not any(runs_root.iterdir())


def all_finite(state) -> bool:
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return bool(torch.isfinite(state).all())
    return True


def fail_fsync(patch: pytest.MonkeyPatch, path_part: str, at: int, code: str) -> None:
    """In this process, until `patch` is undone: the `at`-th fsync of a file whose path contains `path_part` fails
    with errno `code`, as a full (ENOSPC), read-only (EROFS) or failing (EIO) disk reports a write that did not
    reach it."""
    real_fsync, syncs = os.fsync, [0]

    def fsync(fd):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            syncs[0] += 1
            if syncs[0] == at:
                raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real_fsync(fd)

    patch.setattr(os, "fsync", fsync)


def make_nan(result):
    """A loss (or a tuple whose first item is one) turned into NaN."""
    return (result[0] * float("nan"), *result[1:]) if isinstance(result, tuple) else result * float("nan")


def assert_exported_model_is_the_newest_checkpoint(run_dir: Path) -> None:
    """export.json names the newest checkpoint's step, and VAE_model.pth computes what its weights compute."""
    ckpt = newest_checkpoint(run_dir)
    assert json.loads((run_dir / "export.json").read_text())["global_step"] == ckpt["global_step"]
    model = vae_train.VAE("conv", 4, "bernoulli")
    model.load_state_dict(ckpt["model"])
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(run_dir / "VAE_model.pth"))(x)[0], model.eval()(x)[0], atol=1e-6)


def test_the_readme_promises_the_exit_codes_checked_here():
    """README's exit-code table lists exactly the codes the scripts use (0, 2, 75, 76), which the tests below
    check case by case; anything else is a crash."""
    codes = {int(code) for code in re.findall(r"^\| (\d+) \|", (REPO / "README.md").read_text(), re.M)}
    assert codes == {EXIT_OK, EXIT_USER_ERROR, EXIT_PREEMPTED, EXIT_STOPPED_AT_STARTUP}


# ----------------------------------------------------------------------------------------------------------------
# Flags: every out-of-range value is one line naming the flag, exit 2, and no run folder (checked before anything
# is written). In-process: argparse refuses them before torch does any work, so a process per value adds only
# seconds of imports; two of them run as real processes below.

BAD_FLAGS = [
    ("vae", "--epochs", "0"), ("vae", "--epochs", "-1"), ("vae", "--batch-size", "0"), ("vae", "--batch-size", "-1"),
    ("vae", "--log-every", "0"), ("vae", "--lr", "nan"), ("vae", "--lr", "inf"), ("vae", "--lr", "0"),
    ("vae", "--train-limit", "-5"), ("vae", "--latent-dim", "0"), ("vae", "--beta", "-1"), ("vae", "--beta", "nan"),
    ("vae", "--keep-ckpts", "0"), ("vae", "--ckpt-every-min", "-1"), ("vae", "--ckpt-every-min", "0"),
    ("vae", "--kl-warmup-epochs", "-1"), ("vae", "--milestone-every", "-1"), ("vae", "--name", "../../x"),
    ("vae", "--name", ""), ("vae", "--sweep", "a/b"),
    ("dcgan", "--lr-d", "nan"), ("dcgan", "--lr-g", "-1"), ("dcgan", "--batch-size", "0"), ("dcgan", "--epochs", "0"),
    ("dcgan", "--ngf", "0"), ("dcgan", "--nz", "0"), ("dcgan", "--d-steps", "0"), ("dcgan", "--ema", "1"),
    ("dcgan", "--label-smoothing", "0"), ("dcgan", "--instance-noise", "-0.1"), ("dcgan", "--fid-every", "0"),
    ("dcgan", "--fid-samples", "1"), ("dcgan", "--name", "../x"),
]


@pytest.mark.parametrize("script, flag, value", BAD_FLAGS, ids=[f"{s}{f}={v}" for s, f, v in BAD_FLAGS])
def test_out_of_range_flag_is_one_line_naming_it(script, flag, value, tmp_path, capsys):
    module = {"vae": vae_train, "dcgan": dcgan_train}[script]
    runs_root = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        run_main(module.main, ["--data-dir", str(tmp_path / "data"), "--runs-root", str(runs_root),
                                      flag, value])
    assert stop.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written, inside --runs-root or out"


def test_bad_flags_in_a_real_process(mnist_dir, cifar_dir, tmp_path):
    """Through run_script as the other tests call it; and one script started by Python itself, whose stderr would
    also hold anything printed while torch and torchvision are imported (test_resume.interrupt checks a real
    vae_train process's stderr is empty)."""
    runs_root = tmp_path / "runs"
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--runs-root", runs_root, "--epochs", 0), check=False),
                   "--epochs")
    the_error_line(run_script("dcgan_train.py", *gan(cifar_dir, "--runs-root", runs_root, "--lr-d", "nan"),
                              check=False, in_process=False), "--lr-d")
    assert no_run_folder(runs_root)


def test_runs_root_or_run_dir_under_a_file_is_one_line(mnist_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--runs-root", a_file), check=False), "--runs-root")
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--run-dir", a_file / "run"), check=False),
                   "--run-dir")
    assert a_file.read_text() == "not a folder\n"


# ----------------------------------------------------------------------------------------------------------------
# A run folder belongs to one run


def test_a_new_run_never_lands_in_an_existing_run_folder(mnist_dir, vae_run, tmp_path):
    """Two runs with the same --name in the same second: the second gets a suffix, never the first one's folder.

    The folders the new run could be named (the same --name, any second of the next two minutes) are made
    beforehand, each holding a finished beta 1 run, so the collision happens whenever the new run starts."""
    runs_root = tmp_path / "runs"
    now = time.time()
    taken = []
    for second in range(-5, 120):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + second))
        folder = runs_root / f"{stamp}-same"
        if not folder.exists():
            shutil.copytree(vae_run, folder, copy_function=os.link, ignore=shutil.ignore_patterns(".lock"))
            taken.append(folder)
    before = {folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) for folder in taken}
    config_before = (taken[0] / "config.json").read_text()

    proc = run_script("vae_train.py", *vae(mnist_dir, "--runs-root", runs_root, "--name", "same", "--beta", 4,
                                          "--epochs", 1))
    assert "new vae run" in proc.stdout and "resumed at" not in proc.stdout
    new = sorted(set(runs_root.iterdir()) - set(taken) - {runs_root / "latest", runs_root / "latest-vae"})
    assert len(new) == 1 and re.fullmatch(r"\d{8}-\d{6}-same-\d+", new[0].name), new
    assert json.loads((new[0] / "config.json").read_text())["args"]["beta"] == 4
    for folder in taken:  # untouched: same files, same settings
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before[folder], folder
    assert (taken[0] / "config.json").read_text() == config_before


def test_a_folder_holding_another_experiment_is_not_started_fresh(mnist_dir, vae_run, tmp_path):
    run_dir = copy_run(vae_run, tmp_path / "run")
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()  # config.json of a beta 1 run, no checkpoint (killed before its first)
    args = vae(mnist_dir, "--run-dir", run_dir, "--beta", 4, "--epochs", 1)
    the_error_line(run_script("vae_train.py", *args, check=False), str(run_dir), "--restart")
    assert json.loads((run_dir / "config.json").read_text())["args"]["beta"] == 1
    assert not list_checkpoints(run_dir)

    # Replaced on purpose, the folder is the new run's: its settings, and a model exported from its training,
    # although the old run's model files (and export.json) say the same step.
    replaced = run_script("vae_train.py", *args, "--restart")
    assert "new vae run" in replaced.stdout
    assert json.loads((run_dir / "config.json").read_text())["args"]["beta"] == 4
    assert_exported_model_is_the_newest_checkpoint(run_dir)


def test_all_checkpoints_damaged_stays_an_error_until_restart(mnist_dir, vae_run, tmp_path):
    run_dir = copy_run(vae_run, tmp_path / "run")
    for path in checkpoint_candidates(run_dir):  # step checkpoints, milestones and best.pt: no fallback
        path.write_bytes(b"damaged")
    args = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)  # one more epoch: a finished run is left alone
    first = run_script("vae_train.py", *args, check=False)
    the_error_line(first, "--restart")
    second = run_script("vae_train.py", *args, check=False)  # the files are *.corrupt now: still no fresh start
    the_error_line(second, "--restart")
    assert "new vae run" not in second.stdout and not checkpoint_candidates(run_dir)

    restarted = run_script("vae_train.py", *args, "--restart")
    assert "new vae run" in restarted.stdout
    assert newest_checkpoint(run_dir)["global_step"] == 2 * VAE_STEPS
    assert_exported_model_is_the_newest_checkpoint(run_dir)  # not the model of the run that was there before


def test_a_checkpoint_of_another_script_or_experiment_is_refused_and_left_as_it_is(mnist_dir, vae_run, gan_run,
                                                                                     tmp_path):
    """Not damaged (its checksum holds), only not this run's: one line, and nothing renamed, moved or deleted."""
    run_dir = copy_run(vae_run, tmp_path / "run")
    shutil.copy(list_checkpoints(gan_run)[0], run_dir / "checkpoints" / "step-0000000099.pt")
    before = snapshot(run_dir)
    proc = run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2), check=False)
    the_error_line(proc, "step-0000000099.pt", "is a dcgan checkpoint, not a vae one")
    assert snapshot(run_dir, but=(".lock", "log.txt")) == {k: v for k, v in before.items() if k != "log.txt"}

    (run_dir / "checkpoints" / "step-0000000099.pt").unlink()
    other_experiment = torch.load(list_checkpoints(run_dir)[0], weights_only=True)
    other_experiment["experiment"]["beta"] = 4.0  # a VAE checkpoint of a run with other settings
    torch.save(other_experiment, run_dir / "checkpoints" / "step-0000000098.pt")
    proc = run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2), check=False)
    the_error_line(proc, "step-0000000098.pt", "belongs to another experiment", "beta")
    assert (run_dir / "checkpoints" / "step-0000000098.pt").exists() and not list(run_dir.rglob("*.corrupt"))


def test_damaged_config_json_is_one_line(mnist_dir, vae_run, tmp_path):
    before_first = copy_run(vae_run, tmp_path / "before-first")
    for path in (before_first / "checkpoints").iterdir():
        path.unlink()
    (before_first / "config.json").write_text('{"script": "vae", "args": {"ep')  # cut off mid-write
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--run-dir", before_first), check=False),
                   "config.json")

    resumable = copy_run(vae_run, tmp_path / "resumable")
    (resumable / "config.json").write_bytes(b"\x00\xff" * 100)  # garbage, not even UTF-8
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--run-dir", resumable, "--epochs", 2), check=False),
                   "config.json")
    assert newest_checkpoint(resumable)["global_step"] == VAE_STEPS


# ----------------------------------------------------------------------------------------------------------------
# No stale or non-finite model exported


def test_vae_with_a_huge_learning_rate_stops_before_saving(mnist_dir, tmp_path):
    runs_root = tmp_path / "runs"
    proc = run_script("vae_train.py", *vae(mnist_dir, "--runs-root", runs_root, "--lr", "1e4", "--epochs", 2),
                      check=False)
    line = the_error_line(proc, "non-finite loss", "--lr")
    assert "no checkpoint was written" in line.lower()  # and it does not claim a good one
    run_dir = (runs_root / "latest-vae").resolve()
    assert not (run_dir / "VAE_model.pth").exists() and not (run_dir / "export.json").exists()
    assert not list_checkpoints(run_dir)


def test_vae_non_finite_loss_keeps_the_good_checkpoint_and_the_way_forward_works(mnist_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # The loss of step 3 of epoch 2 becomes NaN (calls: 5 steps, epoch 1's evaluation, 3 steps): the epoch-1
    # checkpoint exists by then.
    with monkeypatch.context() as patch:
        hook_calls(patch, "vae_train.vae_terms", VAE_STEPS + 1 + 3, make_nan)
        proc = run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 3, "--keep-ckpts", 1),
                          check=False)
    line = the_error_line(proc, "non-finite loss at epoch 2, step 3", f"step-{VAE_STEPS:010d}.pt")
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step-{VAE_STEPS:010d}.pt"]
    assert all_finite(newest_checkpoint(run_dir)) and not (run_dir / "VAE_model.pth").exists()

    source, remedies = suggested_way_forward(line)
    assert Path(source) == run_dir and remedies == [["--lr", REMEDY_VALUES["--lr"]]], line
    runs_root = tmp_path / "runs"
    follow = run_script("vae_train.py", *vae(mnist_dir, "--init-from", source, *remedies[0], "--runs-root", runs_root,
                                             "--epochs", 2))
    assert f"resumed at epoch 2, step 0/{VAE_STEPS} from" in follow.stdout
    assert (runs_root / "latest-vae" / "VAE_model.pth").exists()


# A value to try for each flag the divergence message may suggest.
REMEDY_VALUES = {"--lr": "1e-4", "--lr-d": "1e-4", "--lr-g": "1e-4", "--seed": "1", "--d-norm": "spectral",
                 "--beta1": "0.0"}


def suggested_way_forward(line: str) -> tuple[str, list[list[str]]]:
    """From a divergence message: the --init-from source, and each suggested change as flags with a value to try
    (flags named together, like --lr-d/--lr-g, are one change)."""
    source = re.search(r"--init-from (\S+)", line)
    assert source, f"no --init-from command in: {line}"
    after = line[source.end():]
    remedies = [[word for flag in group.split("/") for word in (flag, REMEDY_VALUES[flag])]
                for group in re.findall(r"--[a-z0-9-]+(?:/--[a-z0-9-]+)*", after)]
    assert remedies, f"no flag to change suggested in: {line}"
    return source.group(1), remedies


def test_gan_non_finite_loss_names_a_way_forward_that_works(cifar_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # d_loss call GAN_STEPS + 3 is step 3 of epoch 2: the epoch-1 checkpoint exists by then. The NaN is found in the
    # running sums at the --log-every 3 boundary, which names the steps since the last check.
    with monkeypatch.context() as patch:
        hook_calls(patch, "dcgan_train.d_loss", GAN_STEPS + 3, make_nan)
        proc = run_script("dcgan_train.py", *gan(cifar_dir, "--run-dir", run_dir, "--epochs", 2), check=False)
    line = the_error_line(proc, "non-finite loss at epoch 2, steps 1-3", f"step-{GAN_STEPS:010d}.pt")
    source, remedies = suggested_way_forward(line)
    assert Path(source) == run_dir
    for i, remedy in enumerate(remedies):  # each suggestion, followed as the message says, is accepted
        follow = run_script("dcgan_train.py", *gan(cifar_dir, "--init-from", source, *remedy, "--runs-root",
                                                   tmp_path / f"runs-{i}", "--epochs", 2), check=False)
        assert follow.returncode == 0, f"following the advice {remedy} failed: {follow.stderr[-1500:]}"
        assert f"resumed at epoch 2, step 0/{GAN_STEPS} from" in follow.stdout


def test_gan_non_finite_loss_before_any_checkpoint_claims_none(cifar_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        hook_calls(patch, "dcgan_train.d_loss", 3, make_nan)
        proc = run_script("dcgan_train.py", *gan(cifar_dir, "--run-dir", run_dir, "--epochs", 2), check=False)
    line = the_error_line(proc, "non-finite loss at epoch 1, steps 1-3")
    assert "no checkpoint was written" in line.lower() and "good checkpoint" not in line
    assert not list_checkpoints(run_dir) and not (run_dir / "DCGAN_model_G.pth").exists()


def test_a_kill_during_the_export_is_re_exported(mnist_dir, vae_run, tmp_path):
    """--epochs raised, SIGKILL during the final export, the same command again: the model files and export.json
    end at the newest checkpoint, not at the old epoch."""
    run_dir = copy_run(vae_run, tmp_path / "run")
    assert json.loads((run_dir / "export.json").read_text())["global_step"] == VAE_STEPS
    args = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)
    killed = run_patched("vae_train.py", on_replace(r"/VAE_model\.pth$", 1, KILL), *args)
    assert killed.returncode == -signal.SIGKILL
    assert newest_checkpoint(run_dir)["global_step"] == 2 * VAE_STEPS

    again = run_script("vae_train.py", *args)
    assert "exported VAE_model.pth" in again.stdout
    record = json.loads((run_dir / "export.json").read_text())
    assert record["epoch"] == 2 and record["files"] == ["VAE_model.pth"]
    assert_exported_model_is_the_newest_checkpoint(run_dir)

    finished = run_script("vae_train.py", *args)  # README: exit 0 for "already finished" too
    assert "run already finished" in finished.stdout and "exported" not in finished.stdout


# ----------------------------------------------------------------------------------------------------------------
# Damaged data: the file is named, and called damaged


@pytest.mark.parametrize("name, damage", [
    ("train-images-idx3-ubyte", "truncate"), ("train-labels-idx1-ubyte", "magic"), ("t10k-images-idx3-ubyte", "magic"),
], ids=["truncated-train-images", "wrong-magic-labels", "wrong-magic-test-images"])
def test_damaged_mnist_file_is_named(tmp_path, name, damage):
    data = make_mnist(tmp_path / "data")
    path = data / "MNIST" / "raw" / name
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2] if damage == "truncate" else b"\x12\x34" + content[2:])
    runs_root = tmp_path / "runs"
    line = the_error_line(run_script("vae_train.py", *vae(data, "--runs-root", runs_root), check=False),
                          str(path), "damaged")
    assert "could not be downloaded" not in line
    assert no_run_folder(runs_root)


def test_damaged_image_in_a_folder_dataset_is_named(tmp_path):
    images = make_image_folder(tmp_path / "images", n=40)
    victim = sorted(images.rglob("*.png"))[7]
    victim.write_bytes(victim.read_bytes()[:60])  # a copy cut short
    runs_root = tmp_path / "runs"
    proc = run_script("dcgan_train.py", "--dataset", "folder", "--data-dir", images, *GAN_TINY, "--runs-root",
                      runs_root, check=False)
    the_error_line(proc, str(victim), "damaged")
    assert no_run_folder(runs_root)


# ----------------------------------------------------------------------------------------------------------------
# Storage faults: one line (what, where, which checkpoint is intact), exit 2, and the next start resumes


@LINUX_PROC
@pytest.mark.parametrize("path_part, at, code, what", [
    ("/checkpoints/.step-", 2, "ENOSPC", "checkpoint"),   # the end-of-epoch-2 checkpoint: the disk is full
    ("metrics.csv", 2, "EIO", "metrics.csv"),             # epoch 2 in metrics.csv (rewritten whole): an I/O error
    ("/.VAE_model.pth.tmp-", 1, "EROFS", "model"),        # the export: the file system went read-only
], ids=["disk-full-checkpoint", "io-error-metrics", "read-only-export"])
def test_storage_fault_is_one_line_and_the_next_start_resumes(mnist_dir, tmp_path, path_part, at, code, what,
                                                               monkeypatch):
    run_dir = tmp_path / "run"
    args = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)
    with monkeypatch.context() as patch:
        fail_fsync(patch, path_part, at, code)
        proc = run_script("vae_train.py", *args, check=False)
    intact = list_checkpoints(run_dir)[0]
    line = the_error_line(proc, what, str(run_dir), os.strerror(getattr(errno, code)), f"{intact} is intact")
    if code == "ENOSPC":
        assert "free some space" in line
    torch.load(intact, weights_only=True)

    resumed = run_script("vae_train.py", *args)
    assert "resumed at epoch" in resumed.stdout
    assert [int(row["epoch"]) for row in read_metrics_csv(run_dir / "metrics.csv")] == [1, 2]
    assert json.loads((run_dir / "export.json").read_text())["global_step"] == 2 * VAE_STEPS
    assert not list(run_dir.rglob(".*.tmp-*"))


def read_only_prefix(*folders: Path) -> list[str]:
    """A command prefix under which `folders` are read-only, or skip. As root, chmod changes nothing (root ignores
    permissions), so each folder is bind-mounted read-only in a private mount namespace (unshare -m) that ends with
    the process; as another user, chmod does it."""
    if os.geteuid() != 0:
        for path in [path for folder in folders for path in [folder, *folder.rglob("*")]]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        if any(os.access(folder, os.W_OK) for folder in folders):
            pytest.skip("chmod does not make folders read-only here")
        return []
    mounts = " && ".join(f'mount --bind "${i}" "${i}" && mount -o remount,bind,ro "${i}" "${i}"'
                         for i in range(len(folders)))  # $0, $1, ...: the folders; then the command
    prefix = ["unshare", "-m", "sh", "-c", f'{mounts} && shift {len(folders) - 1} && exec "$@"', *map(str, folders)]
    probe = " && ".join(f'! touch "{folder}/.probe"' for folder in folders)
    if shutil.which("unshare") is None or subprocess.run([*prefix, "sh", "-c", probe],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root, and a read-only bind mount (unshare -m) is not allowed here")
    return prefix


# Runs scripts one after the other with conftest.run_script (each in that one process, as the tests here do), and
# prints their exit codes and outputs as JSON: several runs under one read-only mount for the price of one start.
RUN_EACH = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest
runs = [conftest.run_script(script, *args, check=False) for script, args in json.loads(sys.argv[1])]
print(json.dumps([[run.returncode, run.stdout, run.stderr] for run in runs]))
"""


def run_each(prefix: list[str], *commands: tuple[str, list]) -> list[subprocess.CompletedProcess]:
    """`commands` ((script, args), ...) run by run_script in one process started under `prefix`."""
    code = RUN_EACH.format(tests=str(REPO / "tests"))
    listed = json.dumps([[script, list(map(str, args))] for script, args in commands])
    proc = subprocess.run([*prefix, sys.executable, "-c", code, listed], capture_output=True, text=True,
                          env=script_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [subprocess.CompletedProcess(script, *result)
            for (script, _), result in zip(commands, json.loads(proc.stdout.splitlines()[-1]))]


def test_read_only_folders_are_one_line(mnist_dir, vae_run, tmp_path):
    runs_root = tmp_path / "runs"
    runs_root.mkdir()
    run_dir = copy_run(vae_run, tmp_path / "run")
    new, resume = run_each(read_only_prefix(runs_root, run_dir),
                           ("vae_train.py", vae(mnist_dir, "--runs-root", runs_root)),
                           ("vae_train.py", vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)))
    the_error_line(new, "--runs-root", str(runs_root))
    the_error_line(resume, str(run_dir))


# ----------------------------------------------------------------------------------------------------------------
# Signals in the first seconds: 76 before the first step, 75 after it, never the default action's 143


@LINUX_PROC
def test_stop_signals_in_the_first_seconds(mnist_dir, tmp_path):
    """The first signal is sent the moment the script's handlers are in place (long before torch is imported):
    exit 76, nothing written. Then signals at random moments of the first seconds: 76 or 75, never 143. The four
    processes start together (each signal timed from its own process's handlers), so their imports share the cores."""
    rng = random.Random(76)
    trials = [(signal.SIGTERM, 0.0)] + [(sig, rng.uniform(0.0, 4.0))
                                        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    procs, due = [], {}  # due: trial -> when its signal is to be sent (monotonic clock), once its handlers are in
    for i, _ in enumerate(trials):
        with open(tmp_path / f"out-{i}.txt", "w") as out, open(tmp_path / f"err-{i}.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "vae_train.py"),
                                           *map(str, vae(mnist_dir, "--runs-root", tmp_path / f"runs-{i}",
                                                         "--epochs", 50))],
                                          stdout=out, stderr=err, env=script_env()))
    try:
        deadline, sent = time.monotonic() + 120, set()
        while len(sent) < len(trials):
            assert time.monotonic() < deadline, "the handlers were never installed"
            for i, ((sig, delay), proc) in enumerate(zip(trials, procs)):
                if i in sent:
                    continue
                assert proc.poll() is None, f"trial {i} ended before its signal: exit {proc.returncode}"
                if i not in due and catches(proc.pid, signal.SIGTERM):
                    due[i] = time.monotonic() + delay
                if i in due and time.monotonic() >= due[i]:
                    proc.send_signal(sig)
                    sent.add(i)
            time.sleep(0.001)
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for i, ((sig, delay), proc) in enumerate(zip(trials, procs)):
        runs_root = tmp_path / f"runs-{i}"
        out, err = (tmp_path / f"out-{i}.txt").read_text(), (tmp_path / f"err-{i}.txt").read_text()
        assert proc.returncode in (EXIT_STOPPED_AT_STARTUP, EXIT_PREEMPTED), \
            f"{sig.name} after {delay:.2f} s: exit {proc.returncode}\n{out[-1500:]}{err[-1500:]}"
        assert "Traceback" not in err
        if proc.returncode == EXIT_STOPPED_AT_STARTUP:
            assert f"stopped by {sig.name} during start-up" in out
            assert not list(runs_root.rglob("step-*.pt")), "exit 76 means no checkpoint written by this start"
        else:
            assert f"stopped by {sig.name}" in out and list(runs_root.rglob("step-*.pt"))
        if delay == 0.0:
            assert proc.returncode == EXIT_STOPPED_AT_STARTUP


# ----------------------------------------------------------------------------------------------------------------
# check_submission.py --zip (make submission)


def test_submission_zip_into_a_missing_folder(gan_run, mnist_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    vae_run = tmp_path / "vae"  # one that beats the mean image (the check fails a 1-epoch VAE on these digits)
    run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", vae_run, *VAE_THAT_LEARNS)
    for path in (vae_run / "VAE_model.pth", gan_run / "DCGAN_model_G.pth", gan_run / "DCGAN_model_D.pth"):
        shutil.copy(path, models)
    target = tmp_path / "not" / "yet" / "CW2.zip"
    proc = run_script("check_submission.py", models, "--data-dir", mnist_dir, "--zip", target, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert target.is_file()

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    proc = run_script("check_submission.py", models, "--data-dir", mnist_dir, "--zip", a_file / "CW2.zip",
                      check=False)
    the_error_line(proc, "--zip")
