"""Hostile input, part two (part one: test_hostile.py): SIGKILL at random moments (the soak), then the edges of a
second round: an SSH drop, a flipped bit, a stale Drive copy, a wrong clock, a retyped command; nothing lost.

The same tiny data and settings as part one (tests/support/hostile.py). In-process where no process of its own is
needed (common.run_main inside pytest.raises(SystemExit)); real processes only for SIGKILL, signals and a closed or
broken stdout.
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

from conftest import REPO, VAE_THAT_LEARNS, run_script, script_env
from hostile import (GAN_TINY, KILL, LINUX_PROC, VAE_STEPS, after_call, copy_run, epochs_in, flip_a_byte, in_process,
                     newest_checkpoint, on_replace, one_error_line, run_patched, same_tensors, snapshot, vae)
from tiny_data import make_image_folder, make_mnist

import common.mirror
import common.run
import common.stop_signals
from common import experiments
from common.errors import EXIT_PREEMPTED, EXIT_STOPPED_AT_STARTUP
from common.files import atomic_symlink
from common.mirror import mirror_run
from common.readers import list_checkpoints, read_metrics_csv
import dcgan_train
import vae_train


# ----------------------------------------------------------------------------------------------------------------
# The soak: SIGKILL at random moments, the same command each time, the end bit for bit an uninterrupted run's


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
    train_s = sum(row["epoch_time_s"] for row in read_metrics_csv(reference / "metrics.csv"))

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
        reached.append(newest_checkpoint(run_dir)["global_step"] if list_checkpoints(run_dir) else 0)
        if where != "export":
            assert not (run_dir / "export.json").exists(), f"the run finished before kill {i + 2}"
    # The kills landed all over the run (each start trained a little), not all in start-up or at its end.
    assert reached == sorted(reached) and len(set(reached)) >= 5 and reached[-1] == 80, reached

    final = run_script("vae_train.py", *args, "--run-dir", run_dir)  # the same command, once more
    assert "VAE_model.pth.tmp-" in final.stdout  # "removing ...": the export's temporary file, left by the last kill
    got, want = newest_checkpoint(run_dir), newest_checkpoint(reference)
    assert got["global_step"] == want["global_step"] == 80
    for key in ("model", "optimizer", "scaler", "meter", "rng", "metrics"):
        same_tensors(got[key], want[key], key)
    assert without_time(read_metrics_csv(run_dir / "metrics.csv")) == \
        without_time(read_metrics_csv(reference / "metrics.csv"))
    assert json.loads((run_dir / "export.json").read_text()) == json.loads((reference / "export.json").read_text())
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(torch.jit.load(str(run_dir / "VAE_model.pth"))(x)[0],
                       torch.jit.load(str(reference / "VAE_model.pth"))(x)[0])
    assert not list(run_dir.rglob(".*.tmp-*"))


# ================================================================================================================
# Round 2 (issue 21): an SSH drop, a flipped bit, a stale Drive copy, a wrong clock, and nothing lost


@pytest.fixture
def finished_two_epochs(mnist_dir, tmp_path, capsys) -> Path:
    """A finished 2-epoch VAE run made here: step-4 and step-8 checkpoints, milestones epoch-001 and epoch-002."""
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
    atomic_symlink("elsewhere", runs_root / "latest-vae")  # moved by hand: a retyped command keeps it there
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
    assert experiments.read_run(run_dir).status() == "finished, 2 epochs"

    # A stop during start-up of a resume (exit 76): config.json, metrics.csv and the model are as they were.
    real_load = common.run.Run._load

    def load_then_a_signal(self, *args):  # the signal comes once the checkpoint has loaded, before step 1
        real_load(self, *args)
        common.stop_signals.received = "SIGTERM"
    monkeypatch.setattr(common.run.Run, "_load", load_then_a_signal)
    code, out, _ = in_process(vae_train, ["--resume", run_dir, "--epochs", 3], capsys)
    assert code == EXIT_STOPPED_AT_STARTUP and "during start-up" in out
    after = snapshot(run_dir)
    for name in ("config.json", "metrics.csv", "export.json", "VAE_model.pth"):
        assert after[name] == before[name], name


# -- checkpoints: a checksum of their bytes, and every intact one tried before giving up


def test_a_flipped_byte_is_caught_by_the_checksum_and_the_one_before_is_used(finished_two_epochs, capsys):
    run_dir = finished_two_epochs
    newest = list_checkpoints(run_dir)[0]
    digest, name = (newest.parent / (newest.name + ".sha256")).read_text().split()
    assert name == newest.name and len(digest) == 64  # sha256sum's format: `sha256sum -c` checks it too
    flip_a_byte(newest)

    code, out, err = in_process(vae_train, ["--run-dir", run_dir, "--epochs", 3], capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "checksum" in warnings[0], out
    assert f"resumed at epoch 2, step 0/{VAE_STEPS}" in out  # from the checkpoint of the end of epoch 1
    assert (newest.parent / (newest.name + ".corrupt")).exists() and epochs_in(run_dir) == [1, 2, 3]


def test_damaged_checkpoints_fall_back_to_a_milestone_and_a_misfit_stops_untouched(finished_two_epochs, capsys):
    """Both step checkpoints and epoch-002.pt damaged (unreadable, cut short, a flipped byte): each set aside with
    one line saying why, and the run goes on from epoch-001.pt. A checkpoint that loads but does not fit the model
    is not damaged: one line naming the tensor, nothing renamed."""
    ckpts = finished_two_epochs / "checkpoints"
    second, first = ckpts / f"step-{2 * VAE_STEPS:010d}.pt", ckpts / f"step-{VAE_STEPS:010d}.pt"
    misfit = torch.load(second, weights_only=True)
    misfit["model"]["encoder.0.weight"] = torch.zeros(3, 1, 4, 4)
    for path in (second, first):
        path.unlink()  # not through the hard link: the milestones keep their own bytes
        (ckpts / (path.name + ".sha256")).unlink()  # as a file written before checksums
    torch.save(misfit, second)
    code, out, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    one_error_line(code, err, second, "model.encoder.0.weight ([3, 1, 4, 4] in the checkpoint, [32, 1, 4, 4] in the "
                   "model)", "--new-run", "--init-from")
    assert second.exists() and not list(ckpts.glob("*.corrupt"))

    second.write_bytes(b"")  # empty: does not load
    first.write_bytes(b"PK\x03\x04 cut short")  # the start of a zip, and no more
    damaged = ckpts / "epoch-002.pt"
    damaged.write_bytes(damaged.read_bytes())  # a file of its own, then a flipped byte
    flip_a_byte(damaged)
    code, out, err = in_process(vae_train, ["--run-dir", finished_two_epochs, "--epochs", 3], capsys)
    assert code == 0 and "Traceback" not in err, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 3, out
    assert str(second) in warnings[0] and "does not load" in warnings[0]
    assert str(first) in warnings[1] and "does not load" in warnings[1]
    assert str(damaged) in warnings[2] and "checksum" in warnings[2]
    assert f"resumed at epoch 2, step 0/{VAE_STEPS}" in out and epochs_in(finished_two_epochs) == [1, 2, 3]
    assert all((ckpts / f"{p.name}.corrupt").exists() for p in (second, first, damaged))


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
    newest = list_checkpoints(finished_two_epochs)[0]
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
    mirror_run(run_dir, mirror, log=lines.append)
    assert snapshot(mirror) == in_mirror and len(lines) == 1 and "not overwritten" in lines[0]

    # The other way round: the local folder is further on than a stale mirror; local wins, the mirror catches up.
    shutil.rmtree(run_dir)
    copy_run(tmp_path / "drive" / "run", run_dir)
    shutil.rmtree(mirror)
    copy_run(stale, mirror)
    code, out, err = in_process(vae_train, [*command, "--epochs", 3], capsys)
    assert code == 0 and "restoring" not in out and f"resumed at epoch 3, step 0/{VAE_STEPS}" in out, out + err
    assert epochs_in(run_dir) == epochs_in(mirror) == [1, 2, 3]
    assert [p.name for p in list_checkpoints(mirror)] == [p.name for p in list_checkpoints(run_dir)]


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

        assert [run.dir for run in experiments.find_runs(runs_root, "vae")] == [first, second]
        assert experiments.counted_run(runs_root, "vae", log=lambda _: None)[0].dir == second
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
    assert [run.dir for run in experiments.find_runs(runs_root)] == [legacy, unrecorded, current]


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
    assert [row["images_seen"] for row in read_metrics_csv(run_dir / "metrics.csv")] == [256, 256 + 576]  # full batches of 64: 4 of 300, 9 of 600
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
        assert proc.wait(timeout=120) == EXIT_PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
    log = (run_dir / "log.txt").read_text()
    assert "stopped by SIGHUP" in log and list_checkpoints(run_dir)


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
        bar.update(1, lambda: {"loss": 1.0})
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
    words = experiments.not_cifar10({"dataset": "folder"})
    assert words == "trained on an image folder, not CIFAR-10: not a valid submission"
    assert "experiments.not_cifar10" in (REPO / "report.py").read_text()  # the report says it in the same words

    zip_path = tmp_path / "CW2.zip"
    code, out, _ = in_process(check_submission, [run_dir, "--data-dir", mnist_dir, "--zip", zip_path], capsys)
    failures = [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert code == 1 and len(failures) == 1 and words in failures[0] and "--allow-non-cifar10" in failures[0], out
    assert not zip_path.exists()

    code, out, _ = in_process(check_submission, [run_dir, "--data-dir", mnist_dir, "--zip", zip_path,
                                                 "--allow-non-cifar10"], capsys)
    dry_run = tmp_path / "CW2-NOT-FOR-HANDIN-folder.zip"  # a dry run's zip is never the one to hand in
    assert code == 0 and "WARN" in out and words in out and dry_run.exists() and not zip_path.exists(), out


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
