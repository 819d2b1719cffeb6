"""Which run folder a process works in: a new one, the run the same command started, or --resume's; and which
settings it runs with (config.json's, when resuming). A finished run is left alone (AlreadyFinished, exit 0). Nothing
is written here, except a run folder copied back from a --mirror-dir that holds it newer. Imports no torch.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import os
from pathlib import Path

from .console import say
from .errors import AlreadyFinished, UserError
from .files import checksum_problem
from .flags import ArgumentParser
from .mirror import newest_step, restore_from_mirror
from .readers import (checkpoint_candidates, finished_models, read_export, read_metrics_csv, read_run_config,
                      started_at)


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


def utc_stamp() -> str:
    """The time stamp of new run folders, in UTC: names sort in real time whatever the machine's time zone (Colab
    runs on UTC, a laptop on local time, daylight saving ends)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def resolve_run(parser: ArgumentParser, argv, *, script: str) -> RunPlan:
    """Parse the flags and decide which run folder this process works in.

    When resuming, flags not typed on the command line take the values saved in the run's config.json, so
    `--resume latest` alone continues a run started with any flags; typed flags that change the experiment are
    refused with the list of differing keys. A run that has finished is left as it is: AlreadyFinished (exit 0)
    says where its models are, unless a higher --epochs continues it.
    """
    args = parser.parse_args(argv)
    # Absolute paths in config.json, so a resume from another working directory finds the same folders.
    args.data_dir, args.runs_root = str(Path(args.data_dir).resolve()), str(Path(args.runs_root).resolve())
    if args.resume and args.run_dir and Path(args.resume).resolve() != Path(args.run_dir).resolve():
        raise UserError("--resume and --run-dir name different folders; give one of them")
    if args.init_from and (args.resume or args.run_dir and checkpoint_candidates(args.run_dir)):
        raise UserError("--init-from starts a new run; to continue a run, use --resume (or --run-dir) alone")
    explicit = _explicit_flags(parser, argv)
    run_dir, resuming, new_folder = _choose_folder(args, parser, script, explicit)
    if resuming:
        _merge_saved_config(args, parser, run_dir, explicit, script)
        _stop_if_finished(run_dir, args, script, explicit)
    if args.mirror_dir:  # typed, or saved in config.json: checked before any data is loaded
        args.mirror_dir = str(_check_mirror(Path(args.mirror_dir), run_dir))
    init_from = None
    if args.init_from and not resuming:
        init_from = _init_checkpoint(args.init_from)
        _take_source_settings(args, init_from.parent.parent, explicit, script)
    return RunPlan(args, run_dir, resuming, new_folder, experiment_settings(args, parser), init_from)


def _choose_folder(args, parser: ArgumentParser, script: str, explicit: set[str]) -> tuple[Path, bool, bool]:
    """(run folder, resuming?, a new folder?): --resume's, --run-dir's, the run this same command started
    (unfinished, or finished and given a higher --epochs), or a new folder named by the time in UTC. A --mirror-dir
    that holds the named run newer than the local folder is copied back first."""
    runs_root = Path(args.runs_root)
    if args.resume:
        run_dir = runs_root / f"latest-{script}" if args.resume == "latest" else Path(args.resume)
        if mirror := _mirror_of(args, run_dir):
            _take_newer_mirror(mirror, run_dir.resolve())
        if not run_dir.exists():
            raise UserError(f"--resume {args.resume}: no such run folder ({run_dir})")
        run_dir = run_dir.resolve()
        if not checkpoint_candidates(run_dir):
            _stop_if_finished(run_dir, args, script, explicit)
            raise UserError(f"--resume {args.resume}: {run_dir} holds no checkpoint to continue from; "
                            f"start a new run instead (drop --resume)")
        return run_dir, True, False
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
        if mirror := _mirror_of(args, run_dir):
            _take_newer_mirror(mirror, run_dir)
        resuming = bool(checkpoint_candidates(run_dir))
        if not resuming:
            _check_fresh_start_allowed(run_dir, args, parser, script, explicit)
        return run_dir, resuming, False
    if not args.new_run and (earlier := _same_command_run(runs_root, script, args, parser, explicit)):
        return earlier, True, False
    _check_writable(runs_root, "--runs-root")
    return runs_root / f"{utc_stamp()}-{args.name or script}", False, True


def _same_command_folders(runs_root: Path, script: str, args, parser: ArgumentParser):
    """(folder, saved args) of the runs this same command made, newest (in real time) first. Same command means:
    made as a new folder (not --run-dir), by the same script, with the same --name, --sweep, --init-from and
    experiment settings. A run another process is training (its lock is held) is left alone."""
    if not runs_root.is_dir():
        return
    mine, resumable = experiment_settings(args, parser), parser.resumable_flags()
    found = []
    for folder in (p for p in runs_root.iterdir() if p.is_dir() and not p.is_symlink()):
        try:
            config = read_run_config(folder, script)
        except UserError:  # not a run of this script's
            continue
        saved = config["args"]
        same_command = (config.get("origin") == "new-folder"
                        and all(saved.get(k) == getattr(args, k) for k in ("name", "sweep", "init_from"))
                        and not settings_differ({k: v for k, v in saved.items() if k not in resumable}, mine))
        if same_command:
            found.append((started_at(config, folder), folder.name, folder, saved))
    for _, _, folder, saved in sorted(found, key=lambda item: item[:2], reverse=True):
        if not _locked(folder):
            yield folder.resolve(), saved


def _same_command_run(runs_root: Path, script: str, args, parser: ArgumentParser, explicit: set[str]) -> Path | None:
    """The run to continue when a command is typed again: the newest run it made, if unfinished (after a crash,
    Ctrl-C or a lost Colab VM), or finished and asked for more --epochs. When that run has finished, it is said so
    (AlreadyFinished: exit 0, nothing trained, nothing moved); --new-run starts another. None: a new run."""
    for folder, saved in _same_command_folders(runs_root, script, args, parser):
        finished = finished_models(folder, saved) is not None
        if not finished and not checkpoint_candidates(folder):
            continue  # killed before its first checkpoint: nothing to continue
        if not finished:
            say(f"continuing {folder}, the unfinished run this same command started (add --new-run to start "
                f"another)")
            return folder
        _stop_if_finished(folder, args, script, explicit, other="or add --new-run to train another")
        if not checkpoint_candidates(folder):
            raise UserError(f"{folder} finished its {saved['epochs']} epochs and its checkpoints are gone, so it "
                            f"cannot train longer; add --new-run to train a new run for --epochs {args.epochs}")
        say(f"continuing {folder}, the finished run this same command started, to --epochs {args.epochs}")
        return folder
    return None


def _stop_if_finished(run_dir: Path, args, script: str, explicit: set[str],
                      other: str = "or give another --run-dir to train another run") -> None:
    """A finished run stays as it is: unless --epochs is typed higher than it trained, raise AlreadyFinished (which
    run, where its models are; exit 0) before anything is written, so config.json keeps the target it finished
    at. For an unfinished run, an --epochs below the epochs it has trained is refused (exit 2) for the same reason."""
    saved = read_run_config(run_dir, script)["args"]
    models = finished_models(run_dir, saved)
    asked = args.epochs if "epochs" in explicit else saved["epochs"]
    if models is not None:
        done = read_export(run_dir)["epoch"]
        if asked <= done:
            raise AlreadyFinished(f"run already finished ({done} of {saved['epochs']} epochs): {run_dir}; its "
                                  f"models: {', '.join(map(str, models))}. Raise --epochs to train it longer, "
                                  f"{other}.")
        return
    done = len(read_metrics_csv(run_dir / "metrics.csv"))
    if asked < done:
        raise UserError(f"{run_dir} has trained {done} epochs already; --epochs {asked} is below that. Drop --epochs "
                        f"to train to its {saved['epochs']} epochs, or start a new run")


def _locked(run_dir: Path) -> bool:
    """Is a process training in `run_dir` now (holding its flock)? Opened read-only: looking writes nothing."""
    try:
        with open(run_dir / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _check_mirror(mirror: Path, run_dir: Path) -> Path:
    """--mirror-dir, checked before anything is trained: a second copy of the run folder, so neither inside it
    (the copy would copy itself, level after level) nor around it (the run folder would be copied into itself),
    and writable now rather than at the first checkpoint. Returns it absolute (config.json records that)."""
    mirror, run_dir = mirror.resolve(), run_dir.resolve()
    if mirror == run_dir or run_dir in mirror.parents:
        raise UserError(f"--mirror-dir {mirror} is inside the run folder {run_dir}; give a folder elsewhere (e.g. "
                        f"on another disk or Google Drive)")
    if mirror in run_dir.parents:
        raise UserError(f"--mirror-dir {mirror} contains the run folder {run_dir}; give the copy a folder of its own, "
                        f"outside the run folder (e.g. on Google Drive)")
    _check_writable(mirror, "--mirror-dir", "write there",
                    "; give a writable folder (--mirror-dir '' for no mirror)")
    return mirror


def _mirror_of(args, run_dir: Path) -> Path | None:
    """The --mirror-dir typed (--mirror-dir '' for none), else the one the run's config.json names (a resume need not
    repeat it)."""
    if args.mirror_dir is not None:
        return Path(args.mirror_dir) if args.mirror_dir else None
    try:
        saved = read_run_config(run_dir, None)["args"].get("mirror_dir")
    except UserError:
        return None
    return Path(saved) if saved else None


def _take_newer_mirror(mirror: Path, run_dir: Path) -> None:
    """When the mirror holds the run further on (a newer checkpoint, by global step, or a later export) than the
    local folder, or the local folder is gone (a new Colab VM), copy the mirror back: resuming from a stale local
    copy would train again what is done, and its next sync would overwrite the newer mirror."""
    _check_mirror(mirror, run_dir)
    theirs, mine = newest_step(mirror), newest_step(run_dir)
    if theirs is None or (mine is not None and theirs <= mine) or _locked(run_dir):
        return
    why = "" if mine is None else f" (its newest checkpoint is step {theirs}, the local one step {mine})"
    restore_from_mirror(mirror, run_dir, why)


def _check_writable(folder: Path, flag: str, what: str = "create run folders there", hint: str = "") -> None:
    """Fail now, with one line, if `folder` cannot be made or written (a file, read-only, no permission): the
    runs root, or the --mirror-dir copy."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot {what} ({err.strerror or err}){hint}") from None


def _check_fresh_start_allowed(run_dir: Path, args, parser: ArgumentParser, script: str, explicit: set[str]) -> None:
    """A --run-dir with nothing to resume may start from scratch only when that loses nothing. Unless --restart
    (which sets the old files aside): a finished run (its checkpoints deleted to save disk) is said to be finished
    (exit 0); never over damaged checkpoints, another experiment, or a run's metrics and models."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a folder")
    has_config = (run_dir / "config.json").exists() and not args.restart
    if has_config:
        try:
            saved = read_run_config(run_dir, script)["args"]
        except UserError as err:
            raise UserError(f"{err}; add --restart to start this folder afresh") from None
        fixed = parser.resumable_flags()
        saved_experiment = {k: v for k, v in saved.items() if k not in fixed}
        differing = settings_differ(saved_experiment, experiment_settings(args, parser))
        if differing:
            raise UserError(f"{run_dir} holds another {script} run with no checkpoint ({'; '.join(differing)}); "
                            f"use a new folder, or add --restart to replace it")
        if finished_models(run_dir, saved) is not None:
            _stop_if_finished(run_dir, args, script, explicit)  # AlreadyFinished, unless --epochs is raised
    if list((run_dir / "checkpoints").glob("*.corrupt")) and not args.restart:
        raise UserError(f"{run_dir}: every checkpoint is damaged (set aside as checkpoints/*.corrupt). Restore one "
                        f"from a backup, or add --restart to train from scratch in this folder")
    rows, exported = len(read_metrics_csv(run_dir / "metrics.csv")), read_export(run_dir) is not None
    if has_config and (rows or exported):
        what = ", ".join([f"metrics.csv with {rows} epochs"] * bool(rows) + ["exported models"] * exported)
        raise UserError(f"{run_dir} holds a run's results ({what}) but no checkpoint to continue from; nothing is "
                        f"trained over them. Restore its checkpoints/ (from a backup or --mirror-dir), add --restart "
                        f"to set them aside and train from scratch here, or use another --run-dir")
    _check_writable(run_dir if run_dir.is_dir() else run_dir.parent, "--run-dir")


def _merge_saved_config(args, parser: ArgumentParser, run_dir: Path, explicit: set[str], script: str) -> None:
    saved = read_run_config(run_dir, script)["args"]
    resumable, differing = parser.resumable_flags(), []
    for key, saved_value in saved.items():
        if key in ("resume", "run_dir", "init_from", "allow_other_data") or not hasattr(args, key):
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
    own = {"resume", "run_dir", "init_from", "name", "sweep", "runs_root", "restart", "mirror_dir", "allow_other_data"}
    for key, value in read_run_config(source_dir, script)["args"].items():
        if key not in explicit and key not in own and hasattr(args, key):
            setattr(args, key, value)


def _init_checkpoint(path: str) -> Path:
    """--init-from: a checkpoint file, or a run folder (its newest checkpoint whose checksum holds)."""
    path = Path(path).resolve()
    if path.is_dir():
        intact = [p for p in checkpoint_candidates(path) if not checksum_problem(p)]
        if not intact:
            raise UserError(f"--init-from {path}: the folder holds no intact checkpoint (checkpoints/*.pt)")
        return intact[0]
    if not path.is_file():
        raise UserError(f"--init-from {path}: no such checkpoint file or run folder")
    return path
