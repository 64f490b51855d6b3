# Sourced by examples/slurm/*.sbatch in the batch shell, from the repository root, after the sbatch
# file has set PRESET and the rendezvous variables: the job's directories, and `run_preset` that
# starts the preset once per node under srun and turns SLURM's time-limit warning into a checkpoint
# and a requeue.
#
# Environment (besides the preset's: TP, PP, EP, DATA_PATH, TOKENIZER_MODEL, ... see examples/launch.sh):
#   RUN_DIR         default runs/<job name>-<job id>: logs/node<N>.log (one per node), tensorboard/
#   CHECKPOINT_DIR  default $RUN_DIR/checkpoints; saved every SAVE_INTERVAL (default 1000) iterations
#                   and on the signal; a requeued job keeps its id, so it resumes from here
#   EXTRA_ARGS      more training flags, after these (so they override them)

RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-megatron-r1}-${SLURM_JOB_ID:?run under sbatch (no SLURM_JOB_ID)}}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$RUN_DIR/checkpoints}
mkdir -p "$RUN_DIR/logs" "$CHECKPOINT_DIR"
export TENSORBOARD_DIR=${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}
# On SIGUSR1 every training process finishes the iteration, saves and exits 0 (megatron_r1/signals.py).
export EXTRA_ARGS="--save $CHECKPOINT_DIR --save-interval ${SAVE_INTERVAL:-1000} \
--exit-signal-handler --exit-signal SIGUSR1 ${EXTRA_ARGS:-}"
# GPUs per node: what SLURM allocated (--gpus-per-node), else the preset's default.
if [[ -z "${GPUS_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    export GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
fi

# `run_preset`: one task per node runs $PRESET (which execs torchrun), each node's output in its log.
# `#SBATCH --signal=B:USR1@180` warns this shell 3 minutes before the time limit; it passes SIGUSR1 to
# srun, which forwards it to every process of the step. The shell that starts the preset ignores it,
# and torchrun and its children inherit that, so torchrun survives while the training processes,
# whose --exit-signal-handler replaces the inherited disposition, save and exit. Once they have
# exited 0, the job requeues itself.
run_preset() {
    local signalled=0 status=0 step=""
    trap 'signalled=1; echo "SIGUSR1: the training processes save and exit, then the job requeues"
          [[ -z "$step" ]] || kill -USR1 "$step" || true' USR1
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$RUN_DIR/logs/node%n.log" --open-mode=append \
        bash -c 'trap "" USR1; exec bash "$0"' "$PRESET" &
    step=$!
    if ((signalled)); then kill -USR1 "$step" || true; fi  # the signal came before $step was set
    # `wait` returns early when the trap runs: wait again until srun has really exited.
    while true; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break
    done
    trap - USR1
    if ((signalled && status == 0)); then
        echo "saved in $CHECKPOINT_DIR; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    elif ((signalled)); then
        echo "the run exited with status $status after SIGUSR1: not requeued (see $RUN_DIR/logs)" >&2
    fi
    return "$status"
}
