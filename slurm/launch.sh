# Sourced by the sbatch scripts in this folder: runs one training script so that it survives the time limit.
#
#   - the run folder comes from the job id, so a requeued job continues its own run;
#   - SLURM's warning signal (--signal=B:USR1@120 reaches this batch shell only) is forwarded to Python, which
#     checkpoints at its next step and exits 75; then the job is requeued, unless the run has finished, made no
#     progress since this start, or was restarted MAX_RESTARTS times already;
#   - SIGTERM (scancel, pre-emption) is forwarded too, but requeues nothing: scancel means stop, and a cluster that
#     pre-empts with PreemptMode=REQUEUE requeues the job itself.
#
# Python runs in the background with `wait`, because bash defers traps while a foreground child runs.
# shellcheck shell=bash

newest_checkpoint() {  # name of the newest checkpoint in run folder $1, or nothing (names sort by step)
  local newest="" path
  for path in "$1"/checkpoints/step-*.pt; do
    [ -e "$path" ] && newest=${path##*/}
  done
  echo "$newest"
}

# launch SCRIPT [options...]: run `python SCRIPT --run-dir RUN_DIR options...` under the rules above.
launch() {
  local script=$1
  shift
  local job_id=${SLURM_JOB_ID:?launch.sh runs under SLURM: SLURM_JOB_ID is not set}
  local run_name="slurm-${job_id}"
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    run_name="slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"  # each array task keeps its own folder
  fi
  local run_dir="${RUNS_ROOT:-runs}/${run_name}"
  local restarts=${SLURM_RESTART_COUNT:-0}
  local before
  before=$(newest_checkpoint "$run_dir")
  echo "[launch] job ${job_id} restart ${restarts} run ${run_dir} (checkpoint at start: ${before:-none})"

  # More than one GPU on the node: torchrun starts one process per GPU (single node). torchrun passes SIGTERM on
  # to its workers but dies of SIGUSR1, so it gets the warning as SIGTERM; the workers checkpoint either way.
  local nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  local warning_signal=USR1
  local command=("${PYTHON:-python}" "$script")
  if [ "$nproc" -gt 1 ]; then
    command=("${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$script")
    warning_signal=TERM
  fi

  local warned=""
  "${command[@]}" --run-dir "$run_dir" "$@" &
  local pid=$!
  trap 'warned=USR1; kill -s "$warning_signal" "$pid" 2>/dev/null' USR1
  trap 'warned=TERM; kill -TERM "$pid" 2>/dev/null' TERM
  local code=0
  while true; do
    wait "$pid" && code=0 || code=$?
    # wait returns >128 when a trapped signal interrupts it; the child may still be running.
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "[launch] ${script} exited with ${code}"

  # Requeue after the time-limit warning unless the run finished meanwhile (exit 0). A single process exits 75
  # after its checkpoint; torchrun reports its workers' 75 as a plain failure, so any non-zero code counts here.
  if [ "$code" -ne 0 ] && [ "$warned" = USR1 ]; then
    local after
    after=$(newest_checkpoint "$run_dir")
    if [ "$after" = "$before" ]; then
      echo "[launch] no progress since this start (${after:-no checkpoint}); not requeueing"
      return 1
    fi
    if [ "$restarts" -ge "${MAX_RESTARTS:-20}" ]; then
      echo "[launch] restarted ${restarts} times (MAX_RESTARTS=${MAX_RESTARTS:-20}); not requeueing"
      return 1
    fi
    echo "[launch] requeueing job ${job_id}"
    scontrol requeue "$job_id"
  fi
  return "$code"
}
