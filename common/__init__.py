"""What the training and analysis scripts share, one module per job. Scripts import what they use from the module
that defines it (`from common.run import Meter, Run`, `from common import gan_metrics`), so a reader and an editor
go straight to the definition; importing the package alone loads nothing.

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

Why a package and not one file: common.py had grown to ten jobs in 1,400 lines (docs/design.md, "Where things
live"). Importing it has no side effects.
"""
