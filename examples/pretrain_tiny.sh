#!/usr/bin/env bash
# Tiny DeepSeek-V3-shaped MoE GPT (1.9M parameters): MLA, a dense first layer then MoE layers with
# a sigmoid group-limited router, aux-loss-free balancing, a shared expert, and one MTP layer.
# Seconds per step on a laptop CPU: for smoke runs, debugging and CI.
#
#   bash examples/pretrain_tiny.sh                                  # one process, mock data
#   GPUS_PER_NODE=2 TP=2 bash examples/pretrain_tiny.sh             # two processes (CPU or GPU)
#   GPUS_PER_NODE=2 EP=2 bash examples/pretrain_tiny.sh             # expert parallel
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer.model bash examples/pretrain_tiny.sh
#   DRY_RUN=1 bash examples/pretrain_tiny.sh                        # print the command and model size only
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
VOCAB_SIZE=512                      # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=SentencePieceTokenizer

MODEL_ARGS=(
    --num-layers 4                      # 1 dense + 3 MoE layers
    --hidden-size 128
    --ffn-hidden-size 384               # the dense layer's MLP
    --num-attention-heads 4
    --seq-length 128
    --max-position-embeddings 128
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --swiglu                            # gated SiLU MLPs and experts
    --disable-bias-linear               # no linear biases, as DeepSeek (MoE requires it)
    --untie-embeddings-and-output-weights
    --position-embedding-type rope
    --rotary-base 10000
    --init-method-std 0.02
    --hidden-dropout 0.0
    --attention-dropout 0.0
)
MLA_ARGS=(
    --multi-latent-attention
    --q-lora-rank 64                    # query compressed to 64
    --kv-lora-rank 32                   # keys/values compressed to a 32-wide latent
    --qk-head-dim 32                    # per-head q/k without the rotary part
    --qk-pos-emb-head-dim 16            # per-head decoupled rotary part
    --v-head-dim 32
    --rope-type yarn                    # YaRN as in DeepSeek's config, scaled down:
    --rotary-scaling-factor 4           #   4x the original context
    --original-max-position-embeddings 32
    --mscale 1.0
    --mscale-all-dim 1.0
)
MOE_ARGS=(
    --num-experts 8
    --moe-layer-freq "[0]*1+[1]*3"      # first layer dense (DeepSeek's first_k_dense_replace)
    --moe-router-topk 2
    --moe-ffn-hidden-size 96            # each routed expert
    --moe-shared-expert-intermediate-size 96  # one shared expert
    --moe-router-score-function sigmoid
    --moe-router-enable-expert-bias     # aux-loss-free balancing (DeepSeek-V3)
    --moe-router-bias-update-rate 1e-3
    --moe-router-num-groups 2           # group-limited routing: 2 groups of 4 experts,
    --moe-router-group-topk 1           #   a token's experts come from 1 group
    --moe-router-topk-scaling-factor 2.5
    --moe-router-load-balancing-type seq_aux_loss
    --moe-aux-loss-coeff 1e-4           # a small sequence-wise balance loss on top
    --moe-token-dispatcher-type alltoall
    --mtp-num-layers 1                  # multi-token prediction, one extra depth
    --mtp-loss-scaling-factor 0.3
)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}"
    --global-batch-size "${GLOBAL_BATCH_SIZE:-16}"
    --train-iters "$TRAIN_ITERS"
    --optimizer adam                    # AdamW
    --lr 3e-3
    --min-lr 3e-4
    --lr-decay-style cosine
    --lr-warmup-iters $((TRAIN_ITERS / 20))
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 1234
    --eval-interval "${EVAL_INTERVAL:-50}"
    --eval-iters 2
)
# bf16 on GPUs only: CPU matmuls are fastest in fp32.
if nvidia-smi -L >/dev/null 2>&1; then TRAINING_ARGS+=(--bf16); fi

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}"
