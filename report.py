"""The coursework report: analyse the latest runs, then write report/REPORT.md and report/REPORT.html.

    python report.py                                        # make report: runs/latest-vae (+ beta sweep), latest-dcgan
    python report.py --tsne-points 2000 --iw-images 1000    # quicker VAE analysis on a CPU
    python report.py --no-analysis                          # reuse the figures the analysis scripts already wrote
    python report.py --runs-root /scratch/runs --out /tmp/report

It runs analyze_vae.py on RUNS_ROOT/latest-vae and on every beta-sweep run it finds (VAE runs whose --name starts
with "vae-beta", as `make vae-betas` and slurm/vae_betas.sh name them; the newest run per beta), and
analyze_gan.py on RUNS_ROOT/latest-dcgan. It copies their figures into OUT/figures/ and writes the report with,
in the coursework's order: VAE loss curves and the beta comparison; reconstructions; samples; t-SNE;
interpolation; the GAN sample grid; the D and G losses; the fixed-noise progression; then the extra GAN
diagnostics. Each figure has a one-line caption; the key numbers (test ELBO, importance-weighted log-likelihood,
FID when measured, parameter counts) come from the analysis scripts' summary.json files.

OUT is replaced as a whole (built beside it, then renamed into place), so it never holds a half-written report or
figures from an older one.
"""
from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import re
import shutil
from pathlib import Path

import torch

import common

SWEEP_NAME = re.compile(r"^vae-beta")   # --name of the runs `make vae-betas` and slurm/vae_betas.sh start
COMPARISON_DIR = "compare-vae-betas"   # analyze_vae.py --out for the sweep, in the runs root (as its default)
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "folder": "an image folder"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-root", default=str(common.DEFAULT_RUNS_ROOT),
                        help="where the runs are (default: runs/ in the repository)")
    parser.add_argument("--vae-run", default=None, help="the VAE run to report (default: RUNS_ROOT/latest-vae)")
    parser.add_argument("--gan-run", default=None, help="the DCGAN run to report (default: RUNS_ROOT/latest-dcgan)")
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
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Finding the runs


def read_config(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def resolve_run(path: str | None, default: Path, script: str, make_target: str, flag: str) -> Path:
    """The run folder behind a flag or the latest-* link, checked to be a run of `script`."""
    run_dir = Path(path) if path else default
    if not run_dir.exists():
        raise common.UserError(f"no {script} run at {run_dir}: train one first ({make_target}), or pass "
                               f"{flag} RUN_DIR")
    config = read_config(run_dir)
    if config is None or config.get("script") != script:
        raise common.UserError(f"{run_dir} is not a {script} run folder (no config.json with script {script!r})")
    return run_dir.resolve()


def find_beta_sweep(runs_root: Path) -> tuple[list[Path], list[str]]:
    """The newest run per beta among the sweep runs in runs_root, sorted by beta; and notes on runs left out."""
    newest, notes = {}, []
    for run_dir in sorted(p for p in runs_root.iterdir() if p.is_dir() and not p.is_symlink()):
        config = read_config(run_dir)
        if not config or config.get("script") != "vae" or not SWEEP_NAME.match(str(config["args"].get("name"))):
            continue
        if not common.list_checkpoints(run_dir):
            notes.append(f"{run_dir.name}: no checkpoint yet, left out")
            continue
        beta = float(config["args"]["beta"])
        started = config.get("starts", [{}])[0].get("time", "")
        if beta in newest:
            older, newer = sorted([newest[beta], (started, run_dir.resolve())])
            notes.append(f"{older[1].name} left out: {newer[1].name} is a newer run with beta {beta:g}")
            newest[beta] = newer
        else:
            newest[beta] = (started, run_dir.resolve())
    return [newest[beta][1] for beta in sorted(newest)], notes


# ----------------------------------------------------------------------------------------------------------------
# Running the analysis scripts (in this process: their main() raises UserError with a message, as on the CLI)


def analyse(args, vae_run: Path, sweep: list[Path], gan_run: Path, runs_root: Path) -> None:
    import analyze_gan
    import analyze_vae

    vae_flags = ["--device", args.device]
    for flag, value in (("--data-dir", args.data_dir), ("--tsne-points", args.tsne_points),
                        ("--iw-samples", args.iw_samples), ("--iw-images", args.iw_images)):
        if value is not None:
            vae_flags += [flag, str(value)]
    if vae_run not in sweep:
        print(f"report: analyze_vae.py {vae_run}", flush=True)
        analyze_vae.main([str(vae_run), *vae_flags])
    if sweep:
        print(f"report: analyze_vae.py on the beta sweep ({len(sweep)} runs)", flush=True)
        analyze_vae.main([*map(str, sweep), "--out", str(runs_root / COMPARISON_DIR), *vae_flags])
    print(f"report: analyze_gan.py {gan_run}", flush=True)
    analyze_gan.main([str(gan_run)])


# ----------------------------------------------------------------------------------------------------------------
# Numbers


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "figures" / "summary.json"
    if not path.exists():
        raise common.UserError(f"{path} is missing: run the report without --no-analysis (or the analysis script "
                               f"on {run_dir})")
    return json.loads(path.read_text())


def vae_param_count(config: dict) -> int:
    from vae_train import VAE
    args = config["args"]
    with torch.device("meta"):
        model = VAE(args["arch"], args["latent_dim"], args.get("likelihood", "bernoulli"))
    return sum(p.numel() for p in model.parameters())


def gan_param_counts(config: dict) -> tuple[int, int]:
    import dcgan_train
    args = argparse.Namespace(**config["args"])
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


# ----------------------------------------------------------------------------------------------------------------
# The report as a list of blocks, rendered twice: Markdown and HTML


class Report:
    def __init__(self, build_dir: Path):
        self.blocks, self.build_dir = [], build_dir
        (build_dir / "figures").mkdir(parents=True)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def figure(self, source: Path, name: str, caption: str) -> None:
        """Copy `source` to figures/<name> and show it; a missing source is an error, not a silent gap."""
        if not source.exists():
            raise common.UserError(f"{source} is missing: run the report without --no-analysis (or the analysis "
                                   f"script on {source.parent.parent})")
        shutil.copyfile(source, self.build_dir / "figures" / name)
        self.blocks.append(("figure", f"figures/{name}", caption, name.removesuffix(".png").replace("_", " ")))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "para":
                out.append(block[1])
            elif block[0] == "table":
                header, rows = block[1], block[2]
                out.append("\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                                     + ["| " + " | ".join(row) + " |" for row in rows]))
            else:
                out.append(f"![{block[3]}]({block[1]})\n\n*{block[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:  # `code` and **bold**, the only Markdown used in the text
            text = html.escape(text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

        body = []
        for block in self.blocks:
            if block[0] == "heading":
                body.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
            elif block[0] == "para":
                body.append(f"<p>{inline(block[1])}</p>")
            elif block[0] == "table":
                head = "".join(f"<th>{inline(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[3])}">'
                            f"<figcaption>{inline(block[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "img{max-width:100%;max-height:900px;height:auto}figure{margin:1.5em 0}"
                 "figcaption{font-style:italic;color:#333}"
                 "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}"
                 "code{background:#f2f2f2;padding:0 .2em}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_vae_section(report: Report, vae_run: Path, sweep: list[Path], runs_root: Path, notes: list[str]) -> dict:
    config = read_config(vae_run)
    run_args, summary = config["args"], read_summary(vae_run)
    n_params = vae_param_count(config)
    figures = vae_run / "figures"
    about = (f"{run_args['arch']} VAE, latent {run_args['latent_dim']}, beta {run_args['beta']:g}, "
             f"{run_args.get('likelihood', 'bernoulli')} likelihood, {n_params:,} parameters")
    report.heading(2, f"VAE on {DATASET_NAMES.get(summary['dataset'], summary['dataset'])}")
    report.para(f"Run `{vae_run.name}`: {about}; checkpoint at epoch {summary['epoch']} of "
                f"{run_args['epochs']}{fmt_minutes(training_minutes(vae_run))}. Test ELBO "
                f"**{summary['test_elbo']:.2f}** nats per image (reconstruction {summary['test_recon']:.2f}, KL "
                f"{summary['test_kl']:.2f}); importance-weighted log-likelihood **{summary['iw_log_likelihood']:.2f}**"
                f" nats per image (K = {summary['iw_samples']}, {summary['iw_images']:,} test images).")
    report.heading(3, "Loss curves")
    report.figure(figures / "loss_curves.png", "vae_loss_curves.png",
                  f"Train (top) and test (bottom) loss per epoch: total (recon + beta * KL), reconstruction NLL and "
                  f"KL, nats per image; final test ELBO {summary['test_elbo']:.2f}.")

    report.heading(3, "Beta comparison")
    sweep_rows, sweep_summaries = [], [read_summary(run_dir) for run_dir in sweep]
    for run_dir, s in zip(sweep, sweep_summaries):
        a = read_config(run_dir)["args"]
        sweep_rows.append([f"{a['beta']:g}", f"`{run_dir.name}`", f"{a['arch']}, latent {a['latent_dim']}",
                           f"{s['epoch']}", f"{a['train_limit']:,}" if a.get("train_limit") else "all",
                           f"{s['test_elbo']:.2f}", f"{s['test_recon']:.2f}", f"{s['test_kl']:.2f}",
                           f"{s['iw_log_likelihood']:.2f}"])
    if len(sweep) >= 2:
        first, last = sweep_summaries[0], sweep_summaries[-1]
        report.figure(runs_root / COMPARISON_DIR / "loss_curves.png", "vae_beta_comparison.png",
                      f"Loss per epoch of the {len(sweep)} beta-sweep runs overlaid; from beta {first['beta']:g} to "
                      f"{last['beta']:g} the test KL goes from {first['test_kl']:.2f} to {last['test_kl']:.2f} and the "
                      f"reconstruction NLL from {first['test_recon']:.2f} to {last['test_recon']:.2f} nats per image.")
    if sweep:
        report.table(["beta", "run", "model", "epochs", "training images", "test ELBO", "recon", "KL",
                      "IW log p(x)"], sweep_rows)
        report.para("ELBO, reconstruction NLL, KL and IW log-likelihood in nats per image on the test set; the ELBO "
                    "is the true bound (beta = 1) whatever beta the run was trained with.")
    else:
        report.para(f"No beta sweep found in `{runs_root}` (VAE runs named `vae-beta*`): run `make vae-betas` "
                    f"(or `sbatch slurm/vae_betas.sh`), then `make report` again.")
    for note in notes:
        report.para(f"Note: {note}.")

    report.heading(3, "Reconstructions")
    report.figure(figures / "reconstructions.png", "vae_reconstructions.png",
                  f"Rows of test images, each above the row of their reconstructions (decoder mean at z = mu), epoch "
                  f"{summary['epoch']}; reconstruction NLL {summary['test_recon']:.2f} nats per image.")
    report.heading(3, "Samples")
    report.figure(figures / "samples.png", "vae_samples.png",
                  "64 images decoded from z ~ N(0, I) (Bernoulli means), the same z for every run.")
    report.heading(3, "t-SNE of the latent space")
    report.figure(figures / "tsne.png", "vae_tsne.png",
                  f"t-SNE of the {run_args['latent_dim']}-d latent means of {summary['tsne_points']:,} test images, "
                  f"coloured by digit.")
    report.heading(3, "Interpolation")
    report.figure(figures / "interpolation.png", "vae_interpolation.png",
                  "Decoded points on the straight line between the latent means of two test images (red frames).")
    return {"run": vae_run.name, "about": about, "params": n_params, **summary}


def write_gan_section(report: Report, gan_run: Path) -> dict:
    config = read_config(gan_run)
    run_args, summary = config["args"], read_summary(gan_run)
    n_g, n_d = gan_param_counts(config)
    figures = gan_run / "figures"
    last = summary.get("last_epoch", {})
    best_fid = summary.get("best_fid")
    fid_text = (f"best FID **{best_fid['fid']:.2f}** (epoch {best_fid['epoch']})" if best_fid else
                "FID not measured (no Inception weights; see `dcgan_train.py --inception-weights`)")
    data_name = DATASET_NAMES.get(run_args["dataset"], run_args["dataset"])
    report.heading(2, f"DCGAN on {data_name}")
    report.para(f"Run `{gan_run.name}`: {run_args['image_size']}x{run_args['image_size']} images, nz "
                f"{run_args['nz']}, ngf {run_args['ngf']}, ndf {run_args['ndf']}, {run_args['loss']} loss, D norm "
                f"{run_args['d_norm']}; G {n_g:,} + D {n_d:,} = **{n_g + n_d:,}** parameters (limit 25,000,000); "
                f"{summary['epochs_done']} of {summary['epochs_planned']} epochs"
                f"{fmt_minutes(training_minutes(gan_run))}; {fid_text}.")
    if run_args["dataset"] != "cifar10":
        report.para(f"**Warning:** this run was trained on {data_name}, not CIFAR-10: its generator makes "
                    f"{'1-channel' if run_args['dataset'] in ('mnist', 'fashion-mnist') else 'non-CIFAR'} images "
                    f"and fails the coursework's checks (`check_submission.py`). Train with "
                    f"`dcgan_train.py --dataset cifar10` for the submission.")
    if last:
        report.para(f"Last epoch: loss_d {last.get('loss_d', float('nan')):.3f}, loss_g "
                    f"{last.get('loss_g', float('nan')):.3f}, D(x) {last.get('d_real', float('nan')):.3f}, "
                    f"D(G(z)) {last.get('d_fake', float('nan')):.3f}.")
    checkpoint = summary.get("checkpoint", {})
    report.heading(3, "Samples")
    report.figure(figures / "final_samples.png", "gan_samples.png",
                  f"100 samples from the (EMA) generator at epoch {checkpoint.get('epoch', '?')}"
                  f"{'; ' + fid_text.replace('**', '') if best_fid else ''}.")
    report.heading(3, "Discriminator and generator losses")
    report.figure(figures / "losses.png", "gan_losses.png",
                  "D and G losses: epoch means (dots) over the per-step curve (faint) and its smoothed trend.")
    report.heading(3, "Fixed-noise progression")
    report.figure(figures / "fixed_noise_progression.png", "gan_fixed_noise_progression.png",
                  "The same 8 noise vectors (columns) decoded at evenly spaced epochs (rows).")

    extras = [("d_outputs.png", "gan_d_outputs.png", "Mean D probability on real and generated images per epoch "
                                                     "(0.5: D cannot tell them apart)."),
              ("fid.png", "gan_fid.png", f"FID against the training set per evaluation; {fid_text.replace('**', '')}."),
              ("diversity.png", "gan_diversity.png", "Mean pairwise RMS distance of the fixed-noise samples per "
                                                     "epoch (a drop means mode collapse), against training images."),
              ("nearest_neighbours.png", "gan_nearest_neighbours.png", "Samples (left) beside their nearest training "
                                                                       "images in pixel space: copies would mean "
                                                                       "memorisation.")]
    extras = [extra for extra in extras if extra[0] in summary.get("figures", [])]
    if extras:
        report.heading(3, "More GAN diagnostics")
        for source, name, caption in extras:
            report.figure(figures / source, name, caption)
    return {"run": gan_run.name, "dataset": run_args["dataset"], "params_g": n_g, "params_d": n_d,
            "best_fid": best_fid, "epochs_done": summary["epochs_done"]}


def build(args, build_dir: Path, vae_run: Path, sweep: list[Path], notes: list[str], gan_run: Path,
          runs_root: Path) -> None:
    report = Report(build_dir)
    report.heading(1, "Coursework report: a VAE on MNIST and a DCGAN")
    key_at = len(report.blocks)  # the key-number table goes here, once both sections have been read
    vae = write_vae_section(report, vae_run, sweep, runs_root, notes)
    gan = write_gan_section(report, gan_run)
    fid = (f"{gan['best_fid']['fid']:.2f} (epoch {gan['best_fid']['epoch']})" if gan["best_fid"]
           else "not measured (no Inception weights)")
    key_rows = [
        ["VAE", f"`{vae['run']}`: {vae['about']}"],
        ["VAE test ELBO", f"{vae['test_elbo']:.2f} nats per image (epoch {vae['epoch']})"],
        ["VAE importance-weighted log p(x)", f"{vae['iw_log_likelihood']:.2f} nats per image (K = "
                                             f"{vae['iw_samples']}, {vae['iw_images']:,} test images)"],
        ["VAE parameters", f"{vae['params']:,}"],
        ["DCGAN", f"`{gan['run']}`: {gan['dataset']}, {gan['epochs_done']} epochs"
                  + ("" if gan["dataset"] == "cifar10" else " (**not CIFAR-10**: not a valid submission)")],
        ["DCGAN FID", fid],
        ["DCGAN parameters", f"G {gan['params_g']:,} + D {gan['params_d']:,} = {gan['params_g'] + gan['params_d']:,} "
                             f"(limit 25,000,000)"],
    ]
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report.blocks[key_at:key_at] = [("para", f"Made by `report.py` on {made} from `{runs_root}`. Numbers are per image "
                                             f"in nats (natural log); higher ELBO and log p(x) are better, lower FID "
                                             f"is better."),
                                    ("table", ["key number", "value"], key_rows)]
    common.atomic_write_text(build_dir / "REPORT.md", report.markdown())
    common.atomic_write_text(build_dir / "REPORT.html", report.html("Coursework report: VAE and DCGAN"))


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
    # Every folder checked before any slow analysis.
    vae_run = resolve_run(args.vae_run, runs_root / "latest-vae", "vae", "make vae", "--vae-run")
    gan_run = resolve_run(args.gan_run, runs_root / "latest-dcgan", "dcgan", "make dcgan", "--gan-run")
    sweep, notes = find_beta_sweep(runs_root)
    print(f"report: VAE {vae_run}; beta sweep: {', '.join(p.name for p in sweep) or 'none'}; DCGAN {gan_run}",
          flush=True)
    if not args.no_analysis:
        analyse(args, vae_run, sweep, gan_run, runs_root)

    out.parent.mkdir(parents=True, exist_ok=True)
    build_dir = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        build(args, build_dir, vae_run, sweep, notes, gan_run, runs_root)
        replace_folder(build_dir, out)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir)
    print(f"report: wrote {out / 'REPORT.md'} and {out / 'REPORT.html'} ({len(list((out / 'figures').iterdir()))} "
          f"figures in {out / 'figures'})", flush=True)
    return 0


if __name__ == "__main__":
    common.run_main(main)
