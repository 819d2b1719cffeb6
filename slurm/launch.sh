# Sourced by the sbatch scripts in this folder: runs one training script so that it survives the time limit.
# (docs/slurm.md has the whole story: resources, continuing a stopped run, what sacct shows.)
#
#   - the run folder is runs/slurm-<job id>, or the folder named by --resume DIR, --run-dir DIR or RUN_DIR=DIR;
#     a requeued job runs the same command again, so it continues the same folder;
#   - SLURM's warning signal (--signal=B:USR1@120 reaches this batch shell only) is forwarded to Python, which
#     checkpoints at its next step and exits 75 (or 76 when it was still starting up: nothing new to save); then
#     the job is requeued, unless the run has finished, made no progress since this start, or was restarted
#     MAX_RESTARTS times already;
#   - SIGTERM (scancel, the time limit itself, pre-emption) is forwarded too, but requeues nothing: scancel means
#     stop, and a cluster that pre-empts with PreemptMode=REQUEUE requeues the job itself;
#   - whenever a run stops without a requeue, the last line says which sbatch command continues it.
#
# The sourcing script sets CONTINUE_SCRIPT to its own path (under sbatch, $0 is a copy in SLURM's spool folder).
# Python runs in the background with `wait`, because bash defers traps while a foreground child runs.
# shellcheck shell=bash

EXIT_PREEMPTED=75            # common.errors.EXIT_PREEMPTED: stopped by a signal after writing a checkpoint
EXIT_STOPPED_AT_STARTUP=76   # common.errors.EXIT_STOPPED_AT_STARTUP: stopped by a signal before its first training step

newest_checkpoint() {  # name of the newest checkpoint in run folder $1, or nothing (names sort by step)
  local newest="" path
  for path in "$1"/checkpoints/step-*.pt; do
    [ -e "$path" ] && newest=${path##*/}
  done
  echo "$newest"
}

# requeued_by_slurm JOB_ID: SLURM itself is requeueing this job (an outside `scontrol requeue`, a pre-emption with
# PreemptMode=REQUEUE): its restart count has already gone up when the SIGTERM arrives; after scancel it has not.
requeued_by_slurm() {
  local restarts
  restarts=$(scontrol show job -o "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
  [ -n "$restarts" ] && [ "$restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]
}

# check_array_range SWEEP_SCRIPT TABLE COUNT [ENV_PREFIX]: this array job has exactly one task per line of TABLE
# (COUNT lines), so an edited list cannot silently leave lines out, or start tasks that have no line. ENV_PREFIX
# ("BETAS_FILE=x ") repeats an overridden table in the command it suggests: sbatch passes the environment on.
check_array_range() {
  local sweep_script=$1 table=$2 count=$3 env_prefix=${4:-}
  local fix="submit with: ${env_prefix}sbatch --array=0-$((count - 1)) ${sweep_script}"
  if [ "$count" -eq 0 ]; then
    echo "error: ${table} lists nothing to train (blank lines and # comments are skipped)" >&2
  elif [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ -z "${SLURM_ARRAY_TASK_MAX:-}" ]; then
    echo "error: ${sweep_script} is a job array, one task per line of ${table}; ${fix}" >&2
  elif [ "$((SLURM_ARRAY_TASK_MAX + 1))" -ne "$count" ] || [ "${SLURM_ARRAY_TASK_MIN:-0}" -ne 0 ]; then
    echo "error: the array's tasks are ${SLURM_ARRAY_TASK_MIN:-0}-${SLURM_ARRAY_TASK_MAX}, but ${table} has ${count}" \
      "lines; ${fix}" >&2
  else
    return 0
  fi
  return 2
}

# launch SCRIPT [options...]: run `python SCRIPT options...` in the job's run folder under the rules above.
launch() {
  local script=$1
  shift
  local job_id=${SLURM_JOB_ID:?launch.sh runs under SLURM: SLURM_JOB_ID is not set}

  # Which folder: one the options or RUN_DIR name (a run to continue), else one named after the job. Python gets
  # the options without --run-dir / --resume, plus exactly one of them for that folder.
  local options=() resume="" run_dir_option="" runs_root=${RUNS_ROOT:-runs}
  while [ $# -gt 0 ]; do
    case $1 in
      --resume|--run-dir|--runs-root)
        [ $# -ge 2 ] || { echo "error: $1 needs a folder" >&2; return 2; }
        case $1 in --resume) resume=$2 ;; --run-dir) run_dir_option=$2 ;; *) runs_root=$2; options+=("$1" "$2") ;; esac
        shift 2 ;;
      --resume=*) resume=${1#*=}; shift ;;
      --run-dir=*) run_dir_option=${1#*=}; shift ;;
      --runs-root=*) runs_root=${1#*=}; options+=("$1"); shift ;;
      *) options+=("$1"); shift ;;
    esac
  done
  if [ "$resume" = latest ]; then
    # latest-<script> may move to another run while this job waits in the queue or between requeues.
    echo "error: --resume latest under SLURM: name the run folder (latest may move while the job waits)" >&2
    return 2
  fi
  local named=() folder
  for folder in "$resume" "$run_dir_option" "${RUN_DIR:-}"; do
    [ -n "$folder" ] && named+=("$folder")
  done
  for folder in "${named[@]}"; do
    if [ "$(realpath -m "$folder")" != "$(realpath -m "${named[0]}")" ]; then
      echo "error: --resume, --run-dir and RUN_DIR name different folders (${named[*]}); give one of them" >&2
      return 2
    fi
  done
  local run_dir
  if [ ${#named[@]} -gt 0 ]; then
    run_dir=${named[0]}
  elif [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    run_dir="${runs_root}/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"  # each array task keeps its own folder
  else
    run_dir="${runs_root}/slurm-${job_id}"
  fi
  local folder_option=(--run-dir "$run_dir")
  [ -n "$resume" ] && folder_option=(--resume "$run_dir")  # --resume refuses a folder without a checkpoint

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
  "${command[@]}" "${folder_option[@]}" "${options[@]}" &
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
  [ "$code" -eq 0 ] && return 0

  # After the time-limit warning: requeue if the run checkpointed (75) or was still starting up (76: nothing to
  # save yet, which is not a lack of progress). torchrun reports its workers' 75 or 76 as a plain failure, so
  # there any non-zero code counts, and the progress check decides.
  local requeue=""
  if [ "$warned" = USR1 ]; then
    local after
    after=$(newest_checkpoint "$run_dir")
    if [ "$nproc" -le 1 ] && [ "$code" -ne "$EXIT_PREEMPTED" ] && [ "$code" -ne "$EXIT_STOPPED_AT_STARTUP" ]; then
      echo "[launch] warned, but ${script} failed with ${code}; not requeueing"
    elif [ "$code" -ne "$EXIT_STOPPED_AT_STARTUP" ] && [ "$after" = "$before" ]; then
      echo "[launch] no progress since this start (${after:-no checkpoint}); not requeueing"
    elif [ "$restarts" -ge "${MAX_RESTARTS:-20}" ]; then
      echo "[launch] restarted ${restarts} times (MAX_RESTARTS=${MAX_RESTARTS:-20}); not requeueing"
    else
      [ "$code" -eq "$EXIT_STOPPED_AT_STARTUP" ] && echo "[launch] stopped during start-up: nothing to save yet"
      # SLURM may then end this start with a "CANCELLED ... DUE TO JOB REQUEUE" line: expected, and harmless.
      echo "[launch] requeueing job ${job_id}"
      scontrol requeue "$job_id" && requeue=yes
    fi
  fi

  if [ "$warned" = TERM ] && requeued_by_slurm "$job_id"; then
    echo "[launch] SLURM is requeueing job ${job_id}; the next start continues ${run_dir}"
  elif [ -z "$requeue" ] && [ "$code" -ne 2 ]; then
    if [ -n "$(newest_checkpoint "$run_dir")" ]; then
      local continue_command
      continue_command=$(printf ' %q' sbatch "${CONTINUE_SCRIPT:-slurm/${script%%_*}.sh}" --resume "$run_dir" \
        "${options[@]}")
      echo "[launch] stopped without a requeue; to continue the run in a new job:${continue_command}"
    else
      echo "[launch] stopped without a requeue; ${run_dir} holds no checkpoint yet (a new job starts it afresh)"
    fi
  fi
  return "$code"
}
