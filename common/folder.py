"""The run folder, as plain functions of its path: claiming a new one, its lock, stray temporary files, config.json
with each start's record (which code ran: the commit, the uncommitted diff, the files' hashes), the latest links,
--restart's set-aside, and storage faults turned into one line. run.Run calls them; none keeps any state.

Layout:  RUN_DIR/config.json  log.txt  metrics.csv  steps.csv  samples/  code/  export.json  <model files>
         RUN_DIR/checkpoints/step-<global step>.pt (the newest --keep-ckpts)  epoch-NNN.pt (milestones)  best.pt
"""
from __future__ import annotations

import contextlib
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
from .files import atomic_symlink, atomic_write_text
from .flags import REPO_ROOT
from .readers import read_export, list_checkpoints, read_run_config
from .runs import utc_stamp

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
