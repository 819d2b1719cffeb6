"""Figures for DCGAN runs: each run's training story, the quality of its milestone checkpoints, runs side by side.

    python analyze_gan.py runs/latest-dcgan                          # figures into that run's figures/
    python analyze_gan.py runs/latest-dcgan --export-epoch 15        # G and D from checkpoints/epoch-015.pt
    python analyze_gan.py runs/*-dcgan-* --out runs/compare/mine     # each run's figures, plus them side by side
    python analyze_gan.py RUN --quality classifier-fid --quality-samples 2000   # a quicker best-epoch search

Per run, into RUN_DIR/figures/: losses.png, d_outputs.png, fixed_noise_progression.png, final_samples.png,
diversity.png, nearest_neighbours.png, fid.png (when the run measured FID), milestones.png (a quality number per
milestone checkpoint, checkpoints/epoch-NNN.pt) and summary.json. The quality number is, by --quality auto: the
Inception FID when its weights are in torch's cache; else the classifier FID (gan_metrics.py) for MNIST and
Fashion-MNIST; else the diversity of the samples. The best milestone is printed with the command that exports it:
--export-epoch E writes DCGAN_model_G.pth and DCGAN_model_D.pth from checkpoints/epoch-EEE.pt (into --out, default
RUN_DIR/exports/epoch-EEE/), exactly as the run's own export at that epoch would have.

Several runs (a shell glob may also match folders that are not DCGAN runs: they are skipped with a note): also, in
--out (default RUNS_ROOT/compare/<sweep name>/), the runs side by side, each labelled by the settings that differ
between them (`d_norm=spectral`, `loss=hinge`), against training images seen: compare_losses.png (one panel per
loss type), compare_d_outputs.png (BCE runs only: a hinge D gives no probabilities), compare_samples.png (every
run's last fixed-noise grid), compare_progression.png, compare_diversity.png (with real images as a reference),
compare_quality.png, summary.csv (also printed) and summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: Figure.savefig draws PNGs with Agg and sets no global backend
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torchvision.utils import make_grid

import common
import dcgan_train
from common import experiments

GRID_PADDING = 2      # torchvision.utils.save_image's default, used by dcgan_train.save_samples
GRID_COLUMNS = 8      # ... with nrow=8
CELL_GAP = 4          # white pixels between the cells of the figures made here, so samples never merge
PROGRESSION_ROWS = 8  # epochs shown in one run's fixed-noise progression
NEIGHBOUR_QUERIES, NEIGHBOURS = 6, 5
DIVERSITY_SAMPLES = 500   # pairwise distances grow with the square of this; 500 gives a stable mean
QUALITY_SEED = 1234       # noise for milestone samples, the same for every milestone and every run
QUALITY_NAMES = {"fid": "Inception FID", "classifier-fid": "classifier FID", "diversity": "diversity"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="DCGAN run folders (runs/latest-dcgan works)")
    parser.add_argument("--out", default=None,
                        help="with several runs: the comparison folder (default: RUNS_ROOT/compare/<sweep name>); "
                             "with --export-epoch: the folder for the two model files")
    parser.add_argument("--export-epoch", type=int, default=None, metavar="E",
                        help="only export DCGAN_model_G.pth and DCGAN_model_D.pth from checkpoints/epoch-EEE.pt")
    parser.add_argument("--quality", default="auto", choices=["auto", "fid", "classifier-fid", "diversity", "off"],
                        help="the quality number per milestone checkpoint (default: auto, see above)")
    parser.add_argument("--quality-samples", type=int, default=5000,
                        help="generated images per milestone for the FIDs (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="for the milestone quality (default: auto: CUDA, then MPS, then CPU)")
    return parser


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([row.get(key, math.nan) for row in rows], dtype=float)


def ema_weight(n_points: int) -> float:
    """The decay of the smoothing below: an effective window of about a tenth of the curve, at least 1 point."""
    return float(np.clip(1 - 10 / max(n_points, 1), 0.0, 0.98))


def smooth(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) with the decay of ema_weight."""
    weight = ema_weight(len(values))
    out, acc, total = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, total = weight * acc + (1 - weight) * v, weight * total + (1 - weight)
        out[i] = acc / total if total else np.nan
    return out


def save_figure(fig: Figure, path: Path) -> None:
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def integer_epochs(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def load_config(run_dir: Path) -> argparse.Namespace:
    return argparse.Namespace(**common.read_run_config(run_dir, "dcgan")["args"])


# ----------------------------------------------------------------------------------------------------------------
# Image grids: the runs' samples/epoch_NNN.png (8 columns, 2-pixel padding), and mosaics with gaps made here


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


def mosaic(rows: list[np.ndarray], gap: int = CELL_GAP) -> np.ndarray:
    """Rows of cells ([n, H, W, 3] each) -> one [H', W', 3] image with `gap` white pixels between all cells."""
    n_cols = max(len(cells) for cells in rows)
    size = rows[0].shape[1]
    out = np.ones((len(rows) * (size + gap) - gap, n_cols * (size + gap) - gap, 3), dtype=np.float32)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            out[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = cell
    return out


def label_rows(ax, labels: list[str], size: int, gap: int = CELL_GAP, fontsize: float = 10) -> None:
    """Put one label left of each mosaic row; no other ticks."""
    ax.set_yticks([r * (size + gap) + size / 2 for r in range(len(labels))], labels, fontsize=fontsize)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def spread(values: list, n: int) -> list:
    """At most n evenly spaced items of `values`, the first and the last among them."""
    return sorted({values[round(i)] for i in np.linspace(0, len(values) - 1, min(n, len(values)))},
                  key=values.index)


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS pixel distance within a set of images in [0, 1]; mode collapse drives it towards 0."""
    flat = torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1)).double()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = len(images)
    return float(distances.sum() / (n * (n - 1)))


def real_diversity(train_images: torch.Tensor) -> float:
    """The same number for 64 random training images: what a generator without collapse should come near."""
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:64]
    return diversity(train_images[pick].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() / 255)


# ----------------------------------------------------------------------------------------------------------------
# One run's figures


def plot_losses(metrics, steps, args, title: str) -> Figure:
    """Epoch means (dots) over the steps.csv rows (faint: each the mean of --log-every steps) and their EMA."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    window = int(args.log_every)
    span_steps = round(window / max(1 - ema_weight(len(steps)), 1e-9))
    for key, name, color in (("loss_d", "D loss", "tab:blue"), ("loss_g", "G loss", "tab:orange")):
        if steps:
            x, y = column(steps, "epoch"), column(steps, key)
            ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8,
                    label=f"{name}: mean of each {window} steps")
            if len(steps) > 1:
                ax.plot(x, smooth(y), color=color, alpha=0.6, linewidth=1.2,
                        label=f"{name}: smoothed (EMA over ~{span_steps:,} steps)")
        ax.plot(column(metrics, "epoch"), column(metrics, key), "o-", color=color, markersize=4,
                label=f"{name}: epoch mean")
    ax.set(xlabel="epoch", ylabel=f"{args.loss} loss", title=title)
    integer_epochs(ax)
    ax.grid(alpha=0.3)
    experiments.legend_below(fig)
    return fig


def plot_d_outputs(metrics, steps, args, title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for key, label, color in (("d_real", "real images", "tab:green"), ("d_fake", "generated images", "tab:red")):
        if len(steps) > 1:
            ax.plot(column(steps, "epoch"), smooth(column(steps, key)), color=color, alpha=0.35, linewidth=1)
        ax.plot(column(metrics, "epoch"), column(metrics, key), "o-", color=color, markersize=4, label=label)
    if args.loss == "bce":
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ylabel = "mean D probability"
    else:  # a hinge D is trained on margins, not probabilities: only the gap between the lines means something
        ylabel = "mean sigmoid(D logit)\n(hinge: not a probability)"
    ax.set(xlabel="epoch", ylabel=ylabel, ylim=(-0.02, 1.02), title=title)
    integer_epochs(ax)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def plot_progression(grids: dict[int, Path], image_size: int, title: str) -> Figure:
    """Rows: evenly spaced epochs; columns: the same 8 fixed noise vectors. Identical rows late = collapse."""
    chosen = spread(sorted(grids), PROGRESSION_ROWS)
    rows = [grid_cells(grids[e], image_size)[:GRID_COLUMNS] for e in chosen]
    fig = Figure(figsize=(7.5, 0.95 * len(rows) + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic(rows))
    label_rows(ax, [f"epoch {e}" for e in chosen], image_size)
    ax.set_title(title, fontsize=10)
    return fig


def plot_diversity(per_epoch: dict[int, float], reference: float | None, title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(list(per_epoch), list(per_epoch.values()), "o-", label="64 fixed-noise samples")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="64 training images")
    ax.set(xlabel="epoch", ylabel="mean pairwise RMS distance", ylim=(0, None), title=title)
    integer_epochs(ax)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def plot_fid(metrics, title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    epochs, fid = column(metrics, "epoch"), column(metrics, "fid")
    keep = np.isfinite(fid)
    ax.plot(epochs[keep], fid[keep], "o-")
    ax.set(xlabel="epoch", ylabel="FID (lower is better)", title=title)
    integer_epochs(ax)
    ax.grid(alpha=0.3)
    return fig


def image_grid_figure(images: torch.Tensor, nrow: int, title: str) -> Figure:
    grid = make_grid(images, nrow=nrow, padding=CELL_GAP, pad_value=1.0).permute(1, 2, 0).numpy()
    fig = Figure(figsize=(7.5, 7.5 * grid.shape[0] / grid.shape[1] + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return fig


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


def run_title(run_dir: Path, args) -> str:
    """The run and its main settings, for figure titles: a figure pasted alone still says what it shows."""
    return (f"{run_dir.name} ({args.dataset}, {args.loss} loss, D norm {args.d_norm}, "
            f"batch {args.batch_size})")


# ----------------------------------------------------------------------------------------------------------------
# Milestones: a quality number per checkpoints/epoch-NNN.pt, and the export of a chosen one


def scripted_generator(ckpt_path: Path):
    """The G that --export-epoch would write from this checkpoint (dcgan_train.export_checkpoint), loaded back:
    the exact model a grader would get, whatever the checkpoint's layout."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; graders still use it
        g_path, _ = dcgan_train.export_checkpoint(ckpt_path, Path(tmp))
        return torch.jit.load(str(g_path), map_location="cpu")


def milestone_checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in sorted((Path(run_dir) / "checkpoints").glob("epoch-*.pt"))}


def export_milestone(run_dir: Path, epoch: int, out_dir: Path | None) -> tuple[Path, Path]:
    """DCGAN_model_G.pth and DCGAN_model_D.pth from checkpoints/epoch-EEE.pt, through the training script's own
    export (the EMA generator when the run keeps one)."""
    milestones = milestone_checkpoints(run_dir)
    if epoch not in milestones:
        have = ", ".join(map(str, milestones)) or "none (the run predates milestones, or has not finished an epoch)"
        raise common.UserError(f"--export-epoch {epoch}: {run_dir} has no checkpoints/epoch-{epoch:03d}.pt; "
                               f"milestone epochs there: {have}")
    out_dir = Path(out_dir) if out_dir else run_dir / "exports" / f"epoch-{epoch:03d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return dcgan_train.export_checkpoint(milestones[epoch], out_dir)


class QualityMeasure:
    """The number per milestone: (name, lower is better?) and __call__(scripted G) -> {"value", ...}."""

    def __init__(self, choice: str, args, device: torch.device, train_images, log=print):
        self.args, self.device, self.log = args, device, log
        self.kind, self.evaluator = None, None
        weights = None
        if choice in ("auto", "fid"):
            weights = dcgan_train.find_inception_weights(None)
            if weights is None and choice == "fid":
                raise common.UserError(f"--quality fid: no Inception weights ({dcgan_train.INCEPTION_FILE}) in "
                                       f"{torch.hub.get_dir()}/checkpoints; use --quality classifier-fid or auto")
        if weights is not None and train_images is not None:
            fid_args = argparse.Namespace(**{**vars(args), "fid_samples": args.quality_samples})
            self.kind, self.evaluator = "fid", dcgan_train.FIDEvaluator(weights, train_images, fid_args, device)
        elif choice in ("auto", "classifier-fid"):
            self.evaluator = self._classifier_fid(args)
            if self.evaluator is not None:
                self.kind = "classifier-fid"
            elif choice == "classifier-fid":
                raise common.UserError(f"--quality classifier-fid: not available for --dataset {args.dataset} "
                                       f"(MNIST and Fashion-MNIST only)")
        if self.kind is None:
            self.kind = "diversity"
        self.name = QUALITY_NAMES[self.kind]
        self.lower_is_better = self.kind != "diversity"
        self.n_samples = args.quality_samples if self.kind != "diversity" else min(args.quality_samples,
                                                                                   DIVERSITY_SAMPLES)

    def _classifier_fid(self, args):
        try:
            from common import gan_metrics
        except ImportError:  # the module is optional: diversity stands in
            return None
        return gan_metrics.ClassifierFID.for_dataset(args.dataset, args.data_dir, self.device, log=self.log)

    @torch.no_grad()
    def __call__(self, generator) -> dict:
        generator = generator.to(self.device).eval()
        if self.kind == "fid":
            fid, inception_score = self.evaluator(generator)
            return {"value": fid, "inception_score": inception_score}
        if self.kind == "classifier-fid":
            scores = self.evaluator(generator, self.args.nz, n_samples=self.args.quality_samples, seed=QUALITY_SEED)
            return {"value": scores["cfid"], "class_min": scores["class_min"], "class_max": scores["class_max"]}
        z = torch.randn((self.n_samples, self.args.nz, 1, 1),
                        generator=torch.Generator().manual_seed(QUALITY_SEED))
        images = dcgan_train.denorm(generator(z.to(self.device))).cpu()
        return {"value": diversity(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())}


def milestone_quality(run_dir: Path, measure: QualityMeasure, log=print) -> list[dict]:
    """The quality of each milestone's exported G (a temporary export: exactly what --export-epoch would write)."""
    rows = []
    for epoch, ckpt_path in milestone_checkpoints(run_dir).items():
        try:
            generator = scripted_generator(ckpt_path)
        except common.UserError as err:  # damaged or misfitting: the other milestones still count
            log(f"  milestone epoch {epoch} left out: {err}")
            continue
        rows.append({"epoch": epoch, "checkpoint": str(ckpt_path.relative_to(run_dir)), **measure(generator)})
        log(f"  milestone epoch {epoch}: {measure.name} {rows[-1]['value']:.4g}")
    return rows


def best_milestone(rows: list[dict], measure_kind: str, reference: float | None) -> dict | None:
    """Lowest FID; for diversity (no quality score of its own) the one closest to real images' diversity."""
    if not rows:
        return None
    if measure_kind == "diversity":
        if reference is None:
            return None
        return min(rows, key=lambda row: abs(row["value"] - reference))
    return min(rows, key=lambda row: row["value"])


def plot_milestones(rows: list[dict], measure: QualityMeasure, best: dict | None, reference: float | None,
                    title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in rows], [r["value"] for r in rows], "o-", label="milestone checkpoints")
    if best is not None:
        ax.plot([best["epoch"]], [best["value"]], "*", markersize=16, color="tab:red",
                label=f"best: epoch {best['epoch']}")
    if measure.kind == "diversity" and reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="64 training images")
    better = "lower is better" if measure.lower_is_better else "closest to the training images is best"
    ax.set(xlabel="epoch", ylabel=f"{measure.name} ({better})", title=title)
    if measure.kind == "diversity":
        ax.set_ylim(0, None)
    integer_epochs(ax)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# One run


def final_samples(generator, nz: int, seed: int, n: int = 100) -> torch.Tensor:
    """n images in [0, 1] from a (scripted) G in eval mode, from noise of their own generator."""
    z = torch.randn((n, nz, 1, 1), generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        return dcgan_train.denorm(generator.eval()(z))


def newest_generator(run_dir: Path, log=print):
    """(scripted sampling G, checkpoint epoch, global step) from the newest checkpoint that loads, or None."""
    paths = common.list_checkpoints(run_dir)
    for path in paths:
        try:
            generator = scripted_generator(path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return generator, ckpt["epoch"], ckpt["global_step"], path
        except FileNotFoundError:  # pruned by a live run while we looked: the next one is older but there
            continue
        except common.UserError as err:  # damaged (its checksum), or not this run's model: said in one line
            log(f"warning: {err}; trying the one before")
        except Exception as err:  # noqa: BLE001  truncated or damaged: try the one before, as a resume would
            log(f"warning: checkpoint {path} does not load ({type(err).__name__}); trying the one before")
    return None


def analyze_run(run_dir: Path, opts, device: torch.device, log=print) -> dict:
    args = load_config(run_dir)
    args.quality_samples = opts.quality_samples
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    metrics, steps = common.read_metrics_csv(run_dir / "metrics.csv"), common.read_metrics_csv(run_dir / "steps.csv")
    title = run_title(run_dir, args)
    summary = {"run_dir": str(run_dir), "dataset": args.dataset, "loss": args.loss, "epochs_done": len(metrics),
               "epochs_planned": args.epochs, "figures": [], "skipped": {}}

    def made(fig: Figure, name: str) -> None:
        save_figure(fig, fig_dir / name)
        summary["figures"].append(name)

    if metrics or steps:
        made(plot_losses(metrics, steps, args, f"{title}\nD and G losses"), "losses.png")
        made(plot_d_outputs(metrics, steps, args, f"{title}\ndiscriminator outputs"), "d_outputs.png")
    else:
        summary["skipped"]["losses.png"] = "no metrics yet"
    if metrics:
        summary["last_epoch"] = {k: v for k, v in metrics[-1].items() if np.isfinite(v)}
    fid = column(metrics, "fid")
    if np.isfinite(fid).any():
        made(plot_fid(metrics, f"{title}\nFID against the training set"), "fid.png")
        best = int(np.nanargmin(fid))
        summary["best_fid"] = {"epoch": int(metrics[best]["epoch"]), "fid": float(fid[best])}
    else:
        summary["skipped"]["fid.png"] = "no FID in metrics.csv (run without Inception weights)"

    train_images = None
    try:
        train_images = dcgan_train.load_training_images(args)
    except common.UserError as err:
        log(f"warning: training data not found ({err}); nearest-neighbour figure and reference diversity skipped")
    reference = real_diversity(train_images) if train_images is not None else None

    grids = sample_grids(run_dir)
    if grids:
        per_epoch = {e: diversity(grid_cells(p, args.image_size)) for e, p in grids.items()}
        made(plot_progression(grids, args.image_size, f"{title}\nthe same 8 fixed noise vectors (columns) "
                              f"across epochs"), "fixed_noise_progression.png")
        made(plot_diversity(per_epoch, reference, f"{title}\nsample diversity (a drop means mode collapse)"),
             "diversity.png")
        summary["diversity"] = {"per_epoch": per_epoch, "training_images": reference,
                                "last_over_max": per_epoch[max(per_epoch)] / max(max(per_epoch.values()), 1e-12)}
    else:
        summary["skipped"]["fixed_noise_progression.png"] = "no sample grids yet"

    newest = newest_generator(run_dir, log)
    if newest is None:
        summary["skipped"]["final_samples.png"] = "no checkpoint yet"
    else:
        generator, epoch, global_step, _ = newest
        summary["checkpoint"] = {"epoch": epoch, "global_step": global_step}
        samples = final_samples(generator, args.nz, args.seed)
        ema = ", EMA G" if args.ema > 0 else ""
        made(image_grid_figure(samples, 10, f"{run_dir.name}: 100 samples after {global_step:,} steps "
                               f"(epoch {epoch}{ema})"), "final_samples.png")
        if train_images is not None:
            queries = samples[:NEIGHBOUR_QUERIES]
            index, distance = nearest_neighbours(queries, train_images)
            rows = [torch.cat([q[None], train_images[i].float() / 255]) for q, i in zip(queries, index)]
            made(image_grid_figure(torch.cat(rows).expand(-1, 3, -1, -1), NEIGHBOURS + 1,
                                   f"{run_dir.name}: left, a sample; right, its nearest training images (L2).\n"
                                   f"Copies would mean memorisation"), "nearest_neighbours.png")
            summary["nearest_neighbour_rms"] = {"median": float(distance[:, 0].median()),
                                                "min": float(distance[:, 0].min())}

    if opts.quality != "off" and milestone_checkpoints(run_dir):
        measure = QualityMeasure(opts.quality, args, device, train_images, log)
        log(f"{run_dir.name}: {measure.name} of each milestone checkpoint ({measure.n_samples} samples)")
        rows = milestone_quality(run_dir, measure, log)
        best = best_milestone(rows, measure.kind, reference)
        made(plot_milestones(rows, measure, best, reference, f"{title}\n{measure.name} per milestone checkpoint"),
             "milestones.png")
        summary["milestones"] = {"measure": measure.name, "kind": measure.kind, "rows": rows, "best": best,
                                 "training_images": reference}
        if best is not None:
            log(f"  best milestone: epoch {best['epoch']} ({measure.name} {best['value']:.4g}); export it with: "
                f"python analyze_gan.py {run_dir} --export-epoch {best['epoch']}")
    elif opts.quality != "off":
        summary["skipped"]["milestones.png"] = "no milestone checkpoints (checkpoints/epoch-NNN.pt)"
    common.atomic_write_text(fig_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"{run_dir}: {len(summary['figures'])} figures in {fig_dir}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Several runs side by side


def epochs_to_images(run: experiments.RunInfo, x_name: str) -> dict[int, float]:
    """Epoch -> the comparison's x value at its end (images seen, or the epoch itself)."""
    if x_name == "epoch":
        return {int(row["epoch"]): row["epoch"] for row in run.metrics}
    return {int(row["epoch"]): seen for row, seen in zip(run.metrics, run.images_seen())}


def compare_losses(runs, labels, x_name, xs, title: str) -> Figure:
    """Rows: D loss, G loss; one column per loss type (BCE and hinge values are not on one scale)."""
    losses = sorted({run.args["loss"] for run in runs})
    fig = Figure(figsize=(4.6 * len(losses) + 0.6, 6.4), layout="constrained")
    axes = fig.subplots(2, len(losses), squeeze=False, sharex=True)
    for col, loss in enumerate(losses):
        for i, (run, label, x) in enumerate(zip(runs, labels, xs)):
            if run.args["loss"] != loss:
                continue
            for row, key in enumerate(("loss_d", "loss_g")):
                axes[row, col].plot(x, column(run.metrics, key), "o-", markersize=3, color=f"C{i}", label=label)
        g_name = "-log D(G(z))" if loss == "bce" else "-D(G(z))"
        axes[0, col].set(title=f"D loss ({loss})", ylabel=f"{loss} loss, epoch mean")
        axes[1, col].set(title=f"G loss ({loss}: {g_name})", ylabel=f"{loss} loss, epoch mean")
        experiments.label_x_axis(axes[1, col], x_name)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    experiments.legend_below(fig)
    return fig


def compare_d_outputs(runs, labels, x_name, xs, title: str) -> Figure | None:
    """D's mean probability on real and on generated images, BCE runs only."""
    chosen = [i for i, run in enumerate(runs) if run.args["loss"] == "bce"]
    if not chosen:
        return None
    fig = Figure(figsize=(9, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, name in zip(axes, ("d_real", "d_fake"), ("D(x), real images", "D(G(z)), generated images")):
        for i in chosen:
            ax.plot(xs[i], column(runs[i].metrics, key), "o-", markersize=3, color=f"C{i}", label=labels[i])
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ax.set(title=name, ylim=(-0.02, 1.02))
        experiments.label_x_axis(ax, x_name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean D probability, epoch mean")
    fig.suptitle(title)
    experiments.legend_below(fig)
    return fig


def panel_layout(n: int) -> tuple[int, int]:
    cols = n if n <= 2 else 2 if n == 4 else 3
    return math.ceil(n / cols), cols


def wrapped(label: str, width: int = 34) -> str:
    return textwrap.fill(label, width)


def compare_samples(runs, labels, title: str, rows: int = 4, cols: int = 6) -> Figure | None:
    """Each run's last fixed-noise grid (its first rows x cols cells), one panel per run, same noise positions."""
    have = [(run, label, sample_grids(run.dir)) for run, label in zip(runs, labels)]
    have = [(run, label, grids) for run, label, grids in have if grids]
    if not have:
        return None
    n_rows, n_cols = panel_layout(len(have))
    fig = Figure(figsize=(3.7 * n_cols, 2.9 * n_rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, (run, label, grids) in zip(axes, have):
        last = max(grids)
        cells = grid_cells(grids[last], run.args["image_size"])[:rows * GRID_COLUMNS]
        cells = cells.reshape(-1, GRID_COLUMNS, *cells.shape[1:])[:, :cols]
        ax.imshow(mosaic(list(cells)))
        ax.set_axis_off()
        ax.set_title(f"{wrapped(label)}\n(epoch {last})", fontsize=10)
    for ax in axes[len(have):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def compare_progression(runs, labels, title: str, n_epochs: int = 4, n_noise: int = 5) -> Figure | None:
    """Per run, one panel: rows are evenly spaced epochs, columns the first n_noise fixed noise vectors."""
    have = [(run, label, sample_grids(run.dir)) for run, label in zip(runs, labels)]
    have = [(run, label, grids) for run, label, grids in have if grids]
    if not have:
        return None
    n_rows, n_cols = panel_layout(len(have))
    shown = max(min(n_epochs, len(grids)) for _, _, grids in have)  # rows of the tallest panel
    fig = Figure(figsize=(4.2 * n_cols, (0.7 * shown + 0.6) * n_rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, (run, label, grids) in zip(axes, have):
        chosen = spread(sorted(grids), n_epochs)
        size = run.args["image_size"]
        ax.imshow(mosaic([grid_cells(grids[e], size)[:n_noise] for e in chosen]))
        label_rows(ax, [f"epoch {e}" for e in chosen], size, fontsize=9)
        ax.set_title(wrapped(label), fontsize=10)
    for ax in axes[len(have):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def compare_diversity(runs, labels, summaries, x_name, title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (run, label, summary) in enumerate(zip(runs, labels, summaries)):
        per_epoch = summary.get("diversity", {}).get("per_epoch", {})
        at = epochs_to_images(run, x_name)
        points = [(at[int(e)], v) for e, v in per_epoch.items() if int(e) in at]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, color=f"C{i}", label=label)
    references = {s["dataset"]: s["diversity"]["training_images"] for s in summaries
                  if s.get("diversity", {}).get("training_images") is not None}
    for dataset, value in references.items():
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=f"64 {dataset} training images")
    ax.set(ylabel="mean pairwise RMS distance", ylim=(0, None), title=title)
    experiments.label_x_axis(ax, x_name)
    ax.grid(alpha=0.3)
    experiments.legend_below(fig)
    return fig


def compare_quality(runs, labels, summaries, x_name, title: str) -> Figure | None:
    """The milestone quality of each run (and the training-time Inception FID, when measured), against x."""
    with_fid = [i for i, run in enumerate(runs) if np.isfinite(column(run.metrics, "fid")).any()]
    with_milestones = [i for i, s in enumerate(summaries) if s.get("milestones", {}).get("rows")]
    panels = [("fid", "Inception FID during training", "FID (lower is better)")] if with_fid else []
    if with_milestones:
        measure = summaries[with_milestones[0]]["milestones"]
        better = "lower is better" if measure["kind"] != "diversity" else "closest to training images is best"
        panels.append(("milestones", f"{measure['measure']} per milestone checkpoint",
                       f"{measure['measure']} ({better})"))
    if not panels:
        return None
    fig = Figure(figsize=(4.6 * len(panels) + 1.5, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, (kind, name, ylabel) in zip(axes, panels):
        for i in (with_fid if kind == "fid" else with_milestones):
            at = epochs_to_images(runs[i], x_name)
            if kind == "fid":
                points = [(at[int(row["epoch"])], row["fid"]) for row in runs[i].metrics if math.isfinite(row["fid"])]
            else:
                points = [(at[row["epoch"]], row["value"]) for row in summaries[i]["milestones"]["rows"]
                          if row["epoch"] in at]
            if points:
                ax.plot(*zip(*points), "o-", markersize=4, color=f"C{i}", label=labels[i])
        if kind == "milestones" and summaries[with_milestones[0]]["milestones"]["kind"] == "diversity":
            reference = summaries[with_milestones[0]]["milestones"].get("training_images")
            if reference is not None:
                ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="64 training images")
            ax.set_ylim(0, None)
        ax.set(title=name, ylabel=ylabel)
        experiments.label_x_axis(ax, x_name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    experiments.legend_below(fig)
    return fig


TABLE_COLUMNS = ["label", "loss", "epochs", "images_seen", "loss_d", "loss_g", "d_real", "d_fake", "diversity",
                 "quality_measure", "quality", "best_milestone_epoch", "best_fid", "status", "run_dir"]


def comparison_rows(runs, labels, summaries) -> list[dict]:
    rows = []
    for run, label, summary in zip(runs, labels, summaries):
        last = run.metrics[-1] if run.metrics else {}
        per_epoch = summary.get("diversity", {}).get("per_epoch", {})
        milestones = summary.get("milestones", {})
        quality_rows = milestones.get("rows") or []
        rows.append({"label": label, "loss": run.args["loss"], "epochs": run.epochs_done,
                     "images_seen": int(run.total_images_seen()),
                     **{k: last.get(k, math.nan) for k in ("loss_d", "loss_g", "d_real", "d_fake")},
                     "diversity": per_epoch[max(per_epoch)] if per_epoch else math.nan,
                     "quality_measure": milestones.get("measure", ""),
                     "quality": quality_rows[-1]["value"] if quality_rows else math.nan,
                     "best_milestone_epoch": (milestones.get("best") or {}).get("epoch", ""),
                     "best_fid": (summary.get("best_fid") or {}).get("fid", math.nan),
                     "status": run.status(), "run_dir": str(run.dir)})
    return rows


def print_table(rows: list[dict], log=print) -> None:
    width = max(len(row["label"]) for row in rows)
    measure = next((row["quality_measure"] for row in rows if row["quality_measure"]), "quality")
    log(f"\n{'run':<{width}}  loss   epochs  images seen  loss_d  loss_g  D(x)   D(G(z))  diversity  "
        f"{measure} (last milestone)")
    for row in rows:
        log(f"{row['label']:<{width}}  {row['loss']:<5}  {row['epochs']:>6}  {row['images_seen']:>11,}  "
            f"{row['loss_d']:>6.3f}  {row['loss_g']:>6.3f}  {row['d_real']:>5.3f}  {row['d_fake']:>7.3f}  "
            f"{row['diversity']:>9.4f}  {row['quality']:.4g}")


def compare_runs(runs: list[experiments.RunInfo], summaries: list[dict], out_dir: Path, log=print) -> dict:
    """The comparison figures and table in out_dir; returns what was made (for report.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = experiments.run_labels(runs)
    x_name, xs = experiments.x_axis(runs)
    sweep = {run.sweep for run in runs}
    what = f"sweep {sweep.pop()}" if len(sweep) == 1 and None not in sweep else f"{len(runs)} DCGAN runs"
    made = {"labels": labels, "runs": [str(run.dir) for run in runs], "x_axis": x_name, "figures": [],
            "skipped": {}}

    def save(fig: Figure | None, name: str, why_not: str = "") -> None:
        if fig is None:
            made["skipped"][name] = why_not
            log(f"note: {name} not made: {why_not}")
            return
        save_figure(fig, out_dir / name)
        made["figures"].append(name)

    save(compare_losses(runs, labels, x_name, xs, f"{what}: losses"), "compare_losses.png")
    save(compare_d_outputs(runs, labels, x_name, xs, f"{what}: discriminator outputs (BCE runs)"),
         "compare_d_outputs.png", "no BCE run (a hinge D gives no probabilities)")
    save(compare_samples(runs, labels, f"{what}: samples from the fixed noise at the last epoch"),
         "compare_samples.png", "no sample grids")
    save(compare_progression(runs, labels, f"{what}: the same fixed noise across epochs"),
         "compare_progression.png", "no sample grids")
    save(compare_diversity(runs, labels, summaries, x_name, f"{what}: fixed-noise sample diversity"),
         "compare_diversity.png")
    save(compare_quality(runs, labels, summaries, x_name, f"{what}: sample quality"), "compare_quality.png",
         "no FID in metrics.csv and no milestone quality")
    rows = comparison_rows(runs, labels, summaries)
    common.write_csv(out_dir / "summary.csv", TABLE_COLUMNS, rows)
    made["table"] = rows
    common.atomic_write_text(out_dir / "summary.json",
                             json.dumps({**made, "summaries": summaries}, indent=2, sort_keys=True, default=str) + "\n")
    print_table(rows, log)
    log(f"comparison of {len(runs)} runs in {out_dir}")
    return made


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.quality_samples < 2:
        raise common.UserError("--quality-samples must be at least 2")
    runs = experiments.collect_runs(opts.run_dirs, "dcgan")
    if opts.export_epoch is not None:
        if len(runs) != 1:
            raise common.UserError("--export-epoch takes one run folder")
        g_path, d_path = export_milestone(runs[0].dir, opts.export_epoch, opts.out)
        print(f"exported {g_path} and {d_path} from {runs[0].name}, epoch {opts.export_epoch}. Check and pack them "
              f"with: python check_submission.py --gen {g_path} --disc {d_path} --figures report/figures --zip CW2.zip",
              flush=True)
        return 0
    device = common.pick_device(opts.device)
    summaries = [analyze_run(run.dir, opts, device) for run in runs]
    if len(runs) > 1:
        compare_runs(runs, summaries, Path(opts.out) if opts.out else experiments.default_compare_dir(runs, "dcgan"))
    return 0


if __name__ == "__main__":
    common.run_main(main)
