"""What a training script's own loop calls at its boundaries, so that a run stopped at any moment continues exactly
where it stopped: `restore` (where to start), `step_done` (after each optimiser step), `epoch_done` (after the
epoch's evaluation), `export`; and `Meter`, the named running means the loop adds to.

    state = dict(model=model, optimizer=optimizer, scaler=scaler, meter=meter)   # what a checkpoint holds
    with Run(plan, script="vae", device=device, images=train_images, meter=meter) as run:
        start_epoch, start_step = run.restore(state)          # loaded in place; where to continue
        for epoch in range(start_epoch, args.epochs):
            for step in range(start_step if epoch == start_epoch else 0, run.steps_per_epoch):
                ...  # the script's step
                meter.add(loss=loss)                          # a named running mean (on the device)
                run.step_done(state)                          # non-finite check, save if due or signalled, stop
            run.epoch_done(state, {"test_loss": ...})         # metrics row, log line, checkpoint, milestone
        run.export({"VAE_model.pth": model})

Nothing here calls back into a script. Run raises Preempted (exit 75) after a stop signal and its checkpoint,
StoppedAtStartup (76) for a signal before the first step, UserError (2) for anything the user can fix;
errors.run_main turns them into exit codes. Under torchrun every rank calls the same methods at the same steps;
rank 0 alone writes.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import stop_signals
from .checkpoints import (load_checkpoint, load_newest_checkpoint, load_state, refusal, rng_state, set_rng_state,
                          state_dicts, warm_start, write_checkpoint)
from .data import check_same_data, data_identity, full_batches
from .devices import all_reduce_sum, amp_dtype, any_rank, broadcast_object, describe, precision_name
from .errors import Preempted, StoppedAtStartup, UserError
from .files import checksum_path
from .folder import RunFolder
from .progress import Progress
from .runs import RunPlan


class Meter:
    """Named running means of a step's numbers: `meter.add(loss_d=loss_d, d_real=d_real)`, each a 0-d tensor.

    A name is new the first time it is added; from then on it has a column in metrics.csv (the epoch's mean) and
    steps.csv (the mean over each --log-every window), a place in the progress line and in TensorBoard. The sums
    stay on the device (an add is one cat and one add, never a host sync); they are read at log windows and epoch
    ends, where Run also checks them: a NaN or inf stays in a sum until the epoch ends, so it is never missed.
    Checkpointed (a resumed epoch reports the same means), and per process under torchrun.
    """

    def __init__(self, device: torch.device):
        self.names: list[str] = []
        # float32, the steps' own dtype: a float64 sum would cost a conversion at every add (4 ops), and float32
        # sums of an epoch's step means (a few thousand) keep 6 to 7 significant digits.
        self.sums = torch.zeros(0, device=device)  # this epoch's, per name
        self.window_start = torch.zeros(0, device=device)  # the sums when the --log-every window began
        self.counts: list[int] = []  # adds per name this epoch (Python ints: counting costs no device op)
        self.window_counts: list[int] = []  # ... when the window began
        self.shown: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (its last add, index): read when displayed
        self._where: dict[tuple, tuple] = {}  # the names of an add -> (where they are added to, their positions)

    @torch.no_grad()
    def add(self, **values: torch.Tensor) -> None:
        names = tuple(values)
        if names not in self._where:
            self._locate(names)
        target, positions = self._where[names]
        # One cat of views: the fewest ops (each is a kernel launch on a GPU); a stack would add 2 per value.
        step = torch.cat([(v if isinstance(v, torch.Tensor) else torch.tensor(v, device=self.sums.device)).view(1)
                          for v in values.values()])  # a Python number goes where the sums are (a GPU)
        if target.dtype == torch.int64:  # columns apart (names added in another order than first seen)
            self.sums.index_add_(0, target, step.to(self.sums.dtype))
        else:
            target += step  # a view of the sums: added in place
        for i, (name, position) in enumerate(zip(names, positions)):
            self.counts[position] += 1
            self.shown[name] = (step, i)

    def _locate(self, names: tuple) -> None:
        """Columns for new names; where an add of `names` goes: a view of adjacent columns, else their indices."""
        new = [name for name in names if name not in self.names]
        if new:
            self.names += new
            self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            self.window_start = torch.cat([self.window_start, self.window_start.new_zeros(len(new))])
            self.counts += [0] * len(new)
            self.window_counts += [0] * len(new)
            self._where = {}  # the views were of the old tensor
        positions = [self.names.index(name) for name in names]
        first = positions[0]
        if positions == list(range(first, first + len(names))):
            self._where[names] = (self.sums[first:first + len(names)], positions)
        else:
            self._where[names] = (torch.tensor(positions, device=self.sums.device), positions)

    def means(self, window: bool = False) -> dict:
        """The epoch's means so far (or the --log-every window's) over every process; a name not added: nan."""
        sums = self.sums - self.window_start if window else self.sums.clone()
        counts = [n - w for n, w in zip(self.counts, self.window_counts)] if window else self.counts
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {name: total / (n * world) if n else math.nan
                for name, total, n in zip(self.names, all_reduce_sum(sums).tolist(), counts)}

    def next_window(self) -> None:
        self.window_start.copy_(self.sums)
        self.window_counts = list(self.counts)

    def next_epoch(self) -> None:
        self.sums.zero_()
        self.window_start.zero_()
        self.counts, self.window_counts = [0] * len(self.names), [0] * len(self.names)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sums).all())

    def state_dict(self) -> dict:
        return {"names": list(self.names), "sums": self.sums.detach().cpu().clone(),
                "window_start": self.window_start.detach().cpu().clone(),
                "counts": torch.tensor([self.counts, self.window_counts], dtype=torch.int64).reshape(2, -1)}

    def load_state_dict(self, state: dict) -> None:
        device = self.sums.device
        self.names = list(state["names"])
        self.sums, self.window_start = state["sums"].to(device), state["window_start"].to(device)
        self.counts, self.window_counts = state["counts"].tolist()
        self._where, self.shown = {}, {}

    def latest(self) -> dict:
        """The last value added under each name, as numbers (a host sync: for the progress line only)."""
        return {name: float(step[i]) for name, (step, i) in self.shown.items()}


class Run:
    """One training run in its folder, owned by this process: the lock, config.json, log.txt, the checkpoints, the
    metrics, the live view. Use as a context manager: entering takes (or makes) the folder and locks it; leaving
    closes its files and puts the previous signal handlers back."""

    # Checkpoint entries that differ between processes under torchrun: saved once per rank, each rank gets its own
    # back (the meter's sums are per process too). Everything else is the same on every rank.
    PER_RANK_KEYS = ("rng",)

    def __init__(self, plan: RunPlan, *, script: str, device: torch.device, images: torch.Tensor, meter: Meter,
                 best_column: str | None = None, divergence_hint: str = "a lower learning rate"):
        args = plan.args
        self.plan, self.args, self.script, self.device, self.meter = plan, args, script, device, meter
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0  # under torchrun only rank 0 writes anything
        if args.batch_size % self.world_size or args.batch_size < 2 * self.world_size:
            # Equal shares make the mean of the ranks' mean gradients the batch's mean gradient; batch norm needs
            # two images in a share.
            raise UserError(f"--batch-size {args.batch_size} cannot be split over {self.world_size} processes "
                            f"(torchrun --nproc_per_node): each takes an equal share of at least 2 images; use a "
                            f"multiple of {self.world_size}, at least {2 * self.world_size}")
        self.best_column, self.divergence_hint = best_column, divergence_hint
        self.steps_per_epoch = full_batches(len(images), args.batch_size)
        self.images_per_epoch = self.steps_per_epoch * min(args.batch_size, len(images))
        self.data = data_identity(args.dataset, images, args.data_dir)  # in each checkpoint
        self.precision = precision_name(amp_dtype(args.amp, device))
        self.environment = describe(device, self.precision)
        self.folder = RunFolder(plan, script=script, environment=self.environment, world_size=self.world_size,
                                is_main=self.is_main)
        self.log, self.dir = self.folder.log, plan.dir
        self.metrics: list[dict] = []
        self.best = math.inf
        self.epoch = self.global_step = 0  # where training stands
        self.good_ckpt: Path | None = None  # the newest checkpoint of this run known intact (loaded or written)
        self.good_ckpt_verified = False     # ... and whether a checksum vouches for it
        self.preempted_by: str | None = None
        self._finite_through = 0  # the global step up to which the meter was checked finite
        self.progress = None
        self.last_save = self._epoch_start = self._train_end = time.monotonic()

    @property
    def samples_dir(self) -> Path:
        return self.dir / "samples"

    # -- entering and leaving -------------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        stop_signals.install()  # the training scripts call it at their first line; here for any other caller
        self.dir = self.folder.dir = Path(self._on_main(self.folder.take))  # rank 0's (a new one's name: the time)
        return self

    def __exit__(self, *exc_info) -> bool:
        self.folder.close()
        stop_signals.restore()
        return False

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

    # -- restore: where the loop starts ---------------------------------------------------------------------------
    def restore(self, state: dict) -> tuple[int, int]:
        """Load the newest usable checkpoint (or --init-from's) into `state`'s objects in place, and get the
        folder ready to train: config.json, metrics.csv and steps.csv as of that checkpoint, the latest links, the
        live view. Returns (epoch, step within it) to continue from; (0, 0) for a new run."""
        ckpt = self._on_main(lambda: self._find_checkpoint(state))
        if ckpt is not None:
            self._load(state, ckpt)
        step = self.global_step - self.epoch * self.steps_per_epoch
        if self.epoch > self.args.epochs or (self.epoch == self.args.epochs and step):
            raise UserError(f"the newest checkpoint of {self.dir} is at epoch {self.epoch + 1}, step {step}, past "
                            f"--epochs {self.args.epochs}; drop --epochs (or raise it) to continue this run")
        self._finite_through = self.global_step  # a checkpoint's sums are finite (none is saved otherwise)
        if self._stop_requested():  # a signal while we imported torch, loaded data, built models: nothing to save
            again = "Re-run the same command to continue."
            if self.plan.new_folder and self.is_main:  # nothing in it but this start's config and log
                self.folder.remove_on_close = True
                again = f"Nothing was trained yet, so {self.dir} is removed; re-run the same command to start."
            self.log(f"stopped by {self.preempted_by} during start-up, before any training step; nothing new to "
                     f"save. {again}")
            raise StoppedAtStartup()
        if self.is_main:  # only now does the folder's record change: a refused start leaves it as it was
            self.folder.start(self.metrics, self.global_step, self.steps_per_epoch)
        if self.epoch >= self.args.epochs:
            self.log(f"run already finished ({self.epoch} of {self.args.epochs} epochs); raise --epochs to train "
                     f"longer")
        self.progress = Progress(steps_per_epoch=self.steps_per_epoch, total_steps=self.args.epochs *
                                 self.steps_per_epoch, start_step=self.global_step, batch_size=self.args.batch_size,
                                 log_every=self.args.log_every, log=self.log)
        self.progress.start_epoch(self.epoch, self.args.epochs)
        # Mid-epoch, the epoch's time so far counts (a warm start of an edited model begins at step 0: none does).
        self._epoch_start = time.monotonic() - ((ckpt or {}).get("epoch_elapsed_s", 0.0) if step else 0.0)
        return self.epoch, step

    def _find_checkpoint(self, state: dict) -> dict | None:
        """The checkpoint to start from (rank 0): --init-from's file, else the run's newest intact one; damaged
        files are set aside, one that does not fit is refused in one line (nothing renamed)."""
        if self.plan.init_from:
            ckpt = load_checkpoint(self.plan.init_from, lambda c: refusal(c, state, self.script, self.dir))
            ckpt["source"] = str(self.plan.init_from)
            return ckpt
        found = load_newest_checkpoint(self.dir, log=self.log,
                                       check=lambda c: refusal(c, state, self.script, self.dir, self.plan.experiment))
        if found is None:
            return None
        ckpt, self.good_ckpt = found
        self.good_ckpt_verified = checksum_path(self.good_ckpt).exists()
        return ckpt

    def _load(self, state: dict, ckpt: dict) -> None:
        """Put a checkpoint (rank 0's, broadcast) into `state` and the loop, this rank's own entries and RNG."""
        if ckpt.get("world_size", 1) != self.world_size:
            raise UserError(f"the checkpoint in {self.dir} was written by {ckpt.get('world_size', 1)} process(es); "
                            f"resume it with the same number (torchrun --nproc_per_node {ckpt.get('world_size', 1)}"
                            f", or plain python for 1)")
        if "per_rank" in ckpt:
            ckpt = {**ckpt, **ckpt["per_rank"][self.rank]}
        source = ckpt.get("source")
        if source:
            not_loaded = warm_start(state, ckpt)
            if not_loaded:  # an edited model: a new run that starts from what fits
                self.log(f"--init-from {source}: loaded every tensor that fits; {len(not_loaded)} start fresh: "
                         f"{', '.join(not_loaded)}. The optimiser state, epoch and metrics start fresh too.")
                return
        else:
            if not self.args.allow_other_data:
                check_same_data(ckpt.get("data"), self.data, self.dir)
            load_state(state, ckpt)
        set_rng_state(ckpt["rng"], log=self.log)
        self.metrics, self.best = ckpt["metrics"], ckpt.get("best_fid", math.inf)
        self.epoch, self.global_step = ckpt["epoch"], ckpt["epoch"] * self.steps_per_epoch + ckpt["step_in_epoch"]
        if ckpt.get("precision", self.precision) != self.precision:  # --amp changed, or auto chose
            self.log(f"note: the checkpoint was trained in {ckpt['precision']}, this start trains in "
                     f"{self.precision} (--amp {self.args.amp}): the numbers differ from here on")
        self.log(f"resumed at epoch {ckpt['epoch'] + 1}, step {ckpt['step_in_epoch']}/{self.steps_per_epoch}"
                 f"{f' from {source}' if source else ''}")

    # -- the loop's boundaries ------------------------------------------------------------------------------------
    def step_done(self, state: dict) -> None:
        """After each optimiser step: the progress line; every --log-every steps the meter is checked for
        non-finite values and a steps.csv row written; a checkpoint when one is due (--ckpt-every-min) or a stop
        signal came, and after a signal, the stop (Preempted). Under torchrun the ranks agree on saves and stops
        once per --log-every window, not every step (two host syncs a step would cost more than a small step)."""
        self.global_step += 1
        self.progress.update(self.global_step, self.meter.latest)
        window_end = self.global_step % self.args.log_every == 0
        epoch_end = self.global_step % self.steps_per_epoch == 0
        if window_end or epoch_end:
            self._stop_if_non_finite()
        if window_end:
            self._step_row()
        if epoch_end:  # epoch_done saves, after the script's evaluation
            self.progress.end_epoch()
            self._train_end = time.monotonic()
            return
        if self.world_size > 1 and not window_end:
            return
        due = time.monotonic() - self.last_save >= self.args.ckpt_every_min * 60
        if self.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
            due = bool(broadcast_object(due))
        if self._stop_requested() or due:
            path = self._save(state)
            if self.preempted_by:
                raise self._preempted(path)

    def _step_row(self) -> None:
        """A row of steps.csv: the meter's means over the last --log-every steps."""
        row = {"global_step": self.global_step, "epoch": self.global_step / self.steps_per_epoch,
               "images_seen": self.global_step * min(self.args.batch_size, self.images_per_epoch),
               **self.meter.means(window=True)}
        self.meter.next_window()
        if self.is_main:
            self.folder.append_step_row(row)

    def epoch_done(self, state: dict, columns: dict, images: dict[str, Path] | None = None) -> None:
        """After the epoch's evaluation: its row in metrics.csv (epoch, images seen, the meter's epoch means, the
        script's `columns`, times), one log line, the epoch-end checkpoint (a milestone and best.pt when due), the
        sample grids `images` (TensorBoard tag -> file) in the live view; then the stop, if a signal came."""
        self._stop_if_non_finite()
        epoch, now = self.global_step // self.steps_per_epoch, time.monotonic()
        # images_seen adds up: --allow-other-data may change the number of images from one start to the next
        seen = self.metrics[-1].get("images_seen", (epoch - 1) * self.images_per_epoch) if self.metrics else 0
        row = {"epoch": epoch, "images_seen": seen + self.images_per_epoch, **self.meter.means(),
               **columns, "train_time_s": self._train_end - self._epoch_start, "epoch_time_s": now - self._epoch_start}
        self.meter.next_epoch()
        self.metrics.append(row)
        self.epoch = epoch
        if self.is_main:
            self.folder.write_metrics(self.metrics)
            self.folder.live.row("epoch", row, self.global_step)
            self.folder.live.images(images or {}, self.global_step)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and not k.endswith("_s"))
        self.log(f"epoch {epoch:>{len(str(self.args.epochs))}}/{self.args.epochs}  {shown}  "
                 f"({row['epoch_time_s']:.0f} s)")
        value = row.get(self.best_column) if self.best_column else None
        is_best = isinstance(value, float) and math.isfinite(value) and value < self.best
        self.best = value if is_best else self.best
        every = self.args.milestone_every or max(1, self.args.epochs // 5)
        path = self._save(state, milestone=epoch % every == 0 or epoch == self.args.epochs, best=is_best)
        if is_best:
            self.log(f"best {self.best_column} so far ({value:.4g}): checkpoints/best.pt")
        if self.preempted_by:
            raise self._preempted(path)
        self._epoch_start = time.monotonic()
        if epoch < self.args.epochs:
            self.progress.start_epoch(epoch, self.args.epochs)

    # -- non-finite losses ----------------------------------------------------------------------------------------
    def _stop_if_non_finite(self) -> None:
        """A NaN poisons every later step, so the run stops at the first check after one, and nothing after it is
        saved. The check reads the meter's sums (one GPU sync): every --log-every steps, at each epoch end and
        before every checkpoint, so it names the steps since the last check."""
        finite = self.meter.finite()
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
                   f"python {self.script}_train.py --init-from {self.dir} plus {self.divergence_hint}")
        else:
            way = f"No checkpoint was written before it: start a new run with {self.divergence_hint}"
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

    def _preempted(self, path: Path) -> Preempted:
        self.log(f"stopped by {self.preempted_by}; checkpoint {path.name} written. "
                 f"Re-run the same command (or use --resume {self.dir}) to continue.")
        return Preempted()

    def _checkpoint(self, state: dict) -> dict:
        """The whole checkpoint: the script's state and the loop's position. Never built after a non-finite loss."""
        self._stop_if_non_finite()
        step = self.global_step - self.epoch * self.steps_per_epoch
        return {**state_dicts(state), "script": self.script, "experiment": self.plan.experiment,
                "epoch": self.epoch, "step_in_epoch": step, "global_step": self.global_step,
                "metrics": self.metrics, "best_fid": self.best, "data": self.data, "precision": self.precision,
                "epoch_elapsed_s": time.monotonic() - self._epoch_start if step else 0.0, "rng": rng_state(),
                "world_size": self.world_size}

    def _save(self, state: dict, milestone: bool = False, best: bool = False) -> Path:
        """Write the checkpoint as checkpoints/step-<global_step>.pt atomically, with its checksum, keep only the
        newest --keep-ckpts, and link it as epoch-NNN.pt (milestone) or best.pt: rotation never removes those.

        Under torchrun every rank calls this at the same step: the per-rank entries (RNG, the meter) are gathered,
        rank 0 writes, and all ranks agree on whether a signal arrived (so they all stop at the same step)."""
        ckpt = self._checkpoint(state)
        path = self.dir / "checkpoints" / f"step-{self.global_step:010d}.pt"
        if self.world_size > 1:
            per_rank = [k for k in ckpt if k in self.PER_RANK_KEYS or isinstance(state.get(k), Meter)]
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, {k: ckpt.pop(k) for k in per_rank})
            ckpt["per_rank"] = gathered
        self._stop_requested()
        if self.is_main:
            buffer = io.BytesIO()  # serialised in memory: a full disk then fails in write(), with a clear errno
            torch.save(ckpt, buffer)
            links = ([f"epoch-{self.epoch:03d}.pt"] if milestone else []) + (["best.pt"] if best else [])
            with self.folder.writing("a checkpoint", path):
                write_checkpoint(path, buffer.getbuffer(), links=links, keep=self.args.keep_ckpts)
            self.folder.sync_mirror()
        self.good_ckpt, self.good_ckpt_verified = path, True
        self.last_save = time.monotonic()
        return path

    def export(self, models: dict, save) -> None:
        """The model files ({file name: model}, each written by `save(model, path)`) from the state training ended
        in, the newest checkpoint's; export.json records the epoch and step (folder.RunFolder.export)."""
        if self.is_main:
            self.folder.export(models, save, self.epoch, self.global_step)

