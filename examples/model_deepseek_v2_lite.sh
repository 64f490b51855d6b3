# Sourced by examples/pretrain_deepseek_v2_lite.sh and examples/grpo_deepseek_v2_lite.sh: the flags of the
# DeepSeek-V2-Lite (15.7B, 2.4B active) model (its shape and what it computes; the caller sets SEQ_LENGTH), in one
# file so that the GRPO preset rebuilds exactly the pretrained model. How the MoE trains (balance loss,
# expert-bias updates, MTP loss) is each caller's, appended to MOE_ARGS.

VOCAB_SIZE=102400                    # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer

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
    --hidden-dropout 0.0                # no dropout (RL needs none: rollout and training log-probs must agree)
    --attention-dropout 0.0             # no dropout (RL needs none: rollout and training log-probs must agree)
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
    --moe-router-dtype fp32             # routing in fp32 for stable top-k
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
)
