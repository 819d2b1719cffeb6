"""Figures and numbers from one or more VAE runs (made by vae_train.py), from metrics.csv and the latest checkpoint.

    python analyze_vae.py runs/latest-vae                        # figures into runs/<run>/figures/
    python analyze_vae.py runs/*-vae-beta*                        # also a comparison, one line per beta
    python analyze_vae.py RUN --tsne-points 2000 --iw-images 1000 # quicker on a CPU
    python analyze_vae.py RUN --interp-classes 4 9                # interpolate between the first 4 and the first 9

Into each RUN_DIR/figures/: loss_curves.png, reconstructions.png, samples.png (the training grids' z), tsne.png,
interpolation.png and summary.json (test ELBO and importance-weighted log-likelihood, nats per image); an analysis
of the same checkpoint, options and code is reused (summary.json's analysis_key). With several runs (folders of a
glob that are not VAE runs are skipped with a note), also into --out (default RUNS_ROOT/compare/<sweep name>/),
labelled by the settings that differ (`beta=4`): loss_curves.png (the negative ELBO at beta = 1 and its two terms,
train and test: the beta-weighted objective differs between betas by construction), reconstructions.png,
samples.png (every decoder on the same z), summary.csv (also printed) and summary.json. A run folder is only read
(figures/ aside), so a run in progress shows its newest checkpoint that loads.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: Figure.savefig draws PNGs with Agg and sets no global backend
from sklearn.manifold import TSNE

from common import experiments, figures, files, readers, sweep_figures
from common.checkpoints import load_latest_checkpoint
from common.data import load_images
from common.devices import pick_device
from common.errors import UserError, run_main
from common.flags import at_least, positive_float
from common.progress import still_running
from vae_train import VAE, evaluate, pixel_nll, to_float

# Per data set: what its labels are called, and each class's name.
CLASSES = {
    "mnist": ("digit", [str(d) for d in range(10)]),
    "fashion-mnist": ("class", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                "Bag", "Ankle boot"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = experiments.analysis_parser(__doc__, "vae")
    parser.add_argument("--data-dir", default=None, help="data root (default: the one in each run's config.json)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for prior samples, IW noise and the t-SNE subset (default: %(default)s)")
    parser.add_argument("--iw-samples", type=at_least(1), default=100,
                        help="K, importance samples per test image (default: %(default)s)")
    parser.add_argument("--iw-images", type=at_least(0), default=0,
                        help="estimate log p(x) on the first N test images (default 0: all)")
    parser.add_argument("--iw-batch-size", type=at_least(1), default=5000,
                        help="decoder passes per batch in the IW estimate (default: %(default)s)")
    parser.add_argument("--tsne-points", type=at_least(2), default=10000,
                        help="test images in the t-SNE, a seeded random subset (default: %(default)s, all of MNIST's)")
    parser.add_argument("--perplexity", type=positive_float, default=30.0,
                        help="t-SNE perplexity (default: %(default)s)")
    parser.add_argument("--n-recon", type=at_least(1), default=16,
                        help="test images shown with their reconstructions (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--interp-indices", type=int, nargs=2, default=None, metavar=("I", "J"),
                       help="interpolate between test images I and J (default: 0 1)")
    group.add_argument("--interp-classes", type=int, nargs=2, default=None, metavar=("A", "B"),
                       help="interpolate between the first test image of class A and the first of class B")
    parser.add_argument("--interp-steps", type=at_least(2), default=10,
                        help="decoded points on the line, ends included (default: %(default)s)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Reading a run


def read_run(run_dir) -> dict:
    """A VAE run (its experiments.RunInfo), its settings and its newest checkpoint; UserError when it is not one."""
    info = experiments.RunInfo(Path(run_dir), readers.read_run_config(run_dir, "vae"))
    # Read-only: a reader never renames another process's files (set_aside=False).
    ckpt = load_latest_checkpoint(info.dir, log=lambda msg: print(msg, flush=True), set_aside=False)
    if ckpt is None:
        raise UserError(f"{run_dir} has no checkpoint yet (checkpoints/step-*.pt); one is written at the end of each "
                        f"epoch, so wait for the first epoch to finish")
    return {"dir": info.dir, "info": info, "args": vars(info.settings), "ckpt": ckpt}


def load_model(run: dict, device: torch.device) -> VAE:
    args = run["args"]
    model = VAE(args["arch"], args["latent_dim"], args["likelihood"])
    model.load_state_dict(run["ckpt"]["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Numbers


def log_importance_weights(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k = mu + sigma * eps_k; x [B, 1, 28, 28], eps [K, B, d] -> [K, B].

    The likelihood is the model's own, vae_train.pixel_nll, as in training (Bernoulli: BCE with logits on grey levels;
    Gaussian: one learned sigma). Constants 0.5 log(2 pi) of p(z) and q(z|x) cancel and are left out.
    """
    n_samples, batch = eps.shape[:2]
    mu, logvar = model.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)                                 # [K, B, d]
    logits = model.decoder(z.flatten(0, 1)).view(n_samples, batch, *x.shape[1:])
    log_px_z = -pixel_nll(model, logits, x)
    log_pz = -0.5 * z.pow(2).sum(-1)
    log_qz_x = -0.5 * (eps.pow(2) + logvar).sum(-1)
    return log_px_z.flatten(2).sum(-1) + log_pz - log_qz_x


@torch.no_grad()
def importance_weighted_ll(model: VAE, images: torch.Tensor, n_samples: int, seed: int,
                           batch_size: int = 5000, progress: dict | None = None) -> tuple[float, float]:
    """Mean over images of the IW estimate of log p(x) (Burda et al., 2016, "Importance Weighted Autoencoders"):

        log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,   z_k ~ q(z|x),

    a lower bound on log p(x) that tightens as K grows (K = 1: the ELBO). Also returns the mean of the same log
    weights, an ELBO estimate from the same samples; the first is >= the second for every image (Jensen).
    Noise comes from a seeded CPU generator, so the numbers depend only on the weights, the flags and the device.
    progress["images"], when given, counts the images done (for still_running's lines).
    """
    gen = torch.Generator().manual_seed(seed)
    images_per_batch = max(1, batch_size // n_samples)
    iw_sum = elbo_sum = 0.0
    for start in range(0, len(images), images_per_batch):
        x = to_float(images[start:start + images_per_batch])
        eps = torch.randn((n_samples, len(x), model.latent_dim), generator=gen).to(x.device)
        log_w = log_importance_weights(model, x, eps).double()
        iw_sum += (torch.logsumexp(log_w, 0) - math.log(n_samples)).sum().item()
        elbo_sum += log_w.mean(0).sum().item()
        if progress is not None:
            progress["images"] = start + len(x)
    return iw_sum / len(images), elbo_sum / len(images)


@torch.no_grad()
def latent_means(model: VAE, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model.encode(to_float(images[i:i + batch_size]))[0].cpu()
                      for i in range(0, len(images), batch_size)])


def interpolation_pair(labels: torch.Tensor, indices, classes) -> tuple[int, int]:
    """Test-set indices of the two interpolation ends, from --interp-indices or --interp-classes."""
    if classes is not None:
        picks = []
        for cls in classes:
            found = [i for i in torch.nonzero(labels == cls).flatten().tolist() if i not in picks]
            if not found:
                raise UserError(f"--interp-classes {classes[0]} {classes[1]}: no (other) test image of class {cls}")
            picks.append(found[0])
        return picks[0], picks[1]
    i, j = indices if indices is not None else (0, 1)
    for index in (i, j):
        if not 0 <= index < len(labels):
            raise UserError(f"--interp-indices {i} {j}: {index} is not a test-set index (0 .. {len(labels) - 1})")
    return i, j


# ----------------------------------------------------------------------------------------------------------------
# Figures


def plot_samples(samples: torch.Tensor, title: str) -> Figure:
    return figures.image_panels([("", samples)], 8, title, inches=6.6)


def plot_tsne(points: np.ndarray, labels: np.ndarray, dataset: str, title: str) -> Figure:
    fig, ax = figures.one_panel(height=7.5, width=8.5)
    size = 3 if len(points) > 2000 else 12
    word, class_names = CLASSES[dataset]
    for cls, name in enumerate(class_names):
        chosen = labels == cls
        ax.scatter(points[chosen, 0], points[chosen, 1], s=size, alpha=0.7, color=f"C{cls}", label=name,
                   linewidths=0)
    ax.legend(title=word, markerscale=8 / size ** 0.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return fig


INTERP_PER_ROW = 6  # cells per row of interpolation.png: at a report's width (~16 cm) the labels stay readable


def plot_interpolation(strip: torch.Tensor, ends: tuple[int, int], end_names: tuple[str, str],
                       ts: torch.Tensor, title: str) -> Figure:
    """strip: [steps + 2, 1, H, W] = test image I, decoded points t = 0 .. 1, test image J; read left to right,
    top to bottom, in rows of INTERP_PER_ROW."""
    n_rows = math.ceil(len(strip) / INTERP_PER_ROW)
    fig = Figure(figsize=(7, 1.45 * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, INTERP_PER_ROW, squeeze=False).ravel()
    titles = [f"test #{ends[0]}"] + [f"t = {t:.2f}" for t in ts.tolist()] + [f"test #{ends[1]}"]
    for ax, image, cell_title in zip(axes, strip, titles):
        ax.imshow(image[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(cell_title, fontsize=11)
    for ax in axes[len(strip):]:
        ax.set_visible(False)
    for ax in (axes[0], axes[len(strip) - 1]):
        for spine in ax.spines.values():
            spine.set_color("tab:red")
            spine.set_linewidth(2.5)
    # Three short lines: one long line ran past the right edge of the 7-inch figure.
    fig.suptitle(f"{title}\nfrom test #{ends[0]} ({end_names[0]}) to test #{ends[1]} ({end_names[1]})\n"
                 f"red frames: the two inputs", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# One run, and the comparison of several


def analyze_run(run: dict, args, device: torch.device, data_cache: dict) -> dict:
    """Write RUN_DIR/figures/* and return the summary (also written as figures/summary.json); an earlier
    analysis of the same checkpoint with the same options is reused instead."""
    run_args, ckpt, epoch = run["args"], run["ckpt"], run["ckpt"]["epoch"]
    fig_dir = run["dir"] / "figures"
    fig_dir.mkdir(exist_ok=True)
    data_key = (run_args["dataset"], args.data_dir or run_args["data_dir"])
    print(f"{run['dir']}: {run_args['arch']} VAE, latent {run_args['latent_dim']}, beta {run_args['beta']}, "
          f"checkpoint at epoch {epoch} (+{ckpt.get('step_in_epoch', 0)} steps)", flush=True)
    key = analysis_key(run, args, device, data_key)
    reused = figures.reusable_summary(fig_dir, key)
    if reused is not None:
        return reused
    model = load_model(run, device)
    images, labels = test_set(data_key, data_cache)
    images = images.to(device)

    made = loss_figure(run, fig_dir) + image_figures(model, images, labels, args, run, fig_dir) + ["tsne.png"]
    started = time.monotonic()
    n_points = tsne_figure(model, images, labels, data_key[0], args, epoch, fig_dir)
    tsne_done = time.monotonic()
    # The true bound (beta = 1), with the noise the training script's evaluation uses: at an epoch-end checkpoint
    # it equals -(test_recon + test_kl) of that epoch's metrics.csv row.
    elbo_terms = evaluate(model, images, beta=1.0, seed=run_args["seed"])
    model.eval()  # evaluate() leaves the model in training mode
    elbo_done = time.monotonic()
    iw_images = images[:args.iw_images] if args.iw_images else images
    iw_ll, iw_elbo = iw_estimate(model, iw_images, args)
    seconds = {"tsne": tsne_done - started, "elbo": elbo_done - tsne_done, "iw": time.monotonic() - elbo_done}

    summary = {
        "run_dir": str(run["dir"]), "arch": run_args["arch"], "latent_dim": run_args["latent_dim"],
        "beta": run_args["beta"], "likelihood": run_args["likelihood"],
        "dataset": data_key[0], "epoch": epoch, "step_in_epoch": ckpt.get("step_in_epoch", 0),
        "test_images": len(images),
        "test_elbo": -elbo_terms["test_loss"],
        "test_recon": elbo_terms["test_recon"], "test_kl": elbo_terms["test_kl"],
        "iw_log_likelihood": iw_ll, "iw_elbo": iw_elbo, "iw_samples": args.iw_samples,
        "iw_images": len(iw_images), "tsne_points": n_points, "seed": args.seed, "device": str(device),
        "seconds": {k: round(v, 2) for k, v in seconds.items()}, "figures": made, "analysis_key": key,
    }
    files.atomic_write_text(fig_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"  test ELBO {summary['test_elbo']:.2f} nats/image (recon {summary['test_recon']:.2f}, "
          f"KL {summary['test_kl']:.2f}); IW log-likelihood (K={args.iw_samples}, {len(iw_images)} images) "
          f"{iw_ll:.2f} nats/image", flush=True)
    print(f"  figures in {fig_dir} (t-SNE {seconds['tsne']:.1f} s, IW {seconds['iw']:.1f} s)", flush=True)
    return summary


def loss_figure(run: dict, fig_dir: Path) -> list[str]:
    """loss_curves.png of one run, when it has a finished epoch; returns what it wrote."""
    if not run["info"].metrics:
        print("  no finished epoch in metrics.csv yet: loss_curves.png not written", flush=True)
        return []
    fig = sweep_figures.plot_comparison_curves([run["info"]], [f"beta={run['args']['beta']:g}"],
                                               "Losses per epoch: train (top), test (bottom)", total="loss")
    figures.save_figure(fig, fig_dir / "loss_curves.png")
    return ["loss_curves.png"]


def analysis_key(run: dict, args, device: torch.device, data_key: tuple[str, str]) -> str:
    """What a run's figures and summary depend on: its checkpoint, the options, the data, the analysis code."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("run_dirs", "out", "data_dir")}
    made_from = {"global_step": run["ckpt"]["global_step"], "epochs_in_metrics": len(run["info"].metrics)}
    return figures.analysis_key(made_from, {**options, "data": data_key, "device": str(device)}, [Path(__file__)])


def iw_estimate(model: VAE, images: torch.Tensor, args) -> tuple[float, float]:
    """importance_weighted_ll with a line before it and a line every 20 s while it runs (minutes on a CPU)."""
    print(f"  importance-weighted log-likelihood of {len(images):,} test images (K = {args.iw_samples})", flush=True)
    done = {"images": 0}
    with still_running("IW estimate", status=lambda: f"{done['images']:,} of {len(images):,} images"):
        return importance_weighted_ll(model, images, args.iw_samples, args.seed, args.iw_batch_size, progress=done)


def test_set(data_key: tuple[str, str], data_cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels of (dataset, data_dir), loaded once per process."""
    if data_key not in data_cache:
        data_cache[data_key] = load_images(data_key[0], data_key[1], train=False)
    return data_cache[data_key]


@torch.no_grad()
def image_figures(model: VAE, images: torch.Tensor, labels: torch.Tensor, args, run: dict, fig_dir: Path) -> list[str]:
    """reconstructions.png, samples.png and interpolation.png of one run; returns their names."""
    epoch, run_seed = run["ckpt"]["epoch"], run["args"]["seed"]
    x = to_float(images[:args.n_recon])
    recon = model(x)[0]
    rows = [row for i in range(0, len(x), 8) for row in (("test\nimages", x[i:i + 8]),
                                                          ("recon-\nstructions", recon[i:i + 8]))]
    figures.save_figure(figures.image_rows(rows, f"Test images and their reconstructions at epoch {epoch} (decoder "
                                                 f"mean at z = mu)"), fig_dir / "reconstructions.png")
    # The run's own fixed z (vae_train.py draws it from the run's --seed), so samples.png continues the
    # samples/epoch_NNN.png grids of training: the same 64 points of the prior, decoded by the newest checkpoint.
    z = prior_noise(64, model.latent_dim, run_seed).to(images.device)
    figures.save_figure(plot_samples(torch.sigmoid(model.decoder(z)), f"64 samples at epoch {epoch} from the same "
                                     f"z ~ N(0, I) as the training grids\n(seed {run_seed}; decoder means)"),
                        fig_dir / "samples.png")

    i, j = interpolation_pair(labels, args.interp_indices, args.interp_classes)
    mu_ends = model.encode(to_float(images[[i, j]]))[0]
    ts = torch.linspace(0, 1, args.interp_steps, device=images.device)
    z_line = (1 - ts[:, None]) * mu_ends[0] + ts[:, None] * mu_ends[1]  # [steps, d]
    strip = torch.cat([to_float(images[[i]]), torch.sigmoid(model.decoder(z_line)), to_float(images[[j]])])
    word, class_names = CLASSES[run["args"]["dataset"]]
    names = tuple(f"{word} {class_names[int(labels[index])]}" for index in (i, j))
    figures.save_figure(plot_interpolation(strip, (i, j), names, ts, f"Decoded points on the line in z between two "
                                           f"latent means, epoch {epoch}"), fig_dir / "interpolation.png")
    return ["reconstructions.png", "samples.png", "interpolation.png"]


def tsne_figure(model: VAE, images: torch.Tensor, labels: torch.Tensor, dataset: str, args, epoch: int,
                fig_dir: Path) -> int:
    """tsne.png: t-SNE of the latent means of --tsne-points test images; returns how many points it used."""
    n_points = min(args.tsne_points, len(images))
    if args.perplexity >= n_points:
        raise UserError(f"--perplexity {args.perplexity:g} must be below the number of t-SNE points ({n_points}); "
                        f"lower it or raise --tsne-points")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:n_points]
    means = latent_means(model, images[chosen.to(images.device)]).numpy()
    print(f"  t-SNE of {n_points:,} latent means", flush=True)
    with still_running("t-SNE"):
        points = TSNE(n_components=2, perplexity=args.perplexity, init="pca", learning_rate="auto",
                      random_state=args.seed).fit_transform(means)
    figures.save_figure(plot_tsne(points, labels[chosen].numpy(), dataset,
                                  f"t-SNE of the {model.latent_dim}-d latent means of {n_points:,} test images at "
                                  f"epoch {epoch}\n(perplexity {args.perplexity:g})"), fig_dir / "tsne.png")
    return n_points


N_COMPARED_IMAGES = 10   # test images in the side-by-side reconstructions
N_COMPARED_SAMPLES = 16  # prior samples per run in the side-by-side samples (4 x 4)


def prior_noise(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The same z for every run of the same latent size: samples differ only by the decoders."""
    return torch.randn((n, latent_dim), generator=torch.Generator().manual_seed(seed))


def write_comparison(runs: list[dict], summaries: list[dict], out: Path, args, device: torch.device,
                     data_cache: dict) -> list[dict]:
    """The comparison figures, table (summary.csv, summary.json) and printed table in `out`; returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    infos = [run["info"] for run in runs]
    labels = experiments.run_labels(infos)  # titles say what is shown; which runs, the report's captions
    figures.save_figure(sweep_figures.plot_comparison_curves(infos, labels, "The bound at beta = 1 and its terms: "
                                                             "train (top), test (bottom)"), out / "loss_curves.png")

    data_keys = {(run["args"]["dataset"], args.data_dir or run["args"]["data_dir"]) for run in runs}
    if len({key[0] for key in data_keys}) == 1:
        images, _ = test_set(sorted(data_keys)[0], data_cache)
        with torch.no_grad():
            x = to_float(images[:N_COMPARED_IMAGES].to(device))
            recons, samples = [], []
            for run in runs:
                model = load_model(run, device)
                recons.append(model(x)[0])
                z = prior_noise(N_COMPARED_SAMPLES, model.latent_dim, args.seed).to(device)
                samples.append(torch.sigmoid(model.decoder(z)))
        epochs = sorted({summary["epoch"] for summary in summaries})
        at = f"epoch {epochs[0]}" if len(epochs) == 1 else "each run's newest checkpoint"
        title = f"The same test images (top row) reconstructed by each run ({at})"
        figures.save_figure(figures.image_rows([("test images", x), *zip(labels, recons)], title),
                            out / "reconstructions.png")
        title = f"Samples of each run's decoder from the same z ~ N(0, I) ({at})"
        figures.save_figure(figures.image_panels(list(zip(labels, samples)), 4, title), out / "samples.png")
    else:
        print("note: the runs were trained on different data sets: no side-by-side reconstructions or samples",
              flush=True)

    rows = []
    for label, info, summary in zip(labels, infos, summaries):
        rows.append({"label": label, "beta": summary["beta"], "arch": summary["arch"],
                     "latent_dim": summary["latent_dim"], "epoch": summary["epoch"],
                     "images_seen": int(info.total_images_seen()), "test_neg_elbo": -summary["test_elbo"],
                     "test_recon": summary["test_recon"], "test_kl": summary["test_kl"],
                     "iw_log_likelihood": summary["iw_log_likelihood"], "iw_samples": summary["iw_samples"],
                     "status": info.status(), "run_dir": summary["run_dir"]})
    figures.write_table(out, rows, rows)
    figures.print_table(rows, [("run", "label", ""), ("epoch", "epoch", ""), ("images seen", "images_seen", ","),
                               ("test -ELBO", "test_neg_elbo", ".2f"), ("recon", "test_recon", ".2f"),
                               ("KL", "test_kl", ".2f"), ("IW log p(x)", "iw_log_likelihood", ".2f")],
                        "(nats per image)")
    print(f"comparison in {out}", flush=True)
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    infos = experiments.collect_runs(args.run_dirs, "vae", log=lambda msg: print(msg, flush=True))
    runs = [read_run(info.dir) for info in infos]  # every folder checked before any slow work
    print("analyze_vae: " + json.dumps({k: v for k, v in vars(args).items() if k != "run_dirs"}), flush=True)
    data_cache = {}
    summaries = [analyze_run(run, args, device, data_cache) for run in runs]
    if len(runs) > 1:
        out = Path(args.out) if args.out else experiments.default_compare_dir(infos, "vae")
        write_comparison(runs, summaries, out, args, device, data_cache)
    return 0


if __name__ == "__main__":
    run_main(main)
