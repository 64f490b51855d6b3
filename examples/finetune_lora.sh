#!/usr/bin/env bash
# LoRA fine-tuning of a pretrained checkpoint on instruction / chat JSONL: the base model stays frozen
# (its expert biases too), low-rank adapters train on the attention, MLP and expert linears, the run's
# checkpoints hold the adapters alone; then tools/merge_lora.py folds them into a full checkpoint that
# loads, exports and generates like any other. The model flags must be the pretrained model's: they
# come from MODEL_FLAGS (default examples/model_tiny.sh, the model of examples/pretrain_tiny.sh).
#
#   PRETRAINED=runs/quickstart/checkpoints TOKENIZER_MODEL=runs/quickstart/tokenizer.model \
#       bash examples/finetune_lora.sh                                  # the bundled tiny set, one process
#   GPUS_PER_NODE=2 TP=2 PRETRAINED=... TOKENIZER_MODEL=... bash examples/finetune_lora.sh
#   DRY_RUN=1 PRETRAINED=... bash examples/finetune_lora.sh             # the command, layout, size and memory only
#
# Environment: see examples/launch.sh (layout, TOKENIZER_MODEL, TENSORBOARD_DIR, EXTRA_ARGS, DRY_RUN);
# here also
#   PRETRAINED       checkpoint to start from (a --save root or an iter_XXXXXXX directory, any layout)
#   SFT_DATA         training data: .jsonl files or tools/preprocess_sft.py prefixes
#                    (default megatron_r1/assets/tiny_sft.jsonl); VALID_DATA: validation data (default:
#                    2% of SFT_DATA)
#   SAVE             the adapters' checkpoints and lora.json (default runs/sft_lora); a rerun resumes
#   MERGED           the merged full checkpoint (default $SAVE-merged)
#   MODEL_FLAGS      a file that sets MODEL_ARGS, VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE
#   TRAIN_ITERS MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE EVAL_INTERVAL LR LORA_RANK
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-1}   # processes per node (CPU processes without a GPU)
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-100}
PRETRAINED=${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune (e.g. runs/quickstart/checkpoints)}
SAVE=${SAVE:-runs/sft_lora}
MERGED=${MERGED:-$SAVE-merged}
LORA_RANK=${LORA_RANK:-8}
if [[ -z "${DRY_RUN:-}" && -z "${TOKENIZER_MODEL:-}" ]]; then
    echo "set TOKENIZER_MODEL: the chat template uses the tokenizer's special tokens" >&2
    exit 2
fi
ENTRY=finetune_r1.py
source "${MODEL_FLAGS:-examples/model_tiny.sh}"  # MODEL_ARGS, VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE

TRAINING_ARGS=(
    --transformer-impl local            # adapters wrap megatron-core's local linears (also on GPUs)
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}"  # packed sequences per forward pass per GPU
    --global-batch-size "${GLOBAL_BATCH_SIZE:-8}"  # packed sequences per optimizer step
    --train-iters "$TRAIN_ITERS"        # optimizer steps
    --optimizer adam                    # AdamW, over the adapters only
    --lr "${LR:-1e-3}"                  # peak learning rate: adapters start at zero and take larger steps
    --min-lr 1e-4                       # the schedule's floor
    --lr-decay-style cosine             # to --min-lr by --train-iters
    --lr-warmup-iters $((TRAIN_ITERS / 10))  # linear warm-up
    --weight-decay 0.0                  # no decay on the adapters
    --adam-beta1 0.9                    # AdamW betas
    --adam-beta2 0.95                   # AdamW betas
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # adapter initialisation and data order
    --eval-interval "${EVAL_INTERVAL:-20}"  # validation loss every this many iterations
    --eval-iters 2                      # batches per validation
    --save "$SAVE"                      # the adapters (and their optimizer states), plus lora.json
    --save-interval "${EVAL_INTERVAL:-20}"  # with the validations, so early stopping's best is saved
)
# Flags of finetune_r1.py alone (after `--` in launch: the dry run does not check them).
# shellcheck disable=SC2206  # SFT_DATA / VALID_DATA are lists of files
FINETUNE_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"  # the frozen base weights (any saved layout); lora.json records it
    --data-path ${SFT_DATA:-megatron_r1/assets/tiny_sft.jsonl}  # conversations, rendered with the chat template
    --split 98,2,0                      # train / validation / test shares of --data-path
    --early-stop-patience 3             # stop after 3 validations without a better loss; keeps the best adapters
    --early-stop-min-delta 0.0          # any decrease counts as better
    --lora                              # train adapters on the frozen base model
    --lora-rank "$LORA_RANK"            # rank r of each adapter B @ A
    --lora-alpha $((2 * LORA_RANK))     # the update is scaled by alpha / r (here 2)
    --lora-dropout 0.0                  # dropout on the adapters' input
    --lora-target-modules attention mlp shared_experts experts  # every linear of attention, dense MLP, shared and routed experts
)
[[ -n "${VALID_DATA:-}" ]] && FINETUNE_ARGS+=(--valid-data-path $VALID_DATA)  # a separate validation set
# bf16 on GPUs only: CPU matmuls are fastest in fp32.
if nvidia-smi -L >/dev/null 2>&1; then TRAINING_ARGS+=(--bf16); fi

source examples/launch.sh
# In a subshell: launch replaces its shell with torchrun, and the merge comes after.
(launch "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" -- "${FINETUNE_ARGS[@]}")

# One process folds the adapters into the base weights: W + (alpha / r) * B @ A, a full checkpoint.
if [[ -z "${DRY_RUN:-}" && "${NODE_RANK:-0}" == 0 ]]; then
    MERGE_ARGS=(
        --lora-load "$SAVE"             # this run's --save: the adapters + lora.json, which names the base
        --save "$MERGED"                # the merged checkpoint (Megatron layout; loads under any parallel layout)
    )
    python tools/merge_lora.py "${MERGE_ARGS[@]}"
fi
