#!/usr/bin/env bash
# GRPO (DeepSeek-R1's reinforcement-learning stage) on the bundled arithmetic prompts, from a
# fine-tuned checkpoint of the tiny model: rollouts from the current policy, rule-based rewards,
# group-relative advantages, the clipped objective with a k3 KL to the starting (reference) policy.
# The model flags must be the checkpoint's: they come from MODEL_FLAGS (default examples/model_tiny.sh).
#
#   PRETRAINED=runs/quickstart/sft_merged TOKENIZER_MODEL=runs/quickstart/tokenizer.model \
#       bash examples/grpo_tiny.sh                                      # one process
#   GPUS_PER_NODE=2 TP=2 PRETRAINED=... TOKENIZER_MODEL=... bash examples/grpo_tiny.sh
#
# Environment: see examples/launch.sh (layout, TOKENIZER_MODEL, TENSORBOARD_DIR, EXTRA_ARGS, DRY_RUN);
# here also
#   PRETRAINED       checkpoint to start from, also the reference policy of the KL term
#   PROMPT_DATA      prompts JSONL (default megatron_r1/assets/tiny_grpo.jsonl; tools/make_grpo_prompts.py makes more)
#   SAVE             this run's checkpoints (default runs/grpo); a rerun resumes
#   MODEL_FLAGS      a file that sets MODEL_ARGS, VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE
#   TRAIN_ITERS PROMPTS_PER_STEP GROUP_SIZE MAX_RESPONSE_LENGTH LR
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-1}   # processes per node (CPU processes without a GPU)
TP=${TP:-1}
PP=${PP:-1}                         # grpo_r1.py refuses PP > 1
EP=${EP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-20}
PRETRAINED=${PRETRAINED:?set PRETRAINED to the checkpoint to reinforce (e.g. runs/quickstart/sft_merged)}
SAVE=${SAVE:-runs/grpo}
if [[ -z "${DRY_RUN:-}" && -z "${TOKENIZER_MODEL:-}" ]]; then
    echo "set TOKENIZER_MODEL: prompts are rendered with the chat template's special tokens" >&2
    exit 2
fi
ENTRY=grpo_r1.py
source "${MODEL_FLAGS:-examples/model_tiny.sh}"  # MODEL_ARGS, VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE

TRAINING_ARGS=(
    --micro-batch-size 4                # sequences per forward pass per GPU
    --train-iters "$TRAIN_ITERS"        # GRPO iterations (rollout batches)
    --optimizer adam                    # AdamW
    --lr "${LR:-1e-6}"                  # RL takes small steps (verl's default)
    --lr-decay-style constant           # no schedule
    --weight-decay 0.0                  # no decay
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # prompt order and rollout sampling
    --save "$SAVE"                      # policy, optimizer; the prompt position and sampling follow the iteration
    --save-interval 10                  # every 10 iterations
)
# Flags of grpo_r1.py alone (after `--` in launch: the dry run does not check them).
GRPO_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"  # the starting weights, and the KL term's reference policy
    --prompt-data "${PROMPT_DATA:-megatron_r1/assets/tiny_grpo.jsonl}"  # {"prompt": ..., "answer": ...} lines
    --prompt-template chat              # rendered as the fine-tuning data was (r1-zero: DeepSeek-R1-Zero's template)
    --grpo-prompts-per-step "${PROMPTS_PER_STEP:-4}"  # prompts per iteration (all ranks together)
    --grpo-group-size "${GROUP_SIZE:-4}"  # responses per prompt; advantages are relative to the group
    --max-response-length "${MAX_RESPONSE_LENGTH:-24}"  # new tokens per response at most
    --temperature 1.0                   # rollout sampling
    --reward final_number format        # last number = the answer (the tiny SFT set answers "5 + 12 = 17."), <think>/<answer> format
    --grpo-iterations 1                 # updates per rollout batch
    --clip-ratio-low 0.2                # PPO clip below 1
    --clip-ratio-high 0.28              # DAPO's clip-higher above 1
    --kl-coef 0.001                     # beta of the k3 KL to the reference
    --loss-agg-mode token-mean          # DAPO's token-level mean
)
# bf16 on GPUs only: CPU matmuls are fastest in fp32.
if nvidia-smi -L >/dev/null 2>&1; then TRAINING_ARGS+=(--bf16); fi

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" -- "${GRPO_ARGS[@]}"
