"""Train a beta-VAE on MNIST (or Fashion-MNIST), resumably.

    python vae_train.py                                   # the recommended run: conv VAE, 16-d latent, beta 1
    python vae_train.py --beta 4 --name beta4             # one point of a beta sweep
    python vae_train.py --arch mlp                        # the classic 784-400-z-400-784 baseline
    python vae_train.py --resume latest                   # continue the newest VAE run after a crash

Everything lands in runs/<time>-<name>/ (see README.md); analyze_vae.py turns it into figures.
The loss is the negative ELBO per image in nats (Kingma & Welling, 2014, "Auto-Encoding Variational Bayes"),
with the KL term weighted by beta (Higgins et al., 2017, "beta-VAE").
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from torchvision.utils import save_image

import common

# What a grader applies to test images before model(x), and how model outputs map back to pixels: the VAE works
# on grey levels in [0, 1] directly, so denorm only clamps.
transform = transforms.ToTensor()


def denorm(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1)


# Losses per image in nats. train_time_s: the epoch's training steps alone (no evaluation, grids or epoch-end
# checkpoint), for throughput; epoch_time_s: the whole epoch.
METRIC_COLUMNS = ["epoch", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl", "beta",
                  "train_time_s", "epoch_time_s"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model and loss")
    g.add_argument("--arch", default="conv", choices=["conv", "mlp"], help="conv VAE, or the MLP baseline")
    g.add_argument("--latent-dim", type=int, default=16, help="size of z (README: why 16)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1: the plain ELBO)")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="p(x|z): Bernoulli on grey levels (BCE), or Gaussian with one learned sigma")
    g.add_argument("--kl-warmup-epochs", type=float, default=0.0,
                   help="ramp the KL weight linearly from 0 to beta over this many epochs (0: off)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    common.add_run_args(parser, epochs=10, batch_size=128, dataset="mnist", datasets=["mnist", "fashion-mnist"])
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Model


class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) from per-pixel decoder logits.

    model(x) returns (recon, mu, logvar) with recon in [0, 1] shaped like x. In training mode z is sampled
    (reparameterisation trick); in eval mode z = mu, so the exported model reconstructs deterministically.
    """

    def __init__(self, arch: str = "conv", latent_dim: int = 16, likelihood: str = "bernoulli"):
        super().__init__()
        self.latent_dim = latent_dim
        if arch == "conv":
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),    # 32 x 14 x 14
                nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),   # 64 x 7 x 7
                nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(),
                nn.Linear(256, 2 * latent_dim),                          # mu and logvar
            )
            self.decoder = nn.Sequential(
                nn.Linear(latent_dim, 256), nn.ReLU(),
                nn.Linear(256, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
                nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # 32 x 14 x 14
                nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),              # 1 x 28 x 28 logits
            )
        elif arch == "mlp":  # the baseline of Kingma & Welling's MNIST experiments
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 2 * latent_dim))
            self.decoder = nn.Sequential(nn.Linear(latent_dim, 400), nn.ReLU(), nn.Linear(400, 784),
                                         nn.Unflatten(1, (1, 28, 28)))
        else:
            raise ValueError(f"unknown arch {arch!r}")
        # Gaussian likelihood: one learned log standard deviation shared by all pixels ("sigma-VAE", Rybkin et al.,
        # 2021), so beta = 1 stays a true ELBO. A buffer, not a parameter, when unused.
        if likelihood == "gaussian":
            self.log_sigma = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("log_sigma", torch.zeros(()))
        self.likelihood = likelihood

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return torch.sigmoid(self.decoder(z)), mu, logvar


def vae_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction NLL and KL, in nats, each of shape [N]; z = mu + sigma * eps.

    eps is drawn from the global RNG when not given (training); evaluation passes its own fixed noise.
    """
    mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()  # under autocast: sum the terms in float32, not bf16/fp16
    if eps is None:
        eps = torch.randn_like(mu)
    logits = model.decoder(mu + eps * torch.exp(0.5 * logvar)).float()
    recon_nll = pixel_nll(model, logits, x).flatten(1).sum(1)
    # KL(N(mu, sigma^2) || N(0, 1)) summed over latent dimensions: Kingma & Welling (2014), Appendix B.
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return recon_nll, kl


def pixel_nll(model: VAE, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per pixel (same shape as logits) under the model's likelihood, from the decoder's logits."""
    if model.likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    mean, log_sigma = torch.sigmoid(logits), model.log_sigma
    return 0.5 * ((x - mean) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)


def kl_weight(beta: float, warmup_epochs: float, epoch_progress: float) -> float:
    """beta, ramped linearly from 0 over the first `warmup_epochs` epochs; a pure function of training progress."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch_progress / warmup_epochs)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, 28, 28] -> float [0, 1]: the same numbers as `transform` gives for a PIL image."""
    return images_uint8.float().div_(255)


@torch.no_grad()
def evaluate(model: VAE, images: torch.Tensor, beta: float, seed: int, batch_size: int = 1000) -> dict:
    """Mean test loss, reconstruction NLL and KL per image, with noise drawn from its own seeded generator, so
    the numbers depend only on the weights (and evaluation never moves the training RNG)."""
    model.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    recon_sum = kl_sum = 0.0
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        eps = torch.randn((len(x), model.latent_dim), generator=gen, device=x.device)
        recon_nll, kl = vae_terms(model, x, eps)
        recon_sum += recon_nll.sum().item()
        kl_sum += kl.sum().item()
    model.train()
    n = len(images)
    return {"test_loss": (recon_sum + beta * kl_sum) / n, "test_recon": recon_sum / n, "test_kl": kl_sum / n}


@torch.no_grad()
def save_samples(model: VAE, test_images: torch.Tensor, fixed_z: torch.Tensor, samples_dir, epoch: int) -> None:
    """Test images above their reconstructions, and images decoded from the same fixed z every epoch."""
    model.eval()
    x = to_float(test_images)
    recon, _, _ = model(x)
    with common.atomic_path(samples_dir / f"recon_epoch_{epoch:03d}.png") as tmp:
        save_image(torch.cat([x, recon]), tmp, nrow=len(x), format="png")
    with common.atomic_path(samples_dir / f"prior_epoch_{epoch:03d}.png") as tmp:
        save_image(torch.sigmoid(model.decoder(fixed_z)), tmp, nrow=8, format="png")
    model.train()


# ----------------------------------------------------------------------------------------------------------------
# Training


def main(argv=None) -> int:
    args, run_dir, resuming = common.resolve_run(build_parser, argv, script="vae")
    rank, world_size, device = common.init_distributed(args.device)  # torchrun: one process per GPU
    train_images, _ = common.load_images(args.dataset, args.data_dir, train=True)
    test_images, _ = common.load_images(args.dataset, args.data_dir, train=False)
    if args.train_limit:
        train_images = train_images[:args.train_limit]
    train_images, test_images = train_images.to(device), test_images.to(device)

    run = common.Run(run_dir, args, script="vae", resuming=resuming, metric_columns=METRIC_COLUMNS, device=device)
    common.seed_everything(args.seed)
    model = VAE(args.arch, args.latent_dim, args.likelihood).to(device)
    optimizer = common.adam(model.parameters(), device, lr=args.lr)
    amp = common.amp_dtype(args.amp, device)
    scaler = common.grad_scaler(device, amp)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    train_terms = torch.compile(vae_terms) if args.compile else vae_terms
    if world_size > 1:
        common.seed_everything(args.seed + rank)  # same initial weights on every rank, different noise
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"{args.arch} VAE, {n_params:,} parameters; {len(train_images):,} training images")

    # Fixed things for the per-epoch image grids: the first 16 test images, and 64 latent codes.
    fixed_z = torch.randn((64, args.latent_dim), generator=torch.Generator().manual_seed(args.seed)).to(device)
    shown_test_images = test_images[:16]

    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    start_epoch, start_step, metrics = 0, 0, []
    # Running sums over the epoch so far (sum over images of loss, recon, kl); kept in the checkpoint so a resumed
    # epoch reports the same means as an uninterrupted one. float32 on MPS, which has no float64.
    sums = torch.zeros(3, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    epoch_elapsed = 0.0
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step, metrics = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["metrics"]
        sums = ckpt["epoch_sums"].to(device=device, dtype=sums.dtype)
        epoch_elapsed = ckpt["epoch_elapsed_s"]
        common.set_rng_state(ckpt["rng"])
        run.log(f"resumed at epoch {start_epoch + 1}, step {start_step}/{steps_per_epoch}")
    run.rewrite_metrics(metrics)

    def make_state(epoch: int, step: int, elapsed: float) -> dict:
        return {"epoch": epoch, "step_in_epoch": step, "global_step": epoch * steps_per_epoch + step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "metrics": metrics,
                "epoch_sums": sums.cpu(), "epoch_elapsed_s": elapsed, "rng": common.rng_state()}

    if start_epoch >= args.epochs:
        run.log(f"run already finished ({start_epoch} of {args.epochs} epochs); raise --epochs to train longer")
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.monotonic() - epoch_elapsed
        order = common.epoch_permutation(args.seed, epoch, len(train_images), device)
        progress = common.Progress(steps_per_epoch, start_step, f"epoch {epoch + 1}/{args.epochs}", args.log_every,
                                   run.log)
        for step in range(start_step, steps_per_epoch):
            beta = kl_weight(args.beta, args.kl_warmup_epochs, epoch + step / steps_per_epoch)
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = to_float(train_images[common.shard(batch)])  # this rank's part of the global batch
            # The noise is drawn outside the (possibly compiled) loss: compiled code has its own random streams.
            eps = torch.randn((len(x), args.latent_dim), device=device)
            with common.autocast(device, amp):
                recon_nll, kl = train_terms(model, x.contiguous(memory_format=memory_format), eps)
                loss = (recon_nll + beta * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            common.average_gradients(model)
            scaler.step(optimizer)
            scaler.update()
            sums += torch.stack([loss * len(x), recon_nll.sum(), kl.sum()]).detach().to(sums.dtype)
            progress.update(step + 1, {"loss": loss.detach(), "kl": kl.detach().mean()})
            run.step_boundary(lambda: make_state(epoch, step + 1, time.monotonic() - epoch_start))
        progress.close()
        train_time = time.monotonic() - epoch_start

        beta = kl_weight(args.beta, args.kl_warmup_epochs, epoch + 1)
        common.all_reduce_sum(sums)
        train_loss, train_recon, train_kl = (sums / len(train_images)).tolist()
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_recon": train_recon, "train_kl": train_kl,
               **evaluate(model, test_images, beta, args.seed), "beta": beta}
        if run.is_main:
            save_samples(model, shown_test_images, fixed_z, run.samples_dir, epoch + 1)
        row["train_time_s"], row["epoch_time_s"] = train_time, time.monotonic() - epoch_start
        metrics.append(row)
        run.append_metrics(row)
        run.log(f"epoch {epoch + 1}/{args.epochs}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                                 if k != "epoch"))
        start_step, epoch_elapsed = 0, 0.0
        sums.zero_()
        path = run.save_checkpoint(make_state(epoch + 1, 0, 0.0))
        if run.preempted_by:  # a signal during evaluation: the epoch-end checkpoint above already holds everything
            run.exit_preempted(path)

    model_path = run.dir / "VAE_model.pth"
    if run.is_main and (not model_path.exists() or start_epoch < args.epochs):
        common.save_torchscript(model, model_path)
        run.log(f"exported {model_path} (torch.jit.load it; model(x)[0] is the reconstruction)")
        run.sync_mirror()
    return 0


if __name__ == "__main__":
    common.run_main(main)
