#!/usr/bin/env bash
# sbatch slurm/dcgan.sh [dcgan_train.py options]   (submit from the repository root; logs in runs/slurm-<id>.out)
#
# Asks for 1 GPU, 4 CPU cores, 16 GB and 8 hours per start (the job requeues itself before the limit); options on
# the sbatch command line override the #SBATCH lines, e.g. `sbatch --time=30 --mem=8G slurm/dcgan.sh --epochs 10`.
# Continue a run that stopped without a requeue (scancel, TIMEOUT, restart cap) in a new job; the job's .out file
# ends with this command:  sbatch slurm/dcgan.sh --resume runs/slurm-123   (or: RUN_DIR=runs/slurm-123 sbatch ...)
# Environment: PYTHON (default .venv/bin/python), RUN_DIR, RUNS_ROOT (default runs), MAX_RESTARTS (default 20).
# docs/slurm.md explains the rest.
#SBATCH --job-name=dcgan
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=runs/slurm-%j.out
# ---- cluster-specific: edit here (partition, account, modules, environment) ------------------------------------
##SBATCH --partition=gpu
##SBATCH --account=my-project
# module load cuda
PYTHON=${PYTHON:-.venv/bin/python}
# ----------------------------------------------------------------------------------------------------------------
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
CONTINUE_SCRIPT=slurm/dcgan.sh  # named in the command that continues a stopped run ($0 is SLURM's copy)
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
launch dcgan_train.py "$@"
