"""Exit codes, the errors a script turns into them, and run_main, which does the turning.

Imports nothing heavy: the training scripts' first lines, and flags.py, use it before torch is imported.
"""
from __future__ import annotations

import sys

from . import console


# Exit codes a job scheduler or wrapper script can act on. 75 is EX_TEMPFAIL from sysexits.h: "try again later".
EXIT_OK = 0
EXIT_USER_ERROR = 2           # bad flags, missing data, refused resume, full disk: fix it, then re-run
EXIT_PREEMPTED = 75           # stopped by a signal after writing a checkpoint: re-run the same command to continue
EXIT_STOPPED_AT_STARTUP = 76  # stopped by a signal before the first training step: nothing new to save; re-run


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder). Printed as one line, no traceback, exit 2."""


class AlreadyFinished(Exception):
    """The command names (or retypes) a run that has finished: nothing to train, nothing written (exit 0). The
    message says which run and where its model files are."""


class Preempted(Exception):
    """A stop signal was honoured: the checkpoint is written (exit 75)."""
    exit_code = EXIT_PREEMPTED


class StoppedAtStartup(Preempted):
    """A stop signal arrived before this start trained a single step: nothing new to save (exit 76)."""
    exit_code = EXIT_STOPPED_AT_STARTUP


def run_main(main, argv=None):
    """Run a script's main() and exit with its code: UserError -> one line on stderr and 2; AlreadyFinished -> its
    line on stdout and 0; Preempted -> 75/76."""
    console.fill_closed_stdout()
    try:
        code = main(argv)
    except UserError as err:
        console.say(f"error: {err}", sys.stderr)
        code = EXIT_USER_ERROR
    except AlreadyFinished as done:  # nothing was touched: say where the run and its models are
        console.say(str(done))
        code = EXIT_OK
    except Preempted as stop:  # Run has logged what happened and how to continue
        code = stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (stop_signals): stop now, without a checkpoint
        console.say("interrupted", sys.stderr)
        code = 130
    finally:
        dist = sys.modules.get("torch.distributed")  # imported by the script if it used more than one process
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code or EXIT_OK)
