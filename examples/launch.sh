# Sourced by examples/pretrain_*.sh and examples/finetune_*.sh after a preset has set its defaults:
# turns the environment into the parallel / data / logging flags and launches $ENTRY under torchrun.
#
# Set by the preset: ENTRY (the training script: pretrain_r1.py, or finetune_r1.py whose presets pass
# their own data flags after `--`, so DATA_PATH is not read), VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE.
#
# Environment (each preset sets the layout defaults):
#   NNODES GPUS_PER_NODE    nodes, and processes (GPUs) per node; the world size is their product
#   MASTER_ADDR MASTER_PORT the rendezvous host (the first node) and port (default 29500); one node
#                           without MASTER_ADDR uses --standalone (a free local port)
#   RDZV_BACKEND            static (default): every node passes its NODE_RANK (0 on the MASTER_ADDR node);
#                           c10d: torchrun's elastic rendezvous at MASTER_ADDR:MASTER_PORT assigns the node
#                           ranks, RDZV_ID names the run (examples/slurm/*.sbatch: the job id)
#   TP PP EP ETP            tensor / pipeline / expert / expert-tensor parallel sizes
#   VPP_LAYERS              layers per virtual pipeline stage (interleaved 1F1B; needs PP > 1)
#   DATA_PATH               pre-training: indexed-dataset prefixes, optionally weighted ("0.7 a_text_document 0.3 b_...");
#                           unset: --mock-data
#   TOKENIZER_MODEL TOKENIZER_TYPE   the tokenizer the data was made with (unset: --vocab-size of the preset)
#   TENSORBOARD_DIR         TensorBoard event files
#   EXTRA_ARGS              more flags, appended last (so they override the preset's)
#   DRY_RUN=1               instead of training, print the torchrun command, then tools/model_size.py's
#                           report: flags validated for the whole world size, parallel layout, parameters,
#                           memory per GPU and tokens per step; exit status 1 if the busiest pipeline stage
#                           needs more than GPU_MEMORY_GB (default 80) per GPU. Flags after `--` in
#                           `launch` (fine-tuning's own) are not checked: model_size.py sizes the model on
#                           mock data with full optimizer states, an upper bound for --lora. For
#                           grpo_r1.py they are: model_size.py --grpo takes and checks them, and counts
#                           the reference policy and the rollouts' KV cache and logits

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
[[ -n "${VPP_LAYERS:-}" ]] && PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
# MoE and MLA under tensor parallelism need sequence parallelism.
((TP > 1)) && PARALLEL_ARGS+=(--sequence-parallel)
# With data parallelism, shard the optimizer states over the data-parallel ranks (ZeRO-1), and hide
# the gradient reduce-scatter and the parameter all-gather behind the backward and forward passes.
((PROCESSES > TP * PP)) && PARALLEL_ARGS+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)

# --- data and tokenizer
DATA_ARGS=()
DRY_RUN_ARGS=()
# GRPO's own flags decide its memory (group size, response length, reference policy): its dry run
# takes them (the `--` part of `launch`) and checks them as grpo_r1.py does.
[[ "${ENTRY:?the preset sets ENTRY}" == grpo_r1.py ]] && DRY_RUN_ARGS+=(--grpo)
if [[ "$ENTRY" != pretrain_r1.py ]]; then
    DRY_RUN_ARGS+=(--mock-data)  # the fine-tuning data comes after `--`; model_size.py sizes on mock data
elif [[ -n "${DATA_PATH:-}" ]]; then
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

# `launch FLAGS... [-- ENTRY_FLAGS...]`: the preset's model/training flags, then the ones above, then
# ENTRY_FLAGS (flags of $ENTRY alone, which the dry run checks for grpo_r1.py only), then EXTRA_ARGS.
launch() {
    local common=() entry_only=()
    while (($#)); do
        if [[ "$1" == -- ]]; then
            shift
            entry_only=("$@")
            break
        fi
        common+=("$1")
        shift
    done
    local flags=("${common[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}")
    # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
    local extra=(${EXTRA_ARGS:-})
    local rendezvous
    if ((NNODES == 1)) && [[ -z "${MASTER_ADDR:-}" ]]; then
        rendezvous=(--standalone)
    elif [[ "${RDZV_BACKEND:-static}" == c10d ]]; then
        local endpoint="${MASTER_ADDR:?a multi-node run needs MASTER_ADDR (the first node)}:${MASTER_PORT:-29500}"
        rendezvous=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-id "${RDZV_ID:-megatron-r1}" --rdzv-endpoint "$endpoint")
    elif [[ "${RDZV_BACKEND:-static}" == static ]]; then
        rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                    --master-addr "${MASTER_ADDR:?a multi-node run needs MASTER_ADDR (the rank-0 node)}"
                    --master-port "${MASTER_PORT:-29500}")
    else
        echo "RDZV_BACKEND=$RDZV_BACKEND: use static or c10d" >&2
        exit 2
    fi
    local command=(torchrun "${rendezvous[@]}" --nproc-per-node "$GPUS_PER_NODE" "$ENTRY"
                   "${flags[@]}" "${entry_only[@]}" "${extra[@]}")
    if [[ -n "${DRY_RUN:-}" ]]; then
        printf '%q ' "${command[@]}"
        echo
        local sized=("${flags[@]}")
        [[ "$ENTRY" == grpo_r1.py ]] && sized+=("${entry_only[@]}")
        WORLD_SIZE=$PROCESSES python tools/model_size.py "${sized[@]}" "${extra[@]}" "${DRY_RUN_ARGS[@]}" \
            --gpus-per-node "$GPUS_PER_NODE" --gpu-memory-gb "${GPU_MEMORY_GB:-80}"
    else
        exec "${command[@]}"
    fi
}
