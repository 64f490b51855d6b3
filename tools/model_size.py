"""Dry run of a training launch: validates pretrain_r1.py's flags for a world of WORLD_SIZE processes
(environment variable, default 1) exactly as training would, then prints, without building
anything (so a 671B launch is checked on a laptop):

* the parallel layout: TP / PP / DP, the experts' ETP / EP / expert-DP, which ranks form rank 0's
  groups, and what each pipeline stage holds (megatron_r1/layout.py);
* parameters and training FLOPs per component, total and active per token (megatron_r1/flops.py);
* the memory per GPU of each pipeline stage: weights, gradients, optimizer states, activations
  (megatron_r1/memory.py), and with --gpu-memory-gb whether the busiest stage fits (exit status 1
  if not);
* tokens per step and the summary line.

Example:
  WORLD_SIZE=1024 python tools/model_size.py --gpus-per-node 8 --gpu-memory-gb 80 --mock-data ...
  DRY_RUN=1 bash examples/pretrain_deepseek_v3.sh      # runs this tool with the preset's flags
"""

import sys

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.flops import breakdown_table, count_model, summary
from megatron_r1.layout import describe_layout
from megatron_r1.memory import GB, estimate_memory, memory_table, peak_stage
from megatron_r1.tokenizer import build_tokenizer, vocab_size_with_padding


def parse_args(argv=None):
    parser = build_parser(__doc__)
    dry_run = parser.add_argument_group("dry run (this tool only)")
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
    args = parser.parse_args(argv)
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
            f"{args.gpu_memory_gb:g} GB per GPU"
            + (
                ""
                if fits
                else " (raise EP/ETP/TP/PP, use the distributed optimizer, recompute, or shrink the micro-batch)"
            )
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
