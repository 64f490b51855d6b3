#!/usr/bin/env bash
# The whole pipeline on the bundled tiny corpus, on CPU, in a few minutes:
#   clean -> dedup -> tokenizer -> preprocess -> pretrain (2 processes) -> resume
#
#   bash examples/quickstart.sh                 # artefacts under runs/quickstart
#   OUT=/tmp/qs bash examples/quickstart.sh     # elsewhere
#
# Environment: OUT (output directory), PRETRAIN_ITERS (default 40; the run stops halfway and resumes).
# Each stage prints its own summary; the artefacts are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/quickstart}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-40}
CORPUS=megatron_r1/assets/tiny_corpus.jsonl
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two processes share the two cores of a laptop/CI box
mkdir -p "$OUT"

stage() { printf '\n=== %s\n' "$*"; }

stage "1/6 clean: normalize, language id, quality filters, PII anonymization"
python tools/clean_corpus.py --input "$CORPUS" --output "$OUT/clean.jsonl" --keep-rejects "$OUT/rejects.jsonl"

stage "2/6 dedup: exact and near duplicates (MinHash + LSH)"
python tools/dedup.py --input "$OUT/clean.jsonl" --output "$OUT/dedup.jsonl" --clusters "$OUT/clusters.jsonl"

stage "3/6 tokenizer: SentencePiece BPE with byte fallback and the chat/reasoning special tokens"
python tools/train_tokenizer.py --input "$OUT/dedup.jsonl" --vocab-size 4000 --output-prefix "$OUT/tokenizer"

stage "4/6 preprocess: JSONL -> megatron-core indexed dataset (.bin/.idx)"
python tools/preprocess_data.py --input "$OUT/dedup.jsonl" --output-prefix "$OUT/corpus" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

# The tiny DeepSeek-V3-shaped preset (examples/pretrain_tiny.sh), tensor parallel over 2 processes.
pretrain() {
    GPUS_PER_NODE=2 TP=2 TRAIN_ITERS=$PRETRAIN_ITERS EVAL_INTERVAL=$((PRETRAIN_ITERS / 2)) \
    DATA_PATH="$OUT/corpus_text_document" TOKENIZER_MODEL="$OUT/tokenizer.model" \
    TENSORBOARD_DIR="$OUT/tensorboard" EXTRA_ARGS="--save $OUT/checkpoints --save-interval $((PRETRAIN_ITERS / 2)) $*" \
        bash examples/pretrain_tiny.sh
}

stage "5/6 pretrain: 2 processes (TP=2 + sequence parallel), stopping at iteration $((PRETRAIN_ITERS / 2))"
pretrain --exit-interval $((PRETRAIN_ITERS / 2))

stage "6/6 resume: the same command continues from the checkpoint to iteration $PRETRAIN_ITERS"
pretrain

stage "artefacts"
cat <<EOF
cleaned corpus        $OUT/clean.jsonl   (rejects with reasons: $OUT/rejects.jsonl)
deduplicated corpus   $OUT/dedup.jsonl   (clusters: $OUT/clusters.jsonl)
tokenizer             $OUT/tokenizer.model
indexed dataset       $OUT/corpus_text_document.bin/.idx
checkpoints           $OUT/checkpoints   (latest: iteration $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))
TensorBoard logs      $OUT/tensorboard
EOF
