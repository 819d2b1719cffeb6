"""Resuming a run: find the newest checkpoint this run can continue from (or --init-from's), check that it belongs
to this script, experiment, model, data and number of processes, and put it into the job and the loop.

Restore is the half of loop.Run that reads checkpoints back; Run (loop.py) writes them. It is a mixin so that Run
reads as the loop. It uses Run's plan, script, position (metrics, epoch, global_step) and log.
"""
from __future__ import annotations

import math

from .checkpoints import load_checkpoint, load_newest_checkpoint, one_line, set_rng_state
from .data import describe_data
from .devices import precision_name
from .errors import UserError
from .files import checksum_path
from .runs import settings_differ


class Restore:
    """Run's restore: `_restore(job)` loads the newest usable checkpoint and returns where training continues."""

    # Entries of the loop's part of a checkpoint that a resume cannot do without (a file that lacks one is
    # incomplete: cut short by an older version, or not written by this loop).
    LOOP_KEYS = ("epoch", "step_in_epoch", "global_step", "metrics", "rng")

    def _restore(self, job) -> tuple[int, int, float]:
        """Load the newest usable checkpoint (or --init-from's) into `job` and the loop; (epoch, step, elapsed)."""
        def check(ckpt, same_experiment=True) -> str | None:
            if not isinstance(ckpt, dict):
                return f"holds a {type(ckpt).__name__}, not a checkpoint"
            if ckpt.get("script", self.script) != self.script:
                return f"is a {ckpt['script']} checkpoint, not a {self.script} one"
            differing = settings_differ(ckpt.get("experiment", {}), self.plan.experiment) if same_experiment else []
            if differing:
                return f"belongs to another experiment ({'; '.join(differing)})"
            present = set(ckpt) | set(ckpt["per_rank"][0] if "per_rank" in ckpt else ())
            missing = sorted(set(job.state_dict()) - present)
            if missing:
                return f"lacks {', '.join(missing)} (not a {self.script} checkpoint)"
            missing = [key for key in self.LOOP_KEYS if key not in present]
            if missing:
                return f"lacks {', '.join(missing)} (incomplete: written by an older version?)"
            try:  # the trial: a checkpoint that does not fit this model is damaged for this run
                self._apply(job, ckpt, rank=0, quiet=True)
            except Exception as err:  # size mismatches (RuntimeError), a wrong entry's type or shape ...
                return f"does not fit this model ({type(err).__name__}: {one_line(err)})"
            return None

        if self.plan.init_from:
            found = self._on_main(lambda: (load_checkpoint(self.plan.init_from, lambda c: check(c, False)), None))
        else:
            found = self._on_main(lambda: load_newest_checkpoint(self.dir, log=self.log, check=check))
        if found is None:
            return 0, 0, 0.0
        ckpt, self.good_ckpt = found
        self.good_ckpt_verified = bool(self.good_ckpt and checksum_path(self.good_ckpt).exists())
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"the checkpoint in {self.dir} was written by {saved_world} process(es); resume it with "
                            f"the same number (torchrun --nproc_per_node {saved_world}, or plain python for 1)")
        if not self.plan.init_from:
            self._check_same_data(ckpt.get("data"))
        self._apply(job, ckpt, rank=self.rank)
        self.metrics, self.best_fid = ckpt["metrics"], ckpt.get("best_fid", math.inf)
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        if ckpt.get("precision", precision_name(job.amp)) != precision_name(job.amp):  # --amp changed, or auto chose
            self.log(f"note: the checkpoint was trained in {ckpt['precision']}, this start trains in "
                     f"{precision_name(job.amp)} (--amp {self.config.get('amp')}): the numbers differ from here on")
        source = f" from {self.plan.init_from}" if self.plan.init_from else ""
        self.log(f"resumed at epoch {ckpt['epoch'] + 1}, step {ckpt['step_in_epoch']}/{self.steps_per_epoch}{source}")
        return ckpt["epoch"], ckpt["step_in_epoch"], ckpt.get("epoch_elapsed_s", 0.0)

    def _apply(self, job, ckpt: dict, rank: int, quiet: bool = False) -> None:
        """Put a checkpoint's state into the job and the random number generators (`rank`'s own entries); `quiet`
        for the trial load, whose notes the real one repeats."""
        if "per_rank" in ckpt:
            ckpt = {**ckpt, **ckpt["per_rank"][rank]}
        job.load_state_dict(ckpt)
        set_rng_state(ckpt["rng"], log=(lambda _: None) if quiet else self.log)

    def _check_same_data(self, saved: dict | None) -> None:
        """A resume trains on the data its checkpoint was trained on, or it is not the same run any more (another
        epoch order, wrong images_seen). Checkpoints from before the data was recorded are not checked."""
        if not saved or self.config.get("allow_other_data"):
            return
        same = (saved.get("dataset"), saved.get("images"), saved.get("fingerprint")) == \
            (self.data["dataset"], self.data["images"], self.data["fingerprint"])
        if not same:
            raise UserError(f"refusing to resume {self.dir} on other training data: its checkpoint was trained on "
                            f"{describe_data(saved)}, this start has {describe_data(self.data)}. Point --data-dir "
                            f"at the data the run used, or add --allow-other-data to continue on these images")
