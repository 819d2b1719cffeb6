"""Is this machine ready for a long run? `make gpu-check`: the doctor to run first on a new GPU, cluster or install.

    python tools/gpu_check.py                # the GPU PyTorch finds (only the CPU checks when there is none)
    python tools/gpu_check.py --device cpu   # the CPU checks, whatever the machine has
    python tools/gpu_check.py --device cpu --full --images 64   # every GPU check too, on the CPU at tiny size (CI)

One PASS, FAIL or SKIP line per check, then a summary; exit 1 when a check FAILs, else 0 (also without a GPU).
  1. the device: its name, the driver, the CUDA build, the compute capability, and whether this PyTorch has kernels
     for it (the same check as --device auto: a GPU that PyTorch cannot use FAILs, saying why, whatever --device);
  2. bit-exact resume: a tiny VAE run and a tiny DCGAN run with the default flags (--amp auto, --deterministic on),
     stopped by SIGTERM in their second epoch and resumed, equal an uninterrupted run tensor for tensor (weights,
     optimisers, loss scalers, RNG state, metrics but for times);
  3. GPU: the same with --amp fp16 --compile --channels-last (and, for the DCGAN, its FID every epoch), and a
     DCGAN under torchrun on every visible GPU (on the CPU: 2 gloo processes);
  4. GPU: throughput of the scripts against a bare loop (tools/bench.py), and what --deterministic on costs;
  5. GPU: FID timing on the device (the Frechet distance; Inception features when the weights are in torch's cache).
The scripts are driven by their command line only; a stop is a SIGTERM sent as an optimiser step begins.
About 5 minutes on a T4 (docs/results.md says how that was estimated); under a minute on a CPU, where only 1 and 2
run unless --full.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python tools/X.py` puts tools/ on the path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
from common import fid, gan_metrics

sys.path.insert(0, str(common.REPO_ROOT / "tests" / "support"))  # the tiny data sets are the tests' own
import tiny_data  # noqa: E402

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
import common
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
common.run_main(script.main, sys.argv[1:])
"""


class CheckFailed(Exception):
    """A check's own verdict (its message is the FAIL line's detail)."""


class Report:
    """PASS / FAIL / SKIP lines as the checks run, and the summary."""

    def __init__(self):
        self.results: list[tuple[str, str, str]] = []

    def run(self, name: str, check, *args):
        """Run check(*args): what it returns is the PASS detail; CheckFailed or any exception is a FAIL."""
        start = time.monotonic()
        try:
            detail = check(*args)
            status = "PASS"
        except CheckFailed as err:
            detail, status = str(err), "FAIL"
        except (Exception, SystemExit) as err:  # a crash in a check (or bench.py's exit) is a failed check
            detail, status = f"{type(err).__name__}: {' '.join(str(err).split())[:600]}", "FAIL"
        self.add(status, name, f"{detail} ({time.monotonic() - start:.0f} s)")
        return status == "PASS"

    def add(self, status: str, name: str, detail: str) -> None:
        self.results.append((status, name, detail))
        print(f"{status:4s}  {name}: {detail}", flush=True)

    def summary(self) -> int:
        counts = {s: sum(1 for r in self.results if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
        print(f"\nsummary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
        for status, name, detail in self.results:
            if status == "FAIL":
                print(f"  FAIL {name}: {detail}")
        return 1 if counts["FAIL"] else 0


# ----------------------------------------------------------------------------------------------------------------
# 1. The device


def describe_machine(device_flag: str) -> tuple[torch.device | None, str, str | None]:
    """(the device --device picks, or None when it refuses; what to print about the machine; why the device check
    FAILs, or None). A GPU that PyTorch cannot use FAILs it whatever --device says: a run's --device auto would stop."""
    lines = [f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only)'}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}; "
             f"kernels for {' '.join(torch.cuda.get_arch_list()) or 'no GPU (none reported)'}",
             f"NVIDIA GPU (nvidia-smi, /proc/driver/nvidia): {common.devices.nvidia_gpu() or 'none found'}",
             f"given a GPU by the environment: {common.devices.gpus_given() or 'no'}"]
    try:
        device = common.pick_device(device_flag)
        refusal = None if torch.cuda.is_available() else common.devices.unusable_gpu()
        if refusal:
            refusal += f" but PyTorch cannot use it: {common.devices.why_no_cuda()}"
    except common.UserError as err:
        device, refusal = None, f"--device {device_flag} refused: {err}"
    if device is not None and device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2 ** 30:.0f} GiB")
    return device, "\n".join(lines), refusal


# ----------------------------------------------------------------------------------------------------------------
# 2, 3. Bit-exact resume: the default flags; on a GPU the speed flags, and torchrun


def train_command(name: str, run_dir: Path, data_dir: Path, device: torch.device, extra=(), stop: bool = False,
                  ranks: int = 0) -> list[str]:
    """A tiny run of a training script in its own process (stopped by SIGTERM at optimiser step STOP_AT[name], if
    `stop`), under torchrun with `ranks` processes if given."""
    script, options = RUNS[name]
    args = ["--data-dir", data_dir, "--run-dir", run_dir, "--device", device.type, "--epochs", EPOCHS,
            "--batch-size", 32, "--train-limit", TRAIN_IMAGES, "--log-every", 4, *options, *extra]
    program = common.REPO_ROOT / script
    if stop:  # the stopper as a file: torchrun starts a file, not `python -c`
        program = run_dir.parent / f"stop-{name}.py"
        program.write_text(STOPPER.format(repo=str(common.REPO_ROOT), module=script.removesuffix(".py"),
                                          n=STOP_AT[name]))
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


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(common.list_checkpoints(run_dir)[0], map_location="cpu", weights_only=True)


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
        expect(first, common.EXIT_PREEMPTED, "the run stopped by SIGTERM")
    uninterrupted, resumed = run_together(train_command(name, straight, data_dir, device, extra, ranks=ranks),
                                          train_command(name, stopped, data_dir, device, extra, ranks=ranks),
                                          device=device)
    expect(uninterrupted, 0, "the uninterrupted run")
    expect(resumed, 0, "the resumed run")
    got, want = final_checkpoint(stopped), final_checkpoint(straight)
    diff = differences(got, want)
    if diff:
        raise CheckFailed(f"{len(diff)} entries differ from the uninterrupted run, e.g. {', '.join(diff[:4])}")
    n_tensors = sum(1 for _ in tensors(want))
    return (f"stopped at optimiser step {STOP_AT[name]} and resumed = uninterrupted, all {n_tensors} tensors equal "
            f"({want.get('precision', '?')}{f', {ranks} processes' if ranks else ''})")


def tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors(value)


# ----------------------------------------------------------------------------------------------------------------
# 4. Throughput, and what determinism costs (tools/bench.py's measurements)


def check_throughput(name: str, workdir: Path, data: tuple, device: torch.device, n_images: int) -> str:
    """img/s of the script with --deterministic on and off, and of bench.py's bare loop (deterministic, as the
    script's default). Under 1,024 images (a rehearsal) both sides train in batches of 32."""
    import bench  # tools/bench.py, beside this file

    mnist, colour, colour_dataset = data
    batch = ["--batch-size", "32"] if n_images < 1024 else []
    options = (["--data-dir", mnist, "--arch", "conv"] if name == "vae" else
               ["--data-dir", colour, "--dataset", colour_dataset, "--fid", "off"])
    speed = {mode: bench.script_throughput(RUNS[name][0], workdir / f"bench-{name}-{mode}",
                                           [*options, *batch, "--device", device.type, "--deterministic", mode],
                                           n_images, repeats=1)["images_per_s"] for mode in ("on", "off")}
    images = (bench.colour_images(colour, colour_dataset) if name == "dcgan" else
              common.load_images("mnist", mnist, train=True)[0])[:n_images]
    bare = bench.bare("dcgan" if name == "dcgan" else "vae_conv", images, device, repeats=1, op_steps=1,
                      options=batch)["images_per_s"]
    return (f"script {speed['on']:.0f} img/s deterministic, {speed['off']:.0f} img/s not (on: "
            f"{speed['on'] / speed['off']:.2f}x the speed of off); bare loop {bare:.0f} img/s, script (on) / bare "
            f"{speed['on'] / bare:.2f}")


# ----------------------------------------------------------------------------------------------------------------
# 5. FID timing


def check_fid_timing(device: torch.device, n_images: int) -> str:
    """Seconds for the FID of two sets of n_images features where training computes it (common/fid.py on the
    device, float64; Inception's 2048 dimensions, 32 in a rehearsal under 1,000 images), and, when
    torch-fidelity's Inception weights are in torch's cache, Inception features per second on `device`."""
    import bench

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


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        report.add("PASS", "device", f"{common.devices.describe(device, '-')['device_name']} ({device})")
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
    import bench  # tools/bench.py, beside this file: its stand-in data sets (MNIST, 32x32 colour PNGs)

    data = bench.prepare_data(argparse.Namespace(images=n_images, data_dir=None), workdir / "bench-data")
    for name in RUNS:
        report.run(f"{name} throughput", check_throughput, name, workdir, data, device, n_images)
    report.run("FID timing", check_fid_timing, device, min(n_images, 2000))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped doctor still removes its temp folder
    sys.exit(main())
