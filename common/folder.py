"""The run folder and its files, owned by one process: claiming a new one, its lock, log.txt, stray temporary files,
config.json with each start's record (which code ran: the commit, the uncommitted diff, the files' hashes),
metrics.csv and steps.csv, the latest links, the live view, the export, the mirror, --restart's set-aside, and
storage faults turned into one line. RunFolder holds the open files; run.Run, the loop's bookkeeping, has one.

Layout:  RUN_DIR/config.json  log.txt  metrics.csv  steps.csv  samples/  code/  export.json  <model files>
         RUN_DIR/checkpoints/step-<global step>.pt (the newest --keep-ckpts)  epoch-NNN.pt (milestones)  best.pt
"""
from __future__ import annotations

import contextlib
import shutil
import datetime
import errno
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

from .console import say
from .errors import UserError
from .files import append_csv, atomic_symlink, atomic_write_text, write_csv
from .flags import REPO_ROOT
from .live import LiveView
from .mirror import mirror_run
from .readers import list_checkpoints, read_export, read_run_config, read_step_rows
from .runs import RunPlan, utc_stamp

# The code a run's numbers depend on: the training script and the library. Hashed at every start, so a copy of
# the repository without git is covered too.
LIBRARY = "common"


def claim_new_folder(wanted: Path) -> Path:
    """Make a folder that did not exist: two runs started in the same second with the same --name get `-2`, `-3`,
    ... (mkdir is atomic, so two processes can never both claim one name)."""
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


def lock_folder(run_dir: Path):
    """Refuse a second process on this folder. flock dies with its process, so a crash leaves no stale lock.
    Returns the open lock file: closing it releases the lock."""
    lock_file = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise UserError(f"another process (pid {holder}) is already training in {run_dir}; "
                        f"wait for it or stop it first") from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def clean_stray_temp_files(run_dir: Path, log) -> None:
    """Remove the temporary files of a process killed in the middle of a save (we hold the lock: none is live)."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        for tmp in folder.glob(".*.tmp-*"):
            log(f"removing {tmp}, left by a process killed while saving")
            tmp.unlink()


def set_aside_replaced_run(run_dir: Path) -> None:
    """--restart: the replaced run's checkpoints (damaged ones, milestones, best.pt), metrics, sample grids, export
    record and model files go into one folder beside them, so nothing of it is mistaken for the new run's; nothing
    is deleted."""
    old = [run_dir / name for name in ("checkpoints", "metrics.csv", "steps.csv", "samples", "export.json")]
    old += [run_dir / name for name in (read_export(run_dir) or {}).get("files", [])]
    if not any(p.exists() for p in old):
        return
    aside = run_dir / f"replaced-{utc_stamp()}"
    aside.mkdir()
    for path in old:
        if path.exists():
            path.rename(aside / path.name)
    say(f"--restart: the replaced run's files are in {aside}")


def code_state(script: str) -> dict:
    """Which code this start runs: the git commit (or 'not a git checkout'), the uncommitted diff (`git diff HEAD`
    of the whole repository), and a hash of the training script and of each library file."""
    files = [REPO_ROOT / f"{script}_train.py", *sorted((REPO_ROOT / LIBRARY).glob("*.py"))]
    hashes = {str(p.relative_to(REPO_ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files}
    commit, diff = _git("rev-parse", "HEAD"), _git("diff", "HEAD")
    return {"commit": commit.strip() if commit else "not a git checkout", "diff": diff or "", "files": hashes}


def _git(*command: str) -> str | None:
    try:
        out = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def changed_files(before: dict, now: dict) -> list[str]:
    """The files whose hash differs between two starts' code records (added and removed files included)."""
    return sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))


def write_config(run_dir: Path, *, script: str, args: dict, resuming: bool, new_folder: bool, environment: dict,
                 code: dict) -> dict | None:
    """Add this start to config.json (settings, environment, code) and write the diff beside it as
    code/start-NNN.diff. Returns the previous start's record (None for a first start)."""
    config_path = run_dir / "config.json"
    try:
        config = read_run_config(run_dir, script) if config_path.exists() else {}
    except UserError:
        if resuming:  # its settings were read a moment ago: it cannot be damaged unless replaced
            raise
        config = {}  # nothing to resume: its start history is all that is lost, and it is rewritten now
    starts = config.get("starts", [])
    previous = starts[-1] if starts else None
    diff_name = None
    if code["diff"]:
        diff_name = f"code/start-{len(starts) + 1:03d}.diff"
        (run_dir / "code").mkdir(exist_ok=True)
        atomic_write_text(run_dir / diff_name, code["diff"])
    now = datetime.datetime.now(datetime.timezone.utc)  # with its offset: runs order by it (readers.started_at)
    starts.append({"time": now.isoformat(timespec="seconds"), "host": socket.gethostname(), "resumed": resuming,
                   "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "device": environment["device"],
                   "device_name": environment["device_name"], "precision": environment["precision"],
                   "git_commit": code["commit"], "uncommitted_diff": diff_name, "code_files": code["files"]})
    config.setdefault("origin", "new-folder" if new_folder else "run-dir")  # see runs._same_command_run
    import torch  # the version this start runs (imported long before: the scripts need it)
    config.update({"script": script, "args": args, "torch": torch.__version__, "python": platform.python_version(),
                   "git_commit": code["commit"], "host": socket.gethostname(), "device": environment["device"],
                   "environment": environment, "starts": starts})  # environment: this start's
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return previous


def link_latest(run_dir: Path, runs_root: Path, script: str) -> None:
    """runs/latest and runs/latest-<script> point at this run (only for runs inside the runs root)."""
    if run_dir.parent != Path(runs_root).resolve():
        return
    for link in ("latest", f"latest-{script}"):
        atomic_symlink(run_dir.name, run_dir.parent / link)


@contextlib.contextmanager
def storage_errors(what: str, path: Path, run_dir: Path):
    """Turn a storage fault (disk full, read-only, I/O error) while writing `what` into one line that says what
    failed, where, and which checkpoint is intact; the next start resumes from that one."""
    try:
        yield
    except OSError as err:
        kept = list_checkpoints(run_dir)
        intact = f"the newest checkpoint {kept[0]} is intact" if kept else "no checkpoint was written yet"
        reason = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (free some space)"
        raise UserError(f"could not write {what} ({path}): {reason}; {intact}. Fix that, then re-run the "
                        f"same command to continue.") from None


def columns_of(rows: list[dict]) -> list[str]:
    """Every key of the rows, in the order first seen: a value added to the meter later gets a column too."""
    return list(dict.fromkeys(key for row in rows for key in row))


class RunFolder:
    """The folder of one run, owned by this process (rank 0 writes; the others only log nothing): entered by
    `take()`, left by `close()`. What it writes is what the loop hands it; it keeps no training state."""

    def __init__(self, plan: RunPlan, *, script: str, environment: dict, world_size: int, is_main: bool):
        self.plan, self.args, self.script, self.environment = plan, plan.args, script, environment
        self.world_size = world_size
        self.dir, self.is_main = plan.dir, is_main  # a new folder's final name is known once take() has claimed it
        self.mirror_dir = Path(self.args.mirror_dir) if self.args.mirror_dir else None
        self._log_file = self._lock_file = None
        self.remove_on_close = False  # a new folder stopped during start-up holds nothing worth keeping
        self.step_columns: list[str] = []
        self.live = LiveView()

    def take(self) -> str:
        """Claim (a new folder), lock, open log.txt, clean up after a killed save; a new run's config.json."""
        if self.plan.new_folder:
            self.dir = claim_new_folder(self.dir)
        with self.writing("the run folder", self.dir):
            if self.args.restart and not self.plan.resuming:
                set_aside_replaced_run(self.dir)
            for d in (self.dir, self.dir / "checkpoints", self.dir / "samples"):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_file = lock_folder(self.dir)
            self._log_file = open(self.dir / "log.txt", "a", buffering=1)
            clean_stray_temp_files(self.dir, self.log)
            if not self.plan.resuming:  # a resumed run's record changes once its checkpoint has loaded
                self.record_start()
        env, ranks = self.environment, f" ({self.world_size} processes)" if self.world_size > 1 else ""
        self.log(f"{'resuming' if self.plan.resuming else 'new'} {self.script} run in {self.dir} on "
                 f"{env['device']}{ranks}")
        capability = f", compute capability {env['capability']}" if "capability" in env else ""
        self.log(f"device {env['device']} ({env['device_name']}{capability}), precision {env['precision']}, "
                 f"deterministic {self.args.deterministic}; torch {env['torch']}, "
                 f"CUDA {env['cuda'] or 'none (CPU-only build)'}, cuDNN {env['cudnn']}")
        self.log("config: " + json.dumps(vars(self.args), sort_keys=True))
        return str(self.dir)

    def close(self) -> None:
        self.live.close()
        for f in (self._log_file, self._lock_file):
            if f:
                f.close()  # closing the lock file releases the flock
        self._log_file = self._lock_file = None
        if self.remove_on_close:
            shutil.rmtree(self.dir, ignore_errors=True)

    def record_start(self) -> None:
        """This start in config.json (settings, environment, the code that runs); when the code changed since the
        run's last start, one line naming the files (the log keeps it)."""
        code = code_state(self.script)
        previous = write_config(self.dir, script=self.script, args=vars(self.args), resuming=self.plan.resuming,
                                new_folder=self.plan.new_folder, environment=self.environment, code=code)
        changed = changed_files(previous.get("code_files") or {}, code["files"]) if previous else []
        if changed:
            diff = f"; this start's uncommitted diff: {self.dir / 'code'}" if code["diff"] else ""
            self.log(f"note: the code changed since this run's last start: {', '.join(changed)} (commit "
                     f"{code['commit'][:12]}{diff})")

    def start(self, metrics: list[dict], global_step: int, steps_per_epoch: int) -> None:
        """Once a checkpoint has loaded: config.json gets a resume's start, metrics.csv and steps.csv hold exactly
        the checkpoint's rows (no epoch twice), the latest links, the live view."""
        if self.plan.resuming:
            with self.writing("config.json", self.dir / "config.json"):
                self.record_start()
        with self.writing("metrics.csv", self.dir / "metrics.csv"):
            self.write_metrics(metrics)
            steps = read_step_rows(self.dir / "steps.csv", global_step)
            self.step_columns = columns_of(steps)
            if steps:
                write_csv(self.dir / "steps.csv", self.step_columns, steps)
            else:
                (self.dir / "steps.csv").unlink(missing_ok=True)
        if not self.args.sweep:  # sweep members never become "the" run of their script
            link_latest(self.dir, Path(self.args.runs_root), self.script)
        self.live.open(self.dir, global_step=global_step, steps_per_epoch=steps_per_epoch,
                       settings=self.plan.experiment, metric_columns=columns_of(metrics), metrics=metrics,
                       log=self.log)

    def write_metrics(self, metrics: list[dict]) -> None:
        """metrics.csv, whole, from the rows so far (atomic): a column a later epoch adds gets a header too."""
        with self.writing("metrics.csv", self.dir / "metrics.csv"):
            if metrics:
                write_csv(self.dir / "metrics.csv", columns_of(metrics), metrics)
            else:  # a new run, or one stopped before its first epoch end: no row to show
                (self.dir / "metrics.csv").unlink(missing_ok=True)

    def append_step_row(self, row: dict) -> None:
        """A row of steps.csv; a value added to the meter since the header rewrites the file with its column."""
        path = self.dir / "steps.csv"
        with self.writing(path.name, path):
            if list(row) != self.step_columns:
                rows = read_step_rows(path, row["global_step"])
                self.step_columns = columns_of([*rows, row])
                write_csv(path, self.step_columns, [*rows, row])
            else:
                append_csv(path, self.step_columns, row)
        self.live.row("steps", row, row["global_step"])

    def export(self, models: dict, save, epoch: int, global_step: int) -> None:
        """Write the model files ({file name: model}, each with `save(model, path)`), unless export.json says they
        already hold exactly `global_step`: a kill during an export, or more --epochs, exports again."""
        done = read_export(self.dir) or {}
        if done.get("global_step") == global_step and all((self.dir / f).exists() for f in done["files"]):
            return
        with self.writing("the exported model", self.dir):
            for name, model in models.items():
                save(model, self.dir / name)
            atomic_write_text(self.dir / "export.json", json.dumps(
                {"epoch": epoch, "global_step": global_step, "files": list(models)}, indent=2) + "\n")
        self.log(f"exported {', '.join(models)} (epoch {epoch}, step {global_step})")
        self.sync_mirror()

    def log(self, message: str) -> None:
        """Print a line and append it to log.txt (rank 0 only). A closed or broken stdout loses only the print."""
        if not self.is_main:
            return
        say(message)
        if self._log_file:
            self._log_file.write(message + "\n")

    def writing(self, what: str, path: Path):
        """Storage faults while writing `what` become one line naming the intact checkpoint."""
        return storage_errors(what, path, self.dir)

    def sync_mirror(self) -> None:
        """Bring the --mirror-dir copy up to date (after each checkpoint, and once more after the export)."""
        if self.is_main and self.mirror_dir:
            with self.writing("the mirror copy", self.mirror_dir):
                mirror_run(self.dir, self.mirror_dir, log=self.log)
