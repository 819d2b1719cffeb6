#!/usr/bin/env bash
# sbatch slurm/dcgan_sweep.sh [dcgan_train.py options]: the GAN variants of slurm/dcgan_sweep.txt (the table
# `make gan-sweep` uses too) as a job array; task i trains with the options on line i+1 (blank lines and # comments
# skipped) plus --sweep dcgan-sweep, in runs/slurm-<job>_<task>/. The --array range below fits the 4 lines shipped;
# after editing the table, give the range on the command line (a task of a range that does not fit stops, exit 2):
#   sbatch --array=0-$(($(grep -cvE '^\s*(#|$)' slurm/dcgan_sweep.txt)-1)) slurm/dcgan_sweep.sh
# Resources, environment and continuing a stopped task: as in slurm/dcgan.sh; docs/slurm.md explains the rest.
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
CONTINUE_SCRIPT=slurm/dcgan.sh  # a stopped task continues as a plain job ($0 is SLURM's copy)
# shellcheck source=slurm/launch.sh
source slurm/launch.sh
table=${SWEEP_TABLE:-slurm/dcgan_sweep.txt}
mapfile -t variants < <(grep -vE '^[[:space:]]*(#|$)' "$table")
check_array_range slurm/dcgan_sweep.sh "$table" "${#variants[@]}" "${SWEEP_TABLE:+SWEEP_TABLE=$SWEEP_TABLE }" || exit 2
read -r -a options <<< "${variants[$SLURM_ARRAY_TASK_ID]}"
case " ${options[*]} " in
  *" --name "*) ;;
  *) echo "error: line $((SLURM_ARRAY_TASK_ID + 1)) of ${table} has no --name (it labels the variant)" >&2; exit 2 ;;
esac
launch dcgan_train.py "${options[@]}" --sweep dcgan-sweep "$@"
