#!/usr/bin/env bash
# GRPO (DeepSeek-R1's reinforcement-learning stage) on the DeepSeek-V2-Lite shape (15.7B parameters,
# 2.4B active): rollouts from the current policy in the training processes and layout, rule-based
# rewards, group-relative advantages, the clipped objective with a k3 KL to the starting (reference)
# policy. One node of 8 GPUs by default: expert parallel 8, data parallel 8 (each rank rolls out its
# share of the prompts), bf16. The model flags are examples/pretrain_deepseek_v2_lite.sh's (they must
# be the checkpoint's); the MoE's balancing is switched off for RL.
#
#   PRETRAINED=runs/v2_lite_sft TOKENIZER_MODEL=/models/DeepSeek-V2-Lite PROMPT_DATA=data/math_prompts.jsonl \
#       bash examples/grpo_deepseek_v2_lite.sh
#   DRY_RUN=1 PRETRAINED=runs/v2_lite_sft bash examples/grpo_deepseek_v2_lite.sh   # command, layout, memory only
#   DRY_RUN=1 PRETRAINED=... KL_COEF=0 bash examples/grpo_deepseek_v2_lite.sh     # without the reference model
#
# Memory per GPU (80 GB), as DRY_RUN=1 reports it: the policy's training state as in pre-training
# (bf16 weights and fp32 gradients of 1.3B dense + 1.8B expert parameters, fp32 master weights and
# Adam states sharded over the data-parallel ranks: ~42 GB), a second copy of the bf16 weights for the
# reference policy (~6 GB), then the larger of the update's activations (17 GB) and the rollout's,
# which take turns: one group's KV cache (16 sequences x 4096 tokens x 27 layers; megatron-core's
# static cache keeps MLA's per-head K and V, 10 KB per token and layer, not the 1 KB latent: ~18 GB)
# plus the prefill's full-vocabulary logits (~7 GB): ~73 GB.
# The KV cache and logits grow with the sequences decoded together (ROLLOUT_BATCH_SIZE, default one
# group: each rank decodes its 4 prompts' groups in turn) and with SEQ_LENGTH; KL_COEF=0 drops the
# reference.
#
# Environment: see examples/launch.sh (layout, TOKENIZER_MODEL, TENSORBOARD_DIR, EXTRA_ARGS, DRY_RUN,
# GPU_MEMORY_GB); here also
#   PRETRAINED       checkpoint to start from (the fine-tuned model), also the reference policy of the KL term
#   PROMPT_DATA      prompts JSONL with the fields the rewards read, e.g. {"prompt": ..., "answer": ...}
#                    (default: the bundled arithmetic prompts; tools/make_grpo_prompts.py makes more)
#   SAVE             this run's checkpoints (default runs/grpo_v2_lite); a rerun resumes
#   SEQ_LENGTH       prompt + response tokens (default 4096); MAX_RESPONSE_LENGTH (default 3072)
#   TRAIN_ITERS PROMPTS_PER_STEP GROUP_SIZE ROLLOUT_BATCH_SIZE KL_COEF LR
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}                          # 16 heads and a 2048 hidden size: no need to split layers
PP=${PP:-1}                          # grpo_r1.py refuses PP > 1 (rollouts run in the training processes)
EP=${EP:-8}                          # 64 experts: 8 per GPU
SEQ_LENGTH=${SEQ_LENGTH:-4096}         # longest prompt + response; also the rollout's KV cache length
GROUP_SIZE=${GROUP_SIZE:-16}         # responses per prompt (DeepSeek-R1: 16)
PRETRAINED=${PRETRAINED:?set PRETRAINED to the checkpoint to reinforce (e.g. a fine-tuned DeepSeek-V2-Lite)}
SAVE=${SAVE:-runs/grpo_v2_lite}
if [[ -z "${DRY_RUN:-}" && -z "${TOKENIZER_MODEL:-}" ]]; then
    echo "set TOKENIZER_MODEL: prompts are rendered with the chat template's special tokens" >&2
    exit 2
fi
ENTRY=grpo_r1.py

source examples/model_deepseek_v2_lite.sh  # VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE, MODEL_ARGS, MLA_ARGS, MOE_ARGS
MOE_ARGS+=(
    --moe-router-load-balancing-type none  # no balance loss: it makes rollout and training log-probs drift (NeMo-RL)
    --moe-aux-loss-coeff 0.0            # RL: no balance loss
)
TRAINING_ARGS=(
    --bf16                              # bf16 weights, rollouts and compute; fp32 master weights and grads
    --micro-batch-size 1                # sequences per forward pass per GPU in the update
    --train-iters "${TRAIN_ITERS:-1000}"  # GRPO iterations (rollout batches)
    --optimizer adam                    # AdamW
    --lr "${LR:-1e-6}"                  # RL takes small steps (verl's default)
    --lr-decay-style constant           # no schedule
    --weight-decay 0.0                  # no decay
    --adam-beta1 0.9                    # AdamW betas
    --adam-beta2 0.95                   # AdamW betas
    --clip-grad 1.0                     # gradient-norm clipping
    --seed 1234                         # prompt order and rollout sampling
    --save "$SAVE"                      # policy, optimizer; the prompt position and sampling follow the iteration
    --save-interval 50                  # every 50 iterations
)
# Flags of grpo_r1.py alone (after `--` in launch; the dry run takes them to size the rollouts and reference).
GRPO_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"  # the starting weights, and the KL term's reference policy
    --prompt-data "${PROMPT_DATA:-megatron_r1/assets/tiny_grpo.jsonl}"  # {"prompt": ..., "answer": ...} lines
    --prompt-template chat              # rendered as the fine-tuning data was (r1-zero: DeepSeek-R1-Zero's template)
    --grpo-prompts-per-step "${PROMPTS_PER_STEP:-32}"  # prompts per iteration, all ranks (DeepSeek-R1: 32); x DP
    --grpo-group-size "$GROUP_SIZE"     # advantages are relative to the group
    --rollout-batch-size "${ROLLOUT_BATCH_SIZE:-$GROUP_SIZE}"  # sequences decoded together: one group (sizes the KV cache)
    --max-response-length "${MAX_RESPONSE_LENGTH:-3072}"  # new tokens per response at most; prompts: the rest
    --temperature 1.0                   # rollout sampling (DeepSeek-R1-Zero: 1.0)
    --reward accuracy format            # <answer> or \boxed{} vs the record's "answer"; <think>/<answer> format
    --grpo-iterations 1                 # updates per rollout batch (on-policy)
    --clip-ratio-low 0.2                # PPO clip below 1
    --clip-ratio-high 0.28              # DAPO's clip-higher above 1
    --kl-coef "${KL_COEF:-0.001}"       # beta of the k3 KL to the reference (DeepSeek-R1: 0.001); 0: no reference model
    --loss-agg-mode token-mean          # DAPO's token-level mean
)

source examples/launch.sh
launch "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}" -- "${GRPO_ARGS[@]}"
