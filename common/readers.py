"""Reading a run folder: its checkpoints' names, config.json, metrics.csv, whether it finished, when it started.
For the resume logic and for the analysis scripts, which may read a run that is still in progress. Imports no torch.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
from pathlib import Path

from .errors import UserError


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, newest first (names sort by global step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("step-*.pt"), reverse=True)


SCRIPTS = {"vae": "vae_train.py", "dcgan": "dcgan_train.py"}  # what a run folder's config.json may name
# The coursework's model files each script exports into its run folder (export.json lists them too).
MODEL_FILES = {"vae": ("VAE_model.pth",), "dcgan": ("DCGAN_model_G.pth", "DCGAN_model_D.pth")}


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint a run could continue from, in the order to try them: the step checkpoints newest first,
    then the milestones (epoch-NNN.pt) newest first, then best.pt. A resume whose newer files are damaged falls
    back through all of them before it gives up."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    milestones = sorted(ckpt_dir.glob("epoch-*.pt"), reverse=True)
    return list_checkpoints(run_dir) + milestones + [p for p in [ckpt_dir / "best.pt"] if p.is_file()]


def read_export(run_dir) -> dict | None:
    """export.json of a run, written last by a training script's export: {"epoch", "global_step", "files"}; None
    when it is missing or unreadable (not exported yet, or killed during its export). The one reader of it, for
    resume, the analysis scripts, the report and the submission check."""
    try:
        record = json.loads((Path(run_dir) / "export.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("files"), list) and isinstance(record.get("epoch"), int)
    return record if ok else None


def finished_models(run_dir: Path, saved_args: dict, default_files=()) -> list[Path] | None:
    """The model files of a run that trained to its --epochs and exported them (export.json, written last, says
    so, and the files are there); None for a run that has not finished. One rule for the training scripts (a
    finished run is left alone) and the readers (the run that counts)."""
    record = read_export(run_dir)
    try:
        names = record.get("files") or default_files
        done, files = record["epoch"] >= saved_args["epochs"], [Path(run_dir) / Path(f).name for f in names]
    except (KeyError, TypeError, AttributeError):
        return None
    return files if done and files and all(f.is_file() for f in files) else None


def started_at(config: dict, run_dir: Path) -> float:
    """When a run first started, as POSIX seconds, so that "newest" means newest in real time whatever the time zone
    of the machines that made the runs. From config.json's first start (in UTC with its offset; runs made before
    that wrote local time without one, read here as this machine's local time), else the folder name's stamp."""
    starts = config.get("starts") if isinstance(config, dict) else None
    text = starts[0].get("time") if starts and isinstance(starts[0], dict) else None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()  # a time without offset is taken as local
    except (TypeError, ValueError):
        pass
    stamp = re.match(r"(\d{8}-\d{6})", Path(run_dir).name)
    try:
        return datetime.datetime.strptime(stamp.group(1), "%Y%m%d-%H%M%S").timestamp() if stamp else 0.0
    except ValueError:
        return 0.0


def read_run_config(run_dir, script: str | None) -> dict:
    """The config.json of a run folder made by `script` ("vae" or "dcgan"; None: either); a UserError says what is
    wrong. The one reader of config.json: resume, the analysis scripts, the report and the submission check."""
    path = Path(run_dir)
    made_by = SCRIPTS.get(script, "vae_train.py or dcgan_train.py")
    if not path.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    config_path = path / "config.json"
    if not config_path.exists():
        raise UserError(f"{run_dir} has no config.json: not a run folder made by {made_by}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is damaged: not valid JSON ({err})") from None
    except OSError as err:
        raise UserError(f"{config_path} cannot be read ({err.strerror or err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict) or config.get("script") not in SCRIPTS:
        raise UserError(f"{config_path} is not a training run's config (no 'script' and 'args')")
    if script is not None and config["script"] != script:
        raise UserError(f"{run_dir} is a {config['script']!r} run, not a {script.upper()} run ({made_by})")
    return config


def run_namespace(run_dir, script: str, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A run's settings as the Namespace its script's `parser` would give: config.json's args over the parser's
    defaults, so a flag added to the script since the run was made has its default rather than being missing."""
    args = parser.parse_args([])
    vars(args).update(read_run_config(run_dir, script)["args"])
    return args


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


def read_step_rows(path: Path, up_to_step: int) -> list[dict]:
    """The rows of steps.csv up to a global step (raw strings, as csv reads them): on resume, later rows would be
    written again."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("global_step", "").isdigit()
                and int(row["global_step"]) <= up_to_step]
