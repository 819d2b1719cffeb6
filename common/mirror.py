"""A mirror of the run folder on a second file system (Google Drive on Colab, whose FUSE mount can drop writes):
the run writes to fast local disk, and each checkpoint is copied over and read back before it counts.
Imports no torch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .files import _sha256, atomic_path
from .readers import list_checkpoints


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
