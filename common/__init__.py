"""What vae_train.py and dcgan_train.py share: run folders, checkpoints, resume, pre-emption, data, devices.

A training script uses it in this order (vae_train.main is the shortest example):

    args = parser.parse_args(argv)                                             # flags, range-checked (exit 2)
    plan = resolve_run(parser, argv, script="vae")                             # which folder, which settings
    ... load the data (fails before any folder exists), build a TrainingJob (models, optimisers: its state_dict
    ... is the one place a checkpoint's contents are listed)
    with Run(plan, ...) as run:                                                # folder, lock, config, log, signals
        run.train(job, epochs=..., batch_size=..., seed=...)                   # resume, steps, epoch ends, saves
        run.export(job)                                                        # the model files, once per step

Run.train raises Preempted (exit 75) after a stop signal and its checkpoint, StoppedAtStartup (exit 76) for a signal
before the first step, UserError (exit 2) for anything the user can fix; run_main maps them to exit codes.
Importing this module has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import errno
import fcntl
import gzip
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import stop_signals

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_ROOT = REPO_ROOT / "runs"
DEFAULT_DATA_DIR = REPO_ROOT / "data"

# Exit codes a job scheduler or wrapper script can act on. 75 is EX_TEMPFAIL from sysexits.h: "try again later".
EXIT_OK = 0
EXIT_USER_ERROR = 2           # bad flags, missing data, refused resume, full disk: fix it, then re-run
EXIT_PREEMPTED = 75           # stopped by a signal after writing a checkpoint: re-run the same command to continue
EXIT_STOPPED_AT_STARTUP = 76  # stopped by a signal before the first training step: nothing new to save; re-run


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder). Printed as one line, no traceback, exit 2."""


class Preempted(Exception):
    """A stop signal was honoured: the checkpoint is written (exit 75)."""
    exit_code = EXIT_PREEMPTED


class StoppedAtStartup(Preempted):
    """A stop signal arrived before this start trained a single step: nothing new to save (exit 76)."""
    exit_code = EXIT_STOPPED_AT_STARTUP


def run_main(main, argv=None):
    """Run a script's main() and exit with its code: UserError -> one line on stderr and 2; Preempted -> 75/76."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except Preempted as stop:  # Run has logged what happened and how to continue
        code = stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (stop_signals): stop now, without a checkpoint
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code or EXIT_OK)


# ----------------------------------------------------------------------------------------------------------------
# Command-line flags. Each group says whether its flags may change when a run is resumed: the model, the optimiser
# and the data define the experiment and are fixed; evaluation, logging, speed and the device may change.


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults shown in --help, errors as one line (exit 2), and groups of flags that say
    whether they may change on resume (`parser.group(title, resumable=...)`)."""

    class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=self._Formatter)
        self._resumable_groups = []

    def group(self, title: str, *, resumable: bool):
        group = self.add_argument_group(f"{title} ({'may change on resume' if resumable else 'fixed for a run'})")
        if resumable:
            self._resumable_groups.append(group)
        return group

    def resumable_flags(self) -> set[str]:
        return {action.dest for group in self._resumable_groups for action in group._group_actions}

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _checked(kind, ok, rule: str):
    """An argparse type: `kind(text)`, refused with "must be <rule>" unless ok(value)."""
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def at_least(minimum: int):
    return _checked(int, lambda v: v >= minimum, f"an integer >= {minimum}")


positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
unit_interval = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
plain_name = _checked(str, lambda v: v not in ("", ".", "..") and "/" not in v and not v.startswith("."),
                      "a plain folder name (no '/', not starting with '.')")


def add_run_args(parser: ArgumentParser, *, epochs: int, batch_size: int, dataset: str, datasets: list[str]) -> None:
    """Add the flags every training script has. Script-specific defaults come in as keyword arguments."""
    g = parser.group("data and schedule", resumable=False)
    g.add_argument("--batch-size", type=at_least(1), default=batch_size, help="images per optimiser step")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    g.add_argument("--dataset", default=dataset, choices=datasets, help="training data")
    g.add_argument("--train-limit", type=at_least(0), default=0, help="train on the first N training images (0: all)")

    g = parser.group("run", resumable=True)
    g.add_argument("--epochs", type=at_least(1), default=epochs, help="total epochs (raise it on resume to train longer)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
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
                        "flags (e.g. a lower learning rate after a divergence)")
    g.add_argument("--new-run", action="store_true",
                   help="start a new run even if this same command left an unfinished one (which it would continue)")
    g.add_argument("--restart", action="store_true",
                   help="start from scratch in a --run-dir whose checkpoints are all damaged (*.corrupt)")
    g.add_argument("--ckpt-every-min", type=positive_float, default=10.0,
                   help="minutes between mid-epoch checkpoints (one is always written at each epoch end)")
    g.add_argument("--keep-ckpts", type=at_least(1), default=2, help="how many recent step-*.pt checkpoints to keep")
    g.add_argument("--milestone-every", type=at_least(0), default=0,
                   help="keep checkpoints/epoch-NNN.pt every N epochs and at the last, never rotated "
                        "(0: about five per run, every max(1, epochs // 5))")
    g.add_argument("--log-every", type=at_least(1), default=100,
                   help="steps between progress lines when not on a terminal (also one at least every 30 s)")
    g.add_argument("--mirror-dir", default=None,
                   help="copy the run folder here after every checkpoint, verified (e.g. Google Drive on Colab); "
                        "a run folder missing locally is restored from it first")
    speed = parser.group("speed (GPU)", resumable=True)
    speed.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                       help="mixed precision for the training steps; auto: bf16 on a CUDA GPU that has it, else off")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the conv layers")
    speed.add_argument("--compile", action="store_true", help="torch.compile the training step")


# ----------------------------------------------------------------------------------------------------------------
# Which run folder a process works in


class RunPlan:
    """The outcome of resolve_run: the settings, the folder, and whether this start continues a run."""

    def __init__(self, args, run_dir: Path, resuming: bool, new_folder: bool, experiment: dict, init_from=None):
        self.args, self.dir, self.resuming, self.new_folder = args, run_dir, resuming, new_folder
        self.experiment = experiment  # the settings that define the experiment (checked on every load)
        self.init_from = init_from    # another run's checkpoint file to start from (--init-from)


def _explicit_flags(parser: ArgumentParser, argv) -> set[str]:
    """The destinations of the flags actually typed on the command line (not left at their defaults)."""
    parser = copy.deepcopy(parser)
    for action in parser._actions:  # argparse offers no public way to ask "was this flag given?"
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def experiment_settings(args, parser: ArgumentParser) -> dict:
    """The flags that define the experiment (every flag not in a resumable group), stored in each checkpoint."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in parser.resumable_flags()}


def settings_differ(saved: dict, current: dict) -> list[str]:
    """The experiment settings that differ, as 'key: saved X, now Y'. A key one side lacks (a flag added to the
    code since the run started) is not a difference: its default is what the older code did."""
    return [f"{key}: saved {saved[key]!r}, now {current[key]!r}" for key in sorted(saved.keys() & current.keys())
            if saved[key] != current[key]]


def resolve_run(parser: ArgumentParser, argv, *, script: str) -> RunPlan:
    """Parse the flags and decide which run folder this process works in.

    When resuming, flags not typed on the command line take the values saved in the run's config.json, so
    `--resume latest` alone continues a run started with any flags; typed flags that change the experiment are
    refused with the list of differing keys. Nothing is written here.
    """
    args = parser.parse_args(argv)
    # Absolute paths in config.json, so a resume from another working directory finds the same folders.
    args.data_dir, args.runs_root = str(Path(args.data_dir).resolve()), str(Path(args.runs_root).resolve())
    if args.resume and args.run_dir and Path(args.resume).resolve() != Path(args.run_dir).resolve():
        raise UserError("--resume and --run-dir name different folders; give one of them")
    if args.init_from and (args.resume or args.run_dir and list_checkpoints(args.run_dir)):
        raise UserError("--init-from starts a new run; to continue a run, use --resume (or --run-dir) alone")
    runs_root = Path(args.runs_root)

    new_folder = False
    if args.resume:
        run_dir = runs_root / f"latest-{script}" if args.resume == "latest" else Path(args.resume)
        if not run_dir.exists():
            raise UserError(f"--resume {args.resume}: no such run folder ({run_dir})")
        run_dir = run_dir.resolve()
        if not list_checkpoints(run_dir):
            raise UserError(f"--resume {args.resume}: {run_dir} holds no checkpoint to continue from; "
                            f"start a new run instead (drop --resume)")
        resuming = True
    elif args.run_dir:
        run_dir = Path(args.run_dir).resolve()
        if args.mirror_dir and not list_checkpoints(run_dir) and list_checkpoints(args.mirror_dir):
            restore_from_mirror(Path(args.mirror_dir), run_dir)
        resuming = bool(list_checkpoints(run_dir))
        if not resuming:
            _check_fresh_start_allowed(run_dir, args, parser, script)
    elif not args.new_run and (unfinished := _unfinished_run(runs_root, script, args, parser)):
        run_dir, resuming = unfinished, True
        print(f"continuing {run_dir}, the unfinished run this same command started (add --new-run to start "
              f"another)", flush=True)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, resuming, new_folder = runs_root / f"{stamp}-{args.name or script}", False, True
        _check_writable(runs_root, "--runs-root")

    if resuming:
        _merge_saved_config(args, parser, run_dir, _explicit_flags(parser, argv), script)
    init_from = None
    if args.init_from and not resuming:
        init_from = _init_checkpoint(args.init_from)
        _take_source_settings(args, init_from.parent.parent, _explicit_flags(parser, argv), script)
    return RunPlan(args, run_dir, resuming, new_folder, experiment_settings(args, parser), init_from)


def _unfinished_run(runs_root: Path, script: str, args, parser: ArgumentParser) -> Path | None:
    """The newest run folder that this same command made and did not finish: re-running a command after a crash,
    Ctrl-C or a lost Colab VM continues that run instead of silently starting over. Same command means: made as a
    new folder (not --run-dir), by the same script, with the same --name, --sweep, --init-from and experiment
    settings. A run another process is training (its lock is held) is left alone."""
    if not runs_root.is_dir():
        return None
    mine, resumable = experiment_settings(args, parser), parser.resumable_flags()
    for folder in sorted((p for p in runs_root.iterdir() if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            config = json.loads((folder / "config.json").read_text())
            saved = config["args"]
        except (OSError, ValueError, KeyError):
            continue
        same_command = (config.get("script") == script and config.get("origin") == "new-folder"
                        and all(saved.get(k) == getattr(args, k) for k in ("name", "sweep", "init_from"))
                        and not settings_differ({k: v for k, v in saved.items() if k not in resumable}, mine))
        if not same_command or not list_checkpoints(folder) or _finished(folder, saved) or _locked(folder):
            continue
        return folder.resolve()
    return None


def _finished(run_dir: Path, saved_args: dict) -> bool:
    """Trained to its --epochs and exported (export.json, written last, says so)."""
    try:
        return json.loads((run_dir / "export.json").read_text())["epoch"] >= saved_args["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _locked(run_dir: Path) -> bool:
    """Is a process training in `run_dir` now (holding its flock)?"""
    try:
        with open(run_dir / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _check_writable(folder: Path, flag: str) -> None:
    """Fail now, with one line, if run folders cannot be made in `folder` (a file, read-only, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot create run folders there ({err.strerror or err})") from None


def _check_fresh_start_allowed(run_dir: Path, args, parser: ArgumentParser, script: str) -> None:
    """A --run-dir with nothing to resume may start from scratch only when that loses nothing: never over damaged
    checkpoints (unless --restart), never in a folder that holds another experiment."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a folder")
    if list((run_dir / "checkpoints").glob("*.corrupt")) and not args.restart:
        raise UserError(f"{run_dir}: every checkpoint is damaged (set aside as checkpoints/*.corrupt). Restore one "
                        f"from a backup, or add --restart to train from scratch in this folder")
    if (run_dir / "config.json").exists() and not args.restart:
        try:
            saved = read_run_config(run_dir, script)["args"]
        except UserError as err:
            raise UserError(f"{err}; add --restart to start this folder afresh") from None
        fixed = parser.resumable_flags()
        differing = settings_differ({k: v for k, v in saved.items() if k not in fixed}, experiment_settings(args, parser))
        if differing:
            raise UserError(f"{run_dir} holds another {script} run with no checkpoint ({'; '.join(differing)}); "
                            f"use a new folder, or add --restart to replace it")
    _check_writable(run_dir if run_dir.is_dir() else run_dir.parent, "--run-dir")


def _merge_saved_config(args, parser: ArgumentParser, run_dir: Path, explicit: set[str], script: str) -> None:
    saved = read_run_config(run_dir, script)["args"]
    resumable, differing = parser.resumable_flags(), []
    for key, saved_value in saved.items():
        if key in ("resume", "run_dir", "init_from") or not hasattr(args, key):
            continue
        if key not in explicit:
            setattr(args, key, saved_value)
        elif key not in resumable and getattr(args, key) != saved_value:
            differing.append(f"{key}: saved {saved_value!r}, given {getattr(args, key)!r}")
    if differing:
        raise UserError(f"refusing to resume {run_dir} with different settings ({'; '.join(differing)}). "
                        f"Start a new run for a new experiment (--init-from {run_dir} keeps its weights), "
                        f"or drop those flags to keep the saved values.")


def _take_source_settings(args, source_dir: Path, explicit: set[str], script: str) -> None:
    """--init-from: flags not typed take the source run's values (its model must match the checkpoint anyway), so
    `--init-from RUN --lr 1e-4` changes exactly the learning rate. Where the new run lives is this command's."""
    if not (source_dir / "config.json").exists():
        return
    own = {"resume", "run_dir", "init_from", "name", "sweep", "runs_root", "restart", "mirror_dir"}
    for key, value in read_run_config(source_dir, script)["args"].items():
        if key not in explicit and key not in own and hasattr(args, key):
            setattr(args, key, value)


def _init_checkpoint(path: str) -> Path:
    """--init-from: a checkpoint file, or a run folder (its newest checkpoint)."""
    path = Path(path).resolve()
    if path.is_dir():
        if not list_checkpoints(path):
            raise UserError(f"--init-from {path}: the folder holds no checkpoints/step-*.pt")
        return list_checkpoints(path)[0]
    if not path.is_file():
        raise UserError(f"--init-from {path}: no such checkpoint file or run folder")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading a run folder (the resume above, and the analysis scripts, which may read a run still in progress)


def read_run_config(run_dir, script: str) -> dict:
    """The config.json of a run folder made by `script` ("vae" or "dcgan"); a UserError says what is wrong."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    config_path = path / "config.json"
    if not config_path.exists():
        raise UserError(f"{run_dir} has no config.json: not a run folder made by {script}_train.py")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is damaged: not valid JSON ({err})") from None
    if config.get("script") != script or "args" not in config:
        raise UserError(f"{run_dir} is a {config.get('script')!r} run, not a {script.upper()} run "
                        f"({script}_train.py)")
    return config


def read_metrics_csv(path) -> list[dict]:
    """The rows of metrics.csv (or steps.csv) as floats, blank cells as nan. A last row that a live run is still
    appending (no newline yet, or a cell that is not a number) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = []
    for row in csv.DictReader(lines):
        try:
            rows.append({key: float(value) if value != "" else float("nan") for key, value in row.items()})
        except (TypeError, ValueError):
            continue
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Files written so that a kill at any moment leaves either the old file or the new one, never half of one


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    The temporary name starts with '.' and contains '.tmp-', so Run._clean_stray_temp_files() finds leftovers.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Replace the CSV at `path` with a header and `rows`, atomically (on resume: the rows up to the checkpoint)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def append_csv(path: Path, columns: list[str], row: dict) -> None:
    """Append one row and fsync it: a reader, or a resume after a crash, sees either the whole row or none."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=columns).writerow(row)
        f.flush()
        os.fsync(f.fileno())


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    """TorchScript a CPU copy of `model` in eval mode and write it atomically: a grader's torch.jit.load(path)
    needs none of our code. TorchScript is deprecated upstream, but it is the format the coursework loads."""
    model = copy.deepcopy(model).to("cpu").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target`, replacing any old link in one rename (readers never see it missing)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, newest first (names sort by global step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("step-*.pt"), reverse=True)


def load_latest_checkpoint(run_dir: Path, log=print, set_aside: bool = True, check=None) -> dict | None:
    """Load the newest checkpoint that reads back and passes `check`; warn about each one that does not.

    `check(ckpt)` returns None for a checkpoint this run can continue from, or why not (another script's, another
    experiment's): such a file is treated exactly like a damaged one. The training script (which owns the folder)
    sets bad files aside as *.corrupt so they are never tried again; readers such as the analysis scripts pass
    set_aside=False and leave the folder as it is. A file that vanishes while we look (a live run pruning its old
    checkpoints) is skipped.
    Returns None when the run has no checkpoint file at all. Raises UserError when there are checkpoint files but
    none loads: starting from scratch there would silently throw away the run.
    """
    paths, vanished = list_checkpoints(run_dir), 0
    for path in paths:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            problem = check(ckpt) if check else None
        except FileNotFoundError:
            vanished += 1
            continue
        except Exception as err:  # truncated, empty or garbage: torch raises several kinds
            problem = f"does not load ({type(err).__name__}: {str(err)[:120]})"
        if problem is None:
            return ckpt
        bad = path.with_name(path.name + ".corrupt")
        log(f"warning: checkpoint {path} {problem}; "
            + (f"set aside as {bad.name}, trying the one before" if set_aside else "trying the one before"))
        if set_aside:
            os.replace(path, bad)
    if paths and vanished == len(paths):  # all pruned under our feet: the newer ones are on disk now
        return load_latest_checkpoint(run_dir, log, set_aside, check)
    if paths:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads; nothing to resume from. "
                        f"Restore a checkpoint from a backup, or add --restart to train from scratch in this folder.")
    return None


def rng_state() -> dict:
    """Every random number generator the loop may draw from, as tensors and plain Python values.

    Plain types keep the checkpoint loadable with torch.load(weights_only=True): no numpy scalars, no Generators.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------------------------------------------
# A mirror of the run folder on a second file system (Google Drive on Colab, whose FUSE mount can drop writes):
# the run writes to fast local disk, and each checkpoint is copied over and read back before it counts.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mirror_run(run_dir: Path, mirror: Path, log=print) -> None:
    """Copy the run folder's files to `mirror` (checkpoints verified by checksum); drop pruned checkpoints there."""
    run_dir, mirror = Path(run_dir), Path(mirror)
    for src in sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        dst = mirror / src.relative_to(run_dir)
        if dst.exists() and (dst.stat().st_size, dst.stat().st_mtime) == (src.stat().st_size, src.stat().st_mtime):
            continue  # copied before (copy2 keeps the modification time)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)
        if src.suffix == ".pt" and _sha256(dst) != _sha256(src):
            dst.unlink()
            log(f"warning: the copy of {src.name} in {mirror} does not match; it will be copied again next time")
    kept = {p.name for p in list_checkpoints(run_dir)}
    for old in list_checkpoints(mirror):
        if old.name not in kept:
            old.unlink()


def restore_from_mirror(mirror: Path, run_dir: Path) -> None:
    """A new machine (a fresh Colab VM): bring the run folder back from the mirror before resuming it."""
    print(f"restoring {run_dir} from {mirror}", flush=True)
    shutil.copytree(mirror, run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))


# ----------------------------------------------------------------------------------------------------------------
# The run folder


class TrainingJob:
    """What a training script hands to Run.train: its models and optimisers, and the steps of its loop.

    state_dict() / load_state_dict() are the one place where what a checkpoint holds for the script is listed
    (Run adds the loop's own position, metrics and RNG). The other methods are the named steps of the loop.
    """
    n_images: int                 # size of the training set (one epoch)
    device: torch.device
    best_column: str | None = None  # a metrics column (lower is better) whose best epoch is kept as best.pt
    divergence_hint = "a lower learning rate"  # what to change after a non-finite loss

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def on_start(self, run: Run, global_step: int) -> None:
        """Called once per start, after the checkpoint (if any) is loaded."""

    def train_step(self, batch: torch.Tensor, global_step: int, epoch_progress: float) -> dict:
        """One optimiser step on the training images at `batch` (indices). Returns the numbers to show, as
        0-d tensors (only turned into Python numbers, a GPU sync, when shown); a non-finite one stops the run."""
        raise NotImplementedError

    def log_window(self, run: Run, global_step: int) -> None:
        """Called every --log-every steps (after the non-finite check): e.g. a row of steps.csv."""

    def end_epoch(self, run: Run, epoch: int) -> dict:
        """The epoch's own metric columns (means, evaluation), sample grids; resets per-epoch sums."""
        raise NotImplementedError

    def summary(self, row: dict) -> str:
        """The short, aligned part of the per-epoch log line (the full row is in metrics.csv)."""
        raise NotImplementedError

    def export(self, folder: Path) -> list[Path]:
        """Write the model files a grader loads; returns their paths."""
        raise NotImplementedError


class Run:
    """One run folder, owned by this process: lock, config.json, log.txt, metrics.csv, checkpoints, signals, and
    the training loop's bookkeeping (restore, steps, epoch ends, saves, stops).

    Layout:  RUN_DIR/config.json  log.txt  metrics.csv  samples/  figures/  export.json  <model files>
             RUN_DIR/checkpoints/step-<global step>.pt (the newest --keep-ckpts)  epoch-NNN.pt (milestones)  best.pt

    Use as a context manager: entering takes the folder, leaving closes its files and restores signal handlers.
    """

    # Entries of a checkpoint that differ between processes under torchrun: saved once per rank, and each rank
    # gets its own back on resume. Everything else (weights, optimiser, metrics) is the same on every rank.
    PER_RANK_KEYS = ("rng", "epoch_sums", "window_sums")

    def __init__(self, plan: RunPlan, *, script: str, device: torch.device, metric_columns: list[str],
                 ckpt_every_min: float, keep_ckpts: int, milestone_every: int, log_every: int,
                 mirror_dir: str | None, config: dict):
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0  # under torchrun only rank 0 writes anything
        self.plan, self.script, self.device, self.config = plan, script, device, config
        self.metric_columns = metric_columns
        self.ckpt_every_s, self.keep_ckpts, self.milestone_every = ckpt_every_min * 60, keep_ckpts, milestone_every
        self.log_every, self.mirror_dir = log_every, Path(mirror_dir) if mirror_dir else None
        self.dir = plan.dir
        self._log_file = self._lock_file = None
        self._remove_folder = False  # a new folder stopped during start-up holds nothing worth keeping
        self.preempted_by: str | None = None  # the loop's decision, taken (by all ranks together) at boundaries
        self.metrics: list[dict] = []
        self.best_fid = math.inf
        self.epoch = self.global_step = 0     # where training stands (after train(): where it ended)

    # -- entering and leaving -------------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        stop_signals.install()  # the training scripts call it at their first line; here for any other caller
        self.dir = Path(self._on_main(self._take_folder))  # rank 0's choice (a new folder's name holds the time)
        self.ckpt_dir, self.samples_dir = self.dir / "checkpoints", self.dir / "samples"
        self.metrics_path = self.dir / "metrics.csv"
        self.last_save = time.monotonic()
        ranks = f" ({self.world_size} processes)" if self.world_size > 1 else ""
        self.log(f"{'resuming' if self.plan.resuming else 'new'} {self.script} run in {self.dir} on "
                 f"{self.device}{ranks}")
        self.log("config: " + json.dumps(self.config, sort_keys=True))
        return self

    def __exit__(self, *exc_info) -> bool:
        for f in (self._log_file, self._lock_file):
            if f:
                f.close()  # closing the lock file releases the flock
        self._log_file = self._lock_file = None
        stop_signals.restore()
        if self._remove_folder:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def _take_folder(self) -> str:
        if self.plan.new_folder:
            self.dir = self._claim_new_folder(self.dir)
        with self.writing("the run folder", self.dir):
            if self.config.get("restart") and not self.plan.resuming:
                self._set_aside_replaced_run()
            for d in (self.dir, self.dir / "checkpoints", self.dir / "samples"):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_file = self._lock()
            self._log_file = open(self.dir / "log.txt", "a", buffering=1)
            self._clean_stray_temp_files()
            self._write_config()
        return str(self.dir)

    def _set_aside_replaced_run(self) -> None:
        """--restart: the replaced run's checkpoints (damaged ones, milestones, best.pt), export record and model
        files go into one folder beside them, so nothing of it is mistaken for the new run's; nothing is deleted."""
        old = [self.dir / "checkpoints", self.dir / "export.json"]
        try:  # the model files it exported
            old += [self.dir / name for name in json.loads((self.dir / "export.json").read_text())["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not any(p.exists() for p in old):
            return
        aside = self.dir / f"replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        aside.mkdir()
        for path in old:
            if path.exists():
                path.rename(aside / path.name)
        print(f"--restart: the replaced run's checkpoints and export record are in {aside}", flush=True)

    @staticmethod
    def _claim_new_folder(wanted: Path) -> Path:
        """Make a folder that did not exist: two runs started in the same second with the same --name get
        `-2`, `-3`, ... (mkdir is atomic, so two processes can never both claim one name)."""
        for n in range(1, 1000):
            candidate = wanted if n == 1 else wanted.with_name(f"{wanted.name}-{n}")
            try:
                candidate.mkdir(parents=True)
                return candidate
            except FileExistsError:
                continue
            except OSError as err:
                raise UserError(f"cannot create the run folder {candidate} ({err.strerror or err})") from None
        raise UserError(f"{wanted}-2 .. -999 all exist; choose another --name")

    def _on_main(self, fn):
        """Run `fn` on rank 0 only and hand its result to every rank; a UserError there stops every rank (rather
        than leaving the others waiting for rank 0 forever)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as err:
                error = str(err)
        result, error = broadcast_object((result, error))
        if error:
            raise UserError(error)
        return result

    def _lock(self):
        """Refuse a second process on this folder. flock dies with its process, so a crash leaves no stale lock."""
        lock_file = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise UserError(f"another process (pid {holder}) is already training in {self.dir}; "
                            f"wait for it or stop it first") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file

    def _clean_stray_temp_files(self) -> None:
        """Remove the temporary files of a process killed in the middle of a save (we hold the lock: none is live)."""
        for folder in (self.dir, self.dir / "checkpoints", self.dir / "samples"):
            for tmp in folder.glob(".*.tmp-*"):
                self.log(f"removing {tmp}, left by a process killed while saving")
                tmp.unlink()

    def _write_config(self) -> None:
        config_path = self.dir / "config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if self.plan.resuming:  # its settings were read a moment ago: it cannot be damaged unless replaced
                raise UserError(f"{config_path} is damaged ({err}); restore it from a backup") from None
            config = {}  # nothing to resume: its start history is all that is lost, and it is rewritten now
        starts = config.get("starts", [])
        starts.append({"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
                       "device": str(self.device), "resumed": self.plan.resuming, "pid": os.getpid(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        config.setdefault("origin", "new-folder" if self.plan.new_folder else "run-dir")  # see _unfinished_run
        config.update({
            "script": self.script,
            "args": self.config,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "host": socket.gethostname(),
            "device": str(self.device),
            "starts": starts,
        })
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _link_latest(self) -> None:
        """runs/latest and runs/latest-<script> point at this run (only for runs inside the runs root)."""
        runs_root = Path(self.config["runs_root"]).resolve()
        if self.dir.parent != runs_root:
            return
        for link in ("latest", f"latest-{self.script}"):
            atomic_symlink(self.dir.name, runs_root / link)

    # -- output ---------------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Print a line and append it to log.txt (rank 0 only)."""
        if not self.is_main:
            return
        print(message, flush=True)
        if self._log_file:
            self._log_file.write(message + "\n")

    @contextlib.contextmanager
    def writing(self, what: str, path: Path):
        """Turn a storage fault (disk full, read-only, I/O error) while writing `what` into one line that says
        what failed, where, and which checkpoint is intact; the next start resumes from that one."""
        try:
            yield
        except OSError as err:
            kept = list_checkpoints(self.dir)
            intact = f"the newest checkpoint {kept[0]} is intact" if kept else "no checkpoint was written yet"
            reason = err.strerror or str(err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += " (free some space)"
            raise UserError(f"could not write {what} ({path}): {reason}; {intact}. Fix that, then re-run the "
                            f"same command to continue.") from None

    def append_csv(self, path: Path, columns: list[str], row: dict) -> None:
        if self.is_main:
            with self.writing(path.name, path):
                append_csv(path, columns, row)

    def sync_mirror(self) -> None:
        """Bring the --mirror-dir copy up to date (after each checkpoint, and once more after the export)."""
        if self.is_main and self.mirror_dir:
            with self.writing("the mirror copy", self.mirror_dir):
                mirror_run(self.dir, self.mirror_dir, log=self.log)

    # -- the training loop ----------------------------------------------------------------------------------------
    def train(self, job: TrainingJob, *, epochs: int, batch_size: int, seed: int) -> None:
        """Train `job` up to `epochs`, from the newest checkpoint if there is one. The data order of each epoch is
        a pure function of (seed, epoch), so a resumed run takes exactly the steps an uninterrupted one would."""
        self.steps_per_epoch = math.ceil(job.n_images / batch_size)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=job.device)
        start_epoch, start_step, elapsed = self._restore(job)
        job.on_start(self, self.global_step)
        if self._stop_requested():  # a signal while we imported torch, loaded data, built models: nothing to save
            again = "Re-run the same command to continue."
            if self.plan.new_folder and self.is_main:  # nothing in it but this start's config and log
                self._remove_folder = True
                again = f"Nothing was trained yet, so {self.dir} is removed; re-run the same command to start."
            self.log(f"stopped by {self.preempted_by} during start-up, before any training step; nothing new to "
                     f"save. {again}")
            raise StoppedAtStartup()
        if self.is_main and not self.config.get("sweep"):  # sweep members never become "the" run of their script
            self._link_latest()
        if start_epoch >= epochs:
            self.log(f"run already finished ({start_epoch} of {epochs} epochs); raise --epochs to train longer")
        progress = Progress(steps_per_epoch=self.steps_per_epoch, total_steps=epochs * self.steps_per_epoch,
                            start_step=self.global_step, batch_size=batch_size, log_every=self.log_every,
                            log=self.log)
        for epoch in range(start_epoch, epochs):
            epoch_start = time.monotonic() - elapsed
            order = epoch_permutation(seed, epoch, job.n_images, job.device)
            progress.start_epoch(epoch, epochs)
            for step in range(start_step, self.steps_per_epoch):
                self.epoch, self.global_step = epoch, epoch * self.steps_per_epoch + step
                shown = job.train_step(shard(order[step * batch_size:(step + 1) * batch_size]), self.global_step,
                                       epoch + step / self.steps_per_epoch)
                self._watch_finite(shown)
                self.global_step += 1
                progress.update(self.global_step, shown)
                if self.global_step % self.log_every == 0:
                    self._stop_if_non_finite(job)
                    job.log_window(self, self.global_step)
                self._step_boundary(lambda: self._state(job, epoch, step + 1, time.monotonic() - epoch_start))
            progress.end_epoch()
            self._end_epoch(job, epoch, epochs, train_time=time.monotonic() - epoch_start, epoch_start=epoch_start)
            start_step, elapsed = 0, 0.0

    def _end_epoch(self, job: TrainingJob, epoch: int, epochs: int, train_time: float, epoch_start: float) -> None:
        """Evaluate, append the metrics row, log one short line, save (a milestone too when due), and stop here if
        a signal came during the evaluation (the epoch-end checkpoint holds everything)."""
        self._stop_if_non_finite(job)
        row = {"epoch": epoch + 1, "images_seen": (epoch + 1) * job.n_images, **job.end_epoch(self, epoch),
               "train_time_s": train_time, "epoch_time_s": time.monotonic() - epoch_start}
        self.metrics.append(row)
        self.append_csv(self.metrics_path, self.metric_columns, row)
        self.epoch, self.global_step = epoch + 1, (epoch + 1) * self.steps_per_epoch
        self.log(f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}  {job.summary(row)}  "
                 f"({row['epoch_time_s']:.0f} s)")
        value = row.get(job.best_column) if job.best_column else None
        is_best = isinstance(value, float) and math.isfinite(value) and value < self.best_fid
        if is_best:
            self.best_fid = value
        every = self.milestone_every or max(1, epochs // 5)
        path = self._save(self._state(job, epoch + 1, 0, 0.0),
                          milestone=(epoch + 1) % every == 0 or epoch + 1 == epochs, best=is_best)
        if is_best:
            self.log(f"best {job.best_column} so far ({value:.2f}): checkpoints/best.pt")
        if self.preempted_by:
            raise self._preempted(path)

    def _state(self, job: TrainingJob, epoch: int, step: int, elapsed: float) -> dict:
        """The whole checkpoint: the job's state and the loop's position. Never built after a non-finite loss."""
        self._stop_if_non_finite(job)
        return {"script": self.script, "experiment": self.plan.experiment, "epoch": epoch, "step_in_epoch": step,
                "global_step": epoch * self.steps_per_epoch + step, "metrics": self.metrics, "best_fid": self.best_fid,
                "epoch_elapsed_s": elapsed, "rng": rng_state(), **job.state_dict()}

    def _restore(self, job: TrainingJob) -> tuple[int, int, float]:
        """Load the newest usable checkpoint (or --init-from's) into `job` and the loop; (epoch, step, elapsed)."""
        def check(ckpt, same_experiment=True) -> str | None:
            if ckpt.get("script", self.script) != self.script:
                return f"is a {ckpt['script']} checkpoint, not a {self.script} one"
            differing = settings_differ(ckpt.get("experiment", {}), self.plan.experiment) if same_experiment else []
            if differing:
                return f"belongs to another experiment ({'; '.join(differing)})"
            present = set(ckpt) | set(ckpt["per_rank"][0] if "per_rank" in ckpt else ())
            missing = sorted(set(job.state_dict()) - present)
            return f"lacks {', '.join(missing)} (not a {self.script} checkpoint)" if missing else None

        if self.plan.init_from:
            def load_init():
                ckpt = torch.load(self.plan.init_from, map_location="cpu", weights_only=True)
                problem = check(ckpt, same_experiment=False)
                if problem:
                    raise UserError(f"--init-from {self.plan.init_from}: the checkpoint {problem}")
                return ckpt
            ckpt = self._on_main(lambda: _user_error_on_load(load_init, self.plan.init_from))
        else:
            ckpt = self._on_main(lambda: load_latest_checkpoint(self.dir, log=self.log, check=check))
        if ckpt is None:
            if self.is_main:
                write_csv(self.metrics_path, self.metric_columns, [])
            return 0, 0, 0.0
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"the checkpoint in {self.dir} was written by {saved_world} process(es); resume it with "
                            f"the same number (torchrun --nproc_per_node {saved_world}, or plain python for 1)")
        if "per_rank" in ckpt:
            ckpt.update(ckpt.pop("per_rank")[self.rank])
        try:
            job.load_state_dict(ckpt)
        except RuntimeError as err:  # --init-from a run with another architecture
            raise UserError(f"the checkpoint does not fit this model: {str(err).splitlines()[0]}") from None
        self.metrics, self.best_fid = ckpt["metrics"], ckpt.get("best_fid", math.inf)
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        set_rng_state(ckpt["rng"])
        if self.is_main:  # metrics.csv holds exactly the checkpoint's rows: a resume never repeats an epoch
            write_csv(self.metrics_path, self.metric_columns, self.metrics)
        source = f" from {self.plan.init_from}" if self.plan.init_from else ""
        self.log(f"resumed at epoch {ckpt['epoch'] + 1}, step {ckpt['step_in_epoch']}/{self.steps_per_epoch}{source}")
        return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["epoch_elapsed_s"]

    # -- non-finite losses ----------------------------------------------------------------------------------------
    def _watch_finite(self, shown: dict) -> None:
        """Remember the first step with a non-finite number, on the device: reading it costs a GPU sync, so it
        is read every --log-every steps, at each epoch end and before every checkpoint, never once per step."""
        finite = torch.isfinite(torch.stack([v.detach().float() for v in shown.values()])).all()
        self._first_bad_step = torch.where(~finite & (self._first_bad_step < 0), self.global_step,
                                           self._first_bad_step)

    def _stop_if_non_finite(self, job: TrainingJob) -> None:
        """A NaN poisons every later step, so the run stops at the first one, and nothing after it is saved."""
        bad = int(self._first_bad_step.item())
        if not any_rank(bad >= 0):  # all ranks decide together
            return
        where = (f"epoch {bad // self.steps_per_epoch + 1}, step {bad % self.steps_per_epoch + 1}" if bad >= 0
                 else "another rank")
        kept = list_checkpoints(self.dir)
        if kept:
            way = (f"The newest good checkpoint, {kept[0]}, is untouched: continue from it in a new run with "
                   f"other settings: python {self.script}_train.py --init-from {self.dir} plus {job.divergence_hint}")
        else:
            way = f"No checkpoint was written before it: start a new run with {job.divergence_hint}"
        raise UserError(f"non-finite loss at {where}; stopped without saving. {way}.")

    # -- checkpoints and stops ------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Turn the handler's flag into the loop's decision. The flag is read once: a signal landing between the
        ranks' agreement and their `if` would otherwise send one rank to save while the others train on (and
        wait for each other in different collectives forever). A later signal is seen at the next boundary."""
        raw = stop_signals.received
        if any_rank(raw is not None):
            self.preempted_by = raw or "a signal to another rank"
        return self.preempted_by is not None

    def _step_boundary(self, make_state) -> None:
        """Between optimiser steps: save when a checkpoint is due; after a signal, save and stop.
        `make_state` builds the checkpoint only when one is written, so the common case costs nothing."""
        due = time.monotonic() - self.last_save >= self.ckpt_every_s
        if self.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
            due = bool(broadcast_object(due))
        if self._stop_requested() or due:
            path = self._save(make_state())
            if self.preempted_by:
                raise self._preempted(path)

    def _preempted(self, path: Path) -> Preempted:
        self.log(f"stopped by {self.preempted_by}; checkpoint {path.name} written. "
                 f"Re-run the same command (or use --resume {self.dir}) to continue.")
        return Preempted()

    def _save(self, state: dict, milestone: bool = False, best: bool = False) -> Path:
        """Write `state` as checkpoints/step-<global_step>.pt atomically, keep only the newest --keep-ckpts, and
        hard-link it as epoch-NNN.pt (milestone) or best.pt: no second copy on disk, and rotation keeps them.

        Under torchrun every rank calls this at the same step: the per-rank entries are gathered, rank 0 writes,
        and all ranks agree on whether a signal arrived (so they all stop at the same step).
        """
        path = self.ckpt_dir / f"step-{state['global_step']:010d}.pt"
        state = {**state, "world_size": self.world_size}
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, {k: state.pop(k) for k in self.PER_RANK_KEYS if k in state})
            state["per_rank"] = gathered
        self._stop_requested()
        if self.is_main:
            buffer = io.BytesIO()  # serialised in memory: a full disk then fails in write(), with a clear errno
            torch.save(state, buffer)
            with self.writing("a checkpoint", path):
                with atomic_path(path) as tmp:
                    tmp.write_bytes(buffer.getbuffer())
                links = ([f"epoch-{state['epoch']:03d}.pt"] if milestone else []) + (["best.pt"] if best else [])
                for name in links:
                    with atomic_path(self.ckpt_dir / name) as tmp:
                        os.link(path, tmp)
                for old in list_checkpoints(self.dir)[self.keep_ckpts:]:
                    old.unlink()
            self.sync_mirror()
        self.last_save = time.monotonic()
        return path

    def export(self, job: TrainingJob) -> None:
        """Write the model files from the state training ended in (the newest checkpoint's), unless export.json
        says they already hold exactly that step. A kill during an export, or more --epochs, re-exports."""
        if not self.is_main:
            return
        record = self.dir / "export.json"
        try:
            done = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("global_step") == self.global_step and all((self.dir / f).exists() for f in done["files"]):
            return
        with self.writing("the exported model", self.dir):
            files = job.export(self.dir)
            atomic_write_text(record, json.dumps({"epoch": self.epoch, "global_step": self.global_step,
                                                  "files": [f.name for f in files]}, indent=2) + "\n")
        self.log(f"exported {', '.join(f.name for f in files)} (epoch {self.epoch}, step {self.global_step})")
        self.sync_mirror()


def open_run(plan: RunPlan, *, script: str, device: torch.device, metric_columns: list[str]) -> Run:
    """The Run for a training script's flags (add_run_args): each setting handed over by name, here only."""
    args = plan.args
    return Run(plan, script=script, device=device, metric_columns=metric_columns, config=vars(args),
               ckpt_every_min=args.ckpt_every_min, keep_ckpts=args.keep_ckpts, milestone_every=args.milestone_every,
               log_every=args.log_every, mirror_dir=args.mirror_dir)


def _user_error_on_load(load, path):
    """torch.load of a file the user named: any failure is the file's fault, said in one line."""
    try:
        return load()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path} does not load as a checkpoint ({type(err).__name__}: {str(err)[:120]})") from None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Devices and progress


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS backend here (try --device auto)")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# More than one process (torchrun): data parallel, with gradients averaged across ranks after each backward


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL with one GPU per
    rank on CUDA, gloo on CPU. A plain `python script.py` is one process and joins nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (unchanged with one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (unchanged with one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a plain bool with one process)."""
    if not dist.is_initialized():
        return bool(flag)
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    tensor = torch.tensor([1 if flag else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_gradients(*models: torch.nn.Module) -> None:
    """What DistributedDataParallel does after backward, done by hand: average each gradient over ranks.

    By hand, because the GAN calls D twice per step (real, then fake) and the VAE's loss goes through encode()
    and decoder() rather than forward(): DDP's hooks expect one forward per backward. Without bucketing this is
    slower than DDP for large models, but it cannot silently skip a parameter.
    """
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    for model in models:
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(world_size)


def shard(batch_indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch: every world_size-th index, starting at its rank."""
    if not dist.is_initialized():
        return batch_indices
    return batch_indices[dist.get_rank()::dist.get_world_size()]


# ----------------------------------------------------------------------------------------------------------------
# Speed on GPUs: mixed precision and the optimizer. Off, none of these changes a single number on CPU.


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full float32."""
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none. A disabled scaler
    passes everything straight through (scale() returns the loss, step() calls optimizer.step())."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def adam(params, device: torch.device, **kwargs) -> torch.optim.Adam:
    """Adam, fused into one kernel on CUDA (same maths, fewer launches); the default implementation elsewhere."""
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Where the run is and when it will end, counted over the whole run (not just this epoch).

    On a terminal: a tqdm bar per epoch, with the run's ETA beside the losses. Otherwise (SLURM, nohup, tests):
    one line every `log_every` steps or every 30 seconds, whichever comes first, with elapsed time, images per
    second and the ETA of the epoch and of the run. Rates are measured over this start only.
    """

    PIPED_INTERVAL_S = 30

    def __init__(self, *, steps_per_epoch: int, total_steps: int, start_step: int, batch_size: int, log_every: int,
                 log):
        self.steps_per_epoch, self.total_steps, self.batch_size = steps_per_epoch, total_steps, batch_size
        self.log_every, self.log = log_every, log
        self.start_step, self.started = start_step, time.monotonic()
        self.last_line = self.started
        self.on_terminal = sys.stdout.isatty() and (not dist.is_initialized() or dist.get_rank() == 0)
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.desc = f"epoch {epoch + 1}/{epochs}"
        self.epoch_start_step = epoch * self.steps_per_epoch
        if self.on_terminal:
            from tqdm import tqdm
            done = max(0, self.start_step - self.epoch_start_step)
            self.bar = tqdm(total=self.steps_per_epoch, initial=min(done, self.steps_per_epoch), desc=self.desc,
                            dynamic_ncols=True, leave=False)

    def _eta(self, global_step: int) -> tuple[float, float, float]:
        """(elapsed s, images/s, seconds per step) over this start."""
        elapsed = time.monotonic() - self.started
        steps = max(1, global_step - self.start_step)
        return elapsed, steps * self.batch_size / max(elapsed, 1e-9), elapsed / steps

    def update(self, global_step: int, shown: dict) -> None:
        """`global_step` counts steps done; `shown` values become numbers (a GPU sync) only when displayed."""
        step = global_step - self.epoch_start_step
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.steps_per_epoch:
                _, _, per_step = self._eta(global_step)
                self.bar.set_postfix({**{k: f"{float(v):.4g}" for k, v in shown.items()},
                                      "run ETA": _clock(per_step * (self.total_steps - global_step))})
            return
        now = time.monotonic()
        if step % self.log_every and now - self.last_line < self.PIPED_INTERVAL_S:
            return
        self.last_line = now
        elapsed, rate, per_step = self._eta(global_step)
        losses = " ".join(f"{k} {float(v):.4g}" for k, v in shown.items())
        self.log(f"{self.desc} step {step}/{self.steps_per_epoch} | {losses} | {_clock(elapsed)} elapsed, "
                 f"{rate:,.0f} img/s, epoch ETA {_clock(per_step * (self.steps_per_epoch - step))}, "
                 f"run ETA {_clock(per_step * (self.total_steps - global_step))}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------------------------------
# Data: whole data sets as uint8 tensors in memory, batches by index


# Spaces the per-epoch seeds of different --seed values apart (a prime larger than any epoch count), so that no
# (seed, epoch) pair shares its data order with another.
_EPOCH_SEED_STRIDE = 1_000_003


def epoch_permutation(seed: int, epoch: int, n: int, device=None) -> torch.Tensor:
    """The order of the training images in `epoch`: a pure function of (seed, epoch), so resume needs no state."""
    gen = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=gen).to(device)


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]
_RAW_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _copy_system_fashion_mnist(data_dir: Path) -> None:
    """Unpack Debian's Fashion-MNIST .gz files into torchvision's layout, once, so FashionMNIST reads them."""
    raw = data_dir / "FashionMNIST" / "raw"
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
    damaged = []
    if dataset in _RAW_FOLDER:
        raw = data_dir / _RAW_FOLDER[dataset] / "raw"
        for name in _MNIST_FILES[:2] if train else _MNIST_FILES[2:]:
            if (raw / name).is_file() and (problem := _idx_problem(raw / name)):
                damaged.append(f"{raw / name} ({problem})")
    elif dataset == "cifar10" and cifar_checksums:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity
        folder = data_dir / CIFAR10.base_folder
        for name, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
            if (folder / name).is_file() and not check_integrity(str(folder / name), md5):
                damaged.append(f"{folder / name} (MD5 differs from the published file)")
    if damaged:
        raise UserError(f"damaged {dataset} file: {'; '.join(damaged)}. Delete it so it is downloaded again, "
                        f"or replace it with a good copy.")


def _missing_data_message(dataset: str, data_dir: Path, train: bool, err: Exception) -> str:
    if dataset in _RAW_FOLDER:
        raw = data_dir / _RAW_FOLDER[dataset] / "raw"
        needed = _MNIST_FILES[:2] if train else _MNIST_FILES[2:]
        missing = [name for name in needed if not (raw / name).exists() and not (raw / f"{name}.gz").exists()]
        hint = " (or: apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
        what, where = ", ".join(missing or needed) + f" (or the same names with .gz){hint}", raw
    else:
        what = ("data_batch_1 .. data_batch_5, test_batch, batches.meta (unpack cifar-10-python.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html)")
        where = data_dir / "cifar-10-batches-py"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{dataset} is not in {data_dir} and could not be downloaded ({first_line}). "
            f"Put {what} into {where}, or pass --data-dir pointing at a folder that has them.")


def load_images(dataset: str, data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole data set as (images uint8 [N, C, H, W], labels int64 [N]), read once by torchvision's own classes.

    torchvision downloads missing files (download=True) on machines with internet. Holding the set as one uint8
    tensor (47 MB for MNIST, 150 MB for CIFAR-10) lets batches be sliced by index with no per-item PIL work.
    A file that is present but damaged is named as damaged (a download would not fix it).
    """
    from contextlib import redirect_stdout
    from torchvision import datasets

    data_dir = Path(data_dir)
    if dataset == "fashion-mnist":
        _copy_system_fashion_mnist(data_dir)
    _raise_if_damaged(dataset, data_dir, train)
    try:
        with redirect_stdout(sys.stderr):  # torchvision prints download progress; keep stdout for our log
            if dataset == "mnist":
                ds = datasets.MNIST(data_dir, train=train, download=True)
                images = ds.data.unsqueeze(1)
            elif dataset == "fashion-mnist":
                ds = datasets.FashionMNIST(data_dir, train=train, download=True)
                images = ds.data.unsqueeze(1)
            elif dataset == "cifar10":
                ds = datasets.CIFAR10(data_dir, train=train, download=True)
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
            else:
                raise UserError(f"unknown dataset {dataset!r}")
    except UserError:
        raise
    except Exception as err:  # URLError, RuntimeError("not found"), a bad MD5 ...: no usable files
        _raise_if_damaged(dataset, data_dir, train, cifar_checksums=True)
        raise UserError(_missing_data_message(dataset, data_dir, train, err)) from None
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images.to(torch.uint8), labels
