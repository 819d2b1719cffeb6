"""Data: whole data sets as uint8 tensors in memory, read by torchvision's own classes; batches by index."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import math
import shutil
import struct
import sys
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_path


# Spaces the per-epoch seeds of different --seed values apart (a prime larger than any epoch count), so that no
# (seed, epoch) pair shares its data order with another.
_EPOCH_SEED_STRIDE = 1_000_003


def epoch_permutation(seed: int, epoch: int, n: int, device=None) -> torch.Tensor:
    """The order of the training images in `epoch`: a pure function of (seed, epoch), so resume needs no state."""
    gen = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=gen).to(device)


def full_batches(n_images: int, batch_size: int) -> int:
    """Steps per epoch: only full batches (one fixed shape, so CUDA graphs and compiled code never see a short
    one); the remainder of each epoch's order is left out of that epoch. A set smaller than a batch is one step."""
    return max(1, n_images // batch_size)


# Bytes of the training set hashed for its fingerprint: evenly spaced over the whole set, so another copy of the
# data set (other images, another order, another size) is told apart at the cost of one small gather.
_FINGERPRINT_BYTES = 1 << 16


def data_identity(dataset: str | None, images: torch.Tensor, data_dir=None) -> dict:
    """What a checkpoint records about the images it was trained on: the data set, how many images, a fingerprint
    (a hash of their shape and of bytes sampled evenly across them), and where they were read from (for messages)."""
    flat = images.detach().contiguous().view(-1).view(torch.uint8)
    stride = max(1, flat.numel() // _FINGERPRINT_BYTES)
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(flat[::stride][:_FINGERPRINT_BYTES].cpu().numpy().tobytes())
    return {"dataset": dataset, "images": len(images), "fingerprint": digest.hexdigest()[:16],
            "data_dir": None if data_dir is None else str(data_dir)}


def describe_data(identity: dict) -> str:
    """'mnist, 300 images (fingerprint 1a2b..., from /data)' for a message naming two data sets."""
    where = f", from {identity['data_dir']}" if identity.get("data_dir") else ""
    return (f"{identity.get('dataset')}, {identity.get('images', '?'):,} images (fingerprint "
            f"{identity.get('fingerprint')}{where})")


def check_same_data(saved: dict | None, current: dict, run_dir) -> None:
    """A resume trains on the data its checkpoint was trained on, or it is not the same run any more (another
    epoch order, wrong images_seen): UserError unless the identities match (or the checkpoint has none)."""
    if saved and any(saved.get(k) != current[k] for k in ("dataset", "images", "fingerprint")):
        raise UserError(f"refusing to resume {run_dir} on other training data: its checkpoint was trained on "
                        f"{describe_data(saved)}, this start has {describe_data(current)}. Point --data-dir at the "
                        f"data the run used, or add --allow-other-data to continue on these images")


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]
_IDX_SETS = ("mnist", "fashion-mnist")
# Where torchvision keeps each data set's files under --data-dir (torchvision's MNIST.raw_folder, CIFAR10.base_folder)
_FILES_DIR = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py"}


def data_root(dataset: str, data_dir) -> Path:
    """--data-dir as torchvision wants it: the folder above MNIST/raw. A DATA_DIR that holds the IDX files itself
    (the MNIST/raw folder was given) is read from its grandparent; files in some other folder are refused with
    where they must go (torchvision would ask for DATA_DIR/MNIST/raw and try to download into it)."""
    data_dir = Path(data_dir)
    if dataset not in _IDX_SETS or (data_dir / _FILES_DIR[dataset]).is_dir() or not any(
            (data_dir / name).exists() or (data_dir / f"{name}.gz").exists() for name in _MNIST_FILES):
        return data_dir
    if data_dir.match(_FILES_DIR[dataset]):
        return data_dir.parent.parent
    raise UserError(f"the {dataset} files are in {data_dir} itself, but --data-dir names the folder above "
                    f"{_FILES_DIR[dataset]}: move them into {data_dir / _FILES_DIR[dataset]} and "
                    f"keep --data-dir {data_dir}")


def _copy_system_fashion_mnist(data_dir: Path) -> None:
    """Unpack Debian's Fashion-MNIST .gz files into torchvision's layout, once, so FashionMNIST reads them."""
    raw = data_dir / _FILES_DIR["fashion-mnist"]
    if all((raw / name).exists() for name in _MNIST_FILES) or not FASHION_MNIST_SYSTEM_DIR.is_dir():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for name in _MNIST_FILES:
        src = FASHION_MNIST_SYSTEM_DIR / f"{name}.gz"
        if src.exists() and not (raw / name).exists():
            with gzip.open(src, "rb") as fin, atomic_path(raw / name) as tmp, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def _idx_problem(path: Path) -> str | None:
    """Why an IDX file (MNIST's format: magic 0 0 0x08 ndim, big-endian sizes, bytes) is damaged, or None."""
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:3] != b"\x00\x00\x08" or header[3] not in (1, 3):
            return "not an IDX file of unsigned bytes (wrong magic number)"
        dims = f.read(4 * header[3])
    if len(dims) < 4 * header[3]:
        return "truncated header"
    expected = 4 + len(dims) + math.prod(struct.unpack(f">{header[3]}I", dims))
    size = path.stat().st_size
    return None if size == expected else f"{size:,} bytes where its header promises {expected:,} (truncated?)"


def _raise_if_damaged(dataset: str, data_dir: Path, train: bool, cifar_checksums: bool = False) -> None:
    """One line naming each data file that is present but damaged (a download would not replace it). The IDX
    headers are checked before loading; CIFAR-10's MD5 sums (torchvision checks them) only after a failed load."""
    damaged, folder = [], data_dir / _FILES_DIR[dataset]
    if dataset in _IDX_SETS:
        for name in _MNIST_FILES[:2] if train else _MNIST_FILES[2:]:
            if (folder / name).is_file() and (problem := _idx_problem(folder / name)):
                damaged.append(f"{folder / name} ({problem})")
    elif cifar_checksums:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity
        for name, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
            if (folder / name).is_file() and not check_integrity(str(folder / name), md5):
                damaged.append(f"{folder / name} (MD5 differs from the published file)")
    if damaged:
        raise UserError(f"damaged {dataset} file: {'; '.join(damaged)}. Delete it so it is downloaded again, "
                        f"or replace it with a good copy.")


def _missing_data_message(dataset: str, data_dir: Path, train: bool, err: Exception) -> str:
    where = data_dir / _FILES_DIR[dataset]
    if dataset in _IDX_SETS:
        needed = _MNIST_FILES[:2] if train else _MNIST_FILES[2:]
        missing = [name for name in needed if not (where / name).exists() and not (where / f"{name}.gz").exists()]
        hint = " (or: apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
        what = ", ".join(missing or needed) + f" (or the same names with .gz){hint}"
    else:
        what = ("data_batch_1 .. data_batch_5, test_batch, batches.meta (unpack cifar-10-python.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html)")
    # torchvision's download error is "Error downloading NAME:" then the mirrors tried, each with its reason: the
    # first line alone gave no reason; the last one says why (no network, a 404).
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = " ".join(lines[:1] + lines[-1:]) if lines[0].endswith(":") else lines[0]
    return (f"{dataset} is not in {data_dir} and could not be downloaded ({reason}). "
            f"Put {what} into {where}, or pass --data-dir pointing at a folder that has them.")


def load_images(dataset: str, data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole data set as (images uint8 [N, C, H, W], labels int64 [N]), downloaded if missing and the machine is
    online. One uint8 tensor (47 MB for MNIST, 150 MB for CIFAR-10) lets batches be sliced by index with no per-item
    PIL work."""
    from torchvision import datasets

    classes = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
    if dataset not in classes:
        raise UserError(f"unknown dataset {dataset!r}")
    data_dir = data_root(dataset, data_dir)
    if dataset == "fashion-mnist":
        _copy_system_fashion_mnist(data_dir)
    _raise_if_damaged(dataset, data_dir, train)
    # the folders torchvision's makedirs would make (DATA_DIR and its parents too), innermost first
    files_dir = data_dir / _FILES_DIR[dataset]
    missing = list(itertools.takewhile(lambda folder: not folder.exists(), [files_dir, *files_dir.parents]))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints download progress; keep stdout for our log
            ds = classes[dataset](data_dir, train=train, download=True)
            # MNIST's data: a uint8 tensor [N, 28, 28]; CIFAR-10's: a numpy array [N, 32, 32, 3] (HWC -> CHW)
            images = ds.data.unsqueeze(1) if dataset != "cifar10" else torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    except Exception as err:  # URLError, RuntimeError("not found"), a bad MD5 ...: no usable files
        _raise_if_damaged(dataset, data_dir, train, cifar_checksums=True)
        message = _missing_data_message(dataset, data_dir, train, err)
        for folder in missing:  # the folders it made and left empty: a wrong --data-dir leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a partial download stays where the next attempt resumes it
        raise UserError(message) from None
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images.contiguous().to(torch.uint8), labels


def load_image_folder(data_dir, image_size: int) -> torch.Tensor:
    """Every image under DATA_DIR/<class>/ (torchvision ImageFolder layout), resized and centre-cropped once."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(data_dir, transform=transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()]))
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--dataset folder: no images under {data_dir} ({err}). Put them in "
                               f"{data_dir}/<any subfolder>/*.png|jpg and pass --data-dir {data_dir}") from None
    images = []
    for index in range(len(folder)):
        try:
            images.append(folder[index][0])
        except OSError as err:  # PIL: truncated or not an image
            raise UserError(f"--dataset folder: {folder.samples[index][0]} is damaged ({err}); delete or "
                                   f"replace it") from None
    return torch.stack(images)
