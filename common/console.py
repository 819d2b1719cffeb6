"""What a training run prints, where nobody may be reading: a closed or broken stdout never stops a run.

`python vae_train.py ... | head` closes the pipe after ten lines (the next write raises BrokenPipeError), `>&-`
starts the process with no stdout at all (sys.stdout is None), and an SSH session that drops takes the terminal with
it (writes fail with EIO). In each case the run goes on: its log.txt keeps every line (RunFolder.log), and stdout is
pointed at /dev/null from the first failed write on, so the interpreter's last flush at exit cannot fail either
(Python would exit 120). Imports no torch.
"""
from __future__ import annotations

import os
import sys


def say(message: str, stream=None) -> None:
    """print(message) to stdout (or `stream`, e.g. sys.stderr), flushed; silent when nobody can read it."""
    stream = stream if stream is not None else sys.stdout
    if stream is None:  # started with stdout (or stderr) closed
        return
    try:
        print(message, file=stream, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, EIO from a hung-up terminal; ValueError: a closed file
        to_devnull(stream)


def on_terminal() -> bool:
    """Whether stdout is a terminal; False when it is closed, redirected or already gone."""
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (OSError, ValueError):
        return False


def to_devnull(stream) -> None:
    """Point the file descriptor under `stream` at /dev/null: later writes (and the flush at exit) succeed."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def fill_closed_stdout() -> None:
    """A process started with fd 1 closed (`>&-`) would hand fd 1 to the next file it opens (the run's lock or
    log): anything written to "stdout" by C code would land in it. /dev/null takes that slot first."""
    try:
        os.fstat(1)
    except OSError:
        null = os.open(os.devnull, os.O_WRONLY)
        if null != 1:
            os.dup2(null, 1)
            os.close(null)
