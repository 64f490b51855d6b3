# Sourced by examples/pretrain_*.sh after a preset has set its defaults: turns the environment into
# the parallel / data / logging flags and launches pretrain_r1.py under torchrun.
#
# Environment (each preset sets the layout defaults):
#   NNODES GPUS_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT   the torchrun rendezvous; one node without
#                                                           MASTER_ADDR uses --standalone (a free port)
#   TP PP EP ETP            tensor / pipeline / expert / expert-tensor parallel sizes
#   DATA_PATH               indexed-dataset prefixes, optionally weighted ("0.7 a_text_document 0.3 b_...");
#                           unset: --mock-data
#   TOKENIZER_MODEL TOKENIZER_TYPE   the tokenizer the data was made with (unset: --vocab-size of the preset)
#   TENSORBOARD_DIR         TensorBoard event files
#   EXTRA_ARGS              more flags, appended last (so they override the preset's)
#   DRY_RUN=1               print the torchrun command and the model size (tools/model_size.py, flags
#                           validated for the whole world size) instead of training

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PROCESSES=$((NNODES * GPUS_PER_NODE))

# --- parallel layout
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
)
[[ -n "${ETP:-}" ]] && PARALLEL_ARGS+=(--expert-tensor-parallel-size "$ETP")
# MoE and MLA under tensor parallelism need sequence parallelism.
((TP > 1)) && PARALLEL_ARGS+=(--sequence-parallel)
# With data parallelism, shard the optimizer states over the data-parallel ranks (ZeRO-1).
((PROCESSES > TP * PP)) && PARALLEL_ARGS+=(--use-distributed-optimizer)

# --- data and tokenizer
DATA_ARGS=()
if [[ -n "${DATA_PATH:-}" ]]; then
    if [[ -z "${TOKENIZER_MODEL:-}" ]]; then
        echo "DATA_PATH needs TOKENIZER_MODEL (the tokenizer the data was made with)" >&2
        exit 2
    fi
    # shellcheck disable=SC2206  # a list: weights and prefixes
    DATA_ARGS+=(--data-path $DATA_PATH --split 969,30,1)
else
    DATA_ARGS+=(--mock-data)
fi
if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
    DATA_ARGS+=(--tokenizer-type "${TOKENIZER_TYPE:-$DEFAULT_TOKENIZER_TYPE}" --tokenizer-model "$TOKENIZER_MODEL")
else
    DATA_ARGS+=(--vocab-size "$VOCAB_SIZE")
fi

# --- logging
LOGGING_ARGS=(--log-interval "${LOG_INTERVAL:-1}")
[[ -n "${TENSORBOARD_DIR:-}" ]] && LOGGING_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")

# `launch FLAGS...`: the preset's model/training flags, then the ones above, then EXTRA_ARGS.
launch() {
    # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
    local flags=("$@" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}" ${EXTRA_ARGS:-})
    local rendezvous
    if ((NNODES == 1)) && [[ -z "${MASTER_ADDR:-}" ]]; then
        rendezvous=(--standalone)
    else
        rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                    --master-addr "${MASTER_ADDR:?a multi-node run needs MASTER_ADDR (the rank-0 node)}"
                    --master-port "${MASTER_PORT:-29500}")
    fi
    local command=(torchrun "${rendezvous[@]}" --nproc-per-node "$GPUS_PER_NODE" pretrain_r1.py "${flags[@]}")
    if [[ -n "${DRY_RUN:-}" ]]; then
        printf '%q ' "${command[@]}"
        echo
        WORLD_SIZE=$PROCESSES python tools/model_size.py "${flags[@]}"
    else
        exec "${command[@]}"
    fi
}
