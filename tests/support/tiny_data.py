"""Tiny data sets written in the real on-disk formats, for the tests and for bench.py.

The images are synthetic (a bright bar whose position depends on the label, on a dark noisy background), but the
files are byte for byte the formats torchvision's own loaders read, so the real data path runs:
  - MNIST: the four IDX files of LeCun's distribution in <root>/MNIST/raw/;
  - CIFAR-10: the pickled batches of cifar-10-python.tar.gz in <root>/cifar-10-batches-py/ (torchvision checks
    these files against the published MD5 sums, which synthetic batches cannot match: whoever reads them must skip
    that check, as tests/support/sitecustomize.py does for the tests);
  - an image folder: PNG files in <root>/<class>/ (torchvision's ImageFolder layout, `--dataset folder`).
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_digits(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8, [n, size, size, channels]) of a bright bar whose position depends on the label, and the
    labels (uint8, [n], 0..9)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, size, size, channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        top, left = 2 + row * size // 2, 1 + col * (size - 4) // 5
        images[i, top:top + size // 3, left:left + size // 6] = rng.integers(180, 256, dtype=np.uint8)
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (LeCun's MNIST files): magic 0x08 (ubyte) + ndim, big-endian sizes, then the raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 300, n_test: int = 100) -> Path:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns root (the --data-dir)."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_digits(n, 28, 1, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def make_cifar10(root: Path, per_batch: int = 40, n_test: int = 40) -> Path:
    """<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, pickled as the real files are;
    returns root (the --data-dir)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(batches):
        n = n_test if name == "test_batch" else per_batch
        images, labels = synthetic_digits(n, 32, 3, seed)
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows of R, G, B planes, as in the real files
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return Path(root)


def make_image_folder(root: Path, n: int = 64, size: int = 32, seed: int = 0) -> Path:
    """n RGB PNG files of size x size in <root>/<class name>/<i>.png (ImageFolder layout); returns root."""
    from PIL import Image

    images, labels = synthetic_digits(n, size, 3, seed)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        folder = Path(root) / CIFAR10_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return Path(root)
