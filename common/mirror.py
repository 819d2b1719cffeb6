"""A mirror of the run folder on a second file system (Google Drive on Colab, whose FUSE mount can drop writes):
the run writes to fast local disk, and each checkpoint is copied over and read back before it counts.

Which copy is newer is decided by the newest checkpoint's global step (and the export's), never by file times:
nothing newer is overwritten by something older, in either direction. Imports no torch.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .console import say
from .files import _sha256, atomic_path, checksum_path
from .readers import list_checkpoints, read_export


def newest_step(folder: Path) -> int | None:
    """How far the run in `folder` got, in global steps: its newest step checkpoint, or its export (a finished run
    whose checkpoints were deleted); None when it holds neither."""
    steps = [int(m.group(1)) for p in list_checkpoints(folder) if (m := re.fullmatch(r"step-(\d+)\.pt", p.name))]
    exported = (read_export(folder) or {}).get("global_step")
    return max(steps + ([int(exported)] if isinstance(exported, int) else []), default=None)


def mirror_run(run_dir: Path, mirror: Path, log=print) -> None:
    """Copy the run folder's files to `mirror` (checkpoints verified by checksum); drop pruned checkpoints there.
    A mirror that holds the run further on than this folder (another machine trained it on) is left alone."""
    run_dir, mirror = Path(run_dir), Path(mirror)
    theirs, mine = newest_step(mirror), newest_step(run_dir)
    if theirs is not None and (mine is None or theirs > mine):
        log(f"warning: {mirror} holds this run further on (step {theirs}, here step {mine}); not overwritten. "
            f"Continue from it: --run-dir {run_dir} --mirror-dir {mirror} copies it back")
        return
    for src, dst in _copy_files(run_dir, mirror):
        if src.suffix == ".pt" and _sha256(dst) != _sha256(src):
            dst.unlink()
            log(f"warning: the copy of {src.name} in {mirror} does not match; it will be copied again next time")
    kept = {p.name for p in list_checkpoints(run_dir)}
    for old in list_checkpoints(mirror):
        if old.name not in kept:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)


def restore_from_mirror(mirror: Path, run_dir: Path, why: str = "") -> None:
    """A new machine (a fresh Colab VM), or a local copy older than the mirror's: bring the run folder back from the
    mirror before resuming it. File by file, atomically: a kill half-way leaves whole files, and the next start
    compares again."""
    say(f"restoring {run_dir} from {mirror}{why}")
    for _ in _copy_files(Path(mirror), Path(run_dir)):
        pass


def _copy_files(src_dir: Path, dst_dir: Path):
    """Copy each file of src_dir (names starting with '.' aside) that differs in size or time into dst_dir, each to a
    temporary file renamed into place; yields (source, copy) for each one copied."""
    for src in sorted(p for p in src_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        dst = dst_dir / src.relative_to(src_dir)
        if dst.exists() and (dst.stat().st_size, dst.stat().st_mtime) == (src.stat().st_size, src.stat().st_mtime):
            continue  # copied before (copy2 keeps the modification time)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".pt":  # its old checksum must not outlive it (the new one follows, sorted after it)
            checksum_path(dst).unlink(missing_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)
        yield src, dst
