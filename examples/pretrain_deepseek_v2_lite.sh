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
VOCAB_SIZE=102400                    # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer
ENTRY=pretrain_r1.py

MODEL_ARGS=(
    --num-layers 27                     # decoder layers
    --hidden-size 2048                  # model width
    --ffn-hidden-size 10944             # the dense first layer's MLP
    --num-attention-heads 16            # attention heads
    --seq-length "$SEQ_LENGTH"          # tokens per sample
    --max-position-embeddings "$SEQ_LENGTH"  # longest position the RoPE tables cover
    --normalization RMSNorm             # RMSNorm, as DeepSeek
    --norm-epsilon 1e-6                 # rms_norm_eps
    --swiglu                            # gated SiLU MLPs and experts
    --disable-bias-linear               # no linear biases (MoE requires it)
    --untie-embeddings-and-output-weights  # separate input embedding and output head
    --position-embedding-type rope      # rotary position embeddings
    --rotary-base 10000                 # rope_theta
    --init-method-std 0.006             # the paper's initialisation
    --hidden-dropout 0.0                # no dropout in pre-training
    --attention-dropout 0.0             # no dropout in pre-training
    --make-vocab-size-divisible-by 128  # pad the vocabulary for efficient GEMMs
)
MLA_ARGS=(
    --multi-latent-attention            # no --q-lora-rank: V2-Lite does not compress queries
    --qk-layernorm                      # RMSNorm on the compressed kv (kv_a_layernorm)
    --kv-lora-rank 512                  # keys/values compressed to this latent width
    --qk-head-dim 128                   # qk_nope_head_dim
    --qk-pos-emb-head-dim 64            # qk_rope_head_dim
    --v-head-dim 128                    # per-head value width
    --rope-type yarn                    # rope_scaling of the released config
    --rotary-scaling-factor 40          # YaRN: factor x the original context
    --original-max-position-embeddings 4096  # the context YaRN stretches
    --beta-fast 32                      # YaRN's ramp
    --beta-slow 1                       # YaRN's ramp
    --mscale 0.707                      # YaRN attention scaling
    --mscale-all-dim 0.707              # YaRN attention scaling
)
MOE_ARGS=(
    --num-experts 64                    # n_routed_experts
    --moe-layer-freq "[0]*1+[1]*26"     # first_k_dense_replace = 1
    --moe-router-topk 6                 # num_experts_per_tok
    --moe-ffn-hidden-size 1408          # moe_intermediate_size
    --moe-shared-expert-intermediate-size 2816  # 2 shared experts x 1408
    --moe-router-score-function softmax  # expert scores (DeepSeek-V3: sigmoid, V2: softmax)
    --moe-router-pre-softmax            # softmax over all experts, then the top 6 unrenormalised (norm_topk_prob false)
    --moe-router-load-balancing-type seq_aux_loss  # seq_aux: true
    --moe-aux-loss-coeff 1e-3           # aux_loss_alpha
    --moe-router-dtype fp32             # routing in fp32 for stable top-k
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
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
