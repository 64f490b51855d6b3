#!/usr/bin/env bash
# GRPO (DeepSeek-R1's reinforcement-learning stage) on the DeepSeek-V3 shape (671B parameters + the
# MTP module, 37B active): rollouts from the current policy in the training processes and layout,
# rule-based rewards, group-relative advantages, the clipped objective with a k3 KL to the starting
# (reference) policy. The model flags are examples/pretrain_deepseek_v3.sh's (they must be the
# checkpoint's); the MoE's balancing is switched off for RL and the MTP layer is kept but frozen.
#
#   NNODES=128 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 PRETRAINED=/ckpt/v3_sft TOKENIZER_MODEL=/models/DeepSeek-V3 \
#       PROMPT_DATA=data/math_prompts.jsonl bash examples/grpo_deepseek_v3.sh
#   DRY_RUN=1 MASTER_ADDR=node0 PRETRAINED=/ckpt/v3_sft bash examples/grpo_deepseek_v3.sh   # layout, memory
#
# Default layout, 128 nodes x 8 GPUs of 80 GB, per GPU as DRY_RUN=1 reports it (grpo_r1.py refuses
# pipeline parallelism, so the weights are split by TP and EP alone): TP 8 (one node, with sequence
# parallelism) splits the 17B non-expert parameters to 3.1B; EP 256 x ETP 4 spreads the 665B expert
# parameters over all 1024 GPUs, 0.65B each. That is 7.5 GB of bf16 weights, 14.7 GB of fp32
# gradients (the frozen MTP layer has none), 8 GB of Adam states and master weights sharded over the
# data-parallel ranks, 7.4 GB for the reference policy's bf16 weights, then the larger of the update's
# activations (2 GB with full recomputation) and the rollout's: one group's KV cache, 8 sequences x
# 4096 tokens x 61 layers x 10 KB (megatron-core's static cache keeps MLA's K and V for each of the 16
# heads on a GPU, not the 1 KB latent: 20.5 GB), plus the prefill's full-vocabulary logits (4.3 GB):
# ~62 GB. DeepSeek-R1's group of 16 doubles the rollout's share: 87 GB, for GPUs of 141 GB
# (GPU_MEMORY_GB=141 GROUP_SIZE=16; with the pre-training preset's EP=64 ETP=2, 123 GB); KL_COEF=0
# (no reference) saves 7.4 GB. The KV cache grows with GROUP_SIZE x SEQ_LENGTH, and with the sequences
# decoded together (ROLLOUT_BATCH_SIZE, default one group; PROMPTS_PER_STEP: one prompt per rank).
#
# Environment: see examples/launch.sh (layout, TOKENIZER_MODEL, TENSORBOARD_DIR, EXTRA_ARGS, DRY_RUN,
# GPU_MEMORY_GB); here also
#   PRETRAINED       checkpoint to start from (the fine-tuned model), also the reference policy of the KL term
#   PROMPT_DATA      prompts JSONL with the fields the rewards read, e.g. {"prompt": ..., "answer": ...}
#                    (default: the bundled arithmetic prompts; tools/make_grpo_prompts.py makes more)
#   SAVE             this run's checkpoints (default runs/grpo_v3); a rerun resumes
#   SEQ_LENGTH       prompt + response tokens (default 4096); MAX_RESPONSE_LENGTH (default 3072)
#   TRAIN_ITERS PROMPTS_PER_STEP GROUP_SIZE ROLLOUT_BATCH_SIZE KL_COEF LR
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-128}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-8}                          # within a node (NVLink); also divides the KV cache's 128 heads by 8
PP=${PP:-1}                          # grpo_r1.py refuses PP > 1 (rollouts run in the training processes)
EP=${EP:-256}                        # 256 experts: one per expert-parallel rank
ETP=${ETP:-4}                        # each expert split over 4 GPUs: EP x ETP = all 1024 GPUs
SEQ_LENGTH=${SEQ_LENGTH:-4096}         # longest prompt + response; also the rollout's KV cache length
GROUP_SIZE=${GROUP_SIZE:-8}          # responses per prompt (DeepSeek-R1's 16: see above)
PRETRAINED=${PRETRAINED:?set PRETRAINED to the checkpoint to reinforce (e.g. a fine-tuned DeepSeek-V3)}
SAVE=${SAVE:-runs/grpo_v3}
if [[ -z "${DRY_RUN:-}" && -z "${TOKENIZER_MODEL:-}" ]]; then
    echo "set TOKENIZER_MODEL: prompts are rendered with the chat template's special tokens" >&2
    exit 2
fi
ENTRY=grpo_r1.py

source examples/model_deepseek_v3.sh  # VOCAB_SIZE, DEFAULT_TOKENIZER_TYPE, MODEL_ARGS, MLA_ARGS, MOE_ARGS
MOE_ARGS+=(
    --moe-router-bias-update-rate 0.0   # the checkpoint's expert biases kept fixed: updates would change routing between rollout and update
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
    --recompute-granularity full        # keep only each layer's input; recompute in backward
    --recompute-method uniform          # every layer in its own group
    --recompute-num-layers 1            # one layer per recompute group
    --save "$SAVE"                      # policy, optimizer; the prompt position and sampling follow the iteration
    --save-interval 50                  # every 50 iterations
)
# Flags of grpo_r1.py alone (after `--` in launch; the dry run takes them to size the rollouts and reference).
GRPO_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"  # the starting weights, and the KL term's reference policy
    --prompt-data "${PROMPT_DATA:-megatron_r1/assets/tiny_grpo.jsonl}"  # {"prompt": ..., "answer": ...} lines
    --prompt-template chat              # rendered as the fine-tuning data was (r1-zero: DeepSeek-R1-Zero's template)
    --grpo-prompts-per-step "${PROMPTS_PER_STEP:-128}"  # prompts per iteration over all ranks: one per DP rank (128)
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
