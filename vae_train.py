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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from torchvision.utils import save_image

from common import devices
from common.checkpoints import save_torchscript, seed_everything
from common.data import epoch_permutation, load_images
from common.errors import run_main
from common.files import atomic_path
from common.flags import ArgumentParser, add_run_args, at_least, non_negative_float, positive_float
from common.readers import MODEL_FILES
from common.run import Meter, Run
from common.runs import resolve_run

# What a grader applies to test images before model(x), and how model outputs map back to pixels: the VAE works
# on grey levels in [0, 1] directly, so denorm only clamps.
transform = transforms.ToTensor()


def denorm(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1)




def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    g = parser.group("model and loss", resumable=False)
    g.add_argument("--arch", default="conv", choices=["conv", "mlp"], help="conv VAE, or the MLP baseline")
    g.add_argument("--latent-dim", type=at_least(1), default=16, help="size of z (docs/results.md: why 16)")
    g.add_argument("--beta", type=non_negative_float, default=1.0, help="weight of the KL term (1: the ELBO)")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="p(x|z): Bernoulli on grey levels (BCE), or Gaussian with one learned sigma")
    g.add_argument("--kl-warmup-epochs", type=non_negative_float, default=0.0,
                   help="ramp the KL weight linearly from 0 to beta over this many epochs (0: off)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    add_run_args(parser, epochs=10, batch_size=128, dataset="mnist", datasets=["mnist", "fashion-mnist"])
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
def save_samples(model: VAE, test_images: torch.Tensor, fixed_z: torch.Tensor, samples_dir, epoch: int) -> dict:
    """Test images above their reconstructions, and images decoded from the same fixed z every epoch; returns
    {TensorBoard tag: file}."""
    model.eval()
    x = to_float(test_images)
    recon, _, _ = model(x)
    grids = {"reconstructions": samples_dir / f"recon_epoch_{epoch:03d}.png",
             "prior_samples": samples_dir / f"prior_epoch_{epoch:03d}.png"}
    with atomic_path(grids["reconstructions"]) as tmp:
        save_image(torch.cat([x, recon]), tmp, nrow=len(x), format="png")
    with atomic_path(grids["prior_samples"]) as tmp:
        save_image(torch.sigmoid(model.decoder(fixed_z)), tmp, nrow=8, format="png")
    model.train()
    return grids


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(args, run: Run, state: dict, train_images: torch.Tensor, test_images: torch.Tensor) -> None:
    """The training loop: from where run.restore says, every epoch's full batches in the order of
    epoch_permutation(seed, epoch), then the test loss and the sample grids at each epoch end."""
    model, optimizer, scaler, meter = state["model"], state["optimizer"], state["scaler"], state["meter"]
    device, batch_size = train_images.device, args.batch_size
    amp = devices.amp_dtype(args.amp, device)  # the autocast dtype; None: float32
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    train_float = to_float(train_images)  # converted once (188 MB for MNIST): a step gathers its batch in one op
    terms = devices.compiled(vae_terms, device) if args.compile else vae_terms
    fixed_z = torch.randn((64, args.latent_dim), generator=torch.Generator().manual_seed(args.seed)).to(device)

    start_epoch, start_step = run.restore(state)
    for epoch in range(start_epoch, args.epochs):
        order = epoch_permutation(args.seed, epoch, len(train_images), device)
        for step in range(start_step if epoch == start_epoch else 0, run.steps_per_epoch):
            # This rank's share of the batch: every world_size-th image from its rank on (all of it with one process).
            batch = order[step * batch_size + run.rank:(step + 1) * batch_size:run.world_size]
            x = train_float[batch].contiguous(memory_format=memory_format)
            beta = kl_weight(args.beta, args.kl_warmup_epochs, epoch + step / run.steps_per_epoch)
            # The noise is drawn outside the (possibly compiled) loss: compiled code has its own random streams.
            eps = torch.randn((len(x), args.latent_dim), device=device)
            with devices.autocast(device, amp):
                recon_nll, kl = terms(model, x, eps)  # per image, nats
                recon, kl = recon_nll.mean(), kl.mean()
                # recon + beta * kl, the negative ELBO (beta = 1) per image, as one op: a Python float times a tensor
                # costs two more ops (the float is made a tensor) forward and again backward.
                loss = torch.add(recon, kl, alpha=beta)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            devices.average_gradients(model)  # torchrun: one all-reduce; nothing with one process
            scaler.step(optimizer)
            scaler.update()
            meter.add(train_loss=loss, train_recon=recon, train_kl=kl)  # their epoch means: metrics.csv
            run.step_done(state)  # non-finite check, checkpoint when due or signalled, stop

        beta = kl_weight(args.beta, args.kl_warmup_epochs, epoch + 1)
        columns = {**evaluate(model, test_images, beta, args.seed), "beta": beta}
        grids = save_samples(model, test_images[:16], fixed_z, run.samples_dir, epoch + 1) if run.is_main else {}
        run.epoch_done(state, columns, grids)  # metrics row, log line, checkpoint (a milestone when due)


def main(argv=None) -> int:
    plan = resolve_run(build_parser(), argv, script="vae")
    args = plan.args
    with devices.determinism(args.deterministic):  # before any CUDA work (cuBLAS reads its setting at start)
        rank, world_size, device = devices.init_distributed(args.device)  # torchrun: one process per GPU
        train_images, _ = load_images(args.dataset, args.data_dir, train=True)
        test_images, _ = load_images(args.dataset, args.data_dir, train=False)
        if args.train_limit:
            train_images = train_images[:args.train_limit]
        seed_everything(args.seed)
        model = VAE(args.arch, args.latent_dim, args.likelihood).to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if world_size > 1:
            seed_everything(args.seed + rank)  # same initial weights on every rank, different noise
        meter = Meter(device)
        # What a checkpoint holds: each object's state_dict, loaded in place on resume (common/checkpoints.py).
        state = dict(model=model, optimizer=devices.adam(model.parameters(), device, lr=args.lr),
                     scaler=devices.grad_scaler(device, devices.amp_dtype(args.amp, device)), meter=meter)
        with Run(plan, script="vae", device=device, images=train_images, meter=meter,
                 divergence_hint="a lower --lr (e.g. a tenth)") as run:
            n_params = sum(p.numel() for p in model.parameters())
            run.log(f"{args.arch} VAE, {n_params:,} parameters; {len(train_images):,} training images")
            train(args, run, state, train_images.to(device), test_images.to(device))
            run.export({MODEL_FILES["vae"][0]: model}, save=save_torchscript)  # model(x)[0] is the reconstruction
    return 0


if __name__ == "__main__":
    run_main(main)
