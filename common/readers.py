"""Reading a run folder: its checkpoints' names, config.json, metrics.csv. For the resume logic and for the
analysis scripts, which may read a run that is still in progress. Imports no torch.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import UserError


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, newest first (names sort by global step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("step-*.pt"), reverse=True)


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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is damaged: not valid JSON ({err})") from None
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
