"""What the training and analysis scripts share, one module per job. `import common` is all a script needs:
`common.NAME` loads the module that defines NAME the first time it is used, so `from common import stop_signals`
(a training script's first line) and the torch-free modules stay light to import.

Where things live (a module imports only the ones above it in this list):

    console.py       printing that survives a closed or broken stdout (a pipe into head, an SSH session gone)
    errors.py        exit codes, UserError / AlreadyFinished / Preempted / StoppedAtStartup, run_main (-> exit codes)
    stop_signals.py  SIGTERM / SIGUSR1 / SIGINT / SIGHUP caught from a training script's first line, for the loop
    flags.py         the shared argparse flags (add_run_args), range-checked types, the default folders
    files.py         atomic writes (temp file, fsync, rename), CSV rows, symlinks, checksums beside files
    readers.py       reading a run folder: its checkpoints, config.json, metrics.csv, finished?, when it started
    mirror.py        the --mirror-dir copy of a run (Google Drive on Colab); the newer copy wins
    runs.py          which run folder a command works in, with which settings (resolve_run); finished runs alone
    checkpoints.py   writing (with checksum) and loading the newest intact checkpoint, RNG state, TorchScript
    devices.py       --device (never a silent CPU run), precision, determinism, fused Adam, torchrun
    progress.py      the progress bar or log line with the run's ETA
    data.py          MNIST / Fashion-MNIST / CIFAR-10 as uint8 tensors, each epoch's data order, data identity
    live.py          the live view: TensorBoard events of a run's CSV rows, sample grids and settings (RUN_DIR/tb/)
    folder.py        RunFolder: the run folder's files (lock, log, config.json with each start's code, CSVs, export)
    run.py           what a script's loop calls: Run (restore, step_done, epoch_done, export) and Meter
    experiments.py   run folders as experiments: sweeps, the run that counts, labels from differing settings
    fid.py           the Frechet distance (FID) from feature statistics; the real images' statistics, cached
    gan_metrics.py   GAN evaluation: seeded sampling, diversity, Inception features, FID, IS, classifier FID
    figures.py       figure helpers for the analysis scripts: atomic PNGs, smoothing, image mosaics
    sweep_figures.py figures that put runs side by side (a sweep), for both models
    page.py          a report page (report.py): text, tables, code and figures as Markdown and HTML, paths relative
    testcell.py      the notebook's test cells: each script's transform and denorm, run in a clean Python

The training scripts import what they use by name (`from common.run import Meter, Run`), so an editor
goes to the definition; their loop is their own (common/run.py's docstring shows its shape). The analysis
scripts, tools and tests also use `common.NAME`, which loads the module that defines NAME on first use.

Why a package and not one file: common.py had grown to ten jobs in 1,400 lines (docs/design.md, "Where things
live"). Importing it has no side effects.
"""
from __future__ import annotations

import importlib

# The names scripts use as common.NAME, by the module that defines them.
_NAMES = {
    "errors": ["EXIT_OK", "EXIT_USER_ERROR", "EXIT_PREEMPTED", "EXIT_STOPPED_AT_STARTUP", "UserError", "Preempted",
               "StoppedAtStartup", "AlreadyFinished", "run_main"],
    "flags": ["REPO_ROOT", "DEFAULT_RUNS_ROOT", "DEFAULT_DATA_DIR", "ArgumentParser", "at_least", "positive_float",
              "non_negative_float", "unit_interval", "plain_name", "add_run_args", "checked"],
    "files": ["fsync_dir", "atomic_path", "atomic_write_text", "write_csv", "append_csv", "atomic_symlink"],
    "readers": ["list_checkpoints", "checkpoint_candidates", "read_run_config", "read_metrics_csv", "read_step_rows",
                "MODEL_FILES", "read_export", "run_namespace"],
    "mirror": ["mirror_run", "restore_from_mirror"],
    "runs": ["RunPlan", "resolve_run", "experiment_settings", "settings_differ"],
    "checkpoints": ["load_latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "seed_everything",
                    "save_torchscript"],
    "devices": ["pick_device", "init_distributed", "broadcast_object", "all_reduce_sum", "any_rank",
                "average_gradients", "amp_dtype", "precision_name", "autocast", "grad_scaler",
                "determinism", "describe", "adam", "compiled"],
    "progress": ["Progress", "still_running"],
    "data": ["epoch_permutation", "full_batches", "load_images", "load_image_folder", "FASHION_MNIST_SYSTEM_DIR"],
    "run": ["Meter", "Run"],
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # found once; later look-ups are plain attribute reads
        return value
    try:  # a submodule: common.experiments, common.gan_metrics, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
