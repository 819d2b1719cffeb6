"""Checkpoint files and what goes in them: writing one with its checksum, loading the newest intact one, a script's
state dict of stateful objects saved and loaded in place (with one line naming the first tensor that does not fit
an edited model), the warm start of --init-from, the random number generators' state, and the TorchScript export.

What a checkpoint holds is listed once, by the training script's `state` dict (its models, optimisers, scalers,
meter), plus the loop's position, metrics and RNG (run.Run._checkpoint); writing one is run.Run._save.
"""
from __future__ import annotations

import copy
import hashlib
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_path, checksum_path, checksum_problem, write_checksum
from .readers import checkpoint_candidates, list_checkpoints
from .runs import settings_differ


def write_checkpoint(path: Path, data, links=(), keep: int | None = None) -> None:
    """Write the serialised checkpoint `data` to `path` atomically, then its checksum beside it (path.sha256); link
    it under the names `links` (epoch-NNN.pt, best.pt) and keep only the newest `keep` step checkpoints (the links
    survive rotation).

    The old checksum goes first: a kill at any moment leaves the old file or the new one, either with its own
    checksum or with none (taken on trust, like a checkpoint from before checksums), never with the other's."""
    checksum_path(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    write_checksum(path, hashlib.sha256(data).hexdigest())
    for name in links:
        link_checkpoint(path, path.parent / name)
    for old in list_checkpoints(path.parent.parent)[keep:] if keep else []:
        remove_checkpoint(old)


def link_checkpoint(path: Path, link: Path) -> None:
    """Make `link` (a milestone epoch-NNN.pt, or best.pt) the same checkpoint as `path`: a hard link, so it costs no
    disk and survives rotation; a copy where the file system has no hard links (some network and FUSE mounts)."""
    checksum_path(link).unlink(missing_ok=True)
    with atomic_path(link) as tmp:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    write_checksum(link, checksum_path(path).read_text().split()[0])


def remove_checkpoint(path: Path) -> None:
    path.unlink()
    checksum_path(path).unlink(missing_ok=True)


def _set_aside(path: Path) -> Path:
    """Rename a bad checkpoint to *.corrupt (never tried again, never deleted), its checksum along with it."""
    bad = path.with_name(path.name + ".corrupt")
    os.replace(path, bad)
    if checksum_path(path).exists():
        os.replace(checksum_path(path), checksum_path(bad))
    return bad


def _read_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """(the checkpoint, None), or (None, why its bytes cannot be used: a checksum that differs, a file that does not
    load, or one that holds no checkpoint). Only such files are damaged."""
    damaged = checksum_problem(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, empty or garbage: torch raises several kinds
        why = f"does not load ({type(err).__name__}: {one_line(err, 120)})"
        return None, f"{why}; {damaged}" if damaged else why
    if damaged:
        return None, f"is damaged: {damaged}"
    if not isinstance(ckpt, dict):
        return None, f"holds a {type(ckpt).__name__}, not a checkpoint"
    return ckpt, None


def load_newest_checkpoint(run_dir: Path, log=print, set_aside: bool = True, check=None) -> tuple[dict, Path] | None:
    """(checkpoint, its path) of the newest intact checkpoint, tried in the order of readers.checkpoint_candidates:
    step checkpoints, milestones, best.pt.

    A damaged one (its bytes differ from their checksum, or it does not load) gets a warning line and the one before
    is tried; the training script (which owns the folder) also renames it *.corrupt so it is never tried again,
    readers (set_aside=False) leave the folder as it is. An intact checkpoint that `check(ckpt)` refuses (another
    script's, another experiment's, one that does not fit an edited model) is not damaged: UserError with
    check's line, and nothing is renamed. A file that vanishes while we look (a live run pruning its old
    checkpoints) is skipped. None when the run has no checkpoint file at all; UserError when there are checkpoint
    files but none loads: starting from scratch there would silently throw the run away.
    """
    paths, vanished = checkpoint_candidates(run_dir), 0
    for path in paths:
        try:
            ckpt, damaged = _read_checkpoint(path)
        except FileNotFoundError:
            vanished += 1
            continue
        if damaged is None:
            problem = check(ckpt) if check else None
            if problem:
                raise UserError(f"checkpoint {path} {problem}")
            return ckpt, path
        if set_aside:
            log(f"warning: checkpoint {path} {damaged}; set aside as {_set_aside(path).name}, trying the one before")
        else:
            log(f"warning: checkpoint {path} {damaged}; trying the one before")
    if paths and vanished == len(paths):  # all pruned under our feet: the newer ones are on disk now
        return load_newest_checkpoint(run_dir, log, set_aside, check)
    if paths:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} loads; nothing to resume from. "
                        f"Restore a checkpoint from a backup, or add --restart to train from scratch in this folder.")
    return None


def load_latest_checkpoint(run_dir: Path, log=print, set_aside: bool = True, check=None) -> dict | None:
    """load_newest_checkpoint without the path: the checkpoint, or None when the run has none."""
    found = load_newest_checkpoint(run_dir, log, set_aside, check)
    return found[0] if found else None


def load_checkpoint(path: Path, check=None) -> dict:
    """A checkpoint file the user named (--init-from, a milestone to export): verified and loaded, or one line
    (UserError) saying what is wrong with it."""
    try:
        ckpt, problem = _read_checkpoint(Path(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    problem = problem or (check(ckpt) if check else None)
    if problem:
        raise UserError(f"checkpoint {path} {problem}")
    return ckpt


# -- a script's state: {name: a model, optimiser, loss scaler or meter}, saved and loaded in place ------------------
# The loop's part of a checkpoint, beside the script's state: a file without them is not this version's.
LOOP_KEYS = ("script", "epoch", "step_in_epoch", "global_step", "metrics", "rng")


def refusal(ckpt: dict, state: dict, script: str, run_dir: Path, experiment: dict | None = None) -> str | None:
    """Why a run of `script` with this `state` cannot continue from an intact checkpoint (one line, with the ways
    on), or None. Without `experiment` (--init-from) another experiment or an edited model is fine: warm_start
    takes what fits."""
    if ckpt.get("script", script) != script:
        return f"is a {ckpt['script']} checkpoint, not a {script} one"
    present = set(ckpt) | set(ckpt["per_rank"][0] if "per_rank" in ckpt else ())
    missing = [key for key in (*state, *LOOP_KEYS) if key not in present]
    if missing:
        return f"lacks {', '.join(missing)} (written by another version of {script}_train.py?); start a new run " \
               f"with --new-run"
    if experiment is None:
        return None
    differing = settings_differ(ckpt.get("experiment", {}), experiment)
    if differing:
        return f"belongs to another experiment ({'; '.join(differing)})"
    edits = misfits(state, ckpt)
    if edits:
        return (f"does not fit the model as the code now builds it: {edits[0]}"
                f"{f' and {len(edits) - 1} more' if len(edits) > 1 else ''}. The checkpoints are untouched. Undo "
                f"the edit to continue this run; or add --new-run to start a new one; or warm-start a new run "
                f"from this one: --init-from {run_dir}")
    return None


def state_dicts(state: dict) -> dict:
    """The checkpoint entries of a script's state dict: each object's state_dict(), under its name."""
    return {name: obj.state_dict() for name, obj in state.items()}


def _shape(tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def misfits(state: dict, ckpt: dict) -> list[str]:
    """The tensors of the state's models that a checkpoint cannot fill, each as one phrase naming it (the
    checkpoint's shape, the model's), in the model's order; a tensor the model no longer has is named too."""
    found = []
    for name, obj in state.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        mine, saved = obj.state_dict(), ckpt.get(name)
        if not isinstance(saved, dict):
            found.append(f"{name} (not in the checkpoint)")
            continue
        for key, tensor in mine.items():
            if key not in saved:
                found.append(f"{name}.{key} (new in the model, {_shape(tensor)})")
            elif not isinstance(saved[key], torch.Tensor) or saved[key].shape != tensor.shape:
                found.append(f"{name}.{key} ({_shape(saved[key])} in the checkpoint, {_shape(tensor)} in the model)")
        found += [f"{name}.{key} (in the checkpoint, not in the model)" for key in saved if key not in mine]
    return found


def load_state(state: dict, ckpt: dict) -> None:
    """Load a checkpoint's entries into the script's objects, in place. Call misfits() first.

    An optimiser keeps the hyperparameters it was built with (learning rate, betas, fused/foreach): the
    checkpoint brings its moments and step counts only. --init-from may start with other rates, and a run moved
    from a CPU to a GPU builds a fused Adam that must stay fused (a fused Adam's setting loaded from a CPU
    checkpoint meets the fp16 GradScaler with the other setting and fails at its first step). A loss scaler
    loads a saved scale where there is one (--amp may change on resume: bf16 and fp32 save none)."""
    for name, obj in state.items():
        saved = ckpt[name]
        if isinstance(obj, torch.optim.Optimizer):
            built = [{k: v for k, v in group.items() if k != "params"} for group in obj.param_groups]
            obj.load_state_dict(saved)
            for group, hyper in zip(obj.param_groups, built):
                group.update(hyper)
        elif isinstance(obj, torch.amp.GradScaler):
            if saved:
                obj.load_state_dict(saved)  # a no-op for a disabled scaler
        else:
            obj.load_state_dict(saved)


def warm_start(state: dict, ckpt: dict) -> list[str]:
    """--init-from into a model that may have been edited: every model tensor whose name and shape fit is loaded,
    the others keep their fresh initialisation. The optimisers, scalers and meters are loaded only when every
    tensor fits (their moments belong to the old shapes). Returns misfits()' list: empty when all was loaded."""
    missing = misfits(state, ckpt)
    if not missing:
        load_state(state, ckpt)
        return []
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module) and isinstance(ckpt.get(name), dict):
            mine = obj.state_dict()
            fits = {k: v for k, v in ckpt[name].items() if k in mine and getattr(v, "shape", None) == mine[k].shape}
            obj.load_state_dict(fits, strict=False)
    return missing


def one_line(err: Exception, limit: int = 200) -> str:
    """An exception's message on one line (load_state_dict's lists one mismatch per line), cut to `limit`."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
