"""What grpo_r1.py builds before its loop: the policy (fine-tuning's model preparation: starting
weights, LoRA, then this run's checkpoint when resuming; MTP layers and, with --moe-router-freeze,
the routers frozen), the prompts, the rewards, the reference policy and the GRPO step."""

from functools import partial

from megatron_r1.data.jsonl import SkipCounter
from megatron_r1.finetuning import setup_finetuning
from megatron_r1.rl.grpo import GRPOStep, ReferencePolicy
from megatron_r1.rl.prompts import PromptRenderer, PromptStream, read_prompts
from megatron_r1.rl.rewards import BUILTIN_REWARDS, RewardComputer, load_reward_function
from megatron_r1.training import print_rank_last


def _freeze_for_rl(args, chunk) -> None:
    """Before DDP and the optimizer see the chunk: the MTP layers (kept for the checkpoint; GRPO
    trains the next-token policy) and, with --moe-router-freeze, the routers get no gradient."""
    for name, param in chunk.named_parameters():
        if name.startswith("mtp.") or (args.moe_router_freeze and ".router." in name):
            param.requires_grad = False


def setup_grpo(args):
    return setup_finetuning(args, also_prepare_chunk=partial(_freeze_for_rl, args))


def _usable_prompts(args, renderer):
    """The prompt records whose rendering leaves room for --max-response-length in --seq-length."""
    skipped = SkipCounter(strict=args.strict_prompts)
    records = read_prompts(args.prompt_data, skipped)
    for line in skipped.summary_lines():
        print_rank_last(f" {line}")
    room = args.seq_length - args.max_response_length
    usable = [record for record in records if len(renderer.render(record)) <= room]
    if not usable:
        raise ValueError(
            f"--prompt-data: no prompt fits in --seq-length {args.seq_length} minus --max-response-length "
            f"{args.max_response_length} ({room} tokens)"
        )
    if len(usable) < len(records):
        print_rank_last(f" {len(records) - len(usable)} prompts longer than {room} tokens left out")
    return usable


def _reward_computer(args) -> RewardComputer:
    functions = [
        (name, BUILTIN_REWARDS[spec] if spec in BUILTIN_REWARDS else load_reward_function(spec), weight)
        for name, spec, weight in args.rewards
    ]
    overlong = (args.max_response_length, args.overlong_buffer_length) if args.overlong_buffer_length else None
    return RewardComputer(functions, on_error=args.reward_errors, overlong=overlong)


def build_grpo_step(args, state) -> GRPOStep:
    renderer = PromptRenderer(state.tokenizer, args.prompt_template)
    records = _usable_prompts(args, renderer)
    prompts = PromptStream(records, args.seed)
    # The stream's position is the prompts consumed: a resumed run continues where the saved one was.
    consumed = state.consumed_samples
    prompts.load_state_dict({"epoch": consumed // len(records), "index": consumed % len(records),
                             "num_prompts": len(records)})  # fmt: skip
    reference = ReferencePolicy(args, state) if args.kl_coef > 0 else None
    print_rank_last(
        f" GRPO: {len(records)} prompts, {args.grpo_prompts_per_step} per step x {args.grpo_group_size} responses, "
        f"reference policy: {'none' if reference is None else 'base model' if args.lora else args.pretrained_checkpoint}"
    )
    return GRPOStep(args, state, prompts, renderer, _reward_computer(args), reference)
