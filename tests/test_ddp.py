"""torchrun with 2 CPU processes (gloo): a tiny VAE run trains, is stopped by SIGTERM, resumes and finishes."""
from __future__ import annotations

import csv
import subprocess
import sys

import torch

from conftest import REPO, _SIGNAL_WRAPPER, script_env

import common

# 2 ranks, global batch 32 (16 per rank), 300 images: 10 steps per epoch.
def torchrun(*args, wrapper=None) -> subprocess.CompletedProcess:
    program = [str(REPO / "vae_train.py")] if wrapper is None else [str(wrapper)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *program, *map(str, args)], capture_output=True, text=True, env=script_env(),
                          timeout=300)


def test_two_process_run_stops_resumes_and_matches_an_uninterrupted_one(mnist_dir, tmp_path):
    def options(run_dir):
        return ["--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 2, "--batch-size", 32,
                "--latent-dim", 4, "--log-every", 1]

    reference = torchrun(*options(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    # SIGTERM reaches rank 1 alone, mid-epoch 2: both ranks must stop at the same step with one checkpoint.
    wrapper = tmp_path / "signal_rank1.py"
    wrapper.write_text("import os\nif os.environ['RANK'] == '1':\n    N = 14\nelse:\n    N = 10**9\n" +
                       _SIGNAL_WRAPPER.format(repo=str(REPO), script="vae_train", target="torch.optim.Adam.step",
                                              n="N"))
    run_dir = tmp_path / "run"
    stopped = torchrun(*options(run_dir), wrapper=wrapper)
    assert stopped.returncode != 0  # torchrun reports any worker exiting non-zero (ours: 75) as a failure
    assert "stopped by a signal to another rank" in stopped.stdout
    ckpt = torch.load(common.list_checkpoints(run_dir)[0], weights_only=True)
    assert ckpt["world_size"] == 2 and 10 < ckpt["global_step"] < 20 and len(ckpt["per_rank"]) == 2

    # A different number of processes cannot continue it: refused, not guessed.
    single = subprocess.run([sys.executable, str(REPO / "vae_train.py"), *map(str, options(run_dir))],
                            capture_output=True, text=True, env=script_env(), timeout=120)
    assert single.returncode == common.EXIT_USER_ERROR
    assert "written by 2 process(es)" in single.stderr

    resumed = torchrun(*options(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at epoch 2" in resumed.stdout

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "reference" / "metrics.csv") as f:
        want = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one set of metrics, written once (by rank 0)
    for got_row, want_row in zip(rows, want):
        assert {k: v for k, v in got_row.items() if not k.endswith("_time_s")} == \
            {k: v for k, v in want_row.items() if not k.endswith("_time_s")}
    final, reference_final = (torch.load(common.list_checkpoints(d)[0], weights_only=True)
                              for d in (run_dir, tmp_path / "reference"))
    for key, value in reference_final["model"].items():
        assert torch.equal(final["model"][key], value), key
    assert len(list((run_dir / "samples").glob("recon_epoch_*.png"))) == 2
    assert (run_dir / "VAE_model.pth").exists()
