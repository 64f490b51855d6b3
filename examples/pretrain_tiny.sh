#!/usr/bin/env bash
# Tiny DeepSeek-V3-shaped MoE GPT (1.9M parameters): MLA, a dense first layer then MoE layers with
# a sigmoid group-limited router, aux-loss-free balancing, a shared expert, and one MTP layer.
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
VOCAB_SIZE=512                      # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=SentencePieceTokenizer

MODEL_ARGS=(
    --num-layers 4                      # 1 dense + 3 MoE layers
    --hidden-size 128                   # model width
    --ffn-hidden-size 384               # the dense layer's MLP
    --num-attention-heads 4             # attention heads
    --seq-length 128                    # tokens per sample
    --max-position-embeddings 128       # longest position the RoPE tables cover
    --normalization RMSNorm             # RMSNorm, as DeepSeek
    --norm-epsilon 1e-6                 # rms_norm_eps
    --swiglu                            # gated SiLU MLPs and experts
    --disable-bias-linear               # no linear biases, as DeepSeek (MoE requires it)
    --untie-embeddings-and-output-weights  # separate input embedding and output head
    --position-embedding-type rope      # rotary position embeddings
    --rotary-base 10000                 # rope_theta
    --init-method-std 0.02              # initialisation std of the weights
    --hidden-dropout 0.0                # no dropout in pre-training
    --attention-dropout 0.0             # no dropout in pre-training
)
MLA_ARGS=(
    --multi-latent-attention            # MLA: low-rank compressed keys/values
    --q-lora-rank 64                    # query compressed to 64
    --kv-lora-rank 32                   # keys/values compressed to a 32-wide latent
    --qk-head-dim 32                    # per-head q/k without the rotary part
    --qk-pos-emb-head-dim 16            # per-head decoupled rotary part
    --v-head-dim 32                     # per-head value width
    --rope-type yarn                    # YaRN as in DeepSeek's config, scaled down:
    --rotary-scaling-factor 4           #   4x the original context
    --original-max-position-embeddings 32  # the context YaRN stretches
    --mscale 1.0                        # YaRN attention scaling
    --mscale-all-dim 1.0                # YaRN attention scaling
)
MOE_ARGS=(
    --num-experts 8                     # routed experts per MoE layer
    --moe-layer-freq "[0]*1+[1]*3"      # first layer dense (DeepSeek's first_k_dense_replace)
    --moe-router-topk 2                 # experts per token
    --moe-ffn-hidden-size 96            # each routed expert
    --moe-shared-expert-intermediate-size 96  # one shared expert
    --moe-router-score-function sigmoid  # expert scores (DeepSeek-V3: sigmoid, V2: softmax)
    --moe-router-enable-expert-bias     # aux-loss-free balancing (DeepSeek-V3)
    --moe-router-bias-update-rate 1e-3  # step of the expert-bias updates
    --moe-router-num-groups 2           # group-limited routing: 2 groups of 4 experts,
    --moe-router-group-topk 1           #   a token's experts come from 1 group
    --moe-router-topk-scaling-factor 2.5  # routed_scaling_factor
    --moe-router-load-balancing-type seq_aux_loss  # a sequence-wise balance loss
    --moe-aux-loss-coeff 1e-4           # a small sequence-wise balance loss on top
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
    --mtp-num-layers 1                  # multi-token prediction, one extra depth
    --mtp-loss-scaling-factor 0.3       # weight of the MTP loss
)
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
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}"
