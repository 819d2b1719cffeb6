"""What vae_train.py and dcgan_train.py share: run folders, checkpoints, resume, pre-emption, data, devices.

A training script uses it in this order (see vae_train.py for the full loop):

    args, run_dir, resuming = resolve_run(build_parser, argv, script="vae")  # which folder, which settings
    rank, world_size, device = init_distributed(args.device)                 # one process, or torchrun's ranks
    images, labels = load_images(args.dataset, args.data_dir, train=True)   # fails before any folder exists
    run = Run(run_dir, args, script="vae", ...)                              # folder, lock, config, log, signals
    ... build the models (seeded), then
    ckpt = run.load_checkpoint()                                             # None on a fresh start
    ... for each step: run.step_boundary(make_state)  # periodic save; on SIGTERM/SIGUSR1/SIGINT save and exit 75
    ... for each epoch: run.append_metrics(row); run.save_checkpoint(make_state())

Importing this module has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import fcntl
import gzip
import json
import os
import pickle
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_RUNS_ROOT = REPO_ROOT / "runs"
DEFAULT_DATA_DIR = REPO_ROOT / "data"

# Exit codes a job scheduler or wrapper script can act on. 75 is EX_TEMPFAIL from sysexits.h: "try again later".
EXIT_OK = 0
EXIT_USER_ERROR = 2       # bad flags, missing data, refused resume: fix the command, then re-run
EXIT_PREEMPTED = 75       # stopped by a signal after writing a checkpoint: re-run the same command to continue

# Flags that may differ between the first start of a run and a resume of it. Every other flag is part of the
# experiment (model, optimiser, data, seed) and must match the saved config, or the resumed run would silently
# be a different experiment.
RESUMABLE_CHANGES = {"epochs", "device", "data_dir", "resume", "run_dir", "runs_root", "name",
                     "ckpt_every_min", "keep_ckpts", "log_every", "mirror_dir"}


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder). Printed as one line, no traceback, exit 2."""


def run_main(main, argv=None):
    """Run a script's main(); a UserError becomes one message on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code or EXIT_OK)


# ----------------------------------------------------------------------------------------------------------------
# Command-line flags shared by both training scripts


def add_run_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, dataset: str,
                 datasets: list[str]) -> None:
    """Add the flags every training script has. Script-specific defaults come in as keyword arguments."""
    g = parser.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=epochs, help="total epochs (raise it on resume to train longer)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per optimiser step")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
    g.add_argument("--dataset", default=dataset, choices=datasets, help="training data")
    g.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="root folder of the data sets (torchvision layout; downloaded there when missing)")
    g.add_argument("--train-limit", type=int, default=0, help="train on the first N training images (0: all)")
    g.add_argument("--name", default=None, help="suffix of the run folder name (default: the script's name)")
    g.add_argument("--runs-root", default=str(DEFAULT_RUNS_ROOT), help="where new run folders are made")
    g.add_argument("--run-dir", default=None,
                   help="use this run folder; if it holds a checkpoint the run continues from it")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR ('latest': the newest run of this script)")
    g.add_argument("--ckpt-every-min", type=float, default=10.0,
                   help="minutes between mid-epoch checkpoints (one is always written at each epoch end)")
    g.add_argument("--keep-ckpts", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--log-every", type=int, default=100, help="steps between progress lines when not on a terminal")
    g.add_argument("--mirror-dir", default=None,
                   help="copy the run folder here after every checkpoint, verified (e.g. Google Drive on Colab); "
                        "a run folder missing locally is restored from it first")
    speed = parser.add_argument_group("speed (GPU)")
    speed.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                       help="mixed precision for the training steps; auto: bf16 on a CUDA GPU that has it, else off")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the conv layers")
    speed.add_argument("--compile", action="store_true", help="torch.compile the training step")


def _explicit_flags(build_parser, argv) -> set[str]:
    """The destinations of the flags actually typed on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:  # argparse offers no public way to ask "was this flag given?"
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resolve_run(build_parser, argv, *, script: str):
    """Parse the flags and decide which run folder this process works in.

    Returns (args, run_dir, resuming). When resuming, flags not typed on the command line take the values saved
    in the run's config.json, so `--resume latest` alone continues a run started with any flags; typed flags that
    change the experiment are refused with the list of differing keys.
    """
    args = build_parser().parse_args(argv)
    # Absolute paths in config.json, so a resume from another working directory finds the same folders.
    args.data_dir, args.runs_root = str(Path(args.data_dir).resolve()), str(Path(args.runs_root).resolve())
    if args.resume and args.run_dir and Path(args.resume).resolve() != Path(args.run_dir).resolve():
        raise UserError("--resume and --run-dir name different folders; give one of them")
    runs_root = Path(args.runs_root)

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
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (runs_root / f"{stamp}-{args.name or script}").resolve()
        resuming = False

    if resuming:
        args = _merge_saved_config(args, run_dir, _explicit_flags(build_parser, argv), script)
    return args, run_dir, resuming


def _merge_saved_config(args, run_dir: Path, explicit: set[str], script: str):
    saved = read_run_config(run_dir, script)["args"]
    differing = []
    for key, saved_value in saved.items():
        if key in ("resume", "run_dir") or not hasattr(args, key):
            continue
        if key not in explicit:
            setattr(args, key, saved_value)
        elif key not in RESUMABLE_CHANGES and getattr(args, key) != saved_value:
            differing.append(f"{key}: saved {saved_value!r}, given {getattr(args, key)!r}")
    if differing:
        raise UserError(f"refusing to resume {run_dir} with different settings ({'; '.join(differing)}). "
                        f"Start a new run for a new experiment, or drop those flags to keep the saved values.")
    return args


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
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path} is not valid JSON ({err})") from None
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

    The temporary name starts with '.' and contains '.tmp-', so Run.clean_stray_temp_files() can find leftovers.
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


def load_latest_checkpoint(run_dir: Path, log=print, set_aside: bool = True) -> dict | None:
    """Load the newest checkpoint that reads back; warn about each one that does not.

    The training script (which owns the folder) sets bad files aside as *.corrupt so they are never tried again;
    readers such as the analysis scripts pass set_aside=False and leave the folder as it is. A file that vanishes
    while we look (a live run pruning its old checkpoints) is skipped.
    Returns None when the run has no checkpoint file at all. Raises UserError when there are checkpoint files but
    none loads: starting from scratch there would silently throw away the run.
    """
    paths, vanished = list_checkpoints(run_dir), 0
    for path in paths:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            vanished += 1
            continue
        except Exception as err:  # truncated, empty or garbage: torch raises several kinds
            bad = path.with_name(path.name + ".corrupt")
            log(f"warning: checkpoint {path} does not load ({type(err).__name__}: {str(err)[:120]}); "
                + (f"set aside as {bad.name}, trying the one before" if set_aside else "trying the one before"))
            if set_aside:
                os.replace(path, bad)
    if paths and vanished == len(paths):  # all pruned under our feet: the newer ones are on disk now
        return load_latest_checkpoint(run_dir, log, set_aside)
    if paths:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads; nothing to resume from. "
                        f"Start a new run, or restore a checkpoint from a backup.")
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
    import hashlib
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


class Run:
    """One run folder, owned by this process: lock, config.json, log.txt, metrics.csv, checkpoints, signals.

    Layout:  RUN_DIR/config.json  log.txt  metrics.csv  samples/  checkpoints/step-<global step>.pt  figures/
    """

    def __init__(self, run_dir: Path, args, *, script: str, resuming: bool, metric_columns: list[str],
                 device: torch.device):
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0  # under torchrun only rank 0 writes anything
        self.dir = Path(broadcast_object(str(run_dir)))  # rank 0's choice (a new folder's name holds the time)
        self.args = args
        self.script = script
        self.metric_columns = metric_columns
        self.ckpt_dir = self.dir / "checkpoints"
        self.samples_dir = self.dir / "samples"
        self.metrics_path = self.dir / "metrics.csv"
        self._log_file = None

        def take_folder():
            for d in (self.dir, self.ckpt_dir, self.samples_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_file = self._lock()
            self._log_file = open(self.dir / "log.txt", "a", buffering=1)
            self.clean_stray_temp_files()
            self._write_config(device, resuming)
            self._link_latest()

        self._on_main(take_folder)
        self._signal: str | None = None        # set by the signal handler, at any moment
        self.preempted_by: str | None = None   # the loop's decision, taken (by all ranks together) at boundaries
        self._install_signal_handlers()
        self.last_save = time.monotonic()
        ranks = f" ({self.world_size} processes)" if self.world_size > 1 else ""
        self.log(f"{'resuming' if resuming else 'new'} {script} run in {self.dir} on {device}{ranks}")
        self.log("config: " + json.dumps(vars(args), sort_keys=True))

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

    # -- ownership ------------------------------------------------------------------------------------------------
    def _lock(self):
        """Refuse a second process on this folder. flock dies with its process, so a crash leaves no stale lock."""
        lock_file = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise UserError(f"another process (pid {holder}) is already training in {self.dir}; "
                            f"wait for it or stop it first") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file

    def clean_stray_temp_files(self) -> None:
        """Remove the temporary files of a process killed in the middle of a save (we hold the lock: none is live)."""
        for folder in (self.dir, self.ckpt_dir, self.samples_dir):
            for tmp in folder.glob(".*.tmp-*"):
                self.log(f"removing {tmp}, left by a process killed while saving")
                tmp.unlink()

    def _write_config(self, device, resuming: bool) -> None:
        config_path = self.dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        starts = config.get("starts", [])
        starts.append({"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
                       "device": str(device), "resumed": resuming, "pid": os.getpid(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        config.update({
            "script": self.script,
            "args": vars(self.args),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "host": socket.gethostname(),
            "device": str(device),
            "starts": starts,
        })
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _link_latest(self) -> None:
        """runs/latest and runs/latest-<script> point at this run (only for runs inside the runs root)."""
        runs_root = Path(self.args.runs_root).resolve()
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

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Make metrics.csv hold exactly `rows` (those of the checkpoint): a resume never repeats an epoch."""
        if self.is_main:
            write_csv(self.metrics_path, self.metric_columns, rows)

    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            append_csv(self.metrics_path, self.metric_columns, row)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    # Entries of a checkpoint that differ between processes under torchrun: saved once per rank, and each rank
    # gets its own back on resume. Everything else (weights, optimiser, metrics) is the same on every rank.
    PER_RANK_KEYS = ("rng", "epoch_sums", "window_sums")

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint that loads, or None for a fresh run. Rank 0 reads it and sends it to the others."""
        ckpt = self._on_main(lambda: load_latest_checkpoint(self.dir, log=self.log))
        if ckpt is None:
            return None
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"the checkpoint in {self.dir} was written by {saved_world} process(es); resume it with "
                            f"the same number (torchrun --nproc_per_node {saved_world}, or plain python for 1)")
        if "per_rank" in ckpt:
            ckpt.update(ckpt.pop("per_rank")[self.rank])
        return ckpt

    def save_checkpoint(self, state: dict) -> Path:
        """Write `state` as checkpoints/step-<global_step>.pt atomically, then keep only the newest --keep-ckpts.

        Under torchrun every rank calls this at the same step: the per-rank entries are gathered, rank 0 writes,
        and all ranks agree on whether a signal arrived (so they all stop at the same step).
        """
        path = self.ckpt_dir / f"step-{state['global_step']:010d}.pt"
        state = {**state, "world_size": self.world_size}
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, {k: state.pop(k) for k in self.PER_RANK_KEYS if k in state})
            state["per_rank"] = gathered
        self._agree_on_preemption()
        if self.is_main:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            for old in list_checkpoints(self.dir)[max(1, self.args.keep_ckpts):]:
                old.unlink()
            self.sync_mirror()
        self.last_save = time.monotonic()
        return path

    def sync_mirror(self) -> None:
        """Bring the --mirror-dir copy up to date (after each checkpoint, and once more after the export)."""
        if self.is_main and self.args.mirror_dir:
            mirror_run(self.dir, Path(self.args.mirror_dir), log=self.log)

    def step_boundary(self, make_state) -> None:
        """Call between optimiser steps. Saves when a checkpoint is due; after a signal, saves and exits 75.

        `make_state` builds the checkpoint dict only when one is written, so the common case costs nothing.
        """
        due = time.monotonic() - self.last_save >= self.args.ckpt_every_min * 60
        if self.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
            due = bool(broadcast_object(due))
        self._agree_on_preemption()
        if self.preempted_by or due:
            path = self.save_checkpoint(make_state())
            if self.preempted_by:
                self.exit_preempted(path)

    def _agree_on_preemption(self) -> None:
        """Turn the handler's flag into the loop's decision. The flag is read once: a signal landing between the
        ranks' agreement and their `if` would otherwise send one rank to save while the others train on (and
        wait for each other in different collectives forever). A later signal is seen at the next boundary."""
        raw = self._signal
        if any_rank(raw is not None):
            self.preempted_by = raw or "a signal to another rank"

    def exit_preempted(self, path: Path) -> None:
        self.log(f"stopped by {self.preempted_by}; checkpoint {path.name} written. "
                 f"Re-run the same command (or --resume {self.dir}) to continue.")
        sys.exit(EXIT_PREEMPTED)  # run_main leaves the process group

    # -- signals --------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGTERM (scheduler), SIGUSR1 (SLURM's warning before the time limit) and SIGINT (Ctrl-C) set a flag.

        The loop checks it at the next step boundary. Saving inside the handler could interrupt a half-finished
        optimiser step, or a torch.save already in progress, and write an inconsistent checkpoint.
        """
        def handler(signum, _frame):
            self._signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, handler)


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


class Progress:
    """A tqdm bar on a terminal; otherwise (SLURM, nohup, tests) one plain line every `log_every` steps."""

    def __init__(self, total: int, initial: int, desc: str, log_every: int, log):
        self.log, self.log_every, self.total, self.desc = log, log_every, total, desc
        self.bar = None
        if sys.stdout.isatty() and (not dist.is_initialized() or dist.get_rank() == 0):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, step: int, losses: dict) -> None:
        """`step` counts from 1; `losses` are only turned into numbers (a GPU sync) when something is shown."""
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.total:
                self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in losses.items()})
        elif step % self.log_every == 0:
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
            self.log(f"{self.desc} step {step}/{self.total} {shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Data: whole data sets as uint8 tensors in memory, batches by index


def epoch_permutation(seed: int, epoch: int, n: int, device=None) -> torch.Tensor:
    """The order of the training images in `epoch`: a pure function of (seed, epoch), so resume needs no state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]

# Tests build tiny CIFAR-10 batches in the real pickle format; their MD5 sums cannot match the published ones.
# This is the one place where the check is skipped, and only when the environment asks for it.
SKIP_CIFAR_MD5_ENV = "GENMODELS_SKIP_CIFAR_MD5"


def _cifar10_class():
    from torchvision.datasets import CIFAR10
    if os.environ.get(SKIP_CIFAR_MD5_ENV) != "1":
        return CIFAR10

    class UnverifiedCIFAR10(CIFAR10):
        def _check_integrity(self):
            return True

        def _load_meta(self):
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return UnverifiedCIFAR10


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


def _missing_data_message(dataset: str, data_dir: Path, err: Exception) -> str:
    where = {
        "mnist": (data_dir / "MNIST" / "raw", ", ".join(_MNIST_FILES) + " (or the same names with .gz)"),
        "fashion-mnist": (data_dir / "FashionMNIST" / "raw", ", ".join(_MNIST_FILES) +
                          " (or: apt-get install dataset-fashion-mnist)"),
        "cifar10": (data_dir / "cifar-10-batches-py", "data_batch_1 .. data_batch_5, test_batch, batches.meta "
                    "(unpack cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"),
    }[dataset]
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{dataset} is not in {data_dir} and could not be downloaded ({first_line}). "
            f"Put {where[1]} into {where[0]}, or pass --data-dir pointing at a folder that has them.")


def load_images(dataset: str, data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole data set as (images uint8 [N, C, H, W], labels int64 [N]), read once by torchvision's own classes.

    torchvision downloads missing files (download=True) on machines with internet. Holding the set as one uint8
    tensor (47 MB for MNIST, 150 MB for CIFAR-10) lets batches be sliced by index with no per-item PIL work.
    """
    from contextlib import redirect_stdout
    from torchvision import datasets

    data_dir = Path(data_dir)
    try:
        with redirect_stdout(sys.stderr):  # torchvision prints download progress; keep stdout for our log
            if dataset == "mnist":
                ds = datasets.MNIST(data_dir, train=train, download=True)
                images = ds.data.unsqueeze(1)
            elif dataset == "fashion-mnist":
                _copy_system_fashion_mnist(data_dir)
                ds = datasets.FashionMNIST(data_dir, train=train, download=True)
                images = ds.data.unsqueeze(1)
            elif dataset == "cifar10":
                ds = _cifar10_class()(data_dir, train=train, download=True)
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
            else:
                raise UserError(f"unknown dataset {dataset!r}")
    except UserError:
        raise
    except Exception as err:  # URLError, RuntimeError("not found"), a bad MD5 ...: all mean "no usable files"
        raise UserError(_missing_data_message(dataset, data_dir, err)) from None
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images.to(torch.uint8), labels
