"""Train a DCGAN (Radford et al., 2015, "Unsupervised Representation Learning with Deep Convolutional GANs").

    python dcgan_train.py                                   # the recommended run: CIFAR-10, 32x32, BCE loss
    python dcgan_train.py --dataset mnist --epochs 5        # one-channel digits, padded to 32x32
    python dcgan_train.py --d-norm spectral --loss hinge    # a common, more stable variant
    python dcgan_train.py --inception-weights weights-inception-2015-12-05-6726825d.pth   # FID and IS offline
    python dcgan_train.py --dataset mnist --fid off         # no quality evaluation at all
    python dcgan_train.py --resume latest                   # continue the newest DCGAN run

Everything lands in runs/<time>-<name>/ (see README.md): metrics.csv (one row per epoch), steps.csv (one row every
--log-every steps), samples/epoch_NNN.png (the same fixed noise every epoch), checkpoints/, and at the end
DCGAN_model_G.pth and DCGAN_model_D.pth (TorchScript). analyze_gan.py turns a run into figures.

Quality every --fid-every epochs (--fid auto): Inception FID and IS on CIFAR-10 and image folders, the classifier
FID of common/gan_metrics.py on MNIST and Fashion-MNIST. The defaults are the recipe chosen by gan_quality.py
(docs/gan-quality.md): batch 64, Adam lr 1.6e-3 for G and 8e-4 for D, an EMA of G with its own batch-norm
statistics. The plain DCGAN of Radford et al. is --batch-size 128 --lr-g 2e-4 --lr-d 2e-4 --ema 0 --diffaug none.
"""
from __future__ import annotations

from common import stop_signals

if __name__ == "__main__":
    stop_signals.install()  # first, before the slow imports: a stop during start-up is honoured, not fatal

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from torchvision.utils import save_image

from common import devices, gan_metrics
from common.checkpoints import load_checkpoint, one_line, save_torchscript, seed_everything
from common.data import epoch_permutation, load_image_folder, load_images
from common.errors import UserError, run_main
from common.files import atomic_path
from common.flags import (ArgumentParser, add_run_args, at_least, checked, non_negative_float, positive_float,
                          unit_interval)
from common.progress import still_running
from common.readers import MODEL_FILES, run_namespace
from common.run import Meter, Run
from common.runs import resolve_run

# What a grader applies to real images before D(x), and how G's outputs in [-1, 1] map back to pixels in [0, 1].
# Normalize with one mean and std broadcasts over 1 or 3 channels.
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def denorm(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-1, 1) + 1) / 2


# metrics.csv's columns beside the meter's (loss_d, d_real, loss_g, d_fake): the quality numbers, blank where not
# measured. cfid, class_min, class_max: common/gan_metrics.py's classifier FID (MNIST, Fashion-MNIST).
QUALITY_COLUMNS = ["fid", "inception_score", "cfid", "class_min", "class_max"]
MAX_PARAMS = 25_000_000
GRAY_DATASETS = ("mnist", "fashion-mnist")
DIFFAUG_OPS = ("color", "translation", "cutout")


def _diffaug_policy(text: str) -> str:
    """--diffaug: 'none' or a comma list of DIFFAUG_OPS."""
    ops = [op for op in text.split(",") if op]
    if text != "none" and (not ops or any(op not in DIFFAUG_OPS for op in ops)):
        raise argparse.ArgumentTypeError(f"must be none or a comma list of {', '.join(DIFFAUG_OPS)}, got {text!r}")
    return text


_smoothing_target = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    g = parser.group("model", resumable=False)
    g.add_argument("--nz", type=at_least(1), default=100, help="size of the noise vector z (Radford et al.: 100)")
    g.add_argument("--ngf", type=at_least(1), default=64, help="generator width: its last hidden layer's channels")
    g.add_argument("--ndf", type=at_least(1), default=64, help="discriminator width: its first layer's channels")
    g.add_argument("--image-size", type=int, default=32, choices=[32, 64], help="side of the generated images")
    g.add_argument("--d-norm", default="batch", choices=["batch", "spectral", "none"],
                   help="normalisation in D: batch norm (DCGAN), spectral norm (Miyato et al., 2018), or none")
    g.add_argument("--g-act", default="relu", choices=["relu", "leaky", "elu"], help="G's hidden activation")
    g.add_argument("--d-act", default="leaky", choices=["relu", "leaky", "elu"],
                   help="D's hidden activation (leaky: LeakyReLU(0.2), as in DCGAN)")
    g = parser.group("loss and optimisation", resumable=False)
    g.add_argument("--loss", default="bce", choices=["bce", "hinge"],
                   help="bce: BCE with logits, non-saturating G loss (Goodfellow et al., 2014); hinge: Lim & Ye, 2017")
    g.add_argument("--label-smoothing", type=_smoothing_target, default=1.0,
                   help="target for real images in D's BCE loss (one-sided, e.g. 0.9; Salimans et al., 2016); 1: off")
    g.add_argument("--instance-noise", type=non_negative_float, default=0.0,
                   help="std of Gaussian noise added to D's inputs, annealed linearly to 0 over --epochs "
                        "(Sonderby et al., 2017); 0: off")
    g.add_argument("--d-steps", type=at_least(1), default=1, help="D updates per G update")
    # Two time-scales (Heusel et al., 2017), G the faster: 8x and 4x Radford et al.'s 2e-4, the largest gain of the
    # quality benchmark (docs/gan-quality.md); D the faster (SAGAN's 4e-4 / 1e-4) collapsed there.
    g.add_argument("--lr-g", type=positive_float, default=1.6e-3,
                   help="Adam learning rate of G (Radford et al.: 2e-4)")
    g.add_argument("--lr-d", type=positive_float, default=8e-4,
                   help="Adam learning rate of D (Radford et al.: 2e-4)")
    g.add_argument("--beta1", type=unit_interval, default=0.5, help="Adam beta1 (Radford et al.: 0.5, not 0.9)")
    g.add_argument("--ema", type=unit_interval, default=0.999,
                   help="decay of the moving average of G's weights used for samples, FID and export (its batch-norm "
                        "statistics recomputed from its own outputs at every epoch end); 0: off")
    g.add_argument("--diffaug", type=_diffaug_policy, default="none",
                   help="DiffAugment (Zhao et al., 2020): the same random augmentation of real and generated images "
                        "before every D call, differentiable so G learns through it: none, or a comma list of "
                        f"{', '.join(DIFFAUG_OPS)}")
    g = parser.group("evaluation", resumable=True)
    g.add_argument("--fid", default="auto", choices=["auto", "inception", "classifier", "off"],
                   help="quality every --fid-every epochs. inception: FID and IS with torch-fidelity's Inception "
                        "weights (downloaded into torch's cache on first use); classifier: gan_metrics.py's FID "
                        "(MNIST, Fashion-MNIST); auto: classifier on those two (Inception too with "
                        "--inception-weights), Inception elsewhere, skipped with one line if it cannot be had")
    g.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"FID/IS Inception weights ({gan_metrics.INCEPTION_FILE} from torch-fidelity's v0.2.0 "
                        f"release); default: torch's hub cache, downloaded there when missing")
    g.add_argument("--fid-every", type=at_least(1), default=5, help="epochs between FIDs (and after the last)")
    g.add_argument("--fid-samples", type=at_least(2), default=10_000,
                   help="generated images per FID evaluation (Inception: against as many training images; "
                        "classifier: against the test set)")
    add_run_args(parser, epochs=50, batch_size=64, dataset="cifar10",
                        datasets=["cifar10", "mnist", "fashion-mnist", "folder"])
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Models


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.2), "elu": nn.ELU()}[name]


class Generator(nn.Module):
    """z [N, nz, 1, 1] (or [N, nz]) -> image [N, channels, size, size] in [-1, 1].

    32x32: nz -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> channels x 32 x 32
    64x64: nz -> (ngf*8) x 4 x 4 -> (ngf*4) x 8 x 8 -> (ngf*2) x 16 x 16 -> ngf x 32 x 32 -> channels x 64 x 64
    """

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 32, act: str = "relu"):
        super().__init__()
        widths = [ngf * 2 ** i for i in reversed(range(int(math.log2(image_size)) - 2))]  # e.g. [256, 128, 64]
        layers = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), activation(act)]
        for c_in, c_out in zip(widths, widths[1:]):  # each block doubles the side
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), activation(act)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net, self.nz = nn.Sequential(*layers), nz

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """image [N, channels, size, size] -> one logit per image [N]. Strided convolutions halve the side:

    32x32: channels -> ndf x 16 x 16 -> (ndf*2) x 8 x 8 -> (ndf*4) x 4 x 4 -> 1 x 1 x 1
    No normalisation on the first layer (Radford et al.: it made samples oscillate).
    """

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 32, norm: str = "batch", act: str = "leaky"):
        super().__init__()
        widths = [ndf * 2 ** i for i in range(int(math.log2(image_size)) - 2)]  # e.g. [64, 128, 256]
        layers = [nn.Conv2d(channels, widths[0], 4, 2, 1, bias=norm != "batch"), activation(act)]
        for c_in, c_out in zip(widths, widths[1:]):
            norm_layer = [nn.BatchNorm2d(c_out)] if norm == "batch" else []
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm != "batch"), *norm_layer, activation(act)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=norm != "batch")]
        self.net = nn.Sequential(*layers)
        init_weights(self)
        if norm == "spectral":  # after init: spectral norm rescales whatever weights it finds
            for module in self.net:
                if isinstance(module, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def init_weights(model: nn.Module) -> None:
    """Radford et al.: all weights from N(0, 0.02); batch-norm scales from N(1, 0.02), shifts 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


def dataset_channels(dataset: str) -> int:
    return 1 if dataset in GRAY_DATASETS else 3


def build_models(args, channels: int) -> tuple[Generator, Discriminator]:
    generator = Generator(args.nz, args.ngf, channels, args.image_size, args.g_act)
    init_weights(generator)
    return generator, Discriminator(args.ndf, channels, args.image_size, args.d_norm, args.d_act)


def count_params(args) -> int:
    """G plus D parameters, counted on the meta device (no memory, no RNG draws)."""
    with torch.device("meta"):
        generator, discriminator = build_models(args, dataset_channels(args.dataset))
    return sum(p.numel() for m in (generator, discriminator) for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_training_images(args) -> torch.Tensor:
    """The training set as uint8 [N, C, image_size, image_size]; grey sets padded from 28 to 32 with black."""
    if args.dataset == "folder":
        images = load_image_folder(args.data_dir, args.image_size)
    else:
        images, _ = load_images(args.dataset, args.data_dir, train=True)
        if args.dataset in GRAY_DATASETS:
            images = F.pad(images, (2, 2, 2, 2))  # 28 -> 32, digits stay centred
    if args.train_limit:
        images = images[:args.train_limit]
    if images.shape[-1] != args.image_size:  # e.g. CIFAR-10 at --image-size 64: resize once, not per batch
        resized = F.interpolate(images.float(), size=args.image_size, mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1]: the same numbers `transform` gives for a PIL image (the division makes the floats)."""
    return images_uint8.div(127.5).sub_(1)


# ----------------------------------------------------------------------------------------------------------------
# Losses and schedules (pure functions of the step, so a checkpoint holds no schedule state)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: str, real_target: float) -> torch.Tensor:
    real_logits, fake_logits = real_logits.float(), fake_logits.float()  # under autocast: the sums in float32
    if loss == "hinge":  # Lim & Ye (2017), as in SN-GAN (Miyato et al., 2018)
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_target))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits: torch.Tensor, loss: str) -> torch.Tensor:
    fake_logits = fake_logits.float()
    if loss == "hinge":
        return -fake_logits.mean()
    # Non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))) (Goodfellow et al., 2014, sec. 3).
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def noise_sigma(start: float, global_step: int, total_steps: int) -> float:
    """Instance-noise std, annealed linearly from `start` to 0 at the last step of --epochs."""
    return start * max(0.0, 1.0 - global_step / max(1, total_steps))


def add_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Instance noise on D's inputs, real and generated alike, so their supports overlap early in training."""
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


def ema_decay(decay: float, g_updates: int) -> float:
    """The EMA decay, smaller early on so the average does not remember the random init (as TensorFlow's
    ExponentialMovingAverage with num_updates)."""
    return min(decay, (1 + g_updates) / (10 + g_updates))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """Weights only: the live G's batch-norm statistics belong to its own weights, not the average's (copying them
    gave the EMA G grey backgrounds). standing_stats() computes the EMA G's own before it is used. One foreach call."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


STANDING_STATS_IMAGES = 1024   # generated images whose batch statistics make the EMA G's running statistics
STANDING_STATS_SEED_OFFSET = 2  # their noise: --seed + 2, apart from the fixed grid's (+0) and FID's (+1)


@torch.no_grad()
def standing_stats(generator: nn.Module, batch_size: int, seed: int) -> None:
    """Recompute G's batch-norm running statistics as the plain average over forward passes in training mode, at
    the training batch size, of noise from its own generator ("standing statistics", Brock et al., 2019, BigGAN
    app. C.1). Deterministic in the weights, and the training RNG is never drawn from."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the passes, not an exponential one
    was_training = generator.training
    generator.train()
    device, nz = next(generator.parameters()).device, generator.nz
    noise_gen = torch.Generator().manual_seed(seed)
    for _ in range(max(1, STANDING_STATS_IMAGES // batch_size)):
        generator(torch.randn((batch_size, nz, 1, 1), generator=noise_gen).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.train(was_training)


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """DiffAugment (Zhao et al., 2020, "Differentiable Augmentation for Data-Efficient GAN Training"; their
    DiffAugment_pytorch.py): a fresh random augmentation per image, applied to real and generated images alike
    before D, and differentiable, so G's gradient passes through it. x: [N, C, H, W] in [-1, 1].
    color: brightness +-0.5, contrast x0.5-1.5; translation: up to 1/8 of the side, gaps filled with 0;
    cutout: a square of half the side set to 0. Draws from the training RNG (checkpointed, so resume is exact)."""
    if policy == "none":
        return x
    n, _, h, w = x.shape
    device = x.device
    if "color" in policy:  # saturation, the paper's third colour op, is left out: it is a no-op on grey images
        x = x + (torch.rand(n, 1, 1, 1, device=device, dtype=x.dtype) - 0.5)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=device, dtype=x.dtype) + 0.5) + mean
    if "translation" in policy:
        shift_h, shift_w = h // 8, w // 8
        dy = torch.randint(-shift_h, shift_h + 1, (n, 1, 1), device=device)
        dx = torch.randint(-shift_w, shift_w + 1, (n, 1, 1), device=device)
        # Index a copy padded by one pixel of zeros; rows and columns shifted off the image land on the padding.
        rows = (torch.arange(h, device=device).view(1, h, 1) + dy).clamp(-1, h) + 1
        cols = (torch.arange(w, device=device).view(1, 1, w) + dx).clamp(-1, w) + 1
        batch = torch.arange(n, device=device).view(n, 1, 1)
        x = F.pad(x, (1, 1, 1, 1))[batch, :, rows, cols].permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    if "cutout" in policy:
        size_h, size_w = h // 2, w // 2
        top = torch.randint(0, h + 1 - size_h % 2, (n, 1), device=device) - size_h // 2
        left = torch.randint(0, w + 1 - size_w % 2, (n, 1), device=device) - size_w // 2
        ys, xs = torch.arange(h, device=device).view(1, h), torch.arange(w, device=device).view(1, w)
        inside = (((ys >= top) & (ys < top + size_h))[:, :, None] & ((xs >= left) & (xs < left + size_w))[:, None, :])
        x = x * ~inside[:, None]
    return x


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@torch.no_grad()
def save_samples(generator: nn.Module, fixed_noise: torch.Tensor, path: Path) -> None:
    was_training = generator.training
    generator.eval()
    images = denorm(generator(fixed_noise))
    generator.train(was_training)
    with atomic_path(path) as tmp:
        save_image(images, tmp, nrow=8, format="png")


def export_model(model: nn.Module, path: Path) -> None:
    """TorchScript for torch.jit.load (save_torchscript), spectral norm baked into plain weights first:
    TorchScript cannot script the parametrisation."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if nn.utils.parametrize.is_parametrized(module, "weight"):
            nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    save_torchscript(model, path)


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(args, run: Run, state: dict, train_images: torch.Tensor, evaluate) -> None:
    """The training loop: D's step and G's step (every --d-steps) on each full batch, in the order of
    epoch_permutation(seed, epoch), from where run.restore says; samples and quality at each epoch end."""
    generator, discriminator, meter = state["generator"], state["discriminator"], state["meter"]
    opt_g, opt_d, scaler_g, scaler_d = state["opt_g"], state["opt_d"], state["scaler_g"], state["scaler_d"]
    device, batch_size, total_steps = train_images.device, args.batch_size, args.epochs * run.steps_per_epoch
    amp = devices.amp_dtype(args.amp, device)  # the autocast dtype; None: float32
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # Compiled views share the parameters; checkpoints and export use the plain modules. D in G's step (weights
    # frozen, input differentiated) is another graph: a frame of its own (the lambda), not a recompile.
    nets = (generator, discriminator, lambda x: discriminator(x))
    train_g, train_d, d_in_g_step = [devices.compiled(n, device) if args.compile else n for n in nets]

    start_epoch, start_step = run.restore(state)
    for epoch in range(start_epoch, args.epochs):
        order = epoch_permutation(args.seed, epoch, len(train_images), device)
        for step in range(start_step if epoch == start_epoch else 0, run.steps_per_epoch):
            if args.compile:  # CUDA graphs: a new step begins (G's backward is pending across D's; pytorch#148439)
                torch.compiler.cudagraph_mark_step_begin()
            global_step = epoch * run.steps_per_epoch + step
            sigma = noise_sigma(args.instance_noise, global_step, total_steps)
            # This rank's share of the batch: every world_size-th image from its rank on (all of it with one process).
            batch = order[step * batch_size + run.rank:(step + 1) * batch_size:run.world_size]
            real = to_float(train_images[batch]).contiguous(memory_format=memory_format)

            # (1) D's step: real images towards 1 (or the smoothed target), G's images towards 0.
            with devices.autocast(device, amp):
                fake = train_g(torch.randn((len(real), args.nz, 1, 1), device=device))
                fake = fake.float() if amp else fake  # D sees float32 real and fake images: one compiled graph
                real_logits = train_d(add_noise(diff_augment(real, args.diffaug), sigma))
                fake_logits = train_d(add_noise(diff_augment(fake.detach(), args.diffaug), sigma))
                loss_d = d_loss(real_logits, fake_logits, args.loss, args.label_smoothing)
            opt_d.zero_grad(set_to_none=True)
            scaler_d.scale(loss_d).backward()
            devices.average_gradients(discriminator)  # torchrun: one all-reduce; nothing with one process
            scaler_d.step(opt_d)
            scaler_d.update()
            meter.add(loss_d=loss_d, d_real=mean_output(real_logits))

            # (2) G's step on the same fakes, every --d-steps D steps: D(G(z)) towards 1. D's weights are frozen
            # while the graph is built: G's gradient flows through D's input, D's own (8% of a step) is skipped.
            if (global_step + 1) % args.d_steps == 0:
                discriminator.requires_grad_(False)
                with devices.autocast(device, amp):
                    g_logits = d_in_g_step(add_noise(diff_augment(fake, args.diffaug), sigma))
                    loss_g = g_loss(g_logits, args.loss)
                discriminator.requires_grad_(True)
                opt_g.zero_grad(set_to_none=True)
                scaler_g.scale(loss_g).backward()
                devices.average_gradients(generator)
                scaler_g.step(opt_g)
                scaler_g.update()
                if "generator_ema" in state:
                    g_updates = (global_step + 1) // args.d_steps - 1
                    update_ema(state["generator_ema"], generator, ema_decay(args.ema, g_updates))
                # d_fake: D(G(z)) in G's step, the same moment as loss_g (D's step has already moved D on)
                meter.add(loss_g=loss_g, d_fake=mean_output(g_logits))
            run.step_done(state)  # non-finite check, checkpoint when due or signalled, stop

        run.epoch_done(state, *end_of_epoch(args, run, epoch, state, evaluate))


@torch.no_grad()
def mean_output(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean sigmoid(D(x)): D's probability of "real" under --loss bce; under hinge, only a squashed
    score (hinge logits are not log-odds)."""
    return torch.sigmoid(logits.float()).mean()


def end_of_epoch(args, run: Run, epoch: int, state: dict, evaluate) -> tuple[dict, dict]:
    """The EMA G's own batch-norm statistics, the fixed-noise grid, and the quality numbers every --fid-every
    epochs: (metrics columns, {TensorBoard tag: grid file})."""
    sampler = state.get("generator_ema", state["generator"])  # samples, FID and export use the EMA G
    if "generator_ema" in state:  # on every rank, before samples, FID, the checkpoint and the export
        standing_stats(sampler, args.batch_size, args.seed + STANDING_STATS_SEED_OFFSET)
    columns, grids = dict.fromkeys(QUALITY_COLUMNS, ""), {}
    if run.is_main:
        grids["fixed_noise"] = run.samples_dir / f"epoch_{epoch + 1:03d}.png"
        save_samples(sampler, fixed_noise(args, sampler), grids["fixed_noise"])
        if (epoch + 1) % args.fid_every == 0 or epoch + 1 == args.epochs:
            with still_running("the epoch's evaluation", run.log):  # FID on a CPU takes minutes: no silence
                columns.update(evaluate(sampler))
    return columns, grids


def fixed_noise(args, generator: nn.Module) -> torch.Tensor:
    """64 noise vectors from their own generator: the same grid positions show the same z all run long."""
    noise = torch.randn((64, args.nz, 1, 1), generator=torch.Generator().manual_seed(args.seed))
    return noise.to(next(generator.parameters()).device)


def quality(args, train_images: torch.Tensor, device: torch.device, inception_path, use_classifier: bool, log):
    """The epoch-end quality evaluation (rank 0): generator -> {fid, inception_score, cfid, class_min, class_max}.
    Building it draws init weights (Inception) or trains a classifier: the training RNG is kept out of it."""
    with torch.random.fork_rng(devices=[]):
        fid = cfid = None
        if inception_path is not None:
            log(f"FID and IS every {args.fid_every} epochs on {args.fid_samples:,} images ({inception_path})")
            fid = gan_metrics.FIDEvaluator(inception_path, train_images, args, device, log=log)
        if use_classifier:
            cfid = gan_metrics.ClassifierFID.for_dataset(args.dataset, args.data_dir, device, log=log)
            log(f"classifier FID every {args.fid_every} epochs on {args.fid_samples:,} samples against the "
                f"{args.dataset} test set")

    def evaluate(generator: nn.Module) -> dict:
        scores = {}
        if fid is not None:
            scores["fid"], scores["inception_score"] = fid(generator)
        if cfid is not None:  # the same noise as Inception's FID: --seed + 1
            got = cfid(generator, args.nz, n_samples=args.fid_samples,
                       seed=args.seed + gan_metrics.FID_NOISE_SEED_OFFSET)
            scores.update({key: got[key] for key in ("cfid", "class_min", "class_max")})
        return scores
    return evaluate


def models_from_checkpoint(ckpt: dict, run_dir, source=None) -> tuple[Generator, Discriminator]:
    """G and D in eval mode from a checkpoint (read from `source`) of the DCGAN run in `run_dir` (its config.json
    gives the architecture): G is the EMA generator when the run used one."""
    args = run_namespace(run_dir, "dcgan", build_parser())
    generator, discriminator = build_models(args, dataset_channels(args.dataset))
    try:
        generator.load_state_dict(ckpt.get("generator_ema") or ckpt["generator"])
        discriminator.load_state_dict(ckpt["discriminator"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:  # another model's, or an incomplete file
        raise UserError(f"checkpoint {source or run_dir} does not fit this run's model ({type(err).__name__}: "
                               f"{one_line(err)})") from None
    if ckpt.get("generator_ema") and ckpt.get("step_in_epoch"):  # mid-epoch: the EMA G's statistics: last epoch end's
        standing_stats(generator, args.batch_size, args.seed + STANDING_STATS_SEED_OFFSET)
    return generator.eval(), discriminator.eval()


def export_checkpoint(ckpt_path, out_dir) -> tuple[Path, Path]:
    """DCGAN_model_G.pth and DCGAN_model_D.pth from any checkpoint of a DCGAN run (e.g. a milestone
    checkpoints/epoch-NNN.pt chosen by its quality): G is the EMA generator when the run used one."""
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    ckpt = load_checkpoint(ckpt_path)  # its checksum verified: a damaged file is one line, not a model
    generator, discriminator = models_from_checkpoint(ckpt, ckpt_path.parent.parent, ckpt_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = tuple(out_dir / name for name in MODEL_FILES["dcgan"])
    export_model(generator, paths[0])
    export_model(discriminator, paths[1])
    return paths


def main(argv=None) -> int:
    plan = resolve_run(build_parser(), argv, script="dcgan")
    args = plan.args
    if args.loss == "hinge" and args.label_smoothing != 1.0:
        raise UserError("--label-smoothing applies to the BCE loss only; drop it or use --loss bce")
    n_params = count_params(args)
    if n_params > MAX_PARAMS:
        raise UserError(f"G plus D would have {n_params:,} parameters, above the {MAX_PARAMS:,} limit; lower "
                        f"--ngf / --ndf (or --image-size)")
    gan_metrics.find_inception_weights(args.inception_weights)  # a wrong path fails now, before any folder is made
    with devices.determinism(args.deterministic):  # before any CUDA work (cuBLAS reads its setting at start)
        rank, world_size, device = devices.init_distributed(args.device)  # torchrun: one process per GPU
        train_images = load_training_images(args).to(device)  # missing data fails here, before a word about FID
        inception_path, use_classifier, fid_note = gan_metrics.choose_evaluations(args, is_main=rank == 0)
        seed_everything(args.seed)
        generator, discriminator = (m.to(device) for m in build_models(args, train_images.shape[1]))
        if args.channels_last:  # before the EMA copy, so that both have one layout (one fused EMA update)
            generator.to(memory_format=torch.channels_last)
            discriminator.to(memory_format=torch.channels_last)
        if world_size > 1:
            seed_everything(args.seed + rank)  # same initial weights on every rank, different noise
        amp, meter = devices.amp_dtype(args.amp, device), Meter(device)
        # What a checkpoint holds: each object's state_dict, loaded in place on resume (common/checkpoints.py).
        state = dict(generator=generator, discriminator=discriminator,
                     opt_g=devices.adam(generator.parameters(), device, lr=args.lr_g, betas=(args.beta1, 0.999)),
                     opt_d=devices.adam(discriminator.parameters(), device, lr=args.lr_d, betas=(args.beta1, 0.999)),
                     scaler_g=devices.grad_scaler(device, amp), scaler_d=devices.grad_scaler(device, amp), meter=meter)
        if args.ema > 0:
            state["generator_ema"] = copy.deepcopy(generator).requires_grad_(False)
        best = "fid" if inception_path else "cfid" if use_classifier else None  # best.pt follows it
        with Run(plan, script="dcgan", device=device, images=train_images, meter=meter, best_column=best,
                 divergence_hint="lower --lr-d/--lr-g (e.g. half), or another --seed") as run:
            run.log(f"DCGAN {args.image_size}x{args.image_size}x{train_images.shape[1]}, {n_params:,} parameters "
                    f"(G+D); {len(train_images):,} training images")
            if fid_note:
                run.log(fid_note)
            evaluate = quality(args, train_images, device, inception_path, use_classifier, run.log) \
                if run.is_main else None
            train(args, run, state, train_images, evaluate)
            run.export(dict(zip(MODEL_FILES["dcgan"], (state.get("generator_ema", generator), discriminator))),
                       save=export_model)
    return 0


if __name__ == "__main__":
    run_main(main)
