"""Many runs at once: find them by sweep name, label them by the settings that differ, pick the run that counts.

A run folder holds config.json with "script" and "args" (vae_train.py or dcgan_train.py made it). The analysis
scripts, report.py and check_submission.py read runs through this module, so they agree on which folders are runs
(runs/compare/ and a latest-* link seen twice are not), which runs form a sweep (args.sweep), how a run is labelled
(by the settings that differ, `beta=4`, never by its folder's time stamp), how far it got (in training images seen,
so runs with different --train-limit or data compare fairly) and which run is "the" one of the report (counted_run).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import math
import shlex
from pathlib import Path

from . import readers
from .errors import UserError
from .flags import ArgumentParser

SCRIPTS = readers.SCRIPTS
MODEL_FILES = readers.MODEL_FILES
# Training images per epoch of each data set, for runs whose metrics.csv has no images_seen column.
DATASET_SIZES = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000}
# Flags that say where or how a run was done (folders, logging, checkpoints, evaluation, speed), not what was
# trained: they never make two runs "different settings" and never appear in a label. The training scripts'
# parsers know them as the flags that may change on resume (all but --epochs); this list also covers runs made
# before a flag moved or existed.
BOOKKEEPING = {"name", "sweep", "run_dir", "runs_root", "resume", "init_from", "restart", "data_dir", "device",
               "log_every", "ckpt_every_min", "keep_ckpts", "milestone_every", "mirror_dir", "inception_weights",
               "fid", "fid_every", "fid_samples", "compile", "channels_last", "amp"}
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "folder": "an image folder"}
COMPARE_DIR = "compare"  # RUNS_ROOT/compare/<name>/: comparison figures; not a run, so every reader skips it


class RunInfo:
    """What a reader needs to know about one run folder, read once: config, metrics rows, export.json."""

    def __init__(self, run_dir: Path, config: dict):
        self.dir = Path(run_dir).resolve()
        self.name = self.dir.name
        self.config = config
        self.args: dict = config["args"]
        self.script: str = config["script"]
        self.sweep: str | None = self.args.get("sweep")
        self.metrics = readers.read_metrics_csv(self.dir / "metrics.csv")
        self.epochs_done = int(self.metrics[-1]["epoch"]) if self.metrics else 0
        self.export = readers.read_export(self.dir)

    def __repr__(self) -> str:
        return f"RunInfo({self.name})"

    @property
    def started(self) -> tuple[float, str]:
        """When the run first started, as the training scripts reckon it (readers.started_at: POSIX seconds, so
        machines in other time zones agree), the folder name breaking ties: for "newest" comparisons."""
        return readers.started_at(self.config, self.dir), self.name

    @functools.cached_property
    def settings(self):
        """The run's flags as a Namespace; a flag added to the script since the run was made has its default."""
        return readers.run_namespace(self.dir, self.script, script_parser(self.script))

    @property
    def finished(self) -> bool:
        """export.json names the last planned epoch and its model files are there (readers.finished_models)."""
        return readers.finished_models(self.dir, self.args, MODEL_FILES[self.script]) is not None

    def status(self) -> str:
        """'finished, 10 epochs' or 'unfinished: 3 of 10 epochs'."""
        planned = self.args.get("epochs")
        if self.finished:
            return f"finished, {self.export.get('epoch', planned)} epochs"
        return f"unfinished: {self.epochs_done} of {planned} epochs"

    def images_seen(self) -> list[float] | None:
        """Training images seen at the end of each metrics.csv row: the images_seen column when the run wrote it,
        else epoch x training images; None when neither is known (--dataset folder records no count)."""
        column = [row.get("images_seen", math.nan) for row in self.metrics]
        if column and all(math.isfinite(v) for v in column):
            return column
        size = DATASET_SIZES.get(self.args.get("dataset", "mnist"))
        per_epoch = min(size, self.args.get("train_limit") or size) if size else None
        return None if per_epoch is None else [row["epoch"] * per_epoch for row in self.metrics]

    def total_images_seen(self) -> float:
        seen = self.images_seen()
        return seen[-1] if seen else 0.0


def not_cifar10(run_args: dict) -> str | None:
    """Why a DCGAN run cannot be the coursework's (its --dataset is not CIFAR-10), in the words report.py and
    check_submission.py both use; None for a CIFAR-10 run."""
    dataset = run_args.get("dataset", "cifar10")
    if dataset == "cifar10":
        return None
    return f"trained on {DATASET_NAMES.get(dataset, dataset)}, not CIFAR-10: not a valid submission"


def read_run(path, script: str | None = None) -> RunInfo | None:
    """The run in `path`, or None when it is not a run folder (of `script`, when given)."""
    path = Path(path)
    try:
        return RunInfo(path, readers.read_run_config(path, script))
    except UserError:
        return None


def collect_runs(paths: list, script: str, log=print) -> list[RunInfo]:
    """The runs among command-line paths. One path must be a run of `script` (the UserError says what is wrong);
    of several (a shell glob such as runs/* matches other folders too), the others are skipped with a note each."""
    if len(paths) == 1:
        return [RunInfo(Path(paths[0]), readers.read_run_config(paths[0], script))]
    runs, seen = [], {}
    for path in map(Path, paths):
        run = read_run(path, script)
        if run is None:
            other = read_run(path)
            why = (f"a {other.script} run, not a {script} run" if other else
                   "not a run folder (no config.json)" if path.is_dir() else "no such folder")
            log(f"note: skipping {path}: {why}")
        elif run.dir in seen:
            log(f"note: skipping {path}: the same run as {seen[run.dir]}")
        else:
            seen[run.dir] = path
            runs.append(run)
    if not runs:
        raise UserError(f"none of the {len(paths)} folders given is a {SCRIPTS[script]} run")
    return runs


def find_runs(runs_root, script: str | None = None) -> list[RunInfo]:
    """Every run folder directly in runs_root (links such as latest-vae left out), oldest first."""
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        return []
    runs = [read_run(p, script) for p in runs_root.iterdir() if p.is_dir() and not p.is_symlink()]
    return sorted((run for run in runs if run is not None), key=lambda run: run.started)


def sweep_runs(runs_root, script: str, sweep: str, log=print) -> list[RunInfo]:
    """The runs of sweep `sweep` in runs_root: the newest run per setting (a sweep may be run again), sorted by
    label; a run with no finished epoch yet is left out (nothing to plot), with a note, and so is an older one."""
    members = [run for run in find_runs(runs_root, script) if run.sweep == sweep]
    newest = {}
    for run in members:  # oldest first, so a later run of the same settings replaces an earlier one
        key = settings_key(run)
        if not run.metrics:
            log(f"note: sweep {sweep}: {run.name} left out: no finished epoch yet")
            continue
        if key in newest:
            log(f"note: sweep {sweep}: {newest[key].name} left out: {run.name} is a newer run of the same settings")
        newest[key] = run
    kept = list(newest.values())
    for run in kept:
        if not run.finished:
            log(f"note: sweep {sweep}: {run.name} is {run.status()}")
    labels = run_labels(kept)
    order = sorted(range(len(kept)), key=lambda i: _label_sort_key(kept[i], labels[i]))
    return [kept[i] for i in order]


def _label_sort_key(run: RunInfo, label: str):
    """Numbers in label order (beta=0.5 before beta=2), else alphabetical."""
    beta = run.args.get("beta")
    return (0, float(beta), label) if run.script == "vae" and isinstance(beta, (int, float)) else (1, 0.0, label)


# ----------------------------------------------------------------------------------------------------------------
# Labels from the settings that differ


def script_parser(script: str):
    """The argument parser of a training script ("vae" or "dcgan")."""
    return importlib.import_module(SCRIPTS[script].removesuffix(".py")).build_parser()


@functools.lru_cache(maxsize=None)
def script_flags(script: str) -> tuple[dict, frozenset]:
    """(default of every flag, the flags that are bookkeeping) of a training script's parser."""
    parser = script_parser(script)
    defaults = {action.dest: action.default for action in parser._actions}
    resumable = parser.resumable_flags() if hasattr(parser, "resumable_flags") else set()
    return defaults, frozenset(BOOKKEEPING | (set(resumable) - {"epochs"}))


def setting(run: RunInfo, key: str):
    """A flag's value in a run; the script's default for a flag added after the run was made."""
    return run.args[key] if key in run.args else script_flags(run.script)[0].get(key)


def settings_key(run: RunInfo) -> str:
    """The experiment's settings (every flag but the bookkeeping ones), as one comparable string."""
    defaults, ignored = script_flags(run.script)
    keys = sorted((set(run.args) | set(defaults)) - ignored - {"help"})
    return json.dumps({k: setting(run, k) for k in keys}, default=str)


def differing_keys(runs: list[RunInfo]) -> list[str]:
    """The flags (bookkeeping left out) whose values are not the same in every run, sorted."""
    ignored = script_flags(runs[0].script)[1]
    keys = set().union(*(run.args for run in runs)) - ignored
    return sorted(k for k in keys if len({json.dumps(setting(run, k), default=str) for run in runs}) > 1)


def format_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(format_value, value))
    return str(value)


def run_labels(runs: list[RunInfo]) -> list[str]:
    """A label per run from the flags that differ between the runs: each run names those it sets to something
    other than the script's default ('loss=hinge'). A run at the defaults of all of them is 'defaults', or names
    the one flag when only one differs ('beta=1'), so no label is empty. Folder names are added only to break
    ties."""
    if not runs:
        return []
    keys = differing_keys(runs)
    if not keys:
        return [run.name for run in runs]
    defaults = script_flags(runs[0].script)[0]
    labels = []
    for run in runs:
        own = [k for k in keys if k not in defaults or setting(run, k) != defaults[k]]
        if not own and len(keys) > 1:
            labels.append("defaults")
        else:
            labels.append(", ".join(f"{k}={format_value(setting(run, k))}" for k in own or keys))
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({run.name})" for label, run in zip(labels, runs)]
    return labels


def x_axis(runs: list[RunInfo]) -> tuple[str, list[list[float]]]:
    """The common x axis of a comparison: the epoch when every run's epochs are the same size (the same data and
    --train-limit: an epoch means the same everywhere, and it is what a reader counts in); else training images
    seen when known for every run (runs on different amounts of data compare fairly); else the epoch."""
    seen = [run.images_seen() for run in runs]
    epochs = [[row["epoch"] for row in run.metrics] for run in runs]
    per_epoch = {round(n / e) for s, es in zip(seen, epochs) if s is not None for n, e in zip(s, es) if e}
    if len(per_epoch) > 1 and all(s is not None for s in seen):
        return "training images seen", seen
    return "epoch", epochs


# ----------------------------------------------------------------------------------------------------------------
# The run that counts


def counted_run(runs_root, script: str, explicit=None, how_to_name: str = "", log=print) -> tuple[RunInfo, str]:
    """The run a report or a submission uses, and why (a few words to print after its name): the one named
    (`explicit`, with a warning when it is a sweep member or unfinished), else the longest finished run of `script`
    that is not a sweep member, the newest among equals. So a sweep's last run, a run still training or a one-epoch
    check made after the main run never becomes the submitted model unnoticed; a newer run passed over is named with
    how to choose it (`how_to_name`, e.g. "--vae-run"). The runs/latest* links keep meaning the newest run."""
    how_to_name = how_to_name or "name it"
    finished = [r for r in find_runs(runs_root, script) if r.finished and not r.sweep]
    if explicit:
        run = read_run(explicit, script)
        if run is None:
            readers.read_run_config(explicit, script)  # raises the UserError that says what is wrong
        if run.sweep:
            log(f"warning: {run.name} is a member of sweep {run.sweep!r}, used because it was named explicitly")
        if not run.finished:
            log(f"warning: {run.name} is {run.status()} (no export.json for the last epoch)")
        longer = [r for r in finished if r.total_images_seen() > run.total_images_seen()]
        if longer:
            best = max(longer, key=lambda r: (r.total_images_seen(), r.started))
            log(f"warning: {best.name} is a longer finished {script} run ({best.total_images_seen():,.0f} training "
                f"images seen, against {run.total_images_seen():,.0f}); it counts when no run is named")
        return run, "named explicitly"
    if not finished:
        link = Path(runs_root) / f"latest-{script}"
        linked = read_run(link, script) if link.exists() else None
        about_link = "" if linked is None else (f"; {link} -> {linked.name} is " + (
            f"a member of sweep {linked.sweep!r}" if linked.sweep else linked.status()))
        raise UserError(f"no finished {script} run ({SCRIPTS[script]}) that is not a sweep member in {runs_root}"
                        f"{about_link}. Train one to the end (make {script}; a stopped run continues with --resume), "
                        f"or name a run: {how_to_name}=RUN_DIR")
    run = max(finished, key=lambda r: (r.total_images_seen(), r.started))
    newer = [r for r in finished if r.started > run.started]
    if newer:
        newest = newer[-1]
        log(f"note: not chosen: {newest.name}, newer but shorter ({newest.total_images_seen():,.0f} training images "
            f"seen, against {run.total_images_seen():,.0f}); to use it: "
            f"{how_to_name}={shlex.quote(shown_path(newest.dir))}")
    return run, f"the longest finished {script} run not in a sweep ({run.total_images_seen():,.0f} training images)"


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (a command to copy), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def compare_dir(runs_root, name: str) -> Path:
    """Where a comparison of several runs goes by default: RUNS_ROOT/compare/<name>/ (skipped by every reader)."""
    return Path(runs_root) / COMPARE_DIR / name


def default_compare_dir(runs: list[RunInfo], script: str) -> Path:
    """RUNS_ROOT/compare/<sweep> for one sweep's runs, else RUNS_ROOT/compare/<script>-<time>."""
    sweeps = {run.sweep for run in runs}
    name = sweeps.pop() if len(sweeps) == 1 and None not in sweeps else \
        f"{script}-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    return compare_dir(runs[0].dir.parent, name)


def analysis_parser(doc: str, script: str, out_also: str = "") -> ArgumentParser:
    """The parser of an analysis script, with the flags both share: the run folders, --out and --device."""
    parser = ArgumentParser(doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help=f"run folders made by {SCRIPTS[script]} (runs/latest-{script} works)")
    parser.add_argument("--out", default=None,
                        help=f"with several runs: the comparison folder (default: RUNS_ROOT/compare/<sweep name>, or "
                             f"compare/{script}-<time> for runs of no one sweep){out_also}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto (the default) picks CUDA, then MPS, then CPU")
    return parser
