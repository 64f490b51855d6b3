# Sourced by examples/pretrain_deepseek_v3.sh and examples/grpo_deepseek_v3.sh: the flags of the
# DeepSeek-V3 (671B, 37B active) model (its shape and what it computes; the caller sets SEQ_LENGTH), in one
# file so that the GRPO preset rebuilds exactly the pretrained model. How the MoE trains (balance loss,
# expert-bias updates, MTP loss) is each caller's, appended to MOE_ARGS.

VOCAB_SIZE=129280                    # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer

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
    --hidden-dropout 0.0                # no dropout (RL needs none: rollout and training log-probs must agree)
    --attention-dropout 0.0             # no dropout (RL needs none: rollout and training log-probs must agree)
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
    --moe-router-num-groups 8           # node-limited routing: 8 groups (n_group)
    --moe-router-group-topk 4           #   a token's experts come from 4 of them (topk_group)
    --moe-router-topk-scaling-factor 2.5  # routed_scaling_factor
    --moe-router-dtype fp32             # routing in fp32 for stable top-k
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
    --mtp-num-layers 1                  # num_nextn_predict_layers
)
