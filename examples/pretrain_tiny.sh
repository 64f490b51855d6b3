#!/usr/bin/env bash
# Tiny DeepSeek-V3-shaped MoE GPT (1.9M parameters, flags in examples/model_tiny.sh): MLA, a dense
# first layer then MoE layers with a sigmoid group-limited router, aux-loss-free balancing, a shared
# expert, and one MTP layer; exportable to Hugging Face (examples/export_hf.sh).
# Seconds per step on a laptop CPU: for smoke runs, debugging and CI.
#
#   bash examples/pretrain_tiny.sh                                  # one process, mock data
#   GPUS_PER_NODE=2 TP=2 bash examples/pretrain_tiny.sh             # two processes (CPU or GPU)
#   GPUS_PER_NODE=2 EP=2 bash examples/pretrain_tiny.sh             # expert parallel
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer.model bash examples/pretrain_tiny.sh
#   DRY_RUN=1 bash examples/pretrain_tiny.sh                        # the command, layout, size and memory only
#
# Environment: see examples/launch.sh; here also TRAIN_ITERS, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE,
# EVAL_INTERVAL. On CPU, OMP_NUM_THREADS sets the threads of each process.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-1}   # processes per node (CPU processes without a GPU)
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-200}
source examples/model_tiny.sh            # MODEL_ARGS, VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE
ENTRY=pretrain_r1.py

TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}"  # samples per forward pass per GPU
    --global-batch-size "${GLOBAL_BATCH_SIZE:-16}"  # samples per optimizer step
    --train-iters "$TRAIN_ITERS"        # optimizer steps
    --optimizer adam                    # AdamW
    --lr 3e-3                           # peak learning rate
    --min-lr 3e-4                       # the schedule's floor
    --lr-decay-style cosine             # to --min-lr by --train-iters
    --lr-warmup-iters $((TRAIN_ITERS / 20))  # linear warm-up
    --weight-decay 0.1                  # decoupled (AdamW); matrices only
    --adam-beta1 0.9                    # AdamW betas
    --adam-beta2 0.95                   # AdamW betas
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # initialisation and data order
    --eval-interval "${EVAL_INTERVAL:-50}"  # validation loss every this many iterations
    --eval-iters 2                      # batches per validation
)
# bf16 on GPUs only: CPU matmuls are fastest in fp32.
if nvidia-smi -L >/dev/null 2>&1; then TRAINING_ARGS+=(--bf16); fi

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}"
