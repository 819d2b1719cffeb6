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

from common import stop_signals

if __name__ == "__main__":
    stop_signals.install()  # first, before the slow imports: a stop during start-up is honoured, not fatal

import math
from pathlib import Path

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
METRIC_COLUMNS = ["epoch", "images_seen", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                  "test_kl", "beta", "train_time_s", "epoch_time_s"]


def build_parser() -> common.ArgumentParser:
    parser = common.ArgumentParser(description=__doc__)
    g = parser.group("model and loss", resumable=False)
    g.add_argument("--arch", default="conv", choices=["conv", "mlp"], help="conv VAE, or the MLP baseline")
    g.add_argument("--latent-dim", type=common.at_least(1), default=16, help="size of z (docs/results.md: why 16)")
    g.add_argument("--beta", type=common.non_negative_float, default=1.0, help="weight of the KL term (1: the ELBO)")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="p(x|z): Bernoulli on grey levels (BCE), or Gaussian with one learned sigma")
    g.add_argument("--kl-warmup-epochs", type=common.non_negative_float, default=0.0,
                   help="ramp the KL weight linearly from 0 to beta over this many epochs (0: off)")
    g.add_argument("--lr", type=common.positive_float, default=1e-3, help="Adam learning rate")
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
    """uint8 [N, 1, 28, 28] -> float [0, 1]: the same numbers as `transform` gives for a PIL image (one op)."""
    return images_uint8.div(255)


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


class VAETraining(common.TrainingJob):
    """The VAE, its optimiser and loss scaler, and the epoch's running sums: everything a checkpoint holds for it
    (state_dict is the one list), plus the steps of its loop (common.Run.train calls them)."""

    divergence_hint = "a lower --lr (e.g. a tenth)"
    live_images = {"reconstructions": "recon_epoch_{epoch:03d}.png", "prior_samples": "prior_epoch_{epoch:03d}.png"}

    def __init__(self, args, train_images: torch.Tensor, test_images: torch.Tensor, device: torch.device,
                 rank: int, world_size: int):
        self.args, self.device, self.n_images = args, device, len(train_images)
        self.train_images, self.test_images = train_images, test_images  # uint8: the data's identity, as loaded
        # Converted once (188 MB for MNIST): a step then gathers its batch in one op, nothing converts it again.
        self.train_float = to_float(train_images)
        common.seed_everything(args.seed)
        self.model = VAE(args.arch, args.latent_dim, args.likelihood).to(device)
        self.optimizer = common.adam(self.model.parameters(), device, lr=args.lr)
        # GPU speed flags (common.add_run_args); on CPU with the defaults none of them changes a number.
        self.amp = common.amp_dtype(args.amp, device)
        self.scaler = common.grad_scaler(device, self.amp)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.terms = common.compiled(vae_terms, device) if args.compile else vae_terms
        if world_size > 1:
            common.seed_everything(args.seed + rank)  # same initial weights on every rank, different noise
        # Sums over the epoch so far of (loss, recon, kl) over images; checkpointed, so a resumed epoch reports the
        # same means as an uninterrupted one; checked for NaNs by Run (running_sums). float32 on MPS (no float64).
        self.sums = torch.zeros(3, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        # Fixed things for the per-epoch image grids: the first 16 test images, and 64 latent codes.
        self.fixed_z = torch.randn((64, args.latent_dim), generator=torch.Generator().manual_seed(args.seed))
        self.fixed_z = self.fixed_z.to(device)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch_sums": self.sums.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        common.load_scaler(self.scaler, state["scaler"])  # --amp may change on resume
        self.sums = state["epoch_sums"].to(device=self.device, dtype=self.sums.dtype)
        for group in self.optimizer.param_groups:  # --init-from may start from another run with another --lr
            group["lr"] = self.args.lr

    def train_step(self, batch: torch.Tensor, global_step: int, epoch_progress: float) -> dict:
        args = self.args
        beta = kl_weight(args.beta, args.kl_warmup_epochs, epoch_progress)
        x = self.train_float[batch].contiguous(memory_format=self.memory_format)
        # The noise is drawn outside the (possibly compiled) loss: compiled code has its own random streams.
        eps = torch.randn((len(x), args.latent_dim), device=self.device)
        with common.autocast(self.device, self.amp):
            recon_nll, kl = self.terms(self.model, x, eps)
            loss = (recon_nll + beta * kl).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        common.average_gradients(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # the step's per-image means (recon and KL in one reduction), added x images at once
            step_means = torch.cat([loss.view(1), torch.stack([recon_nll, kl]).mean(1)])
            self.sums.add_(step_means, alpha=len(x))
        return common.Shown(step_means, {"loss": 0, "kl": 2})

    def running_sums(self) -> list[torch.Tensor]:
        return [self.sums]

    def end_epoch(self, run: common.Run, epoch: int) -> dict:
        beta = kl_weight(self.args.beta, self.args.kl_warmup_epochs, epoch + 1)
        common.all_reduce_sum(self.sums)
        train_loss, train_recon, train_kl = (self.sums / run.images_per_epoch).tolist()
        self.sums.zero_()
        row = {"train_loss": train_loss, "train_recon": train_recon, "train_kl": train_kl,
               **evaluate(self.model, self.test_images, beta, self.args.seed), "beta": beta}
        if run.is_main:
            save_samples(self.model, self.test_images[:16], self.fixed_z, run.samples_dir, epoch + 1)
        return row

    def summary(self, row: dict) -> str:
        return (f"train {row['train_loss']:8.2f} (recon {row['train_recon']:7.2f}, KL {row['train_kl']:6.2f})  "
                f"test {row['test_loss']:8.2f}  beta {row['beta']:g}")

    def export(self, folder: Path) -> list[Path]:
        """VAE_model.pth: torch.jit.load it; model(x)[0] is the reconstruction."""
        path = folder / "VAE_model.pth"
        common.save_torchscript(self.model, path)
        return [path]


def main(argv=None) -> int:
    plan = common.resolve_run(build_parser(), argv, script="vae")
    args = plan.args
    with common.determinism(args.deterministic):  # before any CUDA work (cuBLAS reads its setting at start)
        rank, world_size, device = common.init_distributed(args.device)  # torchrun: one process per GPU
        train_images, _ = common.load_images(args.dataset, args.data_dir, train=True)
        test_images, _ = common.load_images(args.dataset, args.data_dir, train=False)
        if args.train_limit:
            train_images = train_images[:args.train_limit]
        job = VAETraining(args, train_images.to(device), test_images.to(device), device, rank, world_size)
        with common.open_run(plan, script="vae", device=device, metric_columns=METRIC_COLUMNS) as run:
            n_params = sum(p.numel() for p in job.model.parameters())
            run.log(f"{args.arch} VAE, {n_params:,} parameters; {len(train_images):,} training images")
            run.train(job, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
            run.export(job)
    return 0


if __name__ == "__main__":
    common.run_main(main)
