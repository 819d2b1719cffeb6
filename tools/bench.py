"""Speed and memory of the training scripts on this machine: `make bench` (not part of `make test`); a few
minutes on 2 CPU cores at the defaults. The measurements, explained, and the latest table: docs/results.md.

    python tools/bench.py                       # all measurements, a table on stdout and bench.json
    python tools/bench.py --images 2000         # quicker, noisier

Measured side by side in one run, so the ratios hold even on a noisy shared machine: each script (vae_train.py conv
and mlp, dcgan_train.py), run as a user runs it, against ONE bare loop of the same model (bare_vae, bare_dcgan) at
the script's default batch and precision on full batches already in memory (the ceiling on this hardware), in
images per second after a warm-up epoch and aten ops per step (torch.profiler); peak memory; FID on 10,000 x 2048
random features, common/fid.py against torchmetrics'; the MLP VAE through the classic pipeline (ToTensor() per
item, a DataLoader); the checkpoint write and its share of wall time; start to first step on resume; and the
projected time of `make dcgan` and `make vae` here (the Inception pass timed on a GPU only).
Targets (issue 20): each script >= 0.95x its bare loop and within 5% of its aten ops; FID <= 0.5x torchmetrics'
time and equal to 1e-5; and the MLP VAE >= 3x the classic pipeline; checkpoints < 1% of wall time.
Without MNIST or CIFAR-10 at hand, tiny_data.py writes stand-ins in the real file formats (CIFAR-10's as PNGs):
the speeds hold, start-up times differ a little.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.models import inception_v3

if __package__ in (None, ""):  # `python tools/X.py` puts tools/ on the path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dcgan_train
import vae_train
from common import fid, gan_metrics
from common.checkpoints import load_latest_checkpoint
from common.data import full_batches, load_images
from common.devices import adam, amp_dtype, autocast, determinism, pick_device, precision_name
from common.errors import run_main
from common.files import atomic_path
from common.flags import REPO_ROOT, ArgumentParser
from common.readers import list_checkpoints, read_metrics_csv

sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))  # the stand-in data sets are the tests' own
import tiny_data  # noqa: E402

SHARED_MNIST = REPO_ROOT.parent / "shared" / "data"
# Each model measured: its script, and how many times --repeats each side is timed. An MLP VAE epoch of 5,000
# images takes a quarter of a second on a CPU, where a moment's load elsewhere moves its time by 10 %: 4x as often.
MODELS = {"vae_conv": (vae_train, 1), "vae_mlp": (vae_train, 4), "dcgan": (dcgan_train, 1)}
# The runs `make dcgan` and `make vae` do (the scripts' defaults): training images per epoch of the full data set.
FULL_TRAINING_SETS = {"dcgan": 50_000, "vae_conv": 60_000}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--images", type=int, default=5_000, help="training images per timed epoch")
    parser.add_argument("--data-dir", default=None,
                        help="a root with MNIST (none: ../shared/data if present, else synthetic files)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed epochs of each script (after a first), bare loop, classic pipeline and FID: the "
                             "best is kept")
    parser.add_argument("--op-steps", type=int, default=8, help="steps profiled for the aten-op counts")
    parser.add_argument("--fid-features", type=int, default=10_000, help="feature vectors per set for the FID timing")
    parser.add_argument("--fid-dim", type=int, default=2048, help="their dimension (Inception's pool: 2048)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench.json"), help="where to write the JSON")
    return parser


# -- Data: the real MNIST when at hand; otherwise files in the real formats (speed does not depend on the pixels) --
def prepare_data(n_images: int, data_dir: str | None, workdir: Path) -> tuple[Path, Path, str]:
    """(root with MNIST, root with the 32x32 colour images, its --dataset: cifar10 if under data_dir, else
    folder). The stand-ins have the real shapes, so the training loops do the same work on them."""
    mnist = Path(data_dir) if data_dir else SHARED_MNIST
    if not (mnist / "MNIST" / "raw").is_dir():
        mnist = tiny_data.make_mnist(workdir / "mnist", n_train=n_images, n_test=1000)
    if data_dir and (Path(data_dir) / "cifar-10-batches-py").is_dir():
        return mnist, Path(data_dir), "cifar10"
    # CIFAR-10-shaped PNG files: torchvision refuses synthetic CIFAR-10 batches (their MD5 sums cannot match).
    return mnist, tiny_data.make_image_folder(workdir / "colour", n=n_images, size=32), "folder"


def script_options(name: str, data: tuple) -> list:
    """The flags that point the script of model `name` (a key of MODELS) at its data from prepare_data."""
    mnist, colour, colour_dataset = data
    if name == "dcgan":  # --fid off: quality evaluation (and the Inception download) is no part of the training speed
        return ["--data-dir", colour, "--dataset", colour_dataset, "--fid", "off"]
    return ["--data-dir", mnist, "--arch", name.removeprefix("vae_")]


def training_images(name: str, data: tuple, n_images: int) -> torch.Tensor:
    """The first n_images the script of model `name` trains on, as it reads them: uint8 [N, C, H, W]."""
    mnist, colour, colour_dataset = data
    if name == "dcgan":
        return dcgan_train.load_training_images(dcgan_train.build_parser().parse_args(
            ["--dataset", colour_dataset, "--data-dir", str(colour), "--train-limit", str(n_images)]))
    return load_images("mnist", mnist, train=True)[0][:n_images]


# -- The real scripts, run as a user runs them -----------------------------------------------------------------------
def peak_rss_mb_of(cmd: list[str]) -> float:
    """Run `cmd` to the end; its peak resident memory (MB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-2000:]}")
    return usage.ru_maxrss / 1024  # Linux reports kilobytes


def script_throughput(module, run_dir: Path, options: list, n_images: int, repeats: int) -> dict:
    """1 + `repeats` epochs of the script `module` at its defaults: images per second of its fastest epoch after the
    first (as the bare loop's best of `repeats`; train_time_s is read after the device finished the epoch's steps),
    and what the rest of an epoch costs (evaluation, grids, checkpoint)."""
    rss_mb = peak_rss_mb_of([sys.executable, module.__file__, "--run-dir", str(run_dir), "--epochs", str(1 + repeats),
                             "--train-limit", str(n_images), *map(str, options)])
    rows = read_metrics_csv(run_dir / "metrics.csv")
    best = min(rows[1:], key=lambda row: row["train_time_s"])
    return {"images_per_s": (rows[1]["images_seen"] - rows[0]["images_seen"]) / best["train_time_s"],
            "epoch_train_time_s": best["train_time_s"], "epoch_time_s": best["epoch_time_s"],
            "epoch_overhead_s": best["epoch_time_s"] - best["train_time_s"], "peak_rss_mb": rss_mb}


def script_ops_per_step(module, options: list, batch_size: int, run_dirs: Path, steps: int) -> dict:
    """aten ops per step of the script itself, everything its loop does per step included: two in-process runs of
    one epoch, of `steps` and 2 x `steps` full batches (fewer when the data set is smaller), under torch.profiler;
    the difference over the steps between them (what an epoch costs once, data order, evaluation, grids,
    checkpoint, is the same in both and cancels)."""
    counts, done = [], []
    for n_steps in (steps, 2 * steps):
        run_dir = run_dirs / str(n_steps)
        argv = ["--run-dir", str(run_dir), "--epochs", "1", "--train-limit", str(n_steps * batch_size),
                *map(str, options)]
        with contextlib.redirect_stdout(io.StringIO()):
            counts.append(count_aten_ops(lambda: module.main(argv)))
        done.append(int(read_metrics_csv(run_dir / "metrics.csv")[0]["images_seen"]) // batch_size)
    if done[1] == done[0]:
        raise SystemExit(f"{module.__name__}: too few training images to count ops over {2 * steps} steps; "
                         f"lower --op-steps")
    return {key: (counts[1][key] - counts[0][key]) / (done[1] - done[0]) for key in counts[0]}


# -- Bare loops: the same models, batch and precision as the scripts' defaults, on batches already in memory --------
def count_aten_ops(fn) -> dict:
    """aten ops dispatched while fn() runs: all of them (an op inside another counts too: each is a dispatch,
    and a kernel launch on a GPU when it computes), and those called directly (not from inside another op)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def top_level(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        return parent is None

    return {"all": len(events), "top_level": sum(map(top_level, events))}


def bare_ops_per_step(step, batches: list, steps: int) -> dict:
    for x in batches[:2]:  # warm-up: lazy state (Adam's moments) is made on the first step
        step(x)
    counts = count_aten_ops(lambda: [step(batches[i % len(batches)]) for i in range(steps)])
    return {key: value / steps for key, value in counts.items()}


def bare_vae(arch: str, device: torch.device, options=()):
    """The VAE's step at vae_train.py's defaults (model, batch, precision) or `options`, nothing else; (step, args)."""
    args = vae_train.build_parser().parse_args(["--arch", arch, *options])
    torch.manual_seed(0)
    model = vae_train.VAE(args.arch, args.latent_dim, args.likelihood).to(device)
    optimizer = adam(model.parameters(), device, lr=args.lr)
    amp = amp_dtype(args.amp, device)

    def step(x):
        with autocast(device, amp):
            recon_nll, kl = vae_train.vae_terms(model, x)
            loss = (recon_nll + args.beta * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, args


def bare_dcgan(device: torch.device, options=()):
    """The DCGAN's step at dcgan_train.py's defaults (models, losses, batch, precision, EMA) or `options`, nothing
    else: D's weights frozen in G's step, as a hand-written loop that cares would; (step, its args)."""
    args = dcgan_train.build_parser().parse_args(list(options))
    torch.manual_seed(0)
    generator, discriminator = (m.to(device) for m in dcgan_train.build_models(args, 3))
    generator_ema = copy.deepcopy(generator) if args.ema > 0 else None
    opt_g = adam(generator.parameters(), device, lr=args.lr_g, betas=(args.beta1, 0.999))
    opt_d = adam(discriminator.parameters(), device, lr=args.lr_d, betas=(args.beta1, 0.999))
    amp = amp_dtype(args.amp, device)

    def step(real):
        with autocast(device, amp):
            fake = generator(torch.randn(len(real), args.nz, 1, 1, device=device))
            loss_d = dcgan_train.d_loss(discriminator(real), discriminator(fake.detach()), args.loss,
                                        args.label_smoothing)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        discriminator.requires_grad_(False)
        with autocast(device, amp):
            loss_g = dcgan_train.g_loss(discriminator(fake), args.loss)
        discriminator.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if generator_ema is not None:
            dcgan_train.update_ema(generator_ema, generator, args.ema)

    return step, args


def bare(name: str, images_uint8: torch.Tensor, device: torch.device, repeats: int, op_steps: int,
         options=()) -> dict:
    """The bare loop of `name` (vae_conv, vae_mlp, dcgan): images per second (best of `repeats`), aten ops per
    step, the batch and precision it ran at (the script's defaults, or its flags in `options`), the CUDA peak."""
    if name == "dcgan":
        (step, args), to_float = bare_dcgan(device, options), dcgan_train.to_float
    else:
        (step, args), to_float = bare_vae(name.removeprefix("vae_"), device, options), vae_train.to_float
    # The images the script trains on, converted and on the device, in full batches only (as the script's steps).
    images = to_float(images_uint8.to(device))
    batches = list(images[:len(images) // args.batch_size * args.batch_size].split(args.batch_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this loop's peak, not an earlier one's
    # Under the script's default --deterministic (on), as the script runs: deterministic kernels dispatch more ops
    # (on this CPU about 290 more per DCGAN step), which is no overhead of the script's.
    with determinism(args.deterministic):
        for x in batches[:5]:  # warm-up: Adam's lazy state, cuDNN's choice of algorithms
            step(x)
        seconds, _ = best_time(lambda: [step(x) for x in batches], device, repeats)
        ops = bare_ops_per_step(step, batches, op_steps)
    cuda_peak = {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20} if device.type == "cuda" else {}
    return {"images_per_s": len(batches) * args.batch_size / seconds, "batch_size": args.batch_size,
            "amp": precision_name(amp_dtype(args.amp, device)), "ops_per_step": ops, **cuda_peak}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def best_time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """The fastest of `repeats` calls of fn (the clock read after the device finished), and what it returned. The
    fastest, as a shared machine's load only ever adds time."""
    best = math.inf
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        value = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, value


# -- FID: the Frechet distance on the same random features, ours (common/fid.py) against torchmetrics' ------------
def fid_times(n: int, dim: int, device: torch.device, repeats: int) -> dict:
    """Seconds from two sets of n x dim float64 features to the FID: common.fid (on `device`) and torchmetrics'
    FrechetInceptionDistance (as gan_metrics used it before: on the CPU), each the best of `repeats`; and one
    evaluation in training (the real statistics cached: the generated set's statistics and the distance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim ** 0.5  # correlated, like real features
    real = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mixing
    fake = (torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mixing) * 1.1 + 0.05

    def reference() -> float:
        metric = FrechetInceptionDistance(feature=gan_metrics._Precomputed(dim))
        metric.set_dtype(torch.float64)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return float(metric.compute())

    reference_s, reference_fid = best_time(reference, torch.device("cpu"), repeats)
    real, fake = real.to(fid.math_device(device)), fake.to(fid.math_device(device))
    ours_s, ours = best_time(lambda: fid.fid_from_features(real, fake), device, repeats)
    real_stats = fid.feature_statistics(real)
    per_evaluation_s, _ = best_time(lambda: fid.frechet_distance(*real_stats, *fid.feature_statistics(fake)), device,
                                    repeats)
    return {"features": [n, dim], "ours_s": ours_s, "torchmetrics_s": reference_s, "ratio": ours_s / reference_s,
            "relative_difference": abs(ours - reference_fid) / abs(reference_fid), "fid": ours,
            "per_evaluation_s": per_evaluation_s}


def inception_seconds(device: torch.device, n: int = 10_000) -> float | None:
    """One FID evaluation's Inception pass on a GPU: n images through Inception v3 at 299 x 299 (torchvision's,
    random weights: torch-fidelity's has the same architecture), as torch-fidelity resizes them. None on a CPU."""
    if device.type != "cuda":
        return None
    net = inception_v3(weights=None, aux_logits=False, init_weights=False).to(device).eval()
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8, device=device)
    with torch.no_grad():
        run = lambda: net(F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear"))  # noqa: E731
        run()  # warm-up: cuDNN's choice of algorithms
        seconds, _ = best_time(lambda: [run() for _ in range(n // 250)], device, repeats=1)
    return seconds


# -- The classic pipeline a user would otherwise write; checkpoints and resume ------------------------------------
def classic_mlp_vae(mnist_root: Path, n_images: int, batch_size: int, device: torch.device, repeats: int) -> dict:
    """torchvision MNIST with ToTensor() per item and a DataLoader (the pytorch/examples vae/main.py way)."""
    dataset = Subset(datasets.MNIST(str(mnist_root), train=True, transform=transforms.ToTensor()), range(n_images))
    torch.manual_seed(0)
    model = vae_train.VAE("mlp", 16, "bernoulli").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch():
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=True):
            recon_nll, kl = vae_train.vae_terms(model, x.to(device))
            loss = (recon_nll + kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    seconds, _ = best_time(epoch, device, repeats)
    return {"images_per_s": n_images / seconds}


def checkpoint_write_s(run_dir: Path, repeats: int = 5) -> dict:
    """Median time of the scripts' checkpoint write (atomic: temp file, fsync, rename) for the conv VAE's state."""
    ckpt = load_latest_checkpoint(run_dir)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        with atomic_path(run_dir / f"bench-{i}.pt") as tmp:
            torch.save(ckpt, tmp)
        times.append(time.perf_counter() - start)
        (run_dir / f"bench-{i}.pt").unlink()
    return {"seconds": statistics.median(times), "size_mb": list_checkpoints(run_dir)[0].stat().st_size / 2 ** 20}


def resume_to_first_step_s(module, run_dir: Path, options: list) -> float:
    """Seconds from starting a resume of `run_dir` (one epoch more than it has) to its first training step being
    printed."""
    epochs = len(read_metrics_csv(run_dir / "metrics.csv")) + 1
    cmd = [sys.executable, module.__file__, "--run-dir", str(run_dir), "--epochs", str(epochs), "--log-every", "1",
           *map(str, options)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if re.search(r"step \d+/\d+ \|", line):  # a progress line: "epoch 3/3 step 1/79 | loss ..."
            elapsed = time.perf_counter() - start
            break
    else:
        raise SystemExit(f"the resume of {run_dir} printed no training step")
    proc.terminate()  # SIGTERM: it checkpoints and exits 75, like any pre-emption
    proc.communicate()
    return elapsed


# -- All of it -------------------------------------------------------------------------------------------------------
def measure_models(args, device: torch.device, workdir: Path, data: tuple) -> dict:
    """Each script against its bare loop: throughput, aten ops per step, batch and precision."""
    results = {}
    for name, (module, more) in MODELS.items():
        options, repeats = [*script_options(name, data), "--device", args.device], args.repeats * more
        script = script_throughput(module, workdir / name, options, args.images, repeats)
        bare_loop = bare(name, training_images(name, data, args.images), device, repeats, args.op_steps)
        batch = bare_loop["batch_size"]
        script["ops_per_step"] = script_ops_per_step(module, options, batch, workdir / f"ops-{name}", args.op_steps)
        results[name] = {"script": script, "bare": bare_loop,
                         "ratio": script["images_per_s"] / bare_loop["images_per_s"],
                         "ops_ratio": script["ops_per_step"]["all"] / bare_loop["ops_per_step"]["all"]}
        print(f"  {name}: script {script['images_per_s']:.0f} img/s, bare loop {bare_loop['images_per_s']:.0f} "
              f"img/s (batch {batch})", flush=True)
    return results


def projections(results: dict) -> dict:
    """Seconds `make dcgan` and `make vae` would take on this machine: every epoch's steps at the script's measured
    speed plus its measured epoch end, the start-up, and (DCGAN) its FID evaluations (Inception on a GPU only)."""
    out = {}
    for name, module in (("dcgan", dcgan_train), ("vae_conv", vae_train)):
        defaults = module.build_parser().parse_args([])
        per_epoch = full_batches(FULL_TRAINING_SETS[name], defaults.batch_size) * defaults.batch_size
        script = results[name]["script"]
        seconds = defaults.epochs * (per_epoch / script["images_per_s"] + script["epoch_overhead_s"])
        seconds += results["resume_to_first_step_s"][name]
        if name == "dcgan":
            evaluations = sum(1 for e in range(1, defaults.epochs + 1)
                              if e % defaults.fid_every == 0 or e == defaults.epochs)
            seconds += evaluations * (results["fid"]["per_evaluation_s"] + (results["inception_s"] or 0.0))
        out[f"make {name.split('_')[0]}"] = seconds
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "images": args.images}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mnist, colour, colour_dataset = data = prepare_data(args.images, args.data_dir, workdir)
        results["machine"]["dcgan_data"] = colour_dataset
        print(f"benchmarking on {device} with {args.images:,} images per epoch ...", flush=True)
        results.update(measure_models(args, device, workdir, data))
        results["classic_mlp_vae"] = classic_mlp_vae(mnist, args.images, 128, device, args.repeats)
        results["classic_mlp_vae"]["speedup_of_script"] = (results["vae_mlp"]["script"]["images_per_s"]
                                                           / results["classic_mlp_vae"]["images_per_s"])
        ckpt = checkpoint_write_s(workdir / "vae_conv")
        full_epoch_s = 60_000 / results["vae_conv"]["script"]["images_per_s"]  # a full MNIST epoch at this speed
        ckpt["share_of_wall_time"] = ckpt["seconds"] * (1 / full_epoch_s + 1 / 600)  # per epoch + every 10 min
        results["checkpoint_conv_vae"] = ckpt
        results["resume_to_first_step_s"] = {
            "vae_conv": resume_to_first_step_s(vae_train, workdir / "vae_conv", ["--data-dir", mnist]),
            "dcgan": resume_to_first_step_s(dcgan_train, workdir / "dcgan", ["--data-dir", colour]),
        }
    print(f"FID on {args.fid_features:,} x {args.fid_dim:,} features ...", flush=True)
    results["fid"] = fid_times(args.fid_features, args.fid_dim, device, args.repeats)
    results["inception_s"] = inception_seconds(device)
    results["projected_s"] = projections(results)
    results["targets_met"] = targets(results)
    print_table(results)
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    return 0


def targets(r: dict) -> dict:
    """The goals of issue 20 (script within 5% of its bare loop, in speed and in aten ops; FID in half the time)
    and the older ones (the MLP VAE against the classic pipeline, checkpoints)."""
    met = {}
    for name in MODELS:
        met[f"{name} >= 0.95x bare (img/s)"] = r[name]["ratio"] >= 0.95
        met[f"{name} aten ops <= 1.05x bare"] = r[name]["ops_ratio"] <= 1.05
    met["FID <= 0.5x torchmetrics' time, equal to 1e-5"] = (r["fid"]["ratio"] <= 0.5
                                                            and r["fid"]["relative_difference"] <= 1e-5)
    met["mlp vae >= 3x classic pipeline"] = r["classic_mlp_vae"]["speedup_of_script"] >= 3
    met["checkpointing < 1% of wall time"] = r["checkpoint_conv_vae"]["share_of_wall_time"] < 0.01
    return met


def print_table(r: dict) -> None:
    def row(label: str, *cells) -> None:  # cells: the script's, the bare loop's (or a second number), their ratio
        print(f"{label:46s}" + "".join(f" {cell:>10}" for cell in cells))

    row("measurement", "script", "bare", "ratio")
    row("dcgan data (cifar10, or folder: PNG stand-ins)", r["machine"]["dcgan_data"])
    for name in MODELS:
        script, bare_loop = r[name]["script"], r[name]["bare"]
        row(f"{name} (batch {bare_loop['batch_size']}, amp {bare_loop['amp']}) img/s",
            f"{script['images_per_s']:.0f}", f"{bare_loop['images_per_s']:.0f}", f"{r[name]['ratio']:.3f}")
        ops, bare_ops = script["ops_per_step"], bare_loop["ops_per_step"]
        row(f"{name} aten ops per step", f"{ops['all']:.1f}", f"{bare_ops['all']:.1f}", f"{r[name]['ops_ratio']:.3f}")
        row(f"{name} ... called directly", f"{ops['top_level']:.1f}", f"{bare_ops['top_level']:.1f}")
        row(f"{name} peak RSS (MB); bare: CUDA peak", f"{script['peak_rss_mb']:.0f}",
            *([f"{bare_loop['cuda_peak_mb']:.0f}"] if "cuda_peak_mb" in bare_loop else []))
    f = r["fid"]
    row(f"FID {'x'.join(map(str, f['features']))}: ours / torchmetrics (s)", f"{f['ours_s']:.2f}",
        f"{f['torchmetrics_s']:.2f}", f"{f['ratio']:.3f}")
    row("FID relative difference; one evaluation (s)", f"{f['relative_difference']:.1e}",
        f"{f['per_evaluation_s']:.2f}")
    if r["inception_s"] is not None:
        row("Inception pass, 10,000 images (s)", f"{r['inception_s']:.2f}")
    row("classic MLP VAE pipeline (img/s); script / it", f"{r['classic_mlp_vae']['images_per_s']:.0f}", "",
        f"{r['classic_mlp_vae']['speedup_of_script']:.2f}")
    ck = r["checkpoint_conv_vae"]
    row(f"conv VAE checkpoint write (s, {ck['size_mb']:.1f} MB); share", f"{ck['seconds']:.4f}",
        f"{ck['share_of_wall_time']:.2%}")
    for name, seconds in r["resume_to_first_step_s"].items():
        row(f"start to first step on resume, {name} (s)", f"{seconds:.2f}")
    for command, seconds in r["projected_s"].items():
        note = "" if r["inception_s"] is not None or "dcgan" not in command else " (no Inception pass: CPU)"
        row(f"projected {command} on this machine (min)", f"{seconds / 60:.1f}{note}")
    print()
    for target, met in r["targets_met"].items():
        print(f"  [{'met' if met else 'MISSED'}] {target}")


if __name__ == "__main__":
    run_main(main)
