"""The coursework report: analyse the runs that count and the two sweeps, then write report/REPORT.md and .html.

    python report.py                                        # make report
    python report.py --vae-run runs/A --gan-run runs/B      # these runs (make report VAE_RUN=... GAN_RUN=...)
    python report.py --tsne-points 2000 --iw-images 1000    # quicker VAE analysis on a CPU
    python report.py --no-analysis                          # reuse the figures the analysis scripts already wrote
    python report.py --runs-root /scratch/runs --out /tmp/report

The runs shown, printed with the reason: the longest finished run of each script not in a sweep, unless --vae-run /
--gan-run names one (experiments.counted_run). The sweeps are the runs whose config.json says args.sweep ==
--vae-sweep (`make vae-betas`) or --gan-sweep (`make gan-sweep`); their comparisons go to RUNS_ROOT/compare/<sweep>/.

The report, in the coursework's order: a "before you hand in" box when something is missing (a sweep not run, a
DCGAN not trained on CIFAR-10, a newer run not chosen); the runs shown and why (Table 1); key numbers; the VAE
(losses, the beta sweep, reconstructions, samples, t-SNE, interpolation); the DCGAN (samples, losses, fixed-noise
progression, diagnostics, a quality number per milestone); the GAN experiments; an appendix with the code for the
notebook's test cells (common/testcell.py). Figures and tables are numbered, captions say what is shown, paths are
relative and the body holds no instructions: it is handed in as it is. The analysis scripts reuse what they made
before of the same checkpoint and options. OUT/report.json records the runs shown and the step of their model
files (check_submission.py fails on other files). OUT is replaced as a whole (built beside it, then renamed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
from pathlib import Path

import torch

from common import experiments, figures, testcell
from common.errors import UserError, run_main
from common.files import atomic_write_text, fsync_dir
from common.flags import DEFAULT_RUNS_ROOT, REPO_ROOT, ArgumentParser
from common.page import Report
from common.readers import read_metrics_csv


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-root", default=str(DEFAULT_RUNS_ROOT),
                        help="where the runs are (default: runs/ in the repository)")
    parser.add_argument("--vae-run", default=None,
                        help="the VAE run to report (default: the longest finished VAE run not in a sweep)")
    parser.add_argument("--gan-run", default=None,
                        help="the DCGAN run to report (default: the longest finished DCGAN run not in a sweep)")
    parser.add_argument("--vae-sweep", default="vae-betas",
                        help="the sweep of the beta section (default: %(default)s, as make vae-betas names it)")
    parser.add_argument("--gan-sweep", default="dcgan-sweep",
                        help="the sweep of the GAN-experiments section (default: %(default)s, as make gan-sweep)")
    parser.add_argument("--out", default=str(REPO_ROOT / "report"),
                        help="report folder, replaced as a whole (default: report/ in the repository)")
    parser.add_argument("--no-analysis", action="store_true",
                        help="do not run the analysis scripts; use the figures and summary.json they wrote before")
    g = parser.add_argument_group("passed on to analyze_vae.py (see its --help)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--data-dir", default=None, help="MNIST root (default: the one in each run's config.json)")
    g.add_argument("--tsne-points", type=int, default=None, help="test images in the t-SNE (default: all 10,000)")
    g.add_argument("--iw-samples", type=int, default=None, help="importance samples per image (default: 100)")
    g.add_argument("--iw-images", type=int, default=None, help="test images for the IW estimate (default: all)")
    g = parser.add_argument_group("passed on to analyze_gan.py (see its --help)")
    g.add_argument("--quality", default=None, choices=["auto", "fid", "classifier-fid", "diversity", "off"],
                   help="the quality number per milestone checkpoint (default: auto)")
    g.add_argument("--quality-samples", type=int, default=None,
                   help="generated images per milestone for the FIDs (default: 5000)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Finding the runs and analysing them


def choose_runs(args, runs_root: Path, log=print) -> dict:
    """The runs the report shows, each printed with the reason; sweeps by name. The notes and warnings on runs not
    chosen or left out also go into the report's "before you hand in" box."""
    notes = []

    def note(message: str) -> None:
        log(message)
        text = message.removeprefix("note: ").removeprefix("warning: ")
        notes.append(text[:1].upper() + text[1:] + ".")

    vae, vae_why = experiments.counted_run(runs_root, "vae", args.vae_run, "make report VAE_RUN", log=note)
    gan, gan_why = experiments.counted_run(runs_root, "dcgan", args.gan_run, "make report GAN_RUN", log=note)
    log(f"report: VAE: {vae.name}: {vae_why}")
    log(f"report: DCGAN: {gan.name}: {gan_why}")
    vae_sweep = experiments.sweep_runs(runs_root, "vae", args.vae_sweep, log=note)
    gan_sweep = experiments.sweep_runs(runs_root, "dcgan", args.gan_sweep, log=note)
    for name, sweep in ((args.vae_sweep, vae_sweep), (args.gan_sweep, gan_sweep)):
        log(f"report: sweep {name}: {', '.join(run.name for run in sweep) or 'no runs'}")
    return {"vae": vae, "vae_why": vae_why, "gan": gan, "gan_why": gan_why, "vae_sweep": vae_sweep,
            "gan_sweep": gan_sweep, "notes": notes}


def analyse(args, chosen: dict, runs_root: Path) -> None:
    """The analysis scripts on the runs shown and on each sweep, in this process (their main() raises UserError
    with a message, as on the command line)."""
    import analyze_gan
    import analyze_vae

    def given(*names: str) -> list[str]:  # the flags typed, passed on as typed
        return ["--device", args.device] + [part for name in names if getattr(args, name) is not None
                                            for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]

    vae_flags = given("data_dir", "tsne_points", "iw_samples", "iw_images")
    gan_flags = given("quality", "quality_samples")
    for script, main, flags, run, sweep, sweep_name in (
            ("analyze_vae.py", analyze_vae.main, vae_flags, chosen["vae"], chosen["vae_sweep"], args.vae_sweep),
            ("analyze_gan.py", analyze_gan.main, gan_flags, chosen["gan"], chosen["gan_sweep"], args.gan_sweep)):
        if run.dir not in [member.dir for member in sweep]:
            print(f"report: {script} {run.dir}", flush=True)
            main([str(run.dir), *flags])
        if sweep:
            print(f"report: {script} on sweep {sweep_name} ({len(sweep)} runs)", flush=True)
            out = ["--out", str(experiments.compare_dir(runs_root, sweep_name))] if len(sweep) > 1 else []
            main([*(str(member.dir) for member in sweep), *out, *flags])


def read_summary(folder: Path, run_dir: Path | None = None) -> dict | list:
    """The summary.json an analysis script wrote into `folder` (a run's figures/ or a sweep's comparison)."""
    path = folder / "summary.json"
    if not path.exists():
        or_else = f" (or the analysis script on {run_dir})" if run_dir else ""
        raise UserError(f"{path} is missing: run the report without --no-analysis{or_else}")
    return json.loads(path.read_text())


def param_counts(run: experiments.RunInfo) -> list[int]:
    """Parameters of a run's models, [VAE] or [G, D], built on the meta device from its settings (no memory)."""
    import dcgan_train
    import vae_train
    args = run.settings
    with torch.device("meta"):
        models = ([vae_train.VAE(args.arch, args.latent_dim, args.likelihood)] if run.script == "vae" else
                  dcgan_train.build_models(args, dcgan_train.dataset_channels(args.dataset)))
    return [sum(p.numel() for p in model.parameters()) for model in models]


def trained(run: experiments.RunInfo) -> str:
    """'8 of 10 epochs, 479,232 training images, 3 min' (the minutes from metrics.csv's epoch times, when recorded)."""
    times = [t for t in (row.get("epoch_time_s", math.nan) for row in run.metrics) if math.isfinite(t)]
    minutes = sum(times) / 60 if times else None
    spent = "" if minutes is None else f", {minutes:.0f} min" if minutes >= 1 else f", {minutes * 60:.0f} s"
    return f"{run.epochs_done} of {run.args['epochs']} epochs, {run.total_images_seen():,.0f} training images{spent}"


def dataset_name(dataset: str) -> str:
    return experiments.DATASET_NAMES.get(dataset, dataset)


def vae_about(vae: experiments.RunInfo) -> str:
    args = vae.settings
    return f"{args.arch} VAE, latent {args.latent_dim}, beta {args.beta:g}, {args.likelihood} likelihood"


def gan_settings(run_args: dict) -> str:
    return (f"{run_args['image_size']}x{run_args['image_size']}, nz {run_args['nz']}, ngf {run_args['ngf']}, "
            f"ndf {run_args['ndf']}, {run_args['loss']} loss, D norm {run_args['d_norm']}, batch "
            f"{run_args['batch_size']}")


def sweep_comparison(runs_root: Path, name: str, sweep: list, kind: str) -> tuple[Path, dict | list]:
    """The comparison folder of a sweep and its summary.json, checked to be of exactly these runs (a stale one from
    an older set of runs would mislabel the figures)."""
    folder = experiments.compare_dir(runs_root, name)
    data = read_summary(folder)
    shown = [row["run_dir"] for row in data] if kind == "vae" else data["runs"]
    if sorted(map(str, shown)) != sorted(str(run.dir) for run in sweep):
        raise UserError(f"{folder} compares other runs than sweep {name} has now: run the report without "
                        f"--no-analysis")
    return folder, data


def missing_sweep(sweep: list, name: str, runs_root: Path, make_target: str, what: str) -> str | None:
    """The to-do line for a sweep with fewer than two runs (nothing to compare), else None."""
    if len(sweep) >= 2:
        return None
    found = f"only `{sweep[0].name}`" if sweep else "no runs"
    return (f"No {what} yet: sweep `{name}` has {found} in `{runs_root}`. Run `make {make_target}`, then `make "
            f"report` again.")


# ----------------------------------------------------------------------------------------------------------------
# The VAE


def write_vae_section(report: Report, vae: experiments.RunInfo, sweep: list, sweep_name: str,
                      runs_root: Path) -> dict:
    folder, args = vae.dir / "figures", vae.settings
    summary = read_summary(folder, vae.dir)
    n_params, = param_counts(vae)
    report.heading(2, f"VAE on {dataset_name(summary['dataset'])}")
    report.para(f"The VAE of Table 1 ({vae_about(vae)}), {n_params:,} parameters, at epoch {summary['epoch']} of "
                f"{args.epochs}: test ELBO **{summary['test_elbo']:.2f}** nats per image (reconstruction "
                f"{summary['test_recon']:.2f}, KL {summary['test_kl']:.2f}); importance-weighted log-likelihood "
                f"**{summary['iw_log_likelihood']:.2f}** nats per image (K = {summary['iw_samples']}, "
                f"{summary['iw_images']:,} test images).")
    report.heading(3, "Loss curves")
    report.figure(folder / "loss_curves.png", "vae_loss_curves.png",
                  f"Train (top: means over each epoch's steps) and test (bottom: at each epoch's end) loss per epoch: "
                  f"total (recon + beta x KL), reconstruction NLL and KL, nats per image; final test ELBO "
                  f"{summary['test_elbo']:.2f}.")
    write_beta_section(report, sweep, sweep_name, runs_root)
    for heading, figure, caption in (
            ("Reconstructions", "reconstructions.png",
             f"Rows of test images, each above the row of their reconstructions (decoder mean at z = mu), epoch "
             f"{summary['epoch']}; reconstruction NLL {summary['test_recon']:.2f} nats per image."),
            ("Samples", "samples.png",
             f"64 images decoded from z ~ N(0, I) ({args.likelihood.capitalize()} means) at epoch "
             f"{summary['epoch']}: the same 64 z as the grids saved during training (samples/prior_epoch_NNN.png, "
             f"drawn from the run's seed {args.seed}), so they show how these samples changed."),
            ("t-SNE of the latent space", "tsne.png",
             f"t-SNE of the {args.latent_dim}-d latent means of {summary['tsne_points']:,} test images, coloured "
             f"by class."),
            ("Interpolation", "interpolation.png",
             "Decoded points on the straight line between the latent means of two test images (red frames).")):
        report.heading(3, heading)
        report.figure(folder / figure, f"vae_{figure}", caption)
    return {"params": n_params, **summary}


def write_beta_section(report: Report, sweep: list, name: str, runs_root: Path) -> None:
    if len(sweep) < 2:  # the box at the top says so
        return
    report.heading(3, f"Varying beta (sweep `{name}`)")
    folder, rows = sweep_comparison(runs_root, name, sweep, "vae")
    first, last = rows[0], rows[-1]
    x_name = experiments.x_axis(sweep)[0]
    report.figure(folder / "loss_curves.png", "vae_beta_curves.png",
                  f"The runs of the beta sweep (Table 1), labelled by the settings that differ: the negative ELBO at "
                  f"beta = 1 (recon + KL: the bound every run is judged by, whatever beta it trained with), the "
                  f"reconstruction NLL and the KL, in nats per image, on the training set (top row: means over each "
                  f"epoch's steps) and the test set (bottom row: at each epoch's end), "
                  f"{'per epoch' if x_name == 'epoch' else 'against ' + x_name}. From {first['label']} to "
                  f"{last['label']} the test KL goes from {first['test_kl']:.2f} to {last['test_kl']:.2f} and the "
                  f"test reconstruction NLL from {first['test_recon']:.2f} to {last['test_recon']:.2f}.")
    report.table(["run", "epochs", "images seen", "test -ELBO", "recon", "KL", "IW log p(x)"],
                 [[row["label"], f"{row['epoch']}", f"{row['images_seen']:,}", f"{row['test_neg_elbo']:.2f}",
                   f"{row['test_recon']:.2f}", f"{row['test_kl']:.2f}", f"{row['iw_log_likelihood']:.2f}"]
                  for row in rows],
                 "The beta sweep: test negative ELBO (beta = 1), reconstruction NLL, KL and importance-weighted "
                 "log-likelihood in nats per image at each run's newest checkpoint.")
    report.figure(folder / "reconstructions.png", "vae_beta_reconstructions.png",
                  "The same test images (top row) reconstructed by each run of the beta sweep.")
    report.figure(folder / "samples.png", "vae_beta_samples.png",
                  "16 samples of each run of the beta sweep, every decoder given the same z ~ N(0, I).")


# ----------------------------------------------------------------------------------------------------------------
# The DCGAN


def write_gan_section(report: Report, gan: experiments.RunInfo, todo: list[str]) -> dict:
    run_args, folder = gan.args, gan.dir / "figures"
    summary = read_summary(folder, gan.dir)
    n_g, n_d = param_counts(gan)
    last, best_fid, milestones = summary.get("last_epoch", {}), summary.get("best_fid"), summary.get("milestones") or {}
    fid_text = (f"best FID **{best_fid['fid']:.2f}** (epoch {best_fid['epoch']}, {gan.settings.fid_samples:,} "
                f"samples)" if best_fid else "FID not measured during training (no Inception weights)")
    report.heading(2, f"DCGAN on {dataset_name(run_args['dataset'])}")
    report.para(f"The DCGAN of Table 1 ({gan_settings(run_args)}): G {n_g:,} + D {n_d:,} = **{n_g + n_d:,}** "
                f"parameters (limit 25,000,000); {summary['epochs_done']} of {summary['epochs_planned']} epochs; "
                f"{fid_text}.")
    not_cifar10 = experiments.not_cifar10(run_args)
    if not_cifar10:
        report.para(f"**This DCGAN was {not_cifar10}.**")
        todo.append(f"The DCGAN was {not_cifar10}. Train one on CIFAR-10 (`make dcgan`), then `make report` again.")
    if last:  # D gives a logit (the appendix says so); D(x) and D(G(z)) are its sigmoid, from D's and G's steps
        report.para(f"Last epoch (means over its steps): loss_d {last.get('loss_d', math.nan):.3f}, loss_g "
                    f"{last.get('loss_g', math.nan):.3f}, D(x) {last.get('d_real', math.nan):.3f} on real images in "
                    f"D's steps, D(G(z)) {last.get('d_fake', math.nan):.3f} on generated images in G's steps.")
    curves = step_curves(gan, summary)
    epochs = summary.get("progression_epochs") or []
    at = (f"epochs {', '.join(map(str, epochs[:-1]))} and {epochs[-1]} (rows)" if len(epochs) > 1 else
          f"epoch {epochs[0]}, the only epoch with a grid (one row)" if epochs else "evenly spaced epochs (rows)")
    for heading, figure, name, caption in (
            ("Samples", "final_samples.png", "gan_samples.png",
             f"100 samples from the {'EMA ' if run_args.get('ema', 0) > 0 else ''}generator at epoch "
             f"{summary.get('checkpoint', {}).get('epoch', '?')}"
             f"{'; ' + fid_text.replace('**', '') if best_fid else ''}."),
            ("Discriminator and generator losses", "losses.png", "gan_losses.png", losses_caption(*curves)),
            ("Fixed-noise progression", "fixed_noise_progression.png", "gan_fixed_noise_progression.png",
             f"The same 8 noise vectors (columns) decoded at {at}.")):
        report.heading(3, heading)
        report.figure(folder / figure, name, caption)
    write_gan_diagnostics(report, gan, summary, curves, fid_text, milestone_caption(gan, milestones, todo))
    return {"params_g": n_g, "params_d": n_d, "best_fid": best_fid, "fid_samples": gan.settings.fid_samples,
            "milestones": milestones, "last": last}


def step_curves(gan: experiments.RunInfo, summary: dict) -> tuple[str, int]:
    """(what losses.png and d_outputs.png draw of steps.csv beside the epoch means: figures.step_curves, the rule the
    plots follow; --log-every), from the analysis (or the CSVs, for an analysis made before it recorded it)."""
    losses = summary.get("losses") or {}
    n_rows = losses.get("step_rows", len(read_metrics_csv(gan.dir / "steps.csv")))
    curves = losses.get("curves") or figures.step_curves(n_rows, summary["epochs_done"])
    return curves, losses.get("log_every", gan.args["log_every"])


def losses_caption(curves: str, every: int) -> str:
    """What losses.png draws (analyze_gan.plot_losses, by the same figures.step_curves)."""
    finer = {"none": "", "faint": f", and {per_row(every)} (faint)",
             "smoothed": f", {per_row(every)} (faint) and its smoothed trend (an exponential moving average)"}
    return f"D and G losses: the mean of each epoch (dots){finer[curves]}."


def d_outputs_caption(loss: str, curves: str, every: int) -> str:
    """What d_outputs.png draws (analyze_gan.plot_d_outputs, by the same figures.step_curves)."""
    trend = {"none": "", "faint": f"; faint: {per_row(every)}", "smoothed": f"; faint: {per_row(every)}, smoothed"}
    if loss == "bce":
        return (f"D(x), D's mean probability on the real images of its steps, and D(G(z)), on the generated images "
                f"of G's steps, per epoch (dots{trend[curves]}); 0.5: D cannot tell them apart.")
    return (f"The mean sigmoid of D's logits on real and generated images per epoch (dots{trend[curves]}); a hinge D "
            f"gives no probabilities: read the gap between the lines.")


def per_row(every: int) -> str:
    """What a row of steps.csv holds: the mean of every --log-every steps."""
    return "each step's value" if every == 1 else f"the mean of every {every} steps"


def write_gan_diagnostics(report: Report, gan: experiments.RunInfo, summary: dict, curves: tuple[str, int],
                          fid_text: str, milestones_caption: str) -> None:
    """The DCGAN's extra figures that its analysis made (D's outputs, FID, diversity, nearest neighbours,
    milestones), each with its caption."""
    reference = (summary.get("diversity") or {}).get("training_images") is not None
    captions = {
        "d_outputs.png": d_outputs_caption(gan.args["loss"], *curves),
        "fid.png": f"FID against the training set per evaluation; {fid_text.replace('**', '')}.",
        "diversity.png": (f"Diversity of the 64 fixed-noise samples per epoch (their mean pairwise RMS distance; a "
                          f"drop means mode collapse){'; dashed: 64 training images' * reference}."),
        "nearest_neighbours.png": ("Samples (left of the red line) beside their nearest training images in pixel "
                                   "space: copies would mean memorisation."),
        "milestones.png": milestones_caption}
    made = [figure for figure in captions if figure in summary.get("figures", [])]
    if made:
        report.heading(3, "More GAN diagnostics")
    for figure in made:
        report.figure(gan.dir / "figures" / figure, f"gan_{figure}", captions[figure])


def milestone_caption(gan: experiments.RunInfo, milestones: dict, todo: list[str]) -> str:
    """The measure named by what it is and its sample count, the best milestone; how to export the best one goes to
    the to-do list (unless the run's model files are from it)."""
    measure, best, n = milestones.get("measure", ""), milestones.get("best"), milestones.get("samples")
    samples = f", {n:,} samples each" if n else ""
    if milestones.get("kind") == "diversity":
        what = (f"The diversity of each milestone checkpoint's samples (checkpoints/epoch-NNN.pt; the mean pairwise "
                f"RMS distance{samples}). With no FID here, the best is the one closest to the training images' "
                f"diversity (dashed)")
    else:
        what = f"The {measure} of each milestone checkpoint (checkpoints/epoch-NNN.pt{samples}; lower is better)"
    if best is None:
        return f"{what}; no best epoch by this measure."
    if best["epoch"] != milestones.get("exported_epoch"):
        todo.append(f"The DCGAN's best milestone by {measure} is epoch {best['epoch']}, not the epoch of its model "
                    f"files: `python analyze_gan.py {gan.dir} --export-epoch {best['epoch']}` exports G and D from "
                    f"it, if you would rather hand those in.")
        return f"{what}; best: epoch {best['epoch']} ({measure} {best['value']:.4g})."
    return f"{what}; best: epoch {best['epoch']} ({measure} {best['value']:.4g}), the epoch of the model files."


def write_gan_sweep_section(report: Report, sweep: list, name: str, runs_root: Path) -> None:
    if len(sweep) < 2:  # the box at the top says so
        return
    report.heading(2, f"GAN experiments (sweep `{name}`)")
    folder, data = sweep_comparison(runs_root, name, sweep, "dcgan")
    shared = sweep[0].args
    x_text = ("The x axes count epochs: every variant trains on the same images per epoch"
              if data.get("x_axis") == "epoch" else
              "The x axes count training images seen, so runs on different amounts of data compare fairly")
    report.para(f"{len(sweep)} variants (Table 1), each labelled by the settings that differ between them: "
                f"{', '.join(data['labels'])}. Shared: {dataset_name(shared['dataset'])}, "
                f"batch {shared['batch_size']}, {shared['epochs']} epochs planned. {x_text}.")
    for source, target, caption in sweep_figure_captions(data):
        if source in data["figures"]:
            report.figure(folder / source, target, f"{caption}.")
    measure = next((row["best_milestone_measure"] for row in data["table"] if row["best_milestone_measure"]), "")
    with_fid = any(math.isfinite(row["best_fid"]) for row in data["table"])
    columns = (["run", "loss", "epochs", "images seen", "loss_d", "loss_g", "D(x)", "D(G(z))", "diversity (last "
                "epoch)"] + ([f"best milestone by {measure}"] if measure else []) + (["best FID"] if with_fid else []))
    rows = [[row["label"], row["loss"], f"{row['epochs']}", f"{row['images_seen']:,}",
             *(f"{row[key]:.3f}" for key in ("loss_d", "loss_g", "d_real", "d_fake")),
             f"{row['diversity_last_epoch']:.4f}"]
            + ([f"epoch {row['best_milestone_epoch']} ({row['best_milestone_value']:.4g})"
                if row["best_milestone_epoch"] != "" else ""] if measure else [])
            + ([f"{row['best_fid']:.2f}" if math.isfinite(row["best_fid"]) else ""] if with_fid else [])
            for row in data["table"]]
    report.table(columns, rows, "The GAN variants. loss_d, loss_g, D(x), D(G(z)): means over each variant's last "
                                "epoch; diversity: of its last fixed-noise grid" +
                 (f"; best milestone: the milestone checkpoint with the best {measure}" if measure else "") + ".")


def sweep_figure_captions(data: dict) -> list[tuple[str, str, str]]:
    """(comparison figure, its name in the report, what it shows) for a GAN sweep."""
    quality = [f"{s['milestones']['measure']} per milestone checkpoint" for s in data["summaries"]
               if (s.get("milestones") or {}).get("kind") not in (None, "diversity") and s["milestones"]["rows"]][:1]
    fid = ["Inception FID during training"] if any(s.get("best_fid") for s in data["summaries"]) else []
    return [("compare_losses.png", "gan_sweep_losses.png",
             "The GAN variants' D loss (top) and G loss (bottom), epoch means; one column per loss type, since BCE "
             "and hinge values are not on one scale"),
            ("compare_d_outputs.png", "gan_sweep_d_outputs.png",
             "Mean D probability on real (left) and generated (right) images, BCE variants only (a hinge D gives "
             "no probabilities)"),
            ("compare_samples.png", "gan_sweep_samples.png",
             "Each variant's samples from its fixed noise at its last epoch (the same noise for the same seed)"),
            ("compare_progression.png", "gan_sweep_progression.png",
             "The first fixed noise vectors (columns) at evenly spaced epochs (rows), per variant: rows that "
             "stop changing, or columns that look alike, mean collapse"),
            ("compare_diversity.png", "gan_sweep_diversity.png",
             "Mean pairwise RMS distance of each variant's 64 fixed-noise samples (a drop means mode collapse); "
             "dashed: 64 training images"),
            ("compare_quality.png", "gan_sweep_quality.png",
             "The GAN variants' " + (" and ".join(fid + quality) or "sample quality"))]


def runs_table(report: Report, args, chosen: dict) -> None:
    """Table 1: every run the report shows, its settings, how long it trained and why it is the one shown."""
    rows = [["VAE", f"`{chosen['vae'].name}`", vae_about(chosen["vae"]), trained(chosen["vae"]), chosen["vae_why"]],
            ["DCGAN", f"`{chosen['gan'].name}`", gan_settings(chosen["gan"].args), trained(chosen["gan"]),
             chosen["gan_why"]]]
    for role, name, sweep in (("beta sweep", args.vae_sweep, chosen["vae_sweep"]),
                              ("GAN variant", args.gan_sweep, chosen["gan_sweep"])):
        rows += [[role, f"`{run.name}`", label, trained(run), f"sweep `{name}`, the newest run of these settings"]
                 for run, label in zip(sweep, experiments.run_labels(sweep))] if len(sweep) > 1 else []
    report.table(["shown as", "run folder", "settings", "trained", "why this run"], rows,
                 "The runs shown; the sweeps' runs labelled by the settings that differ between them.")


def build(args, build_dir: Path, chosen: dict, runs_root: Path) -> None:
    report = Report(build_dir, shown_folders(args, chosen, runs_root))
    report.heading(1, "Coursework report: a VAE on MNIST and a DCGAN")
    box_at = len(report.blocks)  # what to do before handing in goes here, once the sections have been read
    runs_table(report, args, chosen)
    key_at = len(report.blocks)  # the key-number table goes here, once the sections have been read
    todo = [missing for missing in (
        missing_sweep(chosen["vae_sweep"], args.vae_sweep, runs_root, "vae-betas", "beta comparison"),
        missing_sweep(chosen["gan_sweep"], args.gan_sweep, runs_root, "gan-sweep", "GAN experiments")) if missing]
    vae = write_vae_section(report, chosen["vae"], chosen["vae_sweep"], args.vae_sweep, runs_root)
    gan = write_gan_section(report, chosen["gan"], todo)
    write_gan_sweep_section(report, chosen["gan_sweep"], args.gan_sweep, runs_root)
    write_test_cell_section(report, chosen["gan"].args)
    report.blocks.insert(key_at, ("table", ["key number", "value"], key_numbers(vae, gan),
                                  "Key numbers, per image in nats (natural log): higher ELBO and log p(x) are better, "
                                  "lower FID is better."))
    if todo or chosen["notes"]:  # a framed list (page.py's "box" block)
        report.blocks.insert(box_at, ("box", "Before you hand in", todo + chosen["notes"]))
    atomic_write_text(build_dir / "REPORT.md", report.markdown())
    atomic_write_text(build_dir / "REPORT.html", report.html("Coursework report: VAE and DCGAN"))
    # For check_submission.py: the runs shown, and the step their model files were at (a run trained on since
    # exports other files, which this report does not show).
    shown = {"made": datetime.datetime.now().isoformat(timespec="seconds"), "runs_root": str(runs_root),
             "vae_run": str(chosen["vae"].dir), "gan_run": str(chosen["gan"].dir),
             "exported_steps": {f"{key}_run": (chosen[key].export or {}).get("global_step") for key in ("vae", "gan")},
             "vae_sweep": {"name": args.vae_sweep, "runs": [str(run.dir) for run in chosen["vae_sweep"]]},
             "gan_sweep": {"name": args.gan_sweep, "runs": [str(run.dir) for run in chosen["gan_sweep"]]}}
    atomic_write_text(build_dir / "report.json", json.dumps(shown, indent=2) + "\n")


def shown_folders(args, chosen: dict, runs_root: Path) -> dict[str, str]:
    """Absolute folders of this machine -> how the report shows them: relative to the repository (where the
    commands in the report run), else to the runs root's parent, else by name."""
    def shown(path: Path) -> str:
        base = next((base for base in (REPO_ROOT, runs_root.parent) if path.is_relative_to(base)), None)
        return path.name if base is None else str(path.relative_to(base))

    folders = {str(REPO_ROOT) + os.sep: "", str(runs_root): shown(runs_root)}
    runs = [chosen["vae"], chosen["gan"], *chosen["vae_sweep"], *chosen["gan_sweep"]]
    folders.update({str(run.dir.parent): shown(run.dir.parent) for run in runs})
    for named in (args.vae_run, args.gan_run):  # as typed: the reason a run was chosen repeats it
        if named and Path(named).is_absolute():
            folders[named.rstrip(os.sep)] = shown(Path(named).resolve())
    return folders


def key_numbers(vae: dict, gan: dict) -> list[list[str]]:
    """One number per quantity and epoch: a milestone measured at an epoch that training measured too (with its own
    sample count) is named, not given a second value."""
    rows = [
        ["VAE test ELBO", f"{vae['test_elbo']:.2f} nats per image (epoch {vae['epoch']})"],
        ["VAE importance-weighted log p(x)", f"{vae['iw_log_likelihood']:.2f} nats per image (K = "
                                             f"{vae['iw_samples']}, {vae['iw_images']:,} test images)"],
        ["VAE parameters", f"{vae['params']:,}"],
        ["DCGAN FID (Inception)", f"best {gan['best_fid']['fid']:.2f} at epoch {gan['best_fid']['epoch']} "
                                  f"({gan['fid_samples']:,} samples)" if gan["best_fid"] else
                                  "not measured during training (no Inception weights)"],
    ]
    at_epoch = {"fid": (gan["best_fid"] or {}).get("epoch")}
    if "cfid" in gan["last"]:  # gan_metrics.py, measured during training on MNIST and Fashion-MNIST
        last = gan["last"]
        at_epoch["classifier-fid"] = int(last["epoch"])
        rows.append(["DCGAN classifier FID", f"{last['cfid']:.1f} at epoch {last['epoch']:.0f}, the last "
                                             f"({gan['fid_samples']:,} samples); class shares {last['class_min']:.1%} "
                                             f"to {last['class_max']:.1%} of the samples"])
    milestones = gan["milestones"] or {}
    best = milestones.get("best")
    if best:
        measured = best["epoch"] == at_epoch.get(milestones.get("kind"))
        n = f", {milestones['samples']:,} samples" if milestones.get("samples") else ""
        rows.append([f"DCGAN best milestone ({milestones['measure']})",
                     f"epoch {best['epoch']} (its {milestones['measure']} is in the row above)" if measured else
                     f"epoch {best['epoch']}: {best['value']:.4g}{n}"])
    rows.append(["DCGAN parameters", f"G {gan['params_g']:,} + D {gan['params_d']:,} = "
                                     f"{gan['params_g'] + gan['params_d']:,} (limit 25,000,000)"])
    return rows


def write_test_cell_section(report: Report, gan_args: dict) -> None:
    """The code for the coursework notebook's test cells: each model's transform and denorm, as the training
    scripts define them (common/testcell.py takes them from their source; check_submission.py runs them)."""
    report.heading(2, "Appendix: code for the notebook's test cells")
    report.para("The data transform and the denorm function of the models handed in, as the training scripts define "
                "them, with the imports they need: the first block for the VAE's test cell, the second for the "
                "DCGAN's (both define `transform` and `denorm`).")
    report.para("VAE (`vae_train.py`): `VAE_model.pth` takes MNIST images through `transform`, shape (N, 1, 28, "
                "28), and returns (reconstruction, mu, logvar); the reconstruction is in [0, 1], as `denorm` leaves "
                "it.")
    report.code(testcell.cell_code(testcell.SCRIPTS["VAE"]))
    report.para(f"DCGAN (`dcgan_train.py`): `DCGAN_model_G.pth` maps z of shape (N, {gan_args['nz']}, 1, 1) to "
                f"images in [-1, 1], which `denorm` maps to [0, 1]. `DCGAN_model_D.pth` takes images through "
                f"`transform`, shape (N, 3, 32, 32), and returns one raw logit per image, shape (N,): there is no "
                f"sigmoid inside, so `torch.sigmoid(D(x))` is the probability that x is real.")
    report.code(testcell.cell_code(testcell.SCRIPTS["DCGAN"]))


def replace_folder(build_dir: Path, out: Path) -> None:
    """Put build_dir where out is: two renames, so out is always either the old report or the new one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(build_dir, out)
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs_root = Path(args.runs_root).resolve()
    out = Path(args.out).resolve()
    if not runs_root.is_dir():
        raise UserError(f"--runs-root {runs_root}: no such folder")
    if out.exists() and any(out.iterdir()) and not (out / "REPORT.md").exists():
        raise UserError(f"--out {out} holds files but no REPORT.md; it would be replaced as a whole, so "
                        f"give an empty or new folder")
    chosen = choose_runs(args, runs_root, log=lambda msg: print(msg, flush=True))  # before any slow analysis
    if not args.no_analysis:
        analyse(args, chosen, runs_root)

    out.parent.mkdir(parents=True, exist_ok=True)
    build_dir = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        build(args, build_dir, chosen, runs_root)
        replace_folder(build_dir, out)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir)
    print(f"report: wrote {out / 'REPORT.md'} and {out / 'REPORT.html'} ({len(list((out / 'figures').iterdir()))} "
          f"figures in {out / 'figures'})", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
