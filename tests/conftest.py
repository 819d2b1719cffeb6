"""Shared test fixtures: tiny data sets in the real on-disk formats, and a way to run the real scripts.

The data sets are small enough that a whole training run takes seconds on CPU, but they are written exactly as
torchvision expects them (IDX files for MNIST, pickled batches for CIFAR-10), so the real loaders run.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED_MNIST = REPO.parent / "shared" / "data"  # the real MNIST on the developers' machines; absent elsewhere


def synthetic_digits(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8, [n, size, size, channels]) of a bright square whose position depends on the label."""
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
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_digits(n, 28, 1, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def make_cifar10(root: Path, per_batch: int = 40, n_test: int = 40) -> Path:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, pickled as the real files are."""
    folder = root / "cifar-10-batches-py"
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
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second thread mostly spins (10x slower in-process here), as the
    scripts the tests start get OMP_NUM_THREADS=1 from script_env()."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return make_cifar10(tmp_path_factory.mktemp("cifar-data"))


def script_env() -> dict:
    env = dict(os.environ)
    env["GENMODELS_SKIP_CIFAR_MD5"] = "1"  # the synthetic CIFAR-10 batches cannot match the published MD5 sums
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add noise, and tests share 2 cores
    return env


def run_script(script: str, *args, check: bool = True, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, with the test environment; return the finished process."""
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


# A script run in-process under a small wrapper that injects a fault at an exact point, so the fault tests are
# deterministic: `target` is "module.attr" of a function (e.g. "torch.optim.Adam.step", "vae_train.evaluate");
# on its `n`-th call the wrapper sends the process SIGTERM (a real signal, delivered to the real handlers) just
# before the call runs.
_SIGNAL_WRAPPER = """
import functools, importlib, os, signal, sys
sys.path.insert(0, {repo!r})
import common
script = importlib.import_module({script!r})
owner_path, attr = {target!r}.rsplit(".", 1)
parts = owner_path.split(".")
owner = importlib.import_module(parts[0])
for part in parts[1:]:
    owner = getattr(owner, part)
original, calls = getattr(owner, attr), [0]
@functools.wraps(original)
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
setattr(owner, attr, wrapped)
common.run_main(script.main, sys.argv[1:])
"""


def run_with_signal(script: str, target: str, n: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    code = _SIGNAL_WRAPPER.format(repo=str(REPO), script=script.removesuffix(".py"), target=target, n=n)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=timeout)
