#!/usr/bin/env bash
# sbatch slurm/vae_betas.sh [vae_train.py options]: one array task per beta, each in runs/slurm-<job>_<task>/.
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
BETAS=(0.5 1 2 4)  # keep --array=0-(N-1) above in step with this list
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
beta=${BETAS[${SLURM_ARRAY_TASK_ID:?submit with sbatch: this is an array job}]}
launch vae_train.py --beta "$beta" --name "vae-beta${beta}" "$@"
