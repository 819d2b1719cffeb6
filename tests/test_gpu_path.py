"""The GPU path, checked on a CPU: which device --device picks and why it refuses one, --amp auto's precision and
a change of --amp on resume, determinism, contiguous exports, FID maths off the device, CUDA RNG states restored
onto the GPUs there are, torchrun with too many processes, and tools/gpu_check.py (issue 19).

Where a GPU is needed, torch.cuda's functions are replaced by the test (fake_gpu): nothing here touches CUDA. The
runs are in this process (a process costs ~5 s of imports), on tiny data, with --device cpu. The one test that
needs a real CUDA GPU is marked `cuda` and skips without one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, run_script, script_env

from common import devices, gan_metrics
from common.checkpoints import rng_state, set_rng_state
from common.devices import amp_dtype, pick_device
from common.errors import EXIT_USER_ERROR, UserError
from common.readers import list_checkpoints
import dcgan_train
import vae_train

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12020). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14's default (PyPI) build
VAE = ["--arch", "mlp", "--latent-dim", "4", "--train-limit", "64", "--batch-size", "32", "--device", "cpu"]
GAN = ["--dataset", "mnist", "--ngf", "8", "--ndf", "8", "--fid", "off", "--train-limit", "64", "--batch-size", "32",
       "--device", "cpu"]


@pytest.fixture
def no_gpu_given(monkeypatch, tmp_path):
    """No GPU variables, no MPS, no nvidia-smi on the PATH and no NVIDIA kernel driver (whatever this machine has)."""
    for name in GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    monkeypatch.setattr(devices, "NVIDIA_PROC", tmp_path / "no-driver")


def fake_nvidia_smi(folder, line="Tesla V100-SXM2-16GB, 535.183.01") -> str:
    """A folder for PATH with an `nvidia-smi` that lists one GPU as --query-gpu=name,driver_version does."""
    folder.mkdir(exist_ok=True)
    program = folder / "nvidia-smi"
    program.write_text(f"#!/bin/sh\necho '{line}'\n")
    program.chmod(0o755)
    return str(folder)


def driver_too_old(monkeypatch):
    """torch.cuda as it is with pip's CUDA 13 build on a driver of the 535 series (a V100 workstation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError(TOO_OLD)))


def fake_gpu(monkeypatch, capability=(8, 0), count=1, archs=CU130_ARCHS):
    """torch.cuda as it looks with `count` GPUs of `capability` and a build with kernels for `archs`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


# -- item 2: never a silent CPU run where a GPU was meant ----------------------------------------------------------
@pytest.mark.parametrize("variable, value", [("SLURM_GPUS_ON_NODE", "1"), ("SLURM_JOB_GPUS", "0"),
                                             ("CUDA_VISIBLE_DEVICES", "0")])
def test_auto_refuses_the_cpu_when_the_job_was_given_a_gpu(monkeypatch, no_gpu_given, variable, value):
    monkeypatch.setenv(variable, value)
    driver_too_old(monkeypatch)
    with pytest.raises(UserError) as refused:
        pick_device("auto")
    message = str(refused.value)
    assert f"{variable}={value}" in message and "driver is too old for this PyTorch's CUDA 13.0 build" in message
    assert "found version 12020" in message  # PyTorch's own words
    assert "make torch TORCH_INDEX=cu126" in message and "--device cpu" in message  # the two ways out
    assert pick_device("cpu") == torch.device("cpu")  # which is what --device cpu does


def test_the_refusal_says_when_no_gpu_is_visible_or_the_build_is_cpu_only(monkeypatch, no_gpu_given):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError("Found no NVIDIA driver")))
    with pytest.raises(UserError, match="no usable GPU is visible .*Found no NVIDIA driver"):
        pick_device("auto")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match="is a CPU-only build"):
        pick_device("cuda")


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_auto_takes_the_cpu_when_no_gpu_was_given(monkeypatch, no_gpu_given, tmp_path, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    driver_too_old(monkeypatch)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin"))  # GPUs hidden on purpose: still the CPU
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # a SLURM job without GPUs on a GPU node: the CPU, as SLURM gave it
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(UserError, match="this machine has an NVIDIA GPU"):
        pick_device("auto")


def test_auto_on_a_machine_whose_gpu_torch_cannot_use_stops_in_one_line(monkeypatch, no_gpu_given, tmp_path,
                                                                        mnist_dir):
    """A V100 workstation on driver R535 with pip's CUDA 13 build, outside SLURM: exit 2, one line naming the GPU,
    the driver and the fix, no run folder; PyTorch's own warning is not printed beside it."""
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin"))
    driver_too_old(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: warnings.warn(TOO_OLD) or False)
    run_dir = tmp_path / "run"
    proc = run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 1, check=False)
    assert proc.returncode == EXIT_USER_ERROR and not run_dir.exists()
    [line] = proc.stderr.strip().splitlines()
    assert "this machine has an NVIDIA GPU (1 x Tesla V100-SXM2-16GB, driver 535.183.01)" in line
    assert "make torch TORCH_INDEX=cu126" in line and "--device cpu" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", run_dir, "--epochs", 1, "--train-limit",
                      32, "--arch", "mlp", "--device", "cpu").returncode == 0  # the CPU, on purpose


def test_the_kernel_driver_shows_a_gpu_without_nvidia_smi(monkeypatch, no_gpu_given, tmp_path):
    proc_dir = tmp_path / "proc-driver-nvidia"
    (proc_dir / "gpus" / "0000:00:04.0").mkdir(parents=True)
    (proc_dir / "gpus" / "0000:00:04.0" / "information").write_text("Model: \t\t Tesla P100-PCIE-16GB\nIRQ: 35\n")
    (proc_dir / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 "
                                      "UTC 2024\nGCC version:  gcc version 10.2.1\n")
    monkeypatch.setattr(devices, "NVIDIA_PROC", proc_dir)
    assert devices.nvidia_gpu() == "Tesla P100-PCIE-16GB, driver 470.256.02"
    driver_too_old(monkeypatch)
    with pytest.raises(UserError, match=r"NVIDIA GPU \(Tesla P100-PCIE-16GB, driver 470.256.02\)"):
        pick_device("auto")


@pytest.mark.parametrize("capability, archs, usable", [
    ((7, 0), CU130_ARCHS, False),                                   # a V100 under a CUDA 13 build
    ((6, 0), CU130_ARCHS, False),                                   # a P100
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),  # the same V100 with a cu126 build
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),                    # an L4 runs sm_86 code (same major, lower minor)
    ((8, 0), ["sm_86", "sm_90"], False),                            # ... but an A100 cannot run sm_86 code
    ((12, 1), ["sm_90", "compute_120"], True),                      # PTX, compiled on first use
])
def test_a_gpu_without_kernels_in_this_build_is_refused(monkeypatch, capability, archs, usable):
    fake_gpu(monkeypatch, capability, archs=archs)
    if usable:
        assert pick_device("auto") == torch.device("cuda")
        return
    with pytest.raises(UserError) as refused:
        pick_device("auto")
    assert f"no kernels for the GPU Fake GPU (compute capability {capability[0]}.{capability[1]}" in str(refused.value)
    assert "make torch TORCH_INDEX=cu126" in str(refused.value)


# -- item 4: the right precision, and --amp changed on resume ------------------------------------------------------
def test_amp_auto_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda")
    for capability, expected in [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)]:
        fake_gpu(monkeypatch, capability)
        assert amp_dtype("auto", cuda) is expected, capability
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("auto", torch.device("mps")) is None


def latest(run_dir) -> dict:
    return torch.load(list_checkpoints(run_dir)[0], map_location="cpu", weights_only=True)


@pytest.mark.parametrize("first, then", [("bf16", "fp16"), ("fp16", "bf16"), ("off", "fp16")])
def test_vae_resumes_with_another_amp_on_cpu(mnist_dir, tmp_path, first, then):
    """CPU autocast runs bf16 and fp16 (with a GradScaler) for real: a bf16 (or float32) checkpoint has no scaler
    state, an fp16 one has one that bf16 does not need. Either way the resume continues, and says so."""
    run_dir = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--run-dir", str(run_dir), *VAE]
    assert vae_train.main([*args, "--epochs", "1", "--amp", first]) == 0
    assert latest(run_dir)["precision"] == {"off": "fp32"}.get(first, first)
    assert vae_train.main([*args, "--epochs", "2", "--amp", then]) == 0
    ckpt = latest(run_dir)
    assert ckpt["epoch"] == 2 and ckpt["precision"] == then
    assert ("scale" in ckpt["scaler"]) == (then == "fp16")  # a scaler only where the new precision needs one
    was = {"off": "fp32"}.get(first, first)
    assert f"trained in {was}, this start trains in {then} (--amp {then})" in (run_dir / "log.txt").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["amp"] == then and config["environment"]["precision"] == then
    assert [start["precision"] for start in config["starts"]] == [was, then]


def test_dcgan_resumes_an_fp16_checkpoint_in_float32_on_cpu(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--run-dir", str(run_dir), *GAN]
    assert dcgan_train.main([*args, "--epochs", "1", "--amp", "fp16"]) == 0
    assert latest(run_dir)["scaler_g"]
    assert dcgan_train.main([*args, "--epochs", "2", "--amp", "off"]) == 0
    ckpt = latest(run_dir)
    assert (ckpt["epoch"], ckpt["precision"], ckpt["scaler_g"], ckpt["scaler_d"]) == (2, "fp32", {}, {})
    assert "trained in fp16, this start trains in fp32 (--amp off)" in (run_dir / "log.txt").read_text()


# -- items 2 and 3: what a run records, and determinism --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["on", "off"])
def test_deterministic_mode_holds_while_training_and_is_put_back(mnist_dir, tmp_path, monkeypatch, mode):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen, original = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):  # each optimiser step of the training loop
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    run_dir = tmp_path / "run"
    assert vae_train.main(["--data-dir", str(mnist_dir), "--run-dir", str(run_dir), "--epochs", "1", *VAE,
                           "--deterministic", mode]) == 0
    on = mode == "on"
    assert set(seen) == {(on, on, not on)}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") == on
    first_lines = (run_dir / "log.txt").read_text().splitlines()[:2]
    assert first_lines[1].startswith("device cpu (CPU") and f"precision fp32, deterministic {mode}" in first_lines[1]
    assert f"torch {torch.__version__}" in first_lines[1]
    environment = json.loads((run_dir / "config.json").read_text())["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"


# -- item 5: the edges -----------------------------------------------------------------------------------------------
def test_channels_last_without_ema_exports_contiguous_models(cifar_dir, tmp_path):
    """--channels-last --ema 0 exported G with channels-last weights: its output (3 channels; one channel is
    contiguous in either layout) failed a grader's .view()."""
    run_dir = tmp_path / "run"
    assert dcgan_train.main(["--data-dir", str(cifar_dir), "--run-dir", str(run_dir), "--epochs", "1", *GAN,
                             "--dataset", "cifar10", "--channels-last", "--ema", "0"]) == 0
    generator = torch.jit.load(str(run_dir / "DCGAN_model_G.pth"))
    discriminator = torch.jit.load(str(run_dir / "DCGAN_model_D.pth"))
    with torch.no_grad():
        images = generator(torch.randn(5, 100, 1, 1))
        assert images.is_contiguous() and images.view(5, -1).shape == (5, 3 * 32 * 32)
        assert discriminator(images).view(-1).shape == (5,)


class NoFloat64OnDevice(torch.Tensor):
    """Stands in for an MPS tensor (none on this machine): .double() fails as MPS's does, until moved to the CPU."""

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")

    def cpu(self):
        return self.as_subclass(torch.Tensor)


class DeviceExtractor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        features = x.float().flatten(1)[:, :8] * self.scale
        return features.as_subclass(NoFloat64OnDevice), features[:, :4].as_subclass(NoFloat64OnDevice)


def test_fid_features_leave_the_device_before_float64():
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    features, logits = gan_metrics.extract_features(DeviceExtractor(), images, batch_size=4)
    assert features.dtype == logits.dtype == torch.float64 and features.shape == (10, 8)
    assert type(features) is torch.Tensor


@pytest.mark.parametrize("saved, visible", [(2, 1), (1, 2), (2, 2)])
def test_cuda_rng_states_go_onto_the_gpus_there_are(monkeypatch, saved, visible):
    state = rng_state()  # on this CPU: no "cuda" entry; add the states of `saved` GPUs
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]
    fake_gpu(monkeypatch, count=visible)
    restored, lines = [], []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device: restored.append((device, new_state)))
    set_rng_state(state, log=lines.append)
    assert [device for device, _ in restored] == list(range(min(saved, visible)))
    assert all(torch.equal(new_state, state["cuda"][device]) for device, new_state in restored)
    assert len(lines) == (saved != visible)
    if lines:
        assert f"{saved} GPU(s), {visible} visible now" in lines[0]


def test_torchrun_with_more_processes_than_gpus_stops_every_rank(monkeypatch):
    fake_gpu(monkeypatch, count=1)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match=r"2 processes on this node but 1 GPU\(s\).*--nproc_per_node 1"):
        devices.init_distributed("auto")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as stopped:  # silently: rank 0 says why, once
        devices.init_distributed("auto")
    assert stopped.value.code == EXIT_USER_ERROR


# -- item 6: make gpu-check ------------------------------------------------------------------------------------------
def test_gpu_check_compares_checkpoints_tensor_for_tensor():
    state = {"model": {"w": torch.ones(3)}, "metrics": [{"loss": float("nan"), "epoch_time_s": 1.0}],
             "epoch_elapsed_s": 3.0, "scaler": {}}
    same = {"model": {"w": torch.ones(3)}, "metrics": [{"loss": float("nan"), "epoch_time_s": 2.0}],
            "epoch_elapsed_s": 9.0, "scaler": {}}
    assert gpu_check.differences(same, state) == []  # wall times aside, NaN equals NaN
    other = {**same, "model": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}}
    assert gpu_check.differences(other, state) == ["/model/w"]
    assert gpu_check.differences({**same, "model": {"w": torch.ones(3, dtype=torch.float64)}}, state) == ["/model/w"]


def test_gpu_check_fails_the_device_torch_cannot_use_whatever_device_is_asked(monkeypatch, no_gpu_given, tmp_path):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin"))
    driver_too_old(monkeypatch)
    for flag in ("auto", "cpu"):
        device, machine, refusal = gpu_check.describe_machine(flag)
        assert "1 x Tesla V100-SXM2-16GB, driver 535.183.01" in machine
        assert device == (None if flag == "auto" else torch.device("cpu"))
        assert "NVIDIA GPU (1 x Tesla V100-SXM2-16GB" in refusal and "make torch TORCH_INDEX=cu126" in refusal
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))  # no GPU: nothing to fail
    assert gpu_check.describe_machine("auto")[::2] == (torch.device("cpu"), None)


def test_gpu_check_times_fid_where_training_computes_it():
    assert gpu_check.check_fid_timing(torch.device("cpu"), 64).startswith("FID of 64 x 32 features on cpu")


@pytest.mark.slow  # 3-7 minutes on 2 cores: 20 tiny training runs, 3 of them compiled, 2 under torchrun
def test_gpu_check_rehearses_every_gpu_check_on_the_cpu():
    """What .ci/run runs: every check make gpu-check runs on a GPU, at tiny size, passes on the CPU."""
    env = {k: v for k, v in script_env().items() if k not in GPU_VARIABLES}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--full",
                           "--images", "64"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for check in ("vae resume", "dcgan resume", "vae resume --amp fp16 --compile --channels-last",
                  "dcgan resume --amp fp16 --compile --channels-last --fid auto",
                  "dcgan resume under torchrun --nproc_per_node 2"):
        assert f"PASS  {check}" in proc.stdout and "and resumed = uninterrupted, all" in proc.stdout
    for check in ("vae throughput", "dcgan throughput", "FID timing"):
        assert f"PASS  {check}: " in proc.stdout
    assert "summary: 9 passed, 0 failed, 0 skipped" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vae_resume_is_bit_exact_on_cuda(tmp_path, mnist_dir):
    """The promise of --deterministic on (the default), on the GPU there is: make gpu-check's resume check."""
    device = pick_device("cuda")
    assert gpu_check.check_resume("vae", tmp_path, mnist_dir, device).startswith("stopped at optimiser step 11")
