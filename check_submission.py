"""Check the three coursework model files as a grader's test cell would, on CPU, before they are packed.

    python check_submission.py                    # the runs that count in runs/ (as make report picks them)
    python check_submission.py --vae-run runs/A --gan-run runs/B   # these two runs, whatever they are
    python check_submission.py submission/        # a folder holding all three files
    python check_submission.py --gen exports/DCGAN_model_G.pth --disc exports/DCGAN_model_D.pth   # e.g. a milestone
    make submission                               # the runs that count; then packs CW2.zip with report/figures

The files come from the runs that count (experiments.counted_run), or --vae-run / --gan-run, or DIR; --vae / --gen /
--disc win over all. One PASS / FAIL / SKIP line per check; exit 0 when all pass, 1 when any fails (2: a bad
command line). What is checked, in the grader's own terms:

- each file loads with torch.jit.load (no project code needed);
- the VAE has Conv2d layers among its children's children (an MLP-only VAE does not count);
- vae(x)[0] has the shape of x, values in [0, 1], for transformed MNIST test images (from --data-dir, else the VAE
  run's own data folder, else data/; uniform noise, with a WARN line, when none holds them), and is closer to them
  (MSE) than the mean test image (a VAE collapsed to one grey blur fails);
- G turns torch.randn(100, nz, 1, 1) into (100, 3, 32, 32) in [-1, 1], and dcgan_train.denorm maps that to [0, 1];
- D gives one value per image for (N, 3, 32, 32) input;
- G plus D hold at most 25,000,000 parameters (dcgan_train.MAX_PARAMS);
- the DCGAN's run trained on CIFAR-10, when its config.json is there to say (the run that counts, or a run folder
  as DIR): a GAN of another data set is refused in report.py's words, unless --allow-non-cifar10: then its files
  are checked with its own image shape (1 x 32 x 32 for MNIST), its test cell left out, and --zip CW2.zip becomes
  CW2-NOT-FOR-HANDIN-<dataset>.zip, a dry run of the packaging for a student without CIFAR-10 yet.
- the notebook's test cells work: the report's code for them (common/testcell.py) runs in a clean Python without
  this project, on the three files; checked last, when everything above passed (about 10 s).

With --zip ZIP (and --figures DIR of PNGs), a previous ZIP is deleted first and ZIP written, atomically, only when
every check passes: so ZIP exists only after a check that passed. A report (report.json beside DIR) of other runs,
or of models those runs exported since, is a FAIL: its figures would not show the submitted models.
"""
from __future__ import annotations

import argparse
import json
import warnings
import zipfile
from pathlib import Path

import torch

from common import experiments, testcell
from common.data import data_root
from common.errors import UserError, run_main
from common.files import atomic_path
from common.flags import DEFAULT_DATA_DIR, DEFAULT_RUNS_ROOT, ArgumentParser
from common.readers import MODEL_FILES, read_export, read_run_config

(VAE_FILE,), (GEN_FILE, DISC_FILE) = MODEL_FILES["vae"], MODEL_FILES["dcgan"]
CIFAR_SHAPE = (3, 32, 32)   # the coursework's DCGAN works on CIFAR-10: RGB, 32 x 32
MNIST_SHAPE = (1, 28, 28)



def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", metavar="DIR", nargs="?", default=None,
                        help=f"folder holding {VAE_FILE}, {GEN_FILE} and {DISC_FILE} (default: the run folders "
                             f"of the VAE and DCGAN runs that count)")
    parser.add_argument("--vae-run", default=None, metavar="RUN_DIR",
                        help="the VAE run whose file to check (default: the newest finished VAE run in --runs-root "
                             "that is not a sweep member)")
    parser.add_argument("--gan-run", default=None, metavar="RUN_DIR",
                        help="the DCGAN run whose files to check (default: as --vae-run, for DCGAN runs)")
    parser.add_argument("--runs-root", default=str(DEFAULT_RUNS_ROOT),
                        help="where to look for the runs that count (default: runs/ in the repository)")
    parser.add_argument("--vae", default=None, help=f"the VAE file (default: DIR/{VAE_FILE})")
    parser.add_argument("--gen", default=None, help=f"the generator file (default: DIR/{GEN_FILE})")
    parser.add_argument("--disc", default=None, help=f"the discriminator file (default: DIR/{DISC_FILE})")
    parser.add_argument("--data-dir", default=None,
                        help="torchvision data root holding MNIST/raw (default: the VAE run's own --data-dir, "
                             "then data/ in the repository); without MNIST the VAE is fed uniform [0, 1] noise")
    parser.add_argument("--nz", type=int, default=None,
                        help="size of G's noise vector (default: read from G's first layer, else 100)")
    parser.add_argument("--n-images", type=int, default=100, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--allow-non-cifar10", action="store_true",
                        help="a dry run of the packaging with a DCGAN trained on another data set (its config.json "
                             "says which): checked with its own image shape, packed into ZIP-NOT-FOR-HANDIN-<dataset>"
                             ".zip (refused by default: report.py calls such a run not a valid submission)")
    parser.add_argument("--zip", default=None, metavar="ZIP",
                        help="when every check passes, pack the three files (under their coursework names) and "
                             "--figures into ZIP, written atomically (make submission: CW2.zip)")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="the report's figures folder to pack as figures/ into --zip (make report writes "
                             "report/figures)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Recording results and loading the files


class Checks:
    """Prints each check's result as it happens and counts them."""

    def __init__(self):
        self.failed = self.passed = self.skipped = 0

    def record(self, ok: bool, path: Path, what: str, detail: str) -> None:
        self.passed += ok
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {path.name}: {what}: {detail}", flush=True)

    def skip(self, path: Path, why: str, *whats: str) -> None:
        """The checks that cannot run, since one they need failed."""
        self.skipped += len(whats)
        for what in whats:
            print(f"  SKIP  {path.name}: {what}: {why}", flush=True)


def short_error(err: Exception) -> str:
    """One line from an exception. TorchScript errors carry a long script traceback; the cause is the last line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = next((text for text in reversed(lines) if "Error:" in text), lines[-1])
    line = line.split(". ")[0]  # torch's loaders append paragraphs of generic advice after the first sentence
    return (line if line.startswith(f"{type(err).__name__}:") else f"{type(err).__name__}: {line}")[:300]


def shape_str(value) -> str:
    """'(N, C, H, W)' for a tensor or a shape; the type's name for anything else a model returned."""
    if isinstance(value, torch.Tensor):
        value = value.shape
    return str(tuple(value)) if isinstance(value, tuple) else type(value).__name__


def value_range(t: torch.Tensor) -> str:
    return f"[{t.min().item():.4g}, {t.max().item():.4g}]"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def is_torch_save_archive(path: Path) -> bool:
    """A torch.save zip holds <name>/data.pkl; TorchScript adds <name>/code/. Read by name only: never unpickled."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/data.pkl") for name in names) and not any("/code/" in name for name in names)


def load(checks: Checks, path: Path, *later: str):
    """torch.jit.load on CPU, as the grader does; None when it does not load, after a FAIL line and a SKIP line for
    each check that needs the model (`later`)."""
    made_by = "vae_train.py" if path.name == VAE_FILE else "dcgan_train.py"
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; graders still load with it
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # garbage, truncated, a state_dict saved with torch.save, ...: torch raises many kinds
        if not path.exists():
            detail = f"{path} does not exist (the training script, {made_by}, writes it when a run finishes)"
        elif is_torch_save_archive(path):
            detail = ("does not load: it is a torch.save file (a state_dict or a pickled model), not TorchScript: "
                      f"export with torch.jit.script(model).save(path) ({short_error(err)})")
        else:
            detail = (f"does not load: not a TorchScript file (corrupted, truncated, or not a model) "
                      f"({short_error(err)})")
        checks.record(False, path, "torch.jit.load", detail)
        checks.skip(path, "the file did not load", *later)
        return None
    checks.record(True, path, "torch.jit.load", f"loads ({model.original_name}, {n_params(model):,} parameters)")
    if model.training:
        print(f"  note  {path.name}: saved in training mode; a grader's forward pass will use batch statistics "
              f"(and a VAE samples z): export after model.eval()", flush=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The VAE


def has_mnist_test_files(data_dir: Path) -> bool:
    try:
        raw = data_root("mnist", data_dir) / "MNIST" / "raw"
    except UserError:  # files in the wrong folder: the WARN line says where it looked
        return False
    return (raw / "t10k-images-idx3-ubyte").exists() and (raw / "t10k-labels-idx1-ubyte").exists()


def vae_inputs(data_dirs: list[tuple[Path, str]], n: int) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """n transformed MNIST test images from the first of `data_dirs` ((folder, where it came from)) that holds
    them, as the grader's test cell makes them; uniform noise when none does. Returns (x, what x is, the mean
    test image [1, 28, 28], or None for noise)."""
    from vae_train import transform
    for data_dir, _ in data_dirs:
        if has_mnist_test_files(data_dir):
            from torchvision.datasets import MNIST
            test_set = MNIST(str(data_root("mnist", data_dir)), train=False, transform=transform, download=False)
            n = min(n, len(test_set))
            mean_image = test_set.data.float().div(255).mean(0, keepdim=True)  # what ToTensor gives, averaged
            return torch.stack([test_set[i][0] for i in range(n)]), f"{n} MNIST test images from {data_dir}", mean_image
    generator = torch.Generator().manual_seed(0)
    looked = "; ".join(f"{d / 'MNIST' / 'raw'} ({why})" for d, why in data_dirs)
    return (torch.rand((n, *MNIST_SHAPE), generator=generator),
            f"{n} SYNTHETIC uniform [0, 1] images: no MNIST test files in {looked}. Pass --data-dir "
            f"(make submission DATA_DIR=...) to check on real digits", None)


def check_vae(checks: Checks, path: Path, data_dirs: list[tuple[Path, str]], n: int) -> None:
    names = ["Conv2d layers in children's children", "vae(x)[0] shape", "vae(x)[0] values in [0, 1]"]
    vae = load(checks, path, *names)
    if vae is None:
        return
    # The grader's own test: a RecursiveScriptModule two levels down whose original class was nn.Conv2d.
    convs = [f"{child_name}.{name}" for child_name, child in vae.named_children()
             for name, grandchild in child.named_children()
             if isinstance(grandchild, torch.jit.RecursiveScriptModule) and grandchild.original_name == "Conv2d"]
    checks.record(bool(convs), path, names[0],
                  f"{len(convs)} found ({', '.join(convs[:4])}{' ...' if len(convs) > 4 else ''})" if convs else
                  "none found: an MLP-only VAE fails the coursework's test; train with vae_train.py --arch conv")

    x, source, mean_image = vae_inputs(data_dirs, n)
    print(f"  {'WARN' if mean_image is None else 'info'}  {path.name}: input x: {source}, shape {shape_str(x)}",
          flush=True)
    try:
        with torch.no_grad():
            out = vae(x)
        recon = out[0]
    except Exception as err:
        checks.record(False, path, names[1], f"vae(x)[0] fails on x of shape {shape_str(x)}: {short_error(err)}")
        checks.skip(path, "no output", names[2])
        return
    if not isinstance(recon, torch.Tensor) or recon.shape != x.shape:
        hint = " (forward should return a tuple (recon, mu, logvar))" if isinstance(out, torch.Tensor) else ""
        checks.record(False, path, names[1], f"{shape_str(recon)}, expected the shape of x {shape_str(x)}{hint}")
        checks.skip(path, "wrong shape", names[2])
        return
    checks.record(True, path, names[1], f"{shape_str(recon)}, the shape of x")
    in_range = bool(torch.isfinite(recon).all() and recon.min() >= 0 and recon.max() <= 1)
    checks.record(in_range, path, names[2], value_range(recon) if in_range else
                  f"{value_range(recon)} is outside [0, 1] (or not finite): end the decoder with a sigmoid")
    if in_range and mean_image is not None:
        check_better_than_mean(checks, path, x, recon, mean_image)


def check_better_than_mean(checks: Checks, path: Path, x: torch.Tensor, recon: torch.Tensor,
                           mean_image: torch.Tensor) -> None:
    """A VAE whose decoder ignores z (posterior collapse) outputs about the mean image for every input: its
    reconstructions are then no closer to the inputs than the mean test image itself."""
    mse, mse_mean = float(((recon - x) ** 2).mean()), float(((mean_image - x) ** 2).mean())
    checks.record(mse < mse_mean, path, "reconstructions better than the mean image",
                  f"MSE {mse:.4f} against {mse_mean:.4f} for the mean test image" if mse < mse_mean else
                  f"MSE {mse:.4f}, no better than the mean test image's {mse_mean:.4f} (max pixel "
                  f"{float(recon.max()):.2f}): the decoder ignores its input (posterior collapse); train longer, or "
                  f"with a lower --beta or a --kl-warmup-epochs")


# ----------------------------------------------------------------------------------------------------------------
# The DCGAN


def first_layer_inputs(model, kinds: tuple[str, ...]) -> int | None:
    """What the model's first layer of `kinds` takes: in_channels of a ConvTranspose2d / Conv2d, in_features of a
    Linear; None when it has none."""
    for module in model.modules():
        kind = getattr(module, "original_name", "")
        weight = getattr(module, "weight", None) if kind in kinds else None
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0] if kind == "ConvTranspose2d" else weight.shape[1])
    return None


def first_layer_nz(generator) -> int | None:
    return first_layer_inputs(generator, ("ConvTranspose2d", "Conv2d", "Linear"))


def noise_size(generator, nz_flag: int | None) -> tuple[int, str]:
    """G's noise size, and where it comes from: --nz, else G's first layer, else 100."""
    if nz_flag is not None:
        return nz_flag, "--nz"
    nz = first_layer_nz(generator)
    return (nz, "G's first layer") if nz is not None else (100, "the default (G's first layer not recognised; "
                                                                 "pass --nz)")


def dataset_hint(folder: Path) -> str:
    """'; FOLDER/config.json says it was trained with --dataset mnist' when the file sits in a run folder, else ''."""
    run = experiments.read_run(folder, "dcgan")
    return f"; {folder / 'config.json'} says it was trained with --dataset {run.args['dataset']}" if run else ""


DRY_RUN = ("--allow-non-cifar10 checks it with its own image shape and packs it as a dry run of the packaging, "
           "into a zip named NOT-FOR-HANDIN")


def one_channel_hint(what: str, path: Path) -> str:
    """Why a G or D of a one-channel data set fails on CIFAR-10's RGB images, and what to do."""
    return (f"{what} (MNIST?){dataset_hint(path.parent)}. Retrain with dcgan_train.py --dataset cifar10; "
            f"{DRY_RUN}")


def gan_image_shape(checks: Checks, gen_path: Path, gan_run: Path | None, allowed: bool) -> tuple[tuple, str | None]:
    """(the image shape G and D are checked with, the data set of a dry run or None): CIFAR-10's, unless the GAN's
    run (the run that counts, or the folder the files are in) trained on another data set: then a FAIL (here, or the
    shape checks' for a one-channel set), or with --allow-non-cifar10 its own shape."""
    from dcgan_train import GRAY_DATASETS, dataset_channels
    run = experiments.read_run(gan_run or gen_path.parent, "dcgan")
    problem = experiments.not_cifar10(run.args) if run else None
    if problem is None:
        return CIFAR_SHAPE, None
    dataset, size = run.args["dataset"], run.args.get("image_size", 32)
    said = f"{run.dir / 'config.json'} says --dataset {dataset}"
    if allowed:
        shape = (dataset_channels(dataset), size, size)
        print(f"  WARN  {gen_path.name}: {run.name} was {problem} ({said}): a DRY RUN (--allow-non-cifar10), "
              f"checked with its own images {shape_str(shape)}; the zip is named NOT-FOR-HANDIN", flush=True)
        return shape, dataset
    if dataset not in GRAY_DATASETS:  # an RGB image-folder G passes every shape check; a gray one fails them
        checks.record(False, gen_path, "trained on CIFAR-10", f"{run.name} was {problem} ({said}). Train with "
                      f"dcgan_train.py --dataset cifar10; {DRY_RUN}")
    return CIFAR_SHAPE, None


def check_generator(checks: Checks, path: Path, nz_flag: int | None, n: int,
                    shape: tuple = CIFAR_SHAPE) -> tuple[object, torch.Tensor | None]:
    """Returns (G or None, its images in [-1, 1] or None). `shape`: one image's (gan_image_shape)."""
    from dcgan_train import denorm
    names = ["G(z) shape", "G(z) values in [-1, 1]", "denorm(G(z)) values in [0, 1]"]
    generator = load(checks, path, *names)
    if generator is None:
        return None, None
    nz, where = noise_size(generator, nz_flag)
    z = torch.randn((n, nz, 1, 1), generator=torch.Generator().manual_seed(0))
    z_text, expected = f"torch.randn({n}, {nz}, 1, 1) (nz from {where})", (n, *shape)
    try:
        with torch.no_grad():
            images = generator(z)
    except Exception as err:
        checks.record(False, path, names[0], f"G fails on torch.randn({n}, {nz}, 1, 1) (nz {nz} from {where}): "
                                             f"{short_error(err)}")
        checks.skip(path, "no output", *names[1:])
        return generator, None
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != expected:
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 1:
            detail = one_channel_hint(f"G makes 1-channel (greyscale) images {shape_str(images)}, but the coursework "
                                      f"needs CIFAR-10 RGB images {shape_str(expected)}: this generator was trained on "
                                      f"a one-channel data set", path)
        else:
            detail = f"{z_text} gives {shape_str(images)}, expected {shape_str(expected)}"
        checks.record(False, path, names[0], detail)
        checks.skip(path, "wrong shape", *names[1:])
        return generator, None
    checks.record(True, path, names[0], f"{z_text} -> {shape_str(images)}")
    in_range = bool(torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1)
    checks.record(in_range, path, names[1], value_range(images) if in_range else
                  f"{value_range(images)} is outside [-1, 1] (or not finite): end G with tanh")
    pixels = denorm(images)
    ok = bool(pixels.shape == images.shape and pixels.min() >= 0 and pixels.max() <= 1)
    checks.record(ok, path, names[2], value_range(pixels) if ok else f"{value_range(pixels)}, shape "
                                                                      f"{shape_str(pixels)}")
    return generator, images if in_range else None


def check_discriminator(checks: Checks, path: Path, fake_images: torch.Tensor | None, n: int,
                        shape: tuple = CIFAR_SHAPE):
    what = "one value per image"
    discriminator = load(checks, path, what)
    if discriminator is None:
        return None
    # The generator's images when it produced good ones (a grader's cell does D(G(z))), plus an odd batch size
    # to catch a batch size baked into a reshape.
    generator = torch.Generator().manual_seed(1)
    batches = [fake_images if fake_images is not None else torch.rand((n, *shape), generator=generator) * 2 - 1,
               torch.rand((7, *shape), generator=generator) * 2 - 1]
    shapes = []
    for x in batches:
        try:
            with torch.no_grad():
                out = discriminator(x)
        except Exception as err:
            in_channels = first_layer_inputs(discriminator, ("Conv2d",))
            hint = "" if in_channels in (None, shape[0]) else one_channel_hint(
                f". D's first layer takes {in_channels}-channel images, but the coursework's D gets CIFAR-10 RGB "
                f"images: it was trained on a one-channel data set", path)
            checks.record(False, path, what, f"D fails on input of shape {shape_str(x)}: "
                                             f"{short_error(err)}{hint}")
            return discriminator
        if not isinstance(out, torch.Tensor) or out.numel() != len(x) or out.shape[0] != len(x):
            checks.record(False, path, what, f"D(x) for x of shape {shape_str(x)} gives {shape_str(out)}, "
                                             f"expected {len(x)} values (shape ({len(x)},) or ({len(x)}, 1))")
            return discriminator
        if not torch.isfinite(out).all():
            checks.record(False, path, what, f"D(x) is not finite for x of shape {shape_str(x)}")
            return discriminator
        shapes.append(f"{shape_str(x)} -> {shape_str(out)}")
    checks.record(True, path, what, ", ".join(shapes))
    return discriminator


def check_param_budget(checks: Checks, gen_path: Path, generator, discriminator) -> None:
    from dcgan_train import MAX_PARAMS
    what = f"G + D parameters at most {MAX_PARAMS:,}"
    if generator is None or discriminator is None:
        checks.skip(gen_path, "G or D did not load", what)
        return
    n_g, n_d = n_params(generator), n_params(discriminator)
    total = n_g + n_d
    checks.record(total <= MAX_PARAMS, gen_path, what,
                  f"G {n_g:,} + D {n_d:,} = {total:,}" + ("" if total <= MAX_PARAMS else
                                                          f", {total - MAX_PARAMS:,} too many: lower --ngf / --ndf"))


# ----------------------------------------------------------------------------------------------------------------
# Which files, the report beside them, the test cells and the bundle


def model_paths(args) -> tuple[Path, Path, Path, list[Path]]:
    """The three files to check, and the run folders they come from (printed with the reason for each run)."""
    folder = Path(args.dir) if args.dir else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"{folder}: no such folder. Give the folder holding {VAE_FILE}, {GEN_FILE} and {DISC_FILE}, "
                        f"or leave it out to check the runs that count in {args.runs_root}")
    runs = {}
    for script, flag, needed in (("vae", "vae_run", not args.vae), ("dcgan", "gan_run", not (args.gen and args.disc))):
        explicit = getattr(args, flag)
        if explicit or (needed and folder is None):
            run, reason = experiments.counted_run(args.runs_root, script, explicit, f"make submission {flag.upper()}",
                                                  log=lambda msg: print(msg, flush=True))
            print(f"{'VAE' if script == 'vae' else 'DCGAN'}: {run.name}: {reason}", flush=True)
            runs[script] = run.dir
    vae_dir, gan_dir = runs.get("vae", folder), runs.get("dcgan", folder)
    vae_path = Path(args.vae) if args.vae else vae_dir / VAE_FILE
    gen_path = Path(args.gen) if args.gen else gan_dir / GEN_FILE
    disc_path = Path(args.disc) if args.disc else gan_dir / DISC_FILE
    return vae_path, gen_path, disc_path, [runs.get("vae"), runs.get("dcgan")]


def data_dirs_to_try(args, vae_path: Path) -> list[tuple[Path, str]]:
    """--data-dir alone when given; else the VAE run's own data folder (config.json beside the file), then data/."""
    if args.data_dir:
        return [(Path(args.data_dir), "--data-dir")]
    found = []
    try:
        config = read_run_config(vae_path.parent, "vae")
        found.append((Path(config["args"]["data_dir"]), f"the run's --data-dir, in {vae_path.parent.name}/config.json"))
    except (UserError, KeyError, TypeError):
        pass
    if DEFAULT_DATA_DIR not in [d for d, _ in found]:
        found.append((DEFAULT_DATA_DIR, "the default data folder"))
    return found


def check_report_shows(checks: Checks, figures: Path, run_dirs: list[Path | None]) -> None:
    """FAIL when the report beside `figures` (its report.json) shows other runs than those checked, or shows them
    before they exported the files checked (trained on since)."""
    try:
        made_from = json.loads((figures.parent / "report.json").read_text())
    except (OSError, ValueError):
        return
    for run_dir, key, what in zip(run_dirs, ("vae_run", "gan_run"), ("VAE", "DCGAN")):
        shown = made_from.get(key)
        if run_dir is None or not shown:
            continue
        check = f"the report shows the {what} checked"
        reported = made_from.get("exported_steps", {}).get(key)
        exported = (read_export(run_dir) or {}).get("global_step")
        if Path(shown).resolve() != Path(run_dir).resolve():
            checks.record(False, figures.parent, check, f"it shows the {what} run {Path(shown).name}, but the {what} "
                                                        f"checked is {Path(run_dir).name}: run make report again "
                                                        f"(with the same runs)")
        elif reported is not None and reported != exported:
            checks.record(False, figures.parent, check, f"it shows {Path(run_dir).name} as exported at step "
                                                        f"{reported}, but its model files are from step {exported}: "
                                                        f"run make report again")
        else:
            checks.record(True, figures.parent, check, Path(run_dir).name)


def check_test_cells(checks: Checks, paths: dict[str, Path], data_dirs: list[tuple[Path, str]], nz: int,
                     dry_run: str | None) -> None:
    """The code the report gives for the notebook's test cells, run as a grader runs it (common/testcell.py). In a
    dry run the DCGAN's cell is left out: it feeds CIFAR-10's RGB 32 x 32 images, which a GAN of `dry_run` refuses."""
    mnist_root = next((data_root("mnist", d) for d, _ in data_dirs if has_mnist_test_files(d)), None)
    results = testcell.run_cells(paths, mnist_root=mnist_root, nz=nz)
    if dry_run:
        print(f"  note  {paths['gen'].name}: the DCGAN's test cell is not run in a dry run (it feeds CIFAR-10 "
              f"images to a GAN trained on {experiments.DATASET_NAMES.get(dry_run, dry_run)})", flush=True)
    for name, path in (("VAE", paths["vae"]),) + ((("DCGAN", paths["gen"]),) if not dry_run else ()):
        ok, detail = results[name]
        checks.record(ok, path, f"test cell ({testcell.SCRIPTS[name].name}'s transform and denorm in a clean Python)",
                      detail)


def prepare_zip_folder(zip_path: Path) -> None:
    """Delete a previous --zip (it is written again only when every check passes) and make the folder it goes
    into, before the slow checks; one clear line when that is impossible."""
    if zip_path.is_dir():
        raise UserError(f"--zip {zip_path} is a folder; give a file name such as {zip_path / 'CW2.zip'}")
    if zip_path.exists():
        zip_path.unlink()
        print(f"deleted the previous {zip_path}: it is written again only if every check passes", flush=True)
    if not zip_path.parent.is_dir():
        try:
            zip_path.parent.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"--zip {zip_path}: cannot create the folder {zip_path.parent} "
                            f"({err.strerror or err})") from None
        print(f"made the folder {zip_path.parent} for --zip", flush=True)


def pack(zip_path: Path, model_paths: dict[str, Path], figures: Path | None) -> list[str]:
    """Write ZIP with the model files under their coursework names and figures/*; atomic (temp file, rename)."""
    files = dict(model_paths)
    if figures is not None:
        files.update({f"figures/{path.relative_to(figures).as_posix()}": path for path in sorted(figures.rglob("*"))
                      if path.is_file() and not path.name.startswith(".")})
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, path in files.items():
            bundle.write(path, name)
    return list(files)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_images < 1:
        raise UserError("--n-images must be at least 1")
    figures = Path(args.figures) if args.figures else None
    if figures is not None and not args.zip:
        raise UserError("--figures is only used with --zip")
    if args.zip:  # first: whatever happens next, an old zip never outlives a check that did not pass
        prepare_zip_folder(Path(args.zip))
    vae_path, gen_path, disc_path, run_dirs = model_paths(args)

    torch.manual_seed(0)
    checks = Checks()
    print(f"check_submission: {vae_path}, {gen_path}, {disc_path} (CPU, torch {torch.__version__})", flush=True)
    data_dirs = data_dirs_to_try(args, vae_path)
    check_vae(checks, vae_path, data_dirs, args.n_images)
    shape, dry_run = gan_image_shape(checks, gen_path, run_dirs[1], args.allow_non_cifar10)
    generator, fake_images = check_generator(checks, gen_path, args.nz, args.n_images, shape)
    discriminator = check_discriminator(checks, disc_path, fake_images, args.n_images, shape)
    check_param_budget(checks, gen_path, generator, discriminator)
    if not checks.failed and not checks.skipped:  # a file that fails above would only fail here again, slower
        check_test_cells(checks, {"vae": vae_path, "gen": gen_path, "disc": disc_path}, data_dirs,
                         noise_size(generator, args.nz)[0], dry_run)
    if figures is not None:  # after the model checks, so a missing report does not hide a bad model
        n_png = len(list(figures.glob("*.png"))) if figures.is_dir() else 0
        checks.record(n_png > 0, figures, "report figures to pack", f"{n_png} PNG files in {figures}" if n_png else
                      f"no PNG figures in {figures}; build the report first (make report)")
        check_report_shows(checks, figures, run_dirs)
    ready = not checks.failed and not checks.skipped
    trained_on = experiments.DATASET_NAMES.get(dry_run, dry_run)
    verdict = "NOT READY to submit" if not ready else \
        f"all checks passed, as a DRY RUN: a DCGAN trained on {trained_on} is NOT a valid submission" if dry_run \
        else "all checks passed"
    print(f"{checks.passed} passed, {checks.failed} failed, {checks.skipped} skipped: {verdict}", flush=True)
    zip_path = args.zip and Path(args.zip)
    if zip_path and dry_run:  # CW2-NOT-FOR-HANDIN-mnist.zip: never mistaken for the one to hand in
        zip_path = zip_path.with_name(f"{zip_path.stem}-NOT-FOR-HANDIN-{dry_run}{zip_path.suffix}")
    if zip_path and not ready:
        print(f"{zip_path} not written: fix the failures above first", flush=True)
    elif zip_path:
        try:
            names = pack(zip_path, {VAE_FILE: vae_path, GEN_FILE: gen_path, DISC_FILE: disc_path}, figures)
        except OSError as err:  # a full disk, no permission: the checks passed, but there is no zip
            raise UserError(f"--zip {zip_path}: could not write it ({err.strerror or err})") from None
        n_figures = len(names) - 3
        print(f"wrote {zip_path}: {', '.join(names[:3])} and {n_figures} figure{'s' * (n_figures != 1)}"
              f"{' (a dry run of the packaging: not for hand-in)' if dry_run else ''}", flush=True)
    return 0 if ready else 1


if __name__ == "__main__":
    run_main(main)
