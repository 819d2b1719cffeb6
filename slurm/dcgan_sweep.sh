#!/usr/bin/env bash
# sbatch --array=0-N slurm/dcgan_sweep.sh: array task i trains with the options on line i+1 of
# slurm/dcgan_sweep.txt (blank lines and # comments skipped), in runs/slurm-<job>_<task>/.
#SBATCH --job-name=dcgan-sweep
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=08:00:00
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
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
task=${SLURM_ARRAY_TASK_ID:?submit with sbatch: this is an array job}
mapfile -t variants < <(grep -vE '^[[:space:]]*(#|$)' "${SWEEP_TABLE:-slurm/dcgan_sweep.txt}")
[ "$task" -lt "${#variants[@]}" ] || { echo "no line $task in the sweep table (${#variants[@]} lines)"; exit 2; }
read -r -a options <<< "${variants[$task]}"
launch dcgan_train.py "${options[@]}" "$@"
