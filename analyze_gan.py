"""Figures for DCGAN runs: each run's training story, the quality of its milestone checkpoints, runs side by side.

    python analyze_gan.py runs/latest-dcgan                          # figures into that run's figures/
    python analyze_gan.py runs/latest-dcgan --export-epoch 15        # G and D from checkpoints/epoch-015.pt
    python analyze_gan.py runs/*-dcgan-* --out runs/compare/mine     # each run's figures, plus them side by side
    python analyze_gan.py RUN --quality classifier-fid --quality-samples 2000   # a quicker best-epoch search

Per run, into RUN_DIR/figures/: losses.png, d_outputs.png, fixed_noise_progression.png, final_samples.png,
diversity.png, nearest_neighbours.png, fid.png (when the run measured FID), milestones.png and summary.json. The
quality number per milestone checkpoint (checkpoints/epoch-NNN.pt) is, by --quality auto, the Inception FID when
its weights are in torch's cache, else the classifier FID (gan_metrics.py) for MNIST and Fashion-MNIST, else the
samples' diversity; the best is printed with the command that exports it (--export-epoch E: G and D from
epoch-EEE.pt into --out, default RUN_DIR/exports/epoch-EEE/, as the run's own export would have). An analysis of
the same checkpoints, options and code is reused (summary.json's analysis_key).

Several runs (folders of a glob that are not DCGAN runs are skipped with a note): also, in --out (default
RUNS_ROOT/compare/<sweep name>/), the runs side by side, labelled by the settings that differ (`loss=hinge`):
compare_losses.png, compare_d_outputs.png (BCE runs only), compare_samples.png, compare_progression.png,
compare_diversity.png, compare_quality.png (FIDs, when measured), summary.csv (also printed) and summary.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: Figure.savefig draws PNGs with Agg and sets no global backend

import dcgan_train
from common import experiments, figures, files, gan_metrics, readers, sweep_figures
from common.checkpoints import load_checkpoint, load_latest_checkpoint
from common.devices import pick_device
from common.errors import UserError, run_main
from common.flags import at_least
from common.progress import still_running

PROGRESSION_ROWS = 8  # epochs shown in one run's fixed-noise progression
NEIGHBOUR_QUERIES, NEIGHBOURS = 6, 5
DIVERSITY_SAMPLES = 500   # pairwise distances grow with the square of this; 500 gives a stable mean
QUALITY_SEED = 1234       # noise for milestone samples, the same for every milestone and every run
QUALITY_NAMES = {"fid": "Inception FID", "classifier-fid": "classifier FID", "diversity": "diversity"}


def build_parser() -> argparse.ArgumentParser:
    parser = experiments.analysis_parser(__doc__, "dcgan", "; with --export-epoch: the folder for the two model files")
    parser.add_argument("--export-epoch", type=int, default=None, metavar="E",
                        help="only export DCGAN_model_G.pth and DCGAN_model_D.pth from checkpoints/epoch-EEE.pt")
    parser.add_argument("--quality", default="auto", choices=["auto", "fid", "classifier-fid", "diversity", "off"],
                        help="the quality number per milestone checkpoint (default: auto, see above)")
    parser.add_argument("--quality-samples", type=at_least(2), default=5000,
                        help="generated images per milestone for the FIDs (default: %(default)s)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# One run's figures


def plot_losses(metrics, steps, args, title: str) -> Figure:
    """Epoch means (dots) over the steps.csv rows (faint: each the mean of --log-every steps) and, when there are
    enough rows for it to differ from them (figures.step_curves), their EMA. Rows no more frequent than the epochs
    (--log-every at least an epoch's steps) would lie under the epoch means, unseen but in the legend: left out."""
    fig, ax = figures.one_panel(height=5)
    window = int(args.log_every)
    span_steps = round(window / max(1 - figures.ema_weight(len(steps)), 1e-9))
    curves = figures.step_curves(len(steps), len(metrics))
    smoothed = curves == "smoothed"
    for key, name, color in (("loss_d", "D loss", "tab:blue"), ("loss_g", "G loss", "tab:orange")):
        if curves != "none":
            x, y = figures.column(steps, "epoch"), figures.column(steps, key)
            ax.plot(x, y, color=color, alpha=0.2 if smoothed else 0.5, linewidth=0.8,
                    label=f"{name}: mean of each {window} steps")
            if smoothed:
                ax.plot(x, figures.smooth(y), color=color, alpha=0.6, linewidth=1.2,
                        label=f"{name}: smoothed (EMA over ~{span_steps:,} steps)")
        ax.plot(figures.column(metrics, "epoch"), figures.column(metrics, key), "o-", color=color, markersize=4,
                label=f"{name}: epoch mean")
    ax.set(ylabel=f"{args.loss} loss", title=title)
    figures.epoch_axis(ax, legend=False)
    return figures.finish_panels(fig)


def plot_d_outputs(metrics, steps, args, title: str) -> Figure:
    fig, ax = figures.one_panel()
    for key, label, color in (("d_real", "D(x): real images, in D's steps", "tab:green"),
                              ("d_fake", "D(G(z)): generated images, in G's steps", "tab:red")):
        if figures.step_curves(len(steps), len(metrics)) != "none":  # smoothed when there are enough rows
            ax.plot(figures.column(steps, "epoch"), figures.smooth(figures.column(steps, key)), color=color,
                    alpha=0.35, linewidth=1)
        ax.plot(figures.column(metrics, "epoch"), figures.column(metrics, key), "o-", color=color, markersize=4,
                label=label)
    if args.loss == "bce":
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ylabel = "mean D probability"
    else:  # a hinge D is trained on margins, not probabilities: only the gap between the lines means something
        ylabel = "mean sigmoid(D logit)\n(hinge: not a probability)"
    ax.set(ylabel=ylabel, ylim=(-0.02, 1.02), title=title)
    figures.epoch_axis(ax)
    return fig


def image_grid_figure(images: torch.Tensor, nrow: int, title: str, first_column_apart: bool = False) -> Figure:
    """A square grid of images in rows of nrow; first_column_apart: a red line sets the first column off."""
    fig = figures.image_panels([("", images)], nrow, title, inches=7.5, gap=figures.CELL_GAP)
    if first_column_apart:  # in the white gap after the first column (pixel centres are at integers)
        fig.axes[0].axvline(images.shape[-1] + 1.5 * figures.CELL_GAP - 0.5, color="tab:red", linewidth=2.5)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Milestones: a quality number per checkpoints/epoch-NNN.pt, and the export of a chosen one


def scripted_generator(ckpt: dict, run_dir: Path, source=None):
    """The G that --export-epoch would write from this checkpoint (dcgan_train.export_model), loaded back: the
    exact model a grader would get, whatever the checkpoint's layout."""
    generator, _ = dcgan_train.models_from_checkpoint(ckpt, run_dir, source)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; graders still use it
        dcgan_train.export_model(generator, Path(tmp) / "G.pth")
        return torch.jit.load(str(Path(tmp) / "G.pth"), map_location="cpu")


def milestone_checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in sorted((Path(run_dir) / "checkpoints").glob("epoch-*.pt"))}


def export_milestone(run_dir: Path, epoch: int, out_dir: Path | None) -> tuple[Path, Path]:
    """DCGAN_model_G.pth and DCGAN_model_D.pth from checkpoints/epoch-EEE.pt, through the training script's own
    export (the EMA generator when the run keeps one)."""
    milestones = milestone_checkpoints(run_dir)
    if epoch not in milestones:
        have = ", ".join(map(str, milestones)) or "none (the run predates milestones, or has not finished an epoch)"
        raise UserError(f"--export-epoch {epoch}: {run_dir} has no checkpoints/epoch-{epoch:03d}.pt; "
                        f"milestone epochs there: {have}")
    out_dir = Path(out_dir) if out_dir else run_dir / "exports" / f"epoch-{epoch:03d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return dcgan_train.export_checkpoint(milestones[epoch], out_dir)


class QualityMeasure:
    """The number per milestone: its kind, its name, whether lower is better, and __call__(scripted G) -> {"value",
    ...}. --quality auto: the Inception FID when its weights are there, else the classifier FID where the data set
    has one, else the samples' diversity."""

    def __init__(self, choice: str, args, n_samples: int, device: torch.device, train_images, log=print):
        self.args, self.device, self.kind = args, device, "diversity"
        weights = gan_metrics.find_inception_weights(None) if choice in ("auto", "fid") else None
        if weights is None and choice == "fid":
            raise UserError(f"--quality fid: no Inception weights ({gan_metrics.INCEPTION_FILE}) in "
                            f"{torch.hub.get_dir()}/checkpoints; use --quality classifier-fid or auto")
        if weights is not None and train_images is not None:
            fid_args = argparse.Namespace(**{**vars(args), "fid_samples": n_samples})
            self.kind, self.evaluator = "fid", gan_metrics.FIDEvaluator(weights, train_images, fid_args, device)
        elif choice in ("auto", "classifier-fid"):
            self.evaluator = gan_metrics.ClassifierFID.for_dataset(args.dataset, args.data_dir, device, log=log)
            if self.evaluator is not None:
                self.kind = "classifier-fid"
            elif choice == "classifier-fid":
                raise UserError(f"--quality classifier-fid: not available for --dataset {args.dataset} "
                                f"(MNIST and Fashion-MNIST only)")
        self.name = QUALITY_NAMES[self.kind]
        self.lower_is_better = self.kind != "diversity"
        self.n_samples = n_samples if self.lower_is_better else min(n_samples, DIVERSITY_SAMPLES)

    @torch.no_grad()
    def __call__(self, generator) -> dict:
        generator = generator.to(self.device).eval()
        if self.kind == "fid":
            fid, inception_score = self.evaluator(generator)
            return {"value": fid, "inception_score": inception_score}
        if self.kind == "classifier-fid":
            scores = self.evaluator(generator, self.args.nz, n_samples=self.n_samples, seed=QUALITY_SEED)
            return {"value": scores["cfid"], "class_min": scores["class_min"], "class_max": scores["class_max"]}
        images = dcgan_train.denorm(gan_metrics.sample(generator, self.args.nz, self.n_samples, QUALITY_SEED,
                                                       batch_size=self.n_samples))
        return {"value": gan_metrics.diversity(images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())}


def milestone_quality(run_dir: Path, measure: QualityMeasure, log=print) -> list[dict]:
    """The quality of each milestone's exported G (a temporary export: exactly what --export-epoch would write)."""
    rows = []
    for epoch, ckpt_path in milestone_checkpoints(run_dir).items():
        try:  # checksum verified; damaged or misfitting: the other milestones still count
            generator = scripted_generator(load_checkpoint(ckpt_path), run_dir, ckpt_path)
        except UserError as err:
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


def plot_milestones(rows: list[dict], measure: QualityMeasure, best: dict | None, reference: float | None) -> Figure:
    fig, ax = figures.one_panel()
    ax.plot([r["epoch"] for r in rows], [r["value"] for r in rows], "o-", label="milestone checkpoints")
    if best is not None:
        ax.plot([best["epoch"]], [best["value"]], "*", markersize=16, color="tab:red",
                label=f"best: epoch {best['epoch']}")
    if measure.kind == "diversity" and reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="64 training images")
    better = "lower is better" if measure.lower_is_better else "closest to the training images is best"
    ax.set(ylabel=f"{measure.name} ({better})", title=f"{measure.name[:1].upper()}{measure.name[1:]} per milestone "
                                                      f"checkpoint")
    if measure.kind == "diversity":
        ax.set_ylim(0, figures.top_with_room([*(r["value"] for r in rows), reference]))
    figures.epoch_axis(ax)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# One run


def final_samples(generator, nz: int, seed: int, n: int = 100) -> torch.Tensor:
    """n images in [0, 1] from a (scripted) G in eval mode, from noise of their own generator."""
    return dcgan_train.denorm(gan_metrics.sample(generator, nz, n, seed + 2, batch_size=n))


def newest_generator(run_dir: Path, log=print):
    """(scripted sampling G, checkpoint epoch, global step) from the newest checkpoint that loads, or None."""
    try:  # the one checkpoint reader: damaged files are skipped (and left where they are: this only reads)
        ckpt = load_latest_checkpoint(run_dir, log=log, set_aside=False)
        return None if ckpt is None else (scripted_generator(ckpt, run_dir), ckpt["epoch"], ckpt["global_step"])
    except UserError as err:  # none loads, or the newest does not fit the run's model
        log(f"warning: {err}")
        return None


def analyze_run(run: experiments.RunInfo, opts, device: torch.device, log=print) -> dict:
    """Write RUN_DIR/figures/* and return the summary (also written as figures/summary.json); an earlier analysis
    of the same checkpoints with the same options is reused instead."""
    run_dir, args, metrics = run.dir, run.settings, run.metrics
    steps = readers.read_metrics_csv(run_dir / "steps.csv")
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    key = analysis_key(run_dir, opts, device, metrics, steps)
    reused = figures.reusable_summary(fig_dir, key, log)
    if reused is not None:
        return reused
    summary = {"run_dir": str(run_dir), "dataset": args.dataset, "loss": args.loss, "epochs_done": len(metrics),
               "epochs_planned": args.epochs, "figures": [], "skipped": {}, "analysis_key": key,
               "losses": {"step_rows": len(steps), "log_every": args.log_every,
                          "curves": figures.step_curves(len(steps), len(metrics))}}
    made = functools.partial(figures.save_or_skip, summary, fig_dir)

    if metrics or steps:  # titles say what is shown; which run and its settings, the report's captions
        made(plot_losses(metrics, steps, args, "D and G losses"), "losses.png")
        made(plot_d_outputs(metrics, steps, args, "D's outputs on real and generated images"), "d_outputs.png")
    else:
        made(None, "losses.png", "no metrics yet")
    if metrics:
        summary["last_epoch"] = {k: v for k, v in metrics[-1].items() if np.isfinite(v)}
    made(sweep_figures.compare_quality([run], ["this run"], [{}], "epoch"), "fid.png",
         "no FID in metrics.csv (run without Inception weights)")
    fid = figures.column(metrics, "fid")
    if np.isfinite(fid).any():
        best = int(np.nanargmin(fid))
        summary["best_fid"] = {"epoch": int(metrics[best]["epoch"]), "fid": float(fid[best])}

    train_images = None
    try:
        train_images = dcgan_train.load_training_images(args)
    except UserError as err:
        log(f"warning: training data not found ({err}); nearest-neighbour figure and reference diversity skipped")
    reference = gan_metrics.real_diversity(train_images) if train_images is not None else None
    sample_figures(run, train_images, reference, made, summary, log)
    if opts.quality != "off" and milestone_checkpoints(run_dir):
        milestone_figure(run_dir, args, opts, device, train_images, reference, made, summary, log)
    elif opts.quality != "off":
        made(None, "milestones.png", "no milestone checkpoints (checkpoints/epoch-NNN.pt)")
    files.atomic_write_text(fig_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"{run_dir}: {len(summary['figures'])} figures in {fig_dir}")
    return summary


def analysis_key(run_dir: Path, opts, device, metrics, steps) -> str:
    """What the figures of a run depend on: its checkpoints (names hold the global step), CSV rows and sample
    grids; the options; whether Inception's weights are there (--quality auto uses them); the analysis code."""
    made_from = {"checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")),
                 "metrics_rows": len(metrics), "steps_rows": len(steps),
                 "sample_grids": len(figures.sample_grids(run_dir)),
                 "exported": (readers.read_export(run_dir) or {}).get("epoch")}
    options = {"quality": opts.quality, "quality_samples": opts.quality_samples, "device": str(device),
               "inception_weights": gan_metrics.find_inception_weights(None) is not None}
    return figures.analysis_key(made_from, options, [Path(__file__), Path(gan_metrics.__file__)])


def sample_figures(run: experiments.RunInfo, train_images, reference, made, summary: dict, log) -> None:
    """The fixed-noise progression and its diversity, the newest G's samples and their nearest training images."""
    run_dir, args = run.dir, run.settings
    grids = figures.sample_grids(run_dir)
    if grids:
        per_epoch = {e: gan_metrics.diversity(figures.grid_cells(p, args.image_size)) for e, p in grids.items()}
        made(sweep_figures.compare_progression([run], [""], "The same 8 fixed noise vectors (columns) across epochs",
                                               PROGRESSION_ROWS, figures.GRID_COLUMNS), "fixed_noise_progression.png")
        summary["progression_epochs"] = figures.spread(sorted(grids), PROGRESSION_ROWS)
        summary["diversity"] = {"per_epoch": per_epoch, "training_images": reference,
                                "last_over_max": per_epoch[max(per_epoch)] / max(max(per_epoch.values()), 1e-12)}
        made(sweep_figures.compare_diversity([run], ["64 fixed-noise samples"], [summary], "epoch",
                                             "Sample diversity (a drop means mode collapse)"), "diversity.png")
    else:
        made(None, "fixed_noise_progression.png", "no sample grids yet")

    newest = newest_generator(run_dir, log)
    if newest is None:
        made(None, "final_samples.png", "no checkpoint yet")
        return
    generator, epoch, global_step = newest
    summary["checkpoint"] = {"epoch": epoch, "global_step": global_step}
    samples = final_samples(generator, args.nz, args.seed)
    ema = " of the EMA generator" if args.ema > 0 else ""
    made(image_grid_figure(samples, 10, f"100 samples{ema} at epoch {epoch} ({global_step:,} steps)"),
         "final_samples.png")
    if train_images is not None:
        queries = samples[:NEIGHBOUR_QUERIES]
        index, distance = gan_metrics.nearest_neighbours(queries, train_images, NEIGHBOURS)
        rows = [torch.cat([q[None], train_images[i].float() / 255]) for q, i in zip(queries, index)]
        made(image_grid_figure(torch.cat(rows).expand(-1, 3, -1, -1), NEIGHBOURS + 1,
                               f"Left of the red line, a sample; right, its {NEIGHBOURS} nearest training images "
                               f"(L2).\nCopies would mean memorisation", first_column_apart=True),
             "nearest_neighbours.png")
        summary["nearest_neighbour_rms"] = {"median": float(distance[:, 0].median()),
                                            "min": float(distance[:, 0].min())}


def milestone_figure(run_dir: Path, args, opts, device, train_images, reference, made, summary: dict, log) -> None:
    """milestones.png: the quality (--quality) of each milestone checkpoint, and the best one to export."""
    with still_running("preparing the quality measure", log):
        measure = QualityMeasure(opts.quality, args, opts.quality_samples, device, train_images, log)
    log(f"{run_dir.name}: {measure.name} of each milestone checkpoint ({measure.n_samples} samples)")
    with still_running(f"{measure.name} of the milestones", log):
        rows = milestone_quality(run_dir, measure, log)
    best = best_milestone(rows, measure.kind, reference)
    made(plot_milestones(rows, measure, best, reference), "milestones.png")
    exported = (readers.read_export(run_dir) or {}).get("epoch")  # of the run's own model files
    summary["milestones"] = {"measure": measure.name, "kind": measure.kind, "rows": rows, "best": best,
                             "samples": measure.n_samples, "training_images": reference, "exported_epoch": exported}
    if best is not None and best["epoch"] == exported:
        log(f"  best milestone: epoch {best['epoch']} ({measure.name} {best['value']:.4g}), the epoch the run's "
            f"model files are from already")
    elif best is not None:
        log(f"  best milestone: epoch {best['epoch']} ({measure.name} {best['value']:.4g}); export it with: "
            f"python analyze_gan.py {experiments.shown_path(run_dir)} --export-epoch {best['epoch']}")


# ----------------------------------------------------------------------------------------------------------------
# Several runs side by side


def comparison_rows(runs, labels, summaries) -> list[dict]:
    """A row per run, a column per quantity (summary.csv): the last epoch's means and fixed-noise diversity; the best
    milestone by its measure (the Inception FID, the classifier FID, or the diversity closest to the training
    images'); the best training-time FID."""
    rows = []
    for run, label, summary in zip(runs, labels, summaries):
        last = run.metrics[-1] if run.metrics else {}
        per_epoch = summary.get("diversity", {}).get("per_epoch", {})
        milestones = summary.get("milestones", {})
        best = milestones.get("best") or {}
        rows.append({"label": label, "loss": run.args["loss"], "epochs": run.epochs_done,
                     "images_seen": int(run.total_images_seen()),
                     **{k: last.get(k, math.nan) for k in ("loss_d", "loss_g", "d_real", "d_fake")},
                     "diversity_last_epoch": per_epoch[max(per_epoch, key=int)] if per_epoch else math.nan,
                     "best_milestone_measure": milestones.get("measure", ""),
                     "best_milestone_epoch": best.get("epoch", ""),
                     "best_milestone_value": best.get("value", math.nan),
                     "best_fid": (summary.get("best_fid") or {}).get("fid", math.nan),
                     "status": run.status(), "run_dir": str(run.dir)})
    return rows


def print_table(rows: list[dict], log=print) -> None:
    measure = next((row["best_milestone_measure"] for row in rows if row["best_milestone_measure"]), "")
    shown = [{**row, "best": "" if row["best_milestone_epoch"] == "" else
              f"epoch {row['best_milestone_epoch']} ({row['best_milestone_value']:.4g})"} for row in rows]
    columns = [("run", "label", ""), ("loss", "loss", ""), ("epochs", "epochs", ""),
               ("images seen", "images_seen", ","), ("loss_d", "loss_d", ".3f"), ("loss_g", "loss_g", ".3f"),
               ("D(x)", "d_real", ".3f"), ("D(G(z))", "d_fake", ".3f"), ("diversity", "diversity_last_epoch", ".4f"),
               (f"best milestone by {measure}" if measure else "", "best", "")]
    figures.print_table(shown, columns, "(loss_d, loss_g, D(x), D(G(z)): means over the last epoch; diversity: of its "
                                        "fixed-noise grid)", log)


def compare_runs(runs: list[experiments.RunInfo], summaries: list[dict], out_dir: Path, log=print) -> dict:
    """The comparison figures and table in out_dir; returns what was made (for report.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = experiments.run_labels(runs)
    x_name, xs = experiments.x_axis(runs)
    made = {"labels": labels, "runs": [str(run.dir) for run in runs], "x_axis": x_name, "figures": [],
            "skipped": {}}
    save = functools.partial(figures.save_or_skip, made, out_dir, log=log)
    # Titles say what is shown; which runs (the sweep) and their settings, the labels and the report's captions.
    save(sweep_figures.compare_losses(runs, labels, x_name, xs, "D and G losses per variant"), "compare_losses.png")
    save(sweep_figures.compare_d_outputs(runs, labels, x_name, xs, "Discriminator outputs (BCE variants)"),
         "compare_d_outputs.png", "no BCE run (a hinge D gives no probabilities)")
    save(sweep_figures.compare_samples(runs, labels, "Samples from the fixed noise at each variant's last epoch"),
         "compare_samples.png", "no sample grids")
    save(sweep_figures.compare_progression(runs, labels, "The same fixed noise across epochs, per variant"),
         "compare_progression.png", "no sample grids")
    save(sweep_figures.compare_diversity(runs, labels, summaries, x_name, "Diversity of the fixed-noise samples"),
         "compare_diversity.png")
    save(sweep_figures.compare_quality(runs, labels, summaries, x_name),
         "compare_quality.png", "no FID in metrics.csv and no FID per milestone (diversity is compare_diversity's)")
    rows = comparison_rows(runs, labels, summaries)
    made["table"] = rows
    figures.write_table(out_dir, rows, {**made, "summaries": summaries})
    print_table(rows, log)
    log(f"comparison of {len(runs)} runs in {out_dir}")
    return made


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    runs = experiments.collect_runs(opts.run_dirs, "dcgan")
    if opts.export_epoch is not None:
        if len(runs) != 1:
            raise UserError("--export-epoch takes one run folder")
        g_path, d_path = export_milestone(runs[0].dir, opts.export_epoch, opts.out)
        shown = [experiments.shown_path(path) for path in (g_path, d_path)]
        print(f"exported {g_path} and {d_path} from {runs[0].name}, epoch {opts.export_epoch}. Check and pack them "
              f"with: python check_submission.py --gen {shown[0]} --disc {shown[1]} --figures report/figures "
              f"--zip CW2.zip", flush=True)
        return 0
    device = pick_device(opts.device)
    summaries = [analyze_run(run, opts, device) for run in runs]
    if len(runs) > 1:
        compare_runs(runs, summaries, Path(opts.out) if opts.out else experiments.default_compare_dir(runs, "dcgan"))
    return 0


if __name__ == "__main__":
    run_main(main)
