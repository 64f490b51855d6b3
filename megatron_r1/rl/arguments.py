"""grpo_r1.py's flags: the prompts, rollouts, rewards, objective and MoE options of GRPO, on top of
the shared model/parallelism/training flags and fine-tuning's starting weights and LoRA. Names
follow verl's where it has one (clip ratios, loss aggregation, KL coefficient)."""

import argparse
import os

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.finetuning.arguments import add_model_preparation_arguments, validate_model_preparation_args
from megatron_r1.megatron_lm_flags import parse_known_flags
from megatron_r1.rl.objective import AGGREGATIONS
from megatron_r1.rl.prompts import TEMPLATES
from megatron_r1.rl.rewards import BUILTIN_REWARDS


def add_grpo_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_preparation_arguments(parser)
    _add_rollout_arguments(parser.add_argument_group("GRPO prompts and rollouts"))
    _add_reward_arguments(parser.add_argument_group("GRPO rewards"))
    _add_objective_arguments(parser.add_argument_group("GRPO objective"))


def _add_rollout_arguments(prompts) -> None:
    prompts.add_argument(
        "--prompt-data", nargs="+", default=None, help="JSONL prompt files (prompt or messages, + fields)"
    )
    prompts.add_argument(
        "--prompt-template",
        choices=TEMPLATES,
        default="chat",
        help="chat: the fine-tuning chat template; r1-zero: DeepSeek-R1-Zero's plain-text template",
    )
    prompts.add_argument("--strict-prompts", action="store_true", help="stop at the first bad prompt line")
    prompts.add_argument("--grpo-prompts-per-step", type=int, default=8, help="prompts per iteration (all ranks)")
    prompts.add_argument("--grpo-group-size", type=int, default=8, help="sampled responses per prompt")
    prompts.add_argument("--max-response-length", type=int, default=256, help="new tokens per response at most")
    prompts.add_argument(
        "--rollout-batch-size",
        type=int,
        default=0,
        help="sequences decoded together at most (prompts of any lengths, similar ones together); 0: all of a rank's",
    )
    prompts.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (> 0)")
    prompts.add_argument("--top-p", type=float, default=1.0)
    prompts.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")


def _add_reward_arguments(rewards) -> None:
    rewards.add_argument(
        "--reward",
        nargs="*",
        default=["accuracy", "format"],
        metavar="NAME[:WEIGHT]",
        help=f"bundled rewards ({', '.join(BUILTIN_REWARDS)}), each with an optional weight",
    )
    rewards.add_argument(
        "--reward-function",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION[:WEIGHT]",
        help="a reward function f(prompt, response, fields) -> number; repeatable",
    )
    rewards.add_argument(
        "--reward-errors",
        choices=("raise", "zero"),
        default="raise",
        help="a reward function that raises or returns no finite number: stop with its name, "
        "or give that sample 0 and count it",
    )
    rewards.add_argument(
        "--overlong-buffer-length",
        type=int,
        default=0,
        help="DAPO's soft overlong punishment over the last N tokens of --max-response-length (0: off)",
    )


def _add_objective_arguments(objective) -> None:
    objective.add_argument("--grpo-iterations", type=int, default=1, help="updates per rollout batch (mu)")
    objective.add_argument("--clip-ratio-low", type=float, default=0.2)
    objective.add_argument("--clip-ratio-high", type=float, default=0.2, help="DAPO's clip-higher: e.g. 0.28")
    objective.add_argument(
        "--kl-coef", type=float, default=0.001, help="beta of the k3 KL to the reference policy (0: no reference model)"
    )
    objective.add_argument("--loss-agg-mode", choices=AGGREGATIONS, default="token-mean")
    objective.add_argument(
        "--no-std-normalization",
        action="store_true",
        help="advantages are reward minus the group mean, not divided by its std (Dr. GRPO)",
    )
    objective.add_argument(
        "--dynamic-sampling",
        action="store_true",
        help="train only on groups whose rewards differ (DAPO): further prompts are rolled out until every "
        "data-parallel rank has its share of them, at most --max-num-gen-batches rounds a step",
    )
    objective.add_argument(
        "--max-num-gen-batches",
        type=int,
        default=10,
        help="--dynamic-sampling: most rollout rounds of --grpo-prompts-per-step prompts in one step (verl's "
        "filter_groups.max_num_gen_batches); the step trains on what it kept by then, the rest masked",
    )
    objective.add_argument("--moe-router-freeze", action="store_true", help="the routers' weights do not train")


def _weight(entry: str) -> tuple[str, float]:
    """NAME:WEIGHT -> (NAME, WEIGHT) where the part after the last colon is a number, else (entry, 1)."""
    head, _, tail = entry.rpartition(":")
    try:
        return (head, float(tail)) if head else (entry, 1.0)
    except ValueError:
        return entry, 1.0


def _parse_rewards(args, error) -> list:
    """--reward and --reward-function as [(name, function spec or bundled name, weight)]."""
    rewards = []
    for entry in args.reward:
        name, weight = _weight(entry)
        if name not in BUILTIN_REWARDS:
            error(f"--reward {entry}: unknown reward {name!r} (bundled: {', '.join(BUILTIN_REWARDS)})")
        rewards.append((name, name, weight))
    for entry in args.reward_function:
        spec, weight = _weight(entry)
        if ":" not in spec:
            error(f"--reward-function {entry}: give MODULE:FUNCTION[:WEIGHT]")
        rewards.append((spec, spec, weight))
    if not rewards:
        error("give at least one --reward or --reward-function")
    return rewards


def _validate_rollouts(args, error, sizing_only: bool) -> None:
    if not args.prompt_data:
        error("give --prompt-data with JSONL prompt files")
    for path in args.prompt_data:
        if not os.path.isfile(path):
            error(f"--prompt-data: {path} does not exist")
    if not (args.tokenizer_model or sizing_only):
        error("prompts are rendered with the tokenizer: give --tokenizer-model")
    if args.grpo_group_size < 2:
        error(f"--grpo-group-size ({args.grpo_group_size}) must be at least 2 (a group's mean is its baseline)")
    if args.rollout_batch_size < 0:
        error(f"--rollout-batch-size ({args.rollout_batch_size}) must be >= 0 (0: no limit)")
    if args.grpo_prompts_per_step < 1 or args.max_response_length < 1 or args.grpo_iterations < 1:
        error("--grpo-prompts-per-step, --max-response-length and --grpo-iterations must be at least 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        error("need --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
    if args.max_response_length >= args.seq_length:
        error(
            f"--max-response-length ({args.max_response_length}) leaves no room for a prompt in --seq-length "
            f"({args.seq_length})"
        )
    if args.max_num_gen_batches < 1:
        error(f"--max-num-gen-batches ({args.max_num_gen_batches}) must be at least 1")
    if not 0 <= args.overlong_buffer_length < args.max_response_length:
        error(f"--overlong-buffer-length ({args.overlong_buffer_length}) must be in [0, --max-response-length)")


def _validate_layout(args, error) -> None:
    if args.pipeline_model_parallel_size > 1:
        error(
            "grpo_r1.py runs rollouts in the training processes and does not support pipeline parallelism yet: "
            "--pipeline-model-parallel-size 1 (use TP/EP/DP)"
        )
    if args.grpo_prompts_per_step % args.data_parallel_size:
        error(
            f"--grpo-prompts-per-step ({args.grpo_prompts_per_step}) is not divisible by the data-parallel size "
            f"({args.data_parallel_size})"
        )
    if args.calculate_per_token_loss:
        error("--calculate-per-token-loss: GRPO weighs tokens by --loss-agg-mode instead")
    if args.kl_coef < 0 or args.clip_ratio_low < 0 or args.clip_ratio_high < 0:
        error("--kl-coef, --clip-ratio-low and --clip-ratio-high must be >= 0")
    if args.kl_coef > 0 and not (args.lora or args.pretrained_checkpoint):
        error(
            "--kl-coef > 0 needs the reference policy: --pretrained-checkpoint (or --lora on it); "
            "--kl-coef 0 trains without one"
        )


def validate_grpo_args(args, error, sizing_only: bool = False) -> None:
    """grpo_r1.py's checks; `sizing_only` (tools/model_size.py's dry run, which sizes the vocabulary
    from --vocab-size) does without the tokenizer that renders prompts."""
    sequences = args.grpo_prompts_per_step * args.grpo_group_size
    if args.global_batch_size is not None and args.global_batch_size != sequences:
        error(
            f"--global-batch-size ({args.global_batch_size}) is --grpo-prompts-per-step x --grpo-group-size "
            f"({sequences}) in GRPO: leave it out"
        )
    args.global_batch_size = sequences
    _validate_rollouts(args, error, sizing_only)
    validate_args(args, error, pretraining_data=False)
    validate_model_preparation_args(args, error)
    _validate_layout(args, error)
    args.rewards = _parse_rewards(args, error)
    # The policy decodes its own rollouts, and megatron-core's fused RoPE kernels cannot decode.
    args.apply_rope_fusion = False


def parse_grpo_args(description: str, argv=None) -> argparse.Namespace:
    parser = build_parser(description)
    add_grpo_arguments(parser)
    # verl's defaults for RL; MoE routers without aux losses or bias updates (NeMo-RL: they make
    # training and rollout log-probs drift apart).
    parser.set_defaults(lr=1e-6, lr_decay_style="constant", moe_router_bias_update_rate=0.0, moe_aux_loss_coeff=0.0)
    args = parse_known_flags(parser, argv)
    validate_grpo_args(args, parser.error)
    return args
