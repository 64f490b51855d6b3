#!/usr/bin/env bash
# Convert between our checkpoints and Hugging Face transformers directories (both ways: DeepseekV3 or
# DeepseekV2 for MLA models, Qwen3-MoE / Mixtral / Qwen3 / Llama for GQA/MHA models),
# one process on CPU: no GPU and no launch layout needed to read any saved TP/PP/EP layout.
#
#   LOAD=runs/sft_lora-merged bash examples/export_hf.sh                 # ours -> HF in runs/sft_lora-merged-hf
#   DIRECTION=hf2mcore LOAD=/models/DeepSeek-V3 SAVE=ckpt/dsv3 TP=8 EP=64 bash examples/export_hf.sh
#
# mcore2hf needs a model transformers can compute exactly: for MLA --qk-layernorm, SwiGLU, no biases,
# shared experts, dense layers first, sigmoid routing (DeepseekV3) or softmax with --moe-router-pre-softmax
# (DeepseekV2) (megatron_r1/hf/config.py names any flag it refuses; hf2mcore any config.json field). The exported directory loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
#
# Environment:
#   DIRECTION        mcore2hf (default) or hf2mcore
#   LOAD             mcore2hf: our checkpoint (a --save root: its latest iteration, or an iter_XXXXXXX
#                    directory); hf2mcore: the Hugging Face directory
#   SAVE             the output directory, replaced if it exists (default: $LOAD-hf, or $LOAD-mcore)
#   DTYPE            mcore2hf: dtype of the written weights (default float32; bfloat16 halves the size)
#   TP PP EP         hf2mcore: the layout you will train with (fixes the vocabulary padding; default 1)
#   VERIFY=0         skip the comparison of both models' logits (default: compare)
set -euo pipefail
cd "$(dirname "$0")/.."

DIRECTION=${DIRECTION:-mcore2hf}
LOAD=${LOAD:?set LOAD to the checkpoint (mcore2hf) or Hugging Face directory (hf2mcore) to convert}
VERIFY_ARGS=()
if [[ "${VERIFY:-1}" != 0 ]]; then
    VERIFY_ARGS=(
        --verify                        # afterwards run both models on the same random tokens (CPU, fp32):
        --verify-tokens 32              #   this many per sequence; prints max |logit diff| and top-1 agreement
    )
fi

case "$DIRECTION" in
mcore2hf)
    CONVERT_ARGS=(
        --direction mcore2hf            # ours -> transformers
        --load "$LOAD"                  # our checkpoint, any TP/PP/EP layout it was saved with
        --save "${SAVE:-$LOAD-hf}"      # config.json, safetensors shards, tokenizer files
        --dtype "${DTYPE:-float32}"     # dtype of the written weights
        --max-shard-size 5GB            # safetensors shard size (written as they fill: memory ~ one layer + one shard)
        # --tokenizer-model spm.model   # default: the tokenizer saved with the checkpoint
        # --ckpt-step N                 # this iteration, not the latest
    )
    ;;
hf2mcore)
    CONVERT_ARGS=(
        --direction hf2mcore            # transformers (model_type deepseek_v3) -> ours
        --load "$LOAD"                  # the Hugging Face directory (config.json + safetensors)
        --save "${SAVE:-$LOAD-mcore}"   # a torch_dist checkpoint, no optimizer state: train from it with --finetune
        --tensor-model-parallel-size "${TP:-1}"    # the TP you will train with (pads the vocabulary for it)
        --pipeline-model-parallel-size "${PP:-1}"  # checked against the layer count
        --expert-model-parallel-size "${EP:-1}"    # checked against the expert count
        --make-vocab-size-divisible-by 128  # vocabulary padding, as pretrain_r1.py's default
    )
    ;;
*)
    echo "DIRECTION=$DIRECTION: use mcore2hf or hf2mcore" >&2
    exit 2
    ;;
esac

# Prints a JSON summary (tensors, bytes, seconds, and with --verify the logit comparison); hf2mcore
# also prints the model flags to train the converted checkpoint with.
python tools/convert_checkpoint.py "${CONVERT_ARGS[@]}" "${VERIFY_ARGS[@]}"
