"""Is this machine ready for a long run? `make gpu-check`: the doctor to run first on a new GPU, cluster or install.

    python tools/gpu_check.py                # the GPU PyTorch finds (only the CPU checks when there is none)
    python tools/gpu_check.py --device cpu   # the CPU checks, whatever the machine has
    python tools/gpu_check.py --full         # the GPU checks too, even on the CPU (slow there; for the tests)

One PASS, FAIL or SKIP line per check, then a summary; exit 1 when a check FAILs, else 0 (also without a GPU).
  1. the device: its name, the driver, the CUDA build, the compute capability, and whether this PyTorch has kernels
     for it (the same check as --device auto: a job given a GPU that PyTorch cannot use FAILs, saying why);
  2. bit-exact resume: a tiny VAE run and a tiny DCGAN run with the default flags (--amp auto, --deterministic on),
     stopped by SIGTERM in their second epoch and resumed, equal an uninterrupted run tensor for tensor (weights,
     optimisers, loss scalers, RNG state, metrics but for times);
  3. GPU: --amp fp16 (and bf16 where the GPU has it) and --compile smoke runs: finite losses, exported models;
  4. GPU: throughput of the scripts against a bare loop (tools/bench.py), and what --deterministic on costs;
  5. GPU: FID timing (Inception features when the weights are in torch's cache; the FID maths always).
A few minutes on a GPU; well under one on a CPU, where only 1 and 2 run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
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

sys.path.insert(0, str(common.REPO_ROOT / "tests" / "support"))  # the tiny data sets are the tests' own
import tiny_data  # noqa: E402

# Tiny runs: 256 images in batches of 32 are 8 steps an epoch; two epochs, stopped before step 11 (epoch 2).
TRAIN_IMAGES, EPOCHS, STOP_AT_STEP = 256, 2, 11
RUNS = {
    "vae": ("vae_train.py", "VAETraining", ["--latent-dim", "8"]),
    "dcgan": ("dcgan_train.py", "DCGANTraining", ["--dataset", "mnist", "--ngf", "16", "--ndf", "16", "--fid", "off"]),
}
# A training script started after a patch that sends the process a real SIGTERM as its N-th training step begins.
STOPPER = """
import importlib, os, signal, sys
sys.path.insert(0, {repo!r})
import common
script = importlib.import_module({module!r})
job_class, calls = getattr(script, {job_class!r}), [0]
original = job_class.train_step
def train_step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)
job_class.train_step = train_step
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


def nvidia_smi() -> str | None:
    """name, driver version, compute capability and memory of each GPU, from nvidia-smi (None without it)."""
    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() or proc.stderr.strip() or None


def describe_machine(device_flag: str) -> tuple[torch.device | None, str]:
    """(the device --device picks, or None when it refuses; what to print about the machine)."""
    lines = [f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only)'}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}; "
             f"kernels for {' '.join(torch.cuda.get_arch_list()) or 'no GPU (none reported)'}",
             f"driver (nvidia-smi): {nvidia_smi() or 'no nvidia-smi on the PATH'}",
             f"given a GPU by the environment: {common.devices.gpus_given() or 'no'}"]
    try:
        device = common.pick_device(device_flag)
    except common.UserError as err:
        return None, "\n".join([*lines, f"--device {device_flag}: {err}"])
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2 ** 30:.0f} GiB")
    return device, "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 2. Bit-exact resume


def train_command(name: str, run_dir: Path, data_dir: Path, device: torch.device, extra=(),
                  stop_at: int | None = None, epochs: int = EPOCHS) -> list[str]:
    """A tiny run of a training script in its own process (stopped by SIGTERM at step `stop_at`, if given)."""
    script, job_class, options = RUNS[name]
    args = ["--data-dir", data_dir, "--run-dir", run_dir, "--device", device.type, "--epochs", epochs,
            "--batch-size", 32, "--train-limit", TRAIN_IMAGES, "--log-every", 4, *options, *extra]
    if stop_at is None:
        cmd = [sys.executable, str(common.REPO_ROOT / script)]
    else:
        cmd = [sys.executable, "-c", STOPPER.format(repo=str(common.REPO_ROOT), module=script.removesuffix(".py"),
                                                    job_class=job_class, n=stop_at)]
    return [*cmd, *map(str, args)]


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


def check_resume(name: str, workdir: Path, data_dir: Path, device: torch.device) -> str:
    """An uninterrupted run, and one stopped by SIGTERM in epoch 2 then resumed by the same command: the same
    final checkpoint, tensor for tensor."""
    straight, stopped = workdir / f"{name}-straight", workdir / f"{name}-stopped"
    first, second = run_together(train_command(name, straight, data_dir, device),
                                 train_command(name, stopped, data_dir, device, stop_at=STOP_AT_STEP), device=device)
    expect(first, 0, "the uninterrupted run")
    expect(second, common.EXIT_PREEMPTED, "the run stopped by SIGTERM")
    expect(*run_together(train_command(name, stopped, data_dir, device), device=device), 0, "the resumed run")
    got, want = final_checkpoint(stopped), final_checkpoint(straight)
    if got["global_step"] != want["global_step"]:
        raise CheckFailed(f"ended at step {got['global_step']}, the uninterrupted run at {want['global_step']}")
    diff = differences(got, want)
    if diff:
        raise CheckFailed(f"{len(diff)} entries differ from the uninterrupted run, e.g. {', '.join(diff[:4])}")
    n_tensors = sum(1 for _ in tensors(want))
    return (f"stopped at step {STOP_AT_STEP} and resumed = uninterrupted, all {n_tensors} tensors equal "
            f"({want.get('precision', '?')}, deterministic on)")


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
# 3. Smoke runs of the GPU speed flags


def check_smoke(name: str, extra: list, workdir: Path, data_dir: Path, device: torch.device) -> str:
    """One epoch with `extra` flags: it finishes, its losses are finite, it exports."""
    run_dir = workdir / f"{name}-{'-'.join(f.strip('-') for f in extra)}"
    expect(*run_together(train_command(name, run_dir, data_dir, device, extra, epochs=1), device=device), 0,
           f"{name} {' '.join(extra)}")
    with open(run_dir / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    losses = {k: float(v) for k, v in row.items() if "loss" in k and v not in ("", None)}
    if not losses or not all(math.isfinite(v) for v in losses.values()):
        raise CheckFailed(f"losses {losses}")
    precision = final_checkpoint(run_dir).get("precision")
    return f"finite losses ({', '.join(f'{k} {v:.3g}' for k, v in losses.items())}), {precision}, exported"


# ----------------------------------------------------------------------------------------------------------------
# 4. Throughput, and what determinism costs (tools/bench.py's measurements)


def check_throughput(name: str, workdir: Path, data: tuple, device: torch.device, n_images: int) -> str:
    """img/s of the script with --deterministic on and off, and of bench.py's bare loop (no determinism)."""
    import bench  # tools/bench.py, beside this file

    mnist, colour, colour_dataset = data
    options = (["--data-dir", mnist, "--arch", "conv"] if name == "vae" else
               ["--data-dir", colour, "--dataset", colour_dataset, "--fid", "off"])
    speed = {mode: bench.script_throughput(RUNS[name][0], workdir / f"bench-{name}-{mode}",
                                           [*options, "--device", device.type, "--deterministic", mode],
                                           n_images)["images_per_s"] for mode in ("on", "off")}
    images = (bench.colour_images(colour, colour_dataset) if name == "dcgan" else
              common.load_images("mnist", mnist, train=True)[0])[:n_images]
    bare = (bench.bare_dcgan(images, 128, device, 1) if name == "dcgan" else
            bench.bare_vae("conv", images, 128, device, 1))["images_per_s"]
    return (f"script {speed['on']:.0f} img/s deterministic, {speed['off']:.0f} img/s not (on: "
            f"{speed['on'] / speed['off']:.2f}x the speed of off); bare loop {bare:.0f} img/s, script (off) / bare "
            f"{speed['off'] / bare:.2f}")


# ----------------------------------------------------------------------------------------------------------------
# 5. FID timing


def check_fid_timing(device: torch.device, n_images: int) -> str:
    """Seconds for the FID maths of n_images 2048-d features (on the CPU, as every evaluation does them), and,
    when torch-fidelity's Inception weights are in torch's cache, Inception features per second on `device`."""
    from common import gan_metrics

    features = torch.randn(2 * n_images, 2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = time.monotonic()
    fid = gan_metrics.fid_from_features(features[:n_images], features[n_images:])
    maths_s = time.monotonic() - start
    if not math.isfinite(fid):
        raise CheckFailed(f"the FID of two random feature sets is {fid}")
    detail = f"FID maths on {n_images:,} features {maths_s:.1f} s"
    weights = gan_metrics.find_inception_weights(None)
    if weights is None:
        return detail + "; Inception features not timed (no weights in torch's cache: docs/operations.md)"
    extractor = gan_metrics.InceptionFeatures(weights).to(device).eval()
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8)
    gan_metrics.extract_features(extractor, images[:gan_metrics.FID_BATCH])  # warm-up (cuDNN, lazy init)
    start = time.monotonic()
    gan_metrics.extract_features(extractor, images)
    rate = n_images / (time.monotonic() - start)
    return (f"{detail}; Inception features {rate:.0f} img/s on {device.type}: the generated half of an "
            f"evaluation at --fid-samples 10000 ~{10_000 / rate:.0f} s")


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="the device to check (auto: as the training scripts pick it)")
    parser.add_argument("--full", action="store_true",
                        help="run the GPU checks (speed flags, throughput, FID timing) on a CPU too")
    parser.add_argument("--images", type=int, default=5000, help="images per throughput and FID timing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = Report()
    device, machine = describe_machine(args.device)
    print(machine, flush=True)
    if device is None:
        report.add("FAIL", "device", f"--device {args.device} refused (above); the CPU checks run on")
        device = torch.device("cpu")
    else:
        report.add("PASS", "device", f"{common.devices.describe(device, '-')['device_name']} ({device})")
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
            report.add("SKIP", "--amp, --compile, throughput, FID timing", "no GPU (--full runs them on the CPU)")
    return report.summary()


def run_gpu_checks(report: Report, workdir: Path, data_dir: Path, device: torch.device, n_images: int) -> None:
    native_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
    for amp in ("fp16", "bf16") if native_bf16 else ("fp16",):
        for name in RUNS:
            report.run(f"{name} --amp {amp}", check_smoke, name, ["--amp", amp], workdir, data_dir, device)
    for name in RUNS:
        report.run(f"{name} --compile", check_smoke, name, ["--compile"], workdir, data_dir, device)
    import bench  # tools/bench.py, beside this file: its stand-in data sets (MNIST, 32x32 colour PNGs)

    data = bench.prepare_data(argparse.Namespace(images=n_images, data_dir=None), workdir / "bench-data")
    for name in RUNS:
        report.run(f"{name} throughput", check_throughput, name, workdir, data, device, n_images)
    report.run("FID timing", check_fid_timing, device, min(n_images, 2000))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped doctor still removes its temp folder
    sys.exit(main())
