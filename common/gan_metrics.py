"""A classifier FID for the one-channel data sets (MNIST, Fashion-MNIST): GAN quality measurable with no download.

FID (Heusel et al., 2017) needs Inception weights and is defined on natural images; for digits and clothes a small
CNN trained on the data set's own labels gives a feature space that knows the classes. Its penultimate features go
through the same Frechet distance as Inception's (dcgan_train.fid_from_features), and its argmax gives the class
shares of the samples: a number for mode collapse (a class at 0% is a missing mode). These numbers compare runs
with each other on one data set; they are not comparable with published (Inception, CIFAR-10) FIDs.

    evaluator = ClassifierFID.for_dataset("mnist", data_dir, device)   # None for other data sets
    evaluator(generator, nz)   # {"cfid": 12.3, "class_min": 0.08, "class_max": 0.12}

The classifier is trained once (seconds on a CPU, deterministic, the global RNG untouched) and cached beside the
data as DATA_DIR/classifier-fid/<dataset>-v1.pt, with its test accuracy. The reference features are the test set's.
Importing this module has no side effects.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_images
from .files import atomic_path

SUPPORTED = ("mnist", "fashion-mnist")
VERSION = 1            # bump when the architecture or the training recipe changes: old caches are then ignored
TRAIN_EPOCHS = 2
TRAIN_MIN_STEPS = 60   # small training sets (tests, subsets) get more epochs, so the classifier still learns
TRAIN_BATCH = 128
TRAIN_SEED = 0
N_CLASSES = 10
BATCH = 500            # images per forward pass when sampling and extracting features


class Classifier(nn.Module):
    """image [N, 1, 32, 32] in [-1, 1] -> (features [N, 128], logits [N, 10]).

    1 x 32 x 32 -> 16 x 16 x 16 -> 32 x 8 x 8 -> 64 x 4 x 4 -> 128 features -> 10 logits. Strided convolutions and
    batch norm: 98.9% on MNIST and 90.2% on Fashion-MNIST after two epochs, 10-20 s on 2 CPU cores.
    """

    def __init__(self, width: int = 16, n_features: int = 128):
        super().__init__()
        layers, c_in = [], 1
        for c_out in (width, width * 2, width * 4):  # each block halves the side
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, n_features), nn.ReLU())
        self.head = nn.Linear(n_features, N_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


class _OnUint8(nn.Module):
    """What dcgan_train.extract_features hands an extractor (uint8 [N, 3, H, W], grey repeated to RGB) -> the
    classifier's (features, logits), so the Inception path and this one share the feature loop."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor):
        return self.classifier(x[:, :1].float().div(127.5).sub(1))  # the same [-1, 1] as G's outputs


def load_split(dataset: str, data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 32, 32] (padded from 28 with black, as dcgan_train.load_training_images) and labels."""
    images, labels = load_images(dataset, data_dir, train=train)
    return F.pad(images, (2, 2, 2, 2)), labels


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of the training set, so a cache trained on other data (say, a test's tiny set) is not reused."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def classifier_epochs(n_images: int) -> int:
    return max(TRAIN_EPOCHS, math.ceil(TRAIN_MIN_STEPS / math.ceil(n_images / TRAIN_BATCH)))


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, epochs: int | None = None
                     ) -> Classifier:
    """Adam with a one-cycle schedule, classifier_epochs() epochs, on the CPU. Seeded inside fork_rng: the same
    weights every time, and the caller's RNG (a training run's) is left exactly as it was."""
    epochs = epochs or classifier_epochs(len(train_images))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = Classifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        order_gen = torch.Generator().manual_seed(TRAIN_SEED)
        steps = epochs * -(-len(train_images) // TRAIN_BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_images), generator=order_gen)
            for start in range(0, len(order), TRAIN_BATCH):
                batch = order[start:start + TRAIN_BATCH]
                x = train_images[batch].float().div_(127.5).sub_(1)
                loss = F.cross_entropy(model(x)[1], train_labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    device = next(model.parameters()).device
    correct = sum(int((model(images[i:i + BATCH].to(device).float().div(127.5).sub(1))[1].argmax(1).cpu()
                       == labels[i:i + BATCH]).sum()) for i in range(0, len(images), BATCH))
    return correct / len(images)


def cache_path(dataset: str, data_dir) -> Path:
    return Path(data_dir) / "classifier-fid" / f"{dataset}-v{VERSION}.pt"


def load_or_train(dataset: str, data_dir, log=print) -> tuple[Classifier, dict, torch.Tensor]:
    """The cached classifier for `dataset`, trained (and cached) first if the cache is missing or was made from
    other training data. Returns (model in eval mode on the CPU, info: test_accuracy, path, ..., test images)."""
    train_images, train_labels = load_split(dataset, data_dir, train=True)
    test_images, test_labels = load_split(dataset, data_dir, train=False)
    data_hash = fingerprint(train_images, train_labels)
    path = cache_path(dataset, data_dir)
    model = Classifier()
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or garbage: say so, then train a new one
            log(f"classifier FID: {path} does not load ({type(err).__name__}); training a new classifier")
            cached = None
        if cached is not None and cached.get("fingerprint") == data_hash:
            model.load_state_dict(cached["state_dict"])
            info = {k: v for k, v in cached.items() if k != "state_dict"}
            log(f"classifier FID: {dataset} classifier from {path} (test accuracy {info['test_accuracy']:.2%})")
            return model.eval(), {**info, "path": str(path)}, test_images
        if cached is not None:
            log(f"classifier FID: {path} was trained on other {dataset} data; training a new classifier")

    start = time.monotonic()
    model = train_classifier(train_images, train_labels)
    seconds = time.monotonic() - start
    info = {"dataset": dataset, "version": VERSION, "fingerprint": data_hash,
            "epochs": classifier_epochs(len(train_images)),
            "train_images": len(train_images), "test_images": len(test_images),
            "test_accuracy": accuracy(model, test_images, test_labels), "train_seconds": seconds,
            "torch": str(torch.__version__)}
    log(f"classifier FID: trained a {dataset} classifier in {seconds:.0f} s: test accuracy "
        f"{info['test_accuracy']:.2%}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({**info, "state_dict": model.state_dict()}, tmp)
        log(f"classifier FID: cached at {path}")
    except OSError as err:  # a read-only data folder: the numbers are the same, it is only retrained next time
        log(f"classifier FID: could not cache the classifier at {path} ({err}); it will be trained again next time")
    return model, {**info, "path": str(path)}, test_images


class ClassifierFID:
    """Classifier FID and class shares of a generator's samples against the test set (features computed once)."""

    def __init__(self, classifier: Classifier, reference_images: torch.Tensor, device, info: dict | None = None):
        self.device = torch.device(device)
        self.extractor = _OnUint8(classifier).to(self.device).eval()
        self.info = info or {}
        self.reference_features, _ = self._features(reference_images)

    @classmethod
    def for_dataset(cls, dataset: str, data_dir, device="cpu", log=print) -> ClassifierFID | None:
        """The evaluator for `dataset` (training the classifier on first use), or None for a data set it does not
        support (three-channel sets: use Inception's FID there)."""
        if dataset not in SUPPORTED:
            return None
        classifier, info, test_images = load_or_train(dataset, data_dir, log)
        return cls(classifier, test_images, device, info)

    @torch.no_grad()
    def _features(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import dcgan_train  # here, not at the top: dcgan_train imports this module when it evaluates
        return dcgan_train.extract_features(self.extractor, images_uint8, batch_size=BATCH)

    def score_images(self, images_uint8: torch.Tensor) -> dict:
        """cfid, class_min, class_max (and every class_shares) of uint8 images [N, 1, 32, 32], generated or real."""
        import dcgan_train
        features, logits = self._features(images_uint8)
        shares = torch.bincount(logits.argmax(1), minlength=N_CLASSES).double() / len(logits)
        return {"cfid": dcgan_train.fid_from_features(self.reference_features, features),
                "class_min": float(shares.min()), "class_max": float(shares.max()), "class_shares": shares.tolist()}

    @torch.no_grad()
    def sample(self, generator: nn.Module, nz: int, n_samples: int = 5000, seed: int = 0) -> torch.Tensor:
        """n_samples uint8 images from `generator` in eval mode, from noise of its own torch.Generator: the same
        z at every call, and the global RNG (a training run's) is never drawn from."""
        import dcgan_train
        was_training = generator.training
        generator.eval()
        device = next(generator.parameters()).device
        noise_gen = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, n_samples, BATCH):
            z = torch.randn((min(BATCH, n_samples - start), nz, 1, 1), generator=noise_gen)
            images.append(dcgan_train.to_uint8(generator(z.to(device))).cpu())
        generator.train(was_training)
        return torch.cat(images)

    def __call__(self, generator: nn.Module, nz: int, n_samples: int = 5000, seed: int = 0) -> dict:
        """{"cfid", "class_min", "class_max", "class_shares"} for n_samples images of `generator`."""
        return self.score_images(self.sample(generator, nz, n_samples, seed))
