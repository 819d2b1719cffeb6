"""Files written so that a kill at any moment leaves either the old file or the new one, never half of one.

Imports no torch.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import os
from pathlib import Path


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


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target`, replacing any old link in one rename (readers never see it missing)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def checksum_path(path: Path) -> Path:
    """Where the checksum of `path` is kept: beside it, in sha256sum's format (`sha256sum -c` checks it)."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_checksum(path: Path, digest: str) -> None:
    atomic_write_text(checksum_path(path), f"{digest}  {Path(path).name}\n")


def checksum_problem(path: Path) -> str | None:
    """Why the bytes of `path` are not the bytes its checksum was taken of, or None. A file without a checksum
    (written before checksums existed, or by a process killed between the file and its checksum) is taken on trust,
    as before. Raises FileNotFoundError when `path` is gone."""
    try:
        expected = checksum_path(path).read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        return f"its checksum file cannot be read ({err})"
    if not expected or _sha256(path) != expected[0]:
        return f"its bytes differ from the checksum written with it ({checksum_path(path).name}): damaged on disk"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
