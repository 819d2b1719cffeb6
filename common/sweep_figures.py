"""Figures that put runs side by side (a sweep, or any runs named together): data in, a Figure out. The analysis
scripts gather the data (metrics, samples from the same noise) and write the figures; labels come from the settings
that differ (experiments.run_labels), the x axis from experiments.x_axis.

VAE: the bound and its terms (figures.image_rows and image_panels show reconstructions and samples side by side).
DCGAN: D and G losses, D's outputs, the last fixed-noise grids, their progression, diversity and quality per epoch.
"""
from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib.figure import Figure  # no pyplot: Figure.savefig draws PNGs with Agg and sets no global backend

from . import experiments, figures


VAE_PANELS = {"elbo": "-ELBO at beta = 1 (recon + KL)", "loss": "total (recon + beta * KL)",
              "recon": "reconstruction NLL", "kl": "KL(q(z|x) || p(z))"}


def plot_comparison_curves(infos: list[experiments.RunInfo], labels: list[str], title: str,
                           total: str = "elbo") -> Figure:
    """A VAE's bound and its reconstruction and KL terms; train (top row: means over each epoch's steps) and test
    (bottom row: at each epoch's end); one line per run, in the same colour in every panel. The bound: total="elbo",
    the negative ELBO at beta = 1, which every run is judged by whatever beta it was trained with; "loss", the
    beta-weighted objective one run was trained on."""
    x_name, xs = experiments.x_axis(infos)
    fig = Figure(figsize=(10, 6.8), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True)  # each panel its own y range: epoch 1's train mean is often far above
    for row, split in enumerate(("train", "test")):
        for ax, key in zip(axes[row], (total, "recon", "kl")):
            for i, (info, label, x) in enumerate(zip(infos, labels, xs)):
                values = [r[f"{split}_recon"] + r[f"{split}_kl"] if key == "elbo" else r[f"{split}_{key}"]
                          for r in info.metrics]
                ax.plot(x, values, marker="o", markersize=3, color=f"C{i}", label=label)
            ax.set(title=f"{split}: {VAE_PANELS[key]}", ylabel="nats per image")
            if row == 1:
                figures.label_x_axis(ax, x_name)
    return figures.finish_panels(fig, title, n_columns=4)


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
                axes[row, col].plot(x, figures.column(run.metrics, key), "o-", markersize=3, color=f"C{i}", label=label)
        g_name = "-log D(G(z))" if loss == "bce" else "-D(G(z))"
        axes[0, col].set(title=f"D loss ({loss})", ylabel=f"{loss} loss, epoch mean")
        axes[1, col].set(title=f"G loss ({loss}: {g_name})", ylabel=f"{loss} loss, epoch mean")
        figures.label_x_axis(axes[1, col], x_name)
    return figures.finish_panels(fig, title)


def compare_d_outputs(runs, labels, x_name, xs, title: str) -> Figure | None:
    """D's mean probability on real and on generated images, BCE runs only."""
    chosen = [i for i, run in enumerate(runs) if run.args["loss"] == "bce"]
    if not chosen:
        return None
    fig = Figure(figsize=(9, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, name in zip(axes, ("d_real", "d_fake"), ("D(x), real images", "D(G(z)), generated images")):
        for i in chosen:
            ax.plot(xs[i], figures.column(runs[i].metrics, key), "o-", markersize=3, color=f"C{i}", label=labels[i])
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ax.set(title=name, ylim=(-0.02, 1.02))
        figures.label_x_axis(ax, x_name)
    axes[0].set_ylabel("mean D probability, epoch mean")
    return figures.finish_panels(fig, title)


def grid_panels(runs, labels, title: str, panel_size: tuple[float, float]) -> tuple[Figure | None, list[tuple]]:
    """A figure with a panel (up to 3 a row; 4 as 2 x 2) for each run that saved sample grids, and the panels as
    (run, label, grids {epoch: path}, axes); (None, []) when no run has a grid."""
    have = [(run, label, figures.sample_grids(run.dir)) for run, label in zip(runs, labels)]
    have = [(run, label, grids) for run, label, grids in have if grids]
    if not have:
        return None, []
    n_cols = len(have) if len(have) <= 2 else 2 if len(have) == 4 else 3
    n_rows = math.ceil(len(have) / n_cols)
    fig = Figure(figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(have):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, [(*run, ax) for run, ax in zip(have, axes)]


def compare_samples(runs, labels, title: str, rows: int = 4, cols: int = 6) -> Figure | None:
    """Each run's last fixed-noise grid (its first rows x cols cells), one panel per run, same noise positions."""
    fig, panels = grid_panels(runs, labels, title, (3.7, 2.9))
    for run, label, grids, ax in panels:
        last = max(grids)
        cells = figures.grid_cells(grids[last], run.args["image_size"])[:rows * figures.GRID_COLUMNS]
        cells = cells.reshape(-1, figures.GRID_COLUMNS, *cells.shape[1:])[:, :cols]
        ax.imshow(figures.mosaic(list(cells)))
        ax.set_axis_off()
        ax.set_title(f"{textwrap.fill(label, 34)}\n(epoch {last})", fontsize=10)
    return fig


def compare_progression(runs, labels, title: str, n_epochs: int = 4, n_noise: int = 5) -> Figure | None:
    """Per run, one panel: rows are evenly spaced epochs, columns the first n_noise fixed noise vectors (the same
    in every row: identical rows late in a run mean mode collapse)."""
    shown = max([min(n_epochs, len(figures.sample_grids(run.dir))) for run in runs])  # rows of the tallest panel
    fig, panels = grid_panels(runs, labels, title, (0.6 * n_noise + 1.2, 0.7 * shown + 0.6))
    for run, label, grids, ax in panels:
        chosen = figures.spread(sorted(grids), n_epochs)
        size = experiments.setting(run, "image_size")  # the script's default for runs made before the flag
        ax.imshow(figures.mosaic([figures.grid_cells(grids[e], size)[:n_noise] for e in chosen]))
        figures.label_rows(ax, [f"epoch {e}" for e in chosen], size, fontsize=9)
        ax.set_title(textwrap.fill(label, 34), fontsize=10)
    return fig


def compare_diversity(runs, labels, summaries, x_name, title: str) -> Figure:
    fig, ax = figures.one_panel(height=4.8)
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
    values = [v for line in ax.get_lines() for v in line.get_ydata()] + list(references.values())
    ax.set(ylabel="mean pairwise RMS distance", ylim=(0, figures.top_with_room(values)), title=title)
    figures.label_x_axis(ax, x_name)
    return figures.finish_panels(fig)


def compare_quality(runs, labels, summaries, x_name) -> Figure | None:
    """The training-time Inception FID, and the FID or classifier FID of each milestone checkpoint, of each run
    against x; None when there is neither (milestones measured by diversity are compare_diversity's subject)."""
    with_fid = [i for i, run in enumerate(runs) if np.isfinite(figures.column(run.metrics, "fid")).any()]
    with_milestones = [i for i, s in enumerate(summaries) if s.get("milestones", {}).get("rows")
                       and s["milestones"]["kind"] != "diversity"]
    panels = [("fid", "Inception FID during training", "FID (lower is better)")] if with_fid else []
    if with_milestones:
        measure = summaries[with_milestones[0]]["milestones"]["measure"]
        panels.append(("milestones", f"{measure} per milestone checkpoint", f"{measure} (lower is better)"))
    if not panels:
        return None
    fig = Figure(figsize=(4.6 * len(panels) + 1.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
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
        ax.set(title=name, ylabel=ylabel)
        figures.label_x_axis(ax, x_name)
    # One panel's title is the figure's.
    return figures.finish_panels(fig, " and ".join(name for _, name, _ in panels) if len(panels) > 1 else "")
