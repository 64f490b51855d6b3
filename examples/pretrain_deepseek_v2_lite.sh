#!/usr/bin/env bash
# DeepSeek-V2-Lite (15.7B parameters, 2.4B active per token): the shape of deepseek-ai/DeepSeek-V2-Lite's
# config.json and the pre-training recipe of the DeepSeek-V2 paper, on one node of 8 GPUs by default
# (expert parallel 8, data parallel 8, distributed optimizer, bf16).
#
#   DATA_PATH="0.5 data/zh_text_document 0.5 data/en_text_document" TOKENIZER_MODEL=/models/DeepSeek-V2-Lite \
#       bash examples/pretrain_deepseek_v2_lite.sh
#   NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 bash examples/pretrain_deepseek_v2_lite.sh
#   DRY_RUN=1 bash examples/pretrain_deepseek_v2_lite.sh        # the command, layout, size and memory only
#
# Environment: see examples/launch.sh; here also TRAIN_ITERS, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE,
# SEQ_LENGTH, EVAL_INTERVAL. TOKENIZER_TYPE defaults to HuggingFaceTokenizer (DeepSeek's tokenizer.json).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}                          # 16 heads and a 2048 hidden size: no need to split layers
PP=${PP:-1}                          # 27 layers: PP must divide 27 (1, 3, 9)
EP=${EP:-8}                          # 64 experts: 8 per GPU
SEQ_LENGTH=${SEQ_LENGTH:-4096}
ENTRY=pretrain_r1.py

source examples/model_deepseek_v2_lite.sh  # VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE, MODEL_ARGS, MLA_ARGS, MOE_ARGS
MOE_ARGS+=(
    --moe-router-load-balancing-type seq_aux_loss  # seq_aux: true
    --moe-aux-loss-coeff 1e-3           # aux_loss_alpha
)
TRAINING_ARGS=(
    --bf16                              # bf16 weights and compute, fp32 master weights and grads
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}"  # samples per forward pass per GPU
    --global-batch-size "${GLOBAL_BATCH_SIZE:-4608}"   # the paper's batch: 4608 x 4K tokens
    --train-iters "${TRAIN_ITERS:-300000}"              # ~5.7T tokens
    --optimizer adam                    # AdamW
    --lr 4.2e-4                         # peak learning rate
    --min-lr 4.2e-5                     # the schedule's floor
    --lr-decay-style cosine             # the paper decays in steps; cosine reaches the same floor
    --lr-warmup-iters 2000              # linear warm-up
    --weight-decay 0.1                  # decoupled (AdamW); matrices only
    --adam-beta1 0.9                    # AdamW betas
    --adam-beta2 0.95                   # AdamW betas
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # initialisation and data order
    --eval-interval "${EVAL_INTERVAL:-1000}"  # validation loss every this many iterations
    --eval-iters 10                     # batches per validation
)

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}"
