"""The training loop: a script's TrainingJob (its models, optimisers and steps) run by Run, which restores the
newest checkpoint (restore.py), takes the steps, ends the epochs, saves, and stops cleanly on a signal.

Run.train raises Preempted (exit 75) after a stop signal and its checkpoint, StoppedAtStartup (exit 76) for a
signal before the first step, UserError (exit 2) for anything the user can fix; errors.run_main maps them to exit
codes.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import stop_signals
from .checkpoints import link_checkpoint, remove_checkpoint, rng_state, write_checkpoint
from .data import data_identity, epoch_permutation, full_batches
from .devices import any_rank, broadcast_object, precision_name, shard
from .errors import Preempted, StoppedAtStartup, UserError
from .files import atomic_write_text, write_csv
from .folder import RunFolder
from .live import LiveView
from .progress import Progress, still_running
from .readers import list_checkpoints
from .restore import Restore
from .runs import RunPlan


class TrainingJob:
    """What a training script hands to Run.train: its models and optimisers, and the steps of its loop.

    state_dict() / load_state_dict() are the one place where what a checkpoint holds for the script is listed
    (Run adds the loop's own position, metrics and RNG). The other methods are the named steps of the loop.
    """
    n_images: int                 # size of the training set (one epoch)
    train_images: torch.Tensor    # the training set (its identity is recorded in each checkpoint)
    device: torch.device
    amp: torch.dtype | None = None  # the autocast dtype of the training steps (None: float32); in each checkpoint
    best_column: str | None = None  # a metrics column (lower is better) whose best epoch is kept as best.pt
    divergence_hint = "a lower learning rate"  # what to change after a non-finite loss
    live_images: dict[str, str] = {}  # TensorBoard image tag -> the samples/ file of an epoch ("x_{epoch:03d}.png")

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def on_start(self, run: Run, global_step: int) -> None:
        """Called once per start, after the checkpoint (if any) is loaded."""

    def train_step(self, batch: torch.Tensor, global_step: int, epoch_progress: float) -> dict:
        """One optimiser step on the training images at `batch` (indices, always a full batch). Returns the numbers
        to show, as 0-d tensors (only turned into Python numbers, a GPU sync, when shown)."""
        raise NotImplementedError

    def running_sums(self) -> list[torch.Tensor]:
        """The sums of the losses the steps add to (per epoch, per log window). A NaN or inf stays in a sum until
        it is reset, so Run checks them at each boundary (a log window, an epoch end, a checkpoint), not every
        step; a non-finite one stops the run. Reset them only in log_window and end_epoch (after the check)."""
        raise NotImplementedError

    def log_window(self, run: Run, global_step: int) -> None:
        """Called every --log-every steps (after the non-finite check): e.g. a row of steps.csv."""

    def end_epoch(self, run: Run, epoch: int) -> dict:
        """The epoch's own metric columns (means, evaluation), sample grids; resets per-epoch sums."""
        raise NotImplementedError

    def summary(self, row: dict) -> str:
        """The short, aligned part of the per-epoch log line (the full row is in metrics.csv)."""
        raise NotImplementedError

    def export(self, folder: Path) -> list[Path]:
        """Write the model files a grader loads; returns their paths."""
        raise NotImplementedError


class Run(Restore, RunFolder):
    """A run folder (RunFolder) and the training loop's bookkeeping: steps, epoch ends, saves, stops; the restore
    from a checkpoint is Restore's (restore.py)."""

    # Entries of a checkpoint that differ between processes under torchrun: saved once per rank, and each rank
    # gets its own back on resume. Everything else (weights, optimiser, metrics) is the same on every rank.
    PER_RANK_KEYS = ("rng", "epoch_sums", "window_sums")

    def __init__(self, plan: RunPlan, *, script: str, device: torch.device, metric_columns: list[str],
                 ckpt_every_min: float, keep_ckpts: int, milestone_every: int, log_every: int,
                 mirror_dir: str | None, config: dict):
        super().__init__(plan, script=script, device=device, config=config, mirror_dir=mirror_dir)
        self.metric_columns = metric_columns
        self.ckpt_every_s, self.keep_ckpts, self.milestone_every = ckpt_every_min * 60, keep_ckpts, milestone_every
        self.log_every = log_every
        self.preempted_by: str | None = None  # the loop's decision, taken (by all ranks together) at boundaries
        self.metrics: list[dict] = []
        self.best_fid = math.inf
        self.epoch = self.global_step = 0     # where training stands (after train(): where it ended)
        self.steps_per_epoch = self.images_per_epoch = 0  # set by train() from the data set and the batch size
        self._finite_through = 0  # the global step up to which the running sums were checked finite
        self.data: dict = {}                  # the training data's identity (data.data_identity), in each checkpoint
        self.good_ckpt: Path | None = None    # the newest checkpoint of this run known intact (loaded or written)
        self.good_ckpt_verified = False       # ... and whether a checksum vouches for it
        self.live = LiveView()                # TensorBoard events in RUN_DIR/tb/ (live.py), opened by train()

    # -- the training loop ----------------------------------------------------------------------------------------
    def train(self, job: TrainingJob, *, epochs: int, batch_size: int, seed: int) -> None:
        """Train `job` up to `epochs`, from the newest checkpoint if there is one. The data order of each epoch is
        a pure function of (seed, epoch), so a resumed run takes exactly the steps an uninterrupted one would.
        Every step is a full batch (fixed shapes: CUDA graphs, no recompiles): the last n_images % batch_size
        images of each epoch's order are left out of that epoch (a different few each epoch)."""
        self.steps_per_epoch = full_batches(job.n_images, batch_size)
        self.images_per_epoch = self.steps_per_epoch * min(batch_size, job.n_images)
        self.data = data_identity(self.config.get("dataset"), job.train_images, self.config.get("data_dir"))
        start_epoch, start_step, elapsed = self._restore(job)
        if start_epoch > epochs or (start_epoch == epochs and start_step):
            raise UserError(f"the newest checkpoint of {self.dir} is at epoch {start_epoch + 1}, step {start_step}, "
                            f"past --epochs {epochs}; drop --epochs (or raise it) to continue this run")
        self._finite_through = self.global_step  # a checkpoint's sums are finite (none is saved otherwise)
        job.on_start(self, self.global_step)
        if self._stop_requested():  # a signal while we imported torch, loaded data, built models: nothing to save
            again = "Re-run the same command to continue."
            if self.plan.new_folder and self.is_main:  # nothing in it but this start's config and log
                self._remove_folder = True
                again = f"Nothing was trained yet, so {self.dir} is removed; re-run the same command to start."
            self.log(f"stopped by {self.preempted_by} during start-up, before any training step; nothing new to "
                     f"save. {again}")
            raise StoppedAtStartup()
        # Only now, with a checkpoint loaded (or none to load) and training about to start, does the folder's record
        # change: a start refused or stopped before this point leaves config.json and metrics.csv as they were.
        if self.is_main:
            if self.plan.resuming:
                with self.writing("config.json", self.dir / "config.json"):
                    self._write_config()
            with self.writing("metrics.csv", self.metrics_path):  # exactly the checkpoint's rows: no repeated epoch
                write_csv(self.metrics_path, self.metric_columns, self.metrics)
        if self.is_main and not self.config.get("sweep"):  # sweep members never become "the" run of their script
            self._link_latest()
        if self.is_main:
            self.live.open(self.dir, global_step=self.global_step, steps_per_epoch=self.steps_per_epoch,
                           settings=self.plan.experiment, metric_columns=self.metric_columns, metrics=self.metrics,
                           log=self.log)
        if start_epoch >= epochs:
            self.log(f"run already finished ({start_epoch} of {epochs} epochs); raise --epochs to train longer")
        progress = Progress(steps_per_epoch=self.steps_per_epoch, total_steps=epochs * self.steps_per_epoch,
                            start_step=self.global_step, batch_size=batch_size, log_every=self.log_every,
                            log=self.log)
        for epoch in range(start_epoch, epochs):
            epoch_start = time.monotonic() - elapsed
            order = epoch_permutation(seed, epoch, job.n_images, job.device)
            progress.start_epoch(epoch, epochs)
            for step in range(start_step, self.steps_per_epoch):
                self.epoch, self.global_step = epoch, epoch * self.steps_per_epoch + step
                shown = job.train_step(shard(order[step * batch_size:(step + 1) * batch_size]), self.global_step,
                                       epoch + step / self.steps_per_epoch)
                self.global_step += 1
                progress.update(self.global_step, shown)
                if self.global_step % self.log_every == 0:
                    self._stop_if_non_finite(job)
                    job.log_window(self, self.global_step)
                self._step_boundary(lambda: self._state(job, epoch, step + 1, time.monotonic() - epoch_start))
            progress.end_epoch()
            self._stop_if_non_finite(job)  # reads the sums: waits for the device, so train_time is the steps' own
            self._end_epoch(job, epoch, epochs, train_time=time.monotonic() - epoch_start, epoch_start=epoch_start)
            start_step, elapsed = 0, 0.0

    def _end_epoch(self, job: TrainingJob, epoch: int, epochs: int, train_time: float, epoch_start: float) -> None:
        """Evaluate, append the metrics row, log one short line, save (a milestone too when due), and stop here if
        a signal came during the evaluation (the epoch-end checkpoint holds everything)."""
        self._stop_if_non_finite(job)
        with still_running("the epoch's evaluation", self.log):  # FID on a CPU takes minutes: no silence
            columns = job.end_epoch(self, epoch)
        # images_seen adds up: --allow-other-data may change the number of images from one start to the next
        seen_before = self.metrics[-1].get("images_seen", epoch * self.images_per_epoch) if self.metrics else 0
        row = {"epoch": epoch + 1, "images_seen": seen_before + self.images_per_epoch, **columns,
               "train_time_s": train_time, "epoch_time_s": time.monotonic() - epoch_start}
        self.metrics.append(row)
        self.append_csv(self.metrics_path, self.metric_columns, row)
        self.epoch, self.global_step = epoch + 1, (epoch + 1) * self.steps_per_epoch
        grids = {tag: self.samples_dir / name.format(epoch=epoch + 1) for tag, name in job.live_images.items()}
        self.live.images(grids, self.global_step)
        self.log(f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}  {job.summary(row)}  "
                 f"({row['epoch_time_s']:.0f} s)")
        value = row.get(job.best_column) if job.best_column else None
        is_best = isinstance(value, float) and math.isfinite(value) and value < self.best_fid
        if is_best:
            self.best_fid = value
        every = self.milestone_every or max(1, epochs // 5)
        path = self._save(self._state(job, epoch + 1, 0, 0.0),
                          milestone=(epoch + 1) % every == 0 or epoch + 1 == epochs, best=is_best)
        if is_best:
            self.log(f"best {job.best_column} so far ({value:.2f}): checkpoints/best.pt")
        if self.preempted_by:
            raise self._preempted(path)

    def _state(self, job: TrainingJob, epoch: int, step: int, elapsed: float) -> dict:
        """The whole checkpoint: the job's state and the loop's position. Never built after a non-finite loss."""
        self._stop_if_non_finite(job)
        return {"script": self.script, "experiment": self.plan.experiment, "epoch": epoch, "step_in_epoch": step,
                "global_step": epoch * self.steps_per_epoch + step, "metrics": self.metrics, "best_fid": self.best_fid,
                "epoch_elapsed_s": elapsed, "precision": precision_name(job.amp), "rng": rng_state(), "data": self.data,
                **job.state_dict()}

    def append_csv(self, path: Path, columns: list[str], row: dict) -> None:
        """A row of metrics.csv or steps.csv, also shown live (TensorBoard) at its training step."""
        super().append_csv(path, columns, row)
        self.live.row("epoch" if path == self.metrics_path else path.stem, row,
                      row.get("global_step", self.global_step))

    def __exit__(self, *exc_info) -> bool:
        self.live.close()
        return super().__exit__(*exc_info)

    # -- non-finite losses ----------------------------------------------------------------------------------------
    def _stop_if_non_finite(self, job: TrainingJob) -> None:
        """A NaN poisons every later step, so the run stops at the first check after one, and nothing after it is
        saved. The check reads the job's running sums (one GPU sync): at every --log-every steps, each epoch end
        and before every checkpoint, so it names the steps since the last check."""
        sums = job.running_sums()
        finite = bool(torch.isfinite(torch.cat([s.reshape(-1) for s in sums])).all()) if sums else True
        if not any_rank(not finite):  # all ranks decide together
            self._finite_through = self.global_step
            return
        first, last = self._finite_through, self.global_step - 1  # 0-based global steps of the window
        epoch, step = divmod(first, self.steps_per_epoch)
        steps = f"step {step + 1}" if first == last else f"steps {step + 1}-{last - epoch * self.steps_per_epoch + 1}"
        where = f"epoch {epoch + 1}, {steps}" if not finite else "another rank"
        # Named only when this run wrote it or loaded it: a file merely lying in checkpoints/ may be a damaged one.
        if self.good_ckpt is not None:
            which = ("The newest good checkpoint" if self.good_ckpt_verified else
                     "The newest checkpoint (written before checksums, so unverified)")
            way = (f"{which}, {self.good_ckpt}, is untouched: continue from it in a new run with other settings: "
                   f"python {self.script}_train.py --init-from {self.dir} plus {job.divergence_hint}")
        else:
            way = f"No checkpoint was written before it: start a new run with {job.divergence_hint}"
        raise UserError(f"non-finite loss at {where}; stopped without saving. {way}.")

    # -- checkpoints and stops ------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Turn the handler's flag into the loop's decision. The flag is read once: a signal landing between the
        ranks' agreement and their `if` would otherwise send one rank to save while the others train on (and
        wait for each other in different collectives forever). A later signal is seen at the next boundary."""
        raw = stop_signals.received
        if any_rank(raw is not None):
            self.preempted_by = raw or "a signal to another rank"
        return self.preempted_by is not None

    def _step_boundary(self, make_state) -> None:
        """Between optimiser steps: save when a checkpoint is due; after a signal, save and stop.
        `make_state` builds the checkpoint only when one is written, so the common case costs nothing."""
        due = time.monotonic() - self.last_save >= self.ckpt_every_s
        if self.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
            due = bool(broadcast_object(due))
        if self._stop_requested() or due:
            path = self._save(make_state())
            if self.preempted_by:
                raise self._preempted(path)

    def _preempted(self, path: Path) -> Preempted:
        self.log(f"stopped by {self.preempted_by}; checkpoint {path.name} written. "
                 f"Re-run the same command (or use --resume {self.dir}) to continue.")
        return Preempted()

    def _save(self, state: dict, milestone: bool = False, best: bool = False) -> Path:
        """Write `state` as checkpoints/step-<global_step>.pt atomically, with its checksum, keep only the newest
        --keep-ckpts, and link it as epoch-NNN.pt (milestone) or best.pt: rotation never removes those.

        Under torchrun every rank calls this at the same step: the per-rank entries are gathered, rank 0 writes,
        and all ranks agree on whether a signal arrived (so they all stop at the same step).
        """
        path = self.ckpt_dir / f"step-{state['global_step']:010d}.pt"
        state = {**state, "world_size": self.world_size}
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, {k: state.pop(k) for k in self.PER_RANK_KEYS if k in state})
            state["per_rank"] = gathered
        self._stop_requested()
        if self.is_main:
            buffer = io.BytesIO()  # serialised in memory: a full disk then fails in write(), with a clear errno
            torch.save(state, buffer)
            with self.writing("a checkpoint", path):
                write_checkpoint(path, buffer.getbuffer())
                links = ([f"epoch-{state['epoch']:03d}.pt"] if milestone else []) + (["best.pt"] if best else [])
                for name in links:
                    link_checkpoint(path, self.ckpt_dir / name)
                for old in list_checkpoints(self.dir)[self.keep_ckpts:]:
                    remove_checkpoint(old)
            self.sync_mirror()
        self.good_ckpt, self.good_ckpt_verified = path, True
        self.last_save = time.monotonic()
        return path

    def export(self, job: TrainingJob) -> None:
        """Write the model files from the state training ended in (the newest checkpoint's), unless export.json
        says they already hold exactly that step. A kill during an export, or more --epochs, re-exports."""
        if not self.is_main:
            return
        record = self.dir / "export.json"
        try:
            done = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("global_step") == self.global_step and all((self.dir / f).exists() for f in done["files"]):
            return
        with self.writing("the exported model", self.dir):
            files = job.export(self.dir)
            atomic_write_text(record, json.dumps({"epoch": self.epoch, "global_step": self.global_step,
                                                  "files": [f.name for f in files]}, indent=2) + "\n")
        self.log(f"exported {', '.join(f.name for f in files)} (epoch {self.epoch}, step {self.global_step})")
        self.sync_mirror()


def open_run(plan: RunPlan, *, script: str, device: torch.device, metric_columns: list[str]) -> Run:
    """The Run for a training script's flags (add_run_args): each setting handed over by name, here only."""
    args = plan.args
    return Run(plan, script=script, device=device, metric_columns=metric_columns, config=vars(args),
               ckpt_every_min=args.ckpt_every_min, keep_ckpts=args.keep_ckpts, milestone_every=args.milestone_every,
               log_every=args.log_every, mirror_dir=args.mirror_dir)
