"""Checkpoint files: loading the newest good one, the random number generators' state, and the TorchScript export.

What a checkpoint holds is listed once, by TrainingJob.state_dict (the script's models and optimisers) and
Run._state (the loop's position, metrics and RNG) in loop.py; writing one is Run._save.
"""
from __future__ import annotations

import copy
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_path
from .readers import list_checkpoints


def load_latest_checkpoint(run_dir: Path, log=print, set_aside: bool = True, check=None) -> dict | None:
    """Load the newest checkpoint that reads back and passes `check`; warn about each one that does not.

    `check(ckpt)` returns None for a checkpoint this run can continue from, or why not (another script's, another
    experiment's): such a file is treated exactly like a damaged one. The training script (which owns the folder)
    sets bad files aside as *.corrupt so they are never tried again; readers such as the analysis scripts pass
    set_aside=False and leave the folder as it is. A file that vanishes while we look (a live run pruning its old
    checkpoints) is skipped.
    Returns None when the run has no checkpoint file at all. Raises UserError when there are checkpoint files but
    none loads: starting from scratch there would silently throw away the run.
    """
    paths, vanished = list_checkpoints(run_dir), 0
    for path in paths:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            problem = check(ckpt) if check else None
        except FileNotFoundError:
            vanished += 1
            continue
        except Exception as err:  # truncated, empty or garbage: torch raises several kinds
            problem = f"does not load ({type(err).__name__}: {str(err)[:120]})"
        if problem is None:
            return ckpt
        bad = path.with_name(path.name + ".corrupt")
        log(f"warning: checkpoint {path} {problem}; "
            + (f"set aside as {bad.name}, trying the one before" if set_aside else "trying the one before"))
        if set_aside:
            os.replace(path, bad)
    if paths and vanished == len(paths):  # all pruned under our feet: the newer ones are on disk now
        return load_latest_checkpoint(run_dir, log, set_aside, check)
    if paths:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads; nothing to resume from. "
                        f"Restore a checkpoint from a backup, or add --restart to train from scratch in this folder.")
    return None


def _user_error_on_load(load, path):
    """torch.load of a file the user named: any failure is the file's fault, said in one line."""
    try:
        return load()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path} does not load as a checkpoint ({type(err).__name__}: {str(err)[:120]})") from None


def rng_state() -> dict:
    """Every random number generator the loop may draw from, as tensors and plain Python values.

    Plain types keep the checkpoint loadable with torch.load(weights_only=True): no numpy scalars, no Generators.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, log=print) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # one state per GPU visible when it was saved
        saved, visible = len(state["cuda"]), torch.cuda.device_count()
        if saved != visible:
            log(f"note: the checkpoint holds the random state of {saved} GPU(s), {visible} visible now: restored "
                f"onto the first {min(saved, visible)} (a one-GPU run is unaffected)")
        for index, gpu_state in enumerate(state["cuda"][:visible]):
            torch.cuda.set_rng_state(gpu_state, index)
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    """TorchScript a CPU copy of `model` in eval mode and write it atomically: a grader's torch.jit.load(path)
    needs none of our code. TorchScript is deprecated upstream, but it is the format the coursework loads.
    The copy is in the default memory format: channels-last weights (--channels-last) would give outputs that are
    not contiguous, and a grader's out.view(...) fails on them."""
    model = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))
