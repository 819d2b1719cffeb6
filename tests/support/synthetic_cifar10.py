"""Let torchvision read the tests' synthetic CIFAR-10 batches (tiny_data.make_cifar10).

torchvision's CIFAR10 checks every batch file against the published MD5 sums, which synthetic files cannot match.
Here that check becomes "the file exists", in the test process (conftest.py) and, through sitecustomize.py in this
folder, in every Python process the tests start. The product code reads CIFAR-10 through torchvision unchanged.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

CIFAR_MODULE = "torchvision.datasets.cifar"


def skip_md5_check(cifar_module) -> None:
    """Replace the MD5 test in torchvision.datasets.cifar (used for the batches and batches.meta) by a file test."""
    def check_integrity(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)

    cifar_module.check_integrity = check_integrity


class _PatchWhenImported(importlib.abc.MetaPathFinder):
    """Patches torchvision.datasets.cifar as it is imported, so a process that never reads CIFAR-10 never imports
    torchvision for it (a script's start-up, signal handlers included, stays exactly as a user's)."""

    def find_spec(self, name, path, target=None):
        if name != CIFAR_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            skip_md5_check(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Skip the MD5 check in this process: now if torchvision's CIFAR-10 module is loaded, else when it is."""
    if CIFAR_MODULE in sys.modules:
        skip_md5_check(sys.modules[CIFAR_MODULE])
    elif not any(isinstance(finder, _PatchWhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchWhenImported())
