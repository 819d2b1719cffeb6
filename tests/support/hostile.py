"""What the hostile-input tests (test_hostile.py, test_hostile_edges.py) share, test_dcgan.py's kill test too: the
tiny settings of their runs, a script run in this process or in a fresh one with a fault injected at an exact call
(run_patched: a SIGKILL, which the test process must not receive), and small checks of a run folder, of two
checkpoints and of the one error line."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import EXIT_USER_ERROR, run_main
from common.readers import list_checkpoints, read_metrics_csv
from conftest import REPO, script_env

VAE_TINY = ["--batch-size", 64, "--latent-dim", 4, "--log-every", 1, "--device", "cpu"]  # 300 images: 4 full batches
VAE_STEPS = 4
GAN_TINY = ["--ngf", 8, "--ndf", 8, "--batch-size", 32, "--log-every", 3, "--device", "cpu"]  # 200 images: 6 full batches
GAN_STEPS = 6


def vae(mnist_dir, *extra) -> list:
    return ["--data-dir", mnist_dir, *VAE_TINY, *extra]


def gan(cifar_dir, *extra) -> list:
    return ["--data-dir", cifar_dir, *GAN_TINY, *extra]


def newest_checkpoint(run_dir: Path) -> dict:
    paths = list_checkpoints(run_dir)
    assert paths, f"no checkpoint in {run_dir}"
    return torch.load(paths[0], map_location="cpu", weights_only=True)


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))
    return to


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (signum - 1) & 1)


# Runs a script's main() in a fresh process after some patch code (a fault injected at an exact point): for a
# SIGKILL, which the test process must not receive itself. Other faults are patched in this process (hook_calls).
PRELUDE = "import errno, os, signal, sys, time\nsys.path.insert(0, {repo!r})\nimport torch, {module}\nfrom common.errors import run_main\n"


def run_patched(script: str, patch: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    module = script.removesuffix(".py")
    code = PRELUDE.format(repo=str(REPO), module=module) + patch + f"run_main({module}.main, sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=timeout)


def after_call(owner: str, name: str, at: int, action: str) -> str:
    """Patch code: run `action` right after the `at`-th call of owner.name (`result` holds what it returned)."""
    return (f"_original_{name}, _calls_{name} = {owner}.{name}, [0]\n"
            f"def _wrapped_{name}(*args, **kwargs):\n"
            f"    _calls_{name}[0] += 1\n"
            f"    result = _original_{name}(*args, **kwargs)\n"
            f"    if _calls_{name}[0] == {at}:\n"
            f"        {action}\n"
            f"    return result\n"
            f"{owner}.{name} = _wrapped_{name}\n")


def on_replace(pattern: str, at: int, action: str) -> str:
    """Patch code: run `action` at the `at`-th atomic rename onto a file whose path matches the regular expression
    `pattern`, before the rename (the new file then exists only as its temporary)."""
    return (f"import re\n_real_replace, _renames = os.replace, [0]\n"
            f"def _replace(src, dst):\n"
            f"    if re.search({pattern!r}, str(dst)):\n"
            f"        _renames[0] += 1\n"
            f"        if _renames[0] == {at}:\n"
            f"            {action}\n"
            f"    return _real_replace(src, dst)\n"
            f"os.replace = _replace\n")


KILL = "os.kill(os.getpid(), signal.SIGKILL)"


def in_process(module, argv, capsys) -> tuple[int, str, str]:
    """A script's main() through common.run_main in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(module.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def one_error_line(code: int, err: str, *names) -> str:
    assert code == EXIT_USER_ERROR, f"exit {code}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def snapshot(folder: Path, but=(".lock",)) -> dict:
    """Every file of a folder (but the lock file) and its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in but}


def epochs_in(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in read_metrics_csv(run_dir / "metrics.csv")]


def flip_a_byte(path: Path) -> None:
    """Flip one byte in the middle of a file, in place (a bit rot, a bad sector): its size stays the same."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def same_tensors(a, b, where="") -> None:
    """Every tensor of two nested checkpoint structures is torch.equal; other leaves are equal. Wall-clock
    entries (*_time_s, epoch_elapsed_s) are the only ones allowed to differ."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if not (str(key).endswith("_time_s") or key == "epoch_elapsed_s"):
                same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"
