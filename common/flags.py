"""Command-line flags shared by the training scripts, and argparse types that range-check them.

Each group of flags says whether its flags may change when a run is resumed: the model, the optimiser and the data
define the experiment and are fixed; evaluation, logging, speed and the device may change. Imports no torch.
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
import unicodedata
from pathlib import Path

from .errors import EXIT_USER_ERROR


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_ROOT = REPO_ROOT / "runs"
DEFAULT_DATA_DIR = REPO_ROOT / "data"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults shown in --help, errors as one line (exit 2) that suggest the flag meant, and groups
    of flags that say whether they may change on resume (`parser.group(title, resumable=...)`). The analysis and
    report scripts, whose help strings say their defaults, pass their own formatter_class."""

    class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    def __init__(self, description: str, formatter_class=None):
        # allow_abbrev=False: `--epoch 2` is refused with a message, not silently taken as --epochs 2
        super().__init__(description=description, formatter_class=formatter_class or self._Formatter,
                         allow_abbrev=False)
        self._resumable_groups = []

    def group(self, title: str, *, resumable: bool):
        group = self.add_argument_group(f"{title} ({'may change on resume' if resumable else 'fixed for a run'})")
        if resumable:
            self._resumable_groups.append(group)
        return group

    def resumable_flags(self) -> set[str]:
        return {action.dest for group in self._resumable_groups for action in group._group_actions}

    def error(self, message: str):
        print(f"error: {message}{self._did_you_mean(message)} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    def _did_you_mean(self, message: str) -> str:
        """'; did you mean --epochs?' for unrecognised flags close to real ones (a typo, or a flag cut short)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        typed = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
        meant = [f"{match} for {word}" for word in typed for match in difflib.get_close_matches(word, known, 1, 0.8)]
        return f"; did you mean {', '.join(meant)}?" if meant else ""


def checked(kind, ok, rule: str):
    """An argparse type: `kind(text)`, refused with "must be <rule>" unless ok(value)."""
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def at_least(minimum: int):
    return checked(int, lambda v: v >= minimum, f"an integer >= {minimum}")


positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
unit_interval = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _is_plain_name(name: str) -> bool:
    """A folder name a shell and a listing show as typed: a newline or another control character (category C*
    but private use, or a line/paragraph separator) would split `ls` and the log lines that name the folder."""
    invisible = any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in name)
    return name not in ("", ".", "..") and "/" not in name and not name.startswith(".") and not invisible


plain_name = checked(str, _is_plain_name, "a plain folder name (no '/', not starting with '.', no control characters)")


def add_run_args(parser: ArgumentParser, *, epochs: int, batch_size: int, dataset: str, datasets: list[str]) -> None:
    """Add the flags every training script has. Script-specific defaults come in as keyword arguments."""
    g = parser.group("data and schedule", resumable=False)
    g.add_argument("--batch-size", type=at_least(1), default=batch_size,
                   help="images per optimiser step; every step is a full batch (one shape: no recompiles, CUDA "
                        "graphs), so the last (training images mod batch size) images of each epoch's shuffled order "
                        "sit that epoch out, a different few each epoch")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    g.add_argument("--dataset", default=dataset, choices=datasets, help="training data")
    g.add_argument("--train-limit", type=at_least(0), default=0, help="train on the first N training images (0: all)")

    g = parser.group("run", resumable=True)
    g.add_argument("--epochs", type=at_least(1), default=epochs,
                   help="total epochs (raise it on resume to train longer)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU; never the CPU when the job was given a GPU that "
                        "PyTorch cannot use (it says why): --device cpu trains on the CPU on purpose")
    g.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="root folder of the data sets (torchvision layout; downloaded there when missing)")
    g.add_argument("--name", type=plain_name, default=None,
                   help="suffix of the new run folder's name (default: the script's name)")
    g.add_argument("--sweep", type=plain_name, default=None,
                   help="name of the sweep this run belongs to (recorded in config.json; a sweep member never "
                        "moves runs/latest*, and the analysis and report scripts select sweeps by this name)")
    g.add_argument("--runs-root", default=str(DEFAULT_RUNS_ROOT), help="where new run folders are made")
    g.add_argument("--run-dir", default=None,
                   help="use this run folder; if it holds a checkpoint the run continues from it")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR ('latest': the newest run of this script)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a NEW run from another run's checkpoint (a .pt file, or a run folder: its newest "
                        "checkpoint): weights, optimiser state, epoch and metrics so far, with this command's "
                        "flags (e.g. a lower learning rate after a divergence); into an edited model, every tensor "
                        "that still fits, the others fresh (listed), optimiser, epoch and metrics fresh")
    g.add_argument("--new-run", action="store_true",
                   help="start a new run even if this same command left an unfinished one (which it would continue)")
    g.add_argument("--allow-other-data", action="store_true",
                   help="continue a run on training data other than its checkpoint's (another copy, size or "
                        "content, say after the data set changed); without it such a resume is refused")
    g.add_argument("--restart", action="store_true",
                   help="start from scratch in a --run-dir that cannot be continued: its checkpoints all damaged "
                        "(*.corrupt), its config.json damaged or another experiment's, or its results (metrics, "
                        "models) left without a checkpoint; the old files are set aside in replaced-<time>/")
    g.add_argument("--ckpt-every-min", type=positive_float, default=10.0,
                   help="minutes between mid-epoch checkpoints (one is always written at each epoch end)")
    g.add_argument("--keep-ckpts", type=at_least(1), default=2, help="how many recent step-*.pt checkpoints to keep")
    g.add_argument("--milestone-every", type=at_least(0), default=0,
                   help="keep checkpoints/epoch-NNN.pt every N epochs and at the last, never rotated "
                        "(0: about five per run, every max(1, epochs // 5))")
    g.add_argument("--log-every", type=at_least(1), default=100,
                   help="steps between a row of steps.csv (the meter's means over them), the check for a "
                        "non-finite loss, and a progress line when not on a terminal (also one at least every 30 s); "
                        "under torchrun, also how often the processes agree on saves and stops")
    g.add_argument("--mirror-dir", default=None,
                   help="copy the run folder here after every checkpoint, verified (e.g. Google Drive on Colab); "
                        "a run folder missing locally is restored from it first")
    _add_speed_args(parser)


def _add_speed_args(parser: ArgumentParser) -> None:
    """The GPU speed flags of every training script (devices.py applies them)."""
    speed = parser.group("speed (GPU)", resumable=True)
    speed.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                       help="mixed precision for the training steps; auto: bf16 on a CUDA GPU with compute "
                            "capability >= 8.0 (A100, RTX 30xx and newer), fp16 with a loss scaler on older ones "
                            "(T4, V100), off (float32) on CPU and MPS")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the conv layers")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile each network once per run (CUDA: mode reduce-overhead, CUDA graphs)")
    speed.add_argument("--deterministic", default="on", choices=["on", "off"],
                       help="on: deterministic algorithms (cuDNN, cuBLAS), so a resumed run equals an uninterrupted "
                            "one bit for bit on the same GPU model; off: the fast path (cuDNN autotuning), results "
                            "vary in the last bits from run to run")
