#!/usr/bin/env bash
# DeepSeek-V2-Lite (15.7B parameters, 2.4B active per token): the shape of deepseek-ai/DeepSeek-V2-Lite's
# config.json and the pre-training recipe of the DeepSeek-V2 paper, on one node of 8 GPUs by default
# (expert parallel 8, data parallel 8, distributed optimizer, bf16).
#
#   DATA_PATH="0.5 data/zh_text_document 0.5 data/en_text_document" TOKENIZER_MODEL=/models/DeepSeek-V2-Lite \
#       bash examples/pretrain_deepseek_v2_lite.sh
#   NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 bash examples/pretrain_deepseek_v2_lite.sh
#   DRY_RUN=1 bash examples/pretrain_deepseek_v2_lite.sh        # print the command and model size only
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
VOCAB_SIZE=102400                    # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer

MODEL_ARGS=(
    --num-layers 27
    --hidden-size 2048
    --ffn-hidden-size 10944             # the dense first layer's MLP
    --num-attention-heads 16
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "$SEQ_LENGTH"
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --position-embedding-type rope
    --rotary-base 10000
    --init-method-std 0.006             # the paper's initialisation
    --hidden-dropout 0.0
    --attention-dropout 0.0
    --make-vocab-size-divisible-by 128
)
MLA_ARGS=(
    --multi-latent-attention            # no --q-lora-rank: V2-Lite does not compress queries
    --kv-lora-rank 512
    --qk-head-dim 128                   # qk_nope_head_dim
    --qk-pos-emb-head-dim 64            # qk_rope_head_dim
    --v-head-dim 128
    --rope-type yarn                    # rope_scaling of the released config
    --rotary-scaling-factor 40
    --original-max-position-embeddings 4096
    --beta-fast 32
    --beta-slow 1
    --mscale 0.707
    --mscale-all-dim 0.707
)
MOE_ARGS=(
    --num-experts 64                    # n_routed_experts
    --moe-layer-freq "[0]*1+[1]*26"     # first_k_dense_replace = 1
    --moe-router-topk 6                 # num_experts_per_tok
    --moe-ffn-hidden-size 1408          # moe_intermediate_size
    --moe-shared-expert-intermediate-size 2816  # 2 shared experts x 1408
    --moe-router-score-function softmax
    --moe-router-load-balancing-type seq_aux_loss  # seq_aux: true
    --moe-aux-loss-coeff 1e-3           # aux_loss_alpha
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
)
TRAINING_ARGS=(
    --bf16                              # bf16 weights and compute, fp32 master weights and grads
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
    --global-batch-size "${GLOBAL_BATCH_SIZE:-4608}"   # the paper's batch: 4608 x 4K tokens
    --train-iters "${TRAIN_ITERS:-300000}"              # ~5.7T tokens
    --optimizer adam                    # AdamW
    --lr 4.2e-4
    --min-lr 4.2e-5
    --lr-decay-style cosine             # the paper decays in steps; cosine reaches the same floor
    --lr-warmup-iters 2000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 1234
    --eval-interval "${EVAL_INTERVAL:-1000}"
    --eval-iters 10
)

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}"
