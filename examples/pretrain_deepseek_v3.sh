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
VOCAB_SIZE=129280                    # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer
ENTRY=pretrain_r1.py

MODEL_ARGS=(
    --num-layers 61                     # decoder layers
    --hidden-size 7168                  # model width
    --ffn-hidden-size 18432             # the 3 dense layers' MLP
    --num-attention-heads 128           # attention heads
    --seq-length "$SEQ_LENGTH"          # tokens per sample
    --max-position-embeddings "$SEQ_LENGTH"  # longest position the RoPE tables cover
    --normalization RMSNorm             # RMSNorm, as DeepSeek
    --norm-epsilon 1e-6                 # rms_norm_eps
    --swiglu                            # gated SiLU MLPs and experts
    --disable-bias-linear               # no linear biases (MoE requires it)
    --untie-embeddings-and-output-weights  # separate input embedding and output head
    --position-embedding-type rope      # rotary position embeddings
    --rotary-base 10000                 # rope_theta
    --init-method-std 0.006             # the report's initialisation
    --hidden-dropout 0.0                # no dropout in pre-training
    --attention-dropout 0.0             # no dropout in pre-training
    --make-vocab-size-divisible-by 128  # pad the vocabulary for efficient GEMMs
)
MLA_ARGS=(
    --multi-latent-attention            # MLA: low-rank compressed keys/values
    --qk-layernorm                      # RMSNorm on the compressed q and kv (q_a_layernorm, kv_a_layernorm)
    --q-lora-rank 1536                  # query compressed to this rank
    --kv-lora-rank 512                  # keys/values compressed to this latent width
    --qk-head-dim 128                   # qk_nope_head_dim
    --qk-pos-emb-head-dim 64            # qk_rope_head_dim
    --v-head-dim 128                    # per-head value width
    --rope-type yarn                    # rope_scaling of the released config
    --rotary-scaling-factor 40          # YaRN: factor x the original context
    --original-max-position-embeddings 4096  # the context YaRN stretches
    --beta-fast 32                      # YaRN's ramp
    --beta-slow 1                       # YaRN's ramp
    --mscale 1.0                        # YaRN attention scaling
    --mscale-all-dim 1.0                # YaRN attention scaling
)
MOE_ARGS=(
    --num-experts 256                   # n_routed_experts
    --moe-layer-freq "[0]*3+[1]*58"     # first_k_dense_replace = 3
    --moe-router-topk 8                 # num_experts_per_tok
    --moe-ffn-hidden-size 2048          # moe_intermediate_size
    --moe-shared-expert-intermediate-size 2048  # 1 shared expert
    --moe-router-score-function sigmoid  # expert scores (DeepSeek-V3: sigmoid, V2: softmax)
    --moe-router-enable-expert-bias     # aux-loss-free balancing
    --moe-router-bias-update-rate 1e-3  # the report's bias update speed
    --moe-router-num-groups 8           # node-limited routing: 8 groups (n_group)
    --moe-router-group-topk 4           #   a token's experts come from 4 of them (topk_group)
    --moe-router-topk-scaling-factor 2.5  # routed_scaling_factor
    --moe-router-load-balancing-type seq_aux_loss  # a sequence-wise balance loss
    --moe-aux-loss-coeff 1e-4           # the report's sequence-wise balance factor
    --moe-router-dtype fp32             # routing in fp32 for stable top-k
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
    --mtp-num-layers 1                  # num_nextn_predict_layers
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
