"""The CUDA recipe's parts forced on the CPU (issue 28), so that the lines a first GPU run takes have run here: fused
Adam, fp16 and bf16 autocast with the GradScaler, channels-last, and a run moved between a plain CPU and that recipe
in both directions (a Colab CPU runtime continued on a T4, --init-from a CPU run); the order of a compiled DCGAN
step's calls (CUDA graphs need each step marked before G's graph runs); the one dtype D sees under autocast; the
batch split of torchrun."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from common import devices
from common.errors import EXIT_PREEMPTED, run_main, UserError
from common.run import Meter, Run
from common.runs import resolve_run
import dcgan_train
import vae_train
from conftest import hook_calls, sigterm_to_this_process
from hostile import newest_checkpoint, same_tensors, vae


def fused_adam(patch: pytest.MonkeyPatch) -> None:
    """devices.adam builds the fused Adam of CUDA on this CPU (torch runs it here)."""
    patch.setattr(devices, "adam", lambda params, device, **kwargs: torch.optim.Adam(params, fused=True, **kwargs))


def recipe(fused: bool, amp: str, channels_last: bool) -> list:
    return ["--amp", amp, *(["--channels-last"] if channels_last else [])]


# Two steps an epoch: fp16 convolutions are slow on a CPU (a second a step), and the paths are the same.
SMALL = ["--train-limit", 64, "--batch-size", 32]
STEPS = 2


def main_with(fused: bool, argv: list) -> int:
    with pytest.MonkeyPatch.context() as patch:
        if fused:
            fused_adam(patch)
        with pytest.raises(SystemExit) as stop:
            run_main(vae_train.main, [str(a) for a in argv])
    return stop.value.code


@pytest.fixture(scope="module")
def cpu_run(mnist_dir, tmp_path_factory):
    """One epoch of the VAE as a plain CPU trains it (no fused Adam, float32, contiguous)."""
    run_dir = tmp_path_factory.mktemp("cpu") / "run"
    assert main_with(False, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1, *SMALL)) == 0
    return run_dir


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_run_moves_from_the_cpu_to_the_gpu_recipe_and_back(cpu_run, mnist_dir, tmp_path, fused, amp,
                                                             channels_last):
    run_dir = tmp_path / "run"
    shutil.copytree(cpu_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    whole = fused and amp == "fp16" and channels_last  # the T4's and V100's recipe
    # fp16 convolutions take a second a step on a CPU: the other fp16 moves train the MLP VAE's own run.
    if amp == "fp16" and not whole:
        run_dir = tmp_path / "mlp"
        assert main_with(False, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1, *SMALL, "--arch", "mlp")) == 0
    assert main_with(fused, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 2, *SMALL,
                                *recipe(fused, amp, channels_last))) == 0
    moved = newest_checkpoint(run_dir)
    assert moved["epoch"] == 2 and bool(moved["optimizer"]["param_groups"][0]["fused"]) == fused  # as built here
    assert bool(moved["scaler"]) == (amp == "fp16")  # a scale is learnt (and kept) only under fp16
    if whole:  # back to the plain CPU
        assert main_with(False, vae(mnist_dir, "--run-dir", run_dir, "--epochs", 3, *SMALL, "--amp", "off")) == 0
        back = newest_checkpoint(run_dir)
        assert back["epoch"] == 3 and not back["optimizer"]["param_groups"][0]["fused"] and back["scaler"] == {}


def test_the_gpu_recipe_resumes_bit_exact(mnist_dir, tmp_path, monkeypatch):
    """Fused Adam, fp16 with its loss scaler and channels-last: a run stopped by SIGTERM mid-epoch and resumed
    ends with the same weights, optimiser, scaler, meter and metrics as one that never stopped. (The MLP VAE: fp16
    convolutions take seconds a step on a CPU; the matrix above moves the conv VAE.)"""
    flags = ["--epochs", 2, *SMALL, "--arch", "mlp", *recipe(True, "fp16", True)]
    fused_adam(monkeypatch)
    assert main_with(True, vae(mnist_dir, "--run-dir", tmp_path / "whole", *flags)) == 0
    with pytest.MonkeyPatch.context() as patch:
        hook_calls(patch, "torch.optim.Adam.step", STEPS + 1, before=sigterm_to_this_process)
        assert main_with(True, vae(mnist_dir, "--run-dir", tmp_path / "stopped", *flags)) == EXIT_PREEMPTED
    assert main_with(True, vae(mnist_dir, "--run-dir", tmp_path / "stopped", *flags)) == 0
    whole, resumed = newest_checkpoint(tmp_path / "whole"), newest_checkpoint(tmp_path / "stopped")
    for key in ("model", "optimizer", "scaler", "meter", "metrics"):
        same_tensors(resumed[key], whole[key], key)


def test_a_compiled_dcgan_step_marks_the_step_before_g_and_d_see_one_dtype(mnist_dir, tmp_path, monkeypatch):
    """--compile on CUDA replays CUDA graphs: each step must begin with cudagraph_mark_step_begin, or entering
    D-in-G's-step's graph overwrites G's saved activations (pytorch/pytorch#148439). Under autocast D sees float32
    real and fake images alike (one graph, no recompile). Compilation itself is replaced by a recorder here."""
    calls, names = [], iter(["G", "D", "D in G's step"])

    def recorded(fn, device):
        name = next(names)
        return lambda x: calls.append((name, x.dtype)) or fn(x)

    monkeypatch.setattr(devices, "compiled", recorded)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(("mark", None)))
    assert dcgan_train.main(["--data-dir", str(mnist_dir), "--dataset", "mnist", "--train-limit", "32",
                             "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--epochs", "1", "--fid", "off",
                             "--device", "cpu", "--amp", "bf16", "--compile", "--run-dir", str(tmp_path / "r")]) == 0
    order = [name for name, _ in calls]
    assert order == ["mark", "G", "D", "D", "D in G's step"] * 2  # two steps
    assert {dtype for name, dtype in calls if name.startswith("D")} == {torch.float32}


@pytest.mark.parametrize("batch_size, world", [(64, 3), (4, 4)], ids=["uneven", "one-image-shares"])
def test_a_batch_torchrun_cannot_split_is_refused_before_any_folder(mnist_dir, tmp_path, monkeypatch, batch_size,
                                                                     world):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    plan = resolve_run(vae_train.build_parser(), ["--data-dir", str(mnist_dir), "--batch-size",
                                                         str(batch_size), "--runs-root", str(tmp_path / "runs")],
                              script="vae")
    with pytest.raises(UserError, match=f"--batch-size {batch_size} .* {world} processes"):
        Run(plan, script="vae", device=torch.device("cpu"), images=torch.zeros(10, 1, 28, 28,
                        dtype=torch.uint8), meter=Meter(torch.device("cpu")))
    assert not list((tmp_path / "runs").glob("*"))  # no run folder
