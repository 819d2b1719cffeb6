"""Which run folder a process works in: a new one, the unfinished run the same command started, or --resume's;
and which settings it runs with (config.json's, when resuming). Nothing is written here. Imports no torch.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import json
import os
from pathlib import Path

from .errors import UserError
from .flags import ArgumentParser
from .mirror import restore_from_mirror
from .readers import list_checkpoints, read_run_config


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
