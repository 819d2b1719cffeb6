"""Is this machine ready for a long run? `make gpu-check`: the doctor to run first on a new GPU, cluster or install.

    python tools/gpu_check.py                # the GPU PyTorch finds (only the CPU checks when there is none)
    python tools/gpu_check.py --device cpu   # the CPU checks, whatever the machine has
    python tools/gpu_check.py --device cpu --full --images 64   # every GPU check too, on the CPU at tiny size (CI)

One PASS, FAIL or SKIP line per check, then a summary; exit 1 when a check FAILs, else 0 (also without a GPU).
  1. the device: its name, driver, CUDA build, compute capability, and whether this PyTorch has kernels for it (a
     GPU that PyTorch cannot use FAILs, saying why, whatever --device);
  2. bit-exact resume: a tiny VAE and a tiny DCGAN run at the default flags, stopped by SIGTERM (sent as an
     optimiser step begins) in their second epoch and resumed, equal an uninterrupted run tensor for tensor;
  3. GPU: the same with --amp fp16 --compile --channels-last (the DCGAN with its FID every epoch), and a DCGAN
     under torchrun on every visible GPU (on the CPU: 2 gloo processes);
  4. GPU: throughput of the scripts against a bare loop (tools/bench.py), and what --deterministic on costs;
  5. GPU: FID timing on the device (the Frechet distance; Inception features when the weights are in torch's cache).
About 5 minutes on a T4; under a minute on a CPU, where only 1 and 2 run unless --full. docs/operations.md says more.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python tools/X.py` puts tools/ on the path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import devices, fid, gan_metrics
from common.errors import EXIT_PREEMPTED, UserError
from common.flags import REPO_ROOT, ArgumentParser
from common.readers import list_checkpoints
from tools import bench  # beside this file: the bare loops, the timings, the stand-in data sets
from tools.bench import tiny_data  # the tests' tiny data sets (tests/support/tiny_data.py), as bench.py loads them

# Tiny runs: 256 images in global batches of 32 are 8 steps an epoch; two epochs, stopped in step 11 (epoch 2). The
# stop comes as optimiser step STOP_AT[name] begins: the VAE steps one optimiser per training step, the DCGAN two.
TRAIN_IMAGES, EPOCHS, STOP_AT = 256, 2, {"vae": 11, "dcgan": 21}
RUNS = {
    "vae": ("vae_train.py", ["--latent-dim", "8"]),
    "dcgan": ("dcgan_train.py", ["--dataset", "mnist", "--ngf", "16", "--ndf", "16", "--fid", "off"]),
}
# The GPU speed flags in one resumed run; the DCGAN's quality evaluation every epoch too (the classifier FID on
# MNIST: no download), so that an evaluation falls between the stop and the end.
SPEED_FLAGS = ["--amp", "fp16", "--compile", "--channels-last"]
FID_ON = ["--fid", "auto", "--fid-every", "1", "--fid-samples", "64"]
# A training script run after a patch that sends its process (the last rank under torchrun) a real SIGTERM as its
# N-th optimiser step begins: Adam.step, or GradScaler.step where the loop steps through a loss scaler (which
# skips Adam.step on an fp16 overflow, so that the count would move).
STOPPER = """
import importlib, os, signal, sys
import torch
sys.path.insert(0, {repo!r})
from common.errors import run_main
script = importlib.import_module({module!r})
calls, inside_scaler = [0], [False]
last_rank = os.environ.get("RANK", "0") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)
def count():
    calls[0] += 1
    if calls[0] == {n} and last_rank:
        os.kill(os.getpid(), signal.SIGTERM)
adam_step, scaler_step = torch.optim.Adam.step, torch.amp.GradScaler.step
def step(self, *args, **kwargs):
    if not inside_scaler[0]:
        count()
    return adam_step(self, *args, **kwargs)
def scaled_step(self, *args, **kwargs):
    count()
    inside_scaler[0] = True
    try:
        return scaler_step(self, *args, **kwargs)
    finally:
        inside_scaler[0] = False
torch.optim.Adam.step, torch.amp.GradScaler.step = step, scaled_step
run_main(script.main, sys.argv[1:])
"""


class CheckFailed(Exception):
    """A check's own verdict (its message is the FAIL line's detail)."""


class Report:
    """PASS / FAIL / SKIP lines as the checks run, and the summary."""

    def __init__(self):
        self.results: list[tuple[str, str, str]] = []

    def run(self, name: str, check, *args) -> None:
        """Run check(*args): what it returns is the PASS detail; CheckFailed or any exception is a FAIL."""
        start = time.monotonic()
        try:
            status, detail = "PASS", check(*args)
        except CheckFailed as err:
            status, detail = "FAIL", str(err)
        except (Exception, SystemExit) as err:  # a crash in a check (or bench.py's exit) is a failed check
            status, detail = "FAIL", f"{type(err).__name__}: {' '.join(str(err).split())[:600]}"
        self.add(status, name, f"{detail} ({time.monotonic() - start:.0f} s)")

    def add(self, status: str, name: str, detail: str) -> None:
        self.results.append((status, name, detail))
        print(f"{status:4s}  {name}: {detail}", flush=True)

    def summary(self) -> int:
        counts = Counter(status for status, _, _ in self.results)
        print(f"\nsummary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
        for status, name, detail in self.results:
            if status == "FAIL":
                print(f"  FAIL {name}: {detail}")
        return 1 if counts["FAIL"] else 0


# -- 1. The device ---------------------------------------------------------------------------------------------------
def describe_machine(device_flag: str) -> tuple[torch.device | None, str, str | None]:
    """(the device --device picks, or None when it refuses; what to print about the machine; why the device check
    FAILs, or None). A GPU that PyTorch cannot use FAILs it whatever --device says: a run's --device auto would stop."""
    lines = [f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only)'}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}; "
             f"kernels for {' '.join(torch.cuda.get_arch_list()) or 'no GPU (none reported)'}",
             f"NVIDIA GPU (nvidia-smi, /proc/driver/nvidia): {devices.nvidia_gpu() or 'none found'}",
             f"given a GPU by the environment: {devices.gpus_given() or 'no'}"]
    try:
        device = devices.pick_device(device_flag)
        refusal = None if torch.cuda.is_available() else devices.unusable_gpu()
        if refusal:
            refusal += f" but PyTorch cannot use it: {devices.why_no_cuda()}"
    except UserError as err:
        device, refusal = None, f"--device {device_flag} refused: {err}"
    if device is not None and device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2 ** 30:.0f} GiB")
    return device, "\n".join(lines), refusal


# -- 2, 3. Bit-exact resume: the default flags; on a GPU the speed flags, and torchrun -------------------------------
def train_command(name: str, run_dir: Path, data_dir: Path, device: torch.device, extra=(), stop: bool = False,
                  ranks: int = 0) -> list[str]:
    """A tiny run of a training script in its own process (stopped by SIGTERM at optimiser step STOP_AT[name], if
    `stop`), under torchrun with `ranks` processes if given."""
    script, options = RUNS[name]
    args = ["--data-dir", data_dir, "--run-dir", run_dir, "--device", device.type, "--epochs", EPOCHS,
            "--batch-size", 32, "--train-limit", TRAIN_IMAGES, "--log-every", 4, *options, *extra]
    program = REPO_ROOT / script
    if stop:  # the stopper as a file: torchrun starts a file, not `python -c`
        program = run_dir.parent / f"stop-{name}.py"
        program.write_text(STOPPER.format(repo=str(REPO_ROOT), module=script.removesuffix(".py"), n=STOP_AT[name]))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else []
    return [sys.executable, *launcher, str(program), *map(str, args)]


def run_together(*commands: list[str], device: torch.device) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side (on the CPU one thread each: tiny models), wait for all; their results."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if device.type == "cpu" else {})}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def expect(proc: subprocess.CompletedProcess, code: int, what: str) -> None:
    if proc.returncode != code:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        raise CheckFailed(f"{what} exited {proc.returncode}, not {code}: " + " | ".join(tail))


def differences(got, want, where: str = "") -> list[str]:
    """Where two checkpoints differ: tensors by torch.equal (dtype too), numbers exactly (NaN equals NaN); wall
    times (epoch_elapsed_s, *_time_s) are left out."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return [f"{where or 'the checkpoint'}: keys differ"]
        return [d for key in want if key != "epoch_elapsed_s" and not str(key).endswith("_time_s")
                for d in differences(got[key], want[key], f"{where}/{key}")]
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return [f"{where}: lengths differ"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
        return [] if same else [where]
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want) and math.isnan(got):
        return []
    return [] if got == want else [where]


def count_tensors(state) -> int:
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return sum(map(count_tensors, state))
    return int(isinstance(state, torch.Tensor))


def check_resume(name: str, workdir: Path, data_dir: Path, device: torch.device, extra=(), ranks: int = 0) -> str:
    """An uninterrupted run, and one stopped by SIGTERM in epoch 2 then resumed by the same command: the same
    final checkpoint, tensor for tensor (under torchrun with `ranks` processes, if given). The stopped run goes
    first, alone: with --compile the other two then find its kernels in torch's compile cache."""
    tag = "-".join([name, *(f.strip("-") for f in extra if f.startswith("--")), *([f"x{ranks}"] if ranks else [])])
    straight, stopped = workdir / tag / "straight", workdir / tag / "stopped"
    straight.parent.mkdir()
    [first] = run_together(train_command(name, stopped, data_dir, device, extra, stop=True, ranks=ranks),
                           device=device)
    if ranks:  # torchrun reports a worker's exit 75 as its own failure (1)
        if first.returncode == 0:
            raise CheckFailed(f"the run under torchrun was not stopped by SIGTERM at optimiser step {STOP_AT[name]}")
    else:
        expect(first, EXIT_PREEMPTED, "the run stopped by SIGTERM")
    uninterrupted, resumed = run_together(train_command(name, straight, data_dir, device, extra, ranks=ranks),
                                          train_command(name, stopped, data_dir, device, extra, ranks=ranks),
                                          device=device)
    expect(uninterrupted, 0, "the uninterrupted run")
    expect(resumed, 0, "the resumed run")
    got, want = (torch.load(list_checkpoints(run_dir)[0], map_location="cpu", weights_only=True)
                 for run_dir in (stopped, straight))
    diff = differences(got, want)
    if diff:
        raise CheckFailed(f"{len(diff)} entries differ from the uninterrupted run, e.g. {', '.join(diff[:4])}")
    return (f"stopped at optimiser step {STOP_AT[name]} and resumed = uninterrupted, all {count_tensors(want)} "
            f"tensors equal ({want.get('precision', '?')}{f', {ranks} processes' if ranks else ''})")


# -- 4. Throughput, and what determinism costs (tools/bench.py's measurements) --------------------------------------
def check_throughput(name: str, workdir: Path, data: tuple, device: torch.device, n_images: int) -> str:
    """img/s of the script of bench.py's model `name` with --deterministic on and off, and of its bare loop
    (deterministic, as the script's default). Under 1,024 images (a rehearsal) both sides train in batches of 32."""
    batch = ["--batch-size", "32"] if n_images < 1024 else []
    options = [*bench.script_options(name, data), *batch, "--device", device.type, "--deterministic"]
    module = bench.MODELS[name][0]
    speed = {mode: bench.script_throughput(module, workdir / f"bench-{name}-{mode}", [*options, mode], n_images,
                                           repeats=1)["images_per_s"] for mode in ("on", "off")}
    images = bench.training_images(name, data, n_images)
    bare = bench.bare(name, images, device, repeats=1, op_steps=1, options=batch)["images_per_s"]
    return (f"script {speed['on']:.0f} img/s deterministic, {speed['off']:.0f} img/s not (on: "
            f"{speed['on'] / speed['off']:.2f}x the speed of off); bare loop {bare:.0f} img/s, script (on) / bare "
            f"{speed['on'] / bare:.2f}")


# -- 5. FID timing ---------------------------------------------------------------------------------------------------
def check_fid_timing(device: torch.device, n_images: int) -> str:
    """Seconds for the FID of two sets of n_images features where training computes it (common/fid.py on the
    device, float64; Inception's 2048 dimensions, 32 in a rehearsal under 1,000 images), and, when
    torch-fidelity's Inception weights are in torch's cache, Inception features per second on `device`."""
    dim = 2048 if n_images >= 1000 else 32
    features = torch.randn(2 * n_images, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = features.to(fid.math_device(device))
    seconds, value = bench.best_time(lambda: fid.fid_from_features(features[:n_images], features[n_images:]),
                                     device, repeats=2)
    if not math.isfinite(value):
        raise CheckFailed(f"the FID of two random feature sets is {value}")
    detail = f"FID of {n_images:,} x {dim} features on {fid.math_device(device)} {seconds:.2f} s"
    weights = gan_metrics.find_inception_weights(None)
    if weights is None:
        return detail + "; Inception features not timed (no weights in torch's cache: docs/operations.md)"
    extractor = gan_metrics.InceptionFeatures(weights).to(device).eval()
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8)
    gan_metrics.extract_features(extractor, images[:gan_metrics.FID_BATCH])  # warm-up (cuDNN, lazy init)
    seconds, _ = bench.best_time(lambda: gan_metrics.extract_features(extractor, images), device, repeats=1)
    rate = n_images / seconds
    return (f"{detail}; Inception features {rate:.0f} img/s on {device.type}: the generated half of an "
            f"evaluation at --fid-samples 10000 ~{10_000 / rate:.0f} s")


# -- All of them -----------------------------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="the device to check (auto: as the training scripts pick it)")
    parser.add_argument("--full", action="store_true",
                        help="run the GPU checks on a CPU too (a rehearsal: with --images 64, a few minutes)")
    parser.add_argument("--images", type=int, default=5000, help="images per throughput and FID timing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = Report()
    device, machine, refusal = describe_machine(args.device)
    print(machine, flush=True)
    if refusal:
        report.add("FAIL", "device", f"{refusal}; the other checks run on {device or 'the CPU'}")
    else:
        report.add("PASS", "device", f"{devices.describe(device, '-')['device_name']} ({device})")
    device = device or torch.device("cpu")
    gpu = device.type == "cuda"
    if not gpu:
        print(f"no CUDA GPU in use here: the CPU checks{', and the GPU ones on the CPU' if args.full else ''}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        data_dir = tiny_data.make_mnist(workdir / "data", n_train=TRAIN_IMAGES, n_test=64)
        for name in RUNS:
            report.run(f"{name} resume", check_resume, name, workdir, data_dir, device)
        if gpu or args.full:
            run_gpu_checks(report, workdir, data_dir, device, args.images)
        else:
            report.add("SKIP", "resume with the speed flags, torchrun, throughput, FID timing",
                       "no GPU (--full rehearses them on the CPU)")
    return report.summary()


def run_gpu_checks(report: Report, workdir: Path, data_dir: Path, device: torch.device, n_images: int) -> None:
    # The classifier of the DCGAN's FID is trained (with Adam) on first use: here, so that no run counts its steps.
    gan_metrics.load_or_train("mnist", data_dir, log=lambda *_: None)
    for name in RUNS:
        extra = [*SPEED_FLAGS, *(FID_ON if name == "dcgan" else [])]
        report.run(f"{name} resume {' '.join(extra)}", check_resume, name, workdir, data_dir, device, extra)
    ranks = torch.cuda.device_count() if device.type == "cuda" else 2
    report.run(f"dcgan resume under torchrun --nproc_per_node {ranks}", check_resume, "dcgan", workdir, data_dir,
               device, [], ranks)
    data = bench.prepare_data(n_images, None, workdir / "bench-data")  # stand-ins: MNIST, 32x32 colour PNGs
    for name in ("vae_conv", "dcgan"):
        report.run(f"{name.removesuffix('_conv')} throughput", check_throughput, name, workdir, data, device, n_images)
    report.run("FID timing", check_fid_timing, device, min(n_images, 2000))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped doctor still removes its temp folder
    sys.exit(main())
