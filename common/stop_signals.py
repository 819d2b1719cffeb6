"""Stop requests (SIGTERM, SIGUSR1, SIGINT, SIGHUP), caught from the first line of a training script.

A training script calls install() before it imports torch: importing torch and loading the data take seconds (tens
of seconds on a cluster's network file system), and SLURM's warning signal or a pre-emption's SIGTERM may arrive in
that window. Without a handler the default action kills the process (exit 138 or 143); with it the request is noted
here, and run.Run acts on it at its first chance: a checkpoint and exit 75 once training has started, or exit 76
before the first step ("stopped during start-up, nothing new to save").

SIGHUP is what a dropped SSH session (no tmux, no nohup) sends: the run checkpoints and exits 75 like for SIGTERM. A
process started under nohup ignores SIGHUP, and keeps ignoring it: that user asked for the run to outlive the session.

The handler only records the signal. Saving inside it could interrupt a half-finished optimiser step, or a
torch.save already in progress, and write an inconsistent checkpoint.

This module imports nothing heavy, and importing it changes nothing.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

received: str | None = None   # name of the first stop signal not yet acted on, e.g. "SIGUSR1"
_previous: dict | None = None  # the handlers install() replaced, put back by restore()


def _handler(signum, _frame) -> None:
    global received
    if received and signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now (no checkpoint)
        raise KeyboardInterrupt
    received = received or signal.Signals(signum).name


def install() -> None:
    """Catch the stop signals from now on (a second call changes nothing)."""
    global _previous
    if _previous is None:
        ignored = {sig for sig in STOP_SIGNALS if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN}
        _previous = {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS if sig not in ignored}


def restore() -> None:
    """Put back the handlers install() replaced and forget any request (the run that would act on it is over)."""
    global _previous, received
    if _previous is not None:
        for sig, handler in _previous.items():
            signal.signal(sig, handler)
    _previous, received = None, None
