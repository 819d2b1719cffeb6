"""`make torch TORCH_INDEX=cu126|cpu`: another PyTorch build in place of the one in .venv (issue 28). PyTorch's index
is out of reach here, so the target runs against a throwaway venv and a folder of stand-in wheels with the real
names and versions (TORCH_PIP_SOURCE points pip there): pip must replace the torch that pip's default installed,
which the documented `pip install torch ... --index-url .../cu126` did not ("already satisfied")."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def constraint(name: str) -> str:
    return re.search(rf"^{name}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def make_wheel(folder, name: str, version: str, cuda) -> None:
    """A wheel with the metadata pip reads, whose module says which build it is (torch.version.cuda)."""
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip("=")

    record_path = f"{name}-{version}.dist-info/RECORD"
    files[record_path] = "".join(f"{path},sha256={digest(text)},{len(text.encode())}\n"
                                 for path, text in files.items()) + f"{record_path},,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.mark.slow  # a venv of its own and pip: about 8 s
def test_make_torch_replaces_the_build_in_the_venv(tmp_path):
    torch_version, vision_version = constraint("torch"), constraint("torchvision")
    pypi, index = tmp_path / "pypi", tmp_path / "index"  # pip's default build (no label), and PyTorch's CPU index
    for folder, label, cuda in ((pypi, "", "13.0"), (index, "+cpu", None)):
        folder.mkdir()
        make_wheel(folder, "torch", torch_version + label, cuda)
        make_wheel(folder, "torchvision", vision_version + label, None)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_CACHE_DIR": "1"}
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links"]
    subprocess.run([*pip, pypi, "torch", "torchvision"], check=True, env=env)  # what `make` installed from PyPI
    # The route docs/operations.md gave: "already satisfied", the CUDA 13 build kept.
    subprocess.run([*pip, index, "torch", "torchvision", "-c", REPO / "constraints.txt"], env=env, check=True)
    assert version_of(python, env) == f"{torch_version} 13.0"

    make = subprocess.run(["make", "-C", REPO, "torch", "TORCH_INDEX=cpu", f"VENV={venv}",
                           f"TORCH_PIP_SOURCE=--no-index --find-links {index}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert make.returncode == 0, make.stdout + make.stderr
    assert f"torch=={torch_version}+cpu torchvision=={vision_version}+cpu" in make.stdout  # the command it ran
    assert version_of(python, env) == f"{torch_version}+cpu None"


def version_of(python: str, env: dict) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"], env=env,
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()
