"""The run folder, owned by one process: its lock, config.json, log.txt, the latest links, and storage faults
turned into one line. Run (loop.py) adds the training loop on top.

Layout:  RUN_DIR/config.json  log.txt  metrics.csv  samples/  figures/  export.json  <model files>
         RUN_DIR/checkpoints/step-<global step>.pt (the newest --keep-ckpts)  epoch-NNN.pt (milestones)  best.pt
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import stop_signals
from .console import say
from .devices import amp_dtype, broadcast_object, describe, precision_name
from .errors import UserError
from .files import append_csv, atomic_symlink, atomic_write_text
from .flags import REPO_ROOT
from .mirror import mirror_run
from .readers import list_checkpoints
from .runs import RunPlan, utc_stamp


class RunFolder:
    """One run folder, owned by this process. Use as a context manager: entering takes the folder (a new one is
    made, named by the time), locks it and writes config.json; leaving closes its files and restores signal
    handlers. Under torchrun only rank 0 writes; the others learn its decisions through _on_main."""

    def __init__(self, plan: RunPlan, *, script: str, device: torch.device, config: dict, mirror_dir: str | None):
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0  # under torchrun only rank 0 writes anything
        self.plan, self.script, self.device, self.config = plan, script, device, config
        self.mirror_dir = Path(mirror_dir) if mirror_dir else None
        # Where this start runs (device, its name, precision, versions): the first log lines and config.json.
        self.environment = describe(device, precision_name(amp_dtype(config.get("amp", "off"), device)))
        self.dir = plan.dir           # a new folder's final name is known once __enter__ has claimed it
        self._log_file = self._lock_file = None
        self._remove_folder = False  # a new folder stopped during start-up holds nothing worth keeping
        self.last_save = time.monotonic()

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.dir / "samples"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.csv"

    # -- entering and leaving -------------------------------------------------------------------------------------
    def __enter__(self) -> RunFolder:
        stop_signals.install()  # the training scripts call it at their first line; here for any other caller
        self.dir = Path(self._on_main(self._take_folder))  # rank 0's choice (a new folder's name holds the time)
        self.last_save = time.monotonic()
        ranks = f" ({self.world_size} processes)" if self.world_size > 1 else ""
        self.log(f"{'resuming' if self.plan.resuming else 'new'} {self.script} run in {self.dir} on "
                 f"{self.device}{ranks}")
        env = self.environment
        capability = f", compute capability {env['capability']}" if "capability" in env else ""
        self.log(f"device {env['device']} ({env['device_name']}{capability}), precision {env['precision']}, "
                 f"deterministic {self.config.get('deterministic', 'off')}; torch {env['torch']}, "
                 f"CUDA {env['cuda'] or 'none (CPU-only build)'}, cuDNN {env['cudnn']}")
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
            if not self.plan.resuming:  # a resumed run's record changes once its checkpoint has loaded (Run.train)
                self._write_config()
        return str(self.dir)

    def _set_aside_replaced_run(self) -> None:
        """--restart: the replaced run's checkpoints (damaged ones, milestones, best.pt), metrics, sample grids,
        export record and model files go into one folder beside them, so nothing of it is mistaken for the new
        run's; nothing is deleted."""
        old = [self.dir / name for name in ("checkpoints", "metrics.csv", "steps.csv", "samples", "export.json")]
        try:  # the model files it exported
            old += [self.dir / name for name in json.loads((self.dir / "export.json").read_text())["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not any(p.exists() for p in old):
            return
        aside = self.dir / f"replaced-{utc_stamp()}"
        aside.mkdir()
        for path in old:
            if path.exists():
                path.rename(aside / path.name)
        say(f"--restart: the replaced run's files are in {aside}")

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
        now = datetime.datetime.now(datetime.timezone.utc)  # with its offset: runs order by it (readers.started_at)
        starts.append({"time": now.isoformat(timespec="seconds"), "host": socket.gethostname(),
                       "device": str(self.device), "device_name": self.environment["device_name"],
                       "precision": self.environment["precision"], "resumed": self.plan.resuming, "pid": os.getpid(),
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
            "environment": self.environment,  # this start's; each start's device and precision are in starts
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
        """Print a line and append it to log.txt (rank 0 only). A closed or broken stdout loses only the print."""
        if not self.is_main:
            return
        say(message)
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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
