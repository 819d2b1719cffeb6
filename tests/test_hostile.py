"""Hostile input: what a user (or a cluster) can do to a run by accident, and what the README promises for it.

Every case ends with exit 0, 2, 75 or 76 (README: "exit code" table), a bad command or bad data with exactly one
line on stderr that names the flag or the file (never a traceback), a new run never in an existing folder, no stale
or non-finite model exported, and never a silent fresh start over a run that exists. The last test kills a run
with SIGKILL at random moments and checks that the same command, re-run, ends bit for bit where an uninterrupted
run ends.

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
from tiny_data import make_image_folder, make_mnist

import common
import dcgan_train
import vae_train

VAE_TINY = ["--batch-size", 64, "--latent-dim", 4, "--log-every", 1, "--device", "cpu"]  # 300 images: 4 full batches
VAE_STEPS = 4
GAN_TINY = ["--ngf", 8, "--ndf", 8, "--batch-size", 32, "--log-every", 3, "--device", "cpu"]  # 200 images: 6 full batches
GAN_STEPS = 6


def vae(mnist_dir, *extra) -> list:
    return ["--data-dir", mnist_dir, *VAE_TINY, *extra]


def gan(cifar_dir, *extra) -> list:
    return ["--data-dir", cifar_dir, *GAN_TINY, *extra]


def the_error_line(proc, *names: str) -> str:
    """The process failed with exit 2 and exactly one line on stderr, `error: ...`, naming each of `names`."""
    assert proc.returncode == common.EXIT_USER_ERROR, f"exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def no_run_folder(runs_root: Path) -> bool:
    return not runs_root.exists() or not any(runs_root.iterdir())


def newest_checkpoint(run_dir: Path) -> dict:
    paths = common.list_checkpoints(run_dir)
    assert paths, f"no checkpoint in {run_dir}"
    return torch.load(paths[0], map_location="cpu", weights_only=True)


def all_finite(state) -> bool:
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return bool(torch.isfinite(state).all())
    return True


# Runs a script's main() in a fresh process after some patch code (a fault injected at an exact point): for a
# SIGKILL, which the test process must not receive itself. Other faults are patched in this process (hook_calls).
PRELUDE = "import errno, os, signal, sys, time\nsys.path.insert(0, {repo!r})\nimport torch, common, {module}\n"


def run_patched(script: str, patch: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    module = script.removesuffix(".py")
    code = PRELUDE.format(repo=str(REPO), module=module) + patch + f"common.run_main({module}.main, sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=timeout)


def after_call(owner: str, name: str, at: int, action: str) -> str:
    """Patch code: run `action` right after the `at`-th call of owner.name (`result` holds what it returned)."""
    return (f"_original_{name}, _calls_{name} = {owner}.{name}, [0]\n"
            f"def _wrapped_{name}(*args, **kwargs):\n"
            f"    _calls_{name}[0] += 1\n"
            f"    result = _original_{name}(*args, **kwargs)\n"
            f"    if _calls_{name}[0] == {at}:\n"
            f"        {action}\n"
            f"    return result\n"
            f"{owner}.{name} = _wrapped_{name}\n")


def on_replace(pattern: str, at: int, action: str) -> str:
    """Patch code: run `action` at the `at`-th atomic rename onto a file whose path matches the regular expression
    `pattern`, before the rename (the new file then exists only as its temporary)."""
    return (f"import re\n_real_replace, _renames = os.replace, [0]\n"
            f"def _replace(src, dst):\n"
            f"    if re.search({pattern!r}, str(dst)):\n"
            f"        _renames[0] += 1\n"
            f"        if _renames[0] == {at}:\n"
            f"            {action}\n"
            f"    return _real_replace(src, dst)\n"
            f"os.replace = _replace\n")


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


KILL = "os.kill(os.getpid(), signal.SIGKILL)"
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")


@pytest.fixture(scope="module")
def vae_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch VAE run (beta 1), copied by the tests that need a run folder to damage."""
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1))
    return run_dir


@pytest.fixture(scope="module")
def gan_run(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gan") / "run"
    run_script("dcgan_train.py", *gan(cifar_dir, "--run-dir", run_dir, "--epochs", 1))
    return run_dir


def assert_exported_model_is_the_newest_checkpoint(run_dir: Path) -> None:
    """export.json names the newest checkpoint's step, and VAE_model.pth computes what its weights compute."""
    ckpt = newest_checkpoint(run_dir)
    assert json.loads((run_dir / "export.json").read_text())["global_step"] == ckpt["global_step"]
    model = vae_train.VAE("conv", 4, "bernoulli")
    model.load_state_dict(ckpt["model"])
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(run_dir / "VAE_model.pth"))(x)[0], model.eval()(x)[0], atol=1e-6)


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def test_the_readme_promises_the_exit_codes_checked_here():
    """README's exit-code table lists exactly the codes the scripts use (0, 2, 75, 76), which the tests below
    check case by case; anything else is a crash."""
    codes = {int(code) for code in re.findall(r"^\| (\d+) \|", (REPO / "README.md").read_text(), re.M)}
    assert codes == {common.EXIT_OK, common.EXIT_USER_ERROR, common.EXIT_PREEMPTED, common.EXIT_STOPPED_AT_STARTUP}


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
        common.run_main(module.main, ["--data-dir", str(tmp_path / "data"), "--runs-root", str(runs_root),
                                      flag, value])
    assert stop.value.code == common.EXIT_USER_ERROR
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
    assert not common.list_checkpoints(run_dir)

    # Replaced on purpose, the folder is the new run's: its settings, and a model exported from its training,
    # although the old run's model files (and export.json) say the same step.
    replaced = run_script("vae_train.py", *args, "--restart")
    assert "new vae run" in replaced.stdout
    assert json.loads((run_dir / "config.json").read_text())["args"]["beta"] == 4
    assert_exported_model_is_the_newest_checkpoint(run_dir)


def test_all_checkpoints_damaged_stays_an_error_until_restart(mnist_dir, vae_run, tmp_path):
    run_dir = copy_run(vae_run, tmp_path / "run")
    for path in common.checkpoint_candidates(run_dir):  # step checkpoints, milestones and best.pt: no fallback
        path.write_bytes(b"damaged")
    args = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)  # one more epoch: a finished run is left alone
    first = run_script("vae_train.py", *args, check=False)
    the_error_line(first, "--restart")
    second = run_script("vae_train.py", *args, check=False)  # the files are *.corrupt now: still no fresh start
    the_error_line(second, "--restart")
    assert "new vae run" not in second.stdout and not common.checkpoint_candidates(run_dir)

    restarted = run_script("vae_train.py", *args, "--restart")
    assert "new vae run" in restarted.stdout
    assert newest_checkpoint(run_dir)["global_step"] == 2 * VAE_STEPS
    assert_exported_model_is_the_newest_checkpoint(run_dir)  # not the model of the run that was there before


def test_a_checkpoint_of_another_script_or_experiment_is_treated_as_damaged(mnist_dir, vae_run, gan_run, tmp_path):
    run_dir = copy_run(vae_run, tmp_path / "run")
    good = common.list_checkpoints(run_dir)[0]
    other_experiment = torch.load(good, weights_only=True)
    other_experiment["experiment"]["beta"] = 4.0  # a VAE checkpoint of a run with other settings
    torch.save(other_experiment, run_dir / "checkpoints" / "step-0000000098.pt")
    shutil.copy(common.list_checkpoints(gan_run)[0], run_dir / "checkpoints" / "step-0000000099.pt")

    proc = run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2))
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 2 and "step-0000000099.pt" in warnings[0] and "step-0000000098.pt" in warnings[1]
    assert "dcgan" in warnings[0] and "another experiment" in warnings[1]
    assert f"resumed at epoch 2, step 0/{VAE_STEPS}" in proc.stdout  # from the good one, the end of epoch 1
    assert (run_dir / "checkpoints" / "step-0000000099.pt.corrupt").exists()
    assert newest_checkpoint(run_dir)["global_step"] == 2 * VAE_STEPS

    # When the foreign file is the only one, there is nothing to resume: an error, not a fresh start.
    lone = copy_run(vae_run, tmp_path / "lone")
    for path in (lone / "checkpoints").iterdir():  # every checkpoint, milestone and checksum
        path.unlink()
    shutil.copy(common.list_checkpoints(gan_run)[0], lone / "checkpoints" / "step-0000000005.pt")
    the_error_line(run_script("vae_train.py", *vae(mnist_dir, "--run-dir", lone, "--epochs", 2), check=False),
                   "--restart")


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
    assert not common.list_checkpoints(run_dir)


def test_vae_non_finite_loss_keeps_the_good_checkpoint_and_the_way_forward_works(mnist_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # The loss of step 3 of epoch 2 becomes NaN (calls: 5 steps, epoch 1's evaluation, 3 steps): the epoch-1
    # checkpoint exists by then.
    with monkeypatch.context() as patch:
        hook_calls(patch, "vae_train.vae_terms", VAE_STEPS + 1 + 3, make_nan)
        proc = run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 3, "--keep-ckpts", 1),
                          check=False)
    line = the_error_line(proc, "non-finite loss at epoch 2, step 3", f"step-{VAE_STEPS:010d}.pt")
    assert [p.name for p in common.list_checkpoints(run_dir)] == [f"step-{VAE_STEPS:010d}.pt"]
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
    assert not common.list_checkpoints(run_dir) and not (run_dir / "DCGAN_model_G.pth").exists()


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
    ("/metrics.csv", 2, "EIO", "metrics.csv"),            # epoch 2's row of metrics.csv: an I/O error
    ("/.VAE_model.pth.tmp-", 1, "EROFS", "model"),        # the export: the file system went read-only
], ids=["disk-full-checkpoint", "io-error-metrics", "read-only-export"])
def test_storage_fault_is_one_line_and_the_next_start_resumes(mnist_dir, tmp_path, path_part, at, code, what,
                                                               monkeypatch):
    run_dir = tmp_path / "run"
    args = vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2)
    with monkeypatch.context() as patch:
        fail_fsync(patch, path_part, at, code)
        proc = run_script("vae_train.py", *args, check=False)
    intact = common.list_checkpoints(run_dir)[0]
    line = the_error_line(proc, what, str(run_dir), os.strerror(getattr(errno, code)), f"{intact} is intact")
    if code == "ENOSPC":
        assert "free some space" in line
    torch.load(intact, weights_only=True)

    resumed = run_script("vae_train.py", *args)
    assert "resumed at epoch" in resumed.stdout
    assert [int(row["epoch"]) for row in common.read_metrics_csv(run_dir / "metrics.csv")] == [1, 2]
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


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (signum - 1) & 1)


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
        assert proc.returncode in (common.EXIT_STOPPED_AT_STARTUP, common.EXIT_PREEMPTED), \
            f"{sig.name} after {delay:.2f} s: exit {proc.returncode}\n{out[-1500:]}{err[-1500:]}"
        assert "Traceback" not in err
        if proc.returncode == common.EXIT_STOPPED_AT_STARTUP:
            assert f"stopped by {sig.name} during start-up" in out
            assert not list(runs_root.rglob("step-*.pt")), "exit 76 means no checkpoint written by this start"
        else:
            assert f"stopped by {sig.name}" in out and list(runs_root.rglob("step-*.pt"))
        if delay == 0.0:
            assert proc.returncode == common.EXIT_STOPPED_AT_STARTUP


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


# ----------------------------------------------------------------------------------------------------------------
# The soak: SIGKILL at random moments, the same command each time, the end bit for bit an uninterrupted run's


def same_tensors(a, b, where="") -> None:
    """Every tensor of two nested checkpoint structures is torch.equal; other leaves are equal. Wall-clock
    entries (*_time_s, epoch_elapsed_s) are the only ones allowed to differ."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if not (str(key).endswith("_time_s") or key == "epoch_elapsed_s"):
                same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]


@pytest.fixture(scope="module")
def soak_mnist(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("soak-data"), n_train=640, n_test=100)


def wait_for_a_step(output: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until the process has printed a training step (it is past start-up); False if it ended first."""
    deadline = time.monotonic() + timeout
    while not re.search(r"step \d+/\d+ \|", output.read_text()):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no training step printed in time"
        time.sleep(0.01)
    return True


@pytest.mark.slow  # about 40 s: nine starts of the script
@LINUX_PROC
def test_sigkill_soak_ends_equal_to_an_uninterrupted_run(soak_mnist, tmp_path):
    # 640 images, batch 32: 20 steps per epoch, 4 epochs; a checkpoint after (nearly) every step, so kills land in
    # checkpoint writes often. The MLP keeps each checkpoint small (7 MB).
    args = ["--data-dir", soak_mnist, "--arch", "mlp", "--epochs", 4, "--batch-size", 32, "--latent-dim", 4,
            "--log-every", 1, "--ckpt-every-min", 0.0001]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run_script("vae_train.py", *args, "--run-dir", reference)
    train_s = sum(row["epoch_time_s"] for row in common.read_metrics_csv(reference / "metrics.csv"))

    # Seeded moments. Each kill after the first step of its start, so the run moves on between kills, and each uses
    # up at most a sixth of the run (outside: a random moment within 1/6 of the reference's training time; a step
    # kill: after step 3 to 8; a checkpoint-write kill: at save 2 to 4; the evaluation kill: at the epoch's end),
    # so the run cannot finish before the last kill, in the export.
    rng = random.Random(1234)
    middle = [("step", after_call("torch.optim.Adam", "step", rng.randint(3, 8), KILL)),
              ("checkpoint write", on_replace(r"/step-\d+\.pt$", rng.randint(2, 4), KILL)),
              ("evaluation", after_call("vae_train", "evaluate", 1, KILL)),
              ("step", after_call("torch.optim.Adam", "step", rng.randint(3, 8), KILL))]
    rng.shuffle(middle)
    plan = [("outside", rng.uniform(train_s / 20, train_s / 6)), *middle[:2],
            ("outside", rng.uniform(train_s / 20, train_s / 6)), *middle[2:],
            ("export", on_replace(r"/VAE_model\.pth$", 1, KILL))]
    reached = []  # the newest checkpoint's step after each kill
    for i, (where, how) in enumerate(plan):
        command = [*args, "--run-dir", run_dir]
        if where == "outside":
            output = tmp_path / f"output-{i}.txt"
            with open(output, "w") as out:
                proc = subprocess.Popen([sys.executable, str(REPO / "vae_train.py"), *map(str, command)],
                                        stdout=out, stderr=subprocess.STDOUT, env=script_env())
                if wait_for_a_step(output, proc):
                    time.sleep(how)
                    proc.kill()
                returncode = proc.wait()
        else:
            strays = set(run_dir.rglob(".*.tmp-*"))
            returncode = run_patched("vae_train.py", how, *command).returncode
            if where == "checkpoint write":
                assert set((run_dir / "checkpoints").glob(".step-*.tmp-*")) - strays, "no half-written checkpoint"
        assert returncode == -signal.SIGKILL, f"kill {i + 1} ({where}) never came: exit {returncode}"
        reached.append(newest_checkpoint(run_dir)["global_step"] if common.list_checkpoints(run_dir) else 0)
        if where != "export":
            assert not (run_dir / "export.json").exists(), f"the run finished before kill {i + 2}"
    # The kills landed all over the run (each start trained a little), not all in start-up or at its end.
    assert reached == sorted(reached) and len(set(reached)) >= 5 and reached[-1] == 80, reached

    final = run_script("vae_train.py", *args, "--run-dir", run_dir)  # the same command, once more
    assert "VAE_model.pth.tmp-" in final.stdout  # "removing ...": the export's temporary file, left by the last kill
    got, want = newest_checkpoint(run_dir), newest_checkpoint(reference)
    assert got["global_step"] == want["global_step"] == 80
    for key in ("model", "optimizer", "scaler", "epoch_sums", "rng", "metrics"):
        same_tensors(got[key], want[key], key)
    assert without_time(common.read_metrics_csv(run_dir / "metrics.csv")) == \
        without_time(common.read_metrics_csv(reference / "metrics.csv"))
    assert json.loads((run_dir / "export.json").read_text()) == json.loads((reference / "export.json").read_text())
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(torch.jit.load(str(run_dir / "VAE_model.pth"))(x)[0],
                       torch.jit.load(str(reference / "VAE_model.pth"))(x)[0])
    assert not list(run_dir.rglob(".*.tmp-*"))


# ================================================================================================================
# Round 2 (issue 21): an SSH drop, a flipped bit, a stale Drive copy, a wrong clock, and nothing lost. In-process
# where no process of its own is needed (common.run_main inside pytest.raises(SystemExit)); real processes only for
# signals and a closed or broken stdout.


def in_process(module, argv, capsys) -> tuple[int, str, str]:
    """A script's main() through common.run_main in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        common.run_main(module.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def one_error_line(code: int, err: str, *names) -> str:
    assert code == common.EXIT_USER_ERROR, f"exit {code}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def snapshot(folder: Path, but=(".lock",)) -> dict:
    """Every file of a folder (but the lock file) and its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in but}


def epochs_in(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in common.read_metrics_csv(run_dir / "metrics.csv")]


def flip_a_byte(path: Path) -> None:
    """Flip one byte in the middle of a file, in place (a bit rot, a bad sector): its size stays the same."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def finished_two_epochs(mnist_dir, tmp_path, capsys) -> Path:
    """A finished 2-epoch VAE run made here: step-5 and step-10 checkpoints, milestones epoch-001 and epoch-002."""
    run_dir = tmp_path / "two"
    code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2, "--milestone-every",
                                                1), capsys)
    assert code == 0, out + err
    return run_dir


# -- the same command again, after its run finished


def test_retyped_command_after_its_run_finished_says_so_and_trains_nothing(mnist_dir, tmp_path, capsys):
    runs_root = tmp_path / "runs"
    command = vae(mnist_dir, "--runs-root", runs_root, "--epochs", 1)
    assert in_process(vae_train, command, capsys)[0] == 0
    first = (runs_root / "latest-vae").resolve()
    common.atomic_symlink("elsewhere", runs_root / "latest-vae")  # moved by hand: a retyped command keeps it there
    before = snapshot(first)

    code, out, err = in_process(vae_train, command, capsys)
    assert code == 0, err
    assert "run already finished (1 of 1 epochs)" in out and str(first / "VAE_model.pth") in out
    assert "--new-run" in out and "new vae run" not in out and "resumed" not in out
    assert snapshot(first) == before and os.readlink(runs_root / "latest-vae") == "elsewhere"
    assert sorted(p.name for p in runs_root.iterdir()) == sorted([first.name, "latest", "latest-vae"])

    code, out, _ = in_process(vae_train, [*command, "--new-run"], capsys)  # another run, on purpose
    second = (runs_root / "latest-vae").resolve()
    assert code == 0 and "new vae run" in out and second != first and epochs_in(second) == [1]

    code, out, _ = in_process(vae_train, vae(mnist_dir, "--runs-root", runs_root, "--epochs", 2), capsys)
    assert code == 0 and f"continuing {second}" in out and f"resumed at epoch 2, step 0/{VAE_STEPS}" in out
    assert epochs_in(second) == [1, 2] and snapshot(first) == before  # the newest run of the command went on


def test_a_finished_run_whose_checkpoints_were_deleted_is_never_started_over(mnist_dir, vae_run, tmp_path, capsys):
    run_dir = copy_run(vae_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")  # to save disk
    before = snapshot(run_dir)
    for extra in ([], ["--epochs", 1]):
        code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, *extra), capsys)
        assert code == 0 and "run already finished (1 of 1 epochs)" in out, err
        assert snapshot(run_dir) == before

    # More epochs need a checkpoint to continue from: refused, and its metrics and model are kept.
    code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2), capsys)
    one_error_line(code, err, run_dir, "--restart")
    assert snapshot(run_dir) == before

    # --restart replaces it, and sets the old metrics, samples and model aside rather than emptying them.
    code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1, "--restart"), capsys)
    assert code == 0, err
    aside = next(run_dir.glob("replaced-*"))
    for name in ("metrics.csv", "export.json", "VAE_model.pth"):
        assert (aside / name).read_bytes() == before[name], name


def test_lowering_epochs_or_a_stop_at_start_up_never_changes_a_finished_run(finished_two_epochs, mnist_dir, capsys,
                                                                          monkeypatch):
    run_dir = finished_two_epochs
    before = snapshot(run_dir)
    code, out, err = in_process(vae_train, ["--resume", run_dir, "--epochs", 1], capsys)
    assert code == 0 and "run already finished (2 of 2 epochs)" in out, err
    assert snapshot(run_dir) == before
    assert json.loads((run_dir / "config.json").read_text())["args"]["epochs"] == 2
    assert common.experiments.read_run(run_dir).status() == "finished, 2 epochs"

    # A stop during start-up of a resume (exit 76): config.json, metrics.csv and the model are as they were.
    monkeypatch.setattr(vae_train.VAETraining, "on_start",
                        lambda self, run, step: setattr(common.stop_signals, "received", "SIGTERM"))
    code, out, _ = in_process(vae_train, ["--resume", run_dir, "--epochs", 3], capsys)
    assert code == common.EXIT_STOPPED_AT_STARTUP and "during start-up" in out
    after = snapshot(run_dir)
    for name in ("config.json", "metrics.csv", "export.json", "VAE_model.pth"):
        assert after[name] == before[name], name


# -- checkpoints: a checksum of their bytes, and every intact one tried before giving up


def test_a_flipped_byte_is_caught_by_the_checksum_and_the_one_before_is_used(finished_two_epochs, capsys):
    run_dir = finished_two_epochs
    newest = common.list_checkpoints(run_dir)[0]
    digest, name = (newest.parent / (newest.name + ".sha256")).read_text().split()
    assert name == newest.name and len(digest) == 64  # sha256sum's format: `sha256sum -c` checks it too
    flip_a_byte(newest)

    code, out, err = in_process(vae_train, ["--run-dir", run_dir, "--epochs", 3], capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "checksum" in warnings[0], out
    assert f"resumed at epoch 2, step 0/{VAE_STEPS}" in out  # from step-5, the end of epoch 1
    assert (newest.parent / (newest.name + ".corrupt")).exists() and epochs_in(run_dir) == [1, 2, 3]


def test_misfitting_incomplete_and_damaged_checkpoints_fall_back_to_a_milestone(finished_two_epochs, capsys):
    """step-10 from another model shape, step-5 from a version without 'rng', epoch-002.pt damaged: each set aside
    with one line saying why, and the run goes on from checkpoints/epoch-001.pt."""
    ckpts = finished_two_epochs / "checkpoints"
    step10, step5 = ckpts / f"step-{2 * VAE_STEPS:010d}.pt", ckpts / f"step-{VAE_STEPS:010d}.pt"
    misfit, incomplete = torch.load(step10, weights_only=True), torch.load(step5, weights_only=True)
    misfit["model"]["encoder.0.weight"] = torch.zeros(3, 1, 4, 4)
    del incomplete["rng"]
    for path, state in ((step10, misfit), (step5, incomplete)):
        path.unlink()  # not through the hard link: the milestones keep their own bytes
        (ckpts / (path.name + ".sha256")).unlink()  # as a file written before checksums
        torch.save(state, path)
    damaged = ckpts / "epoch-002.pt"
    damaged.write_bytes(damaged.read_bytes())  # a file of its own, then a flipped byte
    flip_a_byte(damaged)

    code, out, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 3, out
    assert str(step10) in warnings[0] and "does not fit this model" in warnings[0] and "size mismatch" in warnings[0]
    assert str(step5) in warnings[1] and "lacks rng" in warnings[1]
    assert str(damaged) in warnings[2] and "checksum" in warnings[2]
    assert f"resumed at epoch 2, step 0/{VAE_STEPS}" in out and epochs_in(finished_two_epochs) == [1, 2, 3]
    assert all((ckpts / f"{p.name}.corrupt").exists() for p in (step10, step5, damaged))


def test_checkpoints_from_before_checksums_still_load(finished_two_epochs, capsys):
    for sidecar in (finished_two_epochs / "checkpoints").glob("*.sha256"):
        sidecar.unlink()
    code, out, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    assert code == 0 and "warning" not in out and f"resumed at epoch 3, step 0/{VAE_STEPS}" in out, out + err
    assert (finished_two_epochs / "checkpoints" / f"step-{3 * VAE_STEPS:010d}.pt.sha256").exists()


def test_the_divergence_message_calls_only_a_verified_checkpoint_good(finished_two_epochs, capsys, monkeypatch):
    """A NaN after a resume from a checkpoint without checksum: that file is named, but not as a good one."""
    real_terms, calls = vae_train.vae_terms, [0]

    def nan_terms(*args, **kwargs):  # the loss of the second step after the resume is NaN
        recon, kl = real_terms(*args, **kwargs)
        calls[0] += 1
        return (recon * float("nan"), kl) if calls[0] == 2 else (recon, kl)

    monkeypatch.setattr(vae_train, "vae_terms", nan_terms)
    newest = common.list_checkpoints(finished_two_epochs)[0]
    (newest.parent / (newest.name + ".sha256")).unlink()
    code, _, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    line = one_error_line(code, err, "non-finite loss at epoch 3, step 2", newest, "unverified")
    assert "good checkpoint" not in line

    (newest.parent / (newest.name + ".sha256")).write_text("0" * 64 + f"  {newest.name}\n")  # now it is damaged
    calls[0] = 0
    code, out, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    line = one_error_line(code, err, "newest good checkpoint", f"step-{VAE_STEPS:010d}.pt")
    assert str(newest) not in line and "checksum" in out


def test_analyze_gan_on_a_damaged_or_misfitting_milestone_is_one_line(gan_run, tmp_path, capsys):
    import analyze_gan
    damaged = copy_run(gan_run, tmp_path / "damaged")
    flip_a_byte(damaged / "checkpoints" / "epoch-001.pt")
    code, _, err = in_process(analyze_gan, [damaged, "--export-epoch", 1], capsys)
    one_error_line(code, err, "epoch-001.pt", "checksum")

    misfit = copy_run(gan_run, tmp_path / "misfit")
    path = misfit / "checkpoints" / "epoch-001.pt"
    state = torch.load(path, weights_only=True)
    state["generator"] = state["generator_ema"] = {"main.0.weight": torch.zeros(1, 2, 3, 4)}
    (path.parent / "epoch-001.pt.sha256").unlink()
    torch.save(state, path)
    code, _, err = in_process(analyze_gan, [misfit, "--export-epoch", 1], capsys)
    one_error_line(code, err, "epoch-001.pt", "does not fit")

    class Measure:  # milestone_quality leaves the bad milestone out, with one line, and goes on
        name = "a number"

        def __call__(self, generator):
            return {"value": 1.0}

    lines = []
    assert analyze_gan.milestone_quality(misfit, Measure(), lines.append) == []
    assert len(lines) == 1 and "epoch 1 left out" in lines[0] and "does not fit" in lines[0]


def test_milestones_are_copied_where_hard_links_fail(mnist_dir, tmp_path, capsys, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # Google Drive's FUSE mount, some NFS

    monkeypatch.setattr(os, "link", no_links)
    run_dir = tmp_path / "run"
    code, out, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2, "--milestone-every",
                                                1), capsys)
    assert code == 0, out + err
    ckpts = run_dir / "checkpoints"
    for epoch, step in ((1, VAE_STEPS), (2, 2 * VAE_STEPS)):
        milestone = ckpts / f"epoch-{epoch:03d}.pt"
        assert milestone.stat().st_nlink == 1
        assert milestone.read_bytes() == (ckpts / f"step-{step:010d}.pt").read_bytes()
        assert (ckpts / f"epoch-{epoch:03d}.pt.sha256").exists()


# -- the mirror (--mirror-dir, Google Drive on Colab)


def test_a_mirror_inside_or_around_the_run_folder_or_unwritable_is_refused_at_start(mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "run"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for mirror in (run_dir / "drive", run_dir, tmp_path / "runs", a_file / "drive"):
        code, _, err = in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--mirror-dir", mirror), capsys)
        one_error_line(code, err, "--mirror-dir", mirror)
        assert not run_dir.exists(), "refused before anything is written"


def test_the_newer_of_mirror_and_local_wins_and_nothing_newer_is_overwritten(mnist_dir, tmp_path, capsys):
    run_dir, mirror = tmp_path / "local" / "run", tmp_path / "drive" / "run"
    command = vae(mnist_dir, "--run-dir", run_dir, "--mirror-dir", mirror)
    assert in_process(vae_train, [*command, "--epochs", 1], capsys)[0] == 0
    stale = copy_run(run_dir, tmp_path / "stale")  # the local copy after epoch 1
    assert in_process(vae_train, [*command, "--epochs", 2], capsys)[0] == 0  # the mirror holds epoch 2

    # A VM whose local folder is the older copy: the mirror is taken back, and the run is finished.
    shutil.rmtree(run_dir)
    copy_run(stale, run_dir)
    in_mirror = snapshot(mirror)
    code, out, err = in_process(vae_train, [*command, "--epochs", 2], capsys)
    assert code == 0 and f"restoring {run_dir} from {mirror}" in out, out + err
    assert "run already finished (2 of 2 epochs)" in out
    assert snapshot(mirror) == in_mirror and common.mirror.newest_step(run_dir) == 2 * VAE_STEPS

    # A sync never overwrites a mirror that is further on (a second machine trained it on).
    shutil.rmtree(run_dir)
    copy_run(stale, run_dir)
    lines = []
    common.mirror_run(run_dir, mirror, log=lines.append)
    assert snapshot(mirror) == in_mirror and len(lines) == 1 and "not overwritten" in lines[0]

    # The other way round: the local folder is further on than a stale mirror; local wins, the mirror catches up.
    shutil.rmtree(run_dir)
    copy_run(tmp_path / "drive" / "run", run_dir)
    shutil.rmtree(mirror)
    copy_run(stale, mirror)
    code, out, err = in_process(vae_train, [*command, "--epochs", 3], capsys)
    assert code == 0 and "restoring" not in out and f"resumed at epoch 3, step 0/{VAE_STEPS}" in out, out + err
    assert epochs_in(run_dir) == epochs_in(mirror) == [1, 2, 3]
    assert [p.name for p in common.list_checkpoints(mirror)] == [p.name for p in common.list_checkpoints(run_dir)]


# -- "newest" in real time


def in_time_zone(monkeypatch, zone: str) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()


def test_newest_means_newest_in_real_time_whatever_the_time_zone(mnist_dir, tmp_path, capsys, monkeypatch):
    """A run under UTC+9, then one under UTC-5 (local clocks 14 hours apart, the later one behind): the later run is
    the newest for the retyped command, experiments.py, report.py and check_submission.py (counted_run)."""
    import datetime

    import check_submission
    runs_root = tmp_path / "runs"
    command = vae(mnist_dir, "--runs-root", runs_root, "--epochs", 1)
    try:
        in_time_zone(monkeypatch, "Asia/Tokyo")
        assert in_process(vae_train, command, capsys)[0] == 0
        first = (runs_root / "latest-vae").resolve()
        in_time_zone(monkeypatch, "America/New_York")
        assert in_process(vae_train, [*command, "--new-run"], capsys)[0] == 0
        second = (runs_root / "latest-vae").resolve()
        utc_now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        stamp = datetime.datetime.strptime(second.name[:15], "%Y%m%d-%H%M%S")
        assert abs((utc_now - stamp).total_seconds()) < 600, f"{second.name} is not named in UTC"

        assert [run.dir for run in common.experiments.find_runs(runs_root, "vae")] == [first, second]
        assert common.experiments.counted_run(runs_root, "vae", log=lambda _: None)[0].dir == second
        args = check_submission.build_parser().parse_args(["--runs-root", str(runs_root), "--gen", "g", "--disc", "d"])
        assert check_submission.model_paths(args)[0] == second / "VAE_model.pth"
        code, out, _ = in_process(vae_train, command, capsys)
        assert code == 0 and f"run already finished (1 of 1 epochs): {second}" in out
    finally:
        monkeypatch.undo()
        time.tzset()


def test_runs_named_in_local_time_by_older_versions_still_order_sensibly(vae_run, tmp_path):
    runs_root = tmp_path / "runs"
    legacy = copy_run(vae_run, runs_root / "20200101-120000-vae")
    config = json.loads((legacy / "config.json").read_text())
    config["starts"][0]["time"] = "2020-01-01T12:00:00"  # local time, no offset: as older versions wrote it
    (legacy / "config.json").write_text(json.dumps(config))
    unrecorded = copy_run(vae_run, runs_root / "20210101-120000-vae")
    config["starts"] = []  # nothing recorded: the folder name's stamp decides
    (unrecorded / "config.json").write_text(json.dumps(config))
    current = copy_run(vae_run, runs_root / "current")  # started in this session, recorded in UTC
    assert [run.dir for run in common.experiments.find_runs(runs_root)] == [legacy, unrecorded, current]


# -- the training data a checkpoint was trained on


def test_resume_on_other_data_is_refused_unless_allowed(mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert in_process(vae_train, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1), capsys)[0] == 0
    assert newest_checkpoint(run_dir)["data"]["images"] == 300

    edited = tmp_path / "edited"  # the same 300 images but one, changed
    shutil.copytree(mnist_dir, edited)
    images = edited / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[16 + 150 * 784:16 + 151 * 784] = bytes(784)
    images.write_bytes(bytes(data))
    bigger = make_mnist(tmp_path / "bigger", n_train=600)
    before = snapshot(run_dir, but=(".lock", "log.txt"))  # a refused start is logged, nothing else changes
    for other, count in ((edited, "300 images"), (bigger, "600 images")):
        code, _, err = in_process(vae_train, ["--run-dir", run_dir, "--epochs", 2, "--data-dir", other], capsys)
        one_error_line(code, err, "other training data", "300 images", count, mnist_dir, other, "--allow-other-data")
        assert snapshot(run_dir, but=(".lock", "log.txt")) == before

    code, out, err = in_process(vae_train, ["--run-dir", run_dir, "--epochs", 2, "--data-dir", bigger,
                                            "--allow-other-data"], capsys)
    assert code == 0 and "resumed at epoch 2" in out, err
    assert [row["images_seen"] for row in common.read_metrics_csv(run_dir / "metrics.csv")] == [256, 256 + 576]  # full batches of 64: 4 of 300, 9 of 600
    assert newest_checkpoint(run_dir)["data"]["images"] == 600
    assert json.loads((run_dir / "config.json").read_text())["args"]["allow_other_data"] is True
    # --allow-other-data is for one start: back on the first data, the next resume is refused again.
    code, _, err = in_process(vae_train, ["--run-dir", run_dir, "--epochs", 3, "--data-dir", mnist_dir], capsys)
    one_error_line(code, err, "other training data", "600 images", "300 images")


# -- signals and a stdout nobody reads


def default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # whatever the test runner ignores (nohup), the child does not


@LINUX_PROC
def test_sighup_with_the_terminal_gone_checkpoints_and_exits_75(mnist_dir, tmp_path):
    """An SSH session drops: the terminal goes (every write to stdout fails) and SIGHUP arrives."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "vae_train.py"),
                             *map(str, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1000))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(),
                            preexec_fn=default_sighup)
    try:
        for line in proc.stdout:
            if re.search(r"step \d+/\d+ \|", line):
                break
        proc.stdout.close()  # nobody reads stdout any more: the next print meets a broken pipe
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=120) == common.EXIT_PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
    log = (run_dir / "log.txt").read_text()
    assert "stopped by SIGHUP" in log and common.list_checkpoints(run_dir)


def test_nohup_keeps_sighup_ignored():
    from common import stop_signals
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does before it starts the script
    try:
        stop_signals.restore()
        stop_signals.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is stop_signals._handler
    finally:
        stop_signals.restore()
        signal.signal(signal.SIGHUP, previous)
        stop_signals.install()  # as the training scripts' first line left it for this test process


def test_a_closed_stdout_never_stops_training(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "vae_train.py"),
                           *map(str, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1))],
                          stderr=subprocess.PIPE, text=True, env=script_env(), timeout=300,
                          preexec_fn=lambda: os.close(1))  # python vae_train.py ... >&-
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "exported VAE_model.pth" in (run_dir / "log.txt").read_text()


def test_a_broken_stdout_is_only_a_lost_print(monkeypatch, tmp_path):
    """In this process: RunFolder.log and the progress line survive a stdout that raises (a pipe into head)."""
    from common import console, progress

    class BrokenPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def isatty(self):
            raise ValueError("I/O operation on closed file")

    for stdout in (BrokenPipe(), None):
        monkeypatch.setattr(sys, "stdout", stdout)
        console.say("a line nobody reads")
        assert not console.on_terminal()
        bar = progress.Progress(steps_per_epoch=2, total_steps=2, start_step=0, batch_size=1, log_every=1,
                                log=console.say)
        bar.start_epoch(0, 1)
        bar.update(1, {"loss": torch.tensor(1.0)})
        assert not bar.on_terminal


# -- check_submission.py: the GAN trained on CIFAR-10


def test_check_submission_refuses_a_gan_not_trained_on_cifar10(vae_run, mnist_dir, tmp_path, capsys):
    import check_submission
    images = make_image_folder(tmp_path / "images", n=40)
    run_dir = tmp_path / "folder-gan"
    code, out, err = in_process(dcgan_train, ["--dataset", "folder", "--data-dir", images, *GAN_TINY, "--run-dir",
                                              run_dir, "--epochs", 1, "--fid", "off"], capsys)
    assert code == 0, out + err
    learned = tmp_path / "vae"  # one that beats the mean image (the check fails a 1-epoch VAE on these digits)
    assert in_process(vae_train, ["--data-dir", mnist_dir, "--run-dir", learned, *VAE_THAT_LEARNS], capsys)[0] == 0
    shutil.copy(learned / "VAE_model.pth", run_dir)
    words = common.experiments.not_cifar10({"dataset": "folder"})
    assert words == "trained on an image folder, not CIFAR-10: not a valid submission"
    assert "experiments.not_cifar10" in (REPO / "report.py").read_text()  # the report says it in the same words

    zip_path = tmp_path / "CW2.zip"
    code, out, _ = in_process(check_submission, [run_dir, "--data-dir", mnist_dir, "--zip", zip_path], capsys)
    failures = [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert code == 1 and len(failures) == 1 and words in failures[0] and "--allow-non-cifar10" in failures[0], out
    assert not zip_path.exists()

    code, out, _ = in_process(check_submission, [run_dir, "--data-dir", mnist_dir, "--zip", zip_path,
                                                 "--allow-non-cifar10"], capsys)
    assert code == 0 and "WARN" in out and words in out and zip_path.exists(), out


# -- names


@pytest.mark.parametrize("flag, value", [("--name", "two\nlines"), ("--name", "tab\there"), ("--name", "bell\a"),
                                         ("--name", "line\u2028separator"), ("--sweep", "sweep\nname"),
                                         ("--sweep", "esc\x1b[31m")],
                         ids=["newline", "tab", "bell", "line-separator", "sweep-newline", "sweep-escape"])
def test_a_name_with_control_characters_is_refused(flag, value, tmp_path, capsys):
    runs_root = tmp_path / "runs"
    code, _, err = in_process(vae_train, ["--data-dir", tmp_path / "data", "--runs-root", runs_root, flag, value],
                              capsys)
    one_error_line(code, err, flag, "control characters")
    assert not runs_root.exists()
