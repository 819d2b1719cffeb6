"""Figures for DCGAN runs, from their CSVs, sample grids and latest checkpoint (works on a run still training).

    python analyze_gan.py runs/latest-dcgan                       # figures into runs/.../figures/
    python analyze_gan.py runs/A runs/B --out runs/compare-AB     # per-run figures, plus A and B overlaid

Per run (RUN_DIR/figures/): losses.png, d_outputs.png, fixed_noise_progression.png, final_samples.png,
diversity.png, nearest_neighbours.png, fid.png (when FID was computed) and summary.json.
Several runs: compare_losses.png, compare_d_outputs.png, compare_diversity.png, compare_fid.png and summary.json
in --out (default runs/compare-<time>/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (SLURM nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

import common  # noqa: E402
import dcgan_train  # noqa: E402

GRID_PADDING = 2   # torchvision.utils.save_image's default, used by dcgan_train.save_samples
GRID_COLUMNS = 8
PROGRESSION_ROWS = 8  # epochs shown in the fixed-noise progression
NEIGHBOUR_QUERIES, NEIGHBOURS = 6, 5


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([row.get(key, math.nan) for row in rows], dtype=float)


def smooth(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), its span about a tenth of the curve."""
    weight = float(np.clip(1 - 10 / max(len(values), 1), 0.0, 0.98))
    out, acc, total = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, total = weight * acc + (1 - weight) * v, weight * total + (1 - weight)
        out[i] = acc / total if total else np.nan
    return out


def save_figure(fig, path: Path) -> None:
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def load_config(run_dir: Path) -> argparse.Namespace:
    return argparse.Namespace(**common.read_run_config(run_dir, "dcgan")["args"])


# ----------------------------------------------------------------------------------------------------------------
# Fixed-noise grids: samples/epoch_NNN.png, 8 columns, 2-pixel padding


def sample_grids(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[1]): p for p in sorted((run_dir / "samples").glob("epoch_*.png"))}


def grid_cells(path: Path, image_size: int) -> np.ndarray:
    """The images of a saved grid, as floats in [0, 1], shape [n, size, size, 3]."""
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    step = image_size + GRID_PADDING
    rows, cols = (grid.shape[0] - GRID_PADDING) // step, (grid.shape[1] - GRID_PADDING) // step
    return np.stack([grid[GRID_PADDING + r * step:GRID_PADDING + r * step + image_size,
                          GRID_PADDING + c * step:GRID_PADDING + c * step + image_size]
                     for r in range(rows) for c in range(cols)])


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS pixel distance within a set of images in [0, 1]; mode collapse drives it towards 0."""
    flat = torch.from_numpy(images.reshape(len(images), -1)).double()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = len(images)
    return float(distances.sum() / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------------------------
# One run


def plot_losses(metrics, steps, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (("loss_d", "tab:blue"), ("loss_g", "tab:orange")):
        if steps:
            x, y = column(steps, "epoch"), column(steps, key)
            ax.plot(x, y, color=color, alpha=0.15, linewidth=0.8)
            ax.plot(x, smooth(y), color=color, alpha=0.5, linewidth=1, label=f"{key} (per {_step_label(steps)})")
        ax.plot(column(metrics, "epoch"), column(metrics, key), "o-", color=color, label=f"{key} (epoch mean)")
    ax.set(xlabel="epoch", ylabel="loss", title="discriminator and generator losses")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _step_label(steps) -> str:
    gap = int(steps[1]["global_step"] - steps[0]["global_step"]) if len(steps) > 1 else 1
    return f"{gap} steps, smoothed"


def plot_d_outputs(metrics, steps, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (("d_real", "D(x), real", "tab:green"), ("d_fake", "D(G(z)), generated", "tab:red")):
        if steps:
            ax.plot(column(steps, "epoch"), smooth(column(steps, key)), color=color, alpha=0.35, linewidth=1)
        ax.plot(column(metrics, "epoch"), column(metrics, key), "o-", color=color, label=label)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="mean D probability", ylim=(-0.02, 1.02),
           title="discriminator outputs (0.5: D cannot tell them apart)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_progression(grids: dict[int, Path], image_size: int, path: Path) -> None:
    """Rows: evenly spaced epochs; columns: the same 8 fixed noise vectors. Identical rows late = collapse."""
    epochs = sorted(grids)
    chosen = sorted({epochs[round(i)] for i in np.linspace(0, len(epochs) - 1, min(PROGRESSION_ROWS, len(epochs)))})
    rows = [grid_cells(grids[e], image_size)[:GRID_COLUMNS] for e in chosen]
    fig, axes = plt.subplots(len(rows), 1, figsize=(GRID_COLUMNS * 0.9, len(rows) * 0.95), squeeze=False)
    for ax, epoch, cells in zip(axes[:, 0], chosen, rows):
        ax.imshow(np.concatenate(list(cells), axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"ep {epoch}", rotation=0, labelpad=22, fontsize=8, va="center")
    axes[0, 0].set_title("fixed noise across epochs (same z in each column)", fontsize=9)
    save_figure(fig, path)


def plot_diversity(per_epoch: dict[int, float], reference: float | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(per_epoch), list(per_epoch.values()), "o-", label="64 fixed-noise samples")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="64 training images")
    ax.set(xlabel="epoch", ylabel="mean pairwise RMS distance", ylim=(0, None),
           title="sample diversity (a drop means mode collapse)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_fid(metrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs, fid = column(metrics, "epoch"), column(metrics, "fid")
    keep = np.isfinite(fid)
    ax.plot(epochs[keep], fid[keep], "o-")
    ax.set(xlabel="epoch", ylabel="FID (lower is better)", title="FID against the training set")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def final_samples(args, ckpt: dict, n: int = 100) -> torch.Tensor:
    """n images in [0, 1] from the checkpoint's sampling G (the EMA one when the run keeps it), in eval mode."""
    generator = dcgan_train.Generator(args.nz, args.ngf, dcgan_train.dataset_channels(args.dataset),
                                      args.image_size, args.g_act)
    generator.load_state_dict(ckpt["generator_ema"] or ckpt["generator"])
    z = torch.randn((n, args.nz, 1, 1), generator=torch.Generator().manual_seed(args.seed + 2))
    return dcgan_train.denorm(generator.eval()(z))


def save_image_grid(images: torch.Tensor, nrow: int, title: str, path: Path) -> None:
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def nearest_neighbours(samples: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the NEIGHBOURS nearest training images (L2 in pixel space) and their RMS distances."""
    flat = samples.flatten(1).double()
    best_d, best_i = None, None
    for start in range(0, len(train), 5000):  # chunks: 60,000 x 3,072 doubles would be 1.5 GB at once
        chunk = train[start:start + 5000].flatten(1).double() / 255
        d = torch.cdist(flat, chunk)
        d_all = d if best_d is None else torch.cat([best_d, d], 1)
        i_all = torch.arange(start, start + len(chunk)).expand(len(flat), -1)
        i_all = i_all if best_i is None else torch.cat([best_i, i_all], 1)
        best_d, order = d_all.topk(min(NEIGHBOURS, d_all.shape[1]), dim=1, largest=False)
        best_i = i_all.gather(1, order)
    return best_i, best_d / math.sqrt(flat.shape[1])


def analyze_run(run_dir: Path, log=print) -> dict:
    args = load_config(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    metrics, steps = common.read_metrics_csv(run_dir / "metrics.csv"), common.read_metrics_csv(run_dir / "steps.csv")
    summary = {"run_dir": str(run_dir), "dataset": args.dataset, "epochs_done": len(metrics),
               "epochs_planned": args.epochs, "figures": [], "skipped": {}}

    def made(name: str) -> None:
        summary["figures"].append(name)

    if metrics or steps:
        plot_losses(metrics, steps, fig_dir / "losses.png")
        plot_d_outputs(metrics, steps, fig_dir / "d_outputs.png")
        made("losses.png")
        made("d_outputs.png")
    else:
        summary["skipped"]["losses.png"] = "no metrics yet"
    if metrics:
        summary["last_epoch"] = {k: v for k, v in metrics[-1].items() if np.isfinite(v)}
    fid = column(metrics, "fid")
    if np.isfinite(fid).any():
        plot_fid(metrics, fig_dir / "fid.png")
        made("fid.png")
        best = int(np.nanargmin(fid))
        summary["best_fid"] = {"epoch": int(metrics[best]["epoch"]), "fid": float(fid[best])}
    else:
        summary["skipped"]["fid.png"] = "no FID in metrics.csv (run without Inception weights)"

    grids = sample_grids(run_dir)
    per_epoch = {e: diversity(grid_cells(p, args.image_size)) for e, p in grids.items()}
    train_images = None
    try:
        train_images = dcgan_train.load_training_images(args)
    except common.UserError as err:
        log(f"warning: training data not found ({err}); nearest-neighbour figure and reference diversity skipped")
    if grids:
        plot_progression(grids, args.image_size, fig_dir / "fixed_noise_progression.png")
        made("fixed_noise_progression.png")
        reference = None
        if train_images is not None:
            pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:64]
            reference = diversity(train_images[pick].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() / 255)
        plot_diversity(per_epoch, reference, fig_dir / "diversity.png")
        made("diversity.png")
        summary["diversity"] = {"per_epoch": per_epoch, "training_images": reference,
                                "last_over_max": per_epoch[max(per_epoch)] / max(max(per_epoch.values()), 1e-12)}
    else:
        summary["skipped"]["fixed_noise_progression.png"] = "no sample grids yet"

    ckpt = common.load_latest_checkpoint(run_dir, log=log, set_aside=False)
    if ckpt is None:
        summary["skipped"]["final_samples.png"] = "no checkpoint yet"
    else:
        summary["checkpoint"] = {"epoch": ckpt["epoch"], "global_step": ckpt["global_step"]}
        samples = final_samples(args, ckpt)
        save_image_grid(samples, 10, f"100 samples after {ckpt['global_step']} steps "
                        f"(epoch {ckpt['epoch']}{', EMA G' if ckpt['generator_ema'] else ''})",
                        fig_dir / "final_samples.png")
        made("final_samples.png")
        if train_images is not None:
            queries = samples[:NEIGHBOUR_QUERIES]
            index, distance = nearest_neighbours(queries, train_images)
            rows = [torch.cat([q[None], train_images[i].float() / 255]) for q, i in zip(queries, index)]
            save_image_grid(torch.cat(rows).expand(-1, 3, -1, -1), NEIGHBOURS + 1,
                            "left: sample; right: its nearest training images (L2). Copies would mean memorisation",
                            fig_dir / "nearest_neighbours.png")
            made("nearest_neighbours.png")
            summary["nearest_neighbour_rms"] = {"median": float(distance[:, 0].median()),
                                                "min": float(distance[:, 0].min())}
    with common.atomic_path(fig_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"{run_dir}: {len(summary['figures'])} figures in {fig_dir}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Several runs overlaid


def compare_runs(run_dirs: list[Path], summaries: list[dict], out_dir: Path, log=print) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [d.name for d in run_dirs]
    metrics = [common.read_metrics_csv(d / "metrics.csv") for d in run_dirs]

    def overlay(keys: list[str], ylabel: str, name: str, title: str) -> None:
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for label, rows in zip(labels, metrics):
                ax.plot(column(rows, "epoch"), column(rows, key), "o-", markersize=3, label=label)
            ax.set(xlabel="epoch", ylabel=f"{key} ({ylabel})" if ylabel else key, title=key)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(title)
        save_figure(fig, out_dir / name)

    overlay(["loss_d", "loss_g"], "epoch mean", "compare_losses.png", "losses")
    overlay(["d_real", "d_fake"], "mean D probability", "compare_d_outputs.png", "discriminator outputs")
    if any(np.isfinite(column(rows, "fid")).any() for rows in metrics):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows in zip(labels, metrics):
            epochs, fid = column(rows, "epoch"), column(rows, "fid")
            ax.plot(epochs[np.isfinite(fid)], fid[np.isfinite(fid)], "o-", label=label)
        ax.set(xlabel="epoch", ylabel="FID (lower is better)", title="FID")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save_figure(fig, out_dir / "compare_fid.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, summary in zip(labels, summaries):
        per_epoch = summary.get("diversity", {}).get("per_epoch", {})
        ax.plot(list(per_epoch), list(per_epoch.values()), "o-", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="mean pairwise RMS distance", ylim=(0, None), title="fixed-noise sample diversity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir / "compare_diversity.png")
    with common.atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps({"runs": summaries}, indent=2, sort_keys=True) + "\n")
    log(f"comparison of {len(run_dirs)} runs in {out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="DCGAN run folders (runs/latest-dcgan works)")
    parser.add_argument("--out", default=None,
                        help="folder for the comparison figures of several runs (default: runs/compare-<time>)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_dirs = [Path(d).resolve() for d in args.run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise common.UserError(f"{run_dir}: no such run folder")
    summaries = [analyze_run(d) for d in run_dirs]
    if len(run_dirs) > 1:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        compare_runs(run_dirs, summaries, Path(args.out or common.DEFAULT_RUNS_ROOT / f"compare-{stamp}"))
    return 0


if __name__ == "__main__":
    common.run_main(main)
