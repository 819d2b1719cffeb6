"""torchrun with 2 CPU processes (gloo): tiny VAE and DCGAN runs train, are stopped by SIGTERM, resume and finish
exactly as an uninterrupted 2-process run does."""
from __future__ import annotations

import csv
import subprocess
import sys

import torch

from conftest import REPO, _SIGNAL_WRAPPER, script_env

from common.errors import EXIT_USER_ERROR
from common.readers import list_checkpoints

import pytest

# Per script: its options (2 ranks, global batch 32: 9 full batches per epoch of the VAE's 300 images, 6 of the
# GAN's 200), its model entries in a checkpoint, and the Adam.step call on rank 1 before which the signal comes
# (mid-epoch 2: the VAE's step 14, the GAN's step 9, which steps two optimisers).
SCRIPTS = {
    "vae_train": (lambda mnist, cifar: ["--data-dir", mnist, "--latent-dim", 4], ["model"], 14),
    "dcgan_train": (lambda mnist, cifar: ["--data-dir", cifar, "--ngf", 8, "--ndf", 8, "--train-limit", 320],
                    ["generator", "discriminator", "generator_ema"], 18),
}


def torchrun(script, *args, wrapper=None) -> subprocess.CompletedProcess:
    program = [str(REPO / f"{script}.py")] if wrapper is None else [str(wrapper)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *program, *map(str, args)], capture_output=True, text=True, env=script_env(),
                          timeout=300)


@pytest.mark.slow  # about 30 s per script: three torchrun launches of two processes each
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_process_run_stops_resumes_and_matches_an_uninterrupted_one(script, mnist_dir, cifar_dir, tmp_path):
    script_options, model_keys, signal_at = SCRIPTS[script]

    def options(run_dir):
        return [*script_options(mnist_dir, cifar_dir), "--run-dir", run_dir, "--epochs", 2, "--batch-size", 32,
                "--log-every", 1, "--device", "cpu"]  # gloo on the CPU, also where there is one GPU

    reference = torchrun(script, *options(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    # SIGTERM reaches rank 1 alone, mid-epoch 2: both ranks must stop at the same step with one checkpoint.
    wrapper = tmp_path / "signal_rank1.py"
    wrapper.write_text(f"import os\nN = {signal_at} if os.environ['RANK'] == '1' else 10**9\n" +
                       _SIGNAL_WRAPPER.format(repo=str(REPO), script=script, target="torch.optim.Adam.step",
                                              n="N"))
    run_dir = tmp_path / "run"
    stopped = torchrun(script, *options(run_dir), wrapper=wrapper)
    assert stopped.returncode != 0  # torchrun reports any worker exiting non-zero (ours: 75) as a failure
    assert "stopped by a signal to another rank" in stopped.stdout
    ckpt = torch.load(list_checkpoints(run_dir)[0], weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0  # mid-epoch 2
    assert len(ckpt["per_rank"]) == 2

    # A different number of processes cannot continue it: refused, not guessed.
    single = subprocess.run([sys.executable, str(REPO / f"{script}.py"), *map(str, options(run_dir))],
                            capture_output=True, text=True, env=script_env(), timeout=120)
    assert single.returncode == EXIT_USER_ERROR
    assert "written by 2 process(es)" in single.stderr

    resumed = torchrun(script, *options(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at epoch 2" in resumed.stdout

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "reference" / "metrics.csv") as f:
        want = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one set of metrics, written once (by rank 0)
    assert len(rows) == len(want)
    for got_row, want_row in zip(rows, want):
        assert {k: v for k, v in got_row.items() if not k.endswith("_time_s")} == \
            {k: v for k, v in want_row.items() if not k.endswith("_time_s")}
    final, reference_final = (torch.load(list_checkpoints(d)[0], weights_only=True)
                              for d in (run_dir, tmp_path / "reference"))
    for model in model_keys:
        for key, value in reference_final[model].items():
            assert torch.equal(final[model][key], value), f"{model}.{key}"
    assert len(list((run_dir / "samples").glob("*epoch_*.png"))) >= 2
    assert list(run_dir.glob("*.pth"))  # the exported model(s)
