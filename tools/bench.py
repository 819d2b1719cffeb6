"""Speed and memory of the training scripts on this machine: `make bench` (not part of `make test`).

    python bench.py                       # all measurements, a table on stdout and bench.json
    python bench.py --images 5000         # quicker, noisier

Measured side by side in one run, so the ratios hold even on a noisy shared machine:
  - throughput (training images per second, after a warm-up epoch) of the real scripts, vae_train.py (conv, mlp)
    and dcgan_train.py (32x32x3), each run as a user runs it, against a bare loop of the same models' forward,
    backward and optimizer steps on tensors already in memory (the ceiling on this hardware);
  - the MLP VAE through the classic pipeline (torchvision MNIST, ToTensor() per item, a plain DataLoader);
  - checkpoint write time, and its share of wall time at the defaults (one per epoch, one every 10 minutes);
  - time from process start to the first training step of a resumed run;
  - peak memory (RSS of each script run; CUDA peak of the bare loops when there is a GPU).
Targets: each script >= 0.9x its bare loop; the MLP VAE >= 3x the classic pipeline; checkpoints < 1% of wall time.
Without MNIST or CIFAR-10 at hand, tiny_data.py writes stand-ins in the real file formats (CIFAR-10's as a PNG
folder, as torchvision accepts only the published CIFAR-10 files): the speeds hold, start-up times differ a little.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python tools/X.py` puts tools/ on the path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common
import dcgan_train
import vae_train

sys.path.insert(0, str(common.REPO_ROOT / "tests" / "support"))  # the stand-in data sets are the tests' own
import tiny_data  # noqa: E402

SHARED_MNIST = common.REPO_ROOT.parent / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--images", type=int, default=10_000, help="training images per timed epoch")
    parser.add_argument("--data-dir", default=None,
                        help="a root with MNIST (default: ../shared/data if present, else synthetic files)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--repeats", type=int, default=2, help="bare-loop and classic repeats (the best is kept)")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "bench.json"), help="where to write the JSON")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Data: the real MNIST when at hand; otherwise files in the real formats (speed does not depend on the pixels)


def prepare_data(args, workdir: Path) -> tuple[Path, Path, str]:
    """(root with MNIST, root with the 32x32 colour images, its --dataset: cifar10 if under --data-dir, else
    folder). The stand-ins have the real shapes, so the training loops do the same work on them."""
    mnist = Path(args.data_dir) if args.data_dir else SHARED_MNIST
    if not (mnist / "MNIST" / "raw").is_dir():
        mnist = tiny_data.make_mnist(workdir / "mnist", n_train=args.images, n_test=1000)
    if args.data_dir and (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        return mnist, Path(args.data_dir), "cifar10"
    # CIFAR-10-shaped PNG files: torchvision refuses synthetic CIFAR-10 batches (their MD5 sums cannot match).
    return mnist, tiny_data.make_image_folder(workdir / "colour", n=args.images, size=32), "folder"


def colour_images(root: Path, dataset: str) -> torch.Tensor:
    """The 32x32 colour training set as uint8 [N, 3, 32, 32], as dcgan_train.py reads it."""
    return dcgan_train.load_training_images(dcgan_train.build_parser().parse_args(
        ["--dataset", dataset, "--data-dir", str(root)]))


# ----------------------------------------------------------------------------------------------------------------
# The real scripts, run as a user runs them


def peak_rss_mb_of(cmd: list[str]) -> tuple[float, str]:
    """Run `cmd` to the end; its peak resident memory (MB) and its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-2000:]}")
    return usage.ru_maxrss / 1024, output  # Linux reports kilobytes


def script_throughput(script: str, run_dir: Path, options: list, n_images: int) -> dict:
    cmd = [sys.executable, str(common.REPO_ROOT / script), "--run-dir", str(run_dir), "--epochs", "2",
           "--train-limit", str(n_images), *map(str, options)]
    rss_mb, _ = peak_rss_mb_of(cmd)
    with open(run_dir / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    train_time = float(last["train_time_s"])
    return {"images_per_s": n_images / train_time, "epoch_train_time_s": train_time,
            "epoch_time_s": float(last["epoch_time_s"]), "peak_rss_mb": rss_mb}


# ----------------------------------------------------------------------------------------------------------------
# Bare loops: the same models and optimizers on batches already in memory, nothing else


def timed_steps(step, batches: list, device: torch.device) -> float:
    """Seconds for one pass of `step` over `batches`, after a warm-up pass over the first few."""
    for x in batches[:5]:
        step(x)
    sync(device)
    start = time.perf_counter()
    for x in batches:
        step(x)
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def float_batches(images_uint8: torch.Tensor, batch_size: int, to_float, device: torch.device) -> list:
    """The same images the script trains on, already converted and on the device: all the loop does is learn."""
    images = to_float(images_uint8.to(device))
    return list(images.split(batch_size))


def bare_vae(arch: str, images_uint8: torch.Tensor, batch_size: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = vae_train.VAE(arch, 16, "bernoulli").to(device)
    optimizer = common.adam(model.parameters(), device, lr=1e-3)
    batches = float_batches(images_uint8, batch_size, vae_train.to_float, device)
    n_images = len(images_uint8)

    def step(x):
        recon_nll, kl = vae_train.vae_terms(model, x)
        loss = (recon_nll + kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    best = min(timed_steps(step, batches, device) for _ in range(repeats))
    return {"images_per_s": n_images / best, **cuda_peak(device)}


def bare_dcgan(images_uint8: torch.Tensor, batch_size: int, device: torch.device, repeats: int) -> dict:
    args = dcgan_train.build_parser().parse_args([])
    torch.manual_seed(0)
    generator, discriminator = (m.to(device) for m in dcgan_train.build_models(args, 3))
    # The script's step at its defaults: Adam for both nets and, after every G update, the EMA of G's weights.
    generator_ema = copy.deepcopy(generator) if args.ema > 0 else None
    opt_g = common.adam(generator.parameters(), device, lr=args.lr_g, betas=(args.beta1, 0.999))
    opt_d = common.adam(discriminator.parameters(), device, lr=args.lr_d, betas=(args.beta1, 0.999))
    batches = float_batches(images_uint8, batch_size, dcgan_train.to_float, device)
    n_images = len(images_uint8)

    def step(real):
        fake = generator(torch.randn(len(real), args.nz, 1, 1, device=device))
        loss_d = dcgan_train.d_loss(discriminator(real), discriminator(fake.detach()), "bce", 1.0)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = dcgan_train.g_loss(discriminator(fake), "bce")
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if generator_ema is not None:
            dcgan_train.update_ema(generator_ema, generator, args.ema)

    best = min(timed_steps(step, batches, device) for _ in range(repeats))
    return {"images_per_s": n_images / best, **cuda_peak(device)}


def cuda_peak(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_peak_mb": peak}


# ----------------------------------------------------------------------------------------------------------------
# The classic pipeline a user would otherwise write


def classic_mlp_vae(mnist_root: Path, n_images: int, batch_size: int, device: torch.device, repeats: int) -> dict:
    """torchvision MNIST with ToTensor() per item and a DataLoader (the pytorch/examples vae/main.py way)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    dataset = Subset(datasets.MNIST(str(mnist_root), train=True, transform=transforms.ToTensor()), range(n_images))
    torch.manual_seed(0)
    model = vae_train.VAE("mlp", 16, "bernoulli").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=True):
            recon_nll, kl = vae_train.vae_terms(model, x.to(device))
            loss = (recon_nll + kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return {"images_per_s": n_images / best}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def checkpoint_write_s(run_dir: Path, repeats: int = 5) -> dict:
    """Median time of the scripts' checkpoint write (atomic: temp file, fsync, rename) for the conv VAE's state."""
    ckpt = common.load_latest_checkpoint(run_dir)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        with common.atomic_path(run_dir / f"bench-{i}.pt") as tmp:
            torch.save(ckpt, tmp)
        times.append(time.perf_counter() - start)
        (run_dir / f"bench-{i}.pt").unlink()
    size_mb = common.list_checkpoints(run_dir)[0].stat().st_size / 2 ** 20
    return {"seconds": sorted(times)[len(times) // 2], "size_mb": size_mb}


def resume_to_first_step_s(script: str, run_dir: Path, options: list) -> float:
    """Seconds from starting a resume of `run_dir` to its first training step being printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(common.REPO_ROOT / script), "--run-dir", str(run_dir), "--epochs", "3",
           "--log-every", "1", *map(str, options)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if re.search(r"step \d+/\d+ \|", line):  # a progress line: "epoch 3/3 step 1/79 | loss ..."
            elapsed = time.perf_counter() - start
            break
    else:
        raise SystemExit(f"the resume of {run_dir} printed no training step")
    proc.terminate()  # SIGTERM: it checkpoints and exits 75, like any pre-emption
    proc.communicate()
    return elapsed


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    n, batch = args.images, 128
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "images": n}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mnist, colour, colour_dataset = prepare_data(args, workdir)
        results["machine"]["dcgan_data"] = colour_dataset
        device_flag = ["--device", args.device]
        print(f"benchmarking on {device} with {n:,} images per epoch ...", flush=True)
        for name, script, options in [
            ("vae_conv", "vae_train.py", ["--data-dir", mnist, "--arch", "conv"]),
            ("vae_mlp", "vae_train.py", ["--data-dir", mnist, "--arch", "mlp"]),
            # --fid off: quality evaluation (and the Inception download) is no part of the training speed
            ("dcgan", "dcgan_train.py", ["--data-dir", colour, "--dataset", colour_dataset, "--fid", "off"]),
        ]:
            results[name] = {"script": script_throughput(script, workdir / name, [*options, *device_flag], n)}
            images = (colour_images(colour, colour_dataset) if name == "dcgan" else
                      common.load_images("mnist", mnist, train=True)[0])[:n]
            results[name]["bare"] = (bare_dcgan(images, batch, device, args.repeats) if name == "dcgan" else
                                     bare_vae(name.split("_")[1], images, batch, device, args.repeats))
            results[name]["ratio"] = results[name]["script"]["images_per_s"] / results[name]["bare"]["images_per_s"]
            print(f"  {name}: script {results[name]['script']['images_per_s']:.0f} img/s, bare loop "
                  f"{results[name]['bare']['images_per_s']:.0f} img/s", flush=True)
        results["classic_mlp_vae"] = classic_mlp_vae(mnist, n, batch, device, args.repeats)
        results["classic_mlp_vae"]["speedup_of_script"] = (results["vae_mlp"]["script"]["images_per_s"]
                                                           / results["classic_mlp_vae"]["images_per_s"])

        ckpt = checkpoint_write_s(workdir / "vae_conv")
        full_epoch_s = 60_000 / results["vae_conv"]["script"]["images_per_s"]  # a full MNIST epoch at this speed
        ckpt["share_of_wall_time"] = ckpt["seconds"] * (1 / full_epoch_s + 1 / 600)  # per epoch + every 10 min
        results["checkpoint_conv_vae"] = ckpt
        results["resume_to_first_step_s"] = {
            "vae_conv": resume_to_first_step_s("vae_train.py", workdir / "vae_conv", ["--data-dir", mnist]),
            "dcgan": resume_to_first_step_s("dcgan_train.py", workdir / "dcgan", ["--data-dir", colour]),
        }

    targets = {
        "vae_conv >= 0.9x bare": results["vae_conv"]["ratio"] >= 0.9,
        "vae_mlp >= 0.9x bare": results["vae_mlp"]["ratio"] >= 0.9,
        "dcgan >= 0.9x bare": results["dcgan"]["ratio"] >= 0.9,
        "mlp vae >= 3x classic pipeline": results["classic_mlp_vae"]["speedup_of_script"] >= 3,
        "checkpointing < 1% of wall time": results["checkpoint_conv_vae"]["share_of_wall_time"] < 0.01,
    }
    results["targets_met"] = targets
    print_table(results)
    with common.atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    return 0


def print_table(r: dict) -> None:
    print(f"\n{'measurement':44s} {'value':>12s}")
    print(f"{'dcgan data (cifar10, or folder: PNG stand-ins)':44s} {r['machine']['dcgan_data']:>12s}")
    for name in ("vae_conv", "vae_mlp", "dcgan"):
        print(f"{name + ' script (img/s)':44s} {r[name]['script']['images_per_s']:12.0f}")
        print(f"{name + ' bare loop (img/s)':44s} {r[name]['bare']['images_per_s']:12.0f}")
        print(f"{name + ' script / bare':44s} {r[name]['ratio']:12.3f}")
        print(f"{name + ' peak RSS (MB)':44s} {r[name]['script']['peak_rss_mb']:12.0f}")
        if "cuda_peak_mb" in r[name]["bare"]:
            print(f"{name + ' bare loop CUDA peak (MB)':44s} {r[name]['bare']['cuda_peak_mb']:12.0f}")
    print(f"{'classic MLP VAE pipeline (img/s)':44s} {r['classic_mlp_vae']['images_per_s']:12.0f}")
    print(f"{'mlp script / classic pipeline':44s} {r['classic_mlp_vae']['speedup_of_script']:12.2f}")
    ck = r["checkpoint_conv_vae"]
    print(f"{'conv VAE checkpoint write (s, ' + format(ck['size_mb'], '.1f') + ' MB)':44s} {ck['seconds']:12.4f}")
    print(f"{'checkpoint share of wall time (defaults)':44s} {ck['share_of_wall_time']:12.2%}")
    for name, seconds in r["resume_to_first_step_s"].items():
        print(f"{'start to first step on resume, ' + name + ' (s)':44s} {seconds:12.2f}")
    print()
    for target, met in r["targets_met"].items():
        print(f"  [{'met' if met else 'MISSED'}] {target}")


if __name__ == "__main__":
    common.run_main(main)
