"""GAN evaluation for training and analysis alike (it imports no script): seeded sampling, diversity, FID (Heusel et
al., 2017) and IS (Salimans et al., 2016) on torch-fidelity's Inception v3, and a classifier FID for MNIST and
Fashion-MNIST (docs/gan-quality.md): a small CNN trained on the set's own labels, whose features know the classes and
whose argmax gives the samples' class shares (a class at 0% is a missing mode). These numbers compare runs on one
data set; they are not comparable with published (Inception, CIFAR-10) FIDs.
"""
from __future__ import annotations

import hashlib
import math
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_images
from .errors import UserError
from .fid import (FID_BATCH, extract_features, feature_statistics, fid_from_features, frechet_distance,  # noqa: F401
                  real_statistics, statistics_dir)
from .files import atomic_path


# ---- Samples of a generator ----------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator outputs in [-1, 1] -> uint8 pixels, as the saved PNGs hold them (dcgan_train.denorm, then x255)."""
    return ((images.clamp(-1, 1) + 1) / 2).mul(255).round().to(torch.uint8)


@torch.no_grad()
def sample(generator: nn.Module, nz: int, n: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    """n images in [-1, 1] (on the CPU) from `generator` in eval mode, its mode restored after, from noise of
    their own torch.Generator(seed): the same z at every call, and the global RNG (a training run's) is never drawn
    from. The noise is drawn batch by batch, so the batch size is part of what fixes the samples."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    noise_gen = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        z = torch.randn((min(batch_size, n - start), nz, 1, 1), generator=noise_gen)
        images.append(generator(z.to(device)).float().cpu())
    generator.train(was_training)
    return torch.cat(images)


# ---- Diversity and memorisation: numbers that need no feature extractor --------------------------------------------


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS pixel distance within a set of images in [0, 1]; mode collapse drives it towards 0."""
    flat = torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1)).double()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = len(images)
    return float(distances.sum() / (n * (n - 1)))


def real_diversity(train_images: torch.Tensor) -> float:
    """The same number for 64 random training images: what a generator without collapse should come near."""
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:64]
    return diversity(train_images[pick].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() / 255)


def nearest_neighbours(samples: torch.Tensor, train: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample (in [0, 1]), the k nearest training images (L2 in pixel space) and their RMS distances."""
    flat = samples.flatten(1).double()
    # by chunks of the training set: 60,000 x 3,072 doubles would be 1.5 GB at once
    distances = torch.cat([torch.cdist(flat, train[start:start + 5000].flatten(1).double() / 255)
                           for start in range(0, len(train), 5000)], dim=1)
    nearest, index = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
    return index, nearest / math.sqrt(flat.shape[1])


# ---- FID (fid.py) and Inception Score (Salimans et al., 2016, through torchmetrics) --------------------------------


# torch-fidelity's FID Inception weights (its URL_INCEPTION_V3, spelled out so that importing this module does not
# import torch-fidelity): looked for (and downloaded to) torch.hub's cache, as torch-fidelity does.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
DOWNLOAD_TIMEOUT_S = 60
FID_NOISE_SEED_OFFSET = 1  # FID's noise seed is --seed + 1: apart from the fixed-noise grid's (--seed)


class _Precomputed(nn.Identity):
    """Lets torchmetrics' IS take logits we already extracted (one Inception pass serves FID and IS)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # torchmetrics would otherwise probe with a random image (global RNG)


def inception_score_from_logits(logits: torch.Tensor) -> float:
    from torchmetrics.image.inception import InceptionScore
    logits = logits.cpu()
    with warnings.catch_warnings():  # its note that it keeps every feature in memory: 10,000 x 1008 is fine
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=10)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]):  # compute() shuffles with the global RNG; keep training's RNG intact
        return float(metric.compute()[0])


def compute_fid(extractor: nn.Module, real_uint8: torch.Tensor, fake_uint8: torch.Tensor) -> float:
    """FID between two sets of uint8 images, in the feature space of `extractor` (a module: uint8 [N, 3, H, W]
    -> features [N, d]). With Inception pool features this is the standard FID; tests pass a tiny net."""
    return fid_from_features(extract_features(extractor, real_uint8), extract_features(extractor, fake_uint8))


def find_inception_weights(path: str | None) -> Path | None:
    """--inception-weights, else torch-fidelity's file in the torch hub cache, else None (FID skipped)."""
    if path:
        if not Path(path).is_file():
            raise UserError(f"--inception-weights {path}: no such file")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def download_inception_weights(dest: Path, log=print) -> str | None:
    """Fetch the weights into `dest` with torch.hub's downloader, as torch-fidelity does (it checks the SHA-256
    prefix in the file name), under a socket timeout: offline, urlopen would wait for ever. None when the file is
    there, else why not. The log line comes after the download: one announcing a download that fails would be untrue."""
    hash_prefix = torch.hub.HASH_REGEX.search(dest.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(dest), hash_prefix=hash_prefix and hash_prefix.group(1),
                                       progress=False)
    except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors; a wrong hash is a RuntimeError
        return str(getattr(err, "reason", err))
    finally:
        socket.setdefaulttimeout(previous)
    log(f"FID: downloaded the Inception weights (about 90 MB) from {INCEPTION_URL} to {dest}")
    return None


def choose_evaluations(args, is_main: bool, log=print) -> tuple[Path | None, bool, str | None]:
    """Which quality numbers a dcgan_train.py run computes (its --fid, --dataset, --inception-weights): (Inception
    weights or None, classifier FID or not, a line for the log when FID is skipped). Fails here, before a run folder
    exists, when the asked-for one cannot be had. Only rank 0 evaluates, so only rank 0 looks for the weights."""
    if args.fid == "classifier" and args.dataset not in SUPPORTED:
        raise UserError(f"--fid classifier: the classifier FID exists for mnist and fashion-mnist only, not "
                               f"--dataset {args.dataset}; use --fid inception (or auto)")
    classifier = args.fid in ("auto", "classifier") and args.dataset in SUPPORTED
    wants_inception = args.fid == "inception" or (
        args.fid == "auto" and (args.dataset not in SUPPORTED or args.inception_weights is not None))
    if not (wants_inception and is_main):
        return None, classifier, None
    path = find_inception_weights(args.inception_weights)
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if why := download_inception_weights(path, log):
            message = (f"no Inception weights: {path} is missing and could not be downloaded ({why}). Put "
                       f"{INCEPTION_FILE} (from {INCEPTION_URL}) there, or pass --inception-weights PATH")
            if args.fid == "inception":
                raise UserError(message)
            return None, classifier, f"FID skipped: {message}; --fid off silences this"
    return path, classifier, None


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception v3: uint8 [N, 3, H, W] -> (pool features [N, 2048], logits [N, 1008])."""

    def __init__(self, weights_path: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_path))

    def forward(self, x: torch.Tensor):
        return self.net(x)


class FIDEvaluator:
    """FID and IS of generated images against --fid-samples training images, whose statistics are computed once
    per data set, seed and sample count and cached beside the data (fid.real_statistics)."""

    def __init__(self, weights_path: Path, train_images: torch.Tensor, args, device: torch.device, log=print):
        self.extractor = InceptionFeatures(weights_path).to(device)
        self.n = min(args.fid_samples, len(train_images))
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[:self.n]
        cache_dir = statistics_dir(args.dataset, args.data_dir) if getattr(args, "data_dir", None) else None
        self.real_stats = real_statistics(self.extractor, train_images[pick.to(train_images.device)], cache_dir,
                                          log=log)
        self.seed, self.nz = args.seed, args.nz

    @torch.no_grad()
    def __call__(self, generator: nn.Module) -> tuple[float, float]:
        """Samples from the same noise at every evaluation (its own generator), so FID differences between
        epochs come from the weights alone and the training RNG is never touched."""
        fakes = to_uint8(sample(generator, self.nz, self.n, self.seed + FID_NOISE_SEED_OFFSET, FID_BATCH))
        fake_features, fake_logits = extract_features(self.extractor, fakes)
        fid = frechet_distance(*self.real_stats, *feature_statistics(fake_features))
        return fid, inception_score_from_logits(fake_logits)


# ---- Classifier FID (MNIST, Fashion-MNIST) -------------------------------------------------------------------------


SUPPORTED = ("mnist", "fashion-mnist")
VERSION = 1            # bump when the architecture or the training recipe changes: old caches are then ignored
TRAIN_EPOCHS = 2
TRAIN_MIN_STEPS = 60   # small training sets (tests, subsets) get more epochs, so the classifier still learns
TRAIN_BATCH = 128
TRAIN_SEED = 0
N_CLASSES = 10
BATCH = 500            # images per forward pass when sampling and extracting features


class Classifier(nn.Module):
    """uint8 images [N, C, 32, 32] (their first channel) -> (features [N, 128], logits [N, 10]). Strided convolutions
    and batch norm: 98.9% on MNIST and 90.2% on Fashion-MNIST after two epochs, 10-20 s on 2 CPU cores. It takes
    what extract_features hands an extractor (grey repeated to RGB), so Inception's FID and this one share it."""

    def __init__(self, width: int = 16, n_features: int = 128):
        super().__init__()
        layers, c_in = [], 1
        for c_out in (width, width * 2, width * 4):  # 1 x 32 x 32 -> 16 x 16 x 16 -> 32 x 8 x 8 -> 64 x 4 x 4
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, n_features), nn.ReLU())
        self.head = nn.Linear(n_features, N_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x[:, :1].float().div(127.5).sub(1))  # the same [-1, 1] as G's outputs
        return features, self.head(features)


def load_split(dataset: str, data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 32, 32] (padded from 28 with black, as dcgan_train.load_training_images) and labels."""
    images, labels = load_images(dataset, data_dir, train=train)
    return F.pad(images, (2, 2, 2, 2)), labels


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of the training set, so a cache trained on other data (say, a test's tiny set) is not reused."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, epochs: int) -> Classifier:
    """Adam with a one-cycle schedule, on the CPU. Seeded inside fork_rng: the same weights every time, and the
    caller's RNG (a training run's) is left exactly as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = Classifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        order_gen = torch.Generator().manual_seed(TRAIN_SEED)
        steps = epochs * math.ceil(len(train_images) / TRAIN_BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_images), generator=order_gen)
            for start in range(0, len(order), TRAIN_BATCH):
                batch = order[start:start + TRAIN_BATCH]
                loss = F.cross_entropy(model(train_images[batch])[1], train_labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    return model.eval()


def cache_path(dataset: str, data_dir) -> Path:
    return Path(data_dir) / "classifier-fid" / f"{dataset}-v{VERSION}.pt"


def load_or_train(dataset: str, data_dir, log=print) -> tuple[Classifier, dict, torch.Tensor]:
    """The cached classifier for `dataset`, trained (and cached) first if the cache is missing or was made from
    other training data. Returns (model in eval mode on the CPU, info: test_accuracy, path, ..., test images)."""
    train_images, train_labels = load_split(dataset, data_dir, train=True)
    test_images, test_labels = load_split(dataset, data_dir, train=False)
    data_hash = fingerprint(train_images, train_labels)
    path = cache_path(dataset, data_dir)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or garbage: say so, then train a new one
            log(f"classifier FID: {path} does not load ({type(err).__name__}); training a new classifier")
        else:
            if cached.get("fingerprint") == data_hash:
                model, info = Classifier(), dict(cached)
                model.load_state_dict(info.pop("state_dict"))
                log(f"classifier FID: {dataset} classifier from {path} (test accuracy {info['test_accuracy']:.2%})")
                return model.eval(), {**info, "path": str(path)}, test_images
            log(f"classifier FID: {path} was trained on other {dataset} data; training a new classifier")

    epochs = max(TRAIN_EPOCHS, math.ceil(TRAIN_MIN_STEPS / math.ceil(len(train_images) / TRAIN_BATCH)))
    start = time.monotonic()
    model = train_classifier(train_images, train_labels, epochs)
    seconds = time.monotonic() - start
    test_logits = extract_features(model, test_images, BATCH)[1]
    info = {"dataset": dataset, "version": VERSION, "fingerprint": data_hash, "epochs": epochs,
            "train_images": len(train_images), "test_images": len(test_images),
            "test_accuracy": float((test_logits.argmax(1).cpu() == test_labels).double().mean()),
            "train_seconds": seconds, "torch": str(torch.__version__)}
    log(f"classifier FID: trained a {dataset} classifier in {seconds:.0f} s: test accuracy {info['test_accuracy']:.2%}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({**info, "state_dict": model.state_dict()}, tmp)
        log(f"classifier FID: cached at {path}")
    except OSError as err:  # a read-only data folder: the numbers are the same, it is only retrained next time
        log(f"classifier FID: could not cache the classifier at {path} ({err}); it will be trained again next time")
    return model, {**info, "path": str(path)}, test_images


class ClassifierFID:
    """Classifier FID and class shares of a generator's samples against the test set, whose statistics are
    computed once and cached in cache_dir when given (fid.real_statistics)."""

    def __init__(self, classifier: Classifier, reference_images: torch.Tensor, device, info: dict | None = None,
                 cache_dir=None, log=print):
        self.device = torch.device(device)
        self.extractor = classifier.to(self.device).eval()
        self.info = info or {}
        self.reference_stats = real_statistics(self.extractor, reference_images, cache_dir, BATCH, log)

    @classmethod
    def for_dataset(cls, dataset: str, data_dir, device="cpu", log=print) -> ClassifierFID | None:
        """The evaluator for `dataset` (training the classifier on first use), or None for a data set it does not
        support (three-channel sets: use Inception's FID there)."""
        if dataset not in SUPPORTED:
            return None
        classifier, info, test_images = load_or_train(dataset, data_dir, log)
        return cls(classifier, test_images, device, info, statistics_dir(dataset, data_dir), log)

    def score_images(self, images_uint8: torch.Tensor) -> dict:
        """cfid, class_min, class_max (and every class_shares) of uint8 images [N, 1, 32, 32], generated or real."""
        features, logits = extract_features(self.extractor, images_uint8, batch_size=BATCH)
        shares = torch.bincount(logits.argmax(1), minlength=N_CLASSES).double() / len(logits)
        return {"cfid": frechet_distance(*self.reference_stats, *feature_statistics(features)),
                "class_min": float(shares.min()), "class_max": float(shares.max()), "class_shares": shares.tolist()}

    def sample(self, generator: nn.Module, nz: int, n_samples: int = 5000, seed: int = 0) -> torch.Tensor:
        """n_samples uint8 images of `generator` from noise of their own (sample()): the same at every call."""
        return to_uint8(sample(generator, nz, n_samples, seed, BATCH))

    def __call__(self, generator: nn.Module, nz: int, n_samples: int = 5000, seed: int = 0) -> dict:
        """{"cfid", "class_min", "class_max", "class_shares"} for n_samples images of `generator`."""
        return self.score_images(self.sample(generator, nz, n_samples, seed))
