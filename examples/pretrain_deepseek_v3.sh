#!/usr/bin/env bash
# DeepSeek-V3 (671B parameters + an 11.5B MTP module, 37B active per token): the shape of
# deepseek-ai/DeepSeek-V3's config.json and the pre-training recipe of the DeepSeek-V3 report,
# by default on 128 nodes x 8 GPUs, bf16.
#
#   NNODES=128 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 DATA_PATH=data/corpus_text_document \
#       TOKENIZER_MODEL=/models/DeepSeek-V3 bash examples/pretrain_deepseek_v3.sh
#   DRY_RUN=1 MASTER_ADDR=node0 bash examples/pretrain_deepseek_v3.sh   # command, layout, size, memory only
#   DRY_RUN=1 MASTER_ADDR=node0 EP=8 bash examples/pretrain_deepseek_v3.sh   # exit 1: does not fit 80 GB
#   sbatch examples/slurm/pretrain_multinode.sbatch                      # under SLURM
#
# Default layout, per GPU (80 GB), as DRY_RUN=1 reports it: TP 8 (one node, with sequence
# parallelism) splits the 17B non-expert parameters to 3.1B (norms, the router and MLA's
# down-projections stay whole); EP 64 x ETP 2 splits the 665B expert parameters to 5.2B. That is
# ~50 GB of bf16 weights and fp32 gradients, ~8 GB of Adam states and master weights sharded over
# the data-parallel ranks, and ~2 GB of activations with full recomputation: ~60 GB. DeepSeek's own
# layout, PP 16 x EP 64 without TP, splits the 61 layers unevenly (~31 GB per GPU):
#   TP=1 PP=16 ETP=1 EXTRA_ARGS="--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 2"
#
# Environment: see examples/launch.sh; here also TRAIN_ITERS, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE,
# SEQ_LENGTH, EVAL_INTERVAL. TOKENIZER_TYPE defaults to HuggingFaceTokenizer (DeepSeek's tokenizer.json).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-128}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-8}                          # within a node (NVLink)
PP=${PP:-1}                          # divides 61 layers, or see the uneven split above
EP=${EP:-64}                         # 256 experts: 4 per expert-parallel rank
ETP=${ETP:-2}                        # each expert split over 2 GPUs
SEQ_LENGTH=${SEQ_LENGTH:-4096}
ENTRY=pretrain_r1.py

source examples/model_deepseek_v3.sh  # VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE, MODEL_ARGS, MLA_ARGS, MOE_ARGS
MOE_ARGS+=(
    --moe-router-bias-update-rate 1e-3  # the report's bias update speed
    --moe-router-load-balancing-type seq_aux_loss  # a sequence-wise balance loss
    --moe-aux-loss-coeff 1e-4           # the report's sequence-wise balance factor
    --mtp-loss-scaling-factor 0.3       # the report: 0.3 for the first 10T tokens, then 0.1
)
TRAINING_ARGS=(
    --bf16                              # the report trains in FP8; bf16 here
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}"  # samples per forward pass per GPU
    --global-batch-size "${GLOBAL_BATCH_SIZE:-15360}"  # the report's final batch (ramped from 3072)
    --train-iters "${TRAIN_ITERS:-235000}"             # ~14.8T tokens at 15360 x 4K
    --optimizer adam                    # AdamW
    --lr 2.2e-4                         # peak learning rate
    --min-lr 2.2e-5                     # the schedule's floor
    --lr-decay-style cosine             # to --min-lr by --train-iters
    --lr-warmup-iters 2000              # linear warm-up
    --weight-decay 0.1                  # decoupled (AdamW); matrices only
    --adam-beta1 0.9                    # AdamW betas
    --adam-beta2 0.95                   # AdamW betas
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # initialisation and data order
    --recompute-granularity full        # keep only each layer's input; recompute in backward
    --recompute-method uniform          # every layer in its own group
    --recompute-num-layers 1            # one layer per recompute group
    --eval-interval "${EVAL_INTERVAL:-1000}"  # validation loss every this many iterations
    --eval-iters 10                     # batches per validation
)

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}"
