"""Progress of a run: a tqdm bar on a terminal, a line every --log-every steps (or 30 s) elsewhere."""
from __future__ import annotations

import contextlib
import time

import torch.distributed as dist

from .console import on_terminal


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Where the run is and when it will end, counted over the whole run (not just this epoch).

    On a terminal: a tqdm bar per epoch, with the run's ETA beside the losses. Otherwise (SLURM, nohup, tests):
    one line every `log_every` steps or every 30 seconds, whichever comes first, with elapsed time, images per
    second and the ETA of the epoch and of the run. Rates are measured over this start only.
    """

    PIPED_INTERVAL_S = 30

    def __init__(self, *, steps_per_epoch: int, total_steps: int, start_step: int, batch_size: int, log_every: int,
                 log):
        self.steps_per_epoch, self.total_steps, self.batch_size = steps_per_epoch, total_steps, batch_size
        self.log_every, self.log = log_every, log
        self.start_step, self.started = start_step, time.monotonic()
        self.last_line = self.started
        self.on_terminal = on_terminal() and (not dist.is_initialized() or dist.get_rank() == 0)
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.desc = f"epoch {epoch + 1}/{epochs}"
        self.epoch_start_step = epoch * self.steps_per_epoch
        if self.on_terminal:
            from tqdm import tqdm
            done = max(0, self.start_step - self.epoch_start_step)
            with self._terminal_may_go():
                self.bar = tqdm(total=self.steps_per_epoch, initial=min(done, self.steps_per_epoch),
                                desc=self.desc, dynamic_ncols=True, leave=False)

    @contextlib.contextmanager
    def _terminal_may_go(self):
        """The bar writes to the terminal: when that is gone (an SSH session dropped), training goes on with the
        log lines instead (they reach log.txt)."""
        try:
            yield
        except (OSError, ValueError):
            self.bar, self.on_terminal = None, False

    def _eta(self, global_step: int) -> tuple[float, float, float]:
        """(elapsed s, images/s, seconds per step) over this start."""
        elapsed = time.monotonic() - self.started
        steps = max(1, global_step - self.start_step)
        return elapsed, steps * self.batch_size / max(elapsed, 1e-9), elapsed / steps

    def update(self, global_step: int, values) -> None:
        """`global_step` counts steps done; `values()` gives the numbers to show (a GPU sync), called only when a
        line or the bar's numbers are shown."""
        step = global_step - self.epoch_start_step
        if self.bar is not None:
            with self._terminal_may_go():
                self.bar.update(1)
                if step % 10 == 0 or step == self.steps_per_epoch:
                    _, _, per_step = self._eta(global_step)
                    self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in values().items()},
                                          "run ETA": _clock(per_step * (self.total_steps - global_step))})
            return
        now = time.monotonic()
        if step % self.log_every and now - self.last_line < self.PIPED_INTERVAL_S:
            return
        self.last_line = now
        elapsed, rate, per_step = self._eta(global_step)
        losses = " ".join(f"{k} {v:.4g}" for k, v in values().items())
        self.log(f"{self.desc} step {step}/{self.steps_per_epoch} | {losses} | {_clock(elapsed)} elapsed, "
                 f"{rate:,.0f} img/s, epoch ETA {_clock(per_step * (self.steps_per_epoch - step))}, "
                 f"run ETA {_clock(per_step * (self.total_steps - global_step))}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            with self._terminal_may_go():
                self.bar.close()
            self.bar = None


class still_running:
    """A line every `every` seconds while a long step runs (t-SNE, the IW estimate, FID, ...), so a terminal or a
    SLURM log is never silent for long: `with still_running("t-SNE of 10,000 points", log): ...`.

    `status`, when given, is called for what to add to each line (e.g. "3,000 of 10,000 images"); the step's
    own code updates what it reads. The lines come from a timer thread; the step itself is not slowed.
    """

    def __init__(self, what: str, log=print, every: float = 20.0, status=None):
        self.what, self.log, self.every, self.status = what, log, every, status

    def __enter__(self):
        import threading
        self.started, self.done = time.monotonic(), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.done.wait(self.every):
            extra = f", {self.status()}" if self.status else ""
            self.log(f"  {self.what}: still running ({_clock(time.monotonic() - self.started)}{extra})")

    def __exit__(self, *exc_info) -> bool:
        self.done.set()
        self.thread.join()
        return False
