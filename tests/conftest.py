"""Shared test fixtures: tiny data sets in the real on-disk formats, and a way to run the real scripts.

The data sets (tiny_data.py) are small enough that a whole training run takes seconds on CPU, but they are written
exactly as torchvision expects them (IDX files for MNIST, pickled batches for CIFAR-10), so the real loaders run.

run_script runs a script's main() in this process (a new Python spends ~4 s of CPU importing torch), through
errors.run_main as `python SCRIPT` does, and puts back what a run changes; `in_process=False` starts a real process
for the tests that need one: signals from outside, SIGKILL, a lock held by another process, the SLURM scripts,
torchrun, a read-only mount, stderr as a fresh interpreter writes it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import random
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"  # sitecustomize.py for the processes the tests start
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SUPPORT))

import synthetic_cifar10  # noqa: E402  (tests/support: torchvision reads the synthetic CIFAR-10 batches)
from tiny_data import make_cifar10, make_mnist  # noqa: E402

SHARED_MNIST = REPO.parent / "shared" / "data"  # the real MNIST on the developers' machines; absent elsewhere

synthetic_cifar10.install()  # in this process; script_env() does the same in the processes the tests start


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second thread mostly spins (10x slower in-process here), as the
    scripts the tests start get OMP_NUM_THREADS=1 from script_env(). For the whole session, so that module-scoped
    fixtures (set up before any function-scoped one) run with one thread too."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def test_cells_in_their_own_tests(request, monkeypatch):
    """check_submission ends by running the report's test-cell code in a fresh Python (common/testcell.run_cells):
    about 5 s of importing torch, in every check that passes. The tests marked real_test_cells (test_handin's) run
    it for real; in the others, whose subject is another check, it reports a pass without starting a Python."""
    if request.node.get_closest_marker("real_test_cells"):
        return
    from common import testcell

    def passed(paths, **_):
        return {name: (True, "not run in this test (tests marked real_test_cells run it)") for name in testcell.SCRIPTS}
    monkeypatch.setattr(testcell, "run_cells", passed)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return make_cifar10(tmp_path_factory.mktemp("cifar-data"))


# Tiny DCGAN settings: widths 8, batch 32 on the 200-image synthetic CIFAR-10 (7 steps per epoch).
GAN_TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--log-every", "3", "--ckpt-every-min", "1000"]


@pytest.fixture(scope="session")
def gan_runs(cifar_dir, tmp_path_factory) -> dict:
    """Three finished DCGAN runs on the synthetic CIFAR-10, made once and read by test_dcgan.py and
    test_analyze_gan.py: BCE for 2 epochs ("bce2"), the same for 1 epoch ("bce1"), hinge for 2 epochs ("hinge2");
    bce2 and hinge2 in sweep 'variants'. runs["printed"][key]: what that run printed (its CompletedProcess)."""
    root = tmp_path_factory.mktemp("gan-runs")
    runs = {"printed": {}}
    for key, epochs, extra in (("bce2", 2, []), ("bce1", 1, []), ("hinge2", 2, ["--loss", "hinge"])):
        runs[key] = root / key
        runs["printed"][key] = run_script("dcgan_train.py", "--data-dir", cifar_dir, "--run-dir", runs[key],
                                          "--epochs", epochs, "--sweep", "variants" if key != "bce1" else "other",
                                          *GAN_TINY, *extra)
    return runs


@pytest.fixture(scope="session")
def gan_compared(gan_runs, tmp_path_factory) -> Path:
    """analyze_gan.py on bce2 and hinge2 (and a comparison folder, which a glob over a runs root also matches), as
    one comparison into the folder returned; each run's own figures land in its figures/."""
    import analyze_gan

    out = tmp_path_factory.mktemp("compare") / "variants"
    decoy = gan_runs["bce2"].parent / "compare"
    decoy.mkdir(exist_ok=True)
    analyze_gan.main([str(gan_runs["bce2"]), str(gan_runs["hinge2"]), str(decoy), "--out", str(out),
                      "--quality-samples", "40", "--device", "cpu"])
    return out


def script_env() -> dict:
    env = dict(os.environ)
    # tests/support/sitecustomize.py: torchvision accepts the synthetic CIFAR-10 batches (no published MD5 sums)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add noise, and tests share 2 cores
    return env


def run_script(script: str, *args, check: bool = True, timeout: float = 300, cwd=None, env: dict | None = None,
               in_process: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts (`vae_train.py`, `tools/bench.py`, ...) with `args` as a user would, with the
    test environment; return the finished run as a subprocess.CompletedProcess (returncode, stdout, stderr).

    By default in this process: errors.run_main(module.main, argv), its exit code caught, stdout and stderr captured
    and the state a run may change put back (in_process() below), which saves the ~5 s of a new Python importing
    torch. `in_process=False` starts a real process, for what needs one: a signal from outside, SIGKILL, a lock
    held by another process, an environment read at import time. `env`: variables to set (None: to unset) for
    this run only. Past `timeout` seconds, subprocess.TimeoutExpired either way."""
    argv = list(map(str, args))
    if in_process:
        proc = run_in_process(script, argv, cwd=cwd, env=env, timeout=timeout)
    else:
        proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                              env={k: v for k, v in {**script_env(), **(env or {})}.items() if v is not None},
                              timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(argv)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


# The warning filters of a fresh `python script.py` (no -W, no PYTHONWARNINGS): pytest's own (pytest.ini's
# filterwarnings, its capture of warnings) do not apply to a script, which prints its warnings on its stderr.
FRESH_WARNING_FILTERS = [("default", None, DeprecationWarning, "__main__", 0),
                         ("ignore", None, DeprecationWarning, None, 0),
                         ("ignore", None, PendingDeprecationWarning, None, 0),
                         ("ignore", None, ImportWarning, None, 0), ("ignore", None, ResourceWarning, None, 0)]
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def in_process(script: str, cwd=None, env: dict | None = None):
    """While a script's main runs in this process: its sys.argv[0], cwd and environment (script_env() and `env`),
    one torch thread, fresh warning filters. Afterwards everything a run may change is put back: signal handlers
    and common.stop_signals, the working folder, the environment, sys.argv, torch's thread count, the global RNGs
    (random, numpy, torch), the warning filters."""
    import numpy as np
    import torch

    from common import stop_signals

    saved_environ, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_handlers = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    saved_threads = torch.get_num_threads()
    saved_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.filters[:] = FRESH_WARNING_FILTERS
            warnings._filters_mutated()  # forget which warnings were shown already, as a new process has
            warnings.showwarning = warnings._showwarning_orig  # to sys.stderr, not to pytest's record
            os.environ.update(script_env())  # as a process would get it, and pass it on to any it starts
            torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a process
            for name, value in (env or {}).items():
                if value is None:  # not set
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = str(value)
            sys.argv = [str(REPO / script)]
            if cwd is not None:
                os.chdir(cwd)
            yield
    finally:
        stop_signals.restore()  # a run that ended without leaving its RunFolder would leave them installed
        stop_signals.received = None
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        dist = sys.modules.get("torch.distributed")
        assert dist is None or not dist.is_available() or not dist.is_initialized(), "a process group was left"


def script_module(script: str):
    """The module of a script path: vae_train.py -> vae_train, tools/bench.py -> tools.bench."""
    return importlib.import_module(script.removesuffix(".py").replace("/", "."))


class _TimedOut(BaseException):
    """Raised in a script run in this process when its time is up (a BaseException: no `except Exception` in the
    code under test takes it for one of its own errors)."""


def _time_up(signum, frame):
    raise _TimedOut


def run_in_process(script: str, argv: list[str], cwd=None, env: dict | None = None,
                   timeout: float | None = None) -> subprocess.CompletedProcess:
    """errors.run_main(module.main, argv) in this process, as `python script argv...` would run it: the exit code
    (SystemExit), what it printed on stdout and stderr, and for an uncaught exception the traceback on stderr and
    exit 1, as Python prints and exits. Past `timeout` seconds (SIGALRM), subprocess.TimeoutExpired."""
    from common.errors import run_main

    module = script_module(script)
    command = [str(REPO / script), *argv]
    stdout, stderr = io.StringIO(), io.StringIO()
    previous_alarm = signal.signal(signal.SIGALRM, _time_up)
    try:
        with in_process(script, cwd=cwd, env=env), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                run_main(module.main, argv)
                returncode = 0
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    returncode = stop.code or 0
                else:  # sys.exit("message"): printed on stderr, exit 1
                    print(stop.code, file=sys.stderr)
                    returncode = 1
            except Exception:  # noqa: BLE001 - what an uncaught exception does to a process
                traceback.print_exc(file=sys.stderr)
                returncode = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _TimedOut:
        raise subprocess.TimeoutExpired(command, timeout, stdout.getvalue(), stderr.getvalue()) from None
    finally:
        signal.signal(signal.SIGALRM, previous_alarm)
    return subprocess.CompletedProcess(command, returncode, stdout.getvalue(), stderr.getvalue())


def hook_calls(patch: pytest.MonkeyPatch, target: str, at: int, action=None, before=None) -> None:
    """For a script run in this process: from now until `patch` is undone, the `at`-th call of `target`
    ("module.attr" or "module.Class.attr", e.g. "vae_train.vae_terms") first runs `before()`, if given, and returns
    `action(result)` in place of its result, if given (a NaN loss, say). run_patched and run_with_signal do the
    same in a process of their own."""
    parts = target.split(".")
    owner = importlib.import_module(parts[0])
    for part in parts[1:-1]:
        owner = getattr(owner, part)
    original, calls = getattr(owner, parts[-1]), [0]

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if before is not None and calls[0] == at:
            before()
        result = original(*args, **kwargs)
        return action(result) if action is not None and calls[0] == at else result

    patch.setattr(owner, parts[-1], wrapped)


def sigterm_to_this_process() -> None:
    """SIGTERM to the test process itself, only while a training run's handler (common.stop_signals) is there to
    note it: without one, the signal would end the whole test session."""
    from common import stop_signals
    assert signal.getsignal(signal.SIGTERM) is stop_signals._handler, "no stop-signal handler installed"
    os.kill(os.getpid(), signal.SIGTERM)


# A script run in a process of its own under a small wrapper that injects a fault at an exact point, so the fault
# tests are deterministic: `target` is "module.attr" of a function (e.g. "torch.optim.Adam.step",
# "vae_train.evaluate"); on its `n`-th call the wrapper sends the process SIGTERM (a real signal, delivered to the
# real handlers) just before the call runs.
_SIGNAL_WRAPPER = """
import functools, importlib, os, signal, sys
sys.path.insert(0, {repo!r})
from common.errors import run_main
script = importlib.import_module({script!r})
owner_path, attr = {target!r}.rsplit(".", 1)
parts = owner_path.split(".")
owner = importlib.import_module(parts[0])
for part in parts[1:]:
    owner = getattr(owner, part)
original, calls = getattr(owner, attr), [0]
@functools.wraps(original)
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
setattr(owner, attr, wrapped)
run_main(script.main, sys.argv[1:])
"""


def run_with_signal(script: str, target: str, n: int, *args, timeout: float = 300,
                    in_process: bool = False) -> subprocess.CompletedProcess:
    """The script stopped by SIGTERM just before the `n`-th call of `target`, in a process of its own. With
    `in_process=True` the signal goes to this process, to the same handler, at the same call: for a test that only
    needs the stopped run (a pre-emption checkpoint mid-epoch), not a signal's journey into a new process."""
    if in_process:
        with pytest.MonkeyPatch.context() as patch:
            hook_calls(patch, target, n, before=sigterm_to_this_process)
            return run_script(script, *args, check=False)
    code = _SIGNAL_WRAPPER.format(repo=str(REPO), script=script.removesuffix(".py"), target=target, n=n)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=script_env(), timeout=timeout)


@pytest.fixture(scope="module")
def vae_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch VAE run (beta 1) at the hostile tests' settings, copied by the tests that need a run
    folder to damage."""
    from hostile import vae  # tests/support/hostile.py imports this module
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    run_script("vae_train.py", *vae(mnist_dir, "--run-dir", run_dir, "--epochs", 1))
    return run_dir


@pytest.fixture(scope="module")
def gan_run(cifar_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch DCGAN run at the hostile tests' settings, the same way."""
    from hostile import gan
    run_dir = tmp_path_factory.mktemp("gan") / "run"
    run_script("dcgan_train.py", *gan(cifar_dir, "--run-dir", run_dir, "--epochs", 1))
    return run_dir


# A tiny VAE that learns the synthetic digits (its reconstructions beat the mean test image, as check_submission.py
# demands; 1 epoch at batch 64 does not): about 3 s on one CPU thread.
VAE_THAT_LEARNS = ["--epochs", "5", "--batch-size", "16", "--lr", "3e-3", "--latent-dim", "4"]
