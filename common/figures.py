"""Figure helpers for the analysis scripts and the report: PNGs written atomically, smoothed curves, integer
epoch ticks, mosaics of image cells with white gaps (from the runs' saved sample grids), and the key that lets an
analysis reuse what an earlier one made of the same checkpoint with the same options."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid
from matplotlib.figure import Figure  # no pyplot: Figure.savefig draws PNGs with Agg and sets no global backend
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator
from PIL import Image

from .files import atomic_path, atomic_write_text, write_csv

GRID_PADDING = 2      # torchvision.utils.save_image's default, used by dcgan_train.save_samples
GRID_COLUMNS = 8      # ... with nrow=8
CELL_GAP = 4          # white pixels between the cells of the figures made here, so samples never merge


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([row.get(key, math.nan) for row in rows], dtype=float)


def ema_weight(n_points: int) -> float:
    """The decay of the smoothing below: an effective window of about a tenth of the curve, at least 1 point."""
    return float(np.clip(1 - 10 / max(n_points, 1), 0.0, 0.98))


def step_curves(n_step_rows: int, n_epoch_rows: int) -> str:
    """What a figure draws of steps.csv beside the epoch means, one rule for the plots and the report's captions:
    "none" when its rows are no finer than the epochs (--log-every at least an epoch's steps: they would hide under
    the epoch means), else "faint" (each row) or "smoothed" (each row faint, and their EMA, when smooth() changes a
    curve of that many rows at all)."""
    if n_step_rows <= n_epoch_rows:
        return "none"
    return "smoothed" if ema_weight(n_step_rows) > 0 else "faint"


def top_with_room(values) -> float:
    """A y-axis top above every value and reference line, with room for a line's width and its legend entry (a
    reference at the top frame was drawn half clipped)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return 1.15 * max(finite, default=1.0)


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def one_panel(height: float = 4.2, width: float = 7.5) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def epoch_axis(ax, legend: bool = True) -> None:
    """A one-run figure's x axis in whole epochs, a light grid and (legend=True) the legend in the axes."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=9)


def label_x_axis(ax, x_name: str) -> None:
    """The x label, and ticks a reader can match to the points: at the points themselves when there are few of
    them (call it after plotting), else evenly spaced; image counts with thousands separators (600,000, not 6e5)."""
    ax.set_xlabel(x_name)
    points = sorted({float(x) for line in ax.get_lines() if line.get_transform() is ax.transData  # not axhline's
                     for x in line.get_xdata() if math.isfinite(float(x))})
    if 0 < len(points) <= 8:
        ax.xaxis.set_major_locator(FixedLocator(points))
    elif x_name == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value == int(value) else
                                               f"{value:,.2f}"))


def finish_panels(fig: Figure, title: str = "", n_columns: int = 2) -> Figure:
    """A light grid in every panel, the title over them all, and one legend under them: the runs' labels (often
    long) cover no curve, and a colour means the same run in every panel."""
    seen = {}
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if title:
        fig.suptitle(title)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(n_columns, len(seen)),
                   fontsize=9, frameon=False)
    return fig


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


def sample_grids(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[1]): p for p in sorted((run_dir / "samples").glob("epoch_*.png"))}


def image_grid(images: torch.Tensor, nrow: int, gap: int = 2) -> np.ndarray:
    """[N, 1 or 3, H, W] in [0, 1] -> an [H', W', 3] array for imshow, `gap` white pixels between images."""
    return make_grid(images.cpu(), nrow=nrow, padding=gap, pad_value=1.0).permute(1, 2, 0).numpy()


def image_rows(rows: list[tuple[str, torch.Tensor]], title: str) -> Figure:
    """One row of grey images ([N, 1, H, W] in [0, 1]) per (label, images), the label left of it."""
    n_cols = max(len(images) for _, images in rows)
    fig = Figure(figsize=(n_cols * 0.8 + 1.7, len(rows) * 0.9 + 0.6), layout="constrained")
    for ax, (label, images) in zip(fig.subplots(len(rows), 1, squeeze=False)[:, 0], rows):
        ax.imshow(image_grid(images, n_cols))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=11)
    fig.suptitle(title)
    return fig


def image_panels(panels: list[tuple[str, torch.Tensor]], nrow: int, title: str, inches: float = 2.3,
                 gap: int = 2) -> Figure:
    """Side by side, one square panel of images in rows of nrow per (label, images)."""
    fig = Figure(figsize=(inches * len(panels) + 0.4, inches + 0.6), layout="constrained")
    for ax, (label, images) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(image_grid(images, nrow, gap))
        ax.axis("off")
        ax.set_title(label, fontsize=11)
    fig.suptitle(title)
    return fig


def analysis_key(made_from: dict, options: dict, code: list[Path]) -> str:
    """What a run's figures and summary.json depend on, as one string: the run's state (`made_from`: its newest
    checkpoint's global step, the rows of its CSVs, ...), the analysis options, and the analysis code itself (`code`
    and the figure modules)."""
    digest = hashlib.sha256()
    for path in [*code, __file__, Path(__file__).with_name("sweep_figures.py")]:
        digest.update(Path(path).read_bytes())
    return json.dumps({"made_from": made_from, "options": options, "code": digest.hexdigest()[:16]}, sort_keys=True,
                      default=str)


def reusable_summary(fig_dir: Path, key: str, log=print) -> dict | None:
    """figures/summary.json from an earlier analysis with the same key, when the figures it lists are all there."""
    try:
        summary = json.loads((fig_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("analysis_key") != key or not all((fig_dir / name).exists() for name in summary["figures"]):
        return None
    log(f"figures and numbers reused from {fig_dir / 'summary.json'}: the same checkpoints, options and analysis code")
    return summary


def save_or_skip(record: dict, out_dir: Path, fig: Figure | None, name: str, why_not: str = "", log=None) -> None:
    """Write `fig` as out_dir/name and list it in record["figures"]; when there was nothing to draw (None), say why
    in record["skipped"] (and in a note, given `log`)."""
    if fig is None:
        record["skipped"][name] = why_not
        if log:
            log(f"note: {name} not made: {why_not}")
        return
    save_figure(fig, out_dir / name)
    record["figures"].append(name)


def write_table(out_dir: Path, rows: list[dict], as_json) -> None:
    """A comparison's summary.csv (a column per key of the rows) and summary.json (`as_json`)."""
    write_csv(out_dir / "summary.csv", list(rows[0]), rows)
    atomic_write_text(out_dir / "summary.json", json.dumps(as_json, indent=2, sort_keys=True, default=str) + "\n")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], note: str, log=print) -> None:
    """The rows as aligned text after a blank line, a column per (heading, key, format spec), text to the left and
    numbers to the right; then `note` (units, what the columns mean)."""
    lines = [[heading for heading, _, _ in columns]]
    lines += [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    numbers = [isinstance(rows[0][key], (int, float)) for _, key, _ in columns]
    log("")
    for line in lines:
        log("  ".join(cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(line, widths, numbers))
            .rstrip())
    log(note)
