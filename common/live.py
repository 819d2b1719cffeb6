"""The live view of a run: TensorBoard events in RUN_DIR/tb/, written by rank 0 as each CSV row is appended
(docs/operations.md, "The live view", lists the tags). Tags start with config.json's "script" (vae or dcgan): no
chart mixes the two models, whose steps and losses are on different scales. The CSVs stay the record: without the
`tensorboard` package, or when the events cannot be written (a full disk), the run logs one line and trains on.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .errors import UserError
from .readers import read_metrics_csv, read_run_config

TB_FOLDER = "tb"
NOT_SCALARS = {"epoch", "global_step", "images_seen"}  # x values, not quantities to plot
FLUSH_SECONDS = 30


class LiveView:
    """TensorBoard events of one run; every method does nothing when the view is off (other ranks, no package)."""

    def __init__(self):
        self.writer, self.log, self.group = None, print, "run"

    def open(self, run_dir: Path, *, global_step: int, steps_per_epoch: int, settings: dict,
             metric_columns: list[str], metrics: list[dict], log) -> None:
        """Start writing RUN_DIR/tb/. `global_step`: where training stands (the checkpoint's step, 0 when new).
        A folder without events yet (a run started before this existed, or --init-from) gets the rows so far:
        `metrics` (metrics.csv's) and RUN_DIR/steps.csv's."""
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:  # torch's module needs the tensorboard package, which is optional
            log("no live view: the tensorboard package is not installed (pip install tensorboard); the CSVs are "
                "written as always")
            return
        folder, self.log = Path(run_dir) / TB_FOLDER, log
        with contextlib.suppress(UserError):  # no config.json (a test's bare folder): one group all the same
            self.group = read_run_config(run_dir, None)["script"]
        backfill = not list(folder.glob("events.out.tfevents.*"))
        try:
            # purge_step: events at or after it, from an earlier process, are dropped by TensorBoard's reader. The
            # checkpoint at `global_step` was written after that step's rows, so those are kept; a start from step 0
            # (a new run, a crash before the first checkpoint, --restart) drops them all.
            self.writer = SummaryWriter(str(folder), purge_step=global_step + 1 if global_step else 0,
                                        flush_secs=FLUSH_SECONDS)
            # the settings beside the epoch metrics, in this run's own file (SummaryWriter.add_hparams makes a sub-run)
            plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in sorted(settings.items())}
            epoch_tags = [f"{self.group}/epoch/{c}" for c in metric_columns if c not in NOT_SCALARS]
            for summary in hparams(plain, dict.fromkeys(epoch_tags)):
                self.writer.file_writer.add_summary(summary)
        except Exception as err:  # noqa: BLE001  (a folder it cannot write: the run goes on without the view)
            self._give_up(err)
            return
        if backfill:
            for row in metrics:
                self.row("epoch", row, int(row["epoch"]) * steps_per_epoch)
            for row in read_metrics_csv(Path(run_dir) / "steps.csv"):
                self.row("steps", row, row.get("global_step"))
        log(f"live view: TensorBoard events in {folder} (make tensorboard, or tensorboard --logdir {folder})")

    def row(self, kind: str, row: dict, step) -> None:
        """One CSV row as scalars `SCRIPT/kind/<column>` at `step`; blank or non-numeric cells are left out."""
        if self.writer is None or step is None:
            return
        try:
            for key, value in row.items():
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    continue
                if key not in NOT_SCALARS and math.isfinite(value):
                    self.writer.add_scalar(f"{self.group}/{kind}/{key}", value, int(step))
        except Exception as err:  # noqa: BLE001  (the writer's thread failed: a full disk, a vanished folder)
            self._give_up(err)

    def images(self, paths: dict[str, Path], step: int) -> None:
        """PNG grids (tag -> file) at `step`, as saved (the same pixels as samples/)."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image  # not torchvision.io: its image decoding is deprecated since torchvision 0.29
        try:
            for tag, path in paths.items():
                if path.exists():
                    pixels = np.asarray(Image.open(path).convert("RGB"))
                    self.writer.add_image(f"{self.group}/samples/{tag}", pixels, step, dataformats="HWC")
            self.writer.flush()  # once per epoch: a watcher sees the epoch's points and grids now
        except Exception as err:  # noqa: BLE001
            self._give_up(err)

    def close(self, quiet: bool = False) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception as err:  # noqa: BLE001
            if not quiet:  # after _give_up's line: nothing more to say
                self.log(f"live view: the last TensorBoard events could not be written ({err})")

    def _give_up(self, err: Exception) -> None:
        """One line, and no more events from this process; training goes on (the CSVs are the record)."""
        self.log(f"live view stopped: cannot write TensorBoard events ({type(err).__name__}: {err}); the run and "
                 f"its CSVs are unaffected")
        self.close(quiet=True)
