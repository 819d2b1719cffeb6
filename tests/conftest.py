"""Shared test fixtures: tiny data sets in the real on-disk formats, and a way to run the real scripts.

The data sets (tiny_data.py) are small enough that a whole training run takes seconds on CPU, but they are written
exactly as torchvision expects them (IDX files for MNIST, pickled batches for CIFAR-10), so the real loaders run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"  # sitecustomize.py for the processes the tests start
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SUPPORT))

import synthetic_cifar10  # noqa: E402  (tests/support: torchvision reads the synthetic CIFAR-10 batches)
from tiny_data import make_cifar10, make_mnist  # noqa: E402

SHARED_MNIST = REPO.parent / "shared" / "data"  # the real MNIST on the developers' machines; absent elsewhere

synthetic_cifar10.install()  # in this process; script_env() does the same in the processes the tests start


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
    # tests/support/sitecustomize.py: torchvision accepts the synthetic CIFAR-10 batches (no published MD5 sums)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), *filter(None, [env.get("PYTHONPATH")])])
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


# A tiny VAE that learns the synthetic digits (its reconstructions beat the mean test image, as check_submission.py
# demands; 1 epoch at batch 64 does not): about 3 s on one CPU thread.
VAE_THAT_LEARNS = ["--epochs", "5", "--batch-size", "16", "--lr", "3e-3", "--latent-dim", "4"]
