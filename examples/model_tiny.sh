# Sourced by examples/pretrain_tiny.sh and the fine-tuning examples: the flags of the tiny
# DeepSeek-V3-shaped MoE GPT (1.9M parameters). Fine-tuning must repeat the pretrained model's
# flags exactly, hence one file for both. Every flag maps onto a Hugging Face DeepseekV3Config
# (tools/convert_checkpoint.py), so the model exports to transformers.

VOCAB_SIZE=512                          # with mock data and no tokenizer
DEFAULT_TOKENIZER_TYPE=SentencePieceTokenizer  # the kind tools/train_tokenizer.py trains

MODEL_ARGS=(
    # --- transformer
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
    # --- multi-latent attention
    --multi-latent-attention            # MLA: low-rank compressed keys/values
    --q-lora-rank 64                    # query compressed to 64
    --kv-lora-rank 32                   # keys/values compressed to a 32-wide latent
    --qk-layernorm                      # RMSNorm on the compressed q and kv (q_a_layernorm, kv_a_layernorm)
    --qk-head-dim 32                    # per-head q/k without the rotary part
    --qk-pos-emb-head-dim 16            # per-head decoupled rotary part
    --v-head-dim 32                     # per-head value width
    --rope-type yarn                    # YaRN as in DeepSeek's config, scaled down:
    --rotary-scaling-factor 4           #   4x the original context
    --original-max-position-embeddings 32  # the context YaRN stretches
    --mscale 1.0                        # YaRN attention scaling
    --mscale-all-dim 1.0                # YaRN attention scaling
    # --- mixture of experts
    --num-experts 8                     # routed experts per MoE layer
    --moe-layer-freq "[0]*1+[1]*3"      # first layer dense (DeepSeek's first_k_dense_replace)
    --moe-router-topk 2                 # experts per token
    --moe-ffn-hidden-size 96            # each routed expert
    --moe-shared-expert-intermediate-size 96  # one shared expert
    --moe-router-score-function sigmoid  # expert scores (DeepSeek-V3: sigmoid, V2: softmax)
    --moe-router-enable-expert-bias     # aux-loss-free balancing (DeepSeek-V3)
    --moe-router-bias-update-rate 1e-3  # step of the expert-bias updates
    --moe-router-num-groups 2           # group-limited routing: 2 groups of 4 experts,
    --moe-router-group-topk 1           #   a token's experts come from 1 group (topk = 2 x group-topk, as DeepseekV3 scores groups)
    --moe-router-topk-scaling-factor 2.5  # routed_scaling_factor
    --moe-router-load-balancing-type seq_aux_loss  # a sequence-wise balance loss
    --moe-aux-loss-coeff 1e-4           # a small sequence-wise balance loss on top
    --moe-token-dispatcher-type alltoall  # all-to-all token exchange between expert-parallel ranks
    # --- multi-token prediction
    --mtp-num-layers 1                  # one extra depth (kept by the HF export as num_nextn_predict_layers)
    --mtp-loss-scaling-factor 0.3       # weight of the MTP loss
)
