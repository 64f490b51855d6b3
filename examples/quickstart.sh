#!/usr/bin/env bash
# The whole pipeline on the bundled tiny corpus and instruction set, on CPU, in a few minutes:
#   clean -> dedup -> tokenizer -> preprocess -> pretrain (2 processes; one per GPU) -> resume
#   -> SFT with LoRA -> merge -> GRPO -> export to Hugging Face -> generate (transformers, then ours)
#
#   bash examples/quickstart.sh                 # artefacts under runs/quickstart
#   OUT=/tmp/qs bash examples/quickstart.sh     # elsewhere
#
# Environment: OUT (output directory), PRETRAIN_ITERS (default 30, even; the run stops halfway and
# resumes), SFT_ITERS (default 20, even), GRPO_ITERS (default 4), NEW_TOKENS (default 16, per generation).
# Each stage prints its own summary; the artefacts are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/quickstart}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-30}
SFT_ITERS=${SFT_ITERS:-20}
GRPO_ITERS=${GRPO_ITERS:-4}
NEW_TOKENS=${NEW_TOKENS:-16}
CORPUS=megatron_r1/assets/tiny_corpus.jsonl
SFT_DATA=megatron_r1/assets/tiny_sft.jsonl
QUESTION="What is 3 + 4?"                     # the generation prompt, a user turn like those of $SFT_DATA
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two processes share the two cores of a laptop/CI box
mkdir -p "$OUT"

stage() { printf '\n=== %s   [%d s]\n' "$*" "$SECONDS"; }

stage "1/12 clean: normalize, language id, quality filters, PII anonymization"
python tools/clean_corpus.py --input "$CORPUS" --output "$OUT/clean.jsonl" --keep-rejects "$OUT/rejects.jsonl"

stage "2/12 dedup: exact and near duplicates (MinHash + LSH)"
python tools/dedup.py --input "$OUT/clean.jsonl" --output "$OUT/dedup.jsonl" --clusters "$OUT/clusters.jsonl"

stage "3/12 tokenizer: SentencePiece BPE with byte fallback and the chat/reasoning special tokens"
python tools/train_tokenizer.py --input "$OUT/dedup.jsonl" --vocab-size 4000 --output-prefix "$OUT/tokenizer"

stage "4/12 preprocess: JSONL -> megatron-core indexed dataset (.bin/.idx)"
python tools/preprocess_data.py --input "$OUT/dedup.jsonl" --output-prefix "$OUT/corpus" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

# The tiny DeepSeek-V3-shaped preset (examples/pretrain_tiny.sh), tensor parallel over 2 processes:
# 2 CPU processes, or one per GPU where there are GPUs (NCCL takes one process per GPU).
PROCESSES=$(python -c "import torch; print(min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)")
pretrain() {
    GPUS_PER_NODE=$PROCESSES TP=$PROCESSES TRAIN_ITERS=$PRETRAIN_ITERS EVAL_INTERVAL=$((PRETRAIN_ITERS / 2)) \
    DATA_PATH="$OUT/corpus_text_document" TOKENIZER_MODEL="$OUT/tokenizer.model" \
    TENSORBOARD_DIR="$OUT/tensorboard" EXTRA_ARGS="--save $OUT/checkpoints --save-interval $((PRETRAIN_ITERS / 2)) $*" \
        bash examples/pretrain_tiny.sh
}

stage "5/12 pretrain: $PROCESSES processes (TP=$PROCESSES), stopping at iteration $((PRETRAIN_ITERS / 2))"
pretrain --exit-interval $((PRETRAIN_ITERS / 2))

stage "6/12 resume: the same command continues from the checkpoint to iteration $PRETRAIN_ITERS"
pretrain

# The TP=2 checkpoint loads into one process: checkpoints reshard on load. A tiny model and a few
# steps: a large learning rate (10x the script's). finetune_lora.sh ends with stage 8,
# tools/merge_lora.py folding the adapters into a full checkpoint.
stage "7/12 SFT with LoRA on $SFT_DATA: adapters on the frozen pretrained model (one process, $SFT_ITERS iterations)"
PRETRAINED="$OUT/checkpoints" TOKENIZER_MODEL="$OUT/tokenizer.model" SFT_DATA="$SFT_DATA" SAVE="$OUT/sft_lora" \
    MERGED="$OUT/sft_merged" TRAIN_ITERS=$SFT_ITERS EVAL_INTERVAL=$((SFT_ITERS / 2)) LR=1e-2 OMP_NUM_THREADS=2 \
    bash examples/finetune_lora.sh
stage "8/12 merge: the adapters folded into $OUT/sft_merged (above, by examples/finetune_lora.sh)"

# The bundled arithmetic prompts; a tiny model this briefly trained rarely earns a reward: the stage
# shows the machinery (rollouts, rewards, KL to the SFT model, checkpoint), not a better model.
stage "9/12 GRPO on megatron_r1/assets/tiny_grpo.jsonl from $OUT/sft_merged (one process, $GRPO_ITERS iterations)"
PRETRAINED="$OUT/sft_merged" TOKENIZER_MODEL="$OUT/tokenizer.model" SAVE="$OUT/grpo" TRAIN_ITERS=$GRPO_ITERS \
    MAX_RESPONSE_LENGTH=16 LR=1e-4 OMP_NUM_THREADS=2 TENSORBOARD_DIR="$OUT/tensorboard_grpo" bash examples/grpo_tiny.sh

stage "10/12 export to Hugging Face (DeepseekV3ForCausalLM), checked against our model"
LOAD="$OUT/grpo" SAVE="$OUT/hf" bash examples/export_hf.sh | tee "$OUT/hf_export.log"
python - "$OUT/hf_export.log" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
verify = json.loads(text[text.index("{"):text.rindex("}") + 1])["verify"]
if verify["top1_agreement"] < 1.0:
    sys.exit(f"the exported model disagrees with ours: {verify}")
print(f"verify passed: top-1 agreement {verify['top1_agreement']:.3f}, max |logit diff| {verify['max_abs_logit_diff']:.2e}")
PY

stage "11/12 generate with transformers from $OUT/hf (greedy)"
# The prompt as the fine-tuning data was rendered (megatron_r1/data/sft.py): bos, the user turn, the
# assistant marker. Its ids go to $OUT/prompt_ids.txt for the next stage.
python - "$OUT/hf" "$QUESTION" "$NEW_TOKENS" "$OUT/prompt_ids.txt" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf_dir, question, new_tokens, ids_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
prompt = [tokenizer.bos_token_id] + tokenizer.encode(f"<|user|>{question}<|end|><|assistant|>")
# The exported generation_config.json stops at the end of the assistant turn (<|end|>) or of the
# document, as tools/generate.py --chat stops.
output = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
new = output[0, len(prompt):].tolist()
with open(ids_file, "w") as f:
    f.write(" ".join(map(str, prompt)))
print(f"prompt: {question!r}")
print(f"transformers: {tokenizer.decode(new)!r}")
print(f"transformers new token ids: {' '.join(map(str, new))}")
PY

stage "12/12 generate with tools/generate.py from $OUT/grpo (greedy, KV cache), the same question"
# --chat renders the question with the fine-tuning chat template: the prompt ids above.
python tools/generate.py --load "$OUT/grpo" --chat --prompt "$QUESTION" --max-new-tokens "$NEW_TOKENS"

stage "artefacts (the whole pipeline took $SECONDS s)"
cat <<EOF
cleaned corpus        $OUT/clean.jsonl   (rejects with reasons: $OUT/rejects.jsonl)
deduplicated corpus   $OUT/dedup.jsonl   (clusters: $OUT/clusters.jsonl)
tokenizer             $OUT/tokenizer.model
indexed dataset       $OUT/corpus_text_document.bin/.idx
checkpoints           $OUT/checkpoints   (latest: iteration $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))
TensorBoard logs      $OUT/tensorboard
LoRA adapters         $OUT/sft_lora   (latest: iteration $(cat "$OUT/sft_lora/latest_checkpointed_iteration.txt"), with lora.json)
merged SFT checkpoint $OUT/sft_merged
GRPO checkpoints      $OUT/grpo   (latest: iteration $(cat "$OUT/grpo/latest_checkpointed_iteration.txt"); TensorBoard: $OUT/tensorboard_grpo)
Hugging Face model    $OUT/hf   (conversion log: $OUT/hf_export.log)
EOF
