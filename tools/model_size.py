"""Dry run of a training launch: validates pretrain_r1.py's flags (with --grpo, grpo_r1.py's) for a world
of WORLD_SIZE processes (environment variable, default 1) exactly as training would, then prints,
without building anything (so a 671B launch is checked on a laptop):

* the parallel layout: TP / PP / DP, the experts' ETP / EP / expert-DP, which ranks form rank 0's
  groups, and what each pipeline stage holds (megatron_r1/layout.py);
* parameters and training FLOPs per component, total and active per token (megatron_r1/flops.py);
* the memory per GPU of each pipeline stage: weights, gradients, optimizer states, activations
  (megatron_r1/memory.py), with --grpo also the reference policy, the rollout's KV cache and its
  activations, and with --gpu-memory-gb whether the busiest stage fits (exit status 1 if not);
* tokens per step and the summary line.

--grpo takes grpo_r1.py's own flags too (--grpo-group-size, --max-response-length, --kl-coef,
--lora, --prompt-data, ...; a flag neither tool knows is an error) and runs its checks (PP > 1
refused, the global batch = prompts x group size, the prompt files exist, ...) but for the tokenizer
it needs to render prompts: without --tokenizer-model the dry run sizes the vocabulary from
--vocab-size.

--hf-config takes the model from a Hugging Face config.json (the published DeepSeek-V3/R1/V2-Lite,
Qwen3, Mixtral, Llama ones: the flags tools/convert_checkpoint.py --direction hf2mcore would print);
flags given after it override its (e.g. --seq-length: config.json's is the longest context).

Example:
  WORLD_SIZE=1024 python tools/model_size.py --gpus-per-node 8 --gpu-memory-gb 80 --mock-data ...
  WORLD_SIZE=64 python tools/model_size.py --hf-config DeepSeek-V3/config.json --seq-length 4096 \
      --expert-model-parallel-size 64 --micro-batch-size 1 --use-distributed-optimizer --bf16 --mock-data
  DRY_RUN=1 bash examples/pretrain_deepseek_v3.sh      # runs this tool with the preset's flags
  DRY_RUN=1 PRETRAINED=ckpt bash examples/grpo_deepseek_v3.sh   # with --grpo and grpo_r1.py's flags
"""

import argparse
import sys

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.flops import breakdown_table, count_model, summary
from megatron_r1.layout import describe_layout
from megatron_r1.megatron_lm_flags import parse_known_flags
from megatron_r1.memory import GB, estimate_memory, memory_table, peak_stage
from megatron_r1.rl.arguments import add_grpo_arguments, validate_grpo_args
from megatron_r1.tokenizer import build_tokenizer, vocab_size_with_padding

# What lowers the peak when it does not fit.
_HINTS = {
    "training": "raise EP/ETP/TP/PP, use the distributed optimizer, recompute, or shrink the micro-batch",
    "grpo": "raise EP/ETP/TP (GRPO refuses PP), shrink the KV cache (--rollout-batch-size, --grpo-group-size, "
    "--seq-length), or drop the reference policy with --kl-coef 0 or --lora",
}


def _read_first(argv) -> argparse.Namespace:
    """--grpo (it decides which flags the parser knows) and --hf-config (its flags come first), read
    before the rest."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--grpo", action="store_true")
    first.add_argument("--hf-config", default=None)
    return first.parse_known_args(argv)[0]


def _hf_model_flags(path: str, error) -> list[str]:
    """The model flags of Hugging Face config.json `path` (hf2mcore's), or `error` naming the file."""
    from megatron_r1.hf.config import UnsupportedModelError
    from megatron_r1.hf.model_flags import args_from_hf_config
    from megatron_r1.jsonfile import read_json_object

    try:
        return args_from_hf_config(read_json_object(path, UnsupportedModelError), path)
    except (UnsupportedModelError, OSError) as problem:
        error(f"--hf-config: {problem}")


def _validate_grpo(args, error) -> None:
    # Rollouts render prompts with the tokenizer; the dry run sizes the vocabulary from --vocab-size.
    validate_grpo_args(args, error, sizing_only=True)


def _refuse_grpo_flags(parser, argv) -> None:
    """A flag of grpo_r1.py's without --grpo: say that --grpo takes it (not just 'unknown flag')."""
    grpo_parser = argparse.ArgumentParser(add_help=False)
    add_grpo_arguments(grpo_parser)
    grpo_flags = {option for action in grpo_parser._actions for option in action.option_strings}
    unknown = [item.split("=", 1)[0] for item in parser.parse_known_args(argv)[1]]
    if misplaced := [flag for flag in unknown if flag in grpo_flags]:
        parser.error(f"{', '.join(misplaced)}: grpo_r1.py's, not pretrain_r1.py's: add --grpo to size a GRPO launch")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(__doc__)
    first = _read_first(argv)
    grpo = first.grpo
    if grpo:
        add_grpo_arguments(parser)
    dry_run = parser.add_argument_group("dry run (this tool only)")
    dry_run.add_argument(
        "--grpo",
        action="store_true",
        help="size grpo_r1.py's launch: take and check its flags, count its reference policy and rollouts",
    )
    dry_run.add_argument(
        "--hf-config",
        default=None,
        help="the model of this Hugging Face config.json (the flags hf2mcore prints); later flags override its",
    )
    dry_run.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="for the node count and node-crossing warnings; default: the world size (one node)",
    )
    dry_run.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="memory of one GPU in GB (1e9 bytes): check that the busiest pipeline stage fits",
    )
    if first.hf_config:
        argv = [*_hf_model_flags(first.hf_config, parser.error), *argv]
    if not grpo:
        _refuse_grpo_flags(parser, argv)
    args = parse_known_flags(parser, argv)  # an unknown flag is named, with the closest known one
    if grpo:
        _validate_grpo(args, parser.error)
    else:
        validate_args(args, parser.error)
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        parser.error(f"--gpus-per-node ({args.gpus_per_node}) must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tokenizer_model:  # the vocabulary comes from the tokenizer, as in training
        vocab_size = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size
        args.padded_vocab_size = vocab_size_with_padding(
            vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
    print(describe_layout(args, args.gpus_per_node or args.world_size))
    print()
    count = count_model(args)
    print(breakdown_table(count))
    print()
    stages = estimate_memory(args)
    print(memory_table(args, stages))
    peak = peak_stage(stages)
    fits = None
    if args.gpu_memory_gb is not None:
        fits = peak.total <= args.gpu_memory_gb * GB
        verdict = "fits in" if fits else "does NOT fit in"
        print(
            f"peak {peak.total / GB:.1f} GB on pipeline stage {peak.contents.stage}: {verdict} "
            f"{args.gpu_memory_gb:g} GB per GPU" + ("" if fits else f" ({_HINTS['grpo' if args.grpo else 'training']})")
        )
    print()
    print(
        f"global batch {args.global_batch_size} x sequence {args.seq_length}: "
        f"{count.tokens_per_iteration:,} tokens/iteration "
        f"({args.num_microbatches} micro-batches of {args.micro_batch_size} per data-parallel rank)"
    )
    print(summary(count) + f", peak {peak.total / GB:.1f} GB/GPU")
    return 1 if fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
