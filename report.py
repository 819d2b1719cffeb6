"""The coursework report: analyse the runs that count and the two sweeps, then write report/REPORT.md and .html.

    python report.py                                        # make report
    python report.py --vae-run runs/A --gan-run runs/B      # these runs (make report VAE_RUN=... GAN_RUN=...)
    python report.py --tsne-points 2000 --iw-images 1000    # quicker VAE analysis on a CPU
    python report.py --no-analysis                          # reuse the figures the analysis scripts already wrote
    python report.py --runs-root /scratch/runs --out /tmp/report

Which runs it shows, printed with the reason (experiments.counted_run): the VAE is the newest finished
vae_train.py run in RUNS_ROOT that is not a sweep member, unless --vae-run names one (then anything goes, with a
warning for a sweep member or an unfinished run); the DCGAN likewise. A longer finished run of the same script
gets a warning. The sweeps are the runs whose config.json says args.sweep == --vae-sweep (default vae-betas, as
`make vae-betas` records it) and --gan-sweep (default dcgan-sweep, `make gan-sweep`); their comparisons are written
to RUNS_ROOT/compare/<sweep>/, which no glob over run folders mistakes for a run (every reader skips it).

The report, in the coursework's order: key numbers; the VAE (loss curves; varying beta: the sweep's negative ELBO
at beta 1, reconstruction and KL, train and test, a table, reconstructions and samples side by side;
reconstructions; samples; t-SNE; interpolation); the DCGAN (samples, losses, fixed-noise progression, more
diagnostics, a quality number per milestone checkpoint); the GAN experiments (the sweep side by side: losses, D
outputs, samples, progression, diversity, FIDs when measured, a table). Every caption names the run(s) and their
settings; the figures' titles say what they show.

The report ends with the code for the notebook's test cells (common/testcell.py: each model's transform and denorm,
from the training scripts' source). Paths in it are relative to the repository (or to the runs root's folder): it
can be handed in as it is. The analysis scripts reuse what they made before of the same checkpoint with the same
options, so a report after `make analyze-vae` / `make analyze-gan` does not redo their work.
OUT/report.json records which runs the report shows and the step of their model files (check_submission.py fails
when it checks other files).

OUT is replaced as a whole (built beside it, then renamed into place), so it never holds a half-written report or
figures from an older one.
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

import common
from common import experiments
from common.page import Report

DATASET_NAMES = experiments.DATASET_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--runs-root", default=str(common.DEFAULT_RUNS_ROOT),
                        help="where the runs are (default: runs/ in the repository)")
    parser.add_argument("--vae-run", default=None,
                        help="the VAE run to report (default: the newest finished VAE run not in a sweep)")
    parser.add_argument("--gan-run", default=None,
                        help="the DCGAN run to report (default: the newest finished DCGAN run not in a sweep)")
    parser.add_argument("--vae-sweep", default="vae-betas",
                        help="the sweep of the beta section (default: %(default)s, as make vae-betas names it)")
    parser.add_argument("--gan-sweep", default="dcgan-sweep",
                        help="the sweep of the GAN-experiments section (default: %(default)s, as make gan-sweep)")
    parser.add_argument("--out", default=str(common.REPO_ROOT / "report"),
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
# Finding the runs


def choose_runs(args, runs_root: Path, log=print) -> dict:
    """The runs the report shows, each printed with the reason; sweeps by name, with notes on runs left out."""
    notes = []

    def note(message: str) -> None:
        log(message)
        notes.append(message.removeprefix("note: "))

    vae, vae_why = experiments.counted_run(runs_root, "vae", args.vae_run, "make report VAE_RUN", log=log)
    gan, gan_why = experiments.counted_run(runs_root, "dcgan", args.gan_run, "make report GAN_RUN", log=log)
    log(f"report: VAE: {vae.name}: {vae_why}")
    log(f"report: DCGAN: {gan.name}: {gan_why}")
    vae_sweep = experiments.sweep_runs(runs_root, "vae", args.vae_sweep, log=note)
    gan_sweep = experiments.sweep_runs(runs_root, "dcgan", args.gan_sweep, log=note)
    for name, sweep in ((args.vae_sweep, vae_sweep), (args.gan_sweep, gan_sweep)):
        log(f"report: sweep {name}: {', '.join(run.name for run in sweep) or 'no runs'}")
    return {"vae": vae, "vae_why": vae_why, "gan": gan, "gan_why": gan_why, "vae_sweep": vae_sweep,
            "gan_sweep": gan_sweep, "notes": notes}


# ----------------------------------------------------------------------------------------------------------------
# Running the analysis scripts (in this process: their main() raises UserError with a message, as on the CLI)


def analyse(args, chosen: dict, runs_root: Path) -> None:
    import analyze_gan
    import analyze_vae

    vae_flags = ["--device", args.device]
    for flag, value in (("--data-dir", args.data_dir), ("--tsne-points", args.tsne_points),
                        ("--iw-samples", args.iw_samples), ("--iw-images", args.iw_images)):
        if value is not None:
            vae_flags += [flag, str(value)]
    gan_flags = ["--device", args.device]
    for flag, value in (("--quality", args.quality), ("--quality-samples", args.quality_samples)):
        if value is not None:
            gan_flags += [flag, str(value)]
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


# ----------------------------------------------------------------------------------------------------------------
# Numbers


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "figures" / "summary.json"
    if not path.exists():
        raise common.UserError(f"{path} is missing: run the report without --no-analysis (or the analysis script "
                               f"on {run_dir})")
    return json.loads(path.read_text())


def vae_param_count(vae: experiments.RunInfo) -> int:
    from vae_train import VAE
    args = vae.settings
    with torch.device("meta"):
        model = VAE(args.arch, args.latent_dim, args.likelihood)
    return sum(p.numel() for p in model.parameters())


def gan_param_counts(gan: experiments.RunInfo) -> tuple[int, int]:
    import dcgan_train
    args = gan.settings
    with torch.device("meta"):
        generator, discriminator = dcgan_train.build_models(args, dcgan_train.dataset_channels(args.dataset))
    return (sum(p.numel() for p in generator.parameters()), sum(p.numel() for p in discriminator.parameters()))


def training_minutes(run_dir: Path) -> float | None:
    times = [row.get("epoch_time_s") for row in common.read_metrics_csv(run_dir / "metrics.csv")]
    times = [t for t in times if t is not None and t == t]
    return sum(times) / 60 if times else None


def fmt_minutes(minutes: float | None) -> str:
    return "" if minutes is None else f", {minutes:.0f} min of training" if minutes >= 1 else \
        f", {minutes * 60:.0f} s of training"


def sweep_comparison(runs_root: Path, name: str, sweep: list, kind: str) -> tuple[Path, dict | list]:
    """The comparison folder of a sweep and its summary.json, checked to be of exactly these runs (a stale one from
    an older set of runs would mislabel the figures)."""
    folder = experiments.compare_dir(runs_root, name)
    path = folder / "summary.json"
    if not path.exists():
        raise common.UserError(f"{path} is missing: run the report without --no-analysis")
    data = json.loads(path.read_text())
    shown = [row["run_dir"] for row in data] if kind == "vae" else data["runs"]
    if sorted(map(str, shown)) != sorted(str(run.dir) for run in sweep):
        raise common.UserError(f"{folder} compares other runs than sweep {name} has now: run the report without "
                               f"--no-analysis")
    return folder, data


def runs_and_labels(sweep: list, labels: list[str]) -> str:
    return "; ".join(f"`{run.name}` ({label})" for run, label in zip(sweep, labels))


def write_beta_section(report: Report, sweep: list, name: str, runs_root: Path) -> None:
    report.heading(3, f"Varying beta (sweep `{name}`)")
    if len(sweep) < 2:
        found = f"only `{sweep[0].name}`" if sweep else "no runs"
        report.para(f"Sweep `{name}` has {found} in `{runs_root}`: run `make vae-betas` (or `sbatch "
                    f"slurm/vae_betas.sh`), then `make report` again, for a comparison across betas.")
        return
    folder, rows = sweep_comparison(runs_root, name, sweep, "vae")
    labels = [row["label"] for row in rows]
    who = runs_and_labels(sweep, labels)
    first, last = rows[0], rows[-1]
    x_name = experiments.x_axis(sweep)[0]
    report.figure(folder / "loss_curves.png", "vae_beta_curves.png",
                  f"Sweep `{name}`, {who}: the negative ELBO at beta = 1 (recon + KL: the bound every run is judged "
                  f"by, whatever beta it trained with), the reconstruction NLL and the KL, in nats per image, on the "
                  f"training set (top row: means over each epoch's steps) and the test set (bottom row: at each "
                  f"epoch's end), {'per epoch' if x_name == 'epoch' else 'against ' + x_name}. From "
                  f"{first['label']} to {last['label']} the test KL goes from {first['test_kl']:.2f} to "
                  f"{last['test_kl']:.2f} and the test reconstruction NLL from {first['test_recon']:.2f} to "
                  f"{last['test_recon']:.2f}.")
    report.table(["run", "folder", "epochs", "images seen", "test -ELBO", "recon", "KL", "IW log p(x)"],
                 [[row["label"], f"`{Path(row['run_dir']).name}`", f"{row['epoch']}", f"{row['images_seen']:,}",
                   f"{row['test_neg_elbo']:.2f}", f"{row['test_recon']:.2f}", f"{row['test_kl']:.2f}",
                   f"{row['iw_log_likelihood']:.2f}"] for row in rows])
    report.para("Test negative ELBO (beta = 1), reconstruction NLL, KL and importance-weighted log-likelihood in "
                "nats per image at each run's newest checkpoint.")
    report.figure(folder / "reconstructions.png", "vae_beta_reconstructions.png",
                  f"Sweep `{name}`: the same test images (top row) reconstructed by each run ({who}).")
    report.figure(folder / "samples.png", "vae_beta_samples.png",
                  f"Sweep `{name}`: 16 samples of each run's decoder from the same z ~ N(0, I) ({who}).")


def write_vae_section(report: Report, vae: experiments.RunInfo, why: str, sweep: list, sweep_name: str,
                      runs_root: Path) -> dict:
    config = vae.config
    run_args, summary = config["args"], read_summary(vae.dir)
    n_params = vae_param_count(vae)
    figures = vae.dir / "figures"
    likelihood = run_args.get("likelihood", "bernoulli")
    about = (f"{run_args['arch']} VAE, latent {run_args['latent_dim']}, beta {run_args['beta']:g}, "
             f"{likelihood} likelihood")
    run_is = f"Run `{vae.name}` ({about})"
    report.heading(2, f"VAE on {DATASET_NAMES.get(summary['dataset'], summary['dataset'])}")
    report.para(f"{run_is}, {n_params:,} parameters: checkpoint at epoch {summary['epoch']} of {run_args['epochs']}"
                f"{fmt_minutes(training_minutes(vae.dir))}; chosen as {why.split(': ', 1)[-1]}. Test ELBO "
                f"**{summary['test_elbo']:.2f}** nats per image (reconstruction {summary['test_recon']:.2f}, KL "
                f"{summary['test_kl']:.2f}); importance-weighted log-likelihood **{summary['iw_log_likelihood']:.2f}**"
                f" nats per image (K = {summary['iw_samples']}, {summary['iw_images']:,} test images).")
    report.heading(3, "Loss curves")
    report.figure(figures / "loss_curves.png", "vae_loss_curves.png",
                  f"{run_is}: train (top: means over each epoch's steps) and test (bottom: at each epoch's end) "
                  f"loss per epoch: total (recon + beta * KL), reconstruction NLL and KL, nats per image; final test "
                  f"ELBO {summary['test_elbo']:.2f}.")
    write_beta_section(report, sweep, sweep_name, runs_root)
    report.heading(3, "Reconstructions")
    report.figure(figures / "reconstructions.png", "vae_reconstructions.png",
                  f"{run_is}: rows of test images, each above the row of their reconstructions (decoder mean at "
                  f"z = mu), epoch {summary['epoch']}; reconstruction NLL {summary['test_recon']:.2f} nats per image.")
    report.heading(3, "Samples")
    report.figure(figures / "samples.png", "vae_samples.png",
                  f"{run_is}: 64 images decoded from z ~ N(0, I) ({likelihood.capitalize()} means), epoch "
                  f"{summary['epoch']}.")
    report.heading(3, "t-SNE of the latent space")
    report.figure(figures / "tsne.png", "vae_tsne.png",
                  f"{run_is}: t-SNE of the {run_args['latent_dim']}-d latent means of {summary['tsne_points']:,} "
                  f"test images, coloured by class.")
    report.heading(3, "Interpolation")
    report.figure(figures / "interpolation.png", "vae_interpolation.png",
                  f"{run_is}: decoded points on the straight line between the latent means of two test images "
                  f"(red frames).")
    return {"run": vae.name, "about": about, "params": n_params, **summary}


def gan_settings(run_args: dict) -> str:
    return (f"{run_args['image_size']}x{run_args['image_size']}, nz {run_args['nz']}, ngf {run_args['ngf']}, "
            f"ndf {run_args['ndf']}, {run_args['loss']} loss, D norm {run_args['d_norm']}, batch "
            f"{run_args['batch_size']}")


def write_gan_section(report: Report, gan: experiments.RunInfo, why: str) -> dict:
    config = gan.config
    run_args, summary = config["args"], read_summary(gan.dir)
    n_g, n_d = gan_param_counts(gan)
    figures = gan.dir / "figures"
    last = summary.get("last_epoch", {})
    best_fid = summary.get("best_fid")
    fid_text = (f"best FID **{best_fid['fid']:.2f}** (epoch {best_fid['epoch']})" if best_fid else
                "FID not measured during training (no Inception weights)")
    data_name = DATASET_NAMES.get(run_args["dataset"], run_args["dataset"])
    run_is = f"Run `{gan.name}` ({gan_settings(run_args)})"
    report.heading(2, f"DCGAN on {data_name}")
    report.para(f"{run_is}: G {n_g:,} + D {n_d:,} = **{n_g + n_d:,}** parameters (limit 25,000,000); "
                f"{summary['epochs_done']} of {summary['epochs_planned']} epochs"
                f"{fmt_minutes(training_minutes(gan.dir))}; chosen as {why.split(': ', 1)[-1]}; {fid_text}.")
    if experiments.not_cifar10(run_args):
        report.para(f"**Warning:** this run was {experiments.not_cifar10(run_args)}. Its generator makes "
                    f"{'1-channel' if run_args['dataset'] in ('mnist', 'fashion-mnist') else 'non-CIFAR'} images "
                    f"and fails the coursework's checks (`check_submission.py`). Train with "
                    f"`dcgan_train.py --dataset cifar10` for the submission.")
    report.para("D outputs one raw logit per image (no sigmoid inside the model): `torch.sigmoid(D(x))` is the "
                "probability it gives that x is a real image. D(x) below is that probability on real images in D's "
                "training steps; D(G(z)), on generated images in G's steps, from the same D pass as G's loss.")
    if last:
        report.para(f"Last epoch (means over its steps): loss_d {last.get('loss_d', math.nan):.3f}, loss_g "
                    f"{last.get('loss_g', math.nan):.3f}, D(x) {last.get('d_real', math.nan):.3f}, "
                    f"D(G(z)) {last.get('d_fake', math.nan):.3f}.")
    checkpoint = summary.get("checkpoint", {})
    report.heading(3, "Samples")
    report.figure(figures / "final_samples.png", "gan_samples.png",
                  f"{run_is}: 100 samples from the {'EMA ' if run_args.get('ema', 0) > 0 else ''}generator at "
                  f"epoch {checkpoint.get('epoch', '?')}{'; ' + fid_text.replace('**', '') if best_fid else ''}.")
    report.heading(3, "Discriminator and generator losses")
    report.figure(figures / "losses.png", "gan_losses.png", f"{run_is}: {losses_caption(gan, summary)}.")
    report.heading(3, "Fixed-noise progression")
    epochs = summary.get("progression_epochs") or []
    at = (f"epochs {', '.join(map(str, epochs[:-1]))} and {epochs[-1]} (rows)" if len(epochs) > 1 else
          f"epoch {epochs[0]}, the only epoch with a grid (one row)" if epochs else "evenly spaced epochs (rows)")
    report.figure(figures / "fixed_noise_progression.png", "gan_fixed_noise_progression.png",
                  f"{run_is}: the same 8 noise vectors (columns) decoded at {at}.")
    milestones = write_gan_diagnostics(report, gan, summary, run_is, fid_text)
    return {"run": gan.name, "dataset": run_args["dataset"], "params_g": n_g, "params_d": n_d,
            "best_fid": best_fid, "epochs_done": summary["epochs_done"], "milestones": milestones, "last": last}


def step_rows(gan: experiments.RunInfo, summary: dict) -> tuple[int, int]:
    """(rows of steps.csv behind the loss figure, --log-every), from the analysis (or the CSV, for an old one)."""
    losses = summary.get("losses") or {"step_rows": len(common.read_metrics_csv(gan.dir / "steps.csv")),
                                       "log_every": gan.args["log_every"]}
    return losses["step_rows"], losses["log_every"]


def losses_caption(gan: experiments.RunInfo, summary: dict) -> str:
    """What losses.png draws, which depends on how many steps.csv rows the run had (one per --log-every steps)."""
    n_rows, every = step_rows(gan, summary)
    if n_rows == 0:
        return (f"D and G losses, the mean of each epoch (dots); no finer curve, since the run took fewer steps "
                f"than --log-every ({every}), the steps between the rows of steps.csv")
    if n_rows == 1:
        return f"D and G losses, the mean of each epoch (dots) and the one row of steps.csv ({per_row(every)})"
    if not common.figures.is_smoothed(n_rows):
        return f"D and G losses: the mean of each epoch (dots) over {per_row(every)} (faint)"
    return (f"D and G losses: the mean of each epoch (dots), over {per_row(every)} (faint) and its smoothed trend "
            f"(an exponential moving average)")


def per_row(every: int) -> str:
    """What a row of steps.csv holds: the mean of every --log-every steps."""
    return "each step's value" if every == 1 else f"the mean of every {every} steps"


def write_gan_diagnostics(report: Report, gan: experiments.RunInfo, summary: dict, run_is: str, fid_text: str) -> dict:
    """The DCGAN's extra figures that its analysis made (D's outputs, FID, diversity, nearest neighbours,
    milestones), each with its caption; returns the milestone summary."""
    run_args, figures = gan.config["args"], gan.dir / "figures"
    milestones = summary.get("milestones") or {}
    n_rows, every = step_rows(gan, summary)
    trend = (f"; faint: {per_row(every)}" + (", smoothed" if common.figures.is_smoothed(n_rows) else "")
             if n_rows else "")
    d_caption = (f"D(x), D's mean probability on the real images of its steps, and D(G(z)), on the generated "
                 f"images of G's steps, per epoch (dots{trend}); 0.5: D cannot tell them apart"
                 if run_args["loss"] == "bce" else
                 f"the mean sigmoid of D's logits on real and generated images per epoch (dots{trend}); a hinge D "
                 f"gives no probabilities: read the gap between the lines")
    reference = (summary.get("diversity") or {}).get("training_images") is not None
    extras = [("d_outputs.png", "gan_d_outputs.png", f"{run_is}: {d_caption}."),
              ("fid.png", "gan_fid.png", f"{run_is}: FID against the training set per evaluation; "
                                         f"{fid_text.replace('**', '')}."),
              ("diversity.png", "gan_diversity.png", f"{run_is}: diversity of the 64 fixed-noise samples per epoch "
                                                     f"(their mean pairwise RMS distance; a drop means mode "
                                                     f"collapse){'; dashed: 64 training images' * reference}."),
              ("nearest_neighbours.png", "gan_nearest_neighbours.png", f"{run_is}: samples (left) beside their "
                                                                       f"nearest training images in pixel space: "
                                                                       f"copies would mean memorisation."),
              ("milestones.png", "gan_milestones.png", f"{run_is}: {milestone_caption(gan, milestones)}.")]
    extras = [extra for extra in extras if extra[0] in summary.get("figures", [])]
    if extras:
        report.heading(3, "More GAN diagnostics")
        for source, name, caption in extras:
            report.figure(figures / source, name, caption)
    return milestones


def milestone_caption(gan: experiments.RunInfo, milestones: dict) -> str:
    """The measure named by what it is, the best milestone, and how to export it (unless the run's files are it)."""
    measure, best = milestones.get("measure", ""), milestones.get("best")
    if milestones.get("kind") == "diversity":
        what = ("the diversity of each milestone checkpoint's samples (checkpoints/epoch-NNN.pt; the mean pairwise "
                "RMS distance of 500 of them). With no FID here, the best is the one closest to the training "
                "images' diversity (dashed)")
    else:
        what = f"the {measure} of each milestone checkpoint (checkpoints/epoch-NNN.pt; lower is better)"
    if best is None:
        return f"{what}; no best epoch by this measure"
    text = f"{what}; best: epoch {best['epoch']} ({measure} {best['value']:.4g})"
    if best["epoch"] == milestones.get("exported_epoch"):
        return text + ", the epoch the run's model files are from"
    return text + f"; `python analyze_gan.py {gan.dir} --export-epoch {best['epoch']}` exports G and D from it"


def write_gan_sweep_section(report: Report, sweep: list, name: str, runs_root: Path) -> None:
    report.heading(2, f"GAN experiments (sweep `{name}`)")
    if len(sweep) < 2:
        found = f"only `{sweep[0].name}`" if sweep else "no runs"
        report.para(f"Sweep `{name}` has {found} in `{runs_root}`: run `make gan-sweep` (the variants of "
                    f"`slurm/dcgan_sweep.txt`; or `sbatch slurm/dcgan_sweep.sh`), then `make report` again.")
        return
    folder, data = sweep_comparison(runs_root, name, sweep, "dcgan")
    labels, made = data["labels"], data["figures"]
    shared = sweep[0].args
    x_text = ("The x axes count epochs: every variant trains on the same images per epoch"
              if data.get("x_axis") == "epoch" else
              "The x axes count training images seen, so runs on different amounts of data compare fairly")
    report.para(f"{len(sweep)} variants, each labelled by the settings that differ between them: "
                f"{runs_and_labels(sweep, labels)}. Shared: {DATASET_NAMES.get(shared['dataset'], shared['dataset'])}"
                f", batch {shared['batch_size']}, {shared['epochs']} epochs planned. {x_text}.")
    for source, target, caption in sweep_figure_captions(data):
        if source in made:
            report.figure(folder / source, target, f"Sweep `{name}`: {caption}.")
    measure = next((row["best_milestone_measure"] for row in data["table"] if row["best_milestone_measure"]), "")
    with_fid = any(math.isfinite(row["best_fid"]) for row in data["table"])
    columns = (["run", "loss", "epochs", "images seen", "loss_d", "loss_g", "D(x)", "D(G(z))", "diversity (last "
                "epoch)"] + ([f"best milestone by {measure}"] if measure else []) + (["best FID"] if with_fid else []))
    rows = [[row["label"], row["loss"], f"{row['epochs']}", f"{row['images_seen']:,}", f"{row['loss_d']:.3f}",
             f"{row['loss_g']:.3f}", f"{row['d_real']:.3f}", f"{row['d_fake']:.3f}",
             f"{row['diversity_last_epoch']:.4f}"]
            + ([f"epoch {row['best_milestone_epoch']} ({row['best_milestone_value']:.4g})"
                if row["best_milestone_epoch"] != "" else ""] if measure else [])
            + ([f"{row['best_fid']:.2f}" if math.isfinite(row["best_fid"]) else ""] if with_fid else [])
            for row in data["table"]]
    report.table(columns, rows)
    report.para("loss_d, loss_g, D(x), D(G(z)): means over each variant's last epoch; diversity: of its last "
                "fixed-noise grid" + (f"; best milestone: the milestone checkpoint with the best {measure}"
                                      if measure else "") + f". Also in `{folder / 'summary.csv'}`.")


def sweep_figure_captions(data: dict) -> list[tuple[str, str, str]]:
    """(comparison figure, its name in the report, what it shows) for a GAN sweep."""
    quality = [f"{s['milestones']['measure']} per milestone checkpoint" for s in data["summaries"]
               if (s.get("milestones") or {}).get("kind") not in (None, "diversity") and s["milestones"]["rows"]][:1]
    fid = ["Inception FID during training"] if any(s.get("best_fid") for s in data["summaries"]) else []
    return [("compare_losses.png", "gan_sweep_losses.png",
             "D loss (top) and G loss (bottom), epoch means; one column per loss type, since BCE and hinge "
             "values are not on one scale"),
            ("compare_d_outputs.png", "gan_sweep_d_outputs.png",
             "mean D probability on real (left) and generated (right) images, BCE runs only (a hinge D gives no "
             "probabilities)"),
            ("compare_samples.png", "gan_sweep_samples.png",
             "each variant's samples from its fixed noise at its last epoch (the same noise for the same seed)"),
            ("compare_progression.png", "gan_sweep_progression.png",
             "the first fixed noise vectors (columns) at evenly spaced epochs (rows), per variant: rows that "
             "stop changing, or columns that look alike, mean collapse"),
            ("compare_diversity.png", "gan_sweep_diversity.png",
             "mean pairwise RMS distance of the 64 fixed-noise samples (a drop means mode collapse); dashed: "
             "64 training images"),
            ("compare_quality.png", "gan_sweep_quality.png", " and ".join(fid + quality) or "sample quality")]


def build(args, build_dir: Path, chosen: dict, runs_root: Path) -> None:
    report = Report(build_dir, shown_folders(args, chosen, runs_root))
    report.heading(1, "Coursework report: a VAE on MNIST and a DCGAN")
    key_at = len(report.blocks)  # the key-number table goes here, once the sections have been read
    vae = write_vae_section(report, chosen["vae"], chosen["vae_why"], chosen["vae_sweep"], args.vae_sweep,
                            runs_root)
    gan = write_gan_section(report, chosen["gan"], chosen["gan_why"])
    write_gan_sweep_section(report, chosen["gan_sweep"], args.gan_sweep, runs_root)
    write_test_cell_section(report, chosen["gan"].args)
    for note in chosen["notes"]:
        report.para(f"Note: {note}.")
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report.blocks[key_at:key_at] = [
        ("para", f"Made by `report.py` on {made} from `{runs_root}`. Numbers are per image in nats (natural log); "
                 f"higher ELBO and log p(x) are better, lower FID is better."),
        ("para", f"Which runs: VAE {chosen['vae_why']}; DCGAN {chosen['gan_why']}."),
        ("table", ["key number", "value"], key_numbers(vae, gan))]
    common.atomic_write_text(build_dir / "REPORT.md", report.markdown())
    common.atomic_write_text(build_dir / "REPORT.html", report.html("Coursework report: VAE and DCGAN"))
    # For check_submission.py: the runs shown, and the step their model files were at (a run trained on since
    # exports other files, which this report does not show).
    exported = {key: (chosen[run].export or {}).get("global_step") for key, run in (("vae_run", "vae"),
                                                                                   ("gan_run", "gan"))}
    shown = {"made": made, "runs_root": str(runs_root), "vae_run": str(chosen["vae"].dir),
             "gan_run": str(chosen["gan"].dir), "exported_steps": exported,
             "vae_sweep": {"name": args.vae_sweep, "runs": [str(run.dir) for run in chosen["vae_sweep"]]},
             "gan_sweep": {"name": args.gan_sweep, "runs": [str(run.dir) for run in chosen["gan_sweep"]]}}
    common.atomic_write_text(build_dir / "report.json", json.dumps(shown, indent=2) + "\n")


def shown_folders(args, chosen: dict, runs_root: Path) -> dict[str, str]:
    """Absolute folders of this machine -> how the report shows them: relative to the repository (where the
    commands in the report run), else to the runs root's parent, else by name."""
    def shown(path: Path) -> str:
        for base in (common.REPO_ROOT, runs_root.parent):
            try:
                return str(path.relative_to(base))
            except ValueError:
                continue
        return path.name

    folders = {str(common.REPO_ROOT) + os.sep: "", str(runs_root): shown(runs_root)}
    runs = [chosen["vae"], chosen["gan"], *chosen["vae_sweep"], *chosen["gan_sweep"]]
    folders.update({str(run.dir.parent): shown(run.dir.parent) for run in runs})
    for named in (args.vae_run, args.gan_run):  # as typed: the reason a run was chosen repeats it
        if named and Path(named).is_absolute():
            folders[named.rstrip(os.sep)] = shown(Path(named).resolve())
    return folders


def key_numbers(vae: dict, gan: dict) -> list[list[str]]:
    fid = (f"{gan['best_fid']['fid']:.2f} (epoch {gan['best_fid']['epoch']})" if gan["best_fid"]
           else "not measured during training (no Inception weights)")
    rows = [
        ["VAE", f"`{vae['run']}`: {vae['about']}"],
        ["VAE test ELBO", f"{vae['test_elbo']:.2f} nats per image (epoch {vae['epoch']})"],
        ["VAE importance-weighted log p(x)", f"{vae['iw_log_likelihood']:.2f} nats per image (K = "
                                             f"{vae['iw_samples']}, {vae['iw_images']:,} test images)"],
        ["VAE parameters", f"{vae['params']:,}"],
        ["DCGAN", f"`{gan['run']}`: {gan['dataset']}, {gan['epochs_done']} epochs"
                  + ("" if gan["dataset"] == "cifar10" else
                     f" (**{experiments.not_cifar10({'dataset': gan['dataset']})}**)")],
        ["DCGAN FID", fid],
    ]
    if "cfid" in gan["last"]:  # gan_metrics.py, measured during training on MNIST and Fashion-MNIST
        last = gan["last"]
        rows.append(["DCGAN classifier FID (last epoch)",
                     f"{last['cfid']:.1f} at epoch {last['epoch']:.0f}; class shares {last['class_min']:.1%} "
                     f"to {last['class_max']:.1%} of the samples"])
    best = (gan["milestones"] or {}).get("best")
    if best:
        rows.append([f"DCGAN best milestone ({gan['milestones']['measure']})",
                     f"epoch {best['epoch']}: {best['value']:.4g}"])
    rows.append(["DCGAN parameters", f"G {gan['params_g']:,} + D {gan['params_d']:,} = "
                                     f"{gan['params_g'] + gan['params_d']:,} (limit 25,000,000)"])
    return rows


def write_test_cell_section(report: Report, gan_args: dict) -> None:
    """The code for the coursework notebook's test cells: each model's transform and denorm, as the training
    scripts define them (common/testcell.py takes them from their source; check_submission.py runs them)."""
    from common import testcell
    report.heading(2, "Code for the notebook's test cells")
    report.para("The coursework's test cells need the data transform and the denorm function of the models handed "
                "in. These are the training scripts' own definitions, with the imports they need. Paste the first "
                "block into the VAE's test cell and the second into the DCGAN's (both define `transform` and "
                "`denorm`, so not both into one cell). `make submission` runs each block in a clean Python, "
                "without this project, on the three model files before it writes CW2.zip.")
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
    common.fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs_root = Path(args.runs_root).resolve()
    out = Path(args.out).resolve()
    if not runs_root.is_dir():
        raise common.UserError(f"--runs-root {runs_root}: no such folder")
    if out.exists() and any(out.iterdir()) and not (out / "REPORT.md").exists():
        raise common.UserError(f"--out {out} holds files but no REPORT.md; it would be replaced as a whole, so "
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
    common.run_main(main)
