"""GAN quality benchmark: the recommended DCGAN defaults against the plain DCGAN recipe, by classifier FID
(`make gan-quality`; not part of `make test`). The table it made and how: docs/gan-quality.md.

    python gan_quality.py --data-dir DATA                          # both data sets, both budgets, seeds 0 1 2
    python gan_quality.py --datasets mnist --budgets small --seeds 0
    python gan_quality.py --variant "bs64=--batch-size 64 --ema 0" # add a candidate recipe (dcgan_train.py flags)
    python gan_quality.py --quick --data-dir DATA                  # a smoke run in seconds (tiny models)

Each recipe is trained by dcgan_train.py run as a user runs it, one run at a time in OUT/runs/ (sweep
gan-quality-<dataset>-<budget>: runs/latest-dcgan never moves), at the same batch size and images for every recipe;
a finished run is measured again, not retrained, on a second call. Each exported generator is measured by the
classifier FID against the test set (lower is better), averaged over --draws draws of noise (one draw's FID moves by
0.2 to 0.5 at FIDs near 2), the smallest and largest class share (near 0: a lost mode) and the samples' diversity.
Writes OUT/gan_quality.csv (a row per run), OUT/gan_quality.json (the rows, the means over seeds, each recipe's
ratio to the plain DCGAN, the machine) and OUT/gan_quality_samples.png (64 samples of every recipe). These
classifier FIDs compare runs on one data set, not with published (Inception, CIFAR-10) FIDs.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # `python tools/X.py` puts tools/ on the path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dcgan_train
from common import experiments, gan_metrics
from common.devices import pick_device
from common.errors import UserError, run_main
from common.figures import image_grid, save_figure
from common.files import atomic_write_text, write_csv
from common.flags import DEFAULT_DATA_DIR, DEFAULT_RUNS_ROOT, REPO_ROOT, ArgumentParser, at_least
from common.readers import MODEL_FILES, read_metrics_csv, read_run_config
from common.runs import experiment_settings, settings_differ

# Radford et al. (2015), as pytorch/examples' dcgan trains it: Adam 2e-4 and beta1 0.5 for both nets, batch norm in
# both, BCE with hard labels, no EMA, no augmentation. Every flag whose default may move is spelled out here.
PLAIN_FLAGS = ["--ema", "0", "--d-norm", "batch", "--loss", "bce", "--lr-g", "2e-4", "--lr-d", "2e-4",
               "--beta1", "0.5", "--label-smoothing", "1", "--instance-noise", "0", "--d-steps", "1",
               "--ngf", "64", "--ndf", "64", "--g-act", "relu", "--d-act", "leaky", "--nz", "100",
               "--diffaug", "none"]
RECIPES = {"recommended": [], "plain": PLAIN_FLAGS}
# name: (epochs, --train-limit); 0: the whole training set
BUDGETS = {"small": (3, 12_800), "full": (5, 0)}
QUICK_BUDGETS = {"small": (1, 64)}
QUICK_FLAGS = ["--ngf", "8", "--ndf", "8"]
# The goal set for the defaults: at the same batch size and images, the defaults' classifier FID at most 0.6x the plain
# DCGAN's, with every class at least 3% of the samples.
GOAL_RATIO, GOAL_CLASS_MIN = 0.6, 0.03
DIVERSITY_SAMPLES = 1000
EVAL_SEED = 12345  # the same noise for every generator measured: draw d uses EVAL_SEED + d
COLUMNS = ["recipe", "dataset", "budget", "seed", "batch_size", "images", "cfid", "cfid_draw_sd", "class_min",
           "class_max", "diversity", "wall_s", "train_s", "run_dir"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help="data root (MNIST/raw, FashionMNIST/raw); the classifier is cached in it")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"],
                        choices=list(gan_metrics.SUPPORTED))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS),
                        help="small: 3 epochs of the first 12,800 images; full: 5 epochs of all 60,000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per recipe and seed")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="recommended: dcgan_train.py's defaults; plain: Radford et al.'s DCGAN recipe")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="another recipe: the defaults plus these dcgan_train.py flags (repeatable)")
    parser.add_argument("--batch-size", type=int, default=dcgan_train.build_parser().get_default("batch_size"),
                        help="the batch size of every recipe (dcgan_train.py's default)")
    parser.add_argument("--samples", type=at_least(2), default=5000, help="generated images per draw")
    parser.add_argument("--draws", type=at_least(1), default=3,
                        help="draws of --samples images (other noise each) per generator; the FID is their mean")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--out", default=str(DEFAULT_RUNS_ROOT / "gan-quality"),
                        help="results and the run folders (OUT/runs/)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny models, 1 epoch of 64 images, 200 samples, the first seed")
    return parser


def recipes_of(args) -> dict[str, list[str]]:
    recipes = {name: RECIPES[name] for name in args.recipes}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in recipes:
            raise UserError(f"--variant {spec!r}: give NAME=FLAGS with a new name, e.g. "
                            f"--variant \"bs64=--batch-size 64\"")
        recipes[name] = shlex.split(flags)
    return recipes


# -- Training: dcgan_train.py as a subprocess, one run at a time -----------------------------------------------------
def run_flags(args, recipe_flags, dataset, budget, seed, run_dir: Path) -> list[str]:
    epochs, limit = (QUICK_BUDGETS if args.quick else BUDGETS)[budget]
    flags = ["--dataset", dataset, "--data-dir", args.data_dir, "--epochs", str(epochs),
             "--train-limit", str(limit), "--seed", str(seed), "--batch-size", str(args.batch_size),
             "--device", args.device, "--fid", "off",  # measured here afterwards, the same way for every run
             "--sweep", f"gan-quality-{dataset}-{budget}", "--runs-root", str(run_dir.parent),
             "--run-dir", str(run_dir)]
    return flags + list(recipe_flags) + (QUICK_FLAGS if args.quick else [])


def is_finished(run_dir: Path, flags: list[str]) -> bool:
    """Finished as experiments.RunInfo.finished has it (export.json says the last planned epoch was exported, and the
    model files are there). A folder trained with other settings (say, before the defaults changed) is an error, never
    silently reused: the settings compared are those that define a run (experiment_settings) and its length."""
    if not (run_dir / "config.json").exists():
        return False
    parser = dcgan_train.build_parser()
    wanted = parser.parse_args(flags)
    differing = settings_differ(read_run_config(run_dir, "dcgan")["args"],
                                {**experiment_settings(wanted, parser), "epochs": wanted.epochs})
    if differing:
        raise UserError(f"{run_dir} was trained with other settings ({'; '.join(differing)}); delete it, or pass "
                        f"another --out")
    return experiments.read_run(run_dir, "dcgan").finished


def train(run_dir: Path, flags: list[str], log_path: Path) -> None:
    """Run dcgan_train.py into run_dir (continuing it if a checkpoint is there); its output goes to log_path."""
    print(f"  $ {shlex.join(['python', 'dcgan_train.py', *flags])}", flush=True)
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "dcgan_train.py"), *flags], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise UserError(f"dcgan_train.py exited {proc.returncode} for {run_dir.name} (log: {log_path}): "
                        + " | ".join(tail))


# -- Measuring -------------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """The sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def diversity(images_uint8: torch.Tensor) -> float:
    """gan_metrics.diversity of the first DIVERSITY_SAMPLES images (it takes [n, H, W, C] floats in [0, 1])."""
    return gan_metrics.diversity(images_uint8[:DIVERSITY_SAMPLES].permute(0, 2, 3, 1).double().numpy() / 255)


def score_draws(evaluator, draws: list[torch.Tensor]) -> dict:
    """The classifier FID of each draw of images, as their mean and standard deviation, and the diversity of the
    first; the class shares of all the draws' images together (the smallest share is the mode-collapse number, so
    it gets every sample there is)."""
    scores = [evaluator.score_images(images) for images in draws]
    cfids = [score["cfid"] for score in scores]
    shares = torch.tensor([score["class_shares"] for score in scores], dtype=torch.float64).mean(0)
    return {"cfid": statistics.mean(cfids), "cfid_draw_sd": spread(cfids), "class_min": float(shares.min()),
            "class_max": float(shares.max()), "diversity": diversity(draws[0])}


def measure_run(evaluator, run_dir: Path, n_samples: int, n_draws: int) -> tuple[dict, torch.Tensor]:
    """The row of a trained run's exported generator (but its names), and 64 of its samples."""
    config = read_run_config(run_dir, "dcgan")["args"]
    with warnings.catch_warnings():  # torch.jit.load is deprecated upstream; the coursework's format all the same
        warnings.simplefilter("ignore", FutureWarning)
        generator = torch.jit.load(str(run_dir / MODEL_FILES["dcgan"][0]), map_location=evaluator.device)
    draws = [evaluator.sample(generator, config["nz"], n_samples, seed=EVAL_SEED + d) for d in range(n_draws)]
    metrics = read_metrics_csv(run_dir / "metrics.csv")
    return {"batch_size": config["batch_size"], **score_draws(evaluator, draws),
            "wall_s": sum(row["epoch_time_s"] for row in metrics),
            "train_s": sum(row["train_time_s"] for row in metrics), "run_dir": str(run_dir)}, draws[0][:64]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean classifier FID over seeds per (dataset, budget, recipe), the worst class share, and each recipe's
    ratio to the plain DCGAN at the same budget."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["recipe"] != "real":
            groups.setdefault((row["dataset"], row["budget"], row["recipe"]), []).append(row)
    summary = []
    for (dataset, budget, recipe), members in groups.items():
        column = {key: [m[key] for m in members] for key in ("cfid", "class_min", "class_max", "diversity", "wall_s")}
        summary.append({"dataset": dataset, "budget": budget, "recipe": recipe, "seeds": len(members),
                        "cfid_mean": statistics.mean(column["cfid"]), "cfid_std": spread(column["cfid"]),
                        "class_min": min(column["class_min"]), "class_max": max(column["class_max"]),
                        "diversity": statistics.mean(column["diversity"]), "wall_s": statistics.mean(column["wall_s"])})
    plain = {(s["dataset"], s["budget"]): s["cfid_mean"] for s in summary if s["recipe"] == "plain"}
    for entry in summary:
        base = plain.get((entry["dataset"], entry["budget"]))
        entry["ratio_to_plain"] = entry["cfid_mean"] / base if base is not None else None
        entry["goal_met"] = (base is not None and entry["ratio_to_plain"] <= GOAL_RATIO
                             and entry["class_min"] >= GOAL_CLASS_MIN)
    return summary


def print_tables(rows: list[dict], summary: list[dict]) -> None:
    head = f"{'recipe':<14}{'dataset':<15}{'budget':<7}{'seed':>5}{'cFID':>9}{'draw sd':>8}{'min cls':>9}" \
           f"{'max cls':>9}{'divers.':>9}{'wall s':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['recipe']:<14}{r['dataset']:<15}{r['budget']:<7}{r['seed']:>5}{r['cfid']:>9.2f}"
              f"{r['cfid_draw_sd']:>8.2f}{r['class_min']:>9.1%}{r['class_max']:>9.1%}{r['diversity']:>9.3f}"
              f"{r['wall_s']:>8.0f}")
    head = f"{'recipe':<14}{'dataset':<15}{'budget':<7}{'seeds':>6}{'cFID mean':>11}{'seed sd':>8}{'worst min':>10}" \
           f"{'x plain':>9}  goal (<= {GOAL_RATIO}x plain, every class >= {GOAL_CLASS_MIN:.0%})"
    print("\n" + head + "\n" + "-" * len(head))
    for s in summary:
        ratio = f"{s['ratio_to_plain']:.2f}" if s["ratio_to_plain"] is not None else "-"
        goal = "" if s["recipe"] == "plain" else ("met" if s["goal_met"] else "not met")
        print(f"{s['recipe']:<14}{s['dataset']:<15}{s['budget']:<7}{s['seeds']:>6}{s['cfid_mean']:>11.2f}"
              f"{s['cfid_std']:>8.2f}{s['class_min']:>10.1%}{ratio:>9}  {goal}")


def save_sample_figure(grids: dict[tuple, torch.Tensor], path: Path) -> None:
    """One row per (dataset, budget), one column per recipe (the first seed), 64 samples each."""
    rows = sorted({key[:2] for key in grids})
    cols = list(dict.fromkeys(key[2] for key in grids))
    fig = Figure(figsize=(2.6 * len(cols), 2.8 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for (i, row), (j, col) in ((ij, c) for ij in enumerate(rows) for c in enumerate(cols)):
        axes[i, j].set_axis_off()
        if (*row, col) in grids:
            axes[i, j].imshow(image_grid(grids[(*row, col)].float() / 255, nrow=8), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_title(f"{col}\n{row[0]}, {row[1]} budget", fontsize=8)
    fig.suptitle("64 samples of each recipe's exported G (its first seed); real: training images", fontsize=9)
    save_figure(fig, path)


def real_row(evaluator, dataset: str, train_images: torch.Tensor, args) -> tuple[dict, torch.Tensor]:
    """The floor: as many draws of real training images as of samples, scored against the test set; 64 of them."""
    real = [train_images[d * args.samples:(d + 1) * args.samples] for d in range(args.draws)]
    real = [draw for draw in real if len(draw) == args.samples] or [train_images[:args.samples]]
    return {"recipe": "real", "dataset": dataset, "budget": "", "seed": "", "batch_size": "", "images": len(real[0]),
            **score_draws(evaluator, real), "wall_s": 0.0, "train_s": 0.0, "run_dir": ""}, real[0][:64]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.quick:
        args.seeds, args.budgets, args.samples = args.seeds[:1], ["small"], min(args.samples, 200)
    recipes = recipes_of(args)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    device = pick_device(args.device)
    rows, grids, classifiers, started = [], {}, {}, time.monotonic()
    for dataset in args.datasets:
        evaluator = gan_metrics.ClassifierFID.for_dataset(dataset, args.data_dir, device)
        classifiers[dataset] = {k: v for k, v in evaluator.info.items() if k != "fingerprint"}
        train_images, _ = gan_metrics.load_split(dataset, args.data_dir, train=True)
        row, real_samples = real_row(evaluator, dataset, train_images, args)
        rows.append(row)
        for budget in args.budgets:
            grids[(dataset, budget, "real")] = real_samples
            epochs, limit = (QUICK_BUDGETS if args.quick else BUDGETS)[budget]
            for recipe, recipe_flags in recipes.items():
                for seed in args.seeds:
                    run_dir = out / "runs" / f"{recipe}-{dataset}-{budget}-s{seed}"
                    print(f"{recipe}, {dataset}, {budget} budget, seed {seed}: {run_dir}", flush=True)
                    flags = run_flags(args, recipe_flags, dataset, budget, seed, run_dir)
                    if not is_finished(run_dir, flags):
                        train(run_dir, flags, out / "logs" / f"{run_dir.name}.txt")
                    measured, samples = measure_run(evaluator, run_dir, args.samples, args.draws)
                    n_images = min(limit or len(train_images), len(train_images)) * epochs
                    rows.append({"recipe": recipe, "dataset": dataset, "budget": budget, "seed": seed,
                                 "images": n_images, **measured})
                    print(f"  cFID {measured['cfid']:.2f}, classes {measured['class_min']:.1%}.."
                          f"{measured['class_max']:.1%}, {measured['wall_s']:.0f} s", flush=True)
                    grids.setdefault((dataset, budget, recipe), samples)
    summary = summarise(rows)
    print_tables(rows, summary)
    write_csv(out / "gan_quality.csv", COLUMNS, rows)
    report = {"rows": rows, "summary": summary, "goal": {"ratio": GOAL_RATIO, "class_min": GOAL_CLASS_MIN},
              "recipes": recipes, "samples": args.samples, "draws": args.draws, "quick": args.quick,
              "classifiers": classifiers,
              "machine": {"host": platform.node(), "cpu_threads": torch.get_num_threads(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "device": str(device),
                          "torch": str(torch.__version__)},
              "total_s": time.monotonic() - started}
    atomic_write_text(out / "gan_quality.json", json.dumps(report, indent=2) + "\n")
    save_sample_figure(grids, out / "gan_quality_samples.png")
    print(f"\nwrote {out / 'gan_quality.csv'}, gan_quality.json and gan_quality_samples.png")
    return 0


if __name__ == "__main__":
    run_main(main)
