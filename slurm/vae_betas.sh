#!/usr/bin/env bash
# sbatch slurm/vae_betas.sh [vae_train.py options]: the beta sweep as a job array, one task per beta listed in
# slurm/betas.txt (the list `make vae-betas` uses too); task i trains line i+1 in runs/slurm-<job>_<task>/, with
# --beta B --name vae-betaB --sweep vae-betas. The --array range below fits the 4 betas shipped; after editing the
# list, give the range on the command line (a task of a range that does not fit the list stops with exit 2):
#   sbatch --array=0-$(($(grep -cvE '^\s*(#|$)' slurm/betas.txt)-1)) slurm/vae_betas.sh
# Resources, environment and continuing a stopped task: as in slurm/vae.sh; docs/slurm.md explains the rest.
#SBATCH --job-name=vae-betas
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=runs/slurm-%A_%a.out
# ---- cluster-specific: edit here (partition, account, modules, environment) ------------------------------------
##SBATCH --partition=gpu
##SBATCH --account=my-project
# module load cuda
PYTHON=${PYTHON:-.venv/bin/python}
# ----------------------------------------------------------------------------------------------------------------
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
CONTINUE_SCRIPT=slurm/vae.sh  # a stopped task continues as a plain job ($0 is SLURM's copy)
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
table=${BETAS_FILE:-slurm/betas.txt}
mapfile -t betas < <(grep -vE '^[[:space:]]*(#|$)' "$table")
check_array_range slurm/vae_betas.sh "$table" "${#betas[@]}" "${BETAS_FILE:+BETAS_FILE=$BETAS_FILE }" || exit 2
read -r beta _ <<< "${betas[$SLURM_ARRAY_TASK_ID]}"
launch vae_train.py --beta "$beta" --name "vae-beta${beta}" --sweep vae-betas "$@"
